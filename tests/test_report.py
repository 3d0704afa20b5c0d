"""`prunetune report`: the results table, the study's summary (method × sparsity, mean ± std, n),
the Pareto set, figures, and seed replicates, checked on constructed frames and on a real sweep."""

import csv
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest

from prunetune import report


def test_pareto_set_on_a_constructed_example():
    # (accuracy max, params min): a, b, c are non-dominated; d is dominated by b; e equals c's
    # accuracy with more params (dominated); f ties b exactly (kept: not strictly worse).
    values = np.array([[0.90, 100], [0.80, 50], [0.70, 10], [0.75, 60], [0.70, 20], [0.80, 50]])
    assert report.pareto_mask(values, ["max", "min"]).tolist() == [True, True, True, False, False, True]
    # both maximised
    assert report.pareto_mask(np.array([[1, 1], [2, 0], [0, 2], [0.5, 0.5]]), ["max", "max"]).tolist() == \
        [True, True, True, False]


def frame():
    rng = np.random.default_rng(0)
    rows = []
    for method in ("oneshot", "iterative", "layerwise"):
        for sparsity in (0.5, 0.8):
            for replicate in range(3):
                rows.append({"run_id": f"r{len(rows)}", "trial_id": f"t{len(rows)}", "state": "FINISHED",
                             "replicate": replicate, "schedule.method": method, "schedule.sparsity": sparsity,
                             "schedule.layers": f"first:{replicate + 1}", "seed": replicate,
                             "test_acc": float(rng.uniform(0.6, 0.9)),
                             "nonzero_params": float(rng.integers(100, 1000))})
    rows.append({**rows[0], "run_id": "bad", "trial_id": "tx", "state": "FAILED", "test_acc": np.nan})
    return pd.DataFrame(rows)


def test_summary_matches_a_hand_computed_groupby(tmp_path):
    df = frame()
    summary = report.summarize(df, ["test_acc"])
    expected = df[df.state == "FINISHED"].groupby(["schedule.method", "schedule.sparsity"])["test_acc"]
    for (method, sparsity), group in expected:
        row = summary["test_acc"].loc[(method, sparsity)]
        assert row["mean"] == pytest.approx(group.mean())
        assert row["std"] == pytest.approx(group.std(ddof=1))
        assert row["count"] == 3  # the three replicates, grouped; the failed trial left out
    text = report.summary_markdown(summary, ["test_acc"], "t", df)
    line = next(row for row in text.splitlines() if row.startswith("| 80% |"))
    g = expected.get_group(("iterative", 0.8))
    assert f"{g.mean():.4f} ± {g.std():.4f} (n=3)" in line
    assert "19 trials: 18 finished, 1 failed" in text


def test_write_produces_every_file(tmp_path):
    df = frame()
    history = [{"epoch": e, "train_loss": 1 / (e + 1), "val_acc": e / 10, "sparsity": 0.1 * e} for e in range(6)]
    files = report.write(df, [("test_acc", "max"), ("nonzero_params", "min")], tmp_path, "t", history, 2)
    names = {f.name for f in files}
    assert names == {"results.csv", "summary.md", "accuracy_vs_sparsity.png", "pareto.png", "curves.png",
                     "layers_pruned.png"}
    for f in files:
        assert f.stat().st_size > 0
    assert len(pd.read_csv(tmp_path / "results.csv")) == len(df)
    # one objective and no layer subsets: no Pareto plot, no layers plot
    files = report.write(df.assign(**{"schedule.layers": "all"}), [("test_acc", "max")], tmp_path / "b", "t")
    assert {f.name for f in files} == {"results.csv", "summary.md", "accuracy_vs_sparsity.png"}


def test_layers_count():
    assert [report.layers_count(v) for v in ("first:3", "last:1", "[features.0, classifier.*]")] == [3, 1, 2]
    assert np.isnan(report.layers_count("all"))


SPEC = """
    name: rep
    seed: 0
    data: {dataset: digits, image_size: 8}
    train: {batch_size: 128, lr: 0.05, dense_epochs: 1, finetune_epochs: 1}
    schedule:
      method: {choice: [oneshot, iterative]}
      sparsity: {choice: [0.5, 0.8]}
      step_size: 0.4
      step_epochs: 0.5
    search:
      sampler: grid
      num_trials: 4
      replicates: 2
      objectives: [{metric: test_acc, mode: max}, {metric: nonzero_params, mode: min}]
    resources: {cpus_per_trial: 1, max_concurrent: 2}
    """


