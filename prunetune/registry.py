"""Name → implementation registries, keyed by the names a user types in the spec.

Entries are "module:attribute" strings imported on first use, so the spec layer can list valid
names without importing torch (no work at import time; Ray workers import this package).
"""

from __future__ import annotations

import importlib
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, ClassVar

from prunetune import metrics

MODELS: dict[str, str] = {
    "simple_cnn": "prunetune.models:simple_cnn",
    "vgg11": "prunetune.models:vgg11",
    "vgg16": "prunetune.models:vgg16",
    "densenet121": "prunetune.models:densenet121",
    "densenet169": "prunetune.models:densenet169",
    "resnet18": "prunetune.models:resnet18",
    "resnet50": "prunetune.models:resnet50",
}

DATASETS: dict[str, str] = {
    "digits": "prunetune.data.digits:load",
    "cifar10": "prunetune.data.cifar:load_cifar10",
    "cifar100": "prunetune.data.cifar:load_cifar100",
    "ham10000": "prunetune.data.ham10000:load",
    "imagefolder": "prunetune.data.imagefolder:load",
    "medmnist": "prunetune.data.medmnist:load",
}

@dataclass(frozen=True)
class Sampler:
    """An Optuna sampler's registry entry: its builder (`target`, called as `target(loaded, seed)`,
    in `samplers.py`), the packages it needs beyond optuna (`needs`: a sweep without them exits 2
    naming search.sampler) and whether it handles several objectives."""

    target: str
    needs: tuple[str, ...] = ()
    multi_objective: bool = True


SAMPLERS: dict[str, Sampler] = {
    "tpe": Sampler("prunetune.samplers:tpe"),
    "nsga2": Sampler("prunetune.samplers:nsga2"),
    "random": Sampler("prunetune.samplers:random"),
    "grid": Sampler("prunetune.samplers:grid"),
    "cmaes": Sampler("prunetune.samplers:cmaes", needs=("cmaes",), multi_objective=False),
}


# Spec keys that act only with some criteria: a spec that sets one where its criterion (fixed,
# not searched) would ignore it is refused, rather than silently doing nothing.
CRITERION_KEYS = ("schedule.remove", "train.group_lasso")


def _shuffle_breaks(schedule) -> str | None:
    if schedule.mask_control == "shuffle":
        return (f"schedule.mask_control shuffle permutes single weights, which would break criterion "
                f"{schedule.criterion}'s pattern; use it with an unstructured criterion")
    return None


@dataclass(frozen=True)
class Criterion:
    """A pruning criterion's registry entry: where its implementation lives (`target`, imported on
    first use), what scoring takes, and the criterion's rules that need no torch, so the spec can
    apply them: `check` (what it refuses in a schedule), `acts_on` (which `CRITERION_KEYS` do
    something with it), `dense_key` (its part of the dense phase's hash) and `reports` (the final
    metrics only some criteria report).

    This base is an unstructured criterion (single weights); `ChannelCriterion` and
    `PatternCriterion` override what differs. The torch side of the same special cases (which
    layers it prunes, its channel groups, its final metrics) is on its implementation, a
    `pruning.criteria.Pruner`.

    needs: what scoring takes — "weights" (each weight tensor alone), "data" (training batches
    through the model: snip, grasp), "model" (the model alone, no data: synflow) or "pattern"
    (a fixed N:M pattern per group of weights: l1_nm).
    Every implementation has `prune(masks, target, layers, scope, generator, context)`."""

    target: str
    needs: str = "weights"
    structured: ClassVar[bool] = False  # prunes whole channels
    acts_on: ClassVar[frozenset[str]] = frozenset()

    def check(self, schedule) -> str | None:
        """Why this criterion cannot run `schedule` (a resolved `ScheduleSpec`): one line naming
        the key; None when it can."""
        return None

    def dense_key(self, spec) -> dict:
        """What this criterion adds to the hash of the dense phase of `spec` (a resolved `Spec`)."""
        return {}

    def reports(self, schedule, searched: Collection[str] = ()) -> frozenset[str]:
        """The criterion-specific final metrics (`metrics.BY_CRITERION`) every trial of
        `schedule` reports, where the `searched` keys vary between trials."""
        return frozenset()


