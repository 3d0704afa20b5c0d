"""What a trial tells the driver, through Tune's reports: the keys its reports carry beside its
metrics, and how the driver reads a trial's end (its last report, or what Tune recorded when
its worker died). Shared by the worker (`trainable`) and the driver's callbacks; no ray here."""

from __future__ import annotations

import json
import numbers
from pathlib import Path

from prunetune.errors import ERROR_CHARS

FINAL_FLAG = "prunetune_final"  # set in a trial's last report, which carries the final metrics
ERROR_KEY = "prunetune_error"  # in the last report of a trial that failed by its own error
# Where a trial ran, in each of its reports (the driver tags its run with them).
NODE_KEY, NODE_ID_KEY, GPUS_KEY = "prunetune_node", "prunetune_node_id", "prunetune_gpu_ids"
RESUMED_KEY = "prunetune_resumed_from_epoch"  # in the reports of a trial that continued a saved state
PHASE_KEY, EPOCHS_KEY = "prunetune_phase", "prunetune_epochs"  # for live progress: phase, planned epochs
PACKED_KEY = "prunetune_packed"  # the report's other numbers, as one JSON string (see `pack`)
ASHA_METRIC = "val_acc"  # what ASHA compares trials on, in every per-epoch report


def tune_metrics(objectives) -> frozenset[str]:
    """The numbers Tune itself reads from a trial's reports: the objectives (its searcher), the
    per-epoch metric ASHA compares and the epoch (ASHA's time)."""
    return frozenset({"epoch", ASHA_METRIC, *(o.metric for o in objectives)})


def pack(report: dict, keep: frozenset[str]) -> dict:
    """A report as Tune gets it. Tune keeps running statistics (min, max, mean, last 5, last 10)
    of every number in every report, in each trial's record, and writes all the records to its
    experiment state every second: with each metric as a number, 37 KB a trial (10 classes; a
    per-class recall each), 7.35 MB at 200 trials. Numbers other than `keep` travel as one JSON
    string (`PACKED_KEY`), which Tune carries but does not count; `unpack` is its inverse.
    Flags (booleans: `FINAL_FLAG`) and strings (`ERROR_KEY`, where the trial ran) are never
    packed, so Tune's record of a trial's last result answers `failed`/`succeeded` as it is."""
    packed = {k: v for k, v in report.items()
              if isinstance(v, numbers.Number) and not isinstance(v, bool) and k not in keep}
    if not packed:
        return report
    return {**{k: v for k, v in report.items() if k not in packed},
            PACKED_KEY: json.dumps(packed, default=_plain_number)}


def _plain_number(value):
    """A numpy or torch scalar as the Python number JSON writes."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not a number JSON can hold: {value!r}")


def unpack(result: dict | None) -> dict:
    """A trial's report (or last result) with its packed numbers back among its keys."""
    if not result or PACKED_KEY not in result:
        return dict(result or {})
    return {**{k: v for k, v in result.items() if k != PACKED_KEY}, **json.loads(result[PACKED_KEY])}


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
