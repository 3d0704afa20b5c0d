"""The prunetune command: a tracked trial, and bad input that exits 2 with one line and writes
nothing."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import REPO


def prunetune(args, cwd, env=None):
    return subprocess.run([sys.executable, "-m", "prunetune.cli", *args], cwd=cwd, capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=600)


def write(tmp_path, text):
    p = tmp_path / "spec.yaml"
    p.write_text(textwrap.dedent(text))
    return p


TINY = """
    name: tiny
    data: {dataset: digits, image_size: 8}
    train: {batch_size: 64, lr: 0.05, dense_epochs: 2, finetune_epochs: 1}
    schedule: {method: {choice: [oneshot, iterative]}, sparsity: 0.6, step_size: 0.3}
    """


def test_trial_is_tracked_in_mlflow(tmp_path):
    from mlflow.tracking import MlflowClient

    p = write(tmp_path, TINY)
    r = prunetune(["trial", str(p), "--set", "schedule.method=iterative"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "run id:" in r.stdout
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("tiny")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["schedule.method"] == "iterative" and run.data.params["train.lr"] == "0.05"
    assert len(run.data.tags["prunetune.config_hash"]) == 16
    m = run.data.metrics
    assert m["sparsity"] == pytest.approx(0.6, abs=1e-4)
    history = client.get_metric_history(run.info.run_id, "val_acc")
    assert [h.step for h in history][:4] == [0, 1, 2, 3]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"checkpoint", "config.yaml", "layer_sparsity.csv", "data", "figures"} <= artifacts
    assert str(tmp_path / "mlruns" / "artifacts") in run.info.artifact_uri


@pytest.mark.parametrize("text,sets,needle", [
    ("name: a\nschedule: {sparsity: 2}\n", [], "schedule.sparsity"),
    ("name: a\nschedule: [oops\n", [], "line"),
    ("", [], "empty"),
    ("name: a\ndata: {dataset: cifar100, root: nowhere}\n", [], "cifar-100-python"),
    ("name: a\n", ["--set", "model.arch=vgg99"], "model.arch"),
    ("name: a\nschedule: {method: {choice: [oneshot, iterative]}}\n", [], "schedule.method"),
    ("name: a\nschedule: {layers: [nothing.*]}\n", [], "schedule.layers"),
    ("name: a\nmodel: {weights: missing.pth}\n", [], "missing.pth"),
    ("name: a\ndata: {dataset: ham10000, root: nowhere}\n", [], "HAM10000_metadata.csv"),
    ("name: a\ndata: {dataset: imagefolder, root: nowhere}\n", [], "train/<class>"),
    ("name: a\ndata: {dataset: medmnist, root: nowhere.npz}\n", [], "train_images"),
    ("name: a\ntrain: {class_balance: oversample}\n", [], "train.class_balance"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, text, sets, needle):
    p = write(tmp_path, text)
    r = prunetune(["trial", str(p), *sets], cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr
    assert not (tmp_path / "mlruns").exists()


def test_an_objective_without_its_split_is_refused_for_a_sweep_not_a_trial(tmp_path):
    """val_acc (the default objective) needs a validation split; one trial selects nothing."""
    p = write(tmp_path, "name: a\ndata: {val_fraction: 0}\n")
    for command in (["validate"], ["sweep", "--dry-run"]):
        r = prunetune([*command, str(p)], cwd=tmp_path)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (r.stdout, r.stderr)
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "data.val_fraction" in lines[0] and "val_acc" in lines[0], r.stderr
    assert not (tmp_path / "mlruns").exists()
    assert prunetune(["trial", str(p), "--set", "train.dense_epochs=0", "--set", "train.finetune_epochs=0"],
                     cwd=tmp_path).returncode == 0


def test_validate_prints_resolved_spec(tmp_path):
    r = prunetune(["validate", str(REPO / "sweeps" / "quickstart.yaml")], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "method:\n    choice:" in r.stdout and "weight_decay: 0.0005" in r.stdout
    assert "ok: digits, 10 classes" in r.stderr
    assert not (tmp_path / "mlruns").exists()


def test_a_command_says_in_one_line_when_the_environment_chose_where_runs_go(tmp_path):
    quickstart = str(REPO / "sweeps" / "quickstart.yaml")
    env = {"MLFLOW_TRACKING_URI": "http://bob:pw@127.0.0.1:1"}
    r = prunetune(["validate", quickstart], cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert "tracking: runs go to $MLFLOW_TRACKING_URI (http://127.0.0.1:1)" in r.stderr and "pw" not in r.stderr
    r = prunetune(["validate", quickstart, "--set", "tracking.uri=sqlite:///x.db"], cwd=tmp_path, env=env)
    assert r.returncode == 0 and "MLFLOW_TRACKING_URI" not in r.stderr


def test_a_sweep_selecting_on_test_says_so_in_one_line(tmp_path):
    """A test-split objective still runs, with one note; the default (val_acc) has none."""
    p = write(tmp_path, TINY.rstrip(" ") + "    search: {objectives: [{metric: test_acc, mode: max}]}\n")
    r = prunetune(["sweep", str(p), "--dry-run"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    notes = [line for line in r.stderr.splitlines() if "test-split" in line]
    assert notes == [("note: search.objectives selects on test_acc, a test-split metric: the chosen trials' "
                      "test scores are optimistically biased; select on val_acc")], r.stderr
    assert "objectives test_acc (max)" in r.stdout
    r = prunetune(["sweep", str(write(tmp_path, TINY)), "--dry-run"], cwd=tmp_path)
    assert r.returncode == 0 and "objectives val_acc (max)" in r.stdout and "test-split" not in r.stderr
    assert not (tmp_path / "mlruns").exists()


def test_the_sweep_table_chooses_by_the_objective_and_reports_test_acc(capsys):
    """The best run is the best by val_acc, even where another trial's test_acc is higher;
    test_acc is shown beside the objective, not used."""
    from prunetune.cli import _print_sweep
    from prunetune.sweep import SweepResult

    rows = [{"trial_id": "t1", "run_id": "run1", "state": "TERMINATED", "schedule.sparsity": 0.5,
             "val_acc": 0.90, "test_acc": 0.97},
            {"trial_id": "t2", "run_id": "run2", "state": "TERMINATED", "schedule.sparsity": 0.8,
             "val_acc": 0.93, "test_acc": 0.91}]
    _print_sweep(SweepResult("s", "parent", rows, [("val_acc", "max")]), Path("s.yaml"))
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if "trial" in line and "MLflow run" in line)
    assert header.index("val_acc") < header.index("test_acc")
    assert "0.97" in out and "best run: run2 (trial t2)" in out


def test_the_dry_run_shows_a_pruning_round_that_merges(tmp_path):
    spec = write(tmp_path, """
        name: merge
        data: {dataset: digits, image_size: 8}
        schedule: {method: {choice: [lottery, oneshot]}, sparsity: 0.87, step_size: 0.01, step_rule: geometric}
        """)
    r = prunetune(["sweep", str(spec), "--dry-run"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    [line] = [x for x in r.stdout.splitlines() if x.strip().startswith("rounds:")]
    assert "lottery to sparsity 0.87 in geometric steps of 0.01: 203, not 204" in line
    assert not (tmp_path / "mlruns").exists()
