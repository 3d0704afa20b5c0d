"""Knowledge distillation: the loss, a teacher from a checkpoint dir or an MLflow run id, and the
refusals (missing teacher, a teacher that trained on the student's test samples)."""

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from prunetune import spec
from prunetune.distill import kd_soft_loss
from prunetune.errors import UserError
from prunetune.trial import Trial, run_trial

from conftest import digits_raw


def test_soft_loss_is_t_squared_kl_of_the_softened_distributions():
    torch.manual_seed(0)
    s, t = torch.randn(5, 7), torch.randn(5, 7) * 3
    T = 4.0
    p_t, p_s = F.softmax(t / T, 1), F.softmax(s / T, 1)
    by_hand = T * T * (p_t * (p_t.log() - p_s.log())).sum(1).mean()
    torch.testing.assert_close(kd_soft_loss(s, t, T), by_hand)
    assert float(kd_soft_loss(t, t, T)) == pytest.approx(0.0, abs=1e-6)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    raw = digits_raw(schedule__sparsity=0.0, train__dense_epochs=3, train__finetune_epochs=0)
    result = run_trial(spec.load(None, raw=raw).trial_spec(), out)
    return out, result.metrics


def test_student_reports_distillation_loss_and_teacher_accuracy(tmp_path, teacher):
    teacher_dir, teacher_metrics = teacher
    reported = []
    loaded = spec.load(None, raw=digits_raw(model__arch="simple_cnn",
                                            distill__teacher=str(teacher_dir), distill__alpha=0.9))
    s = loaded.trial_spec()
    assert s.flat()["distill.teacher"] == str(teacher_dir)  # logged as a param
    result = Trial(s, lambda m, e: reported.append(m)).run(tmp_path)
    losses = [m["distill_loss"] for m in reported]
    assert len(losses) == len(reported) and all(math.isfinite(v) and v > 0 for v in losses)
    assert losses[-1] < losses[0]  # the student moves towards the teacher
    # the teacher was rebuilt from its config.yaml and weights: it scores what it scored
    assert result.metrics["teacher_test_acc"] == pytest.approx(teacher_metrics["test_acc"], abs=1e-9)


def test_alpha_zero_is_plain_training(tmp_path, teacher):
    """With alpha 0 the teacher only reports; the student's losses equal training without one."""
    plain = run_trial(spec.load(None, raw=digits_raw()).trial_spec(), tmp_path / "a").history
    mixed = run_trial(spec.load(None, raw=digits_raw(distill__teacher=str(teacher[0]), distill__alpha=0.0))
                      .trial_spec(), tmp_path / "b").history
    assert [h["train_loss"] for h in mixed] == pytest.approx([h["train_loss"] for h in plain], rel=1e-5)


def test_teacher_that_saw_the_students_test_samples_is_refused(teacher):
    with pytest.raises(UserError, match="test samples were in the teacher's training split"):
        Trial(spec.load(None, raw=digits_raw(distill__teacher=str(teacher[0]), data__split_seed=5)).trial_spec())
    # another seed (a replicate) trains on the same split: accepted
    Trial(spec.load(None, raw={**digits_raw(distill__teacher=str(teacher[0])), "seed": 5}).trial_spec())


def test_teacher_of_other_data_or_files_is_refused(tmp_path, teacher):
    with pytest.raises(UserError, match="lacks config.yaml"):
        Trial(spec.load(None, raw=digits_raw(distill__teacher=str(tmp_path))).trial_spec())
    with pytest.raises(UserError, match="at 8 px; the student's data is digits at 16 px"):
        Trial(spec.load(None, raw=digits_raw(data__image_size=16, distill__teacher=str(teacher[0]))).trial_spec())
    with pytest.raises(UserError, match="distill.alpha"):
        spec.load(None, raw=digits_raw(distill__teacher="x", distill__alpha=1.5))


def _cli(args, cwd):
    return subprocess.run([sys.executable, "-m", "prunetune.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def test_teacher_by_mlflow_run_id(tmp_path):
    spec_file = tmp_path / "kd.yaml"
    spec_file.write_text("name: kd\ndata: {dataset: digits, image_size: 8}\n"
                         "train: {batch_size: 128, lr: 0.05, dense_epochs: 1, finetune_epochs: 1}\n")
    r = _cli(["trial", str(spec_file)], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    teacher_id = r.stdout.split("run id: ")[1].split()[0]
    r = _cli(["trial", str(spec_file), "--set", "model.arch=simple_cnn", "--set", f"distill.teacher={teacher_id}"],
             tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    student_id = r.stdout.split("run id: ")[1].split()[0]
    from mlflow.tracking import MlflowClient
    c = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    run = c.get_run(student_id)
    assert run.data.params["distill.teacher"] == teacher_id
    assert run.data.params["distill.temperature"] == "4.0" and run.data.params["distill.alpha"] == "0.9"
    assert len(c.get_metric_history(student_id, "distill_loss")) == 2
    teacher_acc = c.get_run(teacher_id).data.metrics["test_acc"]
    assert run.data.metrics["teacher_test_acc"] == pytest.approx(teacher_acc)

    # a run id that is not in the store: exit 2, one line, no new run
    before = len(c.search_runs([c.get_experiment_by_name("kd").experiment_id]))
    r = _cli(["trial", str(spec_file), "--set", "distill.teacher=" + "0" * 32], tmp_path)
    assert r.returncode == 2 and "distill.teacher: no run 000" in r.stderr and "Traceback" not in r.stderr
    assert len(c.search_runs([c.get_experiment_by_name("kd").experiment_id])) == before
    json.dumps(run.data.metrics)  # plain numbers
