"""The prunetune command: a tracked trial, and bad input that exits 2 with one line and writes
nothing."""

import os
import subprocess
import sys
import textwrap

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
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr
    assert not (tmp_path / "mlruns").exists()


def test_validate_prints_resolved_spec(tmp_path):
    r = prunetune(["validate", str(REPO / "sweeps" / "quickstart.yaml")], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "method:\n    choice:" in r.stdout and "weight_decay: 0.0005" in r.stdout
    assert "ok: digits, 10 classes" in r.stderr
    assert not (tmp_path / "mlruns").exists()
