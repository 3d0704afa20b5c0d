"""Pruning criteria: a weight tensor → a score per weight; the lowest scores are pruned first."""

from __future__ import annotations

import torch


def l1_unstructured(weight: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """|w|: magnitude pruning, as torch.nn.utils.prune.L1Unstructured."""
    return weight.detach().abs()


def random_scores(weight: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform random scores: the random-pruning baseline, seeded by the trial's generator."""
    return torch.rand(weight.shape, generator=generator, device="cpu").to(weight.device)
