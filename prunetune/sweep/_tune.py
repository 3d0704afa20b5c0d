"""The Ray side of a sweep: the trainable (in Ray workers), the driver's Tune callbacks (MLflow,
progress), and the Optuna searcher."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
from ray import tune
from ray.tune.search import Repeater
from ray.tune.search.optuna import OptunaSearch

from prunetune import search, tracking
from prunetune.errors import UserError
from prunetune.spec import LoadedSpec, load
from prunetune.sweep import FINAL_FLAG, PER_EPOCH



# ---------------------------------------------------------------------------------------------
# The trainable (runs in a Ray worker)
# ---------------------------------------------------------------------------------------------

def _trainable(config: dict, *, raw: dict, dense_dir: str, resume_dir: str, cpus: float,
               checkpoint_s: float, teachers: dict[str, str]) -> None:
    """One trial in a Ray worker. Its resume state is its own, not Tune's: Tune deletes a trial's
    older checkpoint when it records a newer one, so a driver killed between that and its next
    experiment snapshot would leave the snapshot naming a deleted checkpoint. Here the latest
    state is one file replaced atomically (`<trial_id>.pt`), and a finished trial's artifacts
    stay in `<trial_id>.final/` until the sweep ends; Tune only ever holds the final checkpoint."""
    import torch

    from prunetune.trial import DenseCache, Trial, final_step

    torch.set_num_threads(max(1, int(cpus)))
    loaded = load(None, raw=raw)
    spec = search.spec_of(loaded, config)
    trial = Trial(spec, teacher_dir=Path(teachers[spec.distill.teacher]) if spec.distill else None)
    tid = tune.get_context().get_trial_id()
    resume = Path(resume_dir)
    resume.mkdir(parents=True, exist_ok=True)
    state_file, final = resume / f"{tid}.pt", resume / f"{tid}.final"
    work = Path(tempfile.mkdtemp(prefix=f".{tid}-", dir=resume))  # same filesystem: renames are atomic

    def report_final(folder: Path, metrics: dict, epoch: int) -> None:
        tune.report({**metrics, FINAL_FLAG: True, "epoch": epoch}, checkpoint=tune.Checkpoint.from_directory(str(folder)))

    # Saving the state costs time: save at an epoch end when `checkpoint_s` seconds have passed
    # since the last save (0: every epoch).
    # The state is saved before the epoch is reported; a resumed trial reports its history again.
    last_save, saved_epoch = time.monotonic(), -1

    def report(metrics: dict, epoch: int) -> None:
        nonlocal last_save, saved_epoch
        if trial.can_checkpoint and epoch > saved_epoch and time.monotonic() - last_save >= checkpoint_s:
            trial.save_checkpoint(work / "trial.pt")
            os.replace(work / "trial.pt", state_file)
            last_save, saved_epoch = time.monotonic(), epoch
        tune.report({**metrics, "epoch": epoch})

    trial.report = report
    try:
        if (final / "artifacts" / "metrics.json").is_file():
            # The trial had finished when the driver died, before Tune recorded it: report again.
            history = json.loads((final / "artifacts" / "history.json").read_text())
            report_final(final, json.loads((final / "artifacts" / "metrics.json").read_text()), final_step(history))
            return
        result = trial.run(work / "final" / "artifacts", DenseCache(Path(dense_dir)),
                           resume_from=state_file if state_file.is_file() else None)
        os.replace(work / "final", final)
        state_file.unlink(missing_ok=True)
        report_final(final, result.metrics, result.final_step)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Driver-side callbacks: MLflow (the one writer) and progress
# ---------------------------------------------------------------------------------------------

class MlflowLogger(tune.Callback):
    """Logs every trial as a child run of the sweep's parent run. Re-attaches to a trial's run by
    its `prunetune.trial_id` tag after a resume, and skips epochs it has already logged, so a
    resumed sweep gains no duplicate runs and no duplicate metric steps."""

    def __init__(self, uri: str, artifacts: str, experiment: str, parent_run_id: str, sweep: str, raw: dict):
        self.uri, self.artifacts, self.experiment = uri, artifacts, experiment
        self.parent_run_id, self.sweep, self.raw = parent_run_id, sweep, raw
        self._tracker = None
        self._runs: dict[str, str] = {}
        self._last_step: dict[str, int] = {}
        self._final_logged: set[str] = set()

    def __getstate__(self):  # Tune pickles callbacks with the experiment; clients stay out
        state = dict(self.__dict__)
        state.update(_tracker=None, _runs={}, _last_step={}, _final_logged=set())
        return state

    @property
    def tracker(self) -> tracking.Tracker:
        if self._tracker is None:
            self._tracker = tracking.Tracker(self.uri, self.artifacts)
        return self._tracker

    def run_for(self, trial) -> str:
        """The trial's child run: re-attached by trial id if it exists, else created."""
        tid = trial.trial_id
        if tid not in self._runs:
            found = self.tracker.client.search_runs(
                [self.tracker.experiment_id(self.experiment)],
                filter_string=f"tags.`{tracking.TAG_TRIAL_ID}` = '{tid}' and "
                              f"tags.`{tracking.TAG_PARENT}` = '{self.parent_run_id}'")
            if found:
                self._reattach(tid, found[0])
            else:
                self._runs[tid] = self._create(trial)
                self._last_step[tid] = -1
        return self._runs[tid]

    def _create(self, trial) -> str:
        loaded = load(None, raw=self.raw)
        spec = search.spec_of(loaded, dict(trial.config))
        config_hash = spec.config_hash()
        return self.tracker.start_run(
            self.experiment, f"{spec.schedule.method}-{trial.trial_id}",
            {tracking.TAG_SWEEP: self.sweep, tracking.TAG_TRIAL_ID: trial.trial_id,
             tracking.TAG_CONFIG_HASH: config_hash, tracking.TAG_KIND: "trial",
             tracking.TAG_REPLICATE: str(trial.config.get(search.REPLICATE, 0))},
            spec.flat(), parent_run_id=self.parent_run_id)

    def _reattach(self, tid: str, run) -> None:
        """Continue a run from before a resume: note what it already holds, mark it RUNNING."""
        run_id = run.info.run_id
        history = self.tracker.client.get_metric_history(run_id, "train_loss")
        self._last_step[tid] = max((m.step for m in history), default=-1)
        if "trial_seconds" in run.data.metrics:
            self._final_logged.add(tid)
        if run.info.status != "RUNNING":
            self.tracker.client.update_run(run_id, status="RUNNING")
        self._runs[tid] = run_id

    def _log_final(self, tid: str, result: dict) -> None:
        if tid not in self._final_logged:  # once, also when a resumed trial reports it again
            final = {k: v for k, v in result.items() if k != "epoch" and _is_metric_name(k)}
            self.tracker.log_metrics(self._runs[tid], final, result.get("epoch", 0))
            self._final_logged.add(tid)

    def _close_finished(self, run_id: str, checkpoint_path: str | None) -> None:
        artifacts = Path(checkpoint_path) / "artifacts" if checkpoint_path else None
        if artifacts is not None and artifacts.is_dir() and not self.tracker.client.list_artifacts(run_id):
            self.tracker.log_artifacts(run_id, artifacts)
        self.tracker.end_run(run_id, "FINISHED")

    def on_trial_start(self, iteration, trials, trial, **info):
        self.run_for(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id = self.run_for(trial)
        tid = trial.trial_id
        if result.get(FINAL_FLAG):
            self._log_final(tid, result)
            return
        epoch = result.get("epoch")
        if epoch is None or epoch <= self._last_step.get(tid, -1):
            return  # already logged before a resume
        self.tracker.log_metrics(run_id, {k: result[k] for k in PER_EPOCH if k in result}, epoch)
        self._last_step[tid] = epoch

    def on_trial_complete(self, iteration, trials, trial, **info):
        run_id = self.run_for(trial)
        if (trial.last_result or {}).get(FINAL_FLAG) and trial.checkpoint is not None:
            self._close_finished(run_id, trial.checkpoint.path)
        else:  # stopped early by ASHA, before its final evaluation
            self.tracker.set_tags(run_id, {"prunetune.state": "stopped_early"})
            self.tracker.end_run(run_id, "KILLED")

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = self.run_for(trial)
        self.tracker.set_tags(run_id, {"prunetune.error": _error_text(trial)})
        self.tracker.end_run(run_id, "FAILED")

    def close_restored(self, results) -> None:
        """After a restore: close the runs of trials that finished while the driver was down
        (their results are in Tune's state; their MLflow runs may still say RUNNING)."""
        runs = tracking.child_runs(self.tracker, self.experiment, self.parent_run_id)
        for result in results:
            metrics = result.metrics or {}
            run = runs.get(metrics.get("trial_id"))
            if metrics.get(FINAL_FLAG) and run is not None and run.info.status == "RUNNING":
                self._reattach(metrics["trial_id"], run)
                self._log_final(metrics["trial_id"], metrics)
                self._close_finished(run.info.run_id, result.checkpoint.path if result.checkpoint else None)


def _is_metric_name(key: str) -> bool:
    return not key.startswith(("config", "trial_id", "date", "hostname", "node_ip", "pid", "time_", "timestamp",
                               "training_iteration", "iterations_since_restore", "done", "checkpoint_dir_name",
                               "should_checkpoint", "experiment_tag", FINAL_FLAG))


def _error_text(trial) -> str:
    path = getattr(trial, "error_file", None)
    text = ""
    if path and Path(path).is_file():
        lines = [l for l in Path(path).read_text().splitlines() if l.strip()]
        text = lines[-1] if lines else ""
    return (text or "trial failed")[:5000]


class Progress(tune.Callback):
    """One line whenever a trial ends: done / running / failed, the best so far, elapsed."""

    def __init__(self, objective: str, mode: str, total: int, echo: Callable[[str], None]):
        self.objective, self.mode, self.total, self.echo = objective, mode, total, echo
        self.start = time.monotonic()
        self._seen: set = set()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["echo"] = None
        return state

    def on_step_end(self, iteration, trials, **info):
        ended = {t.trial_id for t in trials if t.status in ("TERMINATED", "ERROR")}
        if ended == self._seen or self.echo is None:
            return
        self._seen = ended
        done = sum(t.status == "TERMINATED" for t in trials)
        failed = sum(t.status == "ERROR" for t in trials)
        running = sum(t.status == "RUNNING" for t in trials)
        scores = [(t.last_result or {}).get(self.objective) for t in trials if t.status == "TERMINATED"]
        scores = [s for s in scores if s is not None]
        best = (max if self.mode == "max" else min)(scores) if scores else None
        elapsed = time.monotonic() - self.start
        best_text = f"best {self.objective} {best:.4f}" if best is not None else "no result yet"
        self.echo(f"[{int(elapsed) // 60:02d}:{int(elapsed) % 60:02d}] {done}/{self.total} done, "
                  f"{running} running, {failed} failed; {best_text}")


def ray_init(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs = dict(logging_level=logging.WARNING, log_to_driver=False)
    if address:
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise UserError(f"--address: cannot attach to a Ray cluster at {address} ({exc})") from None
    else:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, **kwargs)


def check_resources(cpus: float, gpus: float) -> None:
    """A request no node can meet is bad input (exit 2), not a sweep that waits forever."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    fits = any(n["Resources"].get("CPU", 0) >= cpus and n["Resources"].get("GPU", 0) >= gpus for n in nodes)
    if not fits:
        have = ", ".join(f"{n['Resources'].get('CPU', 0):g} CPU / {n['Resources'].get('GPU', 0):g} GPU" for n in nodes)
        raise UserError(f"resources: no Ray node can give a trial {cpus:g} CPU and {gpus:g} GPU "
                        f"(nodes: {have or 'none'}); lower resources.cpus_per_trial / gpus_per_trial")


@contextlib.contextmanager
def _graceful_ctrl_c(echo: Callable[[str], None]):
    """Ctrl-C → Tune's graceful stop (it saves the experiment state), and we learn it happened;
    a second Ctrl-C interrupts at once. Tune's own SIGINT handler would hide the first one."""
    stopped = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stopped
        return
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    previous = signal.getsignal(signal.SIGINT)

    def on_sigint(sig, frame):
        stopped.set()
        signal.signal(signal.SIGINT, previous)
        echo("stopping: saving the sweep's state (Ctrl-C again to quit at once)")
        os.kill(os.getpid(), signal.SIGUSR1)  # Tune stops gracefully on SIGUSR1

    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield stopped
    finally:
        signal.signal(signal.SIGINT, previous)


class _OptunaSearch(OptunaSearch):
    def on_trial_complete(self, trial_id, result=None, error=False):
        # A trial stopped early (ASHA) has no final metrics: it is PRUNED in Optuna.
        if result and not result.get(FINAL_FLAG):
            result = None
        super().on_trial_complete(trial_id, result, error)


def _optuna_searcher(loaded: LoadedSpec, objectives: list[tuple[str, str]], seed: int, replicates: int = 1):
    # Objectives are always given as a list: OptunaSearch then reads them only from a trial's
    # last result (our final report), not from every per-epoch report.
    optuna_search = _OptunaSearch(space=search.DefineByRun(loaded), metric=[m for m, _ in objectives],
                                  mode=[d for _, d in objectives], sampler=search.make_sampler(loaded, seed))
    return optuna_search if replicates == 1 else _Replicates(optuna_search, replicates)


class _Replicates(Repeater):
    """Each configuration Optuna samples runs as `repeat` Tune trials (config[REPLICATE] = 0..R-1,
    seed + index); Optuna is told the mean of each objective once all of them have ended.
    Ray's Repeater averages one metric and forgets its groups on restore: this one averages
    every objective, treats a replicate without final metrics (failed, stopped early) as absent,
    and saves its groups beside the searcher's state so a resumed sweep completes them."""

    def __init__(self, searcher, repeat: int):
        super().__init__(searcher, repeat)
        self._finals: dict[str, dict[str, dict | None]] = {}  # primary trial id → replicate → final result

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False, **kwargs):
        group = self._trial_id_to_group[trial_id]
        done = self._finals.setdefault(group.primary_trial_id, {})
        done[trial_id] = result if result and result.get(FINAL_FLAG) else None
        if len(done) < group.max_trials:
            return
        finals = [r for r in done.values() if r is not None]
        if not finals:
            self.searcher.on_trial_complete(group.primary_trial_id, None, error=error)
            return
        mean = {m: float(np.mean([r[m] for r in finals])) for m in self.searcher.metric}
        self.searcher.on_trial_complete(group.primary_trial_id, {**mean, FINAL_FLAG: True})

    def save(self, checkpoint_path: str):
        self.searcher.save(checkpoint_path)
        with open(checkpoint_path + ".replicates", "wb") as f:
            pickle.dump(self.get_state(), f)

    def restore(self, checkpoint_path: str):
        self.searcher.restore(checkpoint_path)
        if os.path.exists(checkpoint_path + ".replicates"):
            with open(checkpoint_path + ".replicates", "rb") as f:
                self.set_state(pickle.load(f))


