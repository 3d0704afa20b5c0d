"""The private framework API prunetune touches, all in prunetune/sweep/_compat.py, still exists:
an upgrade of Ray fails here, loudly, in one place, rather than somewhere in a sweep. When the
version test fails, re-check each function of _compat against the new Ray (these tests say
which attribute went), then update `_compat.WRITTEN_FOR`."""

from __future__ import annotations

import importlib.metadata
import inspect

import pytest

from prunetune.sweep import _compat


@pytest.mark.parametrize("package", sorted(_compat.WRITTEN_FOR))
def test_the_installed_version_is_the_one_compat_was_written_for(package):
    assert importlib.metadata.version(package) == _compat.WRITTEN_FOR[package], (
        f"{package} {importlib.metadata.version(package)} is installed; prunetune/sweep/_compat.py was written "
        f"for {_compat.WRITTEN_FOR[package]}")


def test_rays_start_up_internals_are_there():
    import ray
    from ray._private import node, parameter, services

    assert '"_system_config"' in inspect.getsource(ray.init)  # one of the keywords it takes in **kwargs
    assert callable(services.canonicalize_bootstrap_address_or_die)
    assert callable(services.start_ray_process) and callable(node.Node.start_api_server)
    params = parameter.RayParams()
    assert hasattr(params, "no_monitor") and hasattr(params, "include_log_monitor")
    assert _compat.PRESTART_FLAG in inspect.getsource(services)  # the raylet flag lean_local_start bounds


def test_lean_local_start_patches_ray_and_puts_it_back():
    from ray._private import node, parameter, services

    own = parameter.RayParams.__init__, node.Node.start_api_server, services.start_ray_process
    with _compat.lean_local_start(workers=1):
        params = parameter.RayParams()
        assert (params.no_monitor, params.include_log_monitor) == (True, False)
        assert services.start_ray_process is not own[2]
    assert (parameter.RayParams.__init__, node.Node.start_api_server, services.start_ray_process) == own
    assert _compat._fewer_prestarted(f"{_compat.PRESTART_FLAG}8", 2) == f"{_compat.PRESTART_FLAG}2"


def test_tunes_actor_env_table_is_there():
    env = _compat.tune_actor_env()
    assert env is not None and isinstance(env[0], dict) and isinstance(env[1], set)


def test_a_restored_tuners_callbacks_are_reachable(tmp_path):
    from ray import tune

    callback = tune.Callback()
    tuner = tune.Tuner(lambda config: None, run_config=tune.RunConfig(storage_path=str(tmp_path),
                                                                        callbacks=[callback]))
    assert _compat.tuner_callbacks(tuner) == [callback]


def test_a_result_grids_trials_are_reachable():
    from types import SimpleNamespace

    from ray.tune import ResultGrid

    trials = []
    grid = ResultGrid(SimpleNamespace(trials=trials))
    assert _compat.result_grid_trials(grid) is trials


def test_a_repeaters_groups_are_reachable():
    from ray.tune.search import Repeater, Searcher

    class One(Searcher):
        def suggest(self, trial_id):
            return {"x": 1}

    repeater = Repeater(One(metric="m", mode="max"), repeat=2)
    repeater.suggest("a")
    repeater.suggest("b")
    assert _compat.replicate_group(repeater, "b") == ("a", 2)


def test_optuna_searchs_study_and_trials_are_reachable():
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    def space(trial):
        trial.suggest_float("x", 0, 1)

    searcher = OptunaSearch(space=space, metric=["m"], mode=["max"])
    assert isinstance(_compat.optuna_study(searcher), optuna.Study)
    searcher.suggest("a")
    trial = _compat.optuna_trial(searcher, "a")
    assert isinstance(trial, optuna.Trial) and "x" in trial.params
    assert _compat.optuna_trial(searcher, "never asked") is None
