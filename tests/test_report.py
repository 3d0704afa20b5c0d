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
                             "schedule.layers": "all", "seed": replicate,
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
    layers = df.assign(**{"schedule.layers": [f"first:{i % 3 + 1}" for i in range(len(df))]})
    files = report.write(layers, [("test_acc", "max"), ("nonzero_params", "min")], tmp_path, "t", history, 2)
    names = {f.name for f in files}
    assert names == {"results.csv", "summary.md", "accuracy_vs_sparsity.png", "pareto.png", "curves.png",
                     "layers_pruned.png"}
    for f in files:
        assert f.stat().st_size > 0
    assert len(pd.read_csv(tmp_path / "results.csv")) == len(df)
    # one objective and no layer subsets: no Pareto plot, no layers plot
    files = report.write(df, [("test_acc", "max")], tmp_path / "b", "t")
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
    cells = {(m, r) for m, r, _ in summary.index}
    assert {("oneshot", "reinit"), ("oneshot", "weight_rewind"), ("iterative", "reinit"), ("layerwise", "—")} <= cells
    assert ("layerwise", "reinit") not in cells  # layerwise never retrains that way: one cell
    labels = set(report.with_configurations(df)["configuration"])
    assert {"oneshot · retrain=reinit", "iterative · retrain=weight_rewind", "layerwise"} <= labels


def _grid(seeds=2):
    """A grid over criterion × mask_control × dense_epochs at one sparsity, `seeds` replicates
    each (the at-init study's shape), and an iterative arm whose step_size varies."""
    rows = []
    for criterion in ("snip", "synflow"):
        for control in ("none", "shuffle"):
            for dense_epochs in (0, 6):
                for seed in range(seeds):
                    acc = {0: 0.5, 6: 0.9}[dense_epochs] + (0.05 if control == "none" else 0) + 0.01 * seed
                    rows.append({"run_id": f"r{len(rows)}", "trial_id": f"t{len(rows):02d}", "state": "FINISHED",
                                 "replicate": seed, "dense_phase": f"d{dense_epochs}s{seed}", "seed": seed,
                                 "schedule.method": "oneshot", "schedule.sparsity": 0.97,
                                 "schedule.criterion": criterion, "schedule.mask_control": control,
                                 "schedule.step_size": 0.2, "train.dense_epochs": dense_epochs,
                                 "test_acc": acc, "dense_test_acc": {0: 0.1, 6: 0.95}[dense_epochs] + 0.001 * seed})
    return pd.DataFrame(rows)


def test_every_key_a_sweep_varies_is_a_dimension_and_a_cell_is_one_configuration():
    df = _grid()
    assert report.dimensions(df) == ["schedule.criterion", "schedule.mask_control", "train.dense_epochs"]
    summary = report.summarize(df, ["test_acc"])
    assert len(summary) == 8 and set(summary["test_acc"]["count"]) == {2}  # 8 configurations × 2 seeds
    row = summary["test_acc"].loc[("oneshot", "snip", "shuffle", "0", 0.97)]
    assert row["mean"] == pytest.approx(0.505)
    text = report.summary_markdown(summary, ["test_acc"], "t", df)
    assert "| method | criterion | mask_control | dense_epochs | sparsity | test_acc |" in text
    assert "| oneshot | snip | shuffle | 0 | 97% | 0.5050 ± 0.0071 (n=2) |" in text
    # one dense reference per dense phase, by the varied key it depends on: not 0.48 ± 0.5 over both
    assert "| dense_epochs | dense_test_acc |" in text
    assert "| 0 | 0.1005 ± 0.0007 (n=2) |" in text and "| 6 | 0.9505 ± 0.0007 (n=2) |" in text


def test_a_key_only_some_methods_read_splits_only_their_cells():
    df = _grid(seeds=1)
    iterative = df.iloc[:4].assign(**{"schedule.method": "iterative", "schedule.step_size": [0.1, 0.2, 0.1, 0.2],
                                      "trial_id": ["i0", "i1", "i2", "i3"], "schedule.criterion": "snip",
                                      "schedule.mask_control": "none", "train.dense_epochs": 6})
    df = pd.concat([df, iterative], ignore_index=True)
    step = 1 + report.dimensions(df).index("schedule.step_size")
    summary = report.summarize(df, ["test_acc"])
    assert {c[step] for c in summary.index if c[0] == "oneshot"} == {"—"}  # oneshot never reads step_size
    assert {c[step] for c in summary.index if c[0] == "iterative"} == {"0.1", "0.2"}


def test_figures_draw_one_line_per_configuration_with_the_legend_beside_the_plot(tmp_path, monkeypatch):
    saved = []
    monkeypatch.setattr(report, "_save", lambda fig, path: saved.append(fig))
    report.accuracy_vs_sparsity(_grid(), "test_acc", tmp_path / "a.png", "t")
    [fig] = saved
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "oneshot · criterion=snip · mask_control=shuffle · dense_epochs=0" in labels
    assert sum(" · " in x for x in labels) == 8  # the configurations
    assert sum(x.startswith("dense (unpruned, dense_epochs=") for x in labels) == 2  # a reference per dense phase
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    assert ax.get_legend().get_window_extent(renderer).x0 >= ax.get_window_extent(renderer).x1  # covers no line


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
