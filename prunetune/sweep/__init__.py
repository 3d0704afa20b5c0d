"""Sweeps: Ray Tune runs the trials, Optuna (through Tune's OptunaSearch) proposes them, and a
driver-side callback is the one writer to MLflow: trials report to Tune, the driver logs what they
report, keyed by trial id. This package is the only place that imports ray (in `_tune`, imported
only once a sweep runs: Ray reads some settings from the environment at import).

Sweep state lives in `tracking.storage` (default `mlruns/tune`) under `<name>/`: Tune's experiment,
`sweep.json` (the parent run and the search-space fingerprint) and `resume/` (each trial's own
resume state and finished artifacts), so `--resume` continues the same sweep after Ctrl-C, a crash
or SIGKILL of the driver. On a cluster the storage is one that every node reaches (a shared path,
`s3://...`): trials write there, the driver reads from there; nothing assumes one filesystem.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

from prunetune import search, study, tracking
from prunetune.errors import UserError
from prunetune.spec import LoadedSpec, SearchEntry, check_with_layers
from prunetune.storage import Storage

from prunetune.metrics import PER_EPOCH  # noqa: E402,F401 - the sweep's per-epoch keys
from prunetune.metrics import shown_metrics
FINAL_FLAG = "prunetune_final"  # set in a trial's last report, which carries the final metrics
ERROR_KEY = "prunetune_error"  # in the last report of a trial that failed by its own error


class SweepInterrupted(Exception):
    """The user stopped the sweep (Ctrl-C); its state is saved and it can be resumed."""


def space_fingerprint(space: dict[str, SearchEntry]) -> dict:
    return {k: {"kind": e.kind, "args": list(e.args), "step": e.step} for k, e in sorted(space.items())}


@dataclass
class SweepPaths:
    """Where a sweep's state lives: `<storage>/<name>/`."""

    storage: Storage  # tracking.storage (Tune's storage_path)
    name: str

    @classmethod
    def of(cls, storage: str, name: str) -> "SweepPaths":
        return cls(Storage(storage), name)

    @property
    def dir(self) -> Storage:
        return self.storage.child(self.name)

    META = "sweep.json"
    RESUME = "resume"  # trials' own resume state and finished artifacts; removed when the sweep completes

    def log_file(self) -> Path:
        """The driver's log: beside the sweep's state when that is local, else in the cache."""
        if self.dir.is_local:
            return self.dir.local_path("logs/driver.log")
        from prunetune.data.cache import cache_root

        return cache_root() / "logs" / f"{self.name}.log"

    def read_meta(self) -> dict | None:
        try:
            return self.dir.read_json(self.META)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise UserError(f"tracking.storage: cannot read {self.dir.uri} ({str(exc).splitlines()[0]})") from None


def storage_of(spec, storage: str | None) -> str:
    """--storage, else the spec's tracking.storage."""
    return storage or spec.tracking.storage


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------

@dataclass
class SweepResult:
    name: str
    parent_run_id: str
    rows: list[dict]  # one per trial: trial_id, run_id, state, params, objectives and test_acc (shown_metrics)
    objectives: list[tuple[str, str]]
    log_path: Path | None = None  # the libraries' log lines (Ray, MLflow, Optuna)


def plan_text(loaded: LoadedSpec, paths: SweepPaths, uri: str) -> str:
    spec = loaded.fixed_spec()
    replicates = f" × {spec.search.replicates} seeds" if spec.search.replicates > 1 else ""
    lines = [f"sweep {spec.name}: {spec.search.num_trials} trials{replicates}, sampler {spec.search.sampler}, "
             f"objectives {', '.join(f'{o.metric} ({o.mode})' for o in spec.search.objectives)}",
             f"  model {spec.model.arch}, data {spec.data.dataset} ({spec.data.image_size} px)",
             f"  resources per trial: {spec.resources.cpus_per_trial:g} CPU, {spec.resources.gpus_per_trial:g} GPU; "
             f"at most {spec.resources.max_concurrent} at once; early stop: {spec.search.early_stop}; "
             f"retries after a worker or node dies: {spec.resources.max_retries}",
             f"  state: {paths.dir.uri}", f"  tracking: {uri}", "  search space:"]
    for key, entry in loaded.space.items():
        lines.append(f"    {key}: {entry.kind} {list(entry.args)}" + (f" step {entry.step}" if entry.step else ""))
    return "\n".join(lines)


