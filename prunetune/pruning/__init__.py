"""Pruning: masks (apply, keep zero, count), criteria (score → mask) and schedules (which
sparsity when). Imports torch only."""
