"""`prunetune sensitivity`: each prunable layer pruned alone from the dense checkpoint, evaluated
without fine-tuning; a CSV and a heatmap, logged to MLflow."""

import csv
import subprocess
import sys

import pytest
import yaml

from prunetune import spec
from prunetune.analysis import sensitivity
from prunetune.cache import DenseCache
from prunetune.trial import Trial

from conftest import digits_raw


def test_each_layer_alone_from_the_dense_weights(tmp_path):
    trial = Trial(spec.validate(digits_raw(train__dense_epochs=3)))
    cache = DenseCache(tmp_path / "cache")
    rows = sensitivity.analyse(trial, cache, sparsities=(0.1, 0.5, 0.99))
    assert rows[0]["layer"] == "(dense)" and len(rows) == 1 + 3 * len(trial.layers)
    assert [r["layer"] for r in rows[1::3]] == trial.layers  # forward order
    dense_acc = rows[0]["val_acc"]
    assert dense_acc > 0.5
    for r in rows[1:]:
        assert r["acc_drop"] == pytest.approx(dense_acc - r["val_acc"])
    # pruning 99% of one layer hurts more than 10% of it, for most layers
    by = {(r["layer"], r["sparsity"]): r["val_acc"] for r in rows[1:]}
    assert sum(by[(n, 0.99)] < by[(n, 0.1)] for n in trial.layers) >= len(trial.layers) - 1
    # the model is left with the dense weights and no mask
    assert trial.masks.sparsity() < 0.01
    assert trial.trainer.evaluate("val")["acc"] == pytest.approx(dense_acc)


@pytest.mark.slow
def test_sensitivity_cli_writes_csv_heatmap_and_mlflow_run(tmp_path):
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({**digits_raw(), "name": "sens"}))
    r = subprocess.run([sys.executable, "-m", "prunetune.cli", "sensitivity", "s.yaml", "--out", "out"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "out" / "sensitivity.csv").read_text().splitlines()))
    assert len(rows) == 1 + 4 * 9 and (tmp_path / "out" / "sensitivity.png").stat().st_size > 0
    assert "most sensitive layers at 90%" in r.stdout
    from mlflow.tracking import MlflowClient
    c = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    (run,) = c.search_runs([c.get_experiment_by_name("sens").experiment_id],
                           filter_string="tags.`prunetune.kind` = 'sensitivity'")
    assert {a.path for a in c.list_artifacts(run.info.run_id, "sensitivity")} == \
        {"sensitivity/sensitivity.csv", "sensitivity/sensitivity.png"}
    bad = subprocess.run([sys.executable, "-m", "prunetune.cli", "sensitivity", "missing.yaml"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "missing.yaml" in bad.stderr