def drop_unrecorded_runs(tracker: tracking.Tracker, experiment: str, parent: str, trials,
                         echo: Callable[[str], None]) -> None:
    """Delete child runs of trials that Tune's saved state does not know: the driver made the run,
    then died before Tune recorded the trial (it snapshots every second), and the resumed sweep
    sampled another trial in its place. One child run per trial of the sweep remains."""
    known = {t.trial_id for t in trials}
    for trial_id, run in tracking.child_runs(tracker, experiment, parent).items():
        if trial_id not in known:
            tracker.client.delete_run(run.info.run_id)
            echo(f"dropped MLflow run {run.info.run_id} ({run.info.status.lower()}): its trial {trial_id} "
                 "was not recorded before the driver stopped, and another trial took its place")


def _rows(trials, tracker: tracking.Tracker, experiment: str, parent: str, objectives) -> list[dict]:
    runs = tracking.child_runs(tracker, experiment, parent)
    rows = []
    for t in trials:
        last = t.last_result or {}
        run = runs.get(t.trial_id)
        row = {"trial_id": t.trial_id, "run_id": run.info.run_id if run else None, "state": t.status,
               **dict(t.config)}
        for metric, _ in objectives:
            row[metric] = last.get(metric) if last.get(FINAL_FLAG) else None
        rows.append(row)
    return rows
