"""The spec's search space → Optuna: a define-by-run function and the grid's checks. (The
samplers are `samplers.py`; the stored study is `stored_study.py`.)

`schedule.method` is sampled first, then `schedule.retrain` where the method uses it; a
method-specific key (step_size, step_epochs, rewind_epoch, ...) is sampled only when the sampled
method (and retraining) uses it (`spec.space.keys_used`). Imports no optuna (only the sweep
needs it).
"""

from __future__ import annotations

import json
import math
from typing import Any

from prunetune.errors import UserError
from prunetune.pruning import schedules
from prunetune.spec import LoadedSpec, SearchEntry, Spec
from prunetune.spec.space import METHOD, RETRAIN, fixed_schedule_value, keys_used, method_values, retrain_values

_PRIMITIVE = (type(None), bool, int, float, str)


def _encoded(entry: SearchEntry) -> bool:
    """Optuna's categorical values are primitives; other choices (lists of globs) go as JSON."""
    return entry.kind == "choice" and not all(isinstance(v, _PRIMITIVE) for v in entry.args)


def suggest(trial, key: str, entry: SearchEntry) -> Any:
    if entry.kind == "choice":
        if _encoded(entry):
            return trial.suggest_categorical(key, [json.dumps(v) for v in entry.args])
        return trial.suggest_categorical(key, list(entry.args))
    lo, hi = entry.args
    if entry.kind == "int":
        return trial.suggest_int(key, lo, hi, step=entry.step or 1)
    if entry.kind == "loguniform":
        return trial.suggest_float(key, lo, hi, log=True)
    return trial.suggest_float(key, lo, hi, step=entry.step)


class DefineByRun:
    """An Optuna define-by-run function sampling the spec's search space (a class, not a closure,
    so Tune can pickle it with the sweep's state)."""

    def __init__(self, loaded: LoadedSpec):
        self.loaded = loaded

    def __call__(self, trial) -> None:
        raw, space = self.loaded.raw, self.loaded.space
        method = suggest(trial, METHOD, space[METHOD]) if METHOD in space else fixed_schedule_value(raw, "method")
        retrain = fixed_schedule_value(raw, "retrain")
        if RETRAIN in space and schedules.key_is_used(method, "retrain"):
            retrain = suggest(trial, RETRAIN, space[RETRAIN])
        for key in keys_used(space, method, retrain):
            if key not in (METHOD, RETRAIN):
                suggest(trial, key, space[key])


def decode(loaded: LoadedSpec, config: dict) -> dict:
    """Sampled values (as Optuna/Ray hold them) → spec values."""
    out = {}
    for key, value in config.items():
        entry = loaded.space.get(key)
        out[key] = json.loads(value) if entry is not None and _encoded(entry) else value
    return out


REPLICATE = "__trial_index__"  # what Ray Tune's Repeater adds to a config: the replicate's index


def spec_of(loaded: LoadedSpec, config: dict) -> Spec:
    """The resolved spec of a sampled config (as Tune holds it); replicate r runs with seed
    `seed + r`."""
    params = {k: v for k, v in config.items() if k != REPLICATE}
    spec = loaded.resolve(decode(loaded, params))
    return spec.model_copy(update={"seed": spec.seed + int(config.get(REPLICATE, 0))})


def grid(loaded: LoadedSpec) -> dict[str, list]:
    """The grid sampler's space: every searched key must be a choice."""
    not_choice = [k for k, e in loaded.space.items() if e.kind != "choice"]
    if not_choice:
        raise UserError(f"search.sampler: grid searches choice entries only; {', '.join(not_choice)} "
                        "are ranges (make them {choice: [...]} or use tpe, random or nsga2)")
    return {k: ([json.dumps(v) for v in e.args] if _encoded(e) else list(e.args)) for k, e in loaded.space.items()}


def grid_size(loaded: LoadedSpec) -> int:
    """How many distinct configurations a grid holds, counting only keys each method uses."""
    raw, space = loaded.raw, loaded.space
    return sum(math.prod(len(space[key].args) for key in keys_used(space, method, retrain)
                         if key not in (METHOD, RETRAIN))
               for method in method_values(raw, space) for retrain in retrain_values(raw, space, method))


def check(loaded: LoadedSpec) -> None:
    """Sweep-level checks of the search section (raises UserError)."""
    search = loaded.fixed_spec().search
    if search.sampler == "grid":
        points = math.prod(len(values) for values in grid(loaded).values())
        if search.num_trials > points:
            raise UserError(f"search.num_trials: {search.num_trials} is more than the grid's {points} points "
                            f"({grid_size(loaded)} distinct configurations once unused keys are dropped)")
