"""The Ray side of a sweep: the trainable (in Ray workers), the driver's Tune callbacks (MLflow,
progress), and the Optuna searcher."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

import numpy as np
import ray
from ray import tune
from ray.tune.search import Repeater
from ray.tune.search.optuna import OptunaSearch

from prunetune import nodecheck, search, tracking
from prunetune.metrics import is_metric
from prunetune.pruning import schedules
from prunetune.errors import ERROR_CHARS, UserError, error_text
from prunetune.spec import LoadedSpec, load
from prunetune.storage import Storage
from prunetune.sweep import ERROR_KEY, FINAL_FLAG, PER_EPOCH, SweepPaths

# Where a trial ran, in each of its reports (the driver tags its run with them).
NODE_KEY, NODE_ID_KEY, GPUS_KEY = "prunetune_node", "prunetune_node_id", "prunetune_gpu_ids"
RESUMED_KEY = "prunetune_resumed_from_epoch"  # in the reports of a trial that continued a saved state
PHASE_KEY, EPOCHS_KEY = "prunetune_phase", "prunetune_epochs"  # for live progress: phase, planned epochs


# ---------------------------------------------------------------------------------------------
# The trainable (runs in a Ray worker, on any node)
# ---------------------------------------------------------------------------------------------

def _where() -> dict:
    ctx = ray.get_runtime_context()
    return {NODE_KEY: ray.util.get_node_ip_address(), NODE_ID_KEY: ctx.get_node_id(),
            GPUS_KEY: ",".join(str(g) for g in ray.get_gpu_ids())}


def _trainable(config: dict, *, raw: dict, shared: dict, storage: str, sweep: str, teachers: dict[str, str],
               cpus: float, checkpoint_s: float) -> None:
    """One trial in a Ray worker. Everything it leaves for others goes to the sweep's storage
    (`<storage>/<sweep>/resume/`), which every node reaches: its latest resume state
    (`<trial_id>.pt`, replaced whole) and, once done, its artifacts (`<trial_id>.final/`, read by
    the driver and kept until the sweep ends). Tune holds no checkpoint of it: a trial restarted by
    Tune (a resume, or a retry after its worker or node died) continues from that state.

    The trial's own failure (an exception, a non-finite loss) is reported as its final result
    with `ERROR_KEY`, not raised: Tune retries what it sees raised, which is then only the death
    of a worker or a node.

    `shared`: the driver's dataset (`dataset`, read-only shared memory) and the data spec it was
    loaded for (`data`); a trial whose data spec differs (a searched data key) loads its own."""
    import torch

    from prunetune.trial import DenseCache, Trial, epoch_reports, final_step

    torch.set_num_threads(max(1, int(cpus)))
    store = Storage(storage)
    state = store.child(sweep).child(SweepPaths.RESUME)
    tid = tune.get_context().get_trial_id()
    where = _where()
    state_rel, final_rel = f"{tid}.pt", f"{tid}.final"

    def report_final(metrics: dict, epoch: int) -> None:
        tune.report({**metrics, **where, FINAL_FLAG: True, "epoch": epoch})

    if state.exists(f"{final_rel}/complete"):
        # The trial had finished when the driver died, before Tune recorded it: report its
        # history again (the driver may not have written all of it) and its final result.
        history = state.read_json(f"{final_rel}/artifacts/history.json")
        for metrics, epoch in epoch_reports(history):
            tune.report({**metrics, **where, "epoch": epoch})
        report_final(state.read_json(f"{final_rel}/artifacts/metrics.json"), final_step(history))
        return
    work = Path(tempfile.mkdtemp(prefix=f"prunetune-{tid}-"))
    trial = None
    try:
        try:
            loaded = load(None, raw=raw)
            spec = search.spec_of(loaded, config)
            teacher = None
            if spec.distill is not None:
                teacher = store.child(sweep).child(teachers[spec.distill.teacher])
                teacher = teacher.local_path() if teacher.is_local else teacher.get_dir("", work / "teacher")
            dataset = shared["dataset"] if spec.data.model_dump(mode="json") == shared["data"] else None
            trial = Trial(spec, teacher_dir=teacher, dataset=dataset, rewind_epochs=loaded.rewind_points())
            phases = trial.plan()
            planned = {EPOCHS_KEY: spec.train.dense_epochs + schedules.trained_epochs(phases)}
            # Saving the state costs time: save at an epoch end when `checkpoint_s` seconds have
            # passed since the last save (0: every epoch). The state is saved before the epoch is
            # reported; a resumed trial reports its history again (the driver skips what it has).
            last_save, saved_epoch = time.monotonic(), -1

            def report(metrics: dict, epoch: int) -> None:
                nonlocal last_save, saved_epoch
                if trial.can_checkpoint and epoch > saved_epoch and time.monotonic() - last_save >= checkpoint_s:
                    trial.save_checkpoint(work / "trial.pt")
                    state.put_file(work / "trial.pt", state_rel)
                    last_save, saved_epoch = time.monotonic(), epoch
                resumed = {} if trial.resumed_from_epoch is None else {RESUMED_KEY: trial.resumed_from_epoch}
                phase = "dense" if trial.phase_index < 0 else phases[trial.phase_index].name
                tune.report({**metrics, **where, **resumed, **planned, PHASE_KEY: phase, "epoch": epoch})

            trial.report = report
            resume_from = state.get_file(state_rel, work / "resume.pt") if state.exists(state_rel) else None
            result = trial.run(work / "final" / "artifacts", DenseCache(store.child("_dense")),
                               resume_from=resume_from)
        except Exception as exc:  # noqa: BLE001 - the trial's own failure: reported, not retried
            epoch = trial.trainer.epoch if trial is not None else 0
            tune.report({**where, FINAL_FLAG: True, ERROR_KEY: error_text(exc), "epoch": epoch})
            return
        state.put_dir(work / "final", final_rel)
        state.write_text(f"{final_rel}/complete", "ok\n")  # last: the artifacts are all there
        state.delete(state_rel)
        report_final(result.metrics, result.final_step)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def failed(result: dict | None) -> bool:
    return bool(result) and ERROR_KEY in result


def succeeded(result: dict | None) -> bool:
    """A final report with metrics (not a trial's own failure, not a trial stopped early)."""
    return bool(result) and bool(result.get(FINAL_FLAG)) and ERROR_KEY not in result


# ---------------------------------------------------------------------------------------------
# Driver-side callbacks: MLflow (the one writer) and progress
# ---------------------------------------------------------------------------------------------

class MlflowLogger(tune.Callback):
    """Logs every trial as a child run of the sweep's parent run. Re-attaches to a trial's run by
    its `prunetune.trial_id` tag after a resume, and skips epochs it has already logged, so a
    resumed sweep gains no duplicate runs and no duplicate metric steps.

    Per-epoch metrics are written in batches, every FLUSH_S seconds and whenever a trial ends (a
    transaction per epoch per trial cost the driver more than anything else it did). Epochs
    still queued when the driver is killed are not lost: a resumed trial reports its history
    again, and what MLflow lacks is logged then."""

    FLUSH_S = 5.0

    def __init__(self, uri: str, artifacts: str, experiment: str, parent_run_id: str, sweep: str, raw: dict,
                 storage: str):
        self.uri, self.artifacts, self.experiment = uri, artifacts, experiment
        self.parent_run_id, self.sweep, self.raw, self.storage = parent_run_id, sweep, raw, storage
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
        spec = search.spec_of(load(None, raw=self.raw), dict(trial.config))
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
        self._close_failed(self.run_for(trial), _error_text(trial))

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


def _error_text(trial) -> str:
    """What Tune recorded of a trial's failure, in one line."""
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
    lines = [l.strip() for l in text.splitlines() if l.strip() and not l.startswith("Failure #")]
    return lines[-1] if lines else ""


class Progress(tune.Callback):
    """What a user sees while a sweep runs: one line per running trial (its method, phase, epoch
    x/y, last val_acc, time so far and an estimate of the rest), refreshed in place on a terminal
    and printed every `period_s` seconds when output is piped; a line whenever a trial ends (done /
    running / failed, the best so far, elapsed); one line when a trial is retried."""

    def __init__(self, objective: str, mode: str, total: int, max_retries: int, echo: Callable[[str], None],
                 method: str = "", period_s: float | None = None):
        self.objective, self.mode, self.total, self.echo = objective, mode, total, echo
        self.max_retries, self.method = max_retries, method  # method: the spec's, when not searched
        self.period_s = float(os.environ.get("PRUNETUNE_PROGRESS_S", "30")) if period_s is None else period_s
        self.start = time.monotonic()
        self._seen: set = set()
        self._running: dict[str, dict] = {}
        self._last_status = time.monotonic()
        self._live = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(echo=None, _live=None, _running={})
        return state

    # -- output --------------------------------------------------------------------------------
    def _print(self, line: str) -> None:
        if self._live is not None:
            self._live.console.print(line, highlight=False, markup=False)
        elif self.echo is not None:
            self.echo(line)

    def setup(self, **info):
        if self.echo is not None and sys.stderr.isatty():
            from rich.console import Console
            from rich.live import Live

            self._live = Live(console=Console(stderr=True), refresh_per_second=2, transient=True)
            self._live.start()

    def on_experiment_end(self, trials, **info):
        if self._live is not None:
            self._live.stop()
            self._live = None

    def status_lines(self) -> list[str]:
        now = time.monotonic()
        lines = []
        for tid, t in sorted(self._running.items()):
            if "epoch" not in t:
                lines.append(f"  {tid} {t['method']:<10} starting  {_clock(now - t['start'])}")
                continue
            done, planned = t["epoch"] + 1, t.get("epochs")
            recent = t["epoch_s"][-3:]
            left = (f", ~{_clock(sum(recent) / len(recent) * (planned - done))} left"
                    if planned and recent and planned > done else "")
            val = f"  val_acc {t['val_acc']:.4f}" if t.get("val_acc") is not None else ""
            total = f"/{planned:g}" if planned else ""
            lines.append(f"  {tid} {t['method']:<10} {t.get('phase', ''):<10} epoch {done}{total}{val}  "
                         f"{_clock(now - t['start'])}{left}")
        return lines

    def _refresh(self, force: bool = False) -> None:
        if self._live is not None:
            from rich.text import Text

            self._live.update(Text("\n".join(self.status_lines()) or " "))
        elif self.echo is not None and self._running and (force or time.monotonic() - self._last_status >= self.period_s):
            self._last_status = time.monotonic()
            elapsed = int(time.monotonic() - self.start)
            self.echo(f"[{elapsed // 60:02d}:{elapsed % 60:02d}] running:")
            for line in self.status_lines():
                self.echo(line)

    # -- Tune's events -------------------------------------------------------------------------
    def on_trial_start(self, iteration, trials, trial, **info):
        method = trial.config.get("schedule.method", self.method)
        self._running[trial.trial_id] = {"method": method, "start": time.monotonic(), "epoch_s": []}

    def on_trial_result(self, iteration, trials, trial, result, **info):
        t = self._running.get(trial.trial_id)
        if t is None or result.get(FINAL_FLAG) or "epoch" not in result:
            return
        t.update(epoch=result["epoch"], epochs=result.get(EPOCHS_KEY), phase=result.get(PHASE_KEY, ""),
                 val_acc=result.get("val_acc"))
        if result.get("epoch_seconds") is not None:
            t["epoch_s"].append(result["epoch_seconds"])

    def on_trial_recover(self, iteration, trials, trial, **info):
        tries = trial.run_metadata.num_failures
        self._print(f"trial {trial.trial_id} retried ({tries}/{self.max_retries}) from its last saved state: "
                    f"{_error_text(trial)}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._running.pop(trial.trial_id, None)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._running.pop(trial.trial_id, None)

    def on_step_end(self, iteration, trials, **info):
        if self.echo is None:
            return
        ended = {t.trial_id for t in trials if t.status in ("TERMINATED", "ERROR")}
        if ended != self._seen:
            self._seen = ended
            n_failed = sum(t.status == "ERROR" or failed(t.last_result) for t in trials)
            done = sum(t.status == "TERMINATED" for t in trials) - sum(failed(t.last_result) for t in trials)
            running = sum(t.status == "RUNNING" for t in trials)
            scores = [(t.last_result or {}).get(self.objective) for t in trials if t.status == "TERMINATED"]
            scores = [s for s in scores if s is not None]
            best = (max if self.mode == "max" else min)(scores) if scores else None
            elapsed = int(time.monotonic() - self.start)
            best_text = f"best {self.objective} {best:.4f}" if best is not None else "no result yet"
            self._print(f"[{elapsed // 60:02d}:{elapsed % 60:02d}] {done}/{self.total} done, "
                        f"{running} running, {n_failed} failed; {best_text}")
        self._refresh()


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _fits(node: dict, cpus: float, gpus: float) -> bool:
    return node["Resources"].get("CPU", 0) >= cpus and node["Resources"].get("GPU", 0) >= gpus


def check_resources(cpus: float, gpus: float) -> None:
    """A request no node can meet is bad input (exit 2), not a sweep that waits forever."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if not any(_fits(n, cpus, gpus) for n in nodes):
        have = ", ".join(f"{n['Resources'].get('CPU', 0):g} CPU / {n['Resources'].get('GPU', 0):g} GPU" for n in nodes)
        raise UserError(f"resources: no Ray node can give a trial {cpus:g} CPU and {gpus:g} GPU "
                        f"(nodes: {have or 'none'}); lower resources.cpus_per_trial / gpus_per_trial")


@ray.remote(num_cpus=0)
def _node_problems(storage: str, probe: str, node: str, expected: dict) -> list[str]:
    return nodecheck.problems(storage, probe, node, expected)


def _trial_paths(loaded: LoadedSpec) -> dict[str, str]:
    """The files trials read from the nodes' own disks: data.root and model.weights (each value
    a searched key may take)."""
    paths = {}
    for key in ("data.root", "model.weights"):
        entry = loaded.space.get(key)
        values = entry.probe_values() if entry else [getattr(getattr(loaded.fixed_spec(), key.split(".")[0]),
                                                             key.split(".")[1])]
        for i, value in enumerate(v for v in values if v):
            paths[key if i == 0 else f"{key}[{i}]"] = str(value)
    return paths


def check_nodes(storage: Storage, loaded: LoadedSpec, cpus: float, gpus: float, local: bool,
                timeout_s: float = 120) -> None:
    """Before any trial trains: on every alive node that can take a trial, a task checks that the
    node reaches the storage (reads what the driver wrote there; the driver reads what it wrote),
    sees the same data files and runs the same prunetune. A fresh local Ray is this machine only:
    the driver checks the storage itself. Raises UserError naming the node and the key."""
    probe = f"_probe-{uuid.uuid4().hex[:12]}"
    created = _missing_top(storage)
    try:
        storage.write_text(f"{probe}/driver", probe)
    except OSError as exc:
        raise UserError(f"tracking.storage: cannot write to {storage.uri} ({str(exc).splitlines()[0]})") from None
    try:
        if local:
            return
        expected = nodecheck.expectations(_trial_paths(loaded))
        nodes = [n for n in ray.nodes() if n.get("Alive") and _fits(n, cpus, gpus)]
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        refs = {n["NodeID"]: _node_problems.options(
                    scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
                ).remote(storage.uri, probe, n["NodeID"], expected) for n in nodes}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
        for node in nodes:
            name = f"node {node['NodeManagerAddress']} ({node['NodeID'][:8]})"
            ref = refs[node["NodeID"]]
            if ref not in ready:
                raise UserError(f"{name} did not answer a check in {timeout_s:.0f} s; is it overloaded, "
                                "or prunetune not installed there?")
            try:
                problems = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - the task could not even run there
                raise UserError(f"{name} cannot run prunetune ({type(exc).__name__}: "
                                f"{str(exc).strip().splitlines()[-1][:200]}); install the same prunetune "
                                "on every node") from None
            if not problems and not storage.exists(f"{probe}/{node['NodeID']}"):
                problems = [f"wrote to {storage.uri}, but the driver does not see it (tracking.storage: use "
                            "storage every node and the driver share)"]
            if problems:
                raise UserError(f"{name} {problems[0]}")
    finally:
        storage.delete(probe)
        if created is not None and not storage.listdir():
            shutil.rmtree(created, ignore_errors=True)  # leave no trace of a check


def _missing_top(storage: Storage) -> Path | None:
    """The outermost local folder of the storage path that does not exist yet (None: it exists)."""
    if not storage.is_local or storage.exists():
        return None
    top = storage.local_path()
    while not top.parent.exists():
        top = top.parent
    return top


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
        # A trial stopped early (ASHA) has no final metrics: it is PRUNED in Optuna; one that
        # failed by its own error is FAIL.
        error = error or failed(result)
        if not succeeded(result):
            result = None
        super().on_trial_complete(trial_id, result, error)


def _optuna_searcher(loaded: LoadedSpec, objectives: list[tuple[str, str]], seed: int, replicates: int = 1,
                     study_name: str | None = None, storage=None):
    # Objectives are always given as a list: OptunaSearch then reads them only from a trial's
    # last result (our final report), not from every per-epoch report.
    optuna_search = _OptunaSearch(space=search.DefineByRun(loaded), metric=[m for m, _ in objectives],
                                  mode=[d for _, d in objectives], sampler=search.make_sampler(loaded, seed),
                                  study_name=study_name, storage=storage)
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
        self._errors: set[str] = set()  # replicates that failed

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False, **kwargs):
        group = self._trial_id_to_group[trial_id]
        done = self._finals.setdefault(group.primary_trial_id, {})
        done[trial_id] = result if succeeded(result) else None
        if error or failed(result):
            self._errors.add(trial_id)
        if len(done) < group.max_trials:
            return
        finals = [r for r in done.values() if r is not None]
        if not finals:
            self.searcher.on_trial_complete(group.primary_trial_id, None, error=bool(set(done) & self._errors))
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
    for trial_id, run in tracker.trial_runs(experiment, parent).items():
        if trial_id not in known:
            tracker.delete_run(run.run_id)
            echo(f"dropped MLflow run {run.run_id} ({run.status.lower()}): its trial {trial_id} "
                 "was not recorded before the driver stopped, and another trial took its place")


def _rows(trials, tracker: tracking.Tracker, experiment: str, parent: str, names: list[str]) -> list[dict]:
    runs = tracker.trial_runs(experiment, parent)
    rows = []
    for t in trials:
        last = t.last_result or {}
        run = runs.get(t.trial_id)
        row = {"trial_id": t.trial_id, "run_id": run.run_id if run else None,
               "state": "ERROR" if failed(last) else t.status, **dict(t.config)}
        for metric in names:
            row[metric] = last.get(metric) if succeeded(last) else None
        rows.append(row)
    return rows
