"""Sweeps with real Ray (local, small), real Optuna and a real SQLite MLflow store in temp dirs.
The CLI runs in a subprocess, as a user runs it."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from prunetune.registry import SAMPLERS

import procs

pytestmark = pytest.mark.slow

TINY = """
    name: {name}
    seed: 0
    data: {{dataset: digits, image_size: 8}}
    train: {{batch_size: 128, lr: 0.05, dense_epochs: 1, finetune_epochs: {finetune}}}
    schedule:
      method: {{choice: [oneshot, iterative, lottery]}}
      sparsity: {{uniform: [0.5, 0.9]}}
      step_size: {{choice: [0.3, 0.4]}}
      step_epochs: 0.5
      rewind_epoch: {{int: [0, 1]}}
    search: {{sampler: {sampler}, num_trials: {trials}}}
    resources: {{cpus_per_trial: {cpus}, max_concurrent: {concurrent}}}
    """


def write_spec(tmp_path: Path, name="tiny", trials=3, concurrent=2, cpus=1, sampler="tpe", finetune=1,
               extra: str = "") -> Path:
    p = tmp_path / f"{name}.yaml"
    p.write_text(textwrap.dedent(TINY.format(name=name, trials=trials, concurrent=concurrent, cpus=cpus,
                                             sampler=sampler, finetune=finetune)) + textwrap.dedent(extra))
    return p


def sweep(args, cwd, timeout=600, **kw):
    return subprocess.run([sys.executable, "-m", "prunetune.cli", "sweep", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, **kw)


def client(tmp_path):
    from mlflow.tracking import MlflowClient
    return MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")


def runs_of(tmp_path, name):
    c = client(tmp_path)
    exp = c.get_experiment_by_name(name)
    runs = c.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("prunetune.kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("prunetune.kind") == "trial"]
    return parents, children


PER_EPOCH = {"train_loss", "train_acc", "val_loss", "val_acc", "sparsity", "lr", "epoch_seconds"}
FINAL = {"test_acc", "test_top5", "test_loss", "test_balanced_acc", "test_macro_f1", "sparsity", "nonzero_params",
         "total_params", "compression_ratio", "flops_dense", "flops_sparse", "theoretical_speedup",
         "checkpoint_bytes", "train_epochs_total", "trial_seconds"}


def assert_complete_child(c, run, parent_id):
    assert run.info.status == "FINISHED", run.data.tags.get("prunetune.error")
    assert run.data.tags["mlflow.parentRunId"] == parent_id
    assert run.data.tags["prunetune.trial_id"] and run.data.tags["prunetune.sweep"]
    assert len(run.data.tags["prunetune.config_hash"]) == 16
    assert FINAL <= set(run.data.metrics), FINAL - set(run.data.metrics)
    epochs = int(run.data.metrics["train_epochs_total"] + 0.999)
    for key in PER_EPOCH:
        steps = [m.step for m in c.get_metric_history(run.info.run_id, key)]
        if key in ("sparsity", "val_acc"):
            assert steps[-1] == epochs  # the final value, logged once more after the last epoch
            steps = steps[:-1]
        assert steps == list(range(epochs)), (key, steps)
    artifacts = {a.path for a in c.list_artifacts(run.info.run_id)}
    assert {"checkpoint", "config.yaml", "layer_sparsity.csv", "data", "figures"} <= artifacts
    method = run.data.params["schedule.method"]
    assert run.data.metrics["sparsity"] == pytest.approx(float(run.data.params["schedule.sparsity"]), abs=1e-3)
    return method


def assert_tune_counts_only_what_it_reads(sweep_dir: Path) -> None:
    import json

    [state] = sweep_dir.rglob("experiment_state-*.json")
    trials = json.loads(state.read_text())["trial_data"]
    assert trials
    for _, metadata in trials:
        counted = set(json.loads(metadata)["metric_analysis"])
        assert {"epoch", "val_acc"} <= counted and not counted & (FINAL | PER_EPOCH) - {"val_acc"}, counted


def test_small_sweep_and_refused_rerun(tmp_path):
    spec = write_spec(tmp_path, trials=4)
    r = sweep([str(spec)], tmp_path, env={**os.environ, "PRUNETUNE_PROGRESS_S": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "best run:" in r.stdout and "prunetune ui" in r.stdout
    assert "top trials by val_acc" in r.stdout and "test_acc" in r.stdout  # chosen on val, test reported
    assert "4/4 done" in r.stderr  # progress lines
    # what it is about to do comes first, then a line per start-up stage, before any trial's line
    lines = r.stderr.splitlines()
    assert lines[0].startswith("sweep tiny: 4 trials (tpe), at most 2 at once; runs go to sqlite:///"), lines[:3]
    assert lines[0].endswith("tune/tiny/logs/driver.log")
    stages = [next(i for i, line in enumerate(lines) if line.startswith(start))
              for start in ("reading digits at 8 px", "starting Ray (", "running the trials", "[")]
    assert stages == sorted(stages), lines[:10]
    # live progress, piped: periodic lines per running trial with its phase and epoch x/y
    live = [line for line in r.stderr.splitlines() if line.startswith("  ") and " epoch " in line]
    assert live and all("/" in line.split(" epoch ")[1] for line in live), r.stderr[-3000:]
    assert any(" dense " in line for line in live) and any(" val_acc " in line for line in live)
    # no library noise: Ray's, MLflow's and Optuna's lines went to the sweep's log
    for noise in ("WARNING", "ExperimentalWarning", "Creating initial MLflow", "A new study created", "INFO"):
        assert noise not in r.stderr, noise
    log = (tmp_path / "mlruns" / "tune" / "tiny" / "logs" / "driver.log").read_text()
    assert "A new study created" in log and "ExperimentalWarning" in log
    parents, children = runs_of(tmp_path, "tiny")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 4
    # 2 trials at once (max_concurrent 2, 1 CPU each of 2): their runs overlap in time, and a
    # done line counts the trial that took the ended one's place (not "1 running" throughout)
    spans = sorted((run.info.start_time, run.info.end_time) for run in children)
    assert sum(b[0] < a[1] for a, b in zip(spans, spans[1:])) >= 2, spans
    assert any(" done, 2 running, " in line for line in r.stderr.splitlines()), r.stderr[-3000:]
    c = client(tmp_path)
    assert {"tiny.yaml", "search_space.json"} <= {a.path for a in c.list_artifacts(parents[0].info.run_id)}
    # the parent run shows the sweep: its fixed keys as params, its search space in its description
    sweep_params = parents[0].data.params
    assert sweep_params["model.arch"] == "simple_cnn" and sweep_params["search.num_trials"] == "4"
    assert "schedule.sparsity" not in sweep_params  # searched: each trial's own
    assert "search space:\n  schedule.method: choice [" in parents[0].data.tags["mlflow.note.content"]
    assert "\n  schedule.sparsity: uniform [0.5, 0.9]" in parents[0].data.tags["mlflow.note.content"]
    # a trial's run logs the keys its trial read: none its method ignores, no null default
    unused = {"oneshot": {"schedule.step_size", "schedule.step_epochs", "schedule.rewind_epoch"},
              "iterative": {"schedule.rewind_epoch"}, "lottery": {"schedule.step_epochs"}}
    for run in children:
        params = run.data.params
        assert {"schedule.sparsity", "schedule.method", "train.lr", "seed"} <= set(params)
        assert not (unused[params["schedule.method"]] | {"model.weights", "data.root", "train.budget_epochs",
                                                         "distill", "schedule.remove", "resources.max_concurrent"}
                    ) & set(params), params
    for run in children:
        assert_complete_child(c, run, parents[0].info.run_id)
    assert (tmp_path / "mlruns" / "tune" / "tiny" / "sweep.json").is_file()
    assert not (tmp_path / "mlruns" / "tune" / "tiny" / "tracking-journal.jsonl").exists()  # all written
    # what an MLflow user sees: each trial's dataset input (one split, one digest), and the best
    # trial by the objective on the parent run (its metrics and its run id)
    inputs = [c.get_run(run.info.run_id).inputs.dataset_inputs for run in children]
    assert all(len(i) == 1 and i[0].dataset.name == "digits" for i in inputs)
    assert len({i[0].dataset.digest for i in inputs}) == 1 and '"train": 1347' in inputs[0][0].dataset.profile
    parent = c.get_run(parents[0].info.run_id)
    best = next(run for run in children if run.info.run_id == parent.data.tags["prunetune.best_run_id"])
    assert best.data.metrics["val_acc"] == max(run.data.metrics["val_acc"] for run in children)
    assert parent.data.metrics["val_acc"] == best.data.metrics["val_acc"]
    assert parent.data.metrics["test_acc"] == best.data.metrics["test_acc"]
    assert parent.data.tags["prunetune.best_trial_id"] == best.data.tags["prunetune.trial_id"]
    # what an Optuna user sees: named objectives, and each trial's Tune trial and MLflow run
    import optuna

    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path}/mlruns/optuna.db")
    assert study.metric_names == ["val_acc"]
    runs = {run.data.tags["prunetune.trial_id"]: run.info.run_id for run in children}
    assert {t.user_attrs["trial_id"]: t.user_attrs["mlflow_run_id"] for t in study.trials} == runs
    # and the study leads back to the sweep's MLflow experiment and parent run
    assert study.user_attrs == {"mlflow_tracking_uri": f"sqlite:///{tmp_path}/mlruns/mlflow.db",
                                "mlflow_parent_run_id": parents[0].info.run_id,
                                "mlflow_experiment_id": parents[0].info.experiment_id}
    # Tune's own record of each trial, rewritten every second, counts statistics only of the
    # numbers Tune reads (the objective, ASHA's val_acc and epoch), not of every metric
    assert_tune_counts_only_what_it_reads(tmp_path / "mlruns" / "tune" / "tiny")

    # the same sweep again: refused, with a hint, and nothing written
    db_before = (tmp_path / "mlruns" / "mlflow.db").stat().st_mtime_ns
    again = sweep([str(spec)], tmp_path)
    assert again.returncode == 2
    assert "--resume" in again.stderr and "--restart" in again.stderr and "Traceback" not in again.stderr
    assert (tmp_path / "mlruns" / "mlflow.db").stat().st_mtime_ns == db_before
    assert len(runs_of(tmp_path, "tiny")[1]) == 4

    # a changed search space is refused on --resume
    changed = write_spec(tmp_path, trials=4, extra="")
    changed.write_text(changed.read_text().replace("[0.5, 0.9]", "[0.4, 0.9]"))
    r = sweep([str(changed), "--resume"], tmp_path)
    assert r.returncode == 2 and "search space" in r.stderr


def test_conditional_space_in_optuna(tmp_path):
    """Optuna samples step_size only for iterative/lottery and rewind_epoch only for lottery."""
    spec = write_spec(tmp_path, name="grid", sampler="grid", trials=5, finetune=0.5,
                      extra="")
    spec.write_text(spec.read_text().replace("sparsity: {uniform: [0.5, 0.9]}", "sparsity: {choice: [0.6]}")
                    .replace("rewind_epoch: {int: [0, 1]}", "rewind_epoch: {choice: [0]}"))
    r = sweep([str(spec)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    parents, children = runs_of(tmp_path, "grid")
    c = client(tmp_path)
    methods = sorted(assert_complete_child(c, run, parents[0].info.run_id) for run in children)
    assert set(methods) == {"oneshot", "iterative", "lottery"}


def test_failing_trial_does_not_stop_the_sweep(tmp_path):
    spec = tmp_path / "failing.yaml"
    spec.write_text(textwrap.dedent("""
        name: failing
        data: {dataset: digits, image_size: 8}
        train: {batch_size: 128, lr: {choice: [0.05, 1.0e+12]}, dense_epochs: 0, finetune_epochs: 1}
        schedule: {method: oneshot, sparsity: 0.5}
        search: {sampler: grid, num_trials: 2}
        """))
    r = sweep([str(spec), "--verbose"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "1 failed" in r.stderr
    assert "A new study created" in r.stderr  # --verbose: the libraries' lines too
    assert "retried" not in r.stderr  # its own error: not retried (only dead workers and nodes are)
    parents, children = runs_of(tmp_path, "failing")
    states = sorted(run.info.status for run in children)
    assert states == ["FAILED", "FINISHED"]
    failed = next(run for run in children if run.info.status == "FAILED")
    assert "non-finite" in failed.data.tags["prunetune.error"]
    assert failed.data.params["train.lr"] == "1000000000000.0"
    # the stored Optuna study holds the failed trial as FAIL, with its params
    import optuna

    study = optuna.load_study(study_name="failing", storage=f"sqlite:///{tmp_path}/mlruns/optuna.db")
    by_state = {t.state.name: t.params["train.lr"] for t in study.get_trials(deepcopy=False)}
    assert by_state == {"FAIL": 1.0e12, "COMPLETE": 0.05}


def test_four_concurrent_trials_on_sqlite_lose_no_metric(tmp_path):
    spec = write_spec(tmp_path, name="concurrent", trials=4, concurrent=4, cpus=0.5, finetune=2)
    r = sweep([str(spec)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "database is locked" not in r.stderr
    parents, children = runs_of(tmp_path, "concurrent")
    assert len(children) == 4
    c = client(tmp_path)
    for run in children:
        assert_complete_child(c, run, parents[0].info.run_id)


def _finished_children(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            return con.execute("SELECT count(*) FROM runs r JOIN tags t ON r.run_uuid = t.run_uuid "
                               "WHERE r.status = 'FINISHED' AND t.key = 'prunetune.kind' AND t.value = 'trial'"
                               ).fetchone()[0]
    except sqlite3.Error:
        return 0


def _start_and_wait(args, cwd, db, finished, timeout=300):
    # checkpoint every epoch, so resumed trials restart from a checkpoint, not from scratch
    env = {**os.environ, "PRUNETUNE_CHECKPOINT_S": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "prunetune.cli", "sweep", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + timeout
    while _finished_children(db) < finished:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "trials did not finish in time"
        time.sleep(0.5)
    return proc


def _check_resumed(tmp_path, name, trials, before):
    parents, children = runs_of(tmp_path, name)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == trials  # exactly one child per trial: no duplicates
    assert len({r.data.tags["prunetune.trial_id"] for r in children}) == trials
    c = client(tmp_path)
    for run in children:
        assert_complete_child(c, run, parents[0].info.run_id)  # no orphan left RUNNING, no duplicate steps
    after = {r.data.tags["prunetune.trial_id"]: r.data.metrics["test_acc"] for r in children}
    for trial_id, acc in before.items():  # finished trials are kept, not run again
        assert after[trial_id] == acc
    # the resumed sweep continued the same Optuna study: every trial told, none left running
    import optuna

    study = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path}/mlruns/optuna.db")
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert states.count(optuna.trial.TrialState.COMPLETE) == trials, states
    assert optuna.trial.TrialState.RUNNING not in states
    told = sorted(r.data.metrics["val_acc"] for r in children)  # the objective (default val_acc)
    assert sorted(v for t in study.get_trials(deepcopy=False) if t.values for v in t.values) == told


def _finished_before(tmp_path, name):
    _, children = runs_of(tmp_path, name)
    return {r.data.tags["prunetune.trial_id"]: r.data.metrics["test_acc"]
            for r in children if r.info.status == "FINISHED"}


@pytest.mark.parametrize("sampler", ["tpe", "nsga2"])
def test_sigkill_then_resume(tmp_path, sampler):
    spec = write_spec(tmp_path, name="killed", trials=5, finetune=8, sampler=sampler)
    # trials of several seconds each, so some are still running when the driver is killed
    spec.write_text(spec.read_text().replace("image_size: 8", "image_size: 16")
                    .replace("batch_size: 128", "batch_size: 32"))
    db = tmp_path / "mlruns" / "mlflow.db"
    proc = _start_and_wait([str(spec)], tmp_path, db, finished=2)
    time.sleep(2)  # a finished trial is durable once Tune has snapshotted it (every second)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and what it started, as a crash would
    proc.wait()
    before = _finished_before(tmp_path, "killed")
    assert 2 <= len(before) < 5
    resume = tmp_path / "mlruns" / "tune" / "killed" / "resume"
    saved = {p.stem for p in resume.glob("*.pt")}  # unfinished trials' own resume state
    assert saved and not saved & set(before)
    r = sweep([str(spec), "--resume"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    _check_resumed(tmp_path, "killed", 5, before)
    assert not resume.exists()  # removed once the sweep completes


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_runs_a_sweep(tmp_path, sampler):
    """The contract over `registry.SAMPLERS` (a sampler added there is swept here): a 2-trial
    sweep whose searcher Tune pickles into its state, on a space every sampler takes (choices)."""
    spec = write_spec(tmp_path, name=sampler, trials=2, sampler=sampler, finetune=0.5)
    spec.write_text(spec.read_text().replace("{uniform: [0.5, 0.9]}", "{choice: [0.5, 0.8]}")
                    .replace("{int: [0, 1]}", "{choice: [0, 1]}"))
    r = sweep([str(spec)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    parents, children = runs_of(tmp_path, sampler)
    assert len(children) == 2 and parents[0].info.status == "FINISHED"
    assert all(run.info.status == "FINISHED" for run in children)


def test_ctrl_c_exits_130_and_resumes(tmp_path):
    spec = write_spec(tmp_path, name="interrupted", trials=4, finetune=3)
    db = tmp_path / "mlruns" / "mlflow.db"
    proc = _start_and_wait([str(spec)], tmp_path, db, finished=1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert f"prunetune sweep {spec} --resume" in err
    before = _finished_before(tmp_path, "interrupted")
    r = sweep([str(spec), "--resume"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    _check_resumed(tmp_path, "interrupted", 4, before)


def test_sweep_on_an_existing_cluster(tmp_path):
    import tempfile

    port = procs.free_port()
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's unix socket paths must fit 107 bytes
    head = procs.ray_head(port, ray_tmp, num_cpus=2, log=tmp_path / "head.log")
    try:
        spec = write_spec(tmp_path, name="cluster", trials=2)
        r = sweep([str(spec), "--address", f"127.0.0.1:{port}"], tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        parents, children = runs_of(tmp_path, "cluster")
        assert len(children) == 2 and all(run.info.status == "FINISHED" for run in children)
        assert all(run.data.tags["prunetune.gpu_ids"] == "" for run in children)  # no GPU asked for
        # a request this cluster cannot meet is refused at once
        r = sweep([str(spec), "--restart", "--address", f"127.0.0.1:{port}", "--set", "resources.gpus_per_trial=1"],
                  tmp_path, timeout=120)
        assert r.returncode == 2 and "GPU" in r.stderr and "Traceback" not in r.stderr
    finally:
        procs.kill_session(head)
        assert not procs.session_pids(head.pid)
        import shutil
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_no_address_is_a_fresh_local_ray_and_a_dead_address_is_refused_at_once(tmp_path):
    """A stale record of a `ray start --head` that was killed (Ray's ray_current_cluster file)
    does not make a plain sweep try to attach; an address where no cluster answers is an exit-2
    error within seconds, naming the address, with nothing written."""
    dead = f"127.0.0.1:{procs.free_port()}"
    ray_tmp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text(dead + "\n")
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp)}  # Ray looks for the record in $RAY_TMPDIR/ray
    try:
        spec = write_spec(tmp_path, name="fresh", trials=1)
        for address in (["--address", dead], ["--address", "auto"]):
            started = time.monotonic()
            r = sweep([str(spec), *address], tmp_path, timeout=120, env=env)
            assert r.returncode == 2, r.stderr[-3000:]
            # the address named (auto: the recorded one, which Ray resolves to this machine's IP)
            assert dead.split(":")[1] in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
            assert time.monotonic() - started < 20
            assert not (tmp_path / "mlruns").exists()
        r = sweep([str(spec)], tmp_path, timeout=600, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        assert len(runs_of(tmp_path, "fresh")[1]) == 1
    finally:
        import shutil
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _trial_workers(sid: int) -> list[int]:
    """PIDs of the Ray worker processes running trials in session `sid`."""
    pids = []
    for pid in procs.session_pids(sid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if cmdline.startswith(b"ray::ImplicitFunc"):
            pids.append(pid)
    return pids


def test_a_killed_worker_is_retried_from_its_saved_state(tmp_path):
    """SIGKILL of a trial's Ray worker (as the OOM killer does): the trial restarts from its last
    saved state, up to resources.max_retries times; the output says so in one line, no Ray dump."""
    spec = tmp_path / "retry.yaml"
    spec.write_text(textwrap.dedent("""
        name: retry
        data: {dataset: digits, image_size: 16}
        train: {batch_size: 32, lr: 0.05, dense_epochs: 1, finetune_epochs: 8}
        schedule: {method: {choice: [oneshot, iterative]}, sparsity: 0.6, step_size: 0.3, step_epochs: 0.5}
        search: {sampler: grid, num_trials: 2}
        resources: {cpus_per_trial: 1, max_concurrent: 2}
        """))
    env = {**os.environ, "PRUNETUNE_CHECKPOINT_S": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "prunetune.cli", "sweep", str(spec)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    resume = tmp_path / "mlruns" / "tune" / "retry" / "resume"
    deadline = time.monotonic() + 300
    while len(list(resume.glob("*.pt"))) < 2:  # both trials have saved a state after the dense phase
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.2)
    os.kill(_trial_workers(proc.pid)[0], signal.SIGKILL)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    retried = [line for line in err.splitlines() if "retried" in line]
    assert len(retried) == 1 and "(1/2)" in retried[0] and "worker process died" in retried[0], err[-3000:]
    assert "The actor died" not in err and "Traceback" not in err
    parents, children = runs_of(tmp_path, "retry")
    assert len(children) == 2
    c = client(tmp_path)
    for run in children:
        assert_complete_child(c, run, parents[0].info.run_id)  # every epoch once, final metrics, artifacts
    resumed = [run for run in children if "prunetune.resumed_from_epoch" in run.data.tags]
    assert len(resumed) == 1 and int(resumed[0].data.tags["prunetune.resumed_from_epoch"]) >= 1


def test_dry_run_and_bad_resources_write_nothing(tmp_path):
    spec = write_spec(tmp_path, name="dry")
    r = sweep([str(spec), "--dry-run"], tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "schedule.method: choice" in r.stdout and "3 trials" in r.stdout
    r = sweep([str(spec), "--set", "resources.gpus_per_trial=1"], tmp_path, timeout=180)
    assert r.returncode == 2 and "gpus_per_trial" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "mlruns").exists()


def test_two_objectives_nsga2_and_asha(tmp_path):
    """A Pareto sweep (NSGA-II over accuracy and non-zero weights) with ASHA early stopping: stopped
    trials are closed as KILLED with a tag, finished ones carry both objectives."""
    spec = write_spec(tmp_path, name="pareto", trials=4, finetune=3, sampler="nsga2",
                      extra="""
                      """)
    spec.write_text(spec.read_text().replace(
        "search: {sampler: nsga2, num_trials: 4}",
        "search:\n  sampler: nsga2\n  num_trials: 4\n  early_stop: asha\n  objectives:\n"
        "    - {metric: test_acc, mode: max}\n    - {metric: nonzero_params, mode: min}"))
    r = sweep([str(spec)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    parents, children = runs_of(tmp_path, "pareto")
    assert len(children) == 4 and parents[0].info.status == "FINISHED"
    # selecting on the test split is said once on the terminal and kept as the parent's description
    note = [line for line in r.stderr.splitlines() if "test-split" in line]
    description = parents[0].data.tags["mlflow.note.content"].splitlines()
    assert len(note) == 1 and description[0] == note[0] and description[1] == "search space:", r.stderr[-2000:]
    for run in children:
        if run.info.status == "KILLED":
            assert run.data.tags["prunetune.state"] == "stopped_early"
        else:
            assert run.info.status == "FINISHED"
            assert {"test_acc", "nonzero_params"} <= set(run.data.metrics)
    assert "nonzero_params" in r.stdout  # both objectives in the summary table
    # in the stored study: a trial stopped early is PRUNED, a finished one COMPLETE with both values
    import optuna

    study = optuna.load_study(study_name="pareto", storage=f"sqlite:///{tmp_path}/mlruns/optuna.db")
    states = sorted(t.state.name for t in study.get_trials(deepcopy=False))
    killed = sum(run.info.status == "KILLED" for run in children)
    assert states == sorted(["PRUNED"] * killed + ["COMPLETE"] * (4 - killed))
    assert all(len(t.values) == 2 for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE")


def test_ui_serves_the_store_on_localhost(tmp_path):
    import urllib.request

    spec = write_spec(tmp_path, name="ui")
    r = subprocess.run([sys.executable, "-m", "prunetune.cli", "ui", str(spec)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "does not exist yet" in r.stderr  # no store yet: nothing to serve
    (tmp_path / "mlruns").mkdir()
    from mlflow.tracking import MlflowClient
    MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db").search_experiments()  # creates the store
    experiment = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db").create_experiment("ui")
    port = procs.free_port()
    proc = subprocess.Popen([sys.executable, "-m", "prunetune.cli", "ui", str(spec), "--port", str(port)],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                    assert resp.status == 200
                    break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-2000:]
                time.sleep(0.5)
        for page in ("/", "/ajax-api/2.0/mlflow/experiments/search?max_results=10", "/nothing-here") * 4:
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"http://127.0.0.1:{port}{page}", timeout=5).read()
        # SIGTERM to prunetune alone (as a service manager sends it) stops all it started
        started = _descendants(proc.pid)
        assert started  # the MLflow server and its workers
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        # it printed the experiment's runs page, in the UI's Model training view, how to stop the
        # server and where its output went, and nothing of the server's own output
        printed = proc.stdout.read().decode().splitlines()
        assert printed[0].endswith(f"http://127.0.0.1:{port}/#/experiments/{experiment}/runs"
                                   "?workflowType=machine_learning"), printed
        assert len(printed) == 2 and "Ctrl-C" in printed[1], printed
        server_log = Path(printed[1].rsplit(" ", 1)[1])
        assert server_log.is_file() and server_log.stat().st_size > 0
        deadline = time.monotonic() + 10
        while _alive(started) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(started), _alive(started)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def _descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            with contextlib.suppress(OSError):
                for child in (task / "children").read_text().split():
                    if int(child) not in found:
                        found.add(int(child))
                        todo.append(int(child))
    return found


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for p in pids:
        with contextlib.suppress(OSError):
            if Path(f"/proc/{p}/stat").read_text().split(") ")[1].split()[0] != "Z":
                alive.add(p)
    return alive


def test_new_methods_structured_removal_and_distillation_in_a_sweep(tmp_path):
    """gradual, dsd, ist and layerwise with an unstructured criterion, and gradual and oneshot with a
    structured one with removal, as Optuna's grid; every trial is a student of a teacher given by
    its MLflow run id."""
    teacher_spec = tmp_path / "teacher.yaml"
    teacher_spec.write_text("name: teacher\ndata: {dataset: digits, image_size: 8}\n"
                            "train: {batch_size: 128, lr: 0.05, dense_epochs: 1, finetune_epochs: 0}\n")
    r = subprocess.run([sys.executable, "-m", "prunetune.cli", "trial", str(teacher_spec)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    teacher_id = r.stdout.split("run id: ")[1].split()[0]
    teacher_acc = client(tmp_path).get_run(teacher_id).data.metrics["test_acc"]
    spec = tmp_path / "methods.yaml"
    spec.write_text(textwrap.dedent(f"""
        name: methods
        data: {{dataset: digits, image_size: 8}}
        train: {{batch_size: 128, lr: 0.05, dense_epochs: 1, finetune_epochs: 1}}
        schedule:
          method: {{choice: [gradual, dsd, ist, layerwise]}}
          sparsity: 0.5
          step_epochs: 1
          end_epoch: 2.0
        distill: {{teacher: "{teacher_id}"}}
        search: {{sampler: grid, num_trials: 4}}
        resources: {{cpus_per_trial: 1, max_concurrent: 2}}
        """))
    r = sweep([str(spec)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    # dsd and ist with a structured criterion are refused (a zero channel group cannot regrow)
    r = sweep([str(spec), "--set", "name=refused", "--set", "schedule.criterion=l1_filter"], tmp_path)
    assert r.returncode == 2 and "cannot" in r.stderr and "Traceback" not in r.stderr
    r = sweep([str(spec), "--set", "name=methods_filter", "--set", "schedule.method={choice: [gradual, oneshot]}",
               "--set", "search.num_trials=2", "--set", "schedule.criterion=l1_filter",
               "--set", "schedule.remove=true"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    children = runs_of(tmp_path, "methods")[1] + runs_of(tmp_path, "methods_filter")[1]
    c = client(tmp_path)
    combos = set()
    for run in children:
        assert run.info.status == "FINISHED", run.data.tags.get("prunetune.error")
        p, m = run.data.params, run.data.metrics
        combos.add((p["schedule.method"], p["schedule.criterion"]))
        assert p["distill.teacher"] == teacher_id
        assert len(c.get_metric_history(run.info.run_id, "distill_loss")) >= 2
        assert m["teacher_test_acc"] == pytest.approx(teacher_acc)
        artifacts = {a.path for a in c.list_artifacts(run.info.run_id, "checkpoint")}
        if p["schedule.criterion"] == "l1_filter":
            assert {"compact_params", "latency_ms_dense", "latency_ms_compact", "measured_speedup"} <= set(m)
            assert "checkpoint/compact.pt2" in artifacts
        else:
            assert "compact_params" not in m and "checkpoint/compact.pt2" not in artifacts
        if p["schedule.method"] in ("gradual", "layerwise", "oneshot"):  # ends at its target
            key = "channel_sparsity" if p["schedule.criterion"] == "l1_filter" else "sparsity"
            assert m[key] == pytest.approx(0.5, abs=0.02)
            if key == "channel_sparsity":
                assert m["compact_params"] < m["total_params"]
        else:  # dsd and ist end dense, and their sparsity history shows the sparse phase
            assert m["sparsity"] < 0.05
            assert max(x.value for x in c.get_metric_history(run.info.run_id, "sparsity")) > 0.4
    assert combos == {("gradual", "l1_unstructured"), ("dsd", "l1_unstructured"), ("ist", "l1_unstructured"),
                      ("layerwise", "l1_unstructured"), ("gradual", "l1_filter"), ("oneshot", "l1_filter")}


def test_searched_per_layer_targets_in_a_sweep(tmp_path):
    """schedule.layer_sparsity values searched under globs with dots: Optuna samples them, each
    child run logs them as params and reaches them (layer_sparsity.csv); a glob no layer matches
    exits 2 before any trial."""
    spec = tmp_path / "layers.yaml"
    spec.write_text(textwrap.dedent("""
        name: layers
        data: {dataset: digits, image_size: 8}
        train: {batch_size: 128, lr: 0.05, dense_epochs: 1, finetune_epochs: 0.5}
        schedule:
          method: oneshot
          scope: layer
          layer_sparsity: {classifier.1: {uniform: [0.5, 0.95]}, 'features.*': 0.6}
        search: {sampler: random, num_trials: 2}
        resources: {cpus_per_trial: 1, max_concurrent: 2}
        """))
    r = sweep([str(spec)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    _, children = runs_of(tmp_path, "layers")
    c = client(tmp_path)
    for run in children:
        assert run.info.status == "FINISHED", run.data.tags.get("prunetune.error")
        target = float(run.data.params["schedule.layer_sparsity.classifier.1"])
        assert 0.5 <= target <= 0.95 and run.data.params["schedule.layer_sparsity.features._any_"] == "0.6"
        path = c.download_artifacts(run.info.run_id, "layer_sparsity.csv", str(tmp_path / run.info.run_id))
        rows = {r.split(",")[0]: r.split(",") for r in Path(path).read_text().splitlines()[1:]}
        assert float(rows["classifier.1"][-2]) == pytest.approx(target)
        assert float(rows["classifier.1"][-1]) == pytest.approx(target, abs=1e-3)
        assert float(rows["features.4"][-1]) == pytest.approx(0.6, abs=1e-3)
    bad = spec.read_text().replace("'features.*'", "'conv*'").replace("name: layers", "name: nolayer")
    (tmp_path / "bad.yaml").write_text(bad)
    r = sweep([str(tmp_path / "bad.yaml")], tmp_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(
        "error: schedule.layer_sparsity: 'conv*' matches no prunable layer"), r.stderr[-2000:]
