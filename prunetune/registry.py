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
class Criterion:
    """A pruning criterion's registry entry: where its implementation lives, and what it is.

    structured: it prunes whole channels (so schedule.remove and train.group_lasso apply).
    needs: what scoring takes — "weights" (each weight tensor alone), "data" (training batches
    through the model: snip, grasp), "model" (the model alone, no data: synflow) or "pattern"
    (a fixed N:M pattern per group of weights: l1_nm, whose sparsity is 1 − N/M).
    Every implementation has `prune(masks, target, layers, scope, generator, context)`."""

    target: str
    structured: bool = False
    needs: str = "weights"


CRITERIA: dict[str, Criterion] = {
    "l1_unstructured": Criterion("prunetune.pruning.criteria:l1_unstructured"),
    "random": Criterion("prunetune.pruning.criteria:random_scores"),
    "l1_filter": Criterion("prunetune.pruning.structured:l1_filter", structured=True),
    "l2_filter": Criterion("prunetune.pruning.structured:l2_filter", structured=True),
    "snip": Criterion("prunetune.pruning.criteria:snip", needs="data"),
    "grasp": Criterion("prunetune.pruning.criteria:grasp", needs="data"),
    "synflow": Criterion("prunetune.pruning.criteria:synflow", needs="model"),
    "l1_nm": Criterion("prunetune.pruning.criteria:l1_nm", needs="pattern"),
}


def structured_criteria() -> list[str]:
    """The criteria that prune whole channels."""
    return sorted(name for name, c in CRITERIA.items() if c.structured)


def is_structured(name: str) -> bool:
    return name in CRITERIA and CRITERIA[name].structured


def is_pattern(name: str) -> bool:
    """A criterion that keeps a fixed N:M pattern (its sparsity is 1 − N/M; `schedule.remove`
    exports the semi-structured model)."""
    return name in CRITERIA and CRITERIA[name].needs == "pattern"


def lookup(registry: dict[str, str], name: str) -> Any:
    """Import and return the implementation registered under `name`."""
    entry = registry[name]
    module, attr = getattr(entry, "target", entry).split(":")
    return getattr(importlib.import_module(module), attr)
