"""The tracking edge says "no such run" only when the store has none: an unreachable store is an
error, not a missing run (a server outage must not read as a missing distillation teacher)."""

from __future__ import annotations

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
