"""Dotted keys (`schedule.sparsity`, `train.lr`) over nested mappings: how `--set`, search entries
and MLflow params name a spec key."""

from __future__ import annotations

from typing import Any

# Mappings whose keys are names that may hold dots themselves (module globs such as
# "classifier.1"): a dotted key below one of them is the mapping's path, then one name.
NAMED_MAPPINGS = ("schedule.layer_sparsity",)


def parts(key: str) -> list[str]:
    """The path of a dotted key: "schedule.layer_sparsity.classifier.1" → schedule,
    layer_sparsity, classifier.1."""
    for mapping in NAMED_MAPPINGS:
        if key.startswith(mapping + ".") and len(key) > len(mapping) + 1:
            return mapping.split(".") + [key[len(mapping) + 1:]]
    return key.split(".")


def get_dotted(d: dict, key: str, default: Any = None) -> Any:
    """The value at `key`, or `default` where a part of the path is missing."""
    for p in parts(key):
        if not isinstance(d, dict) or p not in d:
            return default
        d = d[p]
    return d


def set_dotted(d: dict, key: str, value: Any) -> None:
    """Set `key`, making the mappings on its path (replacing what is not a mapping)."""
    path = parts(key)
    node = d
    for p in path[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[path[-1]] = value


def del_dotted(d: dict, key: str) -> None:
    """Remove `key` where it is set; nothing otherwise."""
    path = parts(key)
    for p in path[:-1]:
        d = d.get(p, {})
    d.pop(path[-1], None)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Every leaf of a nested mapping under its dotted key (empty mappings are leaves)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and prefix[:-1] not in NAMED_MAPPINGS:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