@pytest.mark.slow
def test_report_of_a_replicated_grid_sweep(tmp_path):
    from test_sweep import client, runs_of, sweep

    spec = tmp_path / "rep.yaml"
    spec.write_text(textwrap.dedent(SPEC))
    r = sweep([str(spec)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    parents, children = runs_of(tmp_path, "rep")
    assert len(children) == 8  # 4 grid points × 2 seeds
    configs = {}
    for run in children:
        key = (run.data.params["schedule.method"], run.data.params["schedule.sparsity"])
        configs.setdefault(key, set()).add((run.data.tags["prunetune.replicate"], run.data.params["seed"]))
    assert all(v == {("0", "0"), ("1", "1")} for v in configs.values()) and len(configs) == 4

    out = tmp_path / "report"
    r = subprocess.run([sys.executable, "-m", "prunetune.cli", "report", str(spec), "--out", str(out)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and {row["run_id"] for row in rows} == {c.info.run_id for c in children}
    assert {"schedule.method", "schedule.sparsity", "seed", "test_acc", "state", "replicate"} <= set(rows[0])
    df = pd.read_csv(out / "results.csv")
    expected = df.groupby(["schedule.method", "schedule.sparsity"]).agg(
        mean=("test_acc", "mean"), std=("test_acc", "std"), epochs=("train_epochs_total", "mean"))
    summary = (out / "summary.md").read_text()
    for (method, sparsity), row in expected.iterrows():
        cell = f"{row['mean']:.4f} ± {row['std']:.4f} (n=2, {round(row['epochs'], 1):g} ep)"
        assert cell in summary, (method, sparsity)
    for name in ("accuracy_vs_sparsity.png", "pareto.png", "curves.png"):
        assert (out / name).stat().st_size > 0, name
    logged = {a.path for a in client(tmp_path).list_artifacts(parents[0].info.run_id, "report")}
    assert {"report/results.csv", "report/summary.md", "report/pareto.png", "report/importances.csv",
            "report/importances.png", "report/pareto_front.csv"} <= logged

    # The Optuna study is stored beside the MLflow store, named after the sweep: Optuna opens it
    import optuna

    study = optuna.load_study(study_name="rep", storage=f"sqlite:///{tmp_path}/mlruns/optuna.db")
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 4 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert {frozenset(t.params) for t in trials} == {frozenset({"schedule.method", "schedule.sparsity"})}
    means = df.groupby(["schedule.method", "schedule.sparsity"])["test_acc"].mean()
    for t in trials:  # the study holds each configuration's mean over its replicates
        assert t.values[0] == pytest.approx(means[(t.params["schedule.method"], t.params["schedule.sparsity"])])
    imp = pd.read_csv(out / "importances.csv")
    assert set(imp["objective"]) <= {"test_acc", "nonzero_params"} and not imp.empty
    assert set(imp["param"]) == {"schedule.method", "schedule.sparsity"}
    for _, part in imp.groupby("objective"):
        assert part["importance"].sum() == pytest.approx(1.0)
    front = pd.read_csv(out / "pareto_front.csv")
    assert 1 <= len(front) <= 4 and {"trial", "test_acc", "nonzero_params"} <= set(front.columns)
    # the experiment is a model-training one: MLflow's UI opens on its runs table
    exp = client(tmp_path).get_experiment_by_name("rep")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


def test_the_dense_reference_in_the_summary_and_the_figure(tmp_path, monkeypatch):
    df = frame()
    df["dense_test_acc"] = np.where(df["seed"] == 0, 0.95, 0.93)  # one dense phase per seed
    text = report.summary_markdown(report.summarize(df, ["test_acc"]), ["test_acc"], "t", df)
    dense_row = next(row for row in text.splitlines() if row.startswith("| dense (0%) |"))
    cells = dense_row.split("|")[2:-1]
    assert len(cells) == 3  # every method
    # seeds 0, 1, 2: three dense phases (0.95, 0.93, 0.93), not one value per trial
    assert all(c.strip() == f"{np.mean([0.95, 0.93, 0.93]):.4f} ± {np.std([0.95, 0.93, 0.93], ddof=1):.4f} (n=3)"
               for c in cells)
    lines = []
    import matplotlib.axes
    real = matplotlib.axes.Axes.axhline
    monkeypatch.setattr(matplotlib.axes.Axes, "axhline",
                        lambda self, y, **kw: lines.append((y, kw)) or real(self, y, **kw))
    report.accuracy_vs_sparsity(df, "test_acc", tmp_path / "a.png", "t")
    assert len(lines) == 1 and lines[0][0] == pytest.approx(np.mean([0.95, 0.93, 0.93]))
    assert "dense" in lines[0][1]["label"]
    assert (tmp_path / "a.png").stat().st_size > 1000


def test_retraining_variants_are_kept_apart():
    df = frame()
    df["schedule.retrain"] = ["weight_rewind" if i % 2 else "reinit" for i in range(len(df))]
    summary = report.summarize(df, ["test_acc"])
    methods = set(summary.index.get_level_values(0))
    assert {"oneshot · reinit", "oneshot · weight_rewind", "iterative · reinit", "layerwise"} <= methods
    assert "layerwise · reinit" not in methods  # layerwise never retrains that way


def test_each_cell_shows_the_mean_epochs_trained_behind_it():
    df = frame()
    df["train_epochs_total"] = df["schedule.method"].map({"oneshot": 20.0, "iterative": 28.0, "layerwise": 36.0})
    df.loc[(df["schedule.method"] == "layerwise") & (df["replicate"] == 0), "train_epochs_total"] = 35.7
    text = report.summary_markdown(report.summarize(df, ["test_acc"]), ["test_acc"], "t", df)
    line = next(row for row in text.splitlines() if row.startswith("| 80% |"))
    g = df[(df.state == "FINISHED") & (df["schedule.method"] == "iterative") & (df["schedule.sparsity"] == 0.8)]
    assert f"{g.test_acc.mean():.4f} ± {g.test_acc.std():.4f} (n=3, 28 ep)" in line
    assert "(n=3, 20 ep)" in line and "(n=3, 35.9 ep)" in line  # layerwise: (35.7 + 36 + 36) / 3
    assert "ep: the mean epochs trained" in text
    # a sweep whose runs do not report it: the cells as before
    assert "ep)" not in report.summary_markdown(report.summarize(frame(), ["test_acc"]), ["test_acc"], "t", frame())
