"""The driver's one writer to MLflow. `MlflowLogger`, a Tune callback, turns what the trials report
(keyed by trial id) into records: a child run of the sweep's parent run per trial, its dataset,
its per-epoch metrics, its final metrics and artifacts, its end, and the sweep's best trial on the
parent run. It hands them to a `writer.Writer`, which applies them off Tune's event loop through
`Records` (what each record means), so no trial waits on the tracking store.
"""

from __future__ import annotations

import contextlib
import csv
import json
import tempfile
import time
from pathlib import Path
from typing import Callable

from ray import tune

from prunetune import search, tracking
from prunetune.errors import ERROR_CHARS
from prunetune.metrics import PER_EPOCH, is_metric, selection_key
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
    succeeded,
    tune_error_text,
    unpack,
)
from prunetune.sweep.writer import Writer

PARENT = "parent"  # the parent run's key in records (a trial's key is its trial id)
_RUN_IDS: dict[tuple[str, str], str] = {}  # (sweep, trial id) → MLflow run id, in this driver


def run_id_of(sweep: str, trial_id: str) -> str | None:
    """The MLflow run of a trial of this driver's sweep, once the store has made it."""
    return _RUN_IDS.get((sweep, trial_id))


class _NoRun(LookupError):
    error_code = "RESOURCE_DOES_NOT_EXIST"  # never retried: the run's creation was given up


class Records:
    """What the sweep's tracking records mean; applied in the writer's thread, in order."""

    def __init__(self, tracker: tracking.Tracker, experiment: str, sweep: str, parent_run_id: str,
                 echo: Callable[[str], None]):
        self.tracker, self.experiment, self.sweep, self.echo = tracker, experiment, sweep, echo
        self.runs: dict[str, str] = {PARENT: parent_run_id}  # key → run id
        self._tried: set[str] = set()  # keys whose creation failed once (it may have happened)

    def apply(self, record: dict) -> None:
        getattr(self, f"_{record['op']}")(record)

    def probe(self, record: dict) -> str | None:
        try:
            self.tracker.ping(self.experiment)
        except Exception:  # noqa: BLE001 - any failure: the store does not answer
            return f"the tracking store ({self.tracker.uri})"
        if record.get("storage"):
            try:
                Storage(record["storage"]).exists()
            except OSError:
                return f"the sweep's storage ({record['storage']})"
        return None

    def run(self, key: str) -> str:
        if key not in self.runs:
            raise _NoRun(f"no MLflow run for trial {key} (its creation was given up: see above)")
        return self.runs[key]

    def _open(self, r: dict) -> None:
        key = r["key"]
        if key not in self.runs:
            found = key in self._tried and self.tracker.trial_run(self.experiment, self.runs[PARENT], key)
            self._tried.add(key)
            self.runs[key] = found.run_id if found else self.tracker.create_run(
                self.experiment, r["name"], r["tags"], parent_run_id=self.runs[PARENT])
        _RUN_IDS[self.sweep, key] = self.runs[key]
        self.tracker.log_params(self.runs[key], r["params"])
        if r.get("dataset"):
            self.tracker.log_dataset(self.runs[key], r["dataset"])

    def _metrics(self, r: dict) -> None:
        self.tracker.log_metric_rows(self.run(r["key"]), r["rows"])

    def _tags(self, r: dict) -> None:
        self.tracker.set_tags(self.run(r["key"]), r["tags"])

    def _reopen(self, r: dict) -> None:
        self.tracker.reopen_run(self.run(r["key"]))

    def _end(self, r: dict) -> None:
        if r.get("tags"):
            self.tracker.set_tags(self.run(r["key"]), r["tags"])
        self.tracker.end_run(self.run(r["key"]), r["status"])

    def _finish(self, r: dict) -> None:
        """A finished trial: its artifacts, which it left in the sweep's storage, and its end."""
        run_id = self.run(r["key"])
        final = Storage(r["storage"]).child(r["rel"])
        if final.is_local:
            artifacts = final.local_path("artifacts") if final.exists("artifacts") else None
            self._finish_from(run_id, artifacts, r)
            return
        with tempfile.TemporaryDirectory(prefix="prunetune-artifacts-") as tmp:
            local = None
            with contextlib.suppress(FileNotFoundError):
                local = final.get_dir("artifacts", Path(tmp))
            self._finish_from(run_id, local, r)

    def _finish_from(self, run_id: str, artifacts: Path | None, r: dict) -> None:
        split = artifacts / "data" / "split.csv" if artifacts is not None else None
        if r.get("dataset") and split is not None and split.is_file():  # its own data: digest its split
            with open(split, newline="") as f:
                rows = list(csv.reader(f))[1:]
            self.tracker.log_dataset(run_id, tracking.dataset_input(
                ids=[row[0] for row in rows], split=[row[1] for row in rows], **r["dataset"]))
        self.tracker.finish_trial_run(run_id, artifacts)

    def _best(self, r: dict) -> None:
        """The sweep's best trial so far on the parent run: its metrics and its run id."""
        parent = self.runs[PARENT]
        self.tracker.log_metric_rows(parent, [(r["metrics"], r["step"], r["ts"])])
        self.tracker.set_tags(parent, {tracking.TAG_BEST_RUN: self.run(r["of"]), tracking.TAG_BEST_TRIAL: r["of"]})

    def _drop(self, r: dict) -> None:
        """Delete the runs of trials that Tune's saved state does not know: the driver made the
        run, then died before Tune recorded the trial, and the resumed sweep sampled another trial
        in its place. One child run per trial of the sweep remains."""
        for key, run_id in list(self.runs.items()):
            if key != PARENT and key not in r["known"]:
                self.tracker.delete_run(run_id)
                del self.runs[key]
                self.echo(f"dropped MLflow run {run_id}: its trial {key} was not recorded before the driver "
                          "stopped, and another trial took its place")


