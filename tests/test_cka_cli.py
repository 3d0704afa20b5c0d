"""`prunetune cka` on a real sweep: checkpoints from MLflow, matrices and heatmaps logged to a
`cka` run beside the sweep's parent run (its children are the trials only), labelled by trial id."""

import csv
import subprocess
import sys

import pytest

from test_sweep import client, runs_of, sweep, write_spec

pytestmark = pytest.mark.slow


def cka(args, cwd):
    return subprocess.run([sys.executable, "-m", "prunetune.cli", "cka", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def test_cka_of_the_best_checkpoints(tmp_path):
    spec = write_spec(tmp_path, name="sim", trials=3)
    spec.write_text(spec.read_text() + "analysis: {cka: {top: 2, samples: 64, batch_size: 32}}\n")
    r = cka([str(spec)], tmp_path)
    assert r.returncode == 2 and "run `prunetune sweep` first" in r.stderr  # no sweep yet

    assert sweep([str(spec)], tmp_path).returncode == 0
    r = cka([str(spec)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("within ") == 2 and "mean diagonal CKA" in r.stdout

    parents, children = runs_of(tmp_path, "sim")
    c = client(tmp_path)
    exp = c.get_experiment_by_name("sim")
    (run,) = c.search_runs([exp.experiment_id], filter_string="tags.`prunetune.kind` = 'cka'")
    assert "mlflow.parentRunId" not in run.data.tags  # apart from the trials, linked by a tag
    assert run.data.tags["prunetune.sweep_run_id"] == parents[0].info.run_id
    nested = c.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    assert {r.data.tags["prunetune.kind"] for r in nested} == {"trial"}
    # named as the sweep's table names trials: trial id and method
    trial_of = {r.info.run_id: r.data.tags["prunetune.trial_id"] for r in children}
    labels = run.data.tags["prunetune.cka_trials"].split(",")
    compared = run.data.tags["prunetune.cka_runs"].split(",")
    assert [label.split("-")[0] for label in labels] == [trial_of[i] for i in compared]
    files = {a.path for a in c.list_artifacts(run.info.run_id, "cka")}
    assert len([f for f in files if f.endswith(".csv")]) == 3 and len([f for f in files if f.endswith(".png")]) == 3
    # the two best trials by the objective (val_acc; ties may go either way) were compared
    chosen = set(run.data.tags["prunetune.cka_runs"].split(","))
    val = {r.info.run_id: r.data.metrics.get("val_acc", -1) for r in children}
    assert len(chosen) == 2 and min(val[i] for i in chosen) >= max(v for i, v in val.items() if i not in chosen)
    within = next(f for f in files if "within_" in f and f.endswith(".csv"))
    path = c.download_artifacts(run.info.run_id, within, str(tmp_path / "dl"))
    with open(path) as f:
        rows = list(csv.reader(f))
    layers = rows[0][1:]
    assert layers[0] == "features.0" and len(rows) == len(layers) + 1
    for i, row in enumerate(rows[1:]):
        assert float(row[1 + i]) == pytest.approx(1.0, abs=1e-6)  # each layer against itself

    # explicit runs, across two trials
    ids = [children[0].info.run_id, children[1].info.run_id]
    r = cka([str(spec), "--runs", ids[0], "--runs", ids[1]], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    r = cka([str(spec), "--runs", "nope"], tmp_path)
    assert r.returncode == 2 and "nope" in r.stderr
