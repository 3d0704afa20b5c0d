"""Loading a spec: YAML (with `1e-3` read as a float), `base:` files deep-merged under it, `--set`
overrides, the CLI's `--tracking-uri` and `--storage`, and the load-time checks of the whole
(every searched value, the keys that need a structured criterion, the objectives). The result
is a `LoadedSpec`: the merged mapping, its search space, and the spec it resolves to.

Imports no torch, ray, optuna or mlflow.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from prunetune import metrics, plugins, pretrained, registry
from prunetune.errors import UserError, first_line
from prunetune.spec import space as space_mod
from prunetune.spec.dotted import del_dotted, get_dotted, set_dotted
from prunetune.spec.schema import Spec
from prunetune.spec.space import SearchEntry, is_number, is_search_entry
from prunetune.spec.validation import validate


class _SpecLoader(yaml.SafeLoader):
    """A safe loader that also reads `1e-3` as a float (YAML 1.1 wants `1.0e-3`)."""


_SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^[-+]?(?:[0-9][0-9_]*)?(?:\.[0-9_]*)?[eE][-+]?[0-9]+$|^[-+]?[0-9][0-9_]*\.[0-9_]*$|^[-+]?\.[0-9_]+$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"""),  # noqa: E501
    list("-+0123456789."))


def yaml_load(text: str):
    return yaml.load(text, Loader=_SpecLoader)  # noqa: S506 - a SafeLoader subclass


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"spec file {path}: not found")
    text = path.read_text()
    try:
        data = yaml_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or first_line(exc)
        raise UserError(f"spec file {path}:{where}: YAML syntax error: {problem}") from None
    if data is None:
        raise UserError(f"spec file {path}: the file is empty; a spec needs at least `name:`")
    if not isinstance(data, dict):
        raise UserError(f"spec file {path}: must be a YAML mapping of keys, got {type(data).__name__}")
    return data


def deep_merge(base: dict, over: dict) -> dict:
    """`over` merged into a copy of `base`, mapping by mapping (a search entry is a value, not a
    mapping to merge into)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and not is_search_entry(v):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _load_with_bases(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise UserError(f"spec file {path}: `base:` files form a cycle")
    data = _read_yaml(path)
    bases = data.pop("base", None)
    if bases is None:
        return data
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise UserError(f"spec file {path}: `base` must be a path or a list of paths")
    merged: dict = {}
    for b in bases:
        bpath = (path.parent / b)
        if not bpath.is_file():
            raise UserError(f"spec file {path}: base file {b} not found (looked for {bpath.resolve()})")
        merged = deep_merge(merged, _load_with_bases(bpath, seen + (path,)))
    return deep_merge(merged, data)


# Keys whose --set value is always text: an MLflow run id such as 0123…, or 1e05…, must not
# turn into a number.
_TEXT_KEYS = frozenset({"name", "distill.teacher", "model.weights", "data.root", "tracking.storage"})


def parse_set(item: str) -> tuple[str, Any]:
    """`a.b=value` → ('a.b', value parsed as a YAML scalar or flow collection)."""
    key, sep, text = item.partition("=")
    if not sep or not key or any(not p for p in key.split(".")):
        raise UserError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. schedule.sparsity=0.8")
    if key in _TEXT_KEYS and text and not text.lstrip().startswith(("{", "[")):
        return key, text
    try:
        value = yaml_load(text) if text else None
    except yaml.YAMLError:
        value = text
    return key, value


@dataclass
class LoadedSpec:
    """A spec file as loaded: the merged raw mapping and its search space, validated. Read-only
    once loaded (its fixed spec is computed once)."""

    path: Path | None
    raw: dict
    space: dict[str, SearchEntry]
    notes: tuple[str, ...] = ()  # lines to print where a load decided something the user did not write
    _fixed: Spec | None = field(default=None, init=False, repr=False, compare=False)

    def fixed_spec(self) -> Spec:
        """The spec with each search entry at its first probe value (for display and checks)."""
        if self._fixed is None:
            self._fixed = self.resolve({k: e.probe_values()[0] for k, e in self.space.items()})
        return self._fixed

    def resolve(self, params: dict[str, Any]) -> Spec:
        """Replace search entries by `params` (dotted keys); entries not given take the default."""
        raw = copy.deepcopy(self.raw)
        for key in self.space:
            if key in params:
                set_dotted(raw, key, params[key])
            else:
                del_dotted(raw, key)
        return validate(raw)

    def rewind_points(self) -> list[float]:
        """The `schedule.rewind_epoch` values this spec's trials may ask for, where they are a
        finite set (fixed, or a choice): a dense phase saves the fractional ones as it passes."""
        entry = self.space.get("schedule.rewind_epoch")
        if entry is None:
            value = self.raw.get("schedule", {}).get("rewind_epoch")
            return [value] if is_number(value) else []
        return [v for v in entry.args if is_number(v)] if entry.kind == "choice" else []

    def user_code(self) -> list[tuple[str, str]]:
        """(key, reference) of the user code (`package.module:factory`) that model.arch and
        data.dataset take, fixed or as a choice's values."""
        values = {}
        for key in plugins.KEYS:
            entry = self.space.get(key)
            values[key] = list(entry.probe_values()) if entry else [get_dotted(self.raw, key)]
        return plugins.refs(values)

    def trial_spec(self) -> Spec:
        """The one spec a `prunetune trial` runs: every searched key that matters must be fixed."""
        missing = space_mod.unfixed_keys(self.raw, self.space)
        if missing:
            raise UserError("prunetune trial needs fixed values for the searched keys "
                            f"{', '.join(missing)}; give them with --set KEY=VALUE")
        return self.resolve({})


