"""The metric names prunetune reports, torch-free: what a trial logs per epoch and at the end
(the lists in README's "What a trial records"; a criterion's own final metrics are named in its
module, `Criterion.metrics`), which spec makes a final metric exist (objectives must name one
every trial reports), the report's axis labels, and which keys of a Tune result are not metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Per epoch (MLflow step = the epoch index across all phases).
PER_EPOCH = ("train_loss", "train_acc", "val_loss", "val_acc", "sparsity", "lr", "epoch_seconds",
             "distill_loss",  # with distill only
             "regrown")  # rigl, set: weights newly grown in the epoch

# At the end of a trial (every criterion's; those only some criteria report are named in their
# modules, `Criterion.metrics`, and listed with these by `final_metrics`).
FINAL_METRICS = (
    "test_acc", "test_top5", "test_loss", "test_balanced_acc", "test_macro_f1", "sparsity",
    "nonzero_params", "total_params", "compression_ratio", "flops_dense", "flops_sparse",
    "theoretical_speedup", "checkpoint_bytes", "train_epochs_total", "trial_seconds", "val_acc",
    "model_sparsity", "dense_test_acc", "test_acc_drop",
    "teacher_test_acc",  # with distill
    "mask_updates",  # rigl, set: how many times the mask moved
)


def by_criterion() -> dict[str, str]:
    """The final metrics only some criteria report (`Criterion.metrics`), each with what a spec
    needs for every trial to report it."""
    from prunetune import registry

    out: dict[str, str] = {}
    for name in registry.CRITERIA:
        out.update(registry.criterion(name).metrics)
    return out


def final_metrics() -> tuple[str, ...]:
    """Every final metric a trial may report: an objective must name one."""
    return FINAL_METRICS + tuple(m for m in by_criterion() if m not in FINAL_METRICS)


def unavailable(metric: str, spec: Any, searched: set[str] | dict) -> str | None:
    """Why not every trial of `spec` (with the `searched` keys) reports `metric`, or None."""
    needs = by_criterion().get(metric)
    if needs is not None:
        from prunetune import registry

        known = spec.schedule.criterion in registry.CRITERIA
        if ("schedule.criterion" in searched or not known
                or metric not in registry.criterion(spec.schedule.criterion).reports(spec.schedule, searched)):
            return needs
    if metric == "teacher_test_acc" and spec.distill is None:
        return "distill"
    if metric == "mask_updates" and ("schedule.method" in searched or spec.schedule.method not in ("rigl", "set")):
        return "schedule.method rigl or set (every trial)"
    if metric == "val_acc" and not _always_validates(spec, searched):
        return ("a validation split: data.val_fraction above 0 (every searched value), or a dataset that "
                "publishes one (medmnist; imagefolder with a val/ folder)")
    return None


def _always_validates(spec: Any, searched: set[str] | dict) -> bool:
    """Whether every trial has a validation split, so reports a final `val_acc` (trial.py reports
    it only then). Published val splits: every MedMNIST .npz, an imagefolder root with val/;
    digits, CIFAR and HAM10000 publish none, so theirs is carved by data.val_fraction."""
    def values(key: str, fixed: Any) -> list:
        entry = searched.get(key) if isinstance(searched, dict) else None
        return list(entry.probe_values()) if entry is not None else [fixed]

    def publishes_val(dataset: str) -> bool:
        if dataset == "medmnist":
            return True
        return dataset == "imagefolder" and spec.data.root is not None and (Path(spec.data.root) / "val").is_dir()

    carved = min(values("data.val_fraction", spec.data.val_fraction)) > 0  # a range's ends: its lowest
    return carved or all(publishes_val(d) for d in values("data.dataset", spec.data.dataset))


def is_test_metric(metric: str) -> bool:
    """A metric measured on the test split (test_acc, test_acc_drop, dense_test_acc, ...)."""
    return metric.startswith("test_") or "_test_" in metric


def selection_note(objectives: list[str]) -> str | None:
    """The one line a sweep prints when its objectives select on the test split, or None."""
    on_test = [m for m in objectives if is_test_metric(m)]
    if not on_test:
        return None
    what = "a test-split metric" if len(on_test) == 1 else "test-split metrics"
    return (f"note: search.objectives selects on {', '.join(on_test)}, {what}: the chosen trials' test "
            "scores are optimistically biased; select on val_acc")


def selection_key(value: float, mode: str, trial_id: str) -> tuple:
    """The one order every selection of trials uses (the top table, the best run, the parent run's
    best-trial tags, the report's best trial, `cka --top`): the first objective, best first, then
    the trial id (ascending, as text) among trials that tie on it. Sort ascending by this key."""
    return (-value if mode == "max" else value, trial_id)


def shown_metrics(objectives: list[str]) -> list[str]:
    """The metrics a sweep's top table shows: the objectives, then test_acc beside them when it is
    not one (reported for the trials the objectives chose, never used to choose them)."""
    return list(objectives) + ([] if "test_acc" in objectives else ["test_acc"])


# The report's axis labels, with units.
LABELS = {
    "test_acc": "test accuracy (fraction)", "val_acc": "validation accuracy (fraction)",
    "test_balanced_acc": "test balanced accuracy (fraction)", "test_macro_f1": "test macro F1",
    "test_top5": "test top-5 accuracy (fraction)", "test_loss": "test cross-entropy loss",
    "nonzero_params": "non-zero parameters (count)", "flops_sparse": "FLOPs per sample (sparse)",
    "checkpoint_bytes": "compressed checkpoint (bytes)", "theoretical_speedup": "theoretical speedup (×)",
    "compression_ratio": "compression ratio (×)", "trial_seconds": "trial time (s)",
    "sparsity": "sparsity of the selected layers (fraction)",
    "model_sparsity": "sparsity of all prunable layers (fraction)",
    "test_acc_drop": "test accuracy drop from dense (fraction)",
}

# What Ray Tune adds to every result, and prunetune's own control keys: not metrics.
_NOT_METRICS = ("config", "trial_id", "date", "hostname", "node_ip", "pid", "time_", "timestamp",
                "training_iteration", "iterations_since_restore", "done", "checkpoint_dir_name",
                "should_checkpoint", "experiment_tag", "prunetune_")


def is_metric(key: str) -> bool:
    """Whether a key of a trial's result is one of its metrics."""
    return not key.startswith(_NOT_METRICS)
