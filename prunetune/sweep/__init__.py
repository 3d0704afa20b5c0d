"""Sweeps: Ray Tune runs the trials, Optuna (through Tune's OptunaSearch) proposes them, and a
driver-side callback is the one writer to MLflow: trials report to Tune, the driver logs what they
report, keyed by trial id. This package is the only place that imports ray (in `_tune`, imported
only once a sweep runs: Ray reads some settings from the environment at import).

Sweep state lives under `mlruns/tune/<name>` (Tune's experiment plus `sweep.json`: the parent run
and the search-space fingerprint), so `--resume` continues the same sweep after Ctrl-C, a crash or
SIGKILL of the driver.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from prunetune import search, tracking
from prunetune.errors import UserError
from prunetune.spec import LoadedSpec, SearchEntry

PER_EPOCH = ("train_loss", "train_acc", "val_loss", "val_acc", "sparsity", "lr", "epoch_seconds",
             "distill_loss")  # distill_loss: with distill only
FINAL_FLAG = "prunetune_final"  # set in a trial's last report, which carries the final metrics


class SweepInterrupted(Exception):
    """The user stopped the sweep (Ctrl-C); its state is saved and it can be resumed."""


def space_fingerprint(space: dict[str, SearchEntry]) -> dict:
    return {k: {"kind": e.kind, "args": list(e.args), "step": e.step} for k, e in sorted(space.items())}


@dataclass
class SweepPaths:
    tune_root: Path  # Tune's storage_path
    name: str

    @classmethod
    def of(cls, name: str) -> "SweepPaths":
        """A sweep's state: mlruns/tune/<name>, from the working directory."""
        return cls(Path("mlruns/tune").resolve(), name)

    @property
    def dir(self) -> Path:
        return self.tune_root / self.name

    @property
    def meta(self) -> Path:
        return self.dir / "sweep.json"

    @property
    def resume(self) -> Path:
        """Trials' own resume state (see `_tune._trainable`); removed when the sweep completes."""
        return self.dir / "resume"


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------

@dataclass
class SweepResult:
    name: str
    parent_run_id: str
    rows: list[dict]  # one per trial: trial_id, run_id, state, params, objectives
    objectives: list[tuple[str, str]]


def plan_text(loaded: LoadedSpec, paths: SweepPaths, uri: str) -> str:
    spec = loaded.fixed_spec()
    replicates = f" × {spec.search.replicates} seeds" if spec.search.replicates > 1 else ""
    lines = [f"sweep {spec.name}: {spec.search.num_trials} trials{replicates}, sampler {spec.search.sampler}, "
             f"objectives {', '.join(f'{o.metric} ({o.mode})' for o in spec.search.objectives)}",
             f"  model {spec.model.arch}, data {spec.data.dataset} ({spec.data.image_size} px)",
             f"  resources per trial: {spec.resources.cpus_per_trial:g} CPU, {spec.resources.gpus_per_trial:g} GPU; "
             f"at most {spec.resources.max_concurrent} at once; early stop: {spec.search.early_stop}",
             f"  state: {paths.dir}", f"  tracking: {uri}", "  search space:"]
    for key, entry in loaded.space.items():
        lines.append(f"    {key}: {entry.kind} {list(entry.args)}" + (f" step {entry.step}" if entry.step else ""))
    return "\n".join(lines)


def teachers(loaded: LoadedSpec, uri: str) -> dict[str, str]:
    """Every distillation teacher the sweep may use → its local checkpoint directory."""
    entry = loaded.space.get("distill.teacher")
    spec = loaded.fixed_spec()
    names = entry.probe_values() if entry else [spec.distill.teacher] if spec.distill else []
    return {t: str(tracking.teacher_dir(t, uri, spec.tracking.artifacts)) for t in names}


