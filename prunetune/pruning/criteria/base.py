"""What every criterion is (`Criterion`) and what those that score through the model are given
(`Context`). Torch-free: the spec reads the rules of every criterion without importing torch."""

from __future__ import annotations

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
    n_m: tuple[int, int] = (2, 4)
    # grasp: `samples_per_class` training images of each class, in class order, as two batches
    # (its authors' sample); None: `batches`
    balanced: Batches | None = None


class Criterion:
    """A pruning criterion: its rules, which need no torch, and its torch side.

    Rules: `check` (what it refuses in a schedule), `acts_on` (which `registry.CRITERION_KEYS` do
    something with it), `dense_key` (its part of the dense phase's hash), `reports` (the final
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
