"""The work behind the CLI's commands, apart from the sweep (`prunetune.sweep`): checking a spec,
one trial in this process, layer sensitivity, a sweep's report and its CKA, and the MLflow UI. Each takes what
the CLI parsed and returns what it prints; click stays in cli.py, and heavy imports (torch,
MLflow) happen inside the functions that need them. Bad input raises UserError before anything
is written.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from prunetune import stored_study, tracking
from prunetune.errors import UserError, error_text
from prunetune.spec import LoadedSpec, Spec, get_dotted, set_dotted, validate
from prunetune.storage import Storage

log = logging.getLogger(__name__)


def validate_spec(loaded: LoadedSpec) -> tuple[str, str]:
    """`prunetune validate`: the resolved spec as YAML (search entries as written), and one line
    on its data (read here: a missing or malformed root fails) and searched keys."""
    from prunetune.data import load_dataset
    from prunetune.model_check import check_models, check_weights

    fixed = loaded.fixed_spec()
    dataset = load_dataset(fixed.data)
    notes = check_models(loaded, dataset)  # a factory's model is built and checked
    notes += check_weights(loaded, fetch=False)  # torchvision's weight names: known, and cached or not
    resolved = fixed.model_dump(mode="json")
    for key in loaded.space:
        set_dotted(resolved, key, get_dotted(loaded.raw, key))
    counts = {s: int((dataset.split == s).sum()) for s in ("train", "val", "test")}
    return yaml.safe_dump(resolved, sort_keys=False), "".join(f"# {n}\n" for n in notes) + (
        f"# ok: {fixed.data.dataset}, {len(dataset.classes)} classes, "
        f"{counts['train']} train / {counts['val']} val / {counts['test']} test samples; "
        f"{len(loaded.space)} searched key(s): {', '.join(loaded.space) or 'none'}")


def _dense_cache(spec: Spec):
    """The dense-phase cache in the spec's storage, shared with its sweeps."""
    from prunetune.cache import DenseCache

    return DenseCache(Storage(spec.tracking.storage).child("_dense"))


# -- prunetune trial -----------------------------------------------------------------------------

def run_trial(loaded: LoadedSpec, echo: Callable[[str], None]) -> tuple[str, dict]:
    """One trial of the spec in this process (no Ray), tracked as an MLflow run; returns the run
    id and the final metrics. Every searched key the method uses must be fixed (UserError)."""
    from prunetune.teachers import teacher_dir
    from prunetune.trial import Trial

    spec = loaded.trial_spec()
    uri = tracking.store_uri(spec.tracking.uri)
    teacher = teacher_dir(spec.distill.teacher, uri, spec.tracking.artifacts) if spec.distill else None
    # reads the data and builds the model: bad input fails here, before anything is written
    runner = Trial(spec, teacher_dir=teacher)
    dense = _dense_cache(spec)

    tracker = tracking.Tracker(uri, spec.tracking.artifacts)
    run_id = tracker.start_trial_run(spec.name, spec, {}, run_name=f"trial-{spec.config_hash()[:8]}")
    runner.report = lambda metrics, epoch: tracker.log_metrics(run_id, metrics, epoch)
    echo(f"MLflow run {run_id} in experiment {spec.name!r} ({tracker.uri})")
    try:
        with tempfile.TemporaryDirectory(prefix="prunetune-trial-") as tmp:
            result = runner.run(tmp, dense)
            tracker.log_metrics(run_id, result.metrics, result.final_step)
            tracker.finish_trial_run(run_id, Path(tmp))
    except KeyboardInterrupt:
        tracker.end_run(run_id, "KILLED")
        raise
    except BaseException as exc:
        tracker.fail_trial_run(run_id, error_text(exc))
        raise
    return run_id, result.metrics


# -- prunetune sensitivity -------------------------------------------------------------------------

@dataclass
class Sensitivity:
    rows: list[dict]  # (layer, sparsity, <split>_acc, <split>_loss, acc_drop); the first is the dense model
    files: list[Path]
    out: Path
    run_id: str


def sensitivity(loaded: LoadedSpec, out: Path | None) -> Sensitivity:
    """Each prunable layer pruned alone from the dense checkpoint and evaluated: CSV and heatmap in
    `out` (default reports/<name>/sensitivity), logged to an MLflow run of kind sensitivity."""
    from prunetune.analysis import sensitivity as sens
    from prunetune.trial import Trial

    spec = loaded.fixed_spec()  # the dense phase does not depend on the schedule's searched keys
    uri = tracking.store_uri(spec.tracking.uri)
    rows = sens.analyse(Trial(spec), _dense_cache(spec))
    out = out or Path("reports") / spec.name / "sensitivity"
    files = sens.write(rows, out, f"{spec.name}: {spec.model.arch}")
    tracker = tracking.Tracker(uri, spec.tracking.artifacts)
    run_id = tracker.start_run(spec.name, "sensitivity", {tracking.TAG_KIND: "sensitivity",
                                                          tracking.TAG_SWEEP: spec.name}, spec.flat())
    for f in files:
        tracker.log_artifact(run_id, f, "sensitivity")
    tracker.end_run(run_id)
    return Sensitivity(rows, files, out, run_id)


