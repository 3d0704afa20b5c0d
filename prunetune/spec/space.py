"""The search space: search entries (`{choice: [...]}`, `{uniform: [lo, hi]}`, ...), where they may
stand, and which of them a trial of a given schedule method uses. That last rule is written here
only (the sampler, the checks and `prunetune trial` all ask it); the per-method key table itself
is `prunetune.pruning.schedules.METHODS`. Imports no torch, ray, optuna or mlflow."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from prunetune.errors import UserError
from prunetune.pruning import schedules
from prunetune.spec.dotted import del_dotted, set_dotted
from prunetune.spec.schema import ScheduleSpec, Spec
from prunetune.spec.validation import format_validation_error

SEARCHABLE_SECTIONS = ("model", "data", "train", "schedule", "distill")
SEARCH_KINDS = ("choice", "uniform", "loguniform", "int")
METHOD, RETRAIN = "schedule.method", "schedule.retrain"  # sampled first: they decide what else is


@dataclass(frozen=True)
class SearchEntry:
    """`{choice: [...]}`, `{uniform: [lo, hi]}`, `{loguniform: [lo, hi]}` or `{int: [lo, hi]}`."""

    kind: str
    args: tuple
    step: float | int | None = None

    def probe_values(self) -> list[Any]:
        """Values that validation tries: every choice, or both ends of a range."""
        return list(self.args) if self.kind == "choice" else [self.args[0], self.args[1]]


def is_search_entry(value: Any) -> bool:
    return isinstance(value, dict) and any(k in value for k in SEARCH_KINDS)


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def parse_search_entry(key: str, value: dict) -> SearchEntry:
    """The entry at spec key `key`; UserError naming the key where it is malformed."""
    kinds = [k for k in SEARCH_KINDS if k in value]
    extra = sorted(set(value) - set(SEARCH_KINDS) - {"step"})
    allowed = "{choice: [...]}, {uniform: [lo, hi]}, {loguniform: [lo, hi]} or {int: [lo, hi]} (optional step:)"
    if len(kinds) != 1 or extra:
        raise UserError(f"spec key {key}: a search entry is one of {allowed}; got {value!r}")
    kind = kinds[0]
    args, step = value[kind], value.get("step")
    if not isinstance(args, list) or not args:
        raise UserError(f"spec key {key}: {kind} takes a non-empty list; got {args!r}")
    if kind == "choice":
        if step is not None:
            raise UserError(f"spec key {key}: choice takes no step")
        return SearchEntry(kind, tuple(args))
    if len(args) != 2 or not all(is_number(a) for a in args):
        raise UserError(f"spec key {key}: {kind} takes [lo, hi] numbers; got {args!r}")
    lo, hi = args
    if kind == "int" and not all(isinstance(a, int) for a in args):
        raise UserError(f"spec key {key}: int takes integer bounds; got {args!r}")
    if not lo < hi and not (kind == "int" and lo == hi):
        raise UserError(f"spec key {key}: {kind} needs lo < hi; got {args!r}")
    if kind == "loguniform":
        if lo <= 0:
            raise UserError(f"spec key {key}: loguniform needs lo > 0; got {args!r}")
        if step is not None:
            raise UserError(f"spec key {key}: loguniform takes no step")
    if step is not None and (not is_number(step) or step <= 0 or (kind == "int" and not isinstance(step, int))):
        raise UserError(f"spec key {key}: step must be a positive {'integer' if kind == 'int' else 'number'}; "
                        f"got {step!r}")
    return SearchEntry(kind, (lo, hi), step)


def extract_search(raw: dict) -> dict[str, SearchEntry]:
    """Every search entry of a raw spec, by dotted key (in spec order)."""
    found: dict[str, SearchEntry] = {}

    def walk(node: Any, path: str, searchable: bool) -> None:
        if is_search_entry(node):
            if not searchable:
                raise UserError(f"spec key {path}: search entries are allowed only under "
                                f"{', '.join(SEARCHABLE_SECTIONS)}")
            found[path] = parse_search_entry(path, node)
        elif isinstance(node, dict):
            for k, v in node.items():
                sub = f"{path}.{k}" if path else str(k)
                walk(v, sub, searchable or (not path and k in SEARCHABLE_SECTIONS))

    walk(raw, "", False)
    return found


# -- which searched keys a trial uses ------------------------------------------------------------

def fixed_schedule_value(raw: dict, leaf: str) -> Any:
    """`schedule.<leaf>` as the raw spec fixes it, else its default."""
    return raw.get("schedule", {}).get(leaf, ScheduleSpec.model_fields[leaf].default)


def keys_used(space: dict[str, SearchEntry], method: str, retrain: str = "finetune") -> list[str]:
    """The searched keys that matter for a trial of `method` with `retrain` (in spec order): every
    key outside `schedule`, and the schedule keys the method reads (`schedule.method` itself;
    `schedule.retrain` where the method retrains)."""
    return [k for k in space
            if not k.startswith("schedule.") or schedules.key_is_used(method, k.split(".", 1)[1], retrain)]


def method_values(raw: dict, space: dict[str, SearchEntry]) -> list:
    """The schedule methods the spec's trials may run."""
    entry = space.get(METHOD)
    return entry.probe_values() if entry is not None else [fixed_schedule_value(raw, "method")]


