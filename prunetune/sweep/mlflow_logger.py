"""The driver's one writer to MLflow: a Tune callback that logs every trial as a child run of
the sweep's parent run, from what the trials report to Tune (keyed by trial id); and, after a
resumed sweep, the removal of runs whose trials Tune never recorded."""

from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path
from typing import Callable

from ray import tune

from prunetune import search, tracking
from prunetune.metrics import PER_EPOCH, is_metric
from prunetune.spec import LoadedSpec
from prunetune.storage import Storage
from prunetune.sweep.paths import SweepPaths
from prunetune.sweep.protocol import (
    ERROR_KEY,
    FINAL_FLAG,
    GPUS_KEY,
    NODE_ID_KEY,
    NODE_KEY,
    RESUMED_KEY,
    failed,
    tune_error_text,
)


class MlflowLogger(tune.Callback):
    """Logs every trial as a child run of the sweep's parent run. Re-attaches to a trial's run by
    its `prunetune.trial_id` tag after a resume, and skips epochs it has already logged, so a
    resumed sweep gains no duplicate runs and no duplicate metric steps.

    Per-epoch metrics are written in batches, every FLUSH_S seconds and whenever a trial ends (a
    transaction per epoch per trial cost the driver more than anything else it did). Epochs
    still queued when the driver is killed are not lost: a resumed trial reports its history
    again, and what MLflow lacks is logged then."""

    FLUSH_S = 5.0

    def __init__(self, uri: str, artifacts: str, experiment: str, parent_run_id: str, sweep: str,
                 loaded: LoadedSpec, storage: str):
        self.uri, self.artifacts, self.experiment = uri, artifacts, experiment
        self.parent_run_id, self.sweep, self.loaded, self.storage = parent_run_id, sweep, loaded, storage
        self._tracker = None
        self._runs: dict[str, str] = {}
        self._last_step: dict[str, int] = {}
        self._final_logged: set[str] = set()
        self._where: dict[str, dict] = {}  # trial id → the where-tags last set
        self._pending: dict[str, list] = {}  # run id → [(metrics, step)] not yet written
        self._flushed_at = time.monotonic()
        self.resumed = False  # a restored sweep: trials may already have runs to re-attach

    def __getstate__(self):  # Tune pickles callbacks with the experiment; clients stay out
        state = dict(self.__dict__)
        state.update(_tracker=None, _runs={}, _last_step={}, _final_logged=set(), _where={}, _pending={})
        return state

    def flush(self) -> None:
        for run_id, rows in self._pending.items():
            if rows:
                self.tracker.log_metric_rows(run_id, rows)
        self._pending = {}
        self._flushed_at = time.monotonic()

    @property
    def tracker(self) -> tracking.Tracker:
        if self._tracker is None:
            self._tracker = tracking.Tracker(self.uri, self.artifacts)
        return self._tracker

    def run_for(self, trial) -> str:
        """The trial's child run: re-attached by trial id if it exists, else created."""
        tid = trial.trial_id
        if tid not in self._runs:
            found = self.resumed and self.tracker.trial_run(self.experiment, self.parent_run_id, tid)
            if found:
                self._reattach(tid, found)
            else:
                self._runs[tid] = self._create(trial)
                self._last_step[tid] = -1
        return self._runs[tid]

    def _create(self, trial) -> str:
        spec = search.spec_of(self.loaded, dict(trial.config))  # the trial's spec, resolved once here
        return self.tracker.start_trial_run(
            self.experiment, spec,
            {tracking.TAG_SWEEP: self.sweep, tracking.TAG_TRIAL_ID: trial.trial_id,
             tracking.TAG_REPLICATE: str(trial.config.get(search.REPLICATE, 0))},
            parent_run_id=self.parent_run_id, run_name=f"{spec.schedule.method}-{trial.trial_id}")

    def _reattach(self, tid: str, run) -> None:
        """Continue a run from before a resume: note what it already holds, mark it RUNNING."""
        run_id = run.run_id
        self._last_step[tid] = max((step for step, _ in self.tracker.history(run_id, "train_loss")), default=-1)
        if "trial_seconds" in run.metrics:
            self._final_logged.add(tid)
        if run.status != "RUNNING":
            self.tracker.reopen_run(run_id)
        self._runs[tid] = run_id

    def _tag_where(self, tid: str, result: dict) -> None:
        """Tag the run with the node (and GPUs) its trial runs on, again if a retry moved it, and
        the epoch it resumed from when it continued a saved state."""
        tags = {tracking.TAG_NODE: result.get(NODE_KEY), tracking.TAG_NODE_ID: result.get(NODE_ID_KEY),
                tracking.TAG_GPU_IDS: result.get(GPUS_KEY), tracking.TAG_RESUMED: result.get(RESUMED_KEY)}
        tags = {k: v for k, v in tags.items() if v is not None}
        if tags and self._where.get(tid) != tags:
            self.tracker.set_tags(self._runs[tid], tags)
            self._where[tid] = tags

    def _log_final(self, tid: str, result: dict) -> None:
        self.flush()
        if tid not in self._final_logged:  # once, also when a resumed trial reports it again
            final = {k: v for k, v in result.items() if k != "epoch" and is_metric(k)}
            self.tracker.log_metrics(self._runs[tid], final, result.get("epoch", 0))
            self._final_logged.add(tid)

    def _close_finished(self, run_id: str, trial_id: str) -> None:
        """Log the trial's artifacts, which it left in the sweep's storage, and end its run."""
        self.flush()
        final = Storage(self.storage).child(self.sweep).child(SweepPaths.RESUME).child(f"{trial_id}.final")
        if self.tracker.has_artifacts(run_id) or (final.is_local and not final.exists("artifacts")):
            self.tracker.finish_trial_run(run_id)
        elif final.is_local:
            self.tracker.finish_trial_run(run_id, final.local_path("artifacts"))
        else:
            with tempfile.TemporaryDirectory(prefix="prunetune-artifacts-") as tmp:
                local = None
                with contextlib.suppress(FileNotFoundError):
                    local = final.get_dir("artifacts", Path(tmp))
                self.tracker.finish_trial_run(run_id, local)

    def _close_failed(self, run_id: str, error: str) -> None:
        self.flush()
        self.tracker.fail_trial_run(run_id, error)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.run_for(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id = self.run_for(trial)
        tid = trial.trial_id
        self._tag_where(tid, result)
        if result.get(FINAL_FLAG):
            if not failed(result):
                self._log_final(tid, result)
            return
        epoch = result.get("epoch")
        if epoch is None or epoch <= self._last_step.get(tid, -1):
            return  # already logged before a resume
        self._pending.setdefault(run_id, []).append(({k: result[k] for k in PER_EPOCH if k in result}, epoch))
        self._last_step[tid] = epoch
        if time.monotonic() - self._flushed_at >= self.FLUSH_S:
            self.flush()

    def on_step_end(self, iteration, trials, **info):
        if self._pending and time.monotonic() - self._flushed_at >= self.FLUSH_S:
            self.flush()

    def on_experiment_end(self, trials, **info):
        self.flush()

    def on_trial_complete(self, iteration, trials, trial, **info):
        run_id = self.run_for(trial)
        last = trial.last_result or {}
        if failed(last):
            self._close_failed(run_id, last[ERROR_KEY])
        elif last.get(FINAL_FLAG):
            self._close_finished(run_id, trial.trial_id)
        else:  # stopped early by ASHA, before its final evaluation
            self.tracker.stop_trial_run(run_id)

    def on_trial_error(self, iteration, trials, trial, **info):
        # Tune saw an error: the trial's worker or node died, after every retry.
        self._close_failed(self.run_for(trial), tune_error_text(trial))

    def on_trial_recover(self, iteration, trials, trial, **info):
        self.flush()  # the retried trial reports its history again: MLflow must know what it has

    def close_restored(self, results) -> None:
        """After a restore: close the runs of trials that finished while the driver was down
        (their results are in Tune's state; their MLflow runs may still say RUNNING)."""
        runs = self.tracker.trial_runs(self.experiment, self.parent_run_id)
        for result in results:
            metrics = result.metrics or {}
            run = runs.get(metrics.get("trial_id"))
            if metrics.get(FINAL_FLAG) and run is not None and run.status == "RUNNING":
                self._reattach(metrics["trial_id"], run)
                if failed(metrics):
                    self._close_failed(run.run_id, metrics[ERROR_KEY])
                else:
                    self._log_final(metrics["trial_id"], metrics)
                    self._close_finished(run.run_id, metrics["trial_id"])


def drop_unrecorded_runs(tracker: tracking.Tracker, experiment: str, parent: str, trials,
                         echo: Callable[[str], None]) -> None:
    """Delete child runs of trials that Tune's saved state does not know: the driver made the run,
    then died before Tune recorded the trial (it snapshots every second), and the resumed sweep
    sampled another trial in its place. One child run per trial of the sweep remains."""
    known = {t.trial_id for t in trials}
    for trial_id, run in tracker.trial_runs(experiment, parent).items():
        if trial_id not in known:
            tracker.delete_run(run.run_id)
            echo(f"dropped MLflow run {run.run_id} ({run.status.lower()}): its trial {trial_id} "
                 "was not recorded before the driver stopped, and another trial took its place")
