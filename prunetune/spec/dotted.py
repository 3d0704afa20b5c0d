"""Dotted keys (`schedule.sparsity`, `train.lr`) over nested mappings: how `--set`, search entries
and MLflow params name a spec key."""

from __future__ import annotations

from typing import Any


def get_dotted(d: dict, key: str, default: Any = None) -> Any:
    """The value at `key`, or `default` where a part of the path is missing."""
    for p in key.split("."):
        if not isinstance(d, dict) or p not in d:
            return default
        d = d[p]
    return d


def set_dotted(d: dict, key: str, value: Any) -> None:
    """Set `key`, making the mappings on its path (replacing what is not a mapping)."""
    parts = key.split(".")
    node = d
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = value


def del_dotted(d: dict, key: str) -> None:
    """Remove `key` where it is set; nothing otherwise."""
    parts = key.split(".")
    for p in parts[:-1]:
        d = d.get(p, {})
    d.pop(parts[-1], None)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Every leaf of a nested mapping under its dotted key (empty mappings are leaves)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
