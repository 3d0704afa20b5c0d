"""The tracking edge says "no such run" only when the store has none: an unreachable store is an
error, not a missing run (a server outage must not read as a missing distillation teacher). And a
sweep against a real `mlflow server` that stops answering: no trial waits for it, nothing is lost,
also when the driver is killed during the outage."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prunetune.tracking import Tracker

import procs


def test_a_missing_run_is_none_and_an_unreachable_server_raises(tmp_path, monkeypatch):
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", str(tmp_path / "artifacts"))
    assert tracker.run("0" * 32) is None
    assert tracker.run("not a run id") is None
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    down = Tracker(f"http://127.0.0.1:{procs.free_port()}", str(tmp_path / "artifacts"))
    with pytest.raises(Exception, match="127.0.0.1"):
        down.run("0" * 32)


# -- a real `mlflow server` that stops answering mid-sweep ---------------------------------------------

OUTAGE_S = 8


def _outage_spec(tmp_path: Path, name: str) -> Path:
    from test_sweep import write_spec

    spec = write_spec(tmp_path, name=name, trials=4, finetune=6)
    # trials of several seconds each, so some run through the outage
    spec.write_text(spec.read_text().replace("image_size: 8", "image_size: 16").replace("batch_size: 128",
                                                                                          "batch_size: 32"))
    return spec


def _runs(uri: str, name: str):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(name)
    runs = c.search_runs([exp.experiment_id], max_results=1000) if exp else []
    return (c, [r for r in runs if r.data.tags.get("prunetune.kind") == "sweep"],
            [r for r in runs if r.data.tags.get("prunetune.kind") == "trial"])


def _start_sweep(args, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "prunetune.cli", "sweep", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "PRUNETUNE_CHECKPOINT_S": "0"})


def _wait(condition, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.5)


def _finished(uri: str, name: str) -> int:
    try:
        return sum(r.info.status == "FINISHED" for r in _runs(uri, name)[2])
    except Exception:  # noqa: BLE001 - the store not made yet
        return 0


def _check_complete(uri: str, name: str, trials: int) -> dict:
    from test_sweep import assert_complete_child

    c, parents, children = _runs(uri, name)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == trials and len({r.data.tags["prunetune.trial_id"] for r in children}) == trials
    for run in children:
        assert_complete_child(c, run, parents[0].info.run_id)  # every epoch once, final metrics, artifacts
    return {r.data.tags["prunetune.trial_id"]: r for r in children}


@pytest.mark.slow
def test_an_mlflow_server_outage_holds_no_trial_up_and_loses_nothing(tmp_path, monkeypatch):
    """The server is SIGKILLed once a trial has finished and restarted OUTAGE_S later: the trials
    went on meanwhile (the driver took their reports during the outage), every trial ends
    FINISHED once with all it logs, and the terminal says so in two lines."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # this test's own polling client
    port, folder = procs.free_port(), tmp_path / "server"
    uri = f"http://127.0.0.1:{port}"
    server = procs.mlflow_server(port, folder)
    spec = _outage_spec(tmp_path, "outage")
    proc = _start_sweep([str(spec), "--tracking-uri", uri], tmp_path)
    try:
        _wait(lambda: _finished(uri, "outage") >= 1, proc)
        procs.kill_session(server)
        down_at = time.time()
        time.sleep(OUTAGE_S)
        up_at = time.time()
        server = procs.mlflow_server(port, folder)
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    try:
        runs = _check_complete(uri, "outage", 4)
        stopped = [line for line in err.splitlines() if "stopped answering" in line]
        caught_up = [line for line in err.splitlines() if "caught up" in line]
        assert len(stopped) == 1 and len(caught_up) == 1, err[-3000:]
        assert "View run" not in out + err and "View experiment" not in out + err  # MLflow's lines: in the log
        # the driver took the trials' epoch reports while the store was down (a metric's timestamp
        # is when the driver took it): nothing waited for the store
        c = _runs(uri, "outage")[0]
        taken = [m.timestamp / 1000 for run in runs.values() for m in c.get_metric_history(run.info.run_id, "val_loss")]
        assert any(down_at + 1 < t < up_at - 1 for t in taken), (down_at, up_at, sorted(taken))
    finally:
        procs.kill_session(server)