def retrain_values(raw: dict, space: dict[str, SearchEntry], method: str) -> list:
    """The values of schedule.retrain that `method` may run with (`finetune` where it never
    retrains)."""
    if not schedules.key_is_used(method, "retrain"):
        return ["finetune"]
    entry = space.get(RETRAIN)
    return entry.probe_values() if entry is not None else [fixed_schedule_value(raw, "retrain")]


def unfixed_keys(raw: dict, space: dict[str, SearchEntry]) -> list[str]:
    """The searched keys one trial of the spec would need fixed: all of them while the method (or
    a retraining the method uses) is searched, else those its method and retraining use."""
    method, retrain = fixed_schedule_value(raw, "method"), fixed_schedule_value(raw, "retrain")
    if METHOD in space or (RETRAIN in space and schedules.key_is_used(method, "retrain")):
        return list(space)
    return keys_used(space, method, retrain)


# -- checks of every searched value --------------------------------------------------------------

def check_space(raw: dict, space: dict[str, SearchEntry], unused_is_error: bool = True,
                layers: Callable[[Spec], list[str]] | None = None) -> None:
    """Validate every searched value (each choice, both ends of each range), per method; a searched
    schedule key no method uses is an error when `unused_is_error`. `layers`: the layers a trial
    of a spec prunes, where known (see `loading.check_with_layers`). Raises UserError."""
    methods = method_values(raw, space)
    unknown = [m for m in methods if m not in schedules.METHODS]
    if unknown:
        if METHOD not in space:
            return  # validating the spec names the key and the valid methods
        raise UserError(f"spec key {METHOD}: unknown name {unknown[0]!r}; valid: "
                        f"{', '.join(sorted(schedules.METHODS))}")
    if unused_is_error:
        _check_unused(raw, space, methods)
    for method in methods:
        for retrain in retrain_values(raw, space, method):
            _check_values(raw, space, method, retrain, layers)


def _check_unused(raw: dict, space: dict[str, SearchEntry], methods: list) -> None:
    """A searched method-specific key that none of the methods (with any retraining) reads."""
    entry = space.get(RETRAIN)
    retrains = entry.probe_values() if entry is not None else [fixed_schedule_value(raw, "retrain")]
    for key in space:
        section, _, leaf = key.partition(".")
        if section == "schedule" and leaf in schedules.METHOD_SPECIFIC_KEYS and not any(
                schedules.key_is_used(m, leaf, r) for m in methods for r in retrains):
            raise UserError(f"spec key {key}: searched, but schedule.method "
                            f"({', '.join(map(str, methods))}) never uses it"
                            + (f" with schedule.retrain {', '.join(retrains)}" if leaf == "rewind_epoch" else ""))


def _check_values(raw: dict, space: dict[str, SearchEntry], method: str, retrain: str,
                  layers: Callable[[Spec], list[str]] | None) -> None:
    """A trial of `method` and `retrain` with the searched keys it uses at their first values, and
    with each value of each key in turn: each must be a valid spec."""
    used = {k: space[k] for k in keys_used(space, method, retrain) if k not in (METHOD, RETRAIN)}
    base = {k: e.probe_values()[0] for k, e in used.items()}
    if METHOD in space:
        base[METHOD] = method
    if RETRAIN in space and schedules.key_is_used(method, "retrain"):
        base[RETRAIN] = retrain
    for key, value in [(None, None)] + [(k, v) for k, e in used.items() for v in e.probe_values()]:
        params = base if key is None else dict(base, **{key: value})
        raw_try = copy.deepcopy(raw)
        for k in space:
            del_dotted(raw_try, k)
        for k, v in params.items():
            set_dotted(raw_try, k, v)
        try:
            Spec.model_validate(raw_try, context={"layers": layers})
        except ValidationError as exc:
            what = f" [searched value {value!r} of {key}]" if key else f" [schedule.method {method}]"
            raise UserError(f"{format_validation_error(exc)}{what}") from None
