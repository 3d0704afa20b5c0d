"""prunetune.storage: whole writes, the lease that works across processes (and nodes, through the
storage itself), and the dense-phase cache built on them. No Ray here."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from prunetune.cache import DenseCache
from prunetune.errors import UserError
from prunetune.storage import Lease, Storage

import procs


def test_local_storage_round_trips_and_pickles_by_uri(tmp_path):
    s = Storage(str(tmp_path / "store"))
    assert s.is_local and not s.exists()
    s.write_json("a/b.json", {"x": 1})
    assert s.read_json("a/b.json") == {"x": 1} and s.listdir("a") == ["b.json"]
    (tmp_path / "src" / "sub").mkdir(parents=True)
    (tmp_path / "src" / "sub" / "f.bin").write_bytes(b"\0" * 10)
    s.put_dir(tmp_path / "src", "dir")
    assert s.get_dir("dir", tmp_path / "out") == tmp_path / "out"
    assert (tmp_path / "out" / "sub" / "f.bin").read_bytes() == b"\0" * 10
    copy = pickle.loads(pickle.dumps(s.child("a")))
    assert copy.read_json("b.json") == {"x": 1} and copy.uri == s.uri + "/a"
    with pytest.raises(FileNotFoundError):
        s.read_bytes("missing")
    s.delete("dir")
    assert s.listdir() == ["a"]
    assert not [p for p in (tmp_path / "store").rglob(".tmp-*")]  # no temporary file left behind


def test_relative_paths_are_absolute_and_bad_uris_are_user_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Storage("mlruns/tune").uri == str(tmp_path / "mlruns" / "tune")
    with pytest.raises(UserError, match="tracking.storage"):
        Storage("nosuchscheme://bucket/x")


def test_a_writer_killed_mid_write_leaves_the_old_file(tmp_path):
    """What Ray Tune's sync of the experiment state relies on after a SIGKILL of the driver."""
    s = Storage(str(tmp_path))
    s.write_bytes("state.pkl", b"old")
    code = textwrap.dedent(f"""
        import os, signal
        from prunetune.storage import Storage
        s = Storage({str(tmp_path)!r})
        with s.fs.open_output_stream(s._join("state.pkl")) as f:
            f.write(b"new, but never finished")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        """)
    r = subprocess.run([sys.executable, "-c", code])
    assert r.returncode == -signal.SIGKILL
    assert s.read_bytes("state.pkl") == b"old"


LEASE_HOLDER = """
import sys, time
from prunetune.storage import Lease, Storage
lease = Lease(Storage(sys.argv[1]), "lease.json", owner=sys.argv[2])
assert lease.try_claim()
print("claimed", flush=True)
time.sleep(600)
"""


def test_a_lease_is_held_while_renewed_and_taken_over_once_its_holder_died(tmp_path, monkeypatch):
    monkeypatch.setattr("prunetune.storage.LEASE_TIMEOUT_S", 3.0)
    env = {**os.environ, "PRUNETUNE_LEASE_TIMEOUT_S": "3"}
    holder = subprocess.Popen([sys.executable, "-c", LEASE_HOLDER, str(tmp_path), "holder"], env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "claimed"
        waiter = Lease(Storage(str(tmp_path)), "lease.json", owner="waiter")
        deadline = time.monotonic() + 8  # longer than the timeout: the holder keeps renewing
        while time.monotonic() < deadline:
            assert not waiter.try_claim()
            time.sleep(0.5)
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        started = time.monotonic()
        while not waiter.try_claim():  # its beat stops: stale after the timeout, then taken over
            assert time.monotonic() - started < 20
            time.sleep(0.5)
        assert time.monotonic() - started >= 2.5
        waiter.release()
        assert not Storage(str(tmp_path)).exists("lease.json")
    finally:
        holder.kill()
        holder.wait()


DENSE_WORKER = """
import sys, time
from pathlib import Path
from prunetune.cache import DenseCache
def train(folder):
    (Path(sys.argv[2]) / f"trained-by-{sys.argv[3]}").write_text("")
    time.sleep(2)
    (folder / "epoch_0.pt").write_text(sys.argv[3])
entry, hit = DenseCache(sys.argv[1]).get("key", train)
print(hit, (entry / "epoch_0.pt").read_text(), flush=True)
"""


def test_two_processes_asking_for_one_dense_phase_train_it_once(tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", DENSE_WORKER, str(tmp_path / "dense"), str(marks), str(i)],
                              stdout=subprocess.PIPE, text=True) for i in range(3)]
    outs = [p.communicate(timeout=120)[0].split() for p in procs]
    assert len(list(marks.iterdir())) == 1  # trained once
    trainer = next(iter(marks.iterdir())).name.removeprefix("trained-by-")
    assert sorted(o[0] for o in outs) == ["False", "True", "True"]  # one trained, two waited and read it
    assert {o[1] for o in outs} == {trainer}


