"""A sweep's results read back from the tracking store and its Optuna study: the report, the
runs CKA compares, a trial's history. The CLI parses arguments and calls these."""

from __future__ import annotations

import tempfile
from pathlib import Path

import yaml

from prunetune import spec as spec_mod
from prunetune import study, tracking
from prunetune.errors import UserError


def history(tracker: tracking.Tracker, run_id: str, keys) -> list[dict]:
    """A run's per-epoch metrics, as a trial's history (one dict per epoch)."""
    by_epoch: dict[int, dict] = {}
    for key in keys:
        for step, value in tracker.history(run_id, key):
            by_epoch.setdefault(step, {"epoch": step})[key] = value
    # the final sparsity and val_acc are logged once more after the last epoch: not an epoch
    return [by_epoch[e] for e in sorted(by_epoch) if "train_loss" in by_epoch[e]]


def best_pruned(done, objective: tuple[str, str]):
    """The best finished trial by the objective, among the pruned ones where there are any."""
    metric, mode = objective
    pruned = done[done["schedule.sparsity"].astype(float) > 0]
    pool = pruned if not pruned.empty else done
    return pool.loc[pool[metric].idxmax() if mode == "max" else pool[metric].idxmin()]


def report(tracker: tracking.Tracker, spec, parent: str, out: Path, study_url: str | None) -> list[Path]:
    """The report's files in `out` (also logged to the sweep's parent run, under report/)."""
    from prunetune import metrics
    from prunetune import report as report_mod

    runs = [r for r in tracker.trial_runs(spec.name, parent).values() if r.kind == "trial"]
    if not runs:
        raise UserError(f"report: the sweep {spec.name!r} has no trial yet")
    df = report_mod.runs_frame(runs)
    objectives = [(o.metric, o.mode) for o in spec.search.objectives]
    done = report_mod.finished(df)
    best_history, dense = None, None
    if not done.empty and objectives[0][0] in done.columns:
        best = best_pruned(done, objectives[0])
        best_history = history(tracker, best["run_id"], metrics.PER_EPOCH)
        dense = int(best.get("train.dense_epochs", 0)) or None
    files = report_mod.write(df, objectives, out, spec.name, best_history, dense)
    the_study = study.load(study_url, spec.name) if study_url else None
    if the_study is not None:
        names = [m for m, _ in objectives]
        files += report_mod.write_importances(study.importances(the_study, names), out, spec.name)
        if len(objectives) >= 2:
            front = study.pareto_front(the_study, names)
            front.to_csv(out / "pareto_front.csv", index=False)
            files.append(out / "pareto_front.csv")
    tracker.log_artifacts(parent, out, "report")
    return files


def select_runs(tracker: tracking.Tracker, spec, parent_run_id: str | None, run_ids: list[str],
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


def cka(tracker: tracking.Tracker, spec, parent: str | None, selected: list[tracking.RunRecord]):
    """CKA within and between the selected runs' checkpoints, logged as a `cka` run nested under
    the sweep's parent run; returns (checkpoints, matrices, the cka run's id)."""
    from prunetune.analysis import similarity
    from prunetune.trial import resolve_device

    cfg = spec.analysis.cka
    with tempfile.TemporaryDirectory(prefix="prunetune-cka-") as tmp:
        tmp = Path(tmp)
        files = [(r, tracker.download(r.run_id, "config.yaml", tmp / r.run_id),
                  tracker.download(r.run_id, "checkpoint/model.pt", tmp / r.run_id)) for r in selected]
        first = spec_mod.validate(yaml.safe_load(files[0][1].read_text()))
        for r, config, _ in files[1:]:
            if spec_mod.validate(yaml.safe_load(config.read_text())).data != first.data:
                raise UserError(f"cka: run {r.run_id} used other data than {selected[0].run_id}; "
                                "CKA compares layers on the same samples")
        device = resolve_device("auto")  # CUDA when present, as in training
        dataset, batches = similarity.eval_batches(first, cfg.samples, cfg.batch_size, device)
        checkpoints = [similarity.load_checkpoint(f"{r.run_id[:8]}-{r.params.get('schedule.method', '')}",
                                                  config, state, dataset, device)
                       for r, config, state in files]
        matrices = similarity.cka_matrices(checkpoints, batches)
        similarity.write_results(tmp / "cka", checkpoints, matrices)
        run_id = tracker.start_run(spec.name, "cka", {tracking.TAG_KIND: "cka", tracking.TAG_SWEEP: spec.name,
                                                       "prunetune.cka_runs": ",".join(r.run_id for r in selected)},
                                   {"analysis.cka.samples": cfg.samples, "analysis.cka.batch_size": cfg.batch_size},
                                   parent_run_id=parent)
        tracker.log_artifacts(run_id, tmp / "cka", "cka")
        tracker.end_run(run_id)
    return checkpoints, matrices, run_id
