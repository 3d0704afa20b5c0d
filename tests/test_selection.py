"""One order for every selection of trials (`metrics.selection_key`): the first objective, then
the trial id among ties. The top table, the best run, the parent run's best-trial tags, the
report's best trial and `cka --top` pick the same trials from the same ties."""

from __future__ import annotations

import pandas as pd

from prunetune import commands, tracking
from prunetune.sweep.driver import SweepResult

# trial id → val_acc: t1 and t3 tie for best; finished (and listed) in this order
TRIALS = {"t3": 0.9, "t0": 0.7, "t1": 0.9, "t2": 0.8}
ORDER = ["t1", "t3", "t2", "t0"]


def test_the_top_table_ranks_ties_by_trial_id():
    rows = [{"trial_id": t, "val_acc": v} for t, v in TRIALS.items()]
    result = SweepResult("s", "p", rows, [("val_acc", "max")])
    assert [r["trial_id"] for r in result.ranked()] == ORDER
    low = SweepResult("s", "p", [{"trial_id": t, "loss": v} for t, v in TRIALS.items()], [("loss", "min")])
    assert [r["trial_id"] for r in low.ranked()] == ["t0", "t2", "t1", "t3"]


def test_cka_top_and_the_reports_best_pick_the_same_trials(tmp_path):
    tracker = tracking.Tracker(f"sqlite:///{tmp_path}/mlflow.db", str(tmp_path / "artifacts"))
    parent = tracker.create_run("s", "sweep", {tracking.TAG_KIND: "sweep"})
    for trial_id, value in TRIALS.items():
        run = tracker.start_run("s", trial_id, {tracking.TAG_KIND: "trial", tracking.TAG_TRIAL_ID: trial_id},
                                {"schedule.sparsity": 0.5}, parent_run_id=parent)
        tracker.log_metrics(run, {"val_acc": value}, step=0)
        tracker.end_run(run, "FINISHED")
    top = tracker.best_trials("s", parent, "val_acc", "max", top=3)
    assert [r.trial_id for r in top] == ORDER[:3]
    df = pd.DataFrame([{"trial_id": t, "val_acc": v, "schedule.sparsity": 0.5} for t, v in TRIALS.items()])
    assert commands._best_pruned(df, ("val_acc", "max"))["trial_id"] == ORDER[0]


def test_the_parent_runs_best_trial_is_the_first_of_the_ties_whatever_finished_first():
    from prunetune.sweep.mlflow_logger import MlflowLogger

    logger = MlflowLogger.__new__(MlflowLogger)
    logger.objective = ("val_acc", "max")
    logger._reset()
    submitted = []
    logger.submit, logger.flush = submitted.append, lambda: None
    for trial_id, value in TRIALS.items():
        logger._log_final(trial_id, {"val_acc": value, "epoch": 3})
    bests = [r["of"] for r in submitted if r["op"] == "best"]
    assert bests == ["t3", "t1"]  # t1 ties t3 and comes first by trial id: it becomes the best