# -- prunetune report ----------------------------------------------------------------------------

def _history(tracker: tracking.Tracker, run_id: str, keys) -> list[dict]:
    """A run's per-epoch metrics, as a trial's history (one dict per epoch)."""
    by_epoch: dict[int, dict] = {}
    for key in keys:
        for step, value in tracker.history(run_id, key):
            by_epoch.setdefault(step, {"epoch": step})[key] = value
    # the final sparsity and val_acc are logged once more after the last epoch: not an epoch
    return [by_epoch[e] for e in sorted(by_epoch) if "train_loss" in by_epoch[e]]


def _best_pruned(done, objective: tuple[str, str]):
    """The best finished trial by the objective, among the pruned ones where there are any."""
    from prunetune.metrics import selection_key

    metric, mode = objective
    pruned = done[done["schedule.sparsity"].astype(float) > 0]
    pool = pruned if not pruned.empty else done
    pool = pool.dropna(subset=[metric])
    return pool.loc[min(pool.index, key=lambda i: selection_key(pool.at[i, metric], mode, pool.at[i, "trial_id"]))]


def report(target: Path, out: Path | None, tracking_uri: str | None = None,
           storage: str | None = None) -> tuple[str, Path, list[Path]]:
    """The report's files for the sweep of a spec or sweep folder (`sweep.locate`) in `out` (default
    reports/<name>), also logged to the sweep's parent run under report/; returns the parent
    run's id, the folder and the files."""
    from prunetune import metrics
    from prunetune import report as report_files
    from prunetune.sweep import locate

    located = locate(target, tracking_uri, storage)
    spec, parent = located.spec, located.parent_run_id
    if parent is None:
        raise UserError(f"report: no sweep found for {spec.name!r}; run `prunetune sweep` first")
    tracker = tracking.Tracker(located.tracking_uri, spec.tracking.artifacts)
    runs = [r for r in tracker.trial_runs(spec.name, parent).values() if r.kind == "trial"]
    if not runs:
        raise UserError(f"report: the sweep {spec.name!r} has no trial yet")
    out = out or Path("reports") / spec.name
    df = report_files.runs_frame(runs)
    objectives = [(o.metric, o.mode) for o in spec.search.objectives]
    done = report_files.finished(df)
    best_history, dense, best_title = None, None, ""
    if not done.empty and objectives[0][0] in done.columns:
        best = _best_pruned(done, objectives[0])
        best_history = _history(tracker, best["run_id"], metrics.PER_EPOCH)
        dense = int(best.get("train.dense_epochs", 0)) or None
        best_title = (f"best trial {best['trial_id']} by {objectives[0][0]}, {best['schedule.method']} at "
                      f"sparsity {float(best['schedule.sparsity']):.0%}")
    files = report_files.write(df, objectives, out, spec.name, best_history, dense, best_title)
    study = stored_study.load(located.study_url, spec.name) if located.study_url else None
    if study is not None:
        names = [m for m, _ in objectives]
        files += report_files.write_importances(stored_study.importances(study, names), out, spec.name)
        if len(objectives) >= 2:
            stored_study.pareto_front(study, names).to_csv(out / "pareto_front.csv", index=False)
            files.append(out / "pareto_front.csv")
    tracker.log_artifacts(parent, out, "report")
    return parent, out, files


# -- prunetune cka -------------------------------------------------------------------------------

def _select_runs(tracker: tracking.Tracker, spec: Spec, parent_run_id: str | None, run_ids: list[str],
                 top: int) -> list[tracking.RunRecord]:
    """Explicit runs, or the sweep's `top` finished trials by its first objective."""
    if run_ids:
        runs = []
        for rid in run_ids:
            run = tracker.run(rid)
            if run is None:
                raise UserError(f"--runs: no run {rid} in {tracker.uri}")
            runs.append(run)
        return runs
    if parent_run_id is None:
        raise UserError("cka: no sweep found for this spec; run `prunetune sweep` first or give --runs")
    objective = spec.search.objectives[0]
    return tracker.best_trials(spec.name, parent_run_id, objective.metric, objective.mode, top)


