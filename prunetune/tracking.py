"""MLflow at the edge: the only module that imports mlflow.

One experiment per spec `name` (artifacts under `tracking.artifacts`), runs created and written
through `MlflowClient`, so one process (the driver) is the only writer to a SQLite store. In a
sweep the driver's writes reach a Tracker through `sweep/writer.py`, off Tune's event loop.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunetune.errors import ERROR_CHARS, UserError
from prunetune.metrics import selection_key

log = logging.getLogger(__name__)

TAG_SWEEP = "prunetune.sweep"
TAG_TRIAL_ID = "prunetune.trial_id"
TAG_CONFIG_HASH = "prunetune.config_hash"
TAG_KIND = "prunetune.kind"
TAG_PARENT = "mlflow.parentRunId"
TAG_REPLICATE = "prunetune.replicate"  # index of the seed replicate (search.replicates)
TAG_NODE = "prunetune.node"  # the IP of the node a trial ran on
TAG_NODE_ID = "prunetune.node_id"  # its Ray node id (nodes of one machine share an IP)
TAG_GPU_IDS = "prunetune.gpu_ids"  # the GPU ids Ray gave the trial ("" for none)
TAG_RESUMED = "prunetune.resumed_from_epoch"  # a trial that continued its saved state (resume, retry)
TAG_ERROR = "prunetune.error"  # a failed trial's error text
TAG_DENSE = "prunetune.dense_hash"  # a trial's dense phase (Spec.dense_hash): the report's dense references
TAG_STATE = "prunetune.state"  # "stopped_early": ended by ASHA before its final evaluation
TAG_BEST_RUN = "prunetune.best_run_id"  # on a sweep's parent run: its best trial's run (by the objective)
TAG_BEST_TRIAL = "prunetune.best_trial_id"
TAG_NOTE = "mlflow.note.content"  # a run's description in the MLflow UI: a sweep's notes on its parent run
# MLflow 3's UI opens an experiment without a kind on its GenAI overview; sweeps train models
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


@dataclass
class RunRecord:
    """A run as prunetune reads it: plain values, no MLflow types."""

    run_id: str
    status: str  # RUNNING, FINISHED, FAILED, KILLED
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)  # the last value of each

    @property
    def trial_id(self) -> str | None:
        return self.tags.get(TAG_TRIAL_ID)

    @property
    def kind(self) -> str | None:
        return self.tags.get(TAG_KIND)


def _record(run) -> RunRecord:
    return RunRecord(run.info.run_id, run.info.status, dict(run.data.tags), dict(run.data.params),
                     dict(run.data.metrics))


def store_uri(uri: str) -> str:
    """The tracking URI to use, `tracking.uri` of a loaded spec (where --tracking-uri and
    $MLFLOW_TRACKING_URI are already applied), with a relative sqlite path made absolute.
    Raises UserError for a file store."""
    uri = absolute_sqlite_uri(uri)
    check_store(uri)
    return uri


def absolute_sqlite_uri(uri: str) -> str:
    """Make a relative sqlite path absolute (relative to the working directory), so the driver
    and Ray workers, whose working directories differ, name the same store."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def artifacts_uri(path: str) -> str:
    if "://" in path:
        return path
    return Path(path).resolve().as_uri()


