"""Sweeps: the only module that imports ray. Ray Tune runs the trials, Optuna (through Tune's
OptunaSearch) proposes them, and a driver-side callback is the one writer to MLflow: trials
report to Tune, the driver logs what they report, keyed by trial id.

Sweep state lives under `mlruns/tune/<name>` (Tune's experiment plus `sweep.json`: the parent run
and the search-space fingerprint), so `--resume` continues the same sweep after Ctrl-C, a crash or
SIGKILL of the driver.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ray import tune
from ray.tune.search.optuna import OptunaSearch

from prunetune import search, tracking
from prunetune.errors import UserError
from prunetune.spec import LoadedSpec, SearchEntry

PER_EPOCH = ("train_loss", "train_acc", "val_loss", "val_acc", "sparsity", "lr", "epoch_seconds")
FINAL_FLAG = "prunetune_final"  # set in a trial's last report, which carries the final metrics


class SweepInterrupted(Exception):
    """The user stopped the sweep (Ctrl-C); its state is saved and it can be resumed."""


def space_fingerprint(space: dict[str, SearchEntry]) -> dict:
    return {k: {"kind": e.kind, "args": list(e.args), "step": e.step} for k, e in sorted(space.items())}


@dataclass
class SweepPaths:
    tune_root: Path  # Tune's storage_path
    name: str

    @property
    def dir(self) -> Path:
        return self.tune_root / self.name

    @property
    def meta(self) -> Path:
        return self.dir / "sweep.json"


# ---------------------------------------------------------------------------------------------
# The trainable (runs in a Ray worker)
# ---------------------------------------------------------------------------------------------

def _trainable(config: dict, *, raw: dict, cache_root: str, cpus: float) -> None:
    import torch

    from prunetune.spec import load
    from prunetune.trial import DenseCache, Trial

    torch.set_num_threads(max(1, int(cpus)))
    loaded = load(None, raw=raw)
    spec = loaded.resolve(search.decode(loaded, config))
    trial = Trial(spec)
    work = Path(tempfile.mkdtemp(prefix="prunetune-trial-"))

    def report(metrics: dict, epoch: int) -> None:
        result = {**metrics, "epoch": epoch}
        if not trial.can_checkpoint:
            tune.report(result)
            return
        with tempfile.TemporaryDirectory(dir=work) as ckpt:
            trial.save_checkpoint(Path(ckpt) / "trial.pt")
            tune.report(result, checkpoint=tune.Checkpoint.from_directory(ckpt))

    trial.report = report
    resume_from = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        local = Path(checkpoint.to_directory(str(work / "restored")))
        if (local / "artifacts" / "metrics.json").is_file():
            # The trial had finished when the driver died, before Tune recorded it: report again.
            final = json.loads((local / "artifacts" / "metrics.json").read_text())
            history = json.loads((local / "artifacts" / "history.json").read_text())
            tune.report({**final, FINAL_FLAG: True, "epoch": history[-1]["epoch"] + 1 if history else 0},
                        checkpoint=tune.Checkpoint.from_directory(str(local)))
            return
        if (local / "trial.pt").is_file():
            resume_from = local / "trial.pt"
    try:
        result = trial.run(work / "artifacts", DenseCache(Path(cache_root) / "dense"), resume_from=resume_from)
        final = {**result.metrics, FINAL_FLAG: True,
                 "epoch": result.history[-1]["epoch"] + 1 if result.history else 0}
        with tempfile.TemporaryDirectory(dir=work) as ckpt:
            shutil.copytree(work / "artifacts", Path(ckpt) / "artifacts")
            tune.report(final, checkpoint=tune.Checkpoint.from_directory(ckpt))
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
        self.run_ids: dict[str, str] = {}  # trial id → run id, for the summary

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
        tid = trial.trial_id
        if tid in self._runs:
            return self._runs[tid]
        client = self.tracker.client
        exp_id = self.tracker.experiment_id(self.experiment)
        found = client.search_runs(
            [exp_id], filter_string=f"tags.`{tracking.TAG_TRIAL_ID}` = '{tid}' and "
                                    f"tags.`{tracking.TAG_PARENT}` = '{self.parent_run_id}'")
        if found:
            run_id = found[0].info.run_id
            history = client.get_metric_history(run_id, "train_loss")
            self._last_step[tid] = max((m.step for m in history), default=-1)
            if "trial_seconds" in found[0].data.metrics:
                self._final_logged.add(tid)
            if found[0].info.status != "RUNNING":
                client.update_run(run_id, status="RUNNING")
        else:
            loaded = LoadedSpec(None, self.raw, _space(self.raw))
            spec = loaded.resolve(search.decode(loaded, dict(trial.config)))
            config_hash = spec.config_hash()
            run_id = self.tracker.start_run(
                self.experiment, f"{spec.schedule.method}-{tid}",
                {tracking.TAG_SWEEP: self.sweep, tracking.TAG_TRIAL_ID: tid,
                 tracking.TAG_CONFIG_HASH: config_hash, tracking.TAG_KIND: "trial"},
                spec.flat(), parent_run_id=self.parent_run_id)
            self._last_step[tid] = -1
        self._runs[tid] = run_id
        self.run_ids[tid] = run_id
        return run_id

    def on_trial_start(self, iteration, trials, trial, **info):
        self.run_for(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id = self.run_for(trial)
        tid = trial.trial_id
        if result.get(FINAL_FLAG):
            if tid not in self._final_logged:  # once, also when a resumed trial reports it again
                final = {k: v for k, v in result.items() if k != "epoch" and _is_metric_name(k)}
                self.tracker.log_metrics(run_id, final, result.get("epoch", 0))
                self._final_logged.add(tid)
            return
        epoch = result.get("epoch")
        if epoch is None or epoch <= self._last_step.get(tid, -1):
            return  # already logged before a resume
        self.tracker.log_metrics(run_id, {k: result[k] for k in PER_EPOCH if k in result}, epoch)
        self._last_step[tid] = epoch

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.finish(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = self.run_for(trial)
        self.tracker.set_tags(run_id, {"prunetune.error": _error_text(trial)})
        self.tracker.end_run(run_id, "FAILED")

    def finish(self, trial) -> None:
        run_id = self.run_for(trial)
        last = trial.last_result or {}
        checkpoint = trial.checkpoint
        if last.get(FINAL_FLAG) and checkpoint is not None:
            artifacts = Path(checkpoint.path) / "artifacts"
            if artifacts.is_dir():
                self.tracker.log_artifacts(run_id, artifacts)
            self.tracker.end_run(run_id, "FINISHED")
        else:  # stopped early by ASHA, before its final evaluation
            self.tracker.set_tags(run_id, {"prunetune.state": "stopped_early"})
            self.tracker.end_run(run_id, "KILLED")


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


def _space(raw: dict) -> dict[str, SearchEntry]:
    from prunetune.spec import _extract_search
    return _extract_search(raw)


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


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------

@dataclass
class SweepResult:
    name: str
    parent_run_id: str
    rows: list[dict]  # one per trial: trial_id, run_id, state, params, objectives
    objectives: list[tuple[str, str]]
    interrupted: bool


def _ray_init(address: str | None) -> None:
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


def plan_text(loaded: LoadedSpec, paths: SweepPaths, uri: str) -> str:
    spec = loaded.fixed_spec()
    lines = [f"sweep {spec.name}: {spec.search.num_trials} trials, sampler {spec.search.sampler}, "
             f"objectives {', '.join(f'{o.metric} ({o.mode})' for o in spec.search.objectives)}",
             f"  model {spec.model.arch}, data {spec.data.dataset} ({spec.data.image_size} px)",
             f"  resources per trial: {spec.resources.cpus_per_trial:g} CPU, {spec.resources.gpus_per_trial:g} GPU; "
             f"at most {spec.resources.max_concurrent} at once; early stop: {spec.search.early_stop}",
             f"  state: {paths.dir}", f"  tracking: {uri}", "  search space:"]
    for key, entry in loaded.space.items():
        lines.append(f"    {key}: {entry.kind} {list(entry.args)}" + (f" step {entry.step}" if entry.step else ""))
    return "\n".join(lines)


def prepare(loaded: LoadedSpec, *, resume: bool, restart: bool, tracking_uri: str | None) -> tuple[SweepPaths, str]:
    """All checks that need no Ray and write nothing; returns the sweep paths and tracking URI."""
    from prunetune.data import load_dataset

    if resume and restart:
        raise UserError("--resume and --restart: choose one")
    search.check(loaded)
    spec = loaded.fixed_spec()
    uri = tracking.absolute_uri(tracking.effective_uri(spec.tracking.uri, tracking_uri))
    tracking.check_store(uri)
    load_dataset(spec.data, spec.seed)  # a missing or malformed data root fails here
    paths = SweepPaths(Path("mlruns/tune").resolve(), spec.name)
    exists = paths.meta.is_file()
    if exists and not (resume or restart):
        raise UserError(f"sweep {spec.name!r} already exists at {paths.dir}; "
                        "use --resume to continue it or --restart to start it over")
    if resume:
        if not exists:
            raise UserError(f"--resume: there is no sweep {spec.name!r} at {paths.dir} to resume")
        meta = json.loads(paths.meta.read_text())
        if meta["space"] != space_fingerprint(loaded.space):
            raise UserError(f"--resume: the search space of {spec.name!r} changed since the sweep started; "
                            "use --restart to start over (or restore the spec)")
    return paths, uri


def run_sweep(loaded: LoadedSpec, spec_file: Path | None, *, resume: bool = False, restart: bool = False,
              address: str | None = None, tracking_uri: str | None = None,
              echo: Callable[[str], None] = print) -> SweepResult:
    """Run (or resume) the sweep of a loaded spec. Raises UserError on bad input before writing."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    paths, uri = prepare(loaded, resume=resume, restart=restart, tracking_uri=tracking_uri)
    spec = loaded.fixed_spec()
    res = spec.resources
    _ray_init(address)
    check_resources(res.cpus_per_trial, res.gpus_per_trial)

    tracker = tracking.Tracker(uri, spec.tracking.artifacts)
    if restart:
        shutil.rmtree(paths.dir, ignore_errors=True)
    if resume:
        parent = json.loads(paths.meta.read_text())["parent_run_id"]
        tracker.client.update_run(parent, status="RUNNING")
    else:
        parent = tracker.start_run(spec.name, f"sweep-{spec.name}",
                                   {tracking.TAG_SWEEP: spec.name, tracking.TAG_KIND: "sweep"})
        if spec_file is not None:
            tracker.log_artifact(parent, spec_file)
        paths.dir.mkdir(parents=True, exist_ok=True)
        paths.meta.write_text(json.dumps({"parent_run_id": parent, "space": space_fingerprint(loaded.space),
                                          "tracking_uri": uri}, indent=1))

    # Per-epoch reports carry no objective (it exists only after the final evaluation); Tune's
    # strict check would reject them.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    # Keeping one checkpoint per trial forces an experiment snapshot after each report: that is
    # what makes a SIGKILLed driver lose no finished trial, so silence Tune's warning about it.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    cache_root = os.environ.get("PRUNETUNE_CACHE") or str(Path.home() / ".cache" / "prunetune")
    trainable = tune.with_resources(
        tune.with_parameters(_trainable, raw=loaded.raw, cache_root=cache_root, cpus=res.cpus_per_trial),
        {"cpu": res.cpus_per_trial, "gpu": res.gpus_per_trial})
    objectives = [(o.metric, o.mode) for o in spec.search.objectives]
    logger_cb = MlflowLogger(uri, spec.tracking.artifacts, spec.name, parent, spec.name, loaded.raw)
    progress = Progress(objectives[0][0], objectives[0][1], spec.search.num_trials, echo)

    if resume and tune.Tuner.can_restore(str(paths.dir)):
        tuner = tune.Tuner.restore(str(paths.dir), trainable=trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
        # Tune restores the callbacks it pickled; give them this process's output and store.
        callbacks = tuner._local_tuner.get_run_config().callbacks
        for cb in callbacks:
            if isinstance(cb, Progress):
                cb.echo, cb.start = echo, time.monotonic()
            if isinstance(cb, MlflowLogger):
                logger_cb = cb
        _reconcile_after_restore(tuner, logger_cb)
    else:
        searcher = _optuna_searcher(loaded, objectives, spec.seed)
        # ASHA compares trials on val_acc after the dense phase (which all trials share)
        scheduler = (ASHAScheduler(metric="val_acc", mode="max", time_attr="epoch", max_t=10_000,
                                   grace_period=spec.train.dense_epochs + 1)
                     if spec.search.early_stop == "asha" else FIFOScheduler())
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=spec.search.num_trials,
                                        max_concurrent_trials=res.max_concurrent),
            run_config=tune.RunConfig(
                name=spec.name, storage_path=str(paths.tune_root), callbacks=[logger_cb, progress], verbose=0,
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                failure_config=tune.FailureConfig(max_failures=0, fail_fast=False)))
    with _graceful_ctrl_c(echo) as stopped:
        grid = tuner.fit()
    trials = grid._experiment_analysis.trials
    rows = _rows(trials, tracker, spec.name, parent, objectives)
    interrupted = stopped.is_set() or sum(t.status in ("TERMINATED", "ERROR") for t in trials) < spec.search.num_trials
    tracker.end_run(parent, "KILLED" if interrupted else "FINISHED")
    result = SweepResult(spec.name, parent, rows, objectives, interrupted)
    if interrupted:
        raise SweepInterrupted(result)
    return result


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