@dataclass(frozen=True)
class ChannelCriterion(Criterion):
    """Prunes whole output channels with their groups (`structured.py`). `schedule.remove`:
    the pruned channels are removed for real after training; `train.group_lasso` penalises
    the same groups from the dense phase on."""

    structured: ClassVar[bool] = True
    acts_on: ClassVar[frozenset[str]] = frozenset({"schedule.remove", "train.group_lasso"})

    def check(self, schedule) -> str | None:
        if schedule.method in ("dsd", "ist"):
            # A pruned channel has all of its group at zero (filters, batch norm, next layers'
            # inputs): every gradient of it is zero, so it could never regrow after the release.
            return (f"schedule.method {schedule.method} re-grows pruned weights from zero, which a pruned "
                    f"channel cannot (its whole group is zero, so are its gradients); use "
                    f"l1_unstructured or random with {schedule.method}")
        return _shuffle_breaks(schedule)

    def dense_key(self, spec) -> dict:
        if spec.train.group_lasso > 0:
            # the penalty acts from the first step on the channel groups of the selected layers
            # (the same groups for every structured criterion; none for an unstructured one)
            return {"penalty": {"groups": "channels", "layers": spec.schedule.layers}}
        return {}

    def reports(self, schedule, searched: Collection[str] = ()) -> frozenset[str]:
        removed = schedule.remove and "schedule.remove" not in searched
        return frozenset(metrics.CHANNEL_METRICS + (metrics.REMOVAL_METRICS if removed else ()))


@dataclass(frozen=True)
class PatternCriterion(Criterion):
    """Keeps a fixed N:M pattern (`schedule.n_m`): its sparsity is 1 − N/M. `schedule.remove`:
    on hardware that runs it (CUDA, compute capability ≥ 8.0) the 2:4 linear layers are
    converted to sparse semi-structured tensors and timed; elsewhere it does nothing."""

    needs: str = "pattern"
    acts_on: ClassVar[frozenset[str]] = frozenset({"schedule.remove"})

    def check(self, schedule) -> str | None:
        n, m = schedule.n_m
        if abs(schedule.sparsity - (1 - n / m)) > 1e-9:
            return (f"schedule.sparsity must be 1 − N/M = {1 - n / m:g} with criterion {schedule.criterion} "
                    f"and schedule.n_m {schedule.n_m} (got {schedule.sparsity:g}): the N:M pattern fixes it")
        return _shuffle_breaks(schedule)

    def reports(self, schedule, searched: Collection[str] = ()) -> frozenset[str]:
        return frozenset(metrics.NM_METRICS)  # not the latency: only on hardware that runs it


CRITERIA: dict[str, Criterion] = {
    "l1_unstructured": Criterion("prunetune.pruning.criteria:l1_unstructured"),
    "random": Criterion("prunetune.pruning.criteria:random_scores"),
    "l1_filter": ChannelCriterion("prunetune.pruning.structured:l1_filter"),
    "l2_filter": ChannelCriterion("prunetune.pruning.structured:l2_filter"),
    "snip": Criterion("prunetune.pruning.criteria:snip", needs="data"),
    "grasp": Criterion("prunetune.pruning.criteria:grasp", needs="data"),
    "synflow": Criterion("prunetune.pruning.criteria:synflow", needs="model"),
    "l1_nm": PatternCriterion("prunetune.pruning.criteria:l1_nm"),
}


def structured_criteria() -> list[str]:
    """The criteria that prune whole channels."""
    return sorted(name for name, c in CRITERIA.items() if c.structured)


# Kept for callers that still branch on the kind; a criterion's own methods say what differs.
def lookup(registry: dict[str, str], name: str) -> Any:
    """Import and return the implementation registered under `name`."""
    entry = registry[name]
    module, attr = getattr(entry, "target", entry).split(":")
    return getattr(importlib.import_module(module), attr)
