"""The driver of a sweep, step by step: the checks that need no Ray (`prepare`); Ray started (or
attached to) while Tune and MLflow are imported beside it; then, in `_Sweep.run`, the checks of
the nodes, the parent run opened (or reopened), a new or a restored Tuner, the fit, and the
parent run closed. Imports ray only once the checks that need none have passed.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

from prunetune import plugins, registry, search, stored_study, tracking
from prunetune.errors import UserError
from prunetune.metrics import selection_key, selection_note, shown_metrics
from prunetune.spec import LoadedSpec
from prunetune.spec.loading import redacted
from prunetune.spec.space import fixed_schedule_value
from prunetune.storage import storage_wait_s
from prunetune.sweep.paths import SweepPaths, space_fingerprint
from prunetune.sweep.plan import space_lines, sweep_params
from prunetune.sweep.protocol import ASHA_METRIC, failed, succeeded, unpack
from prunetune.teachers import local_teachers, publish_teachers, teacher_code


class SweepInterrupted(Exception):
    """The user stopped the sweep (Ctrl-C); its state is saved and it can be resumed."""


class TrackingBehind(Exception):
    """The sweep's trials are done, but the tracking store did not take all their records before
    the wait ran out; they are kept in the sweep's journal, and `--resume` writes them."""


class Prepared(NamedTuple):
    """What `prepare` found: the sweep's paths, the tracking URI, the spec's dataset (loaded to
    check it; a sweep shares it with its trials), the user code its trials import ((key,
    reference): the spec's factories and its teachers' models) and each distillation teacher's
    local checkpoint directory; the notes it printed (a test-split objective, weights no criterion
    prunes), which the parent run keeps as its description."""

    paths: SweepPaths
    uri: str
    dataset: object
    code: list[tuple[str, str]]
    teachers: dict[str, str]
    notes: list[str]


@dataclass
class SweepResult:
    name: str
    parent_run_id: str
    rows: list[dict]  # one per trial: trial_id, run_id, state, params, objectives and test_acc (shown_metrics)
    objectives: list[tuple[str, str]]
    log_path: Path | None = None  # the libraries' log lines (Ray, MLflow, Optuna)
    experiment_page: str | None = None  # the experiment's runs page on an MLflow server

    def ranked(self) -> list[dict]:
        """The rows with a value of the first objective, best first (`metrics.selection_key`)."""
        metric, mode = self.objectives[0]
        done = [r for r in self.rows if r.get(metric) is not None]
        return sorted(done, key=lambda r: selection_key(r[metric], mode, r["trial_id"]))


# -- before Ray ------------------------------------------------------------------------------------

def prepare(loaded: LoadedSpec, *, resume: bool, restart: bool, echo: Callable[[str], None] = print,
            fetch: bool = True) -> Prepared:
    """All checks that need no Ray and write nothing (to the tracking store or the sweep's
    folder). `fetch`: download torchvision's named weights missing from its cache (not for
    --dry-run, which notes them)."""
    from prunetune.data import load_dataset

    if resume and restart:
        raise UserError("--resume and --restart: choose one")
    search.check(loaded)
    from prunetune import samplers  # imports optuna

    samplers.check(loaded)  # the sampler can run here
    spec = loaded.fixed_spec()
    uri = tracking.store_uri(spec.tracking.uri)
    echo(f"reading {spec.data.dataset} at {spec.data.image_size} px and checking the model…")
    dataset = load_dataset(spec.data, echo)  # fetched if asked; a missing or malformed root (or a bad factory) fails
    teachers = local_teachers(loaded, uri)  # a missing distillation teacher fails here
    code = loaded.user_code() + teacher_code(teachers, loaded.path.parent if loaded.path else None)
    from prunetune.model_check import check_models, check_weights

    on_test = selection_note([o.metric for o in spec.search.objectives])
    criterion = None if "schedule.criterion" in loaded.space else registry.criterion(spec.schedule.criterion)
    notes = ([on_test] if on_test else []) + check_models(loaded, dataset)  # a bad factory or budget raises
    notes += check_weights(loaded, fetch, echo)  # an unknown weight name raises; offline without the file too
    notes += [n for n in [criterion and criterion.note(spec)] if n]
    for note in notes:
        echo(note)
    paths = SweepPaths.of(spec.tracking.storage, spec.name)
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
        changed = [ref for ref, digest in plugins.digests(code).items()
                   if meta.get("code", {}).get(ref, digest) != digest]
        if changed:
            raise UserError(f"--resume: the code of {changed[0]} changed since the sweep started (its trials "
                            "would mix two models); use --restart to start over (or restore the code)")
    return Prepared(paths, uri, dataset, code, teachers, notes)


