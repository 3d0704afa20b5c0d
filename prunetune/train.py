"""The training loop, evaluation and per-epoch reporting. No ray, no mlflow: metrics go to a
`report(metrics, epoch)` callable.

Time is counted in optimiser steps, so a phase may last a fraction of an epoch; an "epoch" is a
pass over the training split, and its metrics are reported when the global step count crosses an
epoch boundary (MLflow step = epoch index across all phases).
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from prunetune.errors import UserError

Report = Callable[[dict, int], None]


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite in epoch `epoch`: the trial fails with this error."""

    def __init__(self, message: str, epoch: int):
        super().__init__(message)
        self.epoch = epoch

    def __reduce__(self):  # pickled whole (a Ray worker's error travels pickled)
        return NonFiniteLoss, (str(self), self.epoch)


def lr_shape(kind: str, t: float, horizon: float) -> float:
    """The learning-rate multiplier at epoch `t` of a `horizon`-epoch schedule."""
    if horizon <= 0 or kind == "constant":
        return 1.0
    frac = min(max(t / horizon, 0.0), 1.0)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * frac))
    if kind == "step":  # ×0.1 at 50% and at 75% of the schedule
        return 0.1 ** ((frac >= 0.5) + (frac >= 0.75))
    raise ValueError(kind)


def step_seed(seed: int, step: int) -> int:
    """The random seed of optimiser step `step` of a trial seeded `seed`."""
    return int(np.random.SeedSequence([seed, step, 1]).generate_state(1)[0])


def make_optimizer(params, train_spec, lr_factor: float = 1.0) -> torch.optim.Optimizer:
    lr = train_spec.lr * lr_factor
    if train_spec.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=train_spec.momentum, weight_decay=train_spec.weight_decay)
    cls = torch.optim.Adam if train_spec.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=lr, weight_decay=train_spec.weight_decay)