def cka(target: Path, run_ids: list[str], top: int | None, tracking_uri: str | None = None,
        storage: str | None = None):
    """Linear CKA within and between checkpoints: the runs `run_ids`, else the best `top` (default
    analysis.cka.top) of the sweep of a spec or sweep folder (`sweep.locate`), logged as a `cka`
    run of the sweep's experiment beside its parent run (tag `prunetune.sweep_run_id`), not nested
    under it, so that the parent's children are its trials; returns (checkpoints, matrices, the
    cka run's id). Checkpoints are labelled by trial id and method, as the sweep's table names
    trials (by run id where a run is no sweep's trial)."""
    from prunetune.analysis import similarity
    from prunetune.sweep import locate
    from prunetune.train import resolve_device

    located = locate(target, tracking_uri, storage)
    spec, parent = located.spec, located.parent_run_id
    tracker = tracking.Tracker(located.tracking_uri, spec.tracking.artifacts)
    selected = _select_runs(tracker, spec, parent, run_ids, top if top is not None else spec.analysis.cka.top)
    if not selected:
        raise UserError("cka: no finished trial to compare (use --runs RUN_ID ... or run the sweep first)")
    cfg = spec.analysis.cka
    with tempfile.TemporaryDirectory(prefix="prunetune-cka-") as tmp:
        tmp = Path(tmp)
        files = [(r, tracker.download(r.run_id, "config.yaml", tmp / r.run_id),
                  tracker.download(r.run_id, "checkpoint/model.pt", tmp / r.run_id)) for r in selected]
        first = validate(yaml.safe_load(files[0][1].read_text()))
        for r, config, _ in files[1:]:
            if validate(yaml.safe_load(config.read_text())).data != first.data:
                raise UserError(f"cka: run {r.run_id} used other data than {selected[0].run_id}; "
                                "CKA compares layers on the same samples")
        device = resolve_device("auto")  # CUDA when present, as in training
        dataset, batches = similarity.eval_batches(first, cfg.samples, cfg.batch_size, device)
        checkpoints = [similarity.load_checkpoint(_label(r), config, state, dataset, device)
                       for r, config, state in files]
        matrices = similarity.cka_matrices(checkpoints, batches)
        similarity.write_results(tmp / "cka", checkpoints, matrices)
        run_id = tracker.start_run(spec.name, f"cka-{spec.name}",
                                   {tracking.TAG_KIND: "cka", tracking.TAG_SWEEP: spec.name,
                                    "prunetune.sweep_run_id": parent or "",
                                    "prunetune.cka_runs": ",".join(r.run_id for r in selected),
                                    "prunetune.cka_trials": ",".join(c.label for c in checkpoints)},
                                   {"analysis.cka.samples": cfg.samples, "analysis.cka.batch_size": cfg.batch_size})
        tracker.log_artifacts(run_id, tmp / "cka", "cka")
        tracker.end_run(run_id)
    return checkpoints, matrices, run_id


def _label(run) -> str:
    """A checkpoint's label: its trial id (run id for a run of no sweep) and its method."""
    name = run.tags.get(tracking.TAG_TRIAL_ID) or run.run_id[:8]
    return f"{name}-{run.params.get('schedule.method', '')}"


# -- prunetune ui --------------------------------------------------------------------------------

def ui_command(spec: Spec, port: int) -> tuple[str, list[str], str]:
    """The spec's tracking URI, the MLflow UI's command line for it (bound to 127.0.0.1), and the
    URL of the spec's experiment's runs page there (of the UI's front page before any run)."""
    uri = tracking.store_uri(spec.tracking.uri)
    if uri.startswith(("http://", "https://")):
        raise UserError(f"tracking.uri: {uri} is an MLflow server, which serves its own UI: open "
                        f"{_experiment_page(uri, spec)}")
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise UserError(f"tracking.uri: {uri} does not exist yet; run a trial or a sweep first")
    base = f"http://127.0.0.1:{port}"
    return uri, [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                 "--default-artifact-root", tracking.artifacts_uri(spec.tracking.artifacts),
                 "--host", "127.0.0.1", "--port", str(port)], _experiment_page(base, spec, uri)


def _experiment_page(base: str, spec: Spec, uri: str | None = None) -> str:
    """The runs page of the spec's experiment in the UI at `base`; the front page if there is none."""
    try:
        found = tracking.Tracker(uri or base, spec.tracking.artifacts).find_experiment(spec.name)
    except Exception as exc:  # noqa: BLE001 - a server that does not answer: its front page
        log.warning("could not look up experiment %s in %s: %s", spec.name, uri or base, exc)
        found = None
    return tracking.experiment_url(base, found) if found else f"{base}/"


def serve(cmd: list[str], log_file: Path) -> int:
    """Run a server in its own process group until it exits or this process is stopped (SIGTERM,
    SIGINT, SIGHUP): then the whole group stops, the server's worker processes included. What
    the server prints (its access log, its warnings) goes to `log_file`, not the terminal."""
    import signal
    import subprocess

    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as out:
        proc = subprocess.Popen(cmd, start_new_session=True, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT)

    def stop_group(sig: int = signal.SIGTERM) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)

    def on_signal(signum, frame):
        stop_group()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    try:
        rc = proc.wait()
    finally:
        stop_group()
        time.sleep(0.5)
        stop_group(signal.SIGKILL)  # workers that outlived their leader
    return 0 if rc in (-signal.SIGTERM, -signal.SIGINT) else rc