def test_dense_cache_on_remote_storage_keeps_a_node_local_copy(tmp_path, monkeypatch):
    """An object store (pyarrow's in-memory mock filesystem here): the trainer publishes the entry,
    a reader downloads it once into this node's cache."""
    import pyarrow.fs

    monkeypatch.setenv("PRUNETUNE_CACHE", str(tmp_path / "node"))
    remote = Storage("mock://store", _fs=pyarrow.fs._MockFileSystem(), _path="store")
    assert not remote.is_local
    calls = []

    def train(folder: Path) -> None:
        calls.append(folder)
        (folder / "epoch_0.pt").write_text("weights")

    cache = DenseCache(remote)
    first, hit = cache.get("k", train)
    assert not hit and (first / "epoch_0.pt").read_text() == "weights"
    assert remote.read_text("k/done") in remote.listdir("k")  # done names the trainer's folder
    (first / "epoch_0.pt").unlink()  # the node's copy is gone: it is downloaded again
    import shutil
    shutil.rmtree(first)
    second, hit = cache.get("k", train)
    assert hit and len(calls) == 1 and (second / "epoch_0.pt").read_text() == "weights"


def test_a_failed_lease_renewal_is_logged_and_tried_again(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr("prunetune.storage.LEASE_BEAT_S", 0.05)
    lease = Lease(Storage(str(tmp_path)), "lease.json", owner="me")
    assert lease.try_claim()
    failures = []

    def unwritable(self, rel, obj):
        failures.append(rel)
        raise OSError("storage unreachable")

    monkeypatch.setattr(Storage, "write_json", unwritable)  # every Storage: renewals use their own view
    time.sleep(0.5)
    lease.release()
    assert len(failures) >= 2  # every beat tries again
    assert "lease.json: renewing failed (storage unreachable)" in caplog.text


@pytest.fixture
def s3_behind_proxy(monkeypatch):
    """A real S3 server (moto) reached through a proxy that a test can cut."""
    for key, value in procs.S3_ENV.items():
        monkeypatch.setenv(key, value)
    s3_port = procs.free_port()
    server = procs.s3_server(s3_port, "bucket")
    proxy = procs.Proxy(s3_port)
    try:
        yield proxy, f"s3://bucket/sweeps?endpoint_override=127.0.0.1:{proxy.port}&scheme=http"
    finally:
        proxy.stop()
        procs.kill_session(server)


def test_a_trials_storage_waits_for_a_store_that_stops_answering_and_says_so_once(s3_behind_proxy, caplog):
    proxy, uri = s3_behind_proxy
    storage = Storage(uri, wait_s=120).child("tiny")
    storage.write_json("resume/a.json", {"epoch": 1})
    proxy.stop()
    done = {}

    def trial_ends():  # what a trial does at its end: its artifacts, then reads back
        storage.write_json("resume/a.final/metrics.json", {"test_acc": 0.5})
        done["read"] = storage.read_json("resume/a.json")

    with caplog.at_level("WARNING", logger="prunetune.storage"):
        writer = threading.Thread(target=trial_ends)
        writer.start()
        deadline = time.monotonic() + 60
        while "stopped answering" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.2)
        assert writer.is_alive(), "the write gave up instead of waiting"
        proxy.start()
        writer.join(timeout=120)
    assert done == {"read": {"epoch": 1}}
    assert storage.read_json("resume/a.final/metrics.json") == {"test_acc": 0.5}
    lines = [r.getMessage() for r in caplog.records if r.name == "prunetune.storage"]
    assert len(lines) == 2 and "stopped answering" in lines[0] and "answers again" in lines[1], lines
    assert "s3://bucket" in lines[0] and "up to 120 s" in lines[0]


