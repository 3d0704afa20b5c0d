"""Knowledge distillation (Hinton et al., 2015): `model.arch` learns from a trained teacher.

The loss is alpha · T² · KL(softmax(teacher/T) ‖ softmax(student/T)) + (1 − alpha) · the usual
cross-entropy. The teacher is a trial's checkpoint directory (what a run logs: `config.yaml`,
`checkpoint/model.pt`, `data/split.csv`); its architecture comes from its `config.yaml`. A run id
is turned into such a directory at the edge (`teachers.teacher_dir`): no MLflow here.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from prunetune.data.device import normalisation
from prunetune.errors import UserError
from prunetune.models import build_model

TEACHER_FILES = ("config.yaml", "checkpoint/model.pt", "data/split.csv")


def teacher_spec(directory: Path):
    from prunetune.spec import Spec

    missing = [f for f in TEACHER_FILES if not (directory / f).is_file()]
    if missing:
        raise UserError(f"distill.teacher: {directory} lacks {', '.join(missing)} "
                        "(a teacher is a trial's artifact directory or its MLflow run id)")
    try:
        return Spec.model_validate(yaml.safe_load((directory / "config.yaml").read_text()))
    except Exception as exc:  # noqa: BLE001 - the user's file
        raise UserError(f"distill.teacher: {directory / 'config.yaml'} is not a prunetune trial config "
                        f"({type(exc).__name__})") from None


class Distiller:
    """The teacher (frozen, eval mode) and the soft part of the loss."""

    def __init__(self, directory: str | Path, student, dataset, data):
        directory = Path(directory).expanduser()
        spec = teacher_spec(directory)
        if (spec.data.dataset, spec.data.image_size) != (student.data.dataset, student.data.image_size):
            raise UserError(f"distill.teacher: the teacher was trained on {spec.data.dataset} at "
                            f"{spec.data.image_size} px; the student's data is {student.data.dataset} at "
                            f"{student.data.image_size} px")
        self._check_no_test_leak(directory, dataset)
        self.model = build_model(spec.model.model_copy(update={"weights": None}), len(dataset.classes),
                                 dataset.in_channels, spec.data.image_size)
        try:
            self.model.load_state_dict(torch.load(directory / "checkpoint" / "model.pt", map_location="cpu",
                                                  weights_only=True))
        except RuntimeError as exc:
            raise UserError(f"distill.teacher: {directory / 'checkpoint/model.pt'} does not fit a "
                            f"{spec.model.arch} for {len(dataset.classes)} classes ({str(exc)[:200]})") from None
        self.model.to(data.device).eval().requires_grad_(False)
        self.temperature, self.alpha = student.distill.temperature, student.distill.alpha
        self.data = data
        # The student's batches are normalised with the student's statistics; give the teacher
        # its own (ImageNet statistics when it started from ImageNet weights).
        if bool(spec.model.weights) != bool(student.model.weights):
            self._teacher_stats = normalisation(dataset.images, bool(spec.model.weights), data.device,
                                                index=np.flatnonzero(dataset.split == "train"))
        else:
            self._teacher_stats = None

    @staticmethod
    def _check_no_test_leak(directory: Path, dataset) -> None:
        """The student's test samples must not be among the teacher's training samples."""
        with open(directory / "data" / "split.csv", newline="") as f:
            teacher_train = {row[dataset.id_name] for row in csv.DictReader(f) if row.get("split") == "train"}
        leaked = sum(str(i) in teacher_train for i, s in zip(dataset.ids, dataset.split) if s == "test")
        if leaked:
            raise UserError(f"distill.teacher: {leaked} of the student's test samples were in the teacher's "
                            "training split; train the teacher with the same data.split_seed and data fractions "
                            "(or use data with a published test split)")

    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        if self._teacher_stats is not None:
            (ms, ss), (mt, st) = (self.data.mean, self.data.std), self._teacher_stats
            x = (x * ss + ms - mt) / st
        with torch.no_grad():
            return self.model(x)

    def soft_loss(self, student_logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """T² · KL(teacher ‖ student) at temperature T, averaged over the batch."""
        return kd_soft_loss(student_logits, self.teacher_logits(x), self.temperature)


def kd_soft_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's soft-target loss: T² keeps its gradients on the scale of the hard loss's."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits.float() / t, dim=1), F.log_softmax(teacher_logits.float() / t, dim=1),
                    reduction="batchmean", log_target=True) * t * t


def teacher_accuracy(distiller: Distiller, data, batch_size: int) -> float:
    correct = total = 0
    for x, y in data.eval_batches("test", batch_size):
        correct += int((distiller.teacher_logits(x).argmax(1) == y).sum())
        total += len(y)
    return correct / total if total else 0.0