def teacher_names(loaded: LoadedSpec) -> list[str]:
    """Every distillation teacher the sweep may use (run ids or directories)."""
    entry = loaded.space.get("distill.teacher")
    spec = loaded.fixed_spec()
    return list(entry.probe_values()) if entry else [spec.distill.teacher] if spec.distill else []


def teachers(loaded: LoadedSpec, uri: str) -> dict[str, str]:
    """Every distillation teacher → its local checkpoint directory on the driver."""
    artifacts = loaded.fixed_spec().tracking.artifacts
    from prunetune.teachers import teacher_dir

    return {t: str(teacher_dir(t, uri, artifacts)) for t in teacher_names(loaded)}


def publish_teachers(local: dict[str, str], paths: SweepPaths) -> dict[str, str]:
    """Copy each teacher's files into the sweep's storage, where every node reads them; returns
    teacher → its folder there (relative to the sweep's state)."""
    import hashlib

    published = {}
    for teacher, directory in local.items():
        rel = f"teachers/{hashlib.sha256(teacher.encode()).hexdigest()[:16]}"
        if not paths.dir.exists(f"{rel}/complete"):
            from prunetune.distill import TEACHER_FILES

            for f in TEACHER_FILES:
                paths.dir.put_file(Path(directory) / f, f"{rel}/{f}")
            paths.dir.write_text(f"{rel}/complete", "ok\n")
        published[teacher] = rel
    return published


def prepare(loaded: LoadedSpec, *, resume: bool, restart: bool, tracking_uri: str | None,
            storage: str | None = None):
    """All checks that need no Ray and write nothing; returns the sweep paths, the tracking URI
    and the spec's dataset (loaded to check it; a sweep shares it with its trials)."""
    from prunetune.data import load_dataset

    if resume and restart:
        raise UserError("--resume and --restart: choose one")
    search.check(loaded)
    spec = loaded.fixed_spec()
    uri = tracking.store_uri(spec.tracking.uri, tracking_uri)
    dataset = load_dataset(spec.data)  # a missing or malformed data root fails here
    teachers(loaded, uri)  # a missing distillation teacher fails here
    if spec.train.budget_epochs is not None or "train.budget_epochs" in loaded.space:
        from prunetune.trial import LayerSelection

        # a layerwise schedule's steps depend on the model's layers: build it here (once per
        # model) so a budget they exceed fails now, not in every trial that draws it
        check_with_layers(loaded, LayerSelection(dataset))
    paths = SweepPaths.of(storage_of(spec, storage), spec.name)
    meta = paths.read_meta()
    if meta is not None and not (resume or restart):
        raise UserError(f"sweep {spec.name!r} already exists at {paths.dir.uri}; "
                        "use --resume to continue it or --restart to start it over")
    if resume:
        if meta is None:
            raise UserError(f"--resume: there is no sweep {spec.name!r} at {paths.dir.uri} to resume")
        if meta["space"] != space_fingerprint(loaded.space):
            raise UserError(f"--resume: the search space of {spec.name!r} changed since the sweep started; "
                            "use --restart to start over (or restore the spec)")
    return paths, uri, dataset