def _reconcile_after_restore(tuner, logger_cb: MlflowLogger) -> None:
    grid = tuner.get_results()
    finished = []
    for result in grid:
        trial_id = (result.metrics or {}).get("trial_id")
        if trial_id:
            finished.append((trial_id, result))
    # Close runs of trials that finished while the driver was down (their results are in Tune's
    # state, their MLflow runs may still say RUNNING).
    tracker = logger_cb.tracker
    exp_id = tracker.experiment_id(logger_cb.experiment)
    for trial_id, result in finished:
        found = tracker.client.search_runs(
            [exp_id], filter_string=f"tags.`{tracking.TAG_TRIAL_ID}` = '{trial_id}' and "
                                    f"tags.`{tracking.TAG_PARENT}` = '{logger_cb.parent_run_id}'")
        metrics = result.metrics or {}
        if not metrics.get(FINAL_FLAG):
            continue
        if found and found[0].info.status == "RUNNING":
            run_id = found[0].info.run_id
            if "trial_seconds" not in found[0].data.metrics:  # the final report was not logged yet
                final = {k: v for k, v in metrics.items() if k != "epoch" and _is_metric_name(k)}
                tracker.log_metrics(run_id, final, metrics.get("epoch", 0))
            if (result.checkpoint is not None and (Path(result.checkpoint.path) / "artifacts").is_dir()
                    and not tracker.client.list_artifacts(run_id)):
                tracker.log_artifacts(run_id, Path(result.checkpoint.path) / "artifacts")
            tracker.end_run(run_id, "FINISHED")