def run_sweep(loaded: LoadedSpec, spec_file: Path | None, *, resume: bool = False, restart: bool = False,
              address: str | None = None, echo: Callable[[str], None] = print, log=None) -> SweepResult:
    """Run (or resume) the sweep of a loaded spec. Raises UserError on bad input before writing.
    `log`: a `logs.LogCapture`, given the sweep's log file once the checks have passed."""
    from prunetune.logs import LogCapture

    log = log or LogCapture()
    prepared = prepare(loaded, resume=resume, restart=restart, echo=echo)
    spec = loaded.fixed_spec()
    address = address or os.environ.get("RAY_ADDRESS") or None
    echo(f"attaching to the Ray cluster at {address}…" if address else
         f"starting Ray ({os.cpu_count()} CPUs) and loading Tune and MLflow…")
    _ray_environment(address)
    from prunetune.sweep._ray import sweep_ray

    log.adopt()  # Ray's loggers, now that it is imported
    # Ray starts its processes (seconds, mostly waiting) while Tune and MLflow are imported and
    # the MLflow client made; the store itself is touched only after the checks, so bad input
    # writes nothing. (Ray must start in the main thread.)
    with contextlib.ExitStack() as stack:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            imported = pool.submit(_import_tune)
            client = pool.submit(tracking.Tracker, prepared.uri, spec.tracking.artifacts, create=False)
            stack.enter_context(sweep_ray(address, workers=spec.resources.max_concurrent,
                                          py_modules=plugins.ship_paths(prepared.code)))
            imported.result()
            tracker = client.result()
        sweep = _Sweep(loaded, spec_file, prepared, tracker, echo, log)
        return sweep.run(prepared.dataset, local=address is None, resume=resume, restart=restart)


def _import_tune() -> None:
    """What the driver imports while Ray starts: Tune and the sweep's Ray-side modules."""
    import ray.tune.schedulers  # noqa: F401

    import prunetune.sweep.mlflow_logger  # noqa: F401
    import prunetune.sweep.preflight  # noqa: F401
    import prunetune.sweep.progress  # noqa: F401
    import prunetune.sweep.searcher  # noqa: F401
    import prunetune.sweep.trainable  # noqa: F401


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


# -- once Ray is up ----------------------------------------------------------------------------------

