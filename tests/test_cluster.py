"""A real two-node Ray cluster on this machine: a head with no CPUs (so every trial runs on the
other node) and a worker node with 2 CPUs and 2 fake GPUs (`--num-gpus 2`: Ray packs trials by
GPU, torch sees no CUDA and trains on CPU), started in its own mount namespace with a tmpfs over
the driver's working folder, so it sees another filesystem, as a second machine would. Storage the
nodes share is a folder outside the hidden one, or an S3-compatible server on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

import procs
from conftest import error_lines
from test_sweep import _finished_children, client, runs_of, sweep

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not procs.can_hide_folders(), reason="needs root and unshare -m (mount namespaces)")]

SPEC = """
    name: {name}
    seed: 0
    data: {data}
    train: {{batch_size: 64, lr: 0.05, dense_epochs: 1, finetune_epochs: {finetune}}}
    schedule:
      method: {{choice: [oneshot, iterative]}}
      sparsity: {{uniform: [0.5, 0.9]}}
      step_size: 0.3
      step_epochs: 0.5
    search: {{sampler: random, num_trials: {trials}}}
    resources: {{cpus_per_trial: 0.5, gpus_per_trial: 0.5, max_concurrent: {concurrent}}}
    """


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    work = tmp_path_factory.mktemp("work")  # the driver's working folder: hidden from the worker node
    shared = tmp_path_factory.mktemp("shared")  # storage both nodes see (as an NFS mount would be)
    logs = tmp_path_factory.mktemp("logs")
    port, s3_port = procs.free_port(), procs.free_port()
    ray_tmp = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    started = []
    try:
        started.append(procs.s3_server(s3_port, "sweeps"))
        started.append(procs.ray_head(port, ray_tmp, num_cpus=0, log=logs / "head.log"))
        started.append(procs.ray_worker(port, num_cpus=2, num_gpus=2, log=logs / "worker.log", hide=work,
                                        env={**procs.S3_ENV, "PRUNETUNE_CACHE": str(work / "node-cache")}))
        yield {"address": f"127.0.0.1:{port}", "work": work, "shared": shared,
               "s3": f"s3://sweeps/prefix?endpoint_override=127.0.0.1:{s3_port}&scheme=http"}
    finally:
        for proc in reversed(started):
            procs.kill_session(proc)
        assert not any(procs.session_pids(p.pid) for p in started)


def write_spec(folder: Path, name: str, trials: int = 2, finetune: float = 1, extra: str = "",
               data: str = "{dataset: digits, image_size: 8}", concurrent: int = 4) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(textwrap.dedent(SPEC.format(name=name, trials=trials, finetune=finetune, data=data,
                                                concurrent=concurrent))
                    + textwrap.dedent(extra))
    return path


def env_for(cluster) -> dict:
    return {**os.environ, **procs.ray_env(), **procs.S3_ENV}


def test_storage_the_nodes_do_not_share_is_refused_before_training(cluster):
    work = cluster["work"]
    spec = write_spec(work, "local-storage")
    started = time.monotonic()
    r = sweep([str(spec), "--address", cluster["address"]], work, timeout=300, env=env_for(cluster))
    assert r.returncode == 2, r.stderr[-3000:]
    assert "tracking.storage" in r.stderr and "node " in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(error_lines(r.stderr)) == 1, r.stderr
    assert time.monotonic() - started < 120
    assert not (work / "mlruns").exists()  # nothing written: no store, no sweep folder

    # data the worker node does not have (data.root under the hidden folder) is refused, naming the key
    data = work / "derma.npz"
    from conftest import write_medmnist
    write_medmnist(data)
    spec = write_spec(work, "hidden-data", data=f"{{dataset: medmnist, root: {data}, image_size: 8}}",
                      extra=f"tracking: {{storage: {cluster['shared']}}}\n")
    r = sweep([str(spec), "--address", cluster["address"]], work, timeout=300, env=env_for(cluster))
    assert r.returncode == 2 and "data.root" in r.stderr and str(data) in r.stderr, r.stderr[-3000:]
    assert not (work / "mlruns").exists()


def _child_checks(c, children, parent_id, worker_ips):
    for run in children:
        assert run.info.status == "FINISHED", run.data.tags.get("prunetune.error")
        assert run.data.tags["mlflow.parentRunId"] == parent_id
        assert run.data.tags["prunetune.node"] in worker_ips
        assert run.data.tags["prunetune.gpu_ids"] in ("0", "1")  # half a GPU each: packed two per GPU
        artifacts = {a.path for a in c.list_artifacts(run.info.run_id)}
        assert {"checkpoint", "config.yaml", "layer_sparsity.csv", "data", "figures"} <= artifacts
        assert "test_acc" in run.data.metrics


def _worker_node_ips(children) -> set:
    return {r.data.tags["prunetune.node"] for r in children}


def test_shared_path_storage_sigkill_of_the_driver_and_resume(cluster):
    work, shared = cluster["work"], cluster["shared"]
    # two at a time, so the second pair is running when the driver is killed
    spec = write_spec(work, "nfs", trials=4, finetune=6, concurrent=2,
                      extra=f"tracking: {{storage: {shared}}}\n")
    db = work / "mlruns" / "mlflow.db"
    env = {**env_for(cluster), "PRUNETUNE_CHECKPOINT_S": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "prunetune.cli", "sweep", str(spec),
                             "--address", cluster["address"]],
                            cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 400
    while _finished_children(db) < 1:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no trial finished in time"
        time.sleep(0.5)
    time.sleep(2)  # a finished trial is durable once Tune has snapshotted it (every second)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    _, before = runs_of(work, "nfs")
    finished_before = {r.data.tags["prunetune.trial_id"]: r.data.metrics["test_acc"]
                       for r in before if r.info.status == "FINISHED"}
    assert 1 <= len(finished_before) < 4
    assert (shared / "nfs" / "sweep.json").is_file() and not (work / "mlruns" / "tune").exists()

    r = sweep([str(spec), "--address", cluster["address"], "--resume"], work, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    parents, children = runs_of(work, "nfs")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 4 and len({r.data.tags["prunetune.trial_id"] for r in children}) == 4
    _child_checks(client(work), children, parents[0].info.run_id, _worker_node_ips(children))
    assert len(_worker_node_ips(children)) == 1  # one node did all the work: the head has no CPU
    for tid, acc in finished_before.items():  # finished trials were kept, not run again
        assert next(r for r in children if r.data.tags["prunetune.trial_id"] == tid).data.metrics["test_acc"] == acc
    assert not (shared / "nfs" / "resume").exists()  # trials' resume state is gone once the sweep completes
    assert [p.name for p in (shared / "_dense").iterdir()]  # the dense phase went to shared storage


def test_s3_storage_with_an_mlflow_server(cluster, tmp_path):
    work = cluster["work"] / "s3-run"  # still hidden from the worker node
    work.mkdir()
    port = procs.free_port()
    server = procs.mlflow_server(port, tmp_path / "server")
    try:
        uri = f"http://127.0.0.1:{port}"
        spec = write_spec(work, "s3", trials=2)
        env = env_for(cluster)
        args = ["--address", cluster["address"], "--storage", cluster["s3"], "--tracking-uri", uri]
        r = sweep([str(spec), *args], work, timeout=600, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        from mlflow.tracking import MlflowClient

        c = MlflowClient(uri)
        exp = c.get_experiment_by_name("s3")
        runs = c.search_runs([exp.experiment_id])
        parent = next(r for r in runs if r.data.tags.get("prunetune.kind") == "sweep")
        children = [r for r in runs if r.data.tags.get("prunetune.kind") == "trial"]
        assert len(children) == 2
        _child_checks(c, children, parent.info.run_id, _worker_node_ips(children))
        assert not (work / "mlruns").exists()  # neither the store nor the state is on the driver's disk
        assert list((tmp_path / "server" / "artifacts").rglob("model.pt"))  # uploaded through the server

        # the same sweep again is refused (its state is found in S3), --resume of a finished sweep
        # runs nothing new, and report and cka read it all from the server and S3
        r = sweep([str(spec), *args], work, timeout=300, env=env)
        assert r.returncode == 2 and "--resume" in r.stderr
        r = sweep([str(spec), *args, "--resume"], work, timeout=600, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        assert len([r for r in c.search_runs([exp.experiment_id]) if r.data.tags.get("prunetune.kind") == "trial"]) == 2
        for command in (["report", str(spec), "--out", str(tmp_path / "report")], ["cka", str(spec), "--top", "2"]):
            r = subprocess.run([sys.executable, "-m", "prunetune.cli", *command, "--tracking-uri", uri,
                                "--storage", cluster["s3"]], cwd=work, env=env, capture_output=True, text=True,
                               timeout=300)
            assert r.returncode == 0, (command, r.stderr[-3000:])
        assert (tmp_path / "report" / "results.csv").is_file()
        assert "CKA run:" in r.stdout
    finally:
        procs.kill_session(server)


def test_user_code_only_in_the_drivers_working_folder_reaches_the_node(cluster):
    """The model and data factories live in the driver's working folder, which the worker node
    cannot see: Ray's runtime env ships them, and the trials run there. A module whose own import
    is not shipped (a sibling file it imports) is refused before training, naming the node."""
    from test_plugins import DATA, MODEL

    work, shared = cluster["work"] / "plug-run", cluster["shared"]
    work.mkdir()
    (work / "plugnet.py").write_text(textwrap.dedent(MODEL))
    (work / "plugdata.py").write_text(textwrap.dedent(DATA))
    extra = (f"model: {{arch: 'plugnet:build', kwargs: {{width: {{choice: [4, 6]}}}}}}\n"
             f"tracking: {{storage: {shared}}}\n")
    spec = write_spec(work, "plug", trials=2, data="{dataset: 'plugdata:load', image_size: 8}", extra=extra)
    r = sweep([str(spec), "--address", cluster["address"]], work, timeout=600, env=env_for(cluster))
    assert r.returncode == 0, r.stderr[-3000:]
    parents, children = runs_of(work, "plug")
    assert len(children) == 2
    _child_checks(client(work), children, parents[0].info.run_id, _worker_node_ips(children))
    assert {r.data.params["model.arch"] for r in children} == {"plugnet:build"}

    # a sibling it imports by a computed name is not seen, so not shipped (one imported as written is)
    (work / "plughelper.py").write_text("WIDTH = 4\n")
    (work / "needs_helper.py").write_text("import importlib\nimportlib.import_module('plug' + 'helper')\n"
                                          "from plugnet import build\n")
    spec = write_spec(work, "plug-helper", trials=1, data="{dataset: 'plugdata:load', image_size: 8}",
                      extra=f"model: {{arch: 'needs_helper:build'}}\ntracking: {{storage: {shared}}}\n")
    r = sweep([str(spec), "--address", cluster["address"]], work, timeout=300, env=env_for(cluster))
    assert r.returncode == 2, r.stderr[-3000:]
    (line,) = error_lines(r.stderr)
    assert line.startswith("error: node ") and "model.arch: cannot import module 'needs_helper'" in line, line
    assert "No module named 'plughelper'" in line and len(line.splitlines()) == 1
    assert "plug-helper" not in {p.name for p in shared.iterdir()}  # nothing written for it
