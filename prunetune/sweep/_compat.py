"""Every use of a framework's private API, each in a small named function: the one file an upgrade
of Ray can break. `tests/test_compat.py` pins the versions it was written for (`WRITTEN_FOR`) and
checks that each private attribute is still there, so an upgrade fails there, loudly, and this
file is where to look. Optuna itself is used through its public API only (a stale trial is told
FAIL by its number, `stored_study.fail_unfinished`); Tune's OptunaSearch is reached into for its
study and its trials (`optuna_study`, `optuna_trial`).

Each function imports what it touches when called: importing this module imports no ray.
"""

from __future__ import annotations

import contextlib
import logging

log = logging.getLogger(__name__)

WRITTEN_FOR = {"ray": "2.60.0"}


# -- starting Ray ----------------------------------------------------------------------------------

def bootstrap_address(address: str) -> str:
    """Ray's own resolution of a cluster address ("auto": the cluster `ray start` recorded on this
    machine) to HOST:PORT; ConnectionError or ValueError where there is none."""
    from ray._private.services import canonicalize_bootstrap_address_or_die

    return canonicalize_bootstrap_address_or_die(address)


def system_config(settings: dict) -> dict:
    """`ray.init`'s keyword arguments for Ray's internal settings (its `_system_config`: here
    `enable_worker_prestart` and `preload_python_modules`)."""
    return {"_system_config": settings}


@contextlib.contextmanager
def lean_local_start(workers: int | None):
    """While a fresh local Ray starts: no dashboard API server, autoscaler monitor or log monitor,
    and at most `workers` idle workers started as the driver connects (see `_ray`'s text for why).
    Uses Ray's start-up parameters (`RayParams.no_monitor` and `include_log_monitor`, which `ray
    start` sets, and the raylet's `--num_prestart_python_workers`, which Ray sets to the number of
    CPUs) and skips `Node.start_api_server`; where this Ray has none of them, nothing changes."""
    try:
        from ray._private import node as ray_node
        from ray._private import parameter as ray_parameter
        from ray._private import services

        params_init, start_api_server = ray_parameter.RayParams.__init__, ray_node.Node.start_api_server
        start_process = services.start_ray_process
    except (ImportError, AttributeError) as exc:
        log.warning("this Ray lacks the start-up hooks of a lean local Ray (%s): it starts as usual", exc)
        yield
        return

    def lean_params(self, *args, **kwargs):
        params_init(self, *args, **kwargs)
        self.no_monitor, self.include_log_monitor = True, False

    ray_parameter.RayParams.__init__ = lean_params
    ray_node.Node.start_api_server = lambda self, **kwargs: None
    if workers is not None:
        services.start_ray_process = lambda command, *args, **kwargs: start_process(
            [_fewer_prestarted(arg, workers) for arg in command], *args, **kwargs)
    try:
        yield
    finally:
        ray_parameter.RayParams.__init__, ray_node.Node.start_api_server = params_init, start_api_server
        services.start_ray_process = start_process


PRESTART_FLAG = "--num_prestart_python_workers="  # the raylet's: how many idle workers it starts


def _fewer_prestarted(arg: str, workers: int) -> str:
    """The raylet's argument for how many idle workers it starts, bounded by `workers`."""
    if arg.startswith(PRESTART_FLAG) and arg[len(PRESTART_FLAG):].isdigit():
        return f"{PRESTART_FLAG}{min(int(arg[len(PRESTART_FLAG):]), workers)}"
    return arg


# -- Tune ------------------------------------------------------------------------------------------

def tune_actor_env() -> tuple[dict, set] | None:
    """Tune's table of what its trial actors' runtime env sets (`ray.tune.execution.class_cache`:
    DEFAULT_ENV_VARS, and ENV_VARS_TO_PROPAGATE from the driver), or None where this Tune has none."""
    try:
        from ray.tune.execution import class_cache
    except ImportError as exc:
        log.warning("this Tune has no actor env table (%s): trial actors may not take idle workers", exc)
        return None
    env = getattr(class_cache, "DEFAULT_ENV_VARS", None)
    propagate = getattr(class_cache, "ENV_VARS_TO_PROPAGATE", None)
    if isinstance(env, dict) and isinstance(propagate, set):
        return env, propagate
    log.warning("this Tune's actor env table has changed: trial actors may not take idle workers")
    return None


def set_tune_actor_env(env: dict, propagate: set) -> None:
    """Replace Tune's table (see `tune_actor_env`), for this process."""
    from ray.tune.execution import class_cache

    class_cache.DEFAULT_ENV_VARS, class_cache.ENV_VARS_TO_PROPAGATE = env, propagate


def tuner_callbacks(tuner) -> list:
    """The callbacks a restored `tune.Tuner` unpickled with its experiment (Tune offers no public
    way to reach them)."""
    return tuner._local_tuner.get_run_config().callbacks


def result_grid_trials(grid) -> list:
    """Tune's `Trial`s behind a `ResultGrid` (status, trial id, config, last result), trials that
    never started included."""
    return grid._experiment_analysis.trials


def optuna_study(optuna_search):
    """The Optuna study behind Tune's `OptunaSearch` (made in its constructor)."""
    return optuna_search._ot_study


def optuna_trial(optuna_search, trial_id: str):
    """The Optuna trial (an `optuna.Trial`, still running) that `OptunaSearch` asked for a Tune
    trial, or None."""
    return optuna_search._ot_trials.get(trial_id)


def replicate_group(repeater, trial_id: str) -> tuple[str, int]:
    """The group of a `tune.search.Repeater`'s trial: (its primary trial's id, how many replicates
    it has)."""
    group = repeater._trial_id_to_group[trial_id]
    return group.primary_trial_id, group.max_trials