class Tracker:
    """Creates and writes runs in one store."""

    def __init__(self, uri: str, artifacts: str, create: bool = True):
        """`create=False`: import MLflow and open an existing store, but create none yet (a new
        SQLite store is made, with its migrations, on first use)."""
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no usage reports from sweeps
        # MLflow prints "View run … at: URL" on stdout as a run on a server ends: end_run logs it
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        from mlflow.tracking import MlflowClient  # imported here, never at package import

        self.uri = absolute_sqlite_uri(uri)
        # An MLflow server keeps artifacts where it is told to (`--serve-artifacts`): a local path
        # here would name this machine's disk for every client. A URI given is used as is.
        remote = self.uri.startswith(("http://", "https://"))
        self.artifacts = None if remote and "://" not in artifacts else artifacts_uri(artifacts)
        self._client_class = MlflowClient
        self._client = None
        db = self._sqlite_path()
        if db is not None and not db.is_file():
            # made once per MLflow version; a new store is a copy of it. Opening it here imports
            # what opening a store needs (SQLAlchemy, Alembic: seconds), and writes nothing.
            MlflowClient(tracking_uri=f"sqlite:///{empty_store()}").search_experiments(max_results=1)
        if create or db is None or db.is_file():
            self._mlflow  # noqa: B018 - opens (or creates) the store now

    def _sqlite_path(self) -> Path | None:
        return Path(self.uri[len("sqlite:///"):]) if self.uri.startswith("sqlite:///") else None

    @property
    def _mlflow(self):
        """The MLflow client: private to this module (a store other than MLflow changes this file)."""
        if self._client is None:
            db = self._sqlite_path()
            if db is not None and not db.is_file():
                db.parent.mkdir(parents=True, exist_ok=True)
                tmp = db.with_name(f".{db.name}.{os.getpid()}")
                shutil.copyfile(empty_store(), tmp)
                os.replace(tmp, db)
            self._client = self._client_class(tracking_uri=self.uri)
        return self._client

    def find_experiment(self, name: str) -> str | None:
        """The id of the experiment `name`, or None where there is none (nothing is created)."""
        exp = self._mlflow.get_experiment_by_name(name)
        return exp.experiment_id if exp is not None else None

    def experiment_id(self, name: str) -> str:
        exp = self._mlflow.get_experiment_by_name(name)
        if exp is not None:
            if exp.tags.get("mlflow.experimentKind") is None:  # made before kinds existed
                for k, v in EXPERIMENT_KIND.items():
                    self._mlflow.set_experiment_tag(exp.experiment_id, k, v)
            return exp.experiment_id
        location = f"{self.artifacts.rstrip('/')}/{name}" if self.artifacts else None
        return self._mlflow.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)

    def start_run(self, experiment: str, run_name: str, tags: dict[str, str], params: dict[str, Any] | None = None,
                  parent_run_id: str | None = None) -> str:
        run_id = self.create_run(experiment, run_name, tags, parent_run_id)
        self.log_params(run_id, params or {})
        return run_id

    def create_run(self, experiment: str, run_name: str, tags: dict[str, str], parent_run_id: str | None = None) -> str:
        tags = dict(tags)
        if parent_run_id:
            tags[TAG_PARENT] = parent_run_id
        return self._mlflow.create_run(self.experiment_id(experiment), run_name=run_name, tags=tags).info.run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        """Log params (again: the same value twice is no error)."""
        from mlflow.entities import Param

        items = [Param(param_key(k), param_value(v)) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self._mlflow.log_batch(run_id, params=items[start:start + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int, timestamp_ms: int | None = None) -> None:
        self.log_metric_rows(run_id, [(metrics, step)], timestamp_ms)

    def log_metric_rows(self, run_id: str, rows: list, timestamp_ms: int | None = None) -> None:
        """Log several steps' metrics in as few transactions as MLflow allows (1,000 a batch).
        `rows`: (metrics, step) or (metrics, step, timestamp in ms); a metric logged again with
        the same step, value and timestamp is kept once."""
        import time

        from mlflow.entities import Metric

        now = timestamp_ms or int(time.time() * 1000)
        items = [Metric(k, float(v), int(row[2]) if len(row) > 2 else now, int(row[1]))
                 for row in rows for k, v in row[0].items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]
        for start in range(0, len(items), 1000):
            self._mlflow.log_batch(run_id, metrics=items[start:start + 1000])

    def log_dataset(self, run_id: str, dataset: dict) -> None:
        """Log a dataset input (`dataset_input`'s mapping): the runs table's Dataset column."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        entity = Dataset(dataset["name"], dataset["digest"], dataset["source_type"], dataset["source"],
                         profile=dataset.get("profile"))
        tags = [InputTag("mlflow.data.context", dataset.get("context", "training"))]
        self._mlflow.log_inputs(run_id, datasets=[DatasetInput(entity, tags)])

    def ping(self, experiment: str) -> None:
        """One cheap read: raises when the store does not answer."""
        self._mlflow.get_experiment_by_name(experiment)

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self._mlflow.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifacts(self, run_id: str, local_dir: Path, artifact_path: str | None = None) -> None:
        self._mlflow.log_artifacts(run_id, str(local_dir), artifact_path)

    def log_artifact(self, run_id: str, local_file: Path, artifact_path: str | None = None) -> None:
        self._mlflow.log_artifact(run_id, str(local_file), artifact_path)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self._mlflow.log_text(run_id, text, artifact_file)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self._mlflow.set_terminated(run_id, status=status)
        if self.uri.startswith(("http://", "https://")):
            log.info("run %s ended %s: %s", run_id, status, self.run_url(run_id))

    def run_url(self, run_id: str) -> str | None:
        """The run's page on an MLflow server (None for a local store)."""
        if not self.uri.startswith(("http://", "https://")):
            return None
        run = self._mlflow.get_run(run_id)
        return experiment_url(self.uri, run.info.experiment_id, run_id)

    def reopen_run(self, run_id: str) -> None:
        """Mark an ended run RUNNING again (a resumed sweep's parent run)."""
        self._mlflow.update_run(run_id, status="RUNNING")

    def download(self, run_id: str, path: str, dst: Path) -> Path:
        return Path(self._mlflow.download_artifacts(run_id, path, str(dst)))

    # -- prunetune's runs ------------------------------------------------------------------------
    def run(self, run_id: str) -> RunRecord | None:
        """The run with this id, or None where the store has none (or the id cannot name one).
        Any other failure (the store or server unreachable, ...) is raised."""
        from mlflow.exceptions import MlflowException

        try:
            return _record(self._mlflow.get_run(run_id))
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None
            raise

    def trial_runs(self, experiment: str, parent_run_id: str) -> dict[str, RunRecord]:
        """A sweep's trial runs (its children), by trial id."""
        runs = self._mlflow.search_runs([self.experiment_id(experiment)],
                                        filter_string=f"tags.`{TAG_PARENT}` = '{parent_run_id}'",
                                        max_results=50_000)
        return {r.trial_id: r for r in map(_record, runs) if r.trial_id}

    def trial_run(self, experiment: str, parent_run_id: str, trial_id: str) -> RunRecord | None:
        """The run of one trial of a sweep, or None."""
        runs = self._mlflow.search_runs(
            [self.experiment_id(experiment)],
            filter_string=f"tags.`{TAG_TRIAL_ID}` = '{trial_id}' and tags.`{TAG_PARENT}` = '{parent_run_id}'")
        return _record(runs[0]) if runs else None

    def best_trials(self, experiment: str, parent_run_id: str, metric: str, mode: str, top: int) -> list[RunRecord]:
        """The sweep's `top` finished trial runs, best first by `metric`, ties by trial id
        (`metrics.selection_key`: the order of every selection)."""
        runs = map(_record, self._mlflow.search_runs(
            [self.experiment_id(experiment)],
            filter_string=f"tags.`{TAG_PARENT}` = '{parent_run_id}' and tags.`{TAG_KIND}` = 'trial' "
                          "and attributes.status = 'FINISHED'", max_results=50_000))
        ranked = sorted((r for r in runs if metric in r.metrics),
                        key=lambda r: selection_key(r.metrics[metric], mode, r.trial_id or ""))
        return ranked[:max(top, 0)]

    def history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        """Every (step, value) logged for a metric, in step order."""
        return sorted((m.step, m.value) for m in self._mlflow.get_metric_history(run_id, key))

    def has_artifacts(self, run_id: str) -> bool:
        return bool(self._mlflow.list_artifacts(run_id))

    def delete_run(self, run_id: str) -> None:
        self._mlflow.delete_run(run_id)

    # -- a trial's run: one lifecycle for `prunetune trial` and the sweep ------------------------
    def start_trial_run(self, experiment: str, spec, tags: dict[str, str], parent_run_id: str | None = None,
                        run_name: str | None = None) -> str:
        """A trial's run: its tags (kind, config hash, and `tags`) and the spec keys it reads as
        params (`Spec.trial_params`)."""
        return self.start_run(experiment, run_name or spec.schedule.method,
                              {TAG_KIND: "trial", TAG_CONFIG_HASH: spec.config_hash(),
                               TAG_DENSE: spec.dense_hash(), **tags},
                              spec.trial_params(), parent_run_id=parent_run_id)

    def finish_trial_run(self, run_id: str, artifacts: Path | None = None) -> None:
        """Log a finished trial's artifacts (again after a resume or a retry: each file is
        overwritten whole, so a partial upload is completed) and end it."""
        if artifacts is not None and Path(artifacts).is_dir():
            self.log_artifacts(run_id, Path(artifacts))
        self.end_run(run_id, "FINISHED")

    def fail_trial_run(self, run_id: str, error: str) -> None:
        """End a trial's run as FAILED, its error kept as a tag."""
        self.set_tags(run_id, {TAG_ERROR: error[:ERROR_CHARS]})
        self.end_run(run_id, "FAILED")

    def stop_trial_run(self, run_id: str) -> None:
        """End a trial's run stopped early (ASHA), before its final evaluation."""
        self.set_tags(run_id, {TAG_STATE: "stopped_early"})
        self.end_run(run_id, "KILLED")


@contextlib.contextmanager
def fail_fast_http():
    """Within it, MLflow's HTTP client fails at once rather than retrying for minutes (and a request
    that hangs gives up after 30 s): a sweep's tracking writer retries with its own backoff, and
    notices an outage, and its end, within seconds. Settings the user made are kept."""
    settings = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
    added = [k for k in settings if k not in os.environ]
    os.environ.update({k: settings[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


# MLflow 3's UI opens an experiment in its GenAI view (traces, judges) unless told otherwise; this
# is what it puts in the URL itself when a user picks "Model training"
MODEL_TRAINING_VIEW = "workflowType=machine_learning"


def experiment_url(base: str, experiment_id: str, run_id: str | None = None) -> str:
    """The runs page of an experiment (or one run's page) in the MLflow UI served at `base`
    (http://host:port), in the UI's Model training view."""
    page = f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs"
    return f"{page}/{run_id}?{MODEL_TRAINING_VIEW}" if run_id else f"{page}?{MODEL_TRAINING_VIEW}"


def dataset_input(name: str, ids, split, source: str, source_type: str, profile: dict | None = None) -> dict:
    """A dataset input as `Tracker.log_dataset` takes it: `name`, a digest of the split (each
    sample's id with its split: equal digests, equal splits), where it came from, and a profile."""
    digest = hashlib.sha256()
    for sample_id, part in zip(ids, split):
        digest.update(f"{sample_id},{part}\n".encode())
    return {"name": name, "digest": digest.hexdigest()[:16], "source_type": source_type, "source": source,
            "profile": json.dumps(profile or {}, sort_keys=True)}


def empty_store() -> Path:
    """An empty SQLite tracking store with MLflow's schema, kept in the cache per MLflow version.
    Creating a store runs MLflow's migrations (about 5 s); opening a copy of this one, 0.1 s."""
    import uuid

    import mlflow
    from mlflow.tracking import MlflowClient

    from prunetune.cache import cache_root

    path = cache_root() / "mlflow" / f"empty-store-{mlflow.__version__}.db"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
        MlflowClient(tracking_uri=f"sqlite:///{tmp}").search_experiments()  # creates and migrates it
        os.replace(tmp, path)
    return path


_GLOB_CHARS = {"*": "_any_", "?": "_one_", "[": "_set_", "]": "_"}


def param_key(key: str) -> str:
    """A dotted spec key as an MLflow param name, which takes only letters, digits and / _ . - and
    spaces: a module glob's wildcards in a `schedule.layer_sparsity` key are spelled out
    ("features.*" → "features._any_"), anything else becomes "_"."""
    return re.sub(r"[^/\w.\- ]", lambda m: _GLOB_CHARS.get(m.group(), "_"), key)


def param_value(v: Any) -> str:
    text = "null" if v is None else str(v)
    return text[:6000]


def check_store(uri: str) -> None:
    """A readable error for a tracking URI MLflow cannot use (checked before any write)."""
    if uri.startswith("file:") or ("://" not in uri and not uri.startswith("sqlite")):
        raise UserError(f"tracking.uri: {uri!r} is a file store, which current MLflow refuses; "
                        "use sqlite:///path/mlflow.db or an http(s):// MLflow server")