def test_a_store_that_answers_no_is_not_waited_for_and_an_outage_longer_than_the_wait_fails(s3_behind_proxy):
    proxy, uri = s3_behind_proxy
    storage = Storage(uri, wait_s=120)
    start = time.monotonic()
    with pytest.raises(FileNotFoundError):
        storage.read_json("absent.json")  # the store answered: no such file
    assert time.monotonic() - start < 5
    assert pickle.loads(pickle.dumps(storage.child("x"))).wait_s == 120  # a worker waits as long
    proxy.stop()
    with pytest.raises(OSError, match="NETWORK_CONNECTION"):
        Storage(uri, wait_s=1).write_json("b.json", {})  # gives up once the wait is spent


def test_a_lease_read_that_waited_out_an_outage_does_not_find_its_holder_stale(tmp_path, monkeypatch):
    """The holder could not renew while the store was away either: a read that took longer than
    a beat starts the waiter's count again instead of taking the lease."""
    monkeypatch.setattr("prunetune.storage.LEASE_TIMEOUT_S", 0.3)
    monkeypatch.setattr("prunetune.storage.LEASE_BEAT_S", 0.05)
    storage = Storage(str(tmp_path))
    storage.write_json("lease.json", {"owner": "holder", "beat": 7})
    waiter = Lease(storage, "lease.json", owner="waiter")
    assert not waiter.try_claim()  # seen for the first time
    time.sleep(0.4)  # unrenewed for longer than the timeout, on the waiter's clock
    read = Storage.read_json

    def slow_read(self, rel):  # as a read retried through an outage
        time.sleep(0.1)
        return read(self, rel)

    monkeypatch.setattr(Storage, "read_json", slow_read)
    assert not waiter.try_claim()
    monkeypatch.setattr(Storage, "read_json", read)
    time.sleep(0.4)
    assert waiter.try_claim()  # unrenewed for the timeout since the outage: stale, taken over
    waiter.release()


def test_a_trial_resolving_its_storage_during_an_outage_waits_and_the_driver_says_which_key(monkeypatch, caplog):
    """S3 without a region in the URI asks AWS for the bucket's region when the Storage is made
    (in a trial: when it is unpickled). Its error during an outage, as pyarrow gives it on a
    machine that reaches no network, is replayed here: a trial's Storage waits, the driver's
    names tracking.storage."""
    import pyarrow.fs

    error = OSError("When resolving region for bucket 'b': AWS Error NETWORK_CONNECTION during HeadBucket "
                    "operation: curlCode: 6, Could not resolve hostname")
    calls = []

    class FileSystem:
        @staticmethod
        def from_uri(uri):
            calls.append(uri)
            if len(calls) <= failures:
                raise error
            return pyarrow.fs.FileSystem.from_uri(uri.replace("s3://b/", "mock:///"))

    monkeypatch.setattr("prunetune.storage._pafs", lambda: type("fs", (), {"FileSystem": FileSystem,
                                                                        "LocalFileSystem": pyarrow.fs.LocalFileSystem}))
    failures = 2
    with caplog.at_level("WARNING", logger="prunetune.storage"):
        storage = Storage("s3://b/sweeps", wait_s=30)
    assert len(calls) == 3 and storage.path == "sweeps"
    lines = [r.getMessage() for r in caplog.records if r.name == "prunetune.storage"]
    assert len(lines) == 2 and "stopped answering" in lines[0] and "answers again" in lines[1], lines
    calls.clear()
    with pytest.raises(UserError, match=r"^tracking\.storage: cannot use 's3://b/sweeps' \(When resolving region"):
        Storage("s3://b/sweeps")  # the driver: no wait, one line naming the key
    calls.clear()
    failures = 100
    with pytest.raises(OSError, match="NETWORK_CONNECTION") as raised:
        Storage("s3://b/sweeps", wait_s=1)  # a trial past its wait: Tune retries it, not a user error
    assert not isinstance(raised.value, UserError) and len(calls) >= 2
