"""The user's own code in a spec: `model.arch: "package.module:factory"` and `data.dataset:
"package.module:factory"` (and `model.arch: "torchvision:<name>"`, torchvision's own models).

The one home of how such a reference is written, imported, fingerprinted and shipped:
- imported from the working directory and the spec file's folder, as `python` itself would
  (`add_search_paths`; a fresh local Ray's workers inherit them through PYTHONPATH);
- a bad reference is bad input: one line naming the key (`load_factory`, `call_factory`);
- its source is digested into the dense phase's cache key (`source_digest`), so editing the
  model retrains rather than reusing a stale dense phase;
- shipped to a cluster's nodes with Ray's runtime env (`ship_paths`: the named module's file,
  or its whole top-level package).

Imports no torch, ray or mlflow (the user's module may).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Callable

from prunetune.errors import UserError

TORCHVISION = "torchvision:"
_NAME = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
_REF = re.compile(rf"^({_NAME}):({_NAME})$")
KEYS = ("model.arch", "data.dataset")  # the spec keys that may name user code
WHERE = "modules are imported from the working directory and the spec file's folder"

_added: list[str] = []  # the folders this process put on sys.path (for a local Ray's workers)


def is_ref(name: str) -> bool:
    """`package.module:factory` or `torchvision:<name>` (a built-in name has no colon)."""
    return ":" in name


def is_torchvision(name: str) -> bool:
    return name.startswith(TORCHVISION)


def is_user_code(name: str) -> bool:
    return is_ref(name) and not is_torchvision(name)


def parse(ref: str) -> tuple[str, str]:
    """`package.module:factory` → (module, attribute); ValueError saying what is allowed."""
    m = _REF.match(ref)
    if not m:
        raise ValueError(f"{ref!r} is not a reference to user code: write 'package.module:factory' "
                         "(dotted Python names)")
    return m.group(1), m.group(2)


def add_search_paths(spec_folder: Path | None) -> None:
    """Put the working directory and the spec file's folder on sys.path (front, once each)."""
    for folder in (Path.cwd(), spec_folder):
        if folder is None:
            continue
        path = str(folder.resolve())
        if path not in sys.path:
            sys.path.insert(0, path)
        if path not in _added:
            _added.append(path)


def worker_pythonpath() -> str | None:
    """PYTHONPATH for the workers of a fresh local Ray (they inherit the driver's environment):
    the folders `add_search_paths` added, before what was there. None: nothing to add."""
    before = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    new = [p for p in _added if p not in before]
    return os.pathsep.join(new + before) if new else None


SHIPPED = ("the spec's modules are shipped to every node (their file, or their top-level package); "
           "install what else they import on every node")


def load_factory(key: str, ref: str, hint: str = WHERE) -> Callable:
    """The callable `ref` names; UserError naming `key` when it cannot be imported (`hint`: where
    modules come from, said when one cannot be)."""
    module_name, attr = parse(ref)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any error importing the user's module is their input
        raise UserError(f"{key}: cannot import module {module_name!r} for {ref} ({_one_line(exc)}); "
                        f"{hint}") from None
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise UserError(f"{key}: module {module_name!r} ({getattr(module, '__file__', '?')}) has no "
                            f"attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise UserError(f"{key}: {ref} is a {type(target).__name__}, not a callable factory")
    return target


def call_factory(key: str, ref: str, *args, **kwargs) -> Any:
    """`ref(*args, **kwargs)`; what it raises becomes one line naming `key` and the message."""
    factory = load_factory(key, ref)
    try:
        return factory(*args, **kwargs)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's factory failing is their input
        raise UserError(f"{key}: {ref} raised {_one_line(exc)}") from None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


# -- what a reference's code is, on disk ------------------------------------------------------------

def _top_locations(module_name: str) -> list[Path]:
    """Where the top-level package (or the single-file module) of `module_name` lives."""
    top = module_name.split(".")[0]
    try:
        found = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        found = None
    if found is None:
        return []
    if found.submodule_search_locations:  # a package (or namespace package): its folders
        return [Path(p) for p in found.submodule_search_locations]
    return [Path(found.origin)] if found.origin and found.origin.endswith(".py") else []


def ship_paths(refs: Iterable[tuple[str, str]]) -> list[str]:
    """What Ray's runtime env ships to every node for `refs` (`py_modules`): each one's top-level
    package folder, or its single .py file. Installed packages (site-packages) are not shipped:
    every node has its own install, as of prunetune itself."""
    out: list[str] = []
    for _, ref in refs:
        for path in _top_locations(parse(ref)[0]):
            if "site-packages" not in path.parts and "dist-packages" not in path.parts and str(path) not in out:
                out.append(str(path))
    return out


@functools.lru_cache(maxsize=64)
def source_digest(ref: str) -> str:
    """A digest of the source of `ref`'s top-level package (every .py file in it) or module
    file: a change anywhere in the code the factory may import changes it. "" when not found."""
    digest = hashlib.sha256()
    for location in _top_locations(parse(ref)[0]):
        files = sorted(location.rglob("*.py")) if location.is_dir() else [location]
        for f in files:
            digest.update(str(f.relative_to(location.parent)).encode())
            digest.update(f.read_bytes())
    return digest.hexdigest()[:16]


def refs(values: dict[str, list]) -> list[tuple[str, str]]:
    """(key, reference) of the user code among `{key: values}` (`KEYS` and the values they take)."""
    return [(key, v) for key, vs in values.items() for v in vs if isinstance(v, str) and is_user_code(v)]
