"""What every criterion is (`Criterion`) and what those that score through the model are given
(`Context`). Torch-free: the spec reads the rules of every criterion without importing torch."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable

if TYPE_CHECKING:
    import torch
    from torch import nn

Batches = Callable[[], Iterable[tuple["torch.Tensor", "torch.Tensor"]]]


@dataclass
class Context:
    """What criteria that score through the model use: the model, an example input (its shape
    is synflow's all-ones input), training batches (snip), and keys of the schedule."""

    model: nn.Module
    example: torch.Tensor
    batches: Batches = field(default=lambda: iter(()))
    synflow_iters: int = 100
    n_m: tuple[int, int] | None = (2, 4)  # the N:M pattern (`nm.pattern`); None: unstructured
    # grasp: `samples_per_class` training images of each class, in class order, as two batches
    # (its authors' sample); None: `batches`
    balanced: Batches | None = None
    # wanda, sparsegpt: `schedule.calibration_samples` training images; None: `batches`
    calibration: Batches | None = None


class Criterion:
    """A pruning criterion: its rules, which need no torch, and its torch side.

    Rules: `check` (what it refuses in a schedule), `acts_on` (which `registry.CRITERION_KEYS` do
    something with it), `reads` (the other keys only some criteria read: a trial's run logs them
    where its criterion reads them), `dense_key` (its part of the dense phase's hash), `reports` (the final
    metrics only some criteria report, named in `metrics`: name → what a spec needs for every
    trial to report it), `needs` (what scoring takes: "weights", each weight tensor alone; "data",
    training batches through the model; "model", the model alone; "pattern", a fixed N:M pattern),
    `structured` (prunes whole channels).

    Torch side: `prune(masks, target, layers, scope, generator, context)`, and the special cases
    it owns: which layers it prunes (`layers`), its channel groups (`groups`), its final metrics
    (`final_metrics`). This base is an unstructured criterion's (single weights, every selected
    layer, no metric of its own)."""

    name: ClassVar[str] = ""
    needs: ClassVar[str] = "weights"
    structured: ClassVar[bool] = False
    acts_on: ClassVar[frozenset[str]] = frozenset()
    reads: ClassVar[frozenset[str]] = frozenset()
    metrics: ClassVar[dict[str, str]] = {}

    # -- rules (no torch) --------------------------------------------------------------------
    def check(self, schedule) -> str | None:
        """Why this criterion cannot run `schedule` (a resolved `ScheduleSpec`): one line naming
        the key; None when it can."""
        return None

    def dense_key(self, spec) -> dict:
        """What this criterion adds to the hash of the dense phase of `spec` (a resolved `Spec`)."""
        return {}

    def reports(self, schedule, searched: Collection[str] = ()) -> frozenset[str]:
        """The criterion-specific final metrics (of `metrics`) every trial of `schedule` reports,
        where the `searched` keys vary between trials."""
        return frozenset()

    def note(self, spec) -> str | None:
        """One line a sweep of `spec` (a resolved `Spec`) prints and keeps, or None."""
        return None

    # -- torch side ----------------------------------------------------------------------------
    def prune(self, masks, target: float, layers: list[str], scope: str, generator=None, context=None) -> None:
        """Prune `layers` of `masks` until `target` of their weights are zero (see `Masks.prune`)."""
        raise NotImplementedError

    def layers(self, model: nn.Module, selected: list[str], schedule) -> list[str]:
        """Which of the `selected` layers it prunes (and `sparsity` counts): all of them."""
        return list(selected)

    def groups(self, model: nn.Module, example: torch.Tensor, selected: list[str], head: str,
               schedule) -> list | None:
        """The channel groups it prunes whole (`structured.Group`s), or None: single weights."""
        return None

    def final_metrics(self, trial) -> dict[str, Any]:
        """What it adds to a finished trial's final metrics (names in `metrics`)."""
        return {}


def shuffle_breaks(schedule) -> str | None:
    """The rule of criteria whose pattern a shuffled mask would break (channels, N:M)."""
    if schedule.mask_control == "shuffle":
        return (f"schedule.mask_control shuffle permutes single weights, which would break criterion "
                f"{schedule.criterion}'s pattern; use it with an unstructured criterion")
    return None


def allocation_breaks(schedule, scopes: tuple[str, ...] = ("global", "layer"), layer_targets: bool = False,
                      why: str = "") -> str | None:
    """The rule of criteria that share a target among layers their own way: they take only
    `scopes`, and `schedule.layer_sparsity` only with `layer_targets`."""
    if schedule.scope not in scopes:
        return (f"schedule.scope {schedule.scope} does not apply to criterion {schedule.criterion}{why}; "
                f"use scope {' or '.join(scopes)}")
    if schedule.layer_sparsity and not layer_targets:
        return f"schedule.layer_sparsity does not apply to criterion {schedule.criterion}{why}"
    return None


def needs_context(context: Context | None, name: str) -> Context:
    if context is None:
        raise ValueError(f"criterion {name} scores through the model: pass a criteria.base.Context")
    return context


@contextlib.contextmanager
def scoring_mode(model: nn.Module, training: bool):
    """The model in training or eval mode while a criterion scores through it, left after as it
    was: every module's mode (a model may mix them) and its buffers (batch-norm statistics)."""
    import torch

    buffers = {n: b.clone() for n, b in model.named_buffers()}
    modes = {m: m.training for m in model.modules()}
    model.train(training)
    try:
        yield model
    finally:
        for m, was in modes.items():
            m.training = was
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(buffers[n])


PATCH_ELEMENTS = 1 << 24  # unfolded patches handed over at once: 64 MB in float32


def layer_inputs(model: nn.Module, name: str, batches: Batches, take: Callable) -> int:
    """Run `batches` through `model` (as it is: modes, masks) and hand each batch's input to
    layer `name` to `take`, as a matrix [rows, d_in] whose columns are the layer's input features:
    a Linear's inputs (every token a row), a Conv2d's unfolded patches (every image position a
    row; columns ordered as `weight.flatten(1)`: input channel, then kernel row and column). The
    forward stops at that layer: only its input is ever held, and a convolution's patches a few
    images at a time (`PATCH_ELEMENTS`). Returns how many images went through."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    module = dict(model.named_modules())[name]

    class _Done(Exception):
        pass

    def hook(mod, args):
        x = args[0].detach()
        if not isinstance(mod, nn.Conv2d):
            take(x.reshape(-1, x.shape[-1]))
            raise _Done
        # a few images at a time: a large image's patches far outweigh the image
        per_image = mod.weight[0].numel() * math.prod(
            (size + 2 * p - d * (k - 1) - 1) // st + 1 for size, p, d, k, st in
            zip(x.shape[2:], mod.padding, mod.dilation, mod.kernel_size, mod.stride))
        step = max(1, PATCH_ELEMENTS // max(1, per_image))
        for start in range(0, x.shape[0], step):
            patches = F.unfold(x[start:start + step], mod.kernel_size, mod.dilation, mod.padding, mod.stride)
            take(patches.transpose(1, 2).reshape(-1, patches.shape[1]))
        raise _Done

    handle = module.register_forward_pre_hook(hook)
    images = 0
    try:
        with torch.no_grad():
            for x, _ in batches():
                images += len(x)
                try:
                    model(x)
                except _Done:
                    pass
    finally:
        handle.remove()
    return images