class Trainer:
    """Trains `model` on `data` (a DeviceData) while keeping `masks` applied."""

    def __init__(self, model: nn.Module, data, train_spec, masks, report: Report, seed: int,
                 penalty: Callable[[], torch.Tensor] | None = None,
                 distiller=None):
        self.model, self.data, self.spec, self.masks, self.report = model, data, train_spec, masks, report
        self.device = data.device
        self.batch_size = min(train_spec.batch_size, data.size("train"))
        self.steps_per_epoch = max(1, data.size("train") // self.batch_size)  # drop the last partial batch
        self.global_step = 0
        self.clock = 0.0  # epochs asked for so far; phases end at round(clock · steps_per_epoch)
        self.seed = seed
        self.history: list[dict] = []
        self.optimizer: torch.optim.Optimizer | None = None
        counts = torch.bincount(data.y["train"].cpu(), minlength=data.num_classes).double()  # a CPU sampler's
        # inverse class frequency, normalised so a balanced set has every weight 1
        inverse = torch.where(counts > 0, counts.sum() / (len(counts) * counts.clamp_min(1)), 0.0)
        balance = train_spec.class_balance
        self.loss_fn = (functools.partial(F.cross_entropy, weight=inverse.float().to(self.device))
                        if balance == "weighted_loss" else F.cross_entropy)
        self._sample_weights = inverse[data.y["train"].cpu()] if balance == "balanced_sampler" else None
        self.penalty = penalty  # added to the loss that is minimised (not to the reported loss)
        self.distiller = distiller  # knowledge distillation: the loss mixes in the teacher's soft targets
        self.regrowth = None  # rigl, set: a `dynamic.Regrowth` moving the masks every few steps
        self._on_epoch_end: Callable[[int], None] | None = None
        self._perm, self._perm_epoch = None, -1
        self._use_amp = train_spec.amp and self.device.type == "cuda"
        self._amp_dtype = torch.bfloat16 if self._use_amp and torch.cuda.is_bf16_supported() else torch.float16
        self._scaler = torch.amp.GradScaler("cuda", enabled=self._use_amp and self._amp_dtype == torch.float16)
        # CUDA only (ignored on a CPU): channels-last parameters and inputs (the parameters stay the
        # same objects, so masks and the optimiser still hold them), and a compiled training forward:
        # a wrapper, so `self.model` and its state_dict keys stay as they were (no `_orig_mod.`)
        cuda = self.device.type == "cuda"
        self._channels_last = train_spec.channels_last and cuda
        if self._channels_last:
            model.to(memory_format=torch.channels_last)
        self._forward = torch.compile(model) if train_spec.compile and cuda else model
        self._reset_epoch_stats()

    # -- helpers -------------------------------------------------------------------------------
    def _reset_epoch_stats(self) -> None:
        self._loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        self._distill_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        self._correct = torch.zeros((), device=self.device, dtype=torch.int64)
        self._nonfinite = torch.zeros((), device=self.device, dtype=torch.bool)
        self._seen = 0
        self._steps_in_epoch = 0
        self._epoch_start = time.perf_counter()

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self._channels_last else x

    def autocast(self):
        if self._use_amp:
            return torch.autocast("cuda", dtype=self._amp_dtype)
        return contextlib.nullcontext()

    def new_optimizer(self, lr_factor: float = 1.0) -> None:
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(params, self.spec, lr_factor)

    def reset_optimizer(self) -> None:
        """Training from here starts a fresh optimiser (no momentum carried over)."""
        self.optimizer = None

    def skip_to(self, epochs: int, history: list[dict]) -> None:
        """Stand at the end of `epochs` already trained elsewhere (a cached dense phase), with
        their `history` (one dict per epoch)."""
        self.history.extend(history)
        self.global_step = epochs * self.steps_per_epoch
        self.clock = float(epochs)

    def state_dict(self) -> dict:
        """Where training stands: the optimiser's state, the step and the history."""
        return {"optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
                "global_step": self.global_step, "history": list(self.history)}

    def load_state_dict(self, state: dict, clock: float) -> None:
        """Continue from `state_dict()`; `clock`: the start of the phase in progress (epochs)."""
        self.optimizer = None
        if state["optimizer"] is not None:
            self.new_optimizer()
            self.optimizer.load_state_dict(state["optimizer"])
        self.global_step, self.history, self.clock = state["global_step"], list(state["history"]), clock

    def progress(self) -> dict:
        """Where training stands, in plain types (a `weights_only` load reads it): the step, the
        clock, the history and the epoch in progress (a phase may end mid-epoch)."""
        return {"global_step": self.global_step, "clock": self.clock, "history": list(self.history),
                "loss_sum": float(self._loss_sum), "distill_sum": float(self._distill_sum),
                "correct": int(self._correct), "seen": self._seen, "steps_in_epoch": self._steps_in_epoch,
                "lr": getattr(self, "_lr", 0.0)}

    def restore_progress(self, state: dict) -> None:
        """Stand where `progress()` was taken, with no optimiser (the next phase starts one)."""
        self.optimizer = None
        self.global_step, self.clock, self.history = state["global_step"], state["clock"], list(state["history"])
        self._reset_epoch_stats()
        self._loss_sum.fill_(state["loss_sum"])
        self._distill_sum.fill_(state["distill_sum"])
        self._correct.fill_(state["correct"])
        self._seen, self._steps_in_epoch, self._lr = state["seen"], state["steps_in_epoch"], state["lr"]

    @property
    def epoch(self) -> int:
        """Index of the epoch in progress (across all phases)."""
        return self.global_step // self.steps_per_epoch

    def _batch_index(self, step: int) -> torch.Tensor:
        # The permutation of an epoch depends only on (seed, epoch): a resumed run replays it.
        epoch, pos = divmod(step, self.steps_per_epoch)
        if self._perm_epoch != epoch:  # one permutation per epoch, not per step
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            n = self.data.size("train")
            if self._sample_weights is None:
                self._perm = torch.randperm(n, generator=g).to(self.device)
            else:  # every class equally likely
                self._perm = torch.multinomial(self._sample_weights, n, replacement=True, generator=g).to(self.device)
            self._perm_epoch = epoch
        return self._perm[pos * self.batch_size:(pos + 1) * self.batch_size]

    # -- training ------------------------------------------------------------------------------
    def run(self, epochs: float, lr_at: Callable[[float], float],
            on_epoch_end: Callable[[int], None] | None = None) -> None:
        """Train for `epochs` (fractional allowed); `lr_at(t)` is the lr at epoch t of this run;
        `on_epoch_end(e)` is called after each whole epoch e (1-based, across phases) ends.

        Phase ends are rounded on the cumulative clock, so rounding errors do not add up."""
        self._on_epoch_end = on_epoch_end
        try:
            self._run(epochs, lr_at)
        finally:
            self._on_epoch_end = None

    def _run(self, epochs: float, lr_at: Callable[[float], float]) -> None:
        phase_start = round(self.clock * self.steps_per_epoch)
        self.clock += epochs
        end = round(self.clock * self.steps_per_epoch)
        if end > self.global_step and self.optimizer is None:
            self.new_optimizer()
        self.model.train()
        # from global_step, not phase_start: a run resumed from a checkpoint continues mid-phase
        while self.global_step < end:
            lr = lr_at((self.global_step - phase_start) / self.steps_per_epoch)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            # Every step's randomness (augmentation, dropout) depends only on (seed, step), as the
            # batch order does: a resumed trial, or a replayed dense phase, retraces it.
            self._seed_step()
            x, y = self.data.train_batch(self._batch_index(self.global_step))
            x = self._input(x)
            with self.autocast():
                logits = self._forward(x)
                loss = self.loss_fn(logits, y)
                if self.distiller is not None:
                    soft = self.distiller.soft_loss(logits, x)
                    loss = self.distiller.alpha * soft + (1 - self.distiller.alpha) * loss
                    self._distill_sum += soft.detach().double() * len(y)
            self._nonfinite |= ~torch.isfinite(loss.detach())  # read once an epoch: no sync per step
            self.optimizer.zero_grad(set_to_none=True)
            objective = loss if self.penalty is None else loss + self.penalty()
            self._scaler.scale(objective).backward()
            regrow = self.regrowth is not None and self.regrowth.due(self.global_step + 1)
            if regrow:
                self.regrowth.capture()  # RigL's dense gradient, before the masks zero it
            self.masks.mask_grads()
            self._scaler.step(self.optimizer)
            self._scaler.update()
            self.masks.apply()  # the guarantee: pruned weights are exactly zero after every step
            if regrow:
                self.regrowth.update(self.global_step + 1, self.optimizer)
            self._loss_sum += loss.detach().double() * len(y)
            self._correct += (logits.detach().argmax(1) == y).sum()
            self._seen += len(y)
            self._steps_in_epoch += 1
            self.global_step += 1
            self._lr = lr
            if self.global_step % self.steps_per_epoch == 0:
                self.end_epoch()
                self.model.train()
        self._check_finite()  # before whatever follows the phase (pruning, rewinding) reads the weights

    def _seed_step(self) -> None:
        """Seed this step's randomness (augmentation, dropout) from (seed, step). Only the
        generators the step uses: `torch.manual_seed` also seeds every other backend, about 0.2 ms
        a call, as long as a small model's whole step on a GPU."""
        seed = step_seed(self.seed, self.global_step)
        torch.default_generator.manual_seed(seed)
        if self.device.type == "cuda":
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            torch.cuda.default_generators[index].manual_seed(seed)

    def _check_finite(self) -> None:
        if bool(self._nonfinite):
            self._nonfinite.zero_()
            epoch = max(0, self.global_step - 1) // self.steps_per_epoch  # the last step's
            raise NonFiniteLoss(f"non-finite training loss in epoch {epoch} (by step {self.global_step})", epoch)

    def end_epoch(self) -> None:
        """Report the epoch in progress (also a partial one at the end of training)."""
        if self._steps_in_epoch == 0:
            return
        self._check_finite()  # a diverged epoch is neither reported nor saved
        epoch = (self.global_step - 1) // self.steps_per_epoch
        metrics = {"train_loss": float(self._loss_sum) / self._seen, "train_acc": int(self._correct) / self._seen}
        if self.distiller is not None:  # the soft (teacher) part of train_loss, before the alpha mix
            metrics["distill_loss"] = float(self._distill_sum) / self._seen
        if self.data.size("val"):
            val = self.evaluate("val")
            metrics.update(val_loss=val["loss"], val_acc=val["acc"])
        metrics.update(sparsity=self.masks.sparsity(), lr=self._lr,
                       epoch_seconds=time.perf_counter() - self._epoch_start)
        if self.regrowth is not None:
            metrics.update(self.regrowth.epoch_metrics())
        self.history.append({"epoch": epoch, **metrics})
        self.report(metrics, epoch)
        if self._on_epoch_end is not None and self.global_step % self.steps_per_epoch == 0:
            self._on_epoch_end(epoch + 1)
        self._reset_epoch_stats()

    # -- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Logits (float32) and labels of a split."""
        was_training = self.model.training
        self.model.eval()
        logits, labels = [], []
        for x, y in self.data.eval_batches(split, 2 * self.batch_size):
            with self.autocast():
                logits.append(self.model(self._input(x)).float())
            labels.append(y)
        self.model.train(was_training)
        return torch.cat(logits).cpu().numpy(), torch.cat(labels).cpu().numpy()

    def evaluate(self, split: str) -> dict:
        logits, labels = self.predict(split)
        return {"loss": cross_entropy_np(logits, labels), "acc": float((logits.argmax(1) == labels).mean())}


def cross_entropy_np(logits: np.ndarray, labels: np.ndarray) -> float:
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(labels)), labels].mean())