def prepare(loaded: LoadedSpec, *, resume: bool, restart: bool, tracking_uri: str | None) -> tuple[SweepPaths, str]:
    """All checks that need no Ray and write nothing; returns the sweep paths and tracking URI."""
    from prunetune.data import load_dataset

    if resume and restart:
        raise UserError("--resume and --restart: choose one")
    search.check(loaded)
    spec = loaded.fixed_spec()
    uri = tracking.store_uri(spec.tracking.uri, tracking_uri)
    load_dataset(spec.data, spec.seed)  # a missing or malformed data root fails here
    teachers(loaded, uri)  # a missing distillation teacher fails here
    paths = SweepPaths.of(spec.name)
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
    paths, uri = prepare(loaded, resume=resume, restart=restart, tracking_uri=tracking_uri)
    spec = loaded.fixed_spec()
    res = spec.resources
    _ray_environment(address)
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from prunetune.sweep._tune import (MlflowLogger, Progress, _graceful_ctrl_c, _optuna_searcher, _rows,
                                       _trainable, check_resources, drop_unrecorded_runs, ray_init)
    from prunetune.trial import DenseCache

    ray_init(address)
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
                                          "tracking_uri": uri, "spec": loaded.raw}, indent=1))

    trainable = tune.with_resources(
        # the driver's cache folder, passed on: workers of an attached cluster have other environments
        tune.with_parameters(_trainable, raw=loaded.raw, dense_dir=str(DenseCache().root),
                             resume_dir=str(paths.resume), cpus=res.cpus_per_trial,
                             teachers=teachers(loaded, uri),
                             checkpoint_s=float(os.environ.get("PRUNETUNE_CHECKPOINT_S", "10"))),
        {"cpu": res.cpus_per_trial, "gpu": res.gpus_per_trial})
    objectives = [(o.metric, o.mode) for o in spec.search.objectives]
    logger_cb = MlflowLogger(uri, spec.tracking.artifacts, spec.name, parent, spec.name, loaded.raw)
    total = spec.search.num_trials * spec.search.replicates  # Tune trials: each configuration R times
    progress = Progress(objectives[0][0], objectives[0][1], total, echo)

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
        logger_cb.close_restored(tuner.get_results())
    else:
        searcher = _optuna_searcher(loaded, objectives, spec.seed, spec.search.replicates)
        # ASHA compares trials on val_acc after the dense phase (which all trials share)
        scheduler = (ASHAScheduler(metric="val_acc", mode="max", time_attr="epoch", max_t=10_000,
                                   grace_period=spec.train.dense_epochs + 1)
                     if spec.search.early_stop == "asha" else FIFOScheduler())
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=total,
                                        max_concurrent_trials=res.max_concurrent,
                                        # one worker process runs trial after trial: torch and the
                                        # data are loaded once per worker, not once per trial
                                        reuse_actors=True),
            run_config=tune.RunConfig(
                name=spec.name, storage_path=str(paths.tune_root), callbacks=[logger_cb, progress], verbose=0,
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                failure_config=tune.FailureConfig(max_failures=0, fail_fast=False)))
    with _graceful_ctrl_c(echo) as stopped:
        grid = tuner.fit()
    trials = grid._experiment_analysis.trials
    drop_unrecorded_runs(tracker, spec.name, parent, trials, echo)
    rows = _rows(trials, tracker, spec.name, parent, objectives)
    interrupted = stopped.is_set() or sum(t.status in ("TERMINATED", "ERROR") for t in trials) < total
    tracker.end_run(parent, "KILLED" if interrupted else "FINISHED")
    if not interrupted:
        shutil.rmtree(paths.resume, ignore_errors=True)
    result = SweepResult(spec.name, parent, rows, objectives)
    if interrupted:
        raise SweepInterrupted(result)
    return result


def _ray_environment(address: str | None) -> None:
    """Settings Ray reads from the environment when it is imported."""
    address = address or os.environ.get("RAY_ADDRESS")
    if address and "RAY_AUTH_MODE" not in os.environ:
        # Clusters started with `ray start` use token authentication by default (Ray 2.5x); a
        # driver that attaches sends the local token only when asked to.
        if (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
                or (Path.home() / ".ray" / "auth_token").is_file()):
            os.environ["RAY_AUTH_MODE"] = "token"
    # Per-epoch reports carry no objective (it exists only after the final evaluation); Tune's
    # strict check would reject them.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    # Keeping one checkpoint per trial forces an experiment snapshot after each final report;
    # silence Tune's warning about it.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Tune snapshots its experiment state at most this often: a trial that finished is durable
    # (kept by --resume after a SIGKILL) within about a second.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    # prunetune prints its own progress; Tune's newer console output ignores verbose=0 with ASHA
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


def locate(target: Path, tracking_uri: str | None = None):
    """SPEC_OR_SWEEP → (the spec with search entries at a representative value, the sweep's
    parent run id or None, the tracking URI)."""
    from prunetune.spec import load

    if target.is_dir():
        meta = target / "sweep.json"
        if not meta.is_file():
            raise UserError(f"{target}: not a sweep directory (no sweep.json)")
        info = json.loads(meta.read_text())
        spec = load(None, raw=info["spec"]).fixed_spec()
        return spec, info["parent_run_id"], tracking_uri or info["tracking_uri"]
    spec = load(target).fixed_spec()
    uri = tracking.store_uri(spec.tracking.uri, tracking_uri)
    meta = SweepPaths.of(spec.name).meta
    parent = json.loads(meta.read_text())["parent_run_id"] if meta.is_file() else None
    return spec, parent, uri