def run_sweep(loaded: LoadedSpec, spec_file: Path | None, *, resume: bool = False, restart: bool = False,
              address: str | None = None, tracking_uri: str | None = None, storage: str | None = None,
              echo: Callable[[str], None] = print, log=None) -> SweepResult:
    """Run (or resume) the sweep of a loaded spec. Raises UserError on bad input before writing.
    `log`: a `logs.LogCapture`, given the sweep's log file once the checks have passed."""
    from prunetune.logs import LogCapture

    log = log or LogCapture()
    paths, uri, dataset = prepare(loaded, resume=resume, restart=restart, tracking_uri=tracking_uri, storage=storage)
    spec = loaded.fixed_spec()
    address = address or os.environ.get("RAY_ADDRESS") or None
    _ray_environment(address)
    from prunetune.sweep._ray import sweep_ray

    log.adopt()  # Ray's loggers, now that it is imported
    # Ray starts its processes (seconds, mostly waiting) while Tune and MLflow are imported and
    # the MLflow client made; the store itself is touched only after the checks, so bad input
    # writes nothing. (Ray must start in the main thread.)
    with contextlib.ExitStack() as stack:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            imported = pool.submit(_import_tune)
            client = pool.submit(tracking.Tracker, uri, spec.tracking.artifacts, create=False)
            stack.enter_context(sweep_ray(address, workers=spec.resources.max_concurrent))
            imported.result()
            tracker = client.result()
        return _run(loaded, spec_file, paths, uri, dataset, tracker, address=address, resume=resume,
                    restart=restart, echo=echo, log=log)


def _run(loaded: LoadedSpec, spec_file: Path | None, paths: SweepPaths, uri: str, dataset, tracker, *,
         address: str | None, resume: bool, restart: bool, echo: Callable[[str], None], log) -> SweepResult:
    """The sweep, once Ray is up and the tracker made."""
    spec = loaded.fixed_spec()
    res = spec.resources
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from prunetune.sweep._tune import (MlflowLogger, Progress, _graceful_ctrl_c, _optuna_searcher, _rows,
                                       _trainable, check_nodes, check_resources, drop_unrecorded_runs)

    log.adopt()
    check_resources(res.cpus_per_trial, res.gpus_per_trial)
    check_nodes(paths.storage, loaded, res.cpus_per_trial, res.gpus_per_trial, local=address is None)
    log.to_file(paths.log_file())

    if restart:
        paths.dir.delete()
    study_url = study.storage_url(uri)
    if not resume:
        # a new study of this name: an old one (its sweep's state gone, or started over) goes
        if study.delete(study_url, spec.name):
            echo(f"deleted the old Optuna study {spec.name!r} in {study_url} (its sweep starts over)")
    if resume:
        parent = paths.read_meta()["parent_run_id"]
        tracker.reopen_run(parent)
    else:
        parent = tracker.start_run(spec.name, f"sweep-{spec.name}",
                                   {tracking.TAG_SWEEP: spec.name, tracking.TAG_KIND: "sweep"})
        if spec_file is not None:
            tracker.log_artifact(parent, spec_file)
        paths.dir.write_json(SweepPaths.META, {"parent_run_id": parent, "space": space_fingerprint(loaded.space),
                                               "tracking_uri": uri, "storage": paths.storage.uri,
                                               "optuna_storage": study_url,
                                               "spec": loaded.raw})

    # The decoded data goes to Ray's object store once: the trials of a node map one copy
    # (zero-copy numpy), and the driver keeps none.
    shared = {"data": spec.data.model_dump(mode="json"), "dataset": dataset}
    del dataset
    trainable = tune.with_resources(
        tune.with_parameters(_trainable, raw=loaded.raw, shared=shared, storage=paths.storage.uri, sweep=spec.name,
                             teachers=publish_teachers(teachers(loaded, uri), paths), cpus=res.cpus_per_trial,
                             checkpoint_s=float(os.environ.get("PRUNETUNE_CHECKPOINT_S", "10"))),
        {"cpu": res.cpus_per_trial, "gpu": res.gpus_per_trial})
    objectives = [(o.metric, o.mode) for o in spec.search.objectives]
    logger_cb = MlflowLogger(uri, spec.tracking.artifacts, spec.name, parent, spec.name, loaded.raw,
                             paths.storage.uri)
    total = spec.search.num_trials * spec.search.replicates  # Tune trials: each configuration R times
    progress = Progress(objectives[0][0], objectives[0][1], total, res.max_retries, echo,
                        method=search.fixed_method(loaded))

    experiment = paths.dir.path
    if resume and tune.Tuner.can_restore(experiment, storage_filesystem=paths.storage.fs):
        tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False,
                                   storage_filesystem=paths.storage.fs)
        # Tune restores the callbacks it pickled; give them this process's output and store.
        callbacks = tuner._local_tuner.get_run_config().callbacks
        for cb in callbacks:
            if isinstance(cb, Progress):
                cb.echo, cb.start = echo, time.monotonic()
            if isinstance(cb, MlflowLogger):
                logger_cb = cb
                logger_cb.resumed = True
        logger_cb.close_restored(tuner.get_results())
    else:
        searcher = _optuna_searcher(loaded, objectives, spec.seed, spec.search.replicates,
                                    study_name=spec.name, storage=study.storage(study_url))
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
                name=spec.name, storage_path=paths.storage.path, storage_filesystem=paths.storage.fs,
                callbacks=[logger_cb, progress], verbose=0,
                # a trial whose worker or node died restarts (from its own saved state); its own
                # errors never reach Tune as errors (see _trainable), so they are not retried
                failure_config=tune.FailureConfig(max_failures=res.max_retries, fail_fast=False)))
    log.adopt()  # Optuna's
    with _graceful_ctrl_c(echo) as stopped:
        grid = tuner.fit()
    trials = grid._experiment_analysis.trials
    drop_unrecorded_runs(tracker, spec.name, parent, trials, echo)
    rows = _rows(trials, tracker, spec.name, parent, shown_metrics([m for m, _ in objectives]))
    interrupted = stopped.is_set() or sum(t.status in ("TERMINATED", "ERROR") for t in trials) < total
    tracker.end_run(parent, "KILLED" if interrupted else "FINISHED")
    if not interrupted:
        study.fail_unfinished(study_url, spec.name)  # asked by a driver killed before it could tell
        paths.dir.delete(SweepPaths.RESUME)
    result = SweepResult(spec.name, parent, rows, objectives, log.path)
    if interrupted:
        raise SweepInterrupted(result)
    return result