class _OptunaSearch(OptunaSearch):
    def on_trial_complete(self, trial_id, result=None, error=False):
        # A trial stopped early (ASHA) has no final metrics: it is PRUNED in Optuna.
        if result and not result.get(FINAL_FLAG):
            result = None
        super().on_trial_complete(trial_id, result, error)


def _optuna_searcher(loaded: LoadedSpec, objectives: list[tuple[str, str]], seed: int) -> OptunaSearch:
    # Objectives are always given as a list: OptunaSearch then reads them only from a trial's
    # last result (our final report), not from every per-epoch report.
    return _OptunaSearch(space=search.DefineByRun(loaded), metric=[m for m, _ in objectives],
                         mode=[d for _, d in objectives], sampler=search.make_sampler(loaded, seed))


def child_runs(tracker: tracking.Tracker, experiment: str, parent_run_id: str) -> dict[str, object]:
    """The sweep's child runs, by trial id."""
    runs = tracker.client.search_runs([tracker.experiment_id(experiment)],
                                      filter_string=f"tags.`{tracking.TAG_PARENT}` = '{parent_run_id}'",
                                      max_results=50_000)
    return {r.data.tags.get(tracking.TAG_TRIAL_ID): r for r in runs if tracking.TAG_TRIAL_ID in r.data.tags}


def _rows(trials, tracker: tracking.Tracker, experiment: str, parent: str, objectives) -> list[dict]:
    runs = child_runs(tracker, experiment, parent)
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