class _Sweep:
    """One sweep once Ray is up and the tracker made; `run` takes its steps in order."""

    def __init__(self, loaded: LoadedSpec, spec_file: Path | None, prepared: Prepared, tracker: tracking.Tracker,
                 echo: Callable[[str], None], log):
        self.loaded, self.spec_file, self.prepared = loaded, spec_file, prepared
        self.paths, self.uri, self.code = prepared.paths, prepared.uri, prepared.code
        self.tracker, self.echo, self.log = tracker, echo, log
        self.spec = loaded.fixed_spec()
        self.study_url = stored_study.study_url(self.uri)  # None: the study lives in the sweep's state
        self.objectives = [(o.metric, o.mode) for o in self.spec.search.objectives]
        self.total = self.spec.search.num_trials * self.spec.search.replicates  # each configuration R times
        self.experiment_page: str | None = None
        self.known_runs: dict = {}

    def run(self, dataset, *, local: bool, resume: bool, restart: bool) -> SweepResult:
        from ray import tune

        self.log.adopt()
        self.check_nodes(local)
        self.log.to_file(self.paths.log_file())
        if restart:
            self.paths.dir.delete()
        parent = self.reopen_parent_run() if resume else self.open_parent_run()
        # the run's description in the MLflow UI: the notes, then the search space
        space = ["search space:", *(f"  {line}" for line in space_lines(self.loaded))] if self.loaded.space else []
        if self.prepared.notes or space:
            self.tracker.set_tags(parent, {tracking.TAG_NOTE: "\n".join([*self.prepared.notes, *space])})
        if self.uri.startswith(("http://", "https://")):
            self.experiment_page = tracking.experiment_url(self.uri, self.tracker.experiment_id(self.spec.name))
        writer = self.open_writer(parent, resume)
        try:
            trainable = self.trainable(dataset)
            if resume and tune.Tuner.can_restore(self.paths.dir.path, storage_filesystem=self.paths.storage.fs):
                tuner = self.restored_tuner(trainable, writer)
            else:
                tuner = self.new_tuner(trainable, writer, dataset, parent)
            self.log.adopt()  # Optuna's
            self.echo("running the trials (the first of each seed trains the dense phase they share)…")
            with tracking.fail_fast_http():
                with _graceful_ctrl_c(self.echo) as stopped:
                    grid = tuner.fit()
                return self.close(parent, grid, stopped.is_set(), writer)
        finally:
            writer.close(0)  # after an error: what was not written stays in the journal

    def open_writer(self, parent: str, resume: bool):
        """The writer of the sweep's tracking records (`sweep/writer.py`), over its journal; a
        resumed sweep's writer first applies what its journal holds beyond its mark, and knows
        the runs the store already has of this sweep (one query)."""
        from prunetune.sweep.mlflow_logger import Records
        from prunetune.sweep.writer import Journal, Writer

        path = self.paths.journal_file()
        if not resume:
            Journal.remove(path)  # a sweep started over (or whose state was deleted) starts a new one
        records = Records(self.tracker, self.spec.name, self.spec.name, parent, self.echo)
        self.known_runs = self.tracker.trial_runs(self.spec.name, parent) if resume else {}
        records.runs.update({tid: run.run_id for tid, run in self.known_runs.items()})
        return Writer(records, Journal(path), self.echo)

    def check_nodes(self, local: bool) -> None:
        """Some node can take a trial, and every node that can reaches the storage and the data."""
        from prunetune.sweep.preflight import check_nodes, check_resources

        res = self.spec.resources
        check_resources(res.cpus_per_trial, res.gpus_per_trial)
        check_nodes(self.paths.storage, self.loaded, self.code, res.cpus_per_trial, res.gpus_per_trial,
                    local=local)

    def open_parent_run(self) -> str:
        """A new sweep's parent run (an old Optuna study of its name deleted), and its sweep.json."""
        spec = self.spec
        if stored_study.delete(self.study_url, spec.name):  # its sweep's state gone, or started over
            self.echo(f"deleted the old Optuna study {spec.name!r} in {self.study_url} (its sweep starts over)")
        parent = self.tracker.start_run(spec.name, f"sweep-{spec.name}",
                                        {tracking.TAG_SWEEP: spec.name, tracking.TAG_KIND: "sweep"},
                                        sweep_params(self.loaded))
        if self.spec_file is not None:
            self.tracker.log_artifact(parent, self.spec_file)
        self.tracker.log_text(parent, json.dumps({k: {"kind": e.kind, "args": list(e.args), "step": e.step}
                                                  for k, e in self.loaded.space.items()}, indent=2),
                              "search_space.json")
        self.paths.dir.write_json(SweepPaths.META, {
            "parent_run_id": parent, "space": space_fingerprint(self.loaded.space), "tracking_uri": self.uri,
            "code": plugins.digests(self.code),
            "storage": self.paths.storage.uri, "optuna_storage": self.study_url, "spec": self.loaded.raw})
        return parent

    def reopen_parent_run(self) -> str:
        parent = self.paths.read_meta()["parent_run_id"]
        self.tracker.reopen_run(parent)
        return parent

    def trainable(self, dataset):
        """Tune's trainable: `trainable.pruning_trial` with the loaded spec and the shared data."""
        from ray import tune

        from prunetune.sweep.trainable import pruning_trial

        res = self.spec.resources
        # The decoded data goes to Ray's object store once: the trials of a node map one copy
        # (zero-copy numpy).
        shared = {"data": self.spec.data.model_dump(mode="json"), "dataset": dataset}
        teachers = publish_teachers(self.prepared.teachers, self.paths.dir)
        return tune.with_resources(
            tune.with_parameters(pruning_trial, loaded=self.loaded, shared=shared, storage=self.paths.storage.uri,
                                 sweep=self.spec.name, teachers=teachers, cpus=res.cpus_per_trial,
                                 checkpoint_s=_checkpoint_s(), storage_wait_s=storage_wait_s()),
            {"cpu": res.cpus_per_trial, "gpu": res.gpus_per_trial})

    def new_tuner(self, trainable, writer, dataset, parent: str):
        from ray import tune
        from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

        from prunetune.sweep.mlflow_logger import MlflowLogger, dataset_info
        from prunetune.sweep.progress import Progress
        from prunetune.sweep.searcher import make_searcher

        spec, res = self.spec, self.spec.resources
        metric, mode = self.objectives[0]
        logger = MlflowLogger(spec.name, spec.name, self.loaded, self.paths.storage.uri, (metric, mode),
                              dataset_info(spec.data, dataset))
        logger.attach(writer)
        progress = Progress(metric, mode, self.total, res.max_retries, self.echo, max_concurrent=res.max_concurrent,
                            method=fixed_schedule_value(self.loaded.raw, "method"))
        # the study leads back to MLflow: where its runs are (the URI without credentials)
        links = {"mlflow_tracking_uri": redacted(self.uri), "mlflow_parent_run_id": parent,
                 "mlflow_experiment_id": self.tracker.experiment_id(spec.name)}
        searcher = make_searcher(self.loaded, self.objectives, spec.seed, spec.search.replicates,
                                 study_name=spec.name, storage=stored_study.rdb_storage(self.study_url),
                                 user_attrs=links)
        # ASHA compares trials on val_acc after the dense phase (which all trials share)
        scheduler = (ASHAScheduler(metric=ASHA_METRIC, mode="max", time_attr="epoch", max_t=10_000,
                                   grace_period=spec.train.dense_epochs + 1)
                     if spec.search.early_stop == "asha" else FIFOScheduler())
        return tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=self.total,
                                        max_concurrent_trials=res.max_concurrent,
                                        # one worker process runs trial after trial: torch and the
                                        # data are loaded once per worker, not once per trial
                                        reuse_actors=True),
            run_config=tune.RunConfig(
                name=spec.name, storage_path=self.paths.storage.path, storage_filesystem=self.paths.storage.fs,
                callbacks=[logger, progress], verbose=0,
                # a trial whose worker or node died restarts (from its own saved state); its own
                # errors never reach Tune as errors (see trainable), so they are not retried
                failure_config=tune.FailureConfig(max_failures=res.max_retries, fail_fast=False)))

    def restored_tuner(self, trainable, writer):
        """The sweep's Tuner as Tune saved it; its callbacks get this process's output and writer,
        the logger learns what was handed over before (the journal, else the store), and the runs
        of trials that finished while the driver was down are closed."""
        from ray import tune

        from prunetune.sweep import _compat
        from prunetune.sweep.mlflow_logger import MlflowLogger
        from prunetune.sweep.progress import Progress

        tuner = tune.Tuner.restore(self.paths.dir.path, trainable=trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False,
                                   storage_filesystem=self.paths.storage.fs)
        for cb in _compat.tuner_callbacks(tuner):  # Tune restores the callbacks it pickled
            if isinstance(cb, Progress):
                cb.echo, cb.start = self.echo, time.monotonic()
            if isinstance(cb, MlflowLogger):
                cb.attach(writer)
                cb.restore(writer.journal_records())
                cb.adopt_runs(self.known_runs, lambda run_id: max(
                    (step for step, _ in self.tracker.history(run_id, "train_loss")), default=-1))
                cb.close_restored(tuner.get_results())
        return tuner

    def close(self, parent: str, grid, stopped: bool, writer) -> SweepResult:
        """After the fit: drop runs Tune never recorded, end the parent run (KILLED if the sweep
        did not finish), wait for the tracking store to take every record, and at the end close
        the study and remove the trials' resume state."""
        from prunetune.sweep import _compat
        from prunetune.sweep.mlflow_logger import PARENT

        spec = self.spec
        trials = _compat.result_grid_trials(grid)
        interrupted = stopped or sum(t.status in ("TERMINATED", "ERROR") for t in trials) < self.total
        writer.submit({"op": "drop", "known": [t.trial_id for t in trials]})
        writer.submit({"op": "end", "key": PARENT, "status": "KILLED" if interrupted else "FINISHED"})
        written = self.wait_for_tracking(writer, interrupted)
        rows = _rows(trials, writer.records.runs, shown_metrics([m for m, _ in self.objectives]))
        result = SweepResult(spec.name, parent, rows, self.objectives, self.log.path, self.experiment_page)
        if interrupted:
            raise SweepInterrupted(result)
        if not written:
            raise TrackingBehind(f"the tracking store did not take {writer.behind} of the sweep's records before "
                                 f"the wait ran out; they are kept in {writer.journal.path}, and --resume writes "
                                 "them once it answers")
        stored_study.fail_unfinished(self.study_url, spec.name)  # asked by a driver killed before it could tell
        self.paths.dir.delete(SweepPaths.RESUME)
        return result

    def wait_for_tracking(self, writer, interrupted: bool) -> bool:
        """Wait until the writer has applied every record (at most $PRUNETUNE_TRACKING_WAIT_S,
        default 600 s, while the store does not answer; 10 s after Ctrl-C); stop it. The journal
        is removed once a finished sweep's records are all written."""
        if writer.flush(timeout=1.0) or writer.down is None and writer.flush(timeout=60.0):
            return writer.close(0, remove=not interrupted)
        wait = 10.0 if interrupted else float(os.environ.get("PRUNETUNE_TRACKING_WAIT_S", "600"))
        self.echo(f"waiting up to {wait:.0f} s for the tracking store to take {writer.behind} records "
                  "(Ctrl-C stops; --resume writes them)")
        return writer.close(wait, remove=not interrupted)


def _checkpoint_s() -> float:
    """How often (seconds) a trial saves its state: $PRUNETUNE_CHECKPOINT_S, default 10."""
    return float(os.environ.get("PRUNETUNE_CHECKPOINT_S", "10"))


def _rows(trials, runs: dict[str, str], names: list[str]) -> list[dict]:
    """One row per Tune trial: its id, MLflow run (`runs`: trial id → run id), state, sampled
    config and the `names` metrics."""
    rows = []
    for t in trials:
        last = unpack(t.last_result)
        row = {"trial_id": t.trial_id, "run_id": runs.get(t.trial_id),
               "state": "ERROR" if failed(last) else t.status, **dict(t.config)}
        for metric in names:
            row[metric] = last.get(metric) if succeeded(last) else None
        rows.append(row)
    return rows


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
