"""The define-by-run space with real Optuna (no Ray): a key is sampled only where the sampled
method, and retraining, use it."""

from __future__ import annotations

import optuna

from prunetune import search, spec
from prunetune.pruning import schedules

from conftest import digits_raw


def test_retrain_and_rewind_epoch_are_sampled_only_where_used():
    loaded = spec.load(None, raw=digits_raw(
        schedule__method={"choice": ["oneshot", "iterative", "lottery", "layerwise"]},
        schedule__retrain={"choice": ["finetune", "lr_rewind", "weight_rewind", "reinit"]},
        schedule__rewind_epoch={"uniform": [0.0, 1.0]}, schedule__step_rule={"choice": ["fixed", "geometric"]},
        schedule__step_size=0.3))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(80):
        trial = study.ask()
        search.DefineByRun(loaded)(trial)
        p = trial.params
        method, retrain = p["schedule.method"], p.get("schedule.retrain", "finetune")
        seen.add((method, retrain))
        assert ("schedule.retrain" in p) == (method in ("oneshot", "iterative"))
        assert ("schedule.rewind_epoch" in p) == schedules.key_is_used(method, "rewind_epoch", retrain)
        assert ("schedule.step_rule" in p) == (method in ("iterative", "lottery"))
        resolved = search.spec_of(loaded, p)  # every sample is a valid spec
        assert resolved.schedule.method == method
        study.tell(trial, 0.5)
    assert {("oneshot", "reinit"), ("iterative", "lr_rewind"), ("lottery", "finetune"),
            ("layerwise", "finetune")} <= seen


def test_grid_size_counts_retrain_only_where_used():
    loaded = spec.load(None, raw=digits_raw(
        schedule__method={"choice": ["oneshot", "lottery"]},
        schedule__retrain={"choice": ["finetune", "weight_rewind", "reinit"]},
        schedule__rewind_epoch={"choice": [0, 1]}))
    # oneshot: finetune (no rewind_epoch) + 2 retrains × 2 rewind epochs; lottery: 2 rewind epochs
    assert search.grid_size(loaded) == 1 + 2 * 2 + 2
