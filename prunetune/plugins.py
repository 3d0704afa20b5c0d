"""The user's own code in a spec: `model.arch: "package.module:factory"` and `data.dataset:
"package.module:factory"` (and `model.arch: "torchvision:<name>"`, torchvision's own models).

The one home of how such a reference is written, imported, fingerprinted and shipped:
- imported from the working directory and the spec file's folder, as `python` itself would
  (`add_search_paths`; a fresh local Ray's workers inherit them through PYTHONPATH);
- a bad reference is bad input: one line naming the key (`load_factory`, `call_factory`);
- its source is digested into the dense phase's cache key (`source_digest`), so editing the
  model retrains rather than reusing a stale dense phase;
- shipped to a cluster's nodes with Ray's runtime env (`ship_paths`: the named module's file, or
  its whole top-level package, and the modules beside it that they import).

Imports no torch, ray or mlflow (the user's module may).
"""

from __future__ import annotations

import ast
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
    """Put the spec file's folder, then the working directory, at the front of sys.path (as
    `python script.py` puts the script's folder first): where both hold a module of one name, the
    spec's folder wins, on the driver and on a local Ray's workers alike."""
    for folder in (Path.cwd(), spec_folder):  # inserted at the front: the last one ends up first
        if folder is None:
            continue
        path = str(folder.resolve())
        if path in sys.path:
            sys.path.remove(path)
        sys.path.insert(0, path)
        if path in _added:
            _added.remove(path)
        _added.insert(0, path)


def worker_pythonpath() -> str | None:
    """PYTHONPATH for the workers of a fresh local Ray (they inherit the driver's environment):
    the folders `add_search_paths` added, in sys.path's order, before what was there. None:
    nothing to add."""
    before = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in _added]
    return os.pathsep.join(_added + before) if _added else None


SHIPPED = ("the spec's modules are shipped to every node (their file or top-level package, and the "
           "modules beside them they import by name); install what else they import on every node")


def load_factory(key: str, ref: str, hint: str = WHERE) -> Callable:
    """The callable `ref` names; UserError naming `key` when it cannot be imported (`hint`: where
    modules come from, said when one cannot be)."""
    module_name, attr = parse(ref)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any error importing the user's module is their input
        gone = getattr(exc, "name", None) or ""
        missing = isinstance(exc, ModuleNotFoundError) and (module_name == gone or module_name.startswith(gone + "."))
        why = hint if missing else "raised while importing it" + ("" if hint == WHERE else f"; {hint}")
        raise UserError(f"{key}: cannot import module {module_name!r} for {ref} ({one_line(exc)}); {why}") from None
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
        raise UserError(f"{key}: {ref} raised {one_line(exc)}") from None


def one_line(exc: BaseException) -> str:
    """An exception as one short line (its type and its message's first line), for UserErrors."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


# -- what a reference's code is, on disk ------------------------------------------------------------

def _unit(name: str) -> Path | None:
    """The folder of top-level package `name`, or its single .py file; None when not found or
    installed (site-packages: every node has its own install, as of prunetune itself)."""
    try:
        found = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if found is None:
        return None
    if found.submodule_search_locations:  # a package (or a namespace package's first folder)
        path = Path(list(found.submodule_search_locations)[0])
    elif found.origin and found.origin.endswith(".py"):
        path = Path(found.origin)
    else:
        return None
    return None if {"site-packages", "dist-packages"} & set(path.parts) else path


def _files(unit: Path) -> list[Path]:
    return sorted(unit.rglob("*.py")) if unit.is_dir() else [unit]


def _imported_names(path: Path) -> set[str]:
    """The top-level names a file imports (absolute imports, as written)."""
    try:
        tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError):
        return set()
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def units(ref: str) -> list[Path]:
    """The user's code behind `ref`: its top-level package (or module file), and the modules
    and packages beside it that those files import, transitively (as written: a module imported
    by a computed name is not seen). What is shipped to a cluster and digested into the dense key."""
    top = parse(ref)[0].split(".")[0]
    first = _unit(top)
    if first is None:
        return []
    found, todo, seen = [first], [first], {top}
    while todo:
        unit = todo.pop()
        for f in _files(unit):
            for name in sorted(_imported_names(f) - seen):
                seen.add(name)
                other = _unit(name)
                if other is not None and other.parent == first.parent:  # beside it, the user's own
                    found.append(other)
                    todo.append(other)
    return found


def ship_paths(refs: Iterable[tuple[str, str]]) -> list[str]:
    """What Ray's runtime env ships to every node for `refs` (`py_modules`): `units` of each."""
    out: list[str] = []
    for _, ref in refs:
        out += [str(u) for u in units(ref) if str(u) not in out]
    return out


@functools.lru_cache(maxsize=64)
def source_digest(ref: str) -> str:
    """A digest of the source of `units(ref)` (every .py file in them): a change anywhere in the
    code the factory imports from beside it changes it."""
    digest = hashlib.sha256()
    for unit in units(ref):
        for f in _files(unit):
            digest.update(str(f.relative_to(unit.parent)).encode())
            digest.update(f.read_bytes())
    return digest.hexdigest()[:16]


def digests(refs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """{reference: source_digest}: what a sweep records of its user code, to refuse resuming
    on edited code."""
    return {ref: source_digest(ref) for _, ref in refs}


def refs(values: dict[str, list]) -> list[tuple[str, str]]:
    """(key, reference) of the user code among `{key: values}` (`KEYS` and the values they take)."""
    return [(key, v) for key, vs in values.items() for v in vs if isinstance(v, str) and is_user_code(v)]
