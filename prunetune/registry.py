"""Name → implementation registries, keyed by the names a user types in the spec.

Entries are "module:attribute" strings imported on first use, so the spec layer can list valid
names without importing torch (no work at import time; Ray workers import this package).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

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


CRITERIA: dict[str, str] = {
    "l1_unstructured": "prunetune.pruning.criteria.magnitude:l1_unstructured",
    "random": "prunetune.pruning.criteria.magnitude:random_scores",
    "snip": "prunetune.pruning.criteria.at_init:snip",
    "grasp": "prunetune.pruning.criteria.at_init:grasp",
    "synflow": "prunetune.pruning.criteria.at_init:synflow",
    "l1_nm": "prunetune.pruning.criteria.nm:l1_nm",
    "l1_filter": "prunetune.pruning.criteria.channel:l1_filter",
    "l2_filter": "prunetune.pruning.criteria.channel:l2_filter",
    "taylor_filter": "prunetune.pruning.criteria.channel:taylor_filter",
    "wanda": "prunetune.pruning.criteria.data_aware:wanda",
    "sparsegpt": "prunetune.pruning.criteria.second_order:sparsegpt",
}


def criterion(name: str):
    """The criterion registered as `name` (a `pruning.criteria.base.Criterion`: its rules and its
    torch side); its module imports no torch until it prunes."""
    return lookup(CRITERIA, name)


def criterion_keys() -> frozenset[str]:
    """The spec keys only some criteria read or act on (dotted): a trial's run logs each only
    where its criterion does."""
    return frozenset().union(*(criterion(n).reads | criterion(n).acts_on for n in CRITERIA))


def structured_criteria() -> list[str]:
    """The criteria that prune whole channels."""
    return sorted(name for name in CRITERIA if criterion(name).structured)


def lookup(registry: dict[str, str], name: str) -> Any:
    """Import and return the implementation registered under `name`."""
    entry = registry[name]
    module, attr = getattr(entry, "target", entry).split(":")
    return getattr(importlib.import_module(module), attr)
