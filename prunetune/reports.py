"""What a trial reports: one `Epoch` per epoch as it trains, and its `TrialResult` at the end
(with the history those epochs came from, which a resumed or cached run reports again)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


def epoch_reports(history: list[dict]):
    """A history's rows as the (metrics, epoch) pairs a trial reported."""
    for row in history:
        row = dict(row)
        epoch = row.pop("epoch")
        yield row, epoch


def final_step(history: list[dict]) -> int:
    """The MLflow step of the final metrics: one past the last reported epoch."""
    return history[-1]["epoch"] + 1 if history else 0


@dataclass
class TrialResult:
    metrics: dict
    out_dir: Path
    history: list[dict] = field(default_factory=list)

    @property
    def final_step(self) -> int:
        return final_step(self.history)


@dataclass(frozen=True)
class Epoch:
    """One reported epoch of a trial, as `Trial(on_epoch=...)` receives it: every epoch a trial
    reports, the ones it replays included (the cached dense phase, a cached ticket round, the
    history of a resumed state; a receiver skips what it already holds)."""

    metrics: dict  # train_loss, train_acc, val_loss, val_acc, sparsity, lr, epoch_seconds (distill_loss)
    index: int  # the epoch's index across all phases (the MLflow step)
    phase: str  # "dense", or the name of the schedule's phase in progress ("step1", "round2", ...)
    resumed_from_epoch: int | None  # the epoch a resumed trial continued from; None if it did not
    planned_epochs: float  # epochs the trial trains in all: the dense phase and its schedule's
    # writes the trial's state to a path, for `Trial.run(resume_from=...)`; None where none can be
    # taken (the dense phase and the cached ticket rounds: the dense cache keeps those)
    save: Callable[[Path], None] | None