@pytest.mark.slow
def test_a_driver_killed_during_an_outage_loses_nothing_finished(tmp_path, monkeypatch):
    """SIGKILL of the driver while the server is down, after a trial finished that the store never
    got: --resume (the server back) writes it from the journal, without running it again."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    port, folder = procs.free_port(), tmp_path / "server"
    uri = f"http://127.0.0.1:{port}"
    server = procs.mlflow_server(port, folder)
    spec = _outage_spec(tmp_path, "killed")
    journal = tmp_path / "mlruns" / "tune" / "killed" / "tracking-journal.jsonl"
    proc = _start_sweep([str(spec), "--tracking-uri", uri], tmp_path)

    def finals() -> dict:
        records = [json.loads(line) for line in journal.read_text().splitlines()] if journal.exists() else []
        return {r["key"]: r["rows"][0][0]["test_acc"] for r in records if r.get("final")}

    try:
        _wait(lambda: _finished(uri, "killed") >= 1, proc)
        procs.kill_session(server)
        in_store = set(finals())
        _wait(lambda: len(set(finals()) - in_store) >= 1, proc)  # a trial finished during the outage
        time.sleep(2)  # Tune's state snapshot (every second)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    unwritten = {k: v for k, v in finals().items() if k not in in_store}
    server = procs.mlflow_server(port, folder)
    try:
        r = subprocess.run([sys.executable, "-m", "prunetune.cli", "sweep", str(spec), "--tracking-uri", uri,
                            "--resume"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        runs = _check_complete(uri, "killed", 4)
        for trial_id, test_acc in unwritten.items():  # written from the journal, not run again
            assert runs[trial_id].data.metrics["test_acc"] == test_acc
        assert not journal.exists()  # gone once the sweep and its records are complete
    finally:
        procs.kill_session(server)


@pytest.mark.slow
def test_a_store_still_down_when_the_trials_end_exits_1_and_resume_writes_the_rest(tmp_path, monkeypatch):
    """The trials end while the server is down and it stays away past the wait: exit 1 naming
    --resume, the journal kept; once the server is back, --resume writes it all, running nothing."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    port, folder = procs.free_port(), tmp_path / "server"
    uri = f"http://127.0.0.1:{port}"
    server = procs.mlflow_server(port, folder)
    spec = _outage_spec(tmp_path, "behind")
    spec.write_text(spec.read_text().replace("num_trials: 4", "num_trials: 2"))
    journal = tmp_path / "mlruns" / "tune" / "behind" / "tracking-journal.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "prunetune.cli", "sweep", str(spec), "--tracking-uri", uri],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "PRUNETUNE_TRACKING_WAIT_S": "3"})
    try:
        _wait(lambda: len(_runs(uri, "behind")[2]) == 2, proc)  # both trials' runs made
        procs.kill_session(server)
        out, err = proc.communicate(timeout=600)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1, err[-3000:]
    assert "waiting up to 3 s" in err and f"prunetune sweep {spec} --resume" in err and "Traceback" not in err
    records = [json.loads(line) for line in journal.read_text().splitlines()]
    finals = {r["key"]: r["rows"][0][0]["test_acc"] for r in records if r.get("final")}
    assert len(finals) == 2
    server = procs.mlflow_server(port, folder)
    try:
        r = subprocess.run([sys.executable, "-m", "prunetune.cli", "sweep", str(spec), "--tracking-uri", uri,
                            "--resume"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        runs = _check_complete(uri, "behind", 2)
        assert {tid: run.data.metrics["test_acc"] for tid, run in runs.items()} == finals  # not run again
        assert not journal.exists()
    finally:
        procs.kill_session(server)


# -- an S3 storage that stops answering mid-sweep ---------------------------------------------------

@pytest.mark.slow
def test_an_s3_storage_outage_fails_no_trial_and_loses_nothing(tmp_path, monkeypatch):
    """The sweep's state on S3 (a real S3 server behind a proxy), cut for OUTAGE_S once a trial
    has finished: trials save their state in the background and wait for the store where they
    must (their artifacts), so none fails or is retried; every trial ends FINISHED once with all
    it logs."""
    for key, value in procs.S3_ENV.items():
        monkeypatch.setenv(key, value)
    s3_port = procs.free_port()
    server = procs.s3_server(s3_port, "sweeps")
    proxy = procs.Proxy(s3_port)
    storage = f"s3://sweeps/state?endpoint_override=127.0.0.1:{proxy.port}&scheme=http"
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    spec = _outage_spec(tmp_path, "s3out")
    proc = _start_sweep([str(spec), "--storage", storage], tmp_path)
    from test_sweep import _finished_children  # read-only: an MLflow client would make the tables too

    try:
        _wait(lambda: _finished_children(tmp_path / "mlruns" / "mlflow.db") >= 1, proc)
        proxy.stop()
        time.sleep(OUTAGE_S)
        proxy.start()
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proxy.stop()
        procs.kill_session(server)
    _check_complete(uri, "s3out", 4)
    assert "retried" not in err and "failed" not in err.replace("0 failed", ""), err[-3000:]
