"""What a trial tells the driver, through Tune's reports: the keys its reports carry beside its
metrics, and how the driver reads a trial's end (its last report, or what Tune recorded when
its worker died). Shared by the worker (`trainable`) and the driver's callbacks; no ray here."""

from __future__ import annotations

from pathlib import Path

from prunetune.errors import ERROR_CHARS

FINAL_FLAG = "prunetune_final"  # set in a trial's last report, which carries the final metrics
ERROR_KEY = "prunetune_error"  # in the last report of a trial that failed by its own error
# Where a trial ran, in each of its reports (the driver tags its run with them).
NODE_KEY, NODE_ID_KEY, GPUS_KEY = "prunetune_node", "prunetune_node_id", "prunetune_gpu_ids"
RESUMED_KEY = "prunetune_resumed_from_epoch"  # in the reports of a trial that continued a saved state
PHASE_KEY, EPOCHS_KEY = "prunetune_phase", "prunetune_epochs"  # for live progress: phase, planned epochs


def failed(result: dict | None) -> bool:
    """A trial's last report says it failed by its own error."""
    return bool(result) and ERROR_KEY in result


def succeeded(result: dict | None) -> bool:
    """A final report with metrics (not a trial's own failure, not a trial stopped early)."""
    return bool(result) and bool(result.get(FINAL_FLAG)) and ERROR_KEY not in result


def tune_error_text(trial) -> str:
    """What Tune recorded of a trial's failure (its worker or node died), in one line."""
    path = getattr(trial, "error_file", None)
    text = Path(path).read_text() if path and Path(path).is_file() else ""
    return (_death_reason(text) or "trial failed")[:ERROR_CHARS]


def _death_reason(text: str) -> str:
    """One line for Ray's long account of a dead worker or node."""
    if "NodeDiedError" in text or "its node has died" in text or "node it was running on" in text:
        return "its node died"
    if "OutOfMemoryError" in text or "running low on memory" in text:
        return "its worker was killed: the node ran low on memory"
    if "worker process has died" in text or "ActorDiedError" in text or "actor died" in text:
        return "its worker process died (killed, or out of memory)"
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("Failure #")]
    return lines[-1] if lines else ""
