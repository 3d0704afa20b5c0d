"""One trial: the dense phase (cached and shared), the schedule's phases, final evaluation and
the artifacts. No ray, no mlflow: every reported epoch goes to a `report(metrics, epoch)` callable
and, as an `Epoch` event, to `on_epoch`, so `prunetune trial` and a Ray trainable run the same code.
The dense cache lives in `cache.py`, the files a trial leaves in `artifacts.py`.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from prunetune import artifacts, registry
from prunetune.cache import DenseCache
from prunetune.data import Dataset, load_dataset
from prunetune.data.device import DeviceData
from prunetune.errors import UserError
from prunetune.models import build_model, prunable_layers
from prunetune.modelstats import flops, param_counts, sparse_checkpoint_bytes
from prunetune.pruning import allocation, dynamic, schedules, structured
from prunetune.pruning.criteria.base import Context
from prunetune.pruning.criteria.samples import drawn_context
from prunetune.pruning.masks import Masks
from prunetune.reports import Epoch, TrialResult, epoch_reports
from prunetune.spec import Spec
from prunetune.train import Report, Trainer, classification_metrics, lr_shape, resolve_device


def _state_cpu(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _load_state(model: torch.nn.Module, path: Path) -> None:
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))


class Trial:
    """The pieces of one trial, built from a resolved spec (see `run_trial`)."""

    def __init__(self, spec: Spec, report: Report | None = None, teacher_dir: Path | None = None,
                 dataset: Dataset | None = None, rewind_epochs: Iterable[float] = (),
                 on_epoch: Callable[[Epoch], None] | None = None):
        """`report(metrics, epoch)` and `on_epoch(Epoch)` receive every reported epoch (either may
        be set later, as attributes). `teacher_dir`: the distillation teacher's checkpoint
        directory, when `distill.teacher` is a run id (resolved by the caller); by default
        `distill.teacher` itself. `dataset`: the spec's data already loaded (a sweep shares one
        copy per node), else it is loaded here. `rewind_epochs`: other rewind points (epochs) the
        trials sharing this dense phase may ask for; a dense phase trained here saves the
        fractional ones as it passes them."""
        self._start = time.perf_counter()
        self.spec = spec
        self.report = report or (lambda metrics, epoch: None)
        self.on_epoch = on_epoch
        self.rewind_epochs = tuple(rewind_epochs)
        self._muted = False  # a control's search for the ticket's mask reports nothing
        self._caching = False  # in a cached ticket round: no resume checkpoint (the cache keeps rounds)
        self._regrowth_state: dict | None = None  # rigl, set: a checkpoint's mask-update count
        torch.manual_seed(spec.seed)
        np.random.seed(spec.seed % 2**32)
        self.device = resolve_device(spec.train.device)
        self.dataset: Dataset = dataset if dataset is not None else load_dataset(spec.data)
        self.num_classes = len(self.dataset.classes)
        self._build()
        self.data = DeviceData(self.dataset, self.device, spec.data.augment,
                               imagenet_stats=bool(spec.model.weights))
        self.distiller = self._distiller(teacher_dir)
        self.trainer = self._trainer(self.model, self.masks, self._emit)
        # the model with its pruned structure made real (set by a criterion's final metrics)
        self.compact: torch.nn.Module | None = None
        self.phase_index, self.phase_start_clock = -1, 0.0  # -1: the dense phase
        self.resumed_from_epoch: int | None = None  # set when `run` continues a saved state
        self.dense_test_acc: float | None = None  # the dense phase's checkpoint on the test split
        self.test_predictions: tuple[np.ndarray, np.ndarray] | None = None  # final (logits, labels)

    def _build(self) -> None:
        """The model, its prunable layers, the layers the schedule prunes (as its criterion
        prunes them), the phases and the masks. Bad input fails here, before any training."""
        spec, size, channels = self.spec, self.spec.data.image_size, self.dataset.in_channels
        self.model = build_model(spec.model, self.num_classes, channels, size).to(self.device)
        self.layers = prunable_layers(self.model, channels, size)
        selected = schedules.select_layers(self.layers, spec.schedule.layers)
        if not selected:
            raise UserError(f"schedule.layers: {spec.schedule.layers!r} selects no prunable layer; "
                            f"the model's are: {', '.join(self.layers)}")
        self._freeze(spec.model.freeze)
        self.example = torch.zeros(1, channels, size, size, device=self.device)
        self.criterion = registry.criterion(spec.schedule.criterion)
        self.selected = self.criterion.layers(self.model, selected, spec.schedule)
        self.phases = self.plan()  # a schedule that does not fit train.budget_epochs fails here
        # the last layer is the classifier head: its outputs are the classes
        groups = self.criterion.groups(self.model, self.example, self.selected, self.layers[-1], spec.schedule)
        problem = allocation.check_globs(spec.schedule.layer_sparsity, self.selected)
        if problem:
            raise UserError(problem)
        self.masks = Masks(self.model, self.layers, groups, selected=self.selected,
                           allocation=allocation.Allocation.of(spec.schedule))

    def _distiller(self, teacher_dir: Path | None):
        if self.spec.distill is None:
            return None
        from prunetune.distill import Distiller

        directory = Path(teacher_dir or self.spec.distill.teacher).expanduser()
        if not directory.is_dir():
            raise UserError(f"distill.teacher: {self.spec.distill.teacher!r} is not a checkpoint directory "
                            "(an MLflow run id is resolved by `prunetune trial` and `prunetune sweep`)")
        return Distiller(directory, self.spec, self.dataset, self.data)

    # -- reporting -----------------------------------------------------------------------------
    @property
    def planned_epochs(self) -> float:
        """The epochs this trial trains in all: its dense phase and its schedule's phases."""
        return self.spec.train.dense_epochs + schedules.trained_epochs(self.phases)

    @property
    def phase_name(self) -> str:
        """The phase in progress: "dense", or the name of the schedule's phase."""
        return "dense" if self.phase_index < 0 else self.phases[self.phase_index].name

    def _emit(self, metrics: dict, epoch: int) -> None:
        """Report an epoch, trained or replayed: to `report`, and as an `Epoch` to `on_epoch`. A
        control's mask search reports nothing (its rounds are the ticket's training, not its own)."""
        if self._muted:
            return
        self.report(metrics, epoch)
        if self.on_epoch is not None:
            save = self.save_checkpoint if self.can_checkpoint else None
            self.on_epoch(Epoch(metrics, epoch, self.phase_name, self.resumed_from_epoch, self.planned_epochs, save))

    def criteria_context(self) -> Context:
        """What the criteria that score through the model use (`criteria.samples.drawn_context`)."""
        return drawn_context(self.model, self.example, self.data, self.spec, self.num_classes, self.device)

    def layer_targets(self) -> dict[str, float] | None:
        """Each selected layer's own final target (scopes layer and erk), or None (one threshold)."""
        alloc = self.masks.allocation
        if alloc.scope not in ("layer", "erk") or self.criterion.structured:
            return None
        return alloc.final_targets({n: tuple(self.masks.weights[n].shape) for n in self.selected})

    def prune(self, target: float, layers: list[str], scope: str, generator: torch.Generator,
              shuffle: bool = False, criterion: str | None = None) -> None:
        """Prune by the schedule's criterion (or `criterion`); with `shuffle`, then permute each layer's
        mask (the control of Frankle et al. 2021: same per-layer density, random places), its survivors
        starting from the values their places had before this prune, not from the zeros it left."""
        before = {n: self.masks.weights[n].detach().clone() for n in layers} if shuffle else {}
        chosen = registry.criterion(criterion) if criterion else self.criterion
        self.masks.prune(target, chosen, layers, scope, generator, self.criteria_context())
        if shuffle:
            self.masks.shuffle(layers, generator)
            with torch.no_grad():
                for n, values in before.items():
                    self.masks.weights[n].copy_(values * self.masks.masks[n])

    def _trainer(self, model: torch.nn.Module, masks: Masks, report: Report) -> Trainer:
        """A Trainer of `model` with this trial's recipe (and group-lasso penalty, and teacher)."""
        penalty = None
        if masks.groups and self.spec.train.group_lasso > 0:
            lasso, lam = structured.GroupLasso(masks.groups, model), self.spec.train.group_lasso
            penalty = lambda: lam * lasso()  # noqa: E731
        return Trainer(model, self.data, self.spec.train, masks, report, self.spec.seed, penalty=penalty,
                       distiller=self.distiller)

    def _freeze(self, prefixes: list[str]) -> None:
        for prefix in prefixes:
            params = [p for n, p in self.model.named_parameters() if n == prefix or n.startswith(prefix + ".")]
            if not params:
                raise UserError(f"model.freeze: {prefix!r} names no module of {self.spec.model.arch}")
            for p in params:
                p.requires_grad_(False)

    # -- the dense phase -----------------------------------------------------------------------
    def dense_phase(self, cache: DenseCache, replay: bool = True) -> Path:
        """Train (or fetch) the dense phase; leave its final weights in the model. The cache entry
        holds the weights after every epoch (epoch_0.pt = initialisation) for lottery rewinding,
        and the epoch metrics, which are replayed so every trial's curves start at epoch 0."""
        train = self.spec.train

        def run(folder: Path) -> None:
            torch.save(_state_cpu(self.model), folder / "epoch_0.pt")
            self._train_dense(folder)
            (folder / "history.json").write_text(json.dumps(self.trainer.history))
            # the unpruned reference, evaluated once per dense phase and shared like it
            (folder / "dense.json").write_text(json.dumps({"test_acc": self.trainer.evaluate("test")["acc"]}))

        entry, hit = cache.get(self.spec.dense_hash(), run)
        if hit and replay:
            self.trainer.skip_to(train.dense_epochs, json.loads((entry / "history.json").read_text()))
            self._replay(self.trainer.history)
        _load_state(self.model, entry / f"epoch_{train.dense_epochs}.pt")
        self.trainer.reset_optimizer()  # training after the dense phase starts a fresh optimiser
        if (entry / "dense.json").is_file():
            self.dense_test_acc = json.loads((entry / "dense.json").read_text())["test_acc"]
        else:  # an entry from before dense.json was kept
            self.dense_test_acc = self.trainer.evaluate("test")["acc"]
        return entry

    def _train_dense(self, folder: Path) -> None:
        """The dense phase, saving the weights after every epoch and at the fractional rewind
        points trials may ask for (`step_<k>.pt`): a saved point is exact on any device, where a
        replay is exact only with deterministic kernels (a CPU's; not CUDA's by default)."""
        spe, epochs = self.trainer.steps_per_epoch, self.spec.train.dense_epochs
        points = {round(e * spe) for e in (self.spec.schedule.rewind_epoch, *self.rewind_epochs)}
        stops = sorted(k for k in points if 0 < k < epochs * spe and k % spe)
        # the lr of the dense schedule at the absolute step, so stopping on the way changes nothing
        lr_at = lambda t: self._dense_lr(self.trainer.global_step / spe)  # noqa: E731
        save_epoch = lambda e: torch.save(_state_cpu(self.model), folder / f"epoch_{e}.pt")  # noqa: E731
        for k in stops:
            self.trainer.run(k / spe - self.trainer.clock, lr_at, on_epoch_end=save_epoch)
            torch.save(_state_cpu(self.model), folder / f"step_{k}.pt")
        self.trainer.run(epochs - self.trainer.clock, lr_at, on_epoch_end=save_epoch)

    def _dense_lr(self, t: float) -> float:
        train = self.spec.train
        return train.lr * lr_shape(train.lr_schedule, t, train.dense_epochs)

    def _final_dense_lr(self) -> float:
        """The dense schedule's learning rate at its last optimiser step (Renda et al.'s
        fine-tuning rate)."""
        spe = self.trainer.steps_per_epoch
        return self._dense_lr(max(0, self.spec.train.dense_epochs * spe - 1) / spe)

    def rewind_state(self, entry: Path) -> dict[str, torch.Tensor]:
        """The dense phase's weights at `schedule.rewind_epoch`, counted in optimiser steps: a
        saved epoch, or (a fractional epoch) the dense phase replayed from its initialisation for
        that many steps; every step's batch, augmentation and dropout are seeded by (seed, step),
        so the replay retraces it. The replayed state is kept in the entry for other trials."""
        spe = self.trainer.steps_per_epoch
        step = round(self.spec.schedule.rewind_epoch * spe)
        if step % spe == 0:
            return torch.load(entry / f"epoch_{step // spe}.pt", map_location="cpu", weights_only=True)
        path = entry / f"step_{step}.pt"
        if path.is_file():
            return torch.load(path, map_location="cpu", weights_only=True)
        if self.device.type == "cuda":  # CUDA's default kernels are not deterministic
            logging.getLogger(__name__).warning(
                "rewind_epoch %g was not saved by the dense phase: replaying it on CUDA, which is close "
                "to the original but not bit-exact", self.spec.schedule.rewind_epoch)
        state = self.replay_dense(entry, step)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
        torch.save(state, tmp)
        os.replace(tmp, path)
        return state

    def replay_dense(self, entry: Path, step: int) -> dict[str, torch.Tensor]:
        """The dense phase's weights after `step` optimiser steps, retrained from its
        initialisation (`epoch_0.pt`) on a copy of the model."""
        model = copy.deepcopy(self.model)
        _load_state(model, entry / "epoch_0.pt")
        trainer = self._trainer(model, Masks(model, self.layers, self.masks.groups), lambda m, e: None)
        trainer.run(step / trainer.steps_per_epoch, self._dense_lr)
        return _state_cpu(model)

    def reinitialise(self, index: int) -> None:
        """A fresh random initialisation of every trained weight (survivors stay masked): the
        control of the lottery-ticket papers. Frozen modules keep their weights."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.spec.seed * 7919 + 104_729 + index)  # not the original draw
            fresh = build_model(self.spec.model.model_copy(update={"weights": None}), self.num_classes,
                                self.dataset.in_channels, self.spec.data.image_size)
        frozen = {n for n, p in self.model.named_parameters() if not p.requires_grad}
        state = {k: v for k, v in fresh.state_dict().items() if k not in frozen}
        self.model.load_state_dict(state, strict=False)
        self.masks.apply()

    # -- the schedule --------------------------------------------------------------------------
    def plan(self) -> list[schedules.Phase]:
        """The phases after the dense phase."""
        try:
            modules = dict(self.model.named_modules())
            sizes = {n: modules[n].weight.numel() for n in self.selected}
            return schedules.plan(self.spec.schedule, self.spec.train, sizes)
        except schedules.BudgetError as exc:  # train.budget_epochs below the selected layers' steps
            raise UserError(str(exc)) from None

    def run_phase(self, index: int, phase: schedules.Phase, dense_entry: Path, resumed: bool = False) -> None:
        """Carry out one phase; `resumed`: its start (prune, rewind) was done before a checkpoint."""
        train, t = self.spec.train, self.trainer
        self.phase_index, self.phase_start_clock = index, t.clock
        if not resumed:
            self._start_phase(index, phase, dense_entry)
        t.regrowth = dynamic.for_phase(self.spec, self.masks, self.selected, t.steps_per_epoch,
                                       self.phase_start_clock, phase.epochs, self._regrowth_state)
        if t.optimizer is None:
            t.new_optimizer(phase.lr_factor)
        if phase.final_lr:
            final = self._final_dense_lr() * phase.lr_factor
            t.run(phase.epochs, lambda e: final)
        else:
            t.run(phase.epochs, lambda e: train.lr * phase.lr_factor
                  * lr_shape(train.lr_schedule, phase.lr_offset + e, phase.lr_horizon))

    def _start_phase(self, index: int, phase: schedules.Phase, dense_entry: Path) -> None:
        t = self.trainer
        if phase.prune is not None:
            gen = torch.Generator().manual_seed(self.spec.seed * 7919 + index)
            self.prune(phase.prune.target, phase.prune.layers or self.selected, phase.prune.scope, gen,
                       shuffle=phase.shuffle, criterion=phase.prune.criterion)
            if t.optimizer is not None:
                self.masks.mask_optimizer_state(t.optimizer)
        if phase.rewind:
            self.model.load_state_dict(self.rewind_state(dense_entry))
            self.masks.apply()
        if phase.reinit:
            self.reinitialise(index)
        if phase.release_masks:
            self.masks.release()
        if phase.rewind or phase.reinit or phase.release_masks or phase.restart or phase.lr_factor != 1.0:
            t.reset_optimizer()  # a fresh optimiser (and its lr factor) from here

    # -- the end -------------------------------------------------------------------------------
    def final_metrics(self) -> dict:
        logits, labels = self.trainer.predict("test")
        m = classification_metrics(logits, labels, self.num_classes)
        if self.data.size("val"):
            m["val_acc"] = self.trainer.evaluate("val")["acc"]
        m["sparsity"] = self.masks.sparsity()  # over the selected layers: the target's denominator
        m["model_sparsity"] = self.masks.model_sparsity()
        m["dense_test_acc"] = self.dense_test_acc
        m["test_acc_drop"] = self.dense_test_acc - m["test_acc"]
        m.update(param_counts(self.model))
        m.update(flops(self.model, self.example, self.layers))
        m["checkpoint_bytes"] = sparse_checkpoint_bytes(self.model.state_dict())
        m["train_epochs_total"] = self.trainer.global_step / self.trainer.steps_per_epoch
        self.test_predictions = logits, labels  # for the confusion matrix (artifacts.write)
        if self.distiller is not None:
            from prunetune.distill import teacher_accuracy

            m["teacher_test_acc"] = teacher_accuracy(self.distiller, self.data, 2 * self.trainer.batch_size)
        m.update(self.criterion.final_metrics(self))  # channel_sparsity, nm_valid, what `remove` measures
        if self.trainer.regrowth is not None:
            m["mask_updates"] = self.trainer.regrowth.updates
        return m

    def run(self, out_dir: str | Path, cache: DenseCache | None = None,
            resume_from: Path | None = None) -> TrialResult:
        """Dense phase, schedule, final metrics and artifacts (see `run_trial`). With
        `resume_from` (a file written by `save_checkpoint`), continue where it was taken."""
        out_dir, cache = Path(out_dir), cache or DenseCache()
        entry = self.dense_phase(cache, replay=resume_from is None)
        first = 0
        if resume_from:
            first = self.load_checkpoint(resume_from)
            self.resumed_from_epoch = self.trainer.epoch
            self._replay(self.trainer.history)  # reports the process that saved it may not have delivered
        phases = self.phases
        if first == 0:
            self.search_ticket_mask(phases, entry, cache)
        for index, phase in enumerate(phases):
            if index < first or phase.mask_search:
                continue
            if phase.ticket:
                self.ticket_round(index, phases, entry, cache)
            else:
                self.run_phase(index, phase, entry, resumed=resume_from is not None and index == first)
        self.trainer.end_epoch()  # report a last, partial epoch if there is one
        metrics = self.final_metrics()
        metrics["trial_seconds"] = time.perf_counter() - self._start
        artifacts.write(self, out_dir, metrics)
        return TrialResult(metrics, out_dir, self.trainer.history)

    def search_ticket_mask(self, phases: list[schedules.Phase], dense_entry: Path, cache: DenseCache) -> None:
        """A control's mask search: the ticket's rounds before its last (`mask_search`, always
        the plan's first phases), from the cache or trained and cached here. The model and masks
        are left as that round left them; the training (steps, history, reports) is not this
        trial's, so the trainer stands where it stood before."""
        search = [i for i, p in enumerate(phases) if p.mask_search]
        if not search:
            return
        before, self._muted = self.trainer.progress(), True
        try:
            for index in search:
                self.ticket_round(index, phases, dense_entry, cache)
        finally:
            self._muted = False
        self.trainer.restore_progress(before)

    def ticket_round(self, index: int, phases: list[schedules.Phase], dense_entry: Path, cache: DenseCache) -> None:
        """A round of the ticket (weight rewinding), cached like the dense phase and keyed by its
        targets so far: the ticket's trial and its controls train each round once between them.
        A hit loads the weights, masks and training progress and reports the round's epochs."""
        key = self.spec.ticket_hash([p.prune.target for p in phases[:index + 1]])

        def run(folder: Path) -> None:
            self.run_phase(index, phases[index], dense_entry)
            torch.save(_state_cpu(self.model), folder / "model.pt")
            torch.save(self.masks.state_dict(), folder / "masks.pt")
            torch.save(self.trainer.progress(), folder / "progress.pt")

        self._caching = True
        try:
            folder, hit = cache.get(key, run)
        finally:
            self._caching = False
        self.phase_index = index
        if hit:
            reported = len(self.trainer.history)
            _load_state(self.model, folder / "model.pt")
            self.masks.load_state_dict(torch.load(folder / "masks.pt", map_location="cpu", weights_only=True))
            self.trainer.restore_progress(torch.load(folder / "progress.pt", weights_only=True))
            self._replay(self.trainer.history[reported:])

    def _replay(self, rows: list[dict]) -> None:
        """Report epochs of the history again (receivers skip what they already hold)."""
        for metrics, epoch in epoch_reports(rows):
            self._emit(metrics, epoch)

    # -- checkpoints (resume) -----------------------------------------------------------------
    @property
    def can_checkpoint(self) -> bool:
        """Checkpoints are taken after the dense phase, outside the ticket's rounds (the cache
        keeps those as it keeps the dense phase)."""
        return self.phase_index >= 0 and not self._caching and not self._muted

    def save_checkpoint(self, path: Path) -> None:
        """The trial's state at an epoch boundary, loadable with weights_only=True."""
        regrowth = self.trainer.regrowth
        torch.save({"model": _state_cpu(self.model), "masks": self.masks.state_dict(), **self.trainer.state_dict(),
                    "phase_index": self.phase_index, "phase_start_clock": self.phase_start_clock,
                    "regrowth": regrowth.state_dict() if regrowth is not None else None}, path)

    def load_checkpoint(self, path: Path) -> int:
        """Restore a state from `save_checkpoint`; returns the phase to continue."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.model.load_state_dict(state["model"])
        self.masks.load_state_dict({k: v.to(self.device) for k, v in state["masks"].items()})
        self.trainer.load_state_dict(state, clock=state["phase_start_clock"])
        self.phase_start_clock = state["phase_start_clock"]
        self.phase_index = state["phase_index"]
        self._regrowth_state = state.get("regrowth")  # rigl, set: the update count (run_phase)
        return self.phase_index


def run_trial(spec: Spec, out_dir: str | Path, report: Report | None = None,
              cache: DenseCache | None = None) -> TrialResult:
    """Run one trial of a resolved spec; write its artifacts under `out_dir`.

    `report(metrics, epoch)` receives the per-epoch metrics (train_loss, train_acc, val_loss,
    val_acc, sparsity, lr, epoch_seconds). Returns the final metrics (`metrics.final_metrics()`).
    Bad input (data, layers, weights) raises UserError before any training.
    """
    return Trial(spec, report).run(out_dir, cache)