class MlflowLogger(tune.Callback):
    """Logs every trial as a child run of the sweep's parent run, through the writer (attached by
    the driver with `attach`; Tune pickles callbacks, writers stay out). A resumed sweep learns
    what was already handed over from the writer's journal (`restore`), so it gains no duplicate
    runs and no duplicate metric steps.

    Per-epoch metrics are handed over in batches, every FLUSH_S seconds and whenever a trial ends.
    Epochs still batched when the driver is killed are not lost: a resumed trial reports its
    history again, and what the journal lacks is logged then."""

    FLUSH_S = 5.0

    def __init__(self, experiment: str, sweep: str, loaded: LoadedSpec, storage: str, objective: tuple[str, str],
                 dataset: dict | None = None):
        """`dataset`: the data spec the driver loaded (`data`) and its dataset input (`input`)."""
        self.experiment, self.sweep, self.loaded, self.storage = experiment, sweep, loaded, storage
        self.objective, self.dataset = objective, dataset
        self.writer: Writer | None = None
        self._reset()

    def _reset(self) -> None:
        self._opened: set[str] = set()
        self._closed: set[str] = set()
        self._last_step: dict[str, int] = {}
        self._final_logged: set[str] = set()
        self._where: dict[str, dict] = {}  # trial id → the where-tags last set
        self._pending: dict[str, list] = {}  # trial id → [(metrics, step, ms)] not yet handed over
        self._flushed_at = time.monotonic()
        self._best: tuple[float, str] | None = None
        self._finals = 0

    def __getstate__(self):  # Tune pickles callbacks with the experiment; the writer stays out
        state = dict(self.__dict__)
        state["writer"] = None
        return state

    def attach(self, writer: Writer) -> None:
        self.writer = writer

    def restore(self, records) -> None:
        """Learn from the journal's records what this sweep's driver handed over before."""
        self._reset()
        for r in records:
            key = r.get("key")
            if r["op"] == "open":
                self._opened.add(key)
            elif r["op"] == "metrics":
                steps = [row[1] for row in r["rows"]]
                self._last_step[key] = max([self._last_step.get(key, -1), *steps])
                if r.get("final"):
                    self._final_logged.add(key)
            elif r["op"] == "tags" and r.get("where"):
                self._where[key] = r["tags"]
            elif r["op"] in ("end", "finish"):
                self._closed.add(key)
            elif r["op"] == "best":
                self._best = (r["value"], r["of"])
            if r.get("final"):
                self._finals += 1

    def adopt_runs(self, known: dict, last_step: Callable[[str], int]) -> None:
        """Runs of this sweep that the store holds but the journal does not know (a journal left
        on another machine's disk, for a sweep whose state is remote): take them as they are.
        `last_step(run_id)`: the last epoch the store holds of a run still running."""
        for tid, run in known.items():
            if tid in self._opened:
                continue
            self._opened.add(tid)
            if "trial_seconds" in run.metrics:
                self._final_logged.add(tid)
            if run.status == "RUNNING":
                self._last_step[tid] = last_step(run.run_id)
            else:
                self._closed.add(tid)

    def submit(self, record: dict) -> None:
        self.writer.submit(record)

    def flush(self) -> None:
        for key, rows in self._pending.items():
            if rows:
                self.submit({"op": "metrics", "key": key, "rows": rows})
        self._pending = {}
        self._flushed_at = time.monotonic()

    def run_for(self, trial) -> str:
        """The trial's key; its run is opened (by record) the first time it is seen."""
        tid = trial.trial_id
        if tid not in self._opened:
            self._opened.add(tid)
            self._last_step.setdefault(tid, -1)
            self.submit(self._open_record(trial))
        return tid

    def _open_record(self, trial) -> dict:
        spec = search.spec_of(self.loaded, dict(trial.config))  # the trial's spec, resolved once here
        tags = {tracking.TAG_KIND: "trial", tracking.TAG_CONFIG_HASH: spec.config_hash(),
                tracking.TAG_SWEEP: self.sweep, tracking.TAG_TRIAL_ID: trial.trial_id,
                tracking.TAG_REPLICATE: str(trial.config.get(search.REPLICATE, 0))}
        params = {k: tracking.param_value(v) for k, v in spec.trial_params().items()}
        record = {"op": "open", "key": trial.trial_id, "name": f"{spec.schedule.method}-{trial.trial_id}",
                  "tags": tags, "params": params}
        if self.dataset and spec.data.model_dump(mode="json") == self.dataset["data"]:
            record["dataset"] = self.dataset["input"]
        return record

    def _tag_where(self, tid: str, result: dict) -> None:
        """Tag the run with the node (and GPUs) its trial runs on, again if a retry moved it, and
        the epoch it resumed from when it continued a saved state."""
        tags = {tracking.TAG_NODE: result.get(NODE_KEY), tracking.TAG_NODE_ID: result.get(NODE_ID_KEY),
                tracking.TAG_GPU_IDS: result.get(GPUS_KEY), tracking.TAG_RESUMED: result.get(RESUMED_KEY)}
        tags = {k: str(v) for k, v in tags.items() if v is not None}
        if tags and self._where.get(tid) != tags:
            self.submit({"op": "tags", "key": tid, "tags": tags, "where": True})
            self._where[tid] = tags

    def _log_final(self, tid: str, result: dict) -> None:
        self.flush()
        if tid in self._final_logged:  # once, also when a resumed trial reports it again
            return
        final = {k: v for k, v in result.items() if k != "epoch" and is_metric(k)}
        self.submit({"op": "metrics", "key": tid, "rows": [(final, result.get("epoch", 0), _ms())], "final": True})
        self._final_logged.add(tid)
        self._finals += 1
        metric, mode = self.objective
        value = final.get(metric)
        if value is not None and (self._best is None or selection_key(value, mode, tid)
                                  < selection_key(self._best[0], mode, self._best[1])):
            self._best = (value, tid)
            self.submit({"op": "best", "of": tid, "value": value, "metrics": final, "step": self._finals,
                         "ts": _ms()})

    def _close(self, tid: str, config: dict, last: dict | None, error: str | None = None) -> None:
        """End the trial's run: FAILED (its error), FINISHED (its artifacts), or KILLED (stopped
        early by ASHA, before its final evaluation)."""
        self.flush()
        self._closed.add(tid)
        if error is not None or failed(last):
            text = (error or last[ERROR_KEY])[:ERROR_CHARS]
            self.submit({"op": "end", "key": tid, "status": "FAILED", "tags": {tracking.TAG_ERROR: text}})
        elif (last or {}).get(FINAL_FLAG):
            record = {"op": "finish", "key": tid, "storage": self.storage,
                      "rel": f"{self.sweep}/{SweepPaths.RESUME}/{tid}.final"}
            data = search.spec_of(self.loaded, dict(config)).data
            if self.dataset and data.model_dump(mode="json") != self.dataset["data"]:
                record["dataset"] = {**dataset_source(data), "profile": {"image_size": data.image_size}}
            self.submit(record)
        else:
            self.submit({"op": "end", "key": tid, "status": "KILLED", "tags": {tracking.TAG_STATE: "stopped_early"}})

    # -- Tune's events -------------------------------------------------------------------------------
    def on_trial_start(self, iteration, trials, trial, **info):
        self.run_for(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        tid, result = self.run_for(trial), unpack(result)
        self._tag_where(tid, result)
        if result.get(FINAL_FLAG):
            if succeeded(result):
                self._log_final(tid, result)
            return
        epoch = result.get("epoch")
        if epoch is None or epoch <= self._last_step.get(tid, -1):
            return  # already handed over before a resume
        self._pending.setdefault(tid, []).append(({k: result[k] for k in PER_EPOCH if k in result}, epoch, _ms()))
        self._last_step[tid] = epoch
        if time.monotonic() - self._flushed_at >= self.FLUSH_S:
            self.flush()

    def on_step_end(self, iteration, trials, **info):
        if self._pending and time.monotonic() - self._flushed_at >= self.FLUSH_S:
            self.flush()

    def on_experiment_end(self, trials, **info):
        self.flush()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._close(self.run_for(trial), trial.config, trial.last_result)

    def on_trial_error(self, iteration, trials, trial, **info):
        # Tune saw an error: the trial's worker or node died, after every retry.
        self._close(self.run_for(trial), trial.config, trial.last_result, error=tune_error_text(trial))

    def on_trial_recover(self, iteration, trials, trial, **info):
        self.flush()  # the retried trial reports its history again: hand over what it has first

    def close_restored(self, results) -> None:
        """After a restore: close the runs of trials that finished while the driver was down
        (their results are in Tune's state; their runs were never closed)."""
        for result in results:
            metrics = unpack(result.metrics)
            tid = metrics.get("trial_id")
            if tid in self._opened and tid not in self._closed and metrics.get(FINAL_FLAG):
                if succeeded(metrics):
                    self._log_final(tid, metrics)
                self._close(tid, result.config or {}, metrics)


def dataset_info(data_spec, dataset) -> dict:
    """What the logger needs for each trial's dataset input: the data spec the driver loaded
    (`data`) and that dataset's input (`input`); a trial whose data spec differs digests its own
    split (from its artifacts) when it finishes."""
    counts = {part: int((dataset.split == part).sum()) for part in ("train", "val", "test")}
    profile = {"num_rows": len(dataset.ids), **counts, "classes": len(dataset.classes),
               "image_size": data_spec.image_size}
    return {"data": data_spec.model_dump(mode="json"),
            "input": tracking.dataset_input(ids=dataset.ids, split=dataset.split, profile=profile,
                                            **dataset_source(data_spec))}


def dataset_source(data_spec) -> dict:
    """A dataset's name and where it came from, as MLflow's dataset inputs name them."""
    if data_spec.root:
        source = {"source_type": "local", "source": json.dumps({"uri": str(Path(data_spec.root).resolve())})}
    else:  # built into a package (digits) or made by a factory
        source = {"source_type": "code", "source": json.dumps({"dataset": data_spec.dataset})}
    return {"name": data_spec.dataset, **source}


def _ms() -> int:
    return int(time.time() * 1000)
