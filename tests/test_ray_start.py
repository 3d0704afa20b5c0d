"""How a sweep starts its own local Ray (prunetune/sweep/_ray.py): only the processes a one-sweep
cluster uses, and idle workers that have imported what a trial needs, which Tune's trial actors
take. Real Ray, started and stopped here."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import ray
from ray._private import ray_constants

from prunetune.sweep import _ray

import procs


def _now() -> float:
    """Seconds since boot, the clock /proc gives process start times in."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def _probe_class():
    """An actor class that reports what its process had imported when it was created, and when
    that process started (made in a function, so Ray ships it by value: the workers cannot import
    this test module)."""
    names = ("torch", *_ray.PRELOAD)

    class Probe:
        def __init__(self):
            import os
            import sys

            self.found = {name: name in sys.modules for name in names}
            with open("/proc/self/stat") as f:  # field 22: start time, in clock ticks since boot
                self.started = int(f.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")

        def report(self):
            return self.found, self.started

    return Probe


@pytest.fixture
def tune(monkeypatch):
    """Tune's actor-class table (`table`; ray_init empties its env vars for a fresh local Ray),
    restored after the test; `own_env()` puts Tune's own values back during it."""
    from ray.tune.execution import class_cache

    own = dict(class_cache.DEFAULT_ENV_VARS), set(class_cache.ENV_VARS_TO_PROPAGATE)

    def own_env():
        monkeypatch.setattr(class_cache, "DEFAULT_ENV_VARS", dict(own[0]))
        monkeypatch.setattr(class_cache, "ENV_VARS_TO_PROPAGATE", set(own[1]))

    own_env()
    return SimpleNamespace(table=class_cache, own_env=own_env)


def _start(monkeypatch, **env):
    for key, value in {"PRUNETUNE_PRELOAD": "1", "PRUNETUNE_LEAN_RAY": "1", **env}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("PL_DISABLE_FORK", raising=False)  # ray_init sets it; gone again after the test
    assert not ray.is_initialized()
    assert _ray.ray_init(None) is True


def test_a_sweeps_local_ray_runs_only_what_one_sweep_uses(monkeypatch, tune):
    _start(monkeypatch, PRUNETUNE_PRELOAD="0")
    try:
        started = set(ray._private.worker._global_node.all_processes)
        assert ray_constants.PROCESS_TYPE_RAYLET in started and ray_constants.PROCESS_TYPE_GCS_SERVER in started
        for left_out in (ray_constants.PROCESS_TYPE_DASHBOARD, ray_constants.PROCESS_TYPE_MONITOR,
                         ray_constants.PROCESS_TYPE_LOG_MONITOR):
            assert left_out not in started
        assert ray.get(ray.remote(lambda: 1 + 1).remote()) == 2
        assert _ray.ray_init(None) is False  # already connected: left as found
    finally:
        ray.shutdown()
    # the start-up hooks are Ray's own again: a plain ray.init starts everything
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        assert ray_constants.PROCESS_TYPE_LOG_MONITOR in ray._private.worker._global_node.all_processes
    finally:
        ray.shutdown()


def test_tunes_first_trial_actor_takes_a_worker_that_preloaded_the_trials_imports(monkeypatch, tune):
    _start(monkeypatch)
    try:
        requested = _now()
        probe = tune.table._ActorClassCache().get(_probe_class()).options(num_cpus=1).remote()
        found, started = ray.get(probe.report.remote(), timeout=120)
        assert started < requested  # one of the idle workers Ray started as the driver connected
        assert found == {"torch": True, **{name: True for name in _ray.PRELOAD}}
    finally:
        ray.shutdown()


def test_with_tunes_own_runtime_env_the_actor_gets_a_fresh_worker(monkeypatch, tune):
    """Why ray_init empties Tune's env-var table: with Tune's own runtime env its actors keep off
    the idle, preloaded workers (Ray starts a new process, which imports it all again)."""
    _start(monkeypatch)
    try:
        tune.own_env()
        requested = _now()
        probe = tune.table._ActorClassCache().get(_probe_class()).options(num_cpus=1).remote()
        _, started = ray.get(probe.report.remote(), timeout=120)
        assert started >= requested - 0.02  # a new process (the clock ticks are 10 ms)
    finally:
        ray.shutdown()


def _idle_workers() -> int:
    """The idle workers the raylet has started (their process title is `ray::IDLE`), once it has
    started any (they start together, as the driver connects)."""
    raylet = ray._private.worker._global_node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid

    def count() -> int:
        return len(procs.children(raylet, b"ray::IDLE"))

    deadline = time.monotonic() + 60
    while count() == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # any others would have started with the first
    return count()


@pytest.mark.parametrize("workers, started", [(None, 3), (1, 1)])
def test_a_sweeps_local_ray_starts_no_more_idle_workers_than_trials_run_at_once(monkeypatch, tune, workers,
                                                                                 started):
    """Ray starts one idle worker per CPU (three here); a sweep asks for no more than its
    max_concurrent trials need (each preloaded worker holds 0.8 GB)."""
    for key, value in {"PRUNETUNE_PRELOAD": "0", "PRUNETUNE_LEAN_RAY": "1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(_ray.os, "cpu_count", lambda: 3)
    assert _ray.ray_init(None, workers=workers) is True
    try:
        assert _idle_workers() == started
    finally:
        ray.shutdown()


def test_the_sweeps_ray_gives_tune_its_env_back_when_it_stops(monkeypatch, tune):
    """Emptying Tune's actor table is for the sweep's own local Ray: once it stops, a later sweep
    in this process that attaches to a cluster propagates Tune's env vars (PL_DISABLE_FORK, and
    the driver's RAY_* and AWS_*) to its actors again."""
    own = dict(tune.table.DEFAULT_ENV_VARS)
    assert own  # Tune's own table sets PL_DISABLE_FORK
    monkeypatch.setenv("PRUNETUNE_PRELOAD", "0")
    monkeypatch.delenv("PL_DISABLE_FORK", raising=False)
    with _ray.sweep_ray(None, workers=1):
        assert ray.is_initialized() and tune.table.DEFAULT_ENV_VARS == {}
    assert not ray.is_initialized()
    assert tune.table.DEFAULT_ENV_VARS == own