def _import_tune() -> None:
    import ray.tune.schedulers  # noqa: F401

    import prunetune.sweep._tune  # noqa: F401


def _ray_environment(address: str | None) -> None:
    """Settings Ray reads from the environment when it is imported."""
    if address and "RAY_AUTH_MODE" not in os.environ:
        # Clusters started with `ray start` use token authentication by default (Ray 2.5x); a
        # driver that attaches sends the local token only when asked to.
        if (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
                or (Path.home() / ".ray" / "auth_token").is_file()):
            os.environ["RAY_AUTH_MODE"] = "token"
    # Per-epoch reports carry no objective (it exists only after the final evaluation); Tune's
    # strict check would reject them.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    # Tune snapshots its experiment state at most this often: a trial that finished is durable
    # (kept by --resume after a SIGKILL) within about a second.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # prunetune prints its own progress; Tune's newer console output ignores verbose=0 with ASHA
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Tune's default result loggers (CSV, JSON, TensorBoard) write every report of every trial;
    # MLflow has them all. TensorBoardX alone costs the driver 3 s of imports (torch among them).
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")


class Located(NamedTuple):
    """What `prunetune cka` and `prunetune report` read of a sweep: its spec (search entries at a
    representative value), its parent run (None before the sweep ran), the tracking URI, and its
    Optuna study's storage (None for a sweep from before studies were stored)."""

    spec: object
    parent_run_id: str | None
    tracking_uri: str
    study_url: str | None


def locate(target: Path, tracking_uri: str | None = None, storage: str | None = None) -> Located:
    """SPEC_OR_SWEEP → the sweep, from its sweep.json (read once)."""
    from prunetune.spec import load

    if target.is_dir():
        meta = target / SweepPaths.META
        if not meta.is_file():
            raise UserError(f"{target}: not a sweep directory (no {SweepPaths.META})")
        info = json.loads(meta.read_text())
        spec = load(None, raw=info["spec"]).fixed_spec()
        return Located(spec, info["parent_run_id"], tracking_uri or info["tracking_uri"], info.get("optuna_storage"))
    spec = load(target).fixed_spec()
    uri = tracking.store_uri(spec.tracking.uri, tracking_uri)
    meta = SweepPaths.of(storage_of(spec, storage), spec.name).read_meta() or {}
    return Located(spec, meta.get("parent_run_id"), uri, meta.get("optuna_storage"))