def classification_metrics(logits: np.ndarray, labels: np.ndarray, num_classes: int, prefix: str = "test_") -> dict:
    """Accuracy, top-5 (≥ 5 classes), loss, balanced accuracy, macro F1 and per-class recall."""
    pred = logits.argmax(1)
    out = {f"{prefix}acc": float((pred == labels).mean()), f"{prefix}loss": cross_entropy_np(logits, labels)}
    if num_classes >= 5:
        top5 = np.argsort(-logits, axis=1)[:, :5]
        out[f"{prefix}top5"] = float((top5 == labels[:, None]).any(axis=1).mean())
    # As scikit-learn: balanced accuracy averages recall over the classes present in `labels`;
    # macro F1 averages over the classes present in `labels` or predictions (0 where undefined).
    recalls, f1s = [], []
    for c in range(num_classes):
        tp = int(((pred == c) & (labels == c)).sum())
        support, predicted = int((labels == c).sum()), int((pred == c).sum())
        recall = tp / support if support else 0.0
        precision = tp / predicted if predicted else 0.0
        if support:
            recalls.append(recall)
            out[f"{prefix}recall_class{c}"] = recall
        if support or predicted:
            f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    out[f"{prefix}balanced_acc"] = float(np.mean(recalls)) if recalls else 0.0
    out[f"{prefix}macro_f1"] = float(np.mean(f1s)) if f1s else 0.0
    return out


def resolve_device(device: str) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device: cuda was asked for, but this machine has no CUDA device; use auto or cpu")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
