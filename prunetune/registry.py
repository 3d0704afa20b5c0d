"""Name → implementation registries, keyed by the names a user types in the spec.

Entries are "module:attribute" strings imported on first use, so the spec layer can list valid
names without importing torch (no work at import time; Ray workers import this package).
"""

from __future__ import annotations

import importlib
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

CRITERIA: dict[str, str] = {
    "l1_unstructured": "prunetune.pruning.criteria:l1_unstructured",
    "random": "prunetune.pruning.criteria:random_scores",
    "l1_filter": "prunetune.pruning.structured:l1_filter",
    "l2_filter": "prunetune.pruning.structured:l2_filter",
}
# Criteria that prune whole channels (so schedule.remove and train.group_lasso apply).
STRUCTURED_CRITERIA = frozenset({"l1_filter", "l2_filter"})


def lookup(registry: dict[str, str], name: str) -> Any:
    """Import and return the implementation registered under `name`."""
    module, attr = registry[name].split(":")
    return getattr(importlib.import_module(module), attr)
