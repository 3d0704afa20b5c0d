"""MLflow at the edge: the only module that imports mlflow.

One experiment per spec `name` (artifacts under `tracking.artifacts`), runs created and written
through `MlflowClient`, so one process (the driver) is the only writer to a SQLite store.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Any

from prunetune.errors import UserError

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


def store_uri(spec_uri: str, cli_uri: str | None = None) -> str:
    """The tracking URI to use: --tracking-uri, else $MLFLOW_TRACKING_URI, else the spec's
    `tracking.uri`; a relative sqlite path made absolute. Raises UserError for a file store."""
    uri = absolute_uri(cli_uri or os.environ.get("MLFLOW_TRACKING_URI") or spec_uri)
    check_store(uri)
    return uri


def absolute_uri(uri: str) -> str:
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
        from mlflow.tracking import MlflowClient  # imported here, never at package import

        self.uri = absolute_uri(uri)
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
            self.client  # noqa: B018 - opens (or creates) the store now

    def _sqlite_path(self) -> Path | None:
        return Path(self.uri[len("sqlite:///"):]) if self.uri.startswith("sqlite:///") else None

    @property
    def client(self):
        if self._client is None:
            db = self._sqlite_path()
            if db is not None and not db.is_file():
                db.parent.mkdir(parents=True, exist_ok=True)
                tmp = db.with_name(f".{db.name}.{os.getpid()}")
                shutil.copyfile(empty_store(), tmp)
                os.replace(tmp, db)
            self._client = self._client_class(tracking_uri=self.uri)
        return self._client

    def experiment_id(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        location = f"{self.artifacts.rstrip('/')}/{name}" if self.artifacts else None
        return self.client.create_experiment(name, artifact_location=location)

    def start_run(self, experiment: str, run_name: str, tags: dict[str, str], params: dict[str, Any] | None = None,
                  parent_run_id: str | None = None) -> str:
        from mlflow.entities import Param

        tags = dict(tags)
        if parent_run_id:
            tags[TAG_PARENT] = parent_run_id
        run = self.client.create_run(self.experiment_id(experiment), run_name=run_name,
                                     tags=tags)
        run_id = run.info.run_id
        items = [Param(k, _param_value(v)) for k, v in (params or {}).items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run_id, params=items[start:start + 100])
        return run_id

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        self.log_metric_rows(run_id, [(metrics, step)])

    def log_metric_rows(self, run_id: str, rows: list[tuple[dict[str, float], int]]) -> None:
        """Log several steps' metrics in as few transactions as MLflow allows (1,000 a batch)."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step)) for metrics, step in rows for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]
        for start in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[start:start + 1000])

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifacts(self, run_id: str, local_dir: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(run_id, str(local_dir), artifact_path)

    def log_artifact(self, run_id: str, local_file: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(local_file), artifact_path)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def reopen_run(self, run_id: str) -> None:
        """Mark an ended run RUNNING again (a resumed sweep's parent run)."""
        self.client.update_run(run_id, status="RUNNING")

    def download(self, run_id: str, path: str, dst: Path) -> Path:
        return Path(self.client.download_artifacts(run_id, path, str(dst)))


def empty_store() -> Path:
    """An empty SQLite tracking store with MLflow's schema, kept in the cache per MLflow version.
    Creating a store runs MLflow's migrations (about 5 s); opening a copy of this one, 0.1 s."""
    import uuid

    import mlflow
    from mlflow.tracking import MlflowClient

    from prunetune.data.cache import cache_root

    path = cache_root() / "mlflow" / f"empty-store-{mlflow.__version__}.db"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
        MlflowClient(tracking_uri=f"sqlite:///{tmp}").search_experiments()  # creates and migrates it
        os.replace(tmp, path)
    return path


def _param_value(v: Any) -> str:
    text = "null" if v is None else str(v)
    return text[:6000]


def check_store(uri: str) -> None:
    """A readable error for a tracking URI MLflow cannot use (checked before any write)."""
    if uri.startswith("file:") or ("://" not in uri and not uri.startswith("sqlite")):
        raise UserError(f"tracking.uri: {uri!r} is a file store, which current MLflow refuses; "
                        "use sqlite:///path/mlflow.db or an http(s):// MLflow server")


def select_runs(tracker: Tracker, spec, parent_run_id: str | None, run_ids: list[str], top: int) -> list:
    """Explicit runs, or the sweep's `top` finished trials by its first objective."""
    if run_ids:
        runs = []
        for rid in run_ids:
            try:
                runs.append(tracker.client.get_run(rid))
            except Exception:  # noqa: BLE001 - MLflow raises its own error types for a missing run
                raise UserError(f"--runs: no run {rid} in {tracker.uri}") from None
        return runs
    if parent_run_id is None:
        raise UserError("cka: no sweep found for this spec; run `prunetune sweep` first or give --runs")
    objective = spec.search.objectives[0]
    order = "DESC" if objective.mode == "max" else "ASC"
    return tracker.client.search_runs(
        [tracker.experiment_id(spec.name)],
        filter_string=f"tags.`{TAG_PARENT}` = '{parent_run_id}' and tags.`{TAG_KIND}` = 'trial' "
                      "and attributes.status = 'FINISHED'",
        order_by=[f"metrics.{objective.metric} {order}"], max_results=max(top, 0))


def child_runs(tracker: Tracker, experiment: str, parent_run_id: str) -> dict[str, object]:
    """A sweep's child runs, by trial id."""
    runs = tracker.client.search_runs([tracker.experiment_id(experiment)],
                                      filter_string=f"tags.`{TAG_PARENT}` = '{parent_run_id}'",
                                      max_results=50_000)
    return {r.data.tags.get(TAG_TRIAL_ID): r for r in runs if TAG_TRIAL_ID in r.data.tags}


def teacher_dir(teacher: str, uri: str, artifacts: str) -> Path:
    """The local checkpoint directory of a distillation teacher: `teacher` itself when it is a
    directory, else the artifacts of MLflow run `teacher` (config.yaml, checkpoint/model.pt,
    data/split.csv), downloaded once into the cache."""
    from prunetune.data.cache import cache_root
    from prunetune.distill import TEACHER_FILES

    local = Path(teacher).expanduser()
    if local.is_dir():
        return local
    if not (len(teacher) == 32 and all(c in "0123456789abcdef" for c in teacher)):
        raise UserError(f"distill.teacher: {teacher!r} is neither a directory nor an MLflow run id "
                        "(32 hex digits)")
    entry = cache_root() / "teachers" / teacher
    if all((entry / f).is_file() for f in TEACHER_FILES):
        return entry
    uri = absolute_uri(uri)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise UserError(f"distill.teacher: no run {teacher} (the tracking store {uri} does not exist)")
    tracker = Tracker(uri, artifacts)
    try:
        tracker.client.get_run(teacher)
    except Exception:  # noqa: BLE001 - MLflow raises its own error types for a missing run
        raise UserError(f"distill.teacher: no run {teacher} in {uri}") from None
    tmp = entry.parent / f"{teacher}.tmp-{os.getpid()}"
    try:
        for f in TEACHER_FILES:
            (tmp / f).parent.mkdir(parents=True, exist_ok=True)
            tracker.download(teacher, f, (tmp / f).parent)
    except Exception:  # noqa: BLE001 - MLflow's own error types
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"distill.teacher: run {teacher} lacks the artifacts {', '.join(TEACHER_FILES)} "
                        "(is it a prunetune trial that finished?)") from None
    if not entry.is_dir():
        tmp.rename(entry)
    return entry
