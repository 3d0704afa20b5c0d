"""The worker's side of a sweep, without a sweep: a trial's resume state uploaded in the
background (`trainable._StateUploads`)."""

from __future__ import annotations

import logging

import pytest

from prunetune.storage import Storage
from prunetune.sweep.trainable import _StateUploads


def test_a_state_upload_runs_in_the_background_and_its_own_errors_reach_the_trial(tmp_path, monkeypatch, caplog):
    uploads = _StateUploads(Storage(str(tmp_path / "store")), "t.pt")
    local = tmp_path / "state-1.pt"
    local.write_bytes(b"state 1")
    assert uploads.idle()
    uploads.start(local)
    uploads.wait()
    assert (tmp_path / "store" / "t.pt").read_bytes() == b"state 1" and not local.exists()

    def unanswered(self, src, rel):  # what pyarrow raises when S3 does not answer
        raise OSError("AWS Error NETWORK_CONNECTION during PutObject operation: curlCode: 7")

    monkeypatch.setattr(Storage, "put_file", unanswered)
    local.write_bytes(b"state 2")
    with caplog.at_level(logging.WARNING, logger="prunetune.sweep.trainable"):
        uploads.start(local)
        uploads.wait()  # skipped with a line: the next due epoch saves again
    assert "the store did not answer" in caplog.text and uploads.idle()
    assert (tmp_path / "store" / "t.pt").read_bytes() == b"state 1"  # the last stored state stays

    def denied(self, src, rel):
        raise PermissionError("AWS Error ACCESS_DENIED during PutObject operation")

    monkeypatch.setattr(Storage, "put_file", denied)
    local.write_bytes(b"state 3")
    uploads.start(local)
    with pytest.raises(PermissionError, match="ACCESS_DENIED"):
        uploads.wait()  # the trial's own thread sees it (and reports it as the trial's failure)
