"""Checks on the driver once Ray is up, before any trial trains: some node can take a trial, and
every node that can reaches the storage, sees the same data files, runs the same prunetune and
imports the user's model and data factories (`nodecheck.problems`, run there as a Ray task).
Each problem is a UserError naming the node and the key to change."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import ray

from prunetune import nodecheck, pretrained
from prunetune.errors import UserError, first_line
from prunetune.spec import LoadedSpec
from prunetune.storage import Storage


def _fits(node: dict, cpus: float, gpus: float) -> bool:
    return node["Resources"].get("CPU", 0) >= cpus and node["Resources"].get("GPU", 0) >= gpus


def check_resources(cpus: float, gpus: float) -> None:
    """A request no node can meet is bad input (exit 2), not a sweep that waits forever."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if not any(_fits(n, cpus, gpus) for n in nodes):
        have = ", ".join(f"{n['Resources'].get('CPU', 0):g} CPU / {n['Resources'].get('GPU', 0):g} GPU" for n in nodes)
        raise UserError(f"resources: no Ray node can give a trial {cpus:g} CPU and {gpus:g} GPU "
                        f"(nodes: {have or 'none'}); lower resources.cpus_per_trial / gpus_per_trial")


def _trial_paths(loaded: LoadedSpec) -> dict[str, str]:
    """The files trials read from the nodes' own disks: data.root and model.weights (each value
    a searched key may take; not torchvision's weight names: a node without the file downloads it
    into its own torchvision cache when a trial builds the model)."""
    paths = {}
    for key in ("data.root", "model.weights"):
        entry = loaded.space.get(key)
        values = entry.probe_values() if entry else [getattr(getattr(loaded.fixed_spec(), key.split(".")[0]),
                                                             key.split(".")[1])]
        for i, value in enumerate(v for v in values if v and not (key == "model.weights" and pretrained.is_name(v))):
            paths[key if i == 0 else f"{key}[{i}]"] = str(value)
    return paths


def check_nodes(storage: Storage, loaded: LoadedSpec, user_code: list[tuple[str, str]], cpus: float, gpus: float,
                local: bool, timeout_s: float = 120) -> None:
    """Before any trial trains: on every alive node that can take a trial, a task checks that the
    node reaches the storage (reads what the driver wrote there; the driver reads what it wrote),
    sees the same data files, runs the same prunetune and imports the same `user_code`. A fresh
    local Ray is this machine only: the driver checks the storage itself. Raises UserError naming
    the node and the key."""
    probe = f"_probe-{uuid.uuid4().hex[:12]}"
    created = _missing_top(storage)
    try:
        storage.write_text(f"{probe}/driver", probe)
    except OSError as exc:
        raise UserError(f"tracking.storage: cannot write to {storage.uri} ({first_line(exc)})") from None
    try:
        if local:
            return
        expected = nodecheck.expectations(_trial_paths(loaded), user_code)
        nodes = [n for n in ray.nodes() if n.get("Alive") and _fits(n, cpus, gpus)]
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        node_problems = ray.remote(num_cpus=0)(nodecheck.problems)  # runs on each node
        refs = {n["NodeID"]: node_problems.options(
                    scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
                ).remote(storage.uri, probe, n["NodeID"], expected) for n in nodes}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
        for node in nodes:
            name = f"node {node['NodeManagerAddress']} ({node['NodeID'][:8]})"
            ref = refs[node["NodeID"]]
            if ref not in ready:
                raise UserError(f"{name} did not answer a check in {timeout_s:.0f} s; is it overloaded, "
                                "or prunetune not installed there?")
            try:
                problems = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - the task could not even run there
                raise UserError(f"{name} cannot run prunetune ({type(exc).__name__}: "
                                f"{str(exc).strip().splitlines()[-1][:200]}); install the same prunetune "
                                "on every node") from None
            if not problems and not storage.exists(f"{probe}/{node['NodeID']}"):
                problems = [f"wrote to {storage.uri}, but the driver does not see it (tracking.storage: use "
                            "storage every node and the driver share)"]
            if problems:
                raise UserError(f"{name} {problems[0]}")
    finally:
        storage.delete(probe)
        if created is not None and not storage.listdir():
            shutil.rmtree(created, ignore_errors=True)  # leave no trace of a check


def _missing_top(storage: Storage) -> Path | None:
    """The outermost local folder of the storage path that does not exist yet (None: it exists)."""
    if not storage.is_local or storage.exists():
        return None
    top = storage.local_path()
    while not top.parent.exists():
        top = top.parent
    return top
