"""Every metric name prunetune reports, in one torch-free place: what a trial logs per epoch and
at the end (the lists in README's "What a trial records"), which spec makes a final metric exist (objectives must name one
every trial reports), the report's axis labels, and which keys of a Tune result are not metrics."""

from __future__ import annotations

from typing import Any

from prunetune import registry

# Per epoch (MLflow step = the epoch index across all phases).
PER_EPOCH = ("train_loss", "train_acc", "val_loss", "val_acc", "sparsity", "lr", "epoch_seconds",
             "distill_loss")  # distill_loss: with distill only

# At the end of a trial.
FINAL_METRICS = (
    "test_acc", "test_top5", "test_loss", "test_balanced_acc", "test_macro_f1", "sparsity",
    "nonzero_params", "total_params", "compression_ratio", "flops_dense", "flops_sparse",
    "theoretical_speedup", "checkpoint_bytes", "train_epochs_total", "trial_seconds", "val_acc",
    "model_sparsity", "dense_test_acc", "test_acc_drop",
    # structured criteria; the last four only with schedule.remove
    "channel_sparsity", "compact_params", "latency_ms_dense", "latency_ms_compact", "measured_speedup",
    "teacher_test_acc",  # with distill
    "nm_valid",  # with l1_nm
)

_REMOVED = ("compact_params", "latency_ms_dense", "latency_ms_compact", "measured_speedup")


def unavailable(metric: str, spec: Any, searched: set[str] | dict) -> str | None:
    """Why not every trial of `spec` (with the `searched` keys) reports `metric`, or None."""
    from prunetune import registry

    structured = registry.is_structured(spec.schedule.criterion) and "schedule.criterion" not in searched
    if metric == "channel_sparsity" and not structured:
        return "a structured schedule.criterion (not searched)"
    if metric in _REMOVED and not (structured and spec.schedule.remove and "schedule.remove" not in searched):
        return "a structured schedule.criterion with schedule.remove: true (neither searched)"
    if metric == "teacher_test_acc" and spec.distill is None:
        return "distill"
    pattern = registry.is_pattern(spec.schedule.criterion) and "schedule.criterion" not in searched
    if metric == "nm_valid" and not pattern:
        return "schedule.criterion l1_nm (not searched)"
    return None


# The report's axis labels, with units.
LABELS = {
    "test_acc": "test accuracy (fraction)", "val_acc": "validation accuracy (fraction)",
    "test_balanced_acc": "test balanced accuracy (fraction)", "test_macro_f1": "test macro F1",
    "test_top5": "test top-5 accuracy (fraction)", "test_loss": "test cross-entropy loss",
    "nonzero_params": "non-zero parameters (count)", "flops_sparse": "FLOPs per sample (sparse)",
    "checkpoint_bytes": "compressed checkpoint (bytes)", "theoretical_speedup": "theoretical speedup (×)",
    "compression_ratio": "compression ratio (×)", "trial_seconds": "trial time (s)",
    "sparsity": "sparsity of the selected layers (fraction)", "model_sparsity": "sparsity of all prunable layers (fraction)",
    "test_acc_drop": "test accuracy drop from dense (fraction)",
}

# What Ray Tune adds to every result, and prunetune's own control keys: not metrics.
_NOT_METRICS = ("config", "trial_id", "date", "hostname", "node_ip", "pid", "time_", "timestamp",
                "training_iteration", "iterations_since_restore", "done", "checkpoint_dir_name",
                "should_checkpoint", "experiment_tag", "prunetune_")


def is_metric(key: str) -> bool:
    """Whether a key of a trial's result is one of its metrics."""
    return not key.startswith(_NOT_METRICS)
