"""Starting or attaching to Ray. Imports Ray's core only (not Tune), so the driver can start Ray
while Tune, MLflow and the rest are imported in a thread beside it.

A fresh local Ray (no --address) is started for one sweep and stopped with it, so two things make
its start cheaper (both measured in benchmarks/README.md, "Where a sweep's time goes"):

- Workers preload what a trial imports (torch, Tune, prunetune's trial code and figures, about
  5 s of imports). Ray starts its pool of idle workers as the driver connects; Tune's first trial
  actors take those workers, so the first trials start with everything imported. Ray would start
  one per CPU; no more are started than the sweep's trials can use at once.
- Only the processes a one-sweep cluster uses are started. `ray.init` has no switch for three of
  them (`ray start` has `--no-monitor` and `--include-log-monitor`): the dashboard's API server
  (with `include_dashboard=False` it serves only usage statistics), the autoscaler monitor (this
  cluster never scales) and the log monitor (worker output is not forwarded: `log_to_driver` is
  off). Together they cost about 2 s of start-up and 2.6 s of CPU. They are left out through Ray's
  own start-up parameters where this Ray version has them; otherwise Ray starts as usual.

What this needs of Ray's private API is in `_compat`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket

import ray

from prunetune import plugins
from prunetune.errors import UserError
from prunetune.sweep import _compat

# what a trial worker imports, preloaded by the workers of a fresh local Ray (pyplot: the trial's
# figures import it when they are drawn)
PRELOAD = ("prunetune.trial", "prunetune.figures", "matplotlib.pyplot", "prunetune.sweep.trainable")


def _address_host_port(address: str) -> tuple[str, int] | None:
    """The GCS host and port an address names ("auto": the cluster `ray start` recorded here)."""
    if address == "auto":
        try:
            address = _compat.bootstrap_address("auto")
        except (ConnectionError, ValueError) as exc:
            raise UserError(f"--address auto: no Ray cluster was started on this machine ({exc}); "
                            "start one with `ray start --head` or give HOST:PORT") from None
    host, _, port = address.removeprefix("ray://").rpartition(":")
    return (host, int(port)) if host and port.isdigit() else None


@contextlib.contextmanager
def sweep_ray(address: str | None, workers: int | None = None, py_modules: list[str] = ()):
    """Ray for one sweep (see `ray_init`). On exit it stops the Ray it started (now, not in an
    exit hook) and gives Tune's actor table its own env vars back, so a later sweep in this
    process that attaches to a cluster propagates them again; a connection it found open is left
    as it was."""
    pythonpath = os.environ.get("PYTHONPATH")
    started = ray_init(address, workers, py_modules)
    try:
        yield
    finally:
        if started:
            ray.shutdown()
        _give_tune_its_env_back()
        if pythonpath is None:  # as it was before a local Ray's workers were given the user's folders
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = pythonpath


def ray_init(address: str | None, workers: int | None = None, py_modules: list[str] = ()) -> bool:
    """Attach to the cluster at `address` (--address or $RAY_ADDRESS; "auto" is Ray's meaning: the
    one started on this machine), or start a fresh local Ray, whatever other clusters or stale
    records of them this machine holds. `workers`: how many trials run at once at most, so how
    many idle workers a fresh local Ray starts for them (default: one per CPU, Ray's own).
    `py_modules`: the user's code the spec names (`plugins.ship_paths`), shipped to a cluster's
    nodes with the job's runtime env; a fresh local Ray's workers import it from where the
    driver does (`plugins.worker_pythonpath`: they inherit the driver's environment, and a
    runtime env would keep Tune's actors off the preloaded workers). False when this process
    was already connected (the caller then leaves the connection as it found it)."""
    if ray.is_initialized():
        return False
    kwargs = dict(logging_level=logging.WARNING, log_to_driver=False)
    if address:
        host_port = _address_host_port(address)
        if host_port is None:
            raise UserError(f"--address {address!r}: expected HOST:PORT, ray://HOST:PORT or auto")
        try:  # Ray itself waits minutes for a head that does not answer
            socket.create_connection(host_port, timeout=10).close()
        except OSError as exc:
            raise UserError(f"--address {address}: no Ray cluster answers at {host_port[0]}:{host_port[1]} "
                            f"({exc.strerror or exc}); check the address and that the head node runs "
                            "(`ray status` on it)") from None
        if py_modules:
            kwargs["runtime_env"] = {"py_modules": list(py_modules)}
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise UserError(f"--address: cannot attach to a Ray cluster at {address} ({exc})") from None
        return True
    # Ray starts idle workers (one per CPU) as the driver connects; the ones it would start
    # with the raylet, before any driver, cannot take Tune's actors and are not started. Each
    # preloaded one holds 0.8 GB and 3 s of CPU to start: no more are started than trials can
    # run at once (more start on demand, preloaded too, if the sweep asks for them).
    config: dict = {"enable_worker_prestart": False}
    if os.environ.get("PRUNETUNE_PRELOAD", "1") == "1":
        config["preload_python_modules"] = list(PRELOAD)
    # what Tune sets for its trial actors (see _trials_take_idle_workers): the workers inherit it
    os.environ.setdefault("PL_DISABLE_FORK", "1")
    pythonpath = plugins.worker_pythonpath()
    if pythonpath:
        os.environ["PYTHONPATH"] = pythonpath
    with _one_sweep_head(workers):
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
                 **_compat.system_config(config), **kwargs)
    _trials_take_idle_workers()
    return True


@contextlib.contextmanager
def _one_sweep_head(workers: int | None = None):
    """While a fresh local Ray starts: no dashboard API server, autoscaler monitor or log monitor
    (see the module's text), and at most `workers` idle workers started as the driver connects.
    PRUNETUNE_LEAN_RAY=0 starts Ray as usual."""
    if os.environ.get("PRUNETUNE_LEAN_RAY", "1") != "1":
        yield
        return
    with _compat.lean_local_start(workers):
        yield


def _trials_take_idle_workers() -> None:
    """Tune creates its trial actors with a runtime env that only sets environment variables
    (`PL_DISABLE_FORK`, and those of the driver's AWS_* and RAY_* variables it propagates). On a
    fresh local Ray every worker inherits the driver's environment, so those variables are there
    anyway; but an actor with a runtime env of its own cannot take one of Ray's idle (preloaded)
    workers: Ray starts a new process for it, which imports everything again (about 4 s). So this
    empties Tune's table, for this process; where this Tune has no such table, nothing changes.
    (Imports Tune: the driver has it imported, in its thread, by the time Ray is up.)"""
    global _tune_env
    own = _compat.tune_actor_env()
    if own is None:
        return
    if _tune_env is None:
        _tune_env = own
    _compat.set_tune_actor_env({}, set())


_tune_env: tuple[dict, set] | None = None  # Tune's own table, while a sweep's local Ray has it emptied


def _give_tune_its_env_back() -> None:
    global _tune_env
    if _tune_env is not None:
        _compat.set_tune_actor_env(*_tune_env)
        _tune_env = None