def check_with_layers(loaded: LoadedSpec, layers: Callable[[Spec], list[str]]) -> None:
    """Validate every searched value again, now with `layers(spec)` the layers a trial of it would
    prune (known once the model is built): what depends on them (a layerwise schedule under
    train.budget_epochs) is checked before any trial starts. Raises UserError."""
    space_mod.check_space(loaded.raw, loaded.space, layers=layers)


def _check_criterion_keys(raw: dict, space: dict[str, SearchEntry]) -> None:
    """The keys that act only with some criteria (`registry.CRITERION_KEYS`: schedule.remove,
    train.group_lasso), set (searched, or fixed on) where the spec's fixed criterion ignores them
    (its `acts_on`): they would silently do nothing. With a searched criterion they apply to the
    trials that sample one they act with."""
    if "schedule.criterion" in space:
        return
    name = space_mod.fixed_schedule_value(raw, "criterion")
    acts_on = registry.criterion(name).acts_on if name in registry.CRITERIA else frozenset()
    for key in registry.CRITERION_KEYS:
        if key not in acts_on and (key in space or get_dotted(raw, key)):
            raise UserError(f"spec key {key}: needs a structured schedule.criterion "
                            f"({', '.join(registry.structured_criteria())}); got {name!r}")


def _check_objectives(spec: Spec, space: dict[str, SearchEntry]) -> None:
    """An objective must be a metric every trial reports."""
    for o in spec.search.objectives:
        why = metrics.unavailable(o.metric, spec, space)
        if why:
            raise UserError(f"search.objectives: {o.metric} is reported only with {why}")


# Files a trial reads, made absolute at load (relative to the working directory): Ray workers,
# whose working directories differ, and the nodes of a cluster then read the same path. (Not a
# torchvision weight name in model.weights: each node reads it from its own torchvision cache.)
_PATH_KEYS = ("data.root", "model.weights")


def _absolute_paths(raw: dict) -> None:
    for key in _PATH_KEYS:
        value = get_dotted(raw, key)
        if isinstance(value, str) and value and "://" not in value and not pretrained.is_name(value):
            set_dotted(raw, key, str(Path(value).expanduser().absolute()))


def _apply_overrides(raw: dict, overrides: list[str], tracking_uri: str | None, storage: str | None) -> str | None:
    """`--set` items, then the CLI's own options: `--storage` over `tracking.storage`, and where
    runs go, the first of `--tracking-uri`, the spec's own `tracking.uri` (its file or `--set`),
    $MLFLOW_TRACKING_URI, the default. Returns a line to print where the environment decided."""
    for item in overrides:
        key, value = parse_set(item)
        set_dotted(raw, key, value)
    from_env = os.environ.get("MLFLOW_TRACKING_URI")
    note = None
    if tracking_uri:
        set_dotted(raw, "tracking.uri", tracking_uri)
    elif from_env and get_dotted(raw, "tracking.uri") is None:
        set_dotted(raw, "tracking.uri", from_env)
        note = f"tracking: runs go to $MLFLOW_TRACKING_URI ({redacted(from_env)}); the spec sets no tracking.uri"
    if storage:
        set_dotted(raw, "tracking.storage", storage)
    return note


def redacted(uri: str) -> str:
    """`uri` without the user and password it may carry (scheme://user:password@host)."""
    return re.sub(r"(://)[^/@]*@", r"\1", uri)


def load(path: str | Path | None, overrides: list[str] = (), raw: dict | None = None, for_trial: bool = False,
         *, tracking_uri: str | None = None, storage: str | None = None) -> LoadedSpec:
    """Load a spec file (or a raw mapping), apply `base:`, `--set` overrides and the CLI's
    `tracking_uri` and `storage`, and validate it.

    A searched key that no possible method uses is an error for a sweep; `for_trial` allows it,
    since `--set schedule.method=...` legitimately leaves other methods' searched keys unused.

    Raises UserError with one line naming the key or file and what is allowed.
    """
    if raw is None:
        p = Path(path)
        raw = _load_with_bases(p)
    else:
        p = None
        raw = copy.deepcopy(raw)
        raw.pop("base", None)
    note = _apply_overrides(raw, overrides, tracking_uri, storage)
    _absolute_paths(raw)
    space = space_mod.extract_search(raw)
    space_mod.check_space(raw, space, unused_is_error=not for_trial)
    _check_criterion_keys(raw, space)
    loaded = LoadedSpec(p, raw, space, notes=(note,) if note else ())
    fixed = loaded.fixed_spec()  # full validation with searched keys at a representative value
    code = loaded.user_code()
    if code:  # imported from the working directory and beside the spec, as Python would find it
        plugins.add_search_paths(p.parent if p is not None else None)
    for key, ref in code:  # user code that cannot be imported fails now, naming the key
        plugins.load_factory(key, ref)
    if not for_trial:  # one trial selects nothing
        _check_objectives(fixed, space)
    return loaded
