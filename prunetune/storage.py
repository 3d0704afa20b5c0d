"""`Storage`: a folder every node of a cluster reaches, the filesystem behind `tracking.storage`
(a local path, a shared NFS path, or a URI such as
`s3://bucket/prefix?endpoint_override=host:9000&scheme=http`), where the sweep's state and what
trials write for others live; and `Lease`, one holder at a time through it. (Not the Optuna
study's RDB storage: that is `stored_study.py`.)

It is resolved by `pyarrow.fs.FileSystem.from_uri`, the resolver Ray Tune uses for its own
`storage_path`, so whatever Ray accepts prunetune accepts, and both name the same place. What a
trial writes for other processes (its resume state, its finished artifacts, the dense-phase cache,
a distillation teacher) goes through this class, never through a local path.

Writes are whole-object: a local file is written aside and renamed; an object store's PUT is
atomic by itself. Every operation is idempotent, so a remote one that fails because the store does
not answer can be tried again: a `Storage` made with `wait_s` (what trials use) does that, with
backoff, for up to `wait_s` seconds per operation, and logs one line when the store stops
answering and one when it answers again. No torch, ray or mlflow here.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from prunetune.errors import UserError, first_line

log = logging.getLogger(__name__)


def _pafs():
    import pyarrow.fs  # imported on first use: `prunetune validate` never needs it

    return pyarrow.fs


def absolute_uri(uri: str) -> str:
    """A local path made absolute (relative to the working directory, `~` expanded); URIs as given.
    (Not `tracking.absolute_sqlite_uri`, which does this for a tracking store's sqlite path.)"""
    if "://" in uri:
        return uri
    return str(Path(uri).expanduser().resolve())


# What a remote filesystem says when it does not answer (pyarrow's S3 gives the AWS error name;
# it has already retried 3 times by then): worth trying again. Anything else (not found, access
# denied, a bad bucket) is raised at once.
_UNREACHABLE = ("NETWORK_CONNECTION", "SERVICE_UNAVAILABLE", "SLOW_DOWN", "INTERNAL_FAILURE", "REQUEST_TIMEOUT",
                "Could not connect", "Connection refused", "Connection reset", "timed out", "Timeout was reached")
_MAX_DELAY_S = 5.0  # between tries: a store that answers again is noticed within this
_local = threading.local()


def storage_wait_s() -> float:
    """How long a trial's storage operation waits for a store that does not answer (seconds):
    $PRUNETUNE_STORAGE_WAIT_S, default 600; read on the driver and given to the trials."""
    return float(os.environ.get("PRUNETUNE_STORAGE_WAIT_S", "600"))


def unreachable(exc: BaseException) -> bool:
    """The filesystem did not answer (as opposed to answering no)."""
    return isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError) and \
        any(marker in str(exc) for marker in _UNREACHABLE)


class _Outages:
    """One log line when a store stops answering this process, one when it answers again."""

    def __init__(self):
        self._lock, self._since = threading.Lock(), {}

    def gave_up(self, where: str, waited_s: float) -> None:
        with self._lock:
            self._since.pop(where, None)
        log.warning("storage %s: gave up an operation after %.0f s without an answer", where, waited_s)

    def began(self, where: str, exc: OSError, wait_s: float) -> None:
        with self._lock:
            if where in self._since:
                return
            self._since[where] = time.monotonic()
        log.warning("storage %s stopped answering (%s); trying again for up to %.0f s", where,
                    first_line(exc)[:300], wait_s)

    def ended(self, where: str) -> None:
        with self._lock:
            since = self._since.pop(where, None)
        if since is not None:
            log.warning("storage %s answers again, after %.0f s", where, time.monotonic() - since)


_OUTAGES = _Outages()


def _answered(where: str, wait_s: float, operation):
    """`operation()`, run again while the store at `where` does not answer, for up to `wait_s`."""
    start, delay = time.monotonic(), 0.5
    while True:
        try:
            result = operation()
        except OSError as exc:
            if not unreachable(exc):
                _OUTAGES.ended(where)  # it answered, with an error of its own
                raise
            if time.monotonic() - start + delay > wait_s:
                _OUTAGES.gave_up(where, time.monotonic() - start)
                raise
            _OUTAGES.began(where, exc, wait_s)
            time.sleep(delay)
            delay = min(2 * delay, _MAX_DELAY_S)
            continue
        _OUTAGES.ended(where)
        return result


def _retried(method):
    """Run a `Storage` method again while its remote store does not answer, for up to the
    storage's `wait_s` (an operation inside another is tried by the outer one only)."""

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        if self.wait_s <= 0 or self.is_local or getattr(_local, "inside", False):
            return method(self, *args, **kwargs)
        _local.inside = True
        try:
            return _answered(self.root_uri, self.wait_s, lambda: method(self, *args, **kwargs))
        finally:
            _local.inside = False

    return call


class Storage:
    """A folder in a filesystem that pyarrow knows (local, NFS, S3, GCS, ...). `wait_s` > 0: a
    remote operation is tried again while the store does not answer, for up to that long."""

    def __init__(self, uri: str, wait_s: float = 0.0, _fs=None, _path: str | None = None):
        self.uri = absolute_uri(uri)
        self.wait_s = wait_s
        if _fs is not None:
            self.fs, self.path = _fs, _path
            return

        def resolve():
            return _pafs().FileSystem.from_uri(self.uri)

        try:  # S3 without a region in the URI asks AWS for the bucket's: a trial waits for an answer
            fs, path = _answered(self.root_uri, wait_s, resolve) if wait_s > 0 else resolve()
        except (ValueError, OSError) as exc:  # pyarrow.lib.ArrowInvalid is a ValueError
            if wait_s > 0 and unreachable(exc):
                raise  # a trial's store stayed away: not the user's input (Tune retries the trial)
            raise UserError(f"tracking.storage: cannot use {uri!r} ({first_line(exc)}); give a "
                            "path, a shared filesystem path, or a URI such as s3://bucket/prefix") from None
        if isinstance(fs, _pafs().LocalFileSystem):
            from prunetune.atomic_fs import atomic_local_fs

            fs = atomic_local_fs()
        self.fs = fs
        self.path = path.rstrip("/") or "/"

    def __reduce__(self):  # pickled by its URI: a worker resolves it with its own credentials
        return (Storage, (self.uri, self.wait_s))

    @property
    def root_uri(self) -> str:
        """The store's address without the folder (its bucket and endpoint): what an outage is
        named by."""
        base, query = (self.uri.split("?", 1) + [""])[:2]
        root = "/".join(base.split("/", 3)[:3]) if "://" in base else base
        return f"{root}?{query}" if query else root

    def waiting(self, wait_s: float) -> "Storage":
        """The same folder, its operations waiting up to `wait_s` for a store that does not answer."""
        return Storage(self.uri, wait_s, self.fs, self.path)

    def __repr__(self) -> str:
        return f"Storage({self.uri!r})"

    @property
    def is_local(self) -> bool:
        return self.fs.type_name == "py::local"

    def child(self, rel: str) -> "Storage":
        """The sub-folder `rel` (same filesystem)."""
        base, query = (self.uri.split("?", 1) + [""])[:2]
        uri = f"{base.rstrip('/')}/{rel}" + (f"?{query}" if query else "")
        return Storage(uri, self.wait_s, self.fs, self._join(rel))

    def local_path(self, rel: str = "") -> Path:
        """The local path of `rel` (local storage only)."""
        assert self.is_local, "local_path() of a remote storage"
        return Path(self._join(rel))

    def _join(self, rel: str) -> str:
        return f"{self.path.rstrip('/')}/{rel}".rstrip("/") if rel else self.path

    def _parent(self, rel: str) -> None:
        self.fs.create_dir(self._join(rel).rsplit("/", 1)[0], recursive=True)

    # -- files: every write is whole (see atomic_fs) -------------------------------------------------
    @_retried
    def exists(self, rel: str = "") -> bool:
        return self.fs.get_file_info(self._join(rel)).type != _pafs().FileType.NotFound

    @_retried
    def read_bytes(self, rel: str) -> bytes:
        """The file's content; FileNotFoundError when it is absent."""
        if not self.exists(rel):
            raise FileNotFoundError(self._join(rel))
        with self.fs.open_input_stream(self._join(rel)) as f:
            return f.read()

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode()

    def read_json(self, rel: str):
        return json.loads(self.read_bytes(rel))

    @_retried
    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a whole file: readers see the old content or the new one, never a part."""
        self._parent(rel)
        with self.fs.open_output_stream(self._join(rel)) as f:
            f.write(data)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode())

    def write_json(self, rel: str, obj) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=1).encode())

    @_retried
    def put_file(self, local: Path, rel: str) -> None:
        """Upload a local file as `rel`."""
        self._parent(rel)
        _pafs().copy_files(str(local), self._join(rel), source_filesystem=_pafs().LocalFileSystem(),
                           destination_filesystem=self.fs)

    @_retried
    def get_file(self, rel: str, local: Path) -> Path:
        local.parent.mkdir(parents=True, exist_ok=True)
        _pafs().copy_files(self._join(rel), str(local), source_filesystem=self.fs,
                           destination_filesystem=_pafs().LocalFileSystem())
        return local

    @_retried
    def put_dir(self, local: Path, rel: str) -> None:
        """Upload the files under `local` into `rel`."""
        self.fs.create_dir(self._join(rel), recursive=True)
        _pafs().copy_files(str(local), self._join(rel), source_filesystem=_pafs().LocalFileSystem(),
                           destination_filesystem=self.fs)

    @_retried
    def get_dir(self, rel: str, local: Path) -> Path:
        """Download the files under `rel` into `local`; FileNotFoundError when `rel` is absent."""
        if not self.exists(rel):
            raise FileNotFoundError(self._join(rel))
        local.mkdir(parents=True, exist_ok=True)
        _pafs().copy_files(self._join(rel), str(local), source_filesystem=self.fs,
                           destination_filesystem=_pafs().LocalFileSystem())
        return local

    @_retried
    def delete(self, rel: str = "") -> None:
        """Remove a file or a folder and what it holds; nothing when absent."""
        path = self._join(rel)
        kind = self.fs.get_file_info(path).type
        if kind == _pafs().FileType.Directory:
            self.fs.delete_dir(path)
        elif kind != _pafs().FileType.NotFound:
            self.fs.delete_file(path)

    @_retried
    def listdir(self, rel: str = "") -> list[str]:
        """Names directly under `rel` (empty when absent)."""
        selector = _pafs().FileSelector(self._join(rel), allow_not_found=True)
        return sorted(info.base_name for info in self.fs.get_file_info(selector))


# ---------------------------------------------------------------------------------------------
# A lease: one holder at a time across processes and nodes, through the storage itself
# ---------------------------------------------------------------------------------------------

LEASE_BEAT_S = 5.0  # the holder renews its lease this often
LEASE_TIMEOUT_S: float | None = None  # unrenewed this long: stale (None: $PRUNETUNE_LEASE_TIMEOUT_S, else 60)


def lease_timeout_s() -> float:
    """How long a lease unrenewed is stale (seconds), read when asked (tests set it low)."""
    if LEASE_TIMEOUT_S is not None:
        return LEASE_TIMEOUT_S
    return float(os.environ.get("PRUNETUNE_LEASE_TIMEOUT_S", "60"))


def owner_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class Lease:
    """A lease file `rel` in storage: `{owner, beat}`. The holder renews it every LEASE_BEAT_S;
    another process takes it over once it has seen the same `beat` for LEASE_TIMEOUT_S on its own
    clock (so clocks of different nodes need not agree). On a local or NFS folder claims take
    turns under an advisory lock; on an object store a claim writes the lease, waits for
    concurrent writers to settle and reads it back (the last writer holds it; a lost race costs
    at worst duplicate work, never wrong results: see `DenseCache`)."""

    def __init__(self, storage: Storage, rel: str, owner: str | None = None):
        self.storage, self.rel = storage, rel
        self.owner = owner or owner_id()
        self._seen: tuple | None = None  # (owner, beat) last read, and when it last changed
        self._seen_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> dict | None:
        start = time.monotonic()
        try:
            return self.storage.read_json(self.rel)
        except FileNotFoundError:
            return None
        except ValueError as exc:  # not JSON: not a lease any holder wrote whole
            log.warning("lease %s: unreadable (%s); taken as free", self.rel, exc)
            return None
        finally:
            if time.monotonic() - start > LEASE_BEAT_S:
                self._seen = None  # the read waited out an outage: the holder could not renew either

    def _stale(self, lease: dict) -> bool:
        now = time.monotonic()
        key = (lease.get("owner"), lease.get("beat"))
        if key != self._seen:
            self._seen, self._seen_at = key, now
            return False
        return now - self._seen_at >= lease_timeout_s()

    def try_claim(self) -> bool:
        """Take the lease if it is free or stale; True when this process holds it."""
        if self.storage.is_local:
            # A local or NFS folder: claimers take turns under an advisory lock (held for the
            # check only; Linux carries flock over NFS as a POSIX lock). The lock file stays:
            # removing it would let a waiter on the old file and a newcomer both go ahead.
            import fcntl

            lock_path = self.storage.local_path(self.rel + ".lock")
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            with open(lock_path, "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not self._free():
                    return False
                self.storage.write_json(self.rel, {"owner": self.owner, "beat": 0})
        else:
            # An object store has no lock: write, let concurrent claimers' writes settle, read
            # back; the last writer holds it.
            if not self._free():
                return False
            self.storage.write_json(self.rel, {"owner": self.owner, "beat": 0})
            time.sleep(1.0)
            lease = self._read()
            if lease is None or lease.get("owner") != self.owner:
                return False
        self._thread = threading.Thread(target=self._renew, daemon=True, name="prunetune-lease")
        self._thread.start()
        return True

    def _free(self) -> bool:
        lease = self._read()
        return lease is None or lease.get("owner") == self.owner or self._stale(lease)

    def _renew(self) -> None:
        beat = 0
        while not self._stop.wait(min(LEASE_BEAT_S, lease_timeout_s() / 4)):
            beat += 1
            try:  # not waiting for a store that does not answer: the next beat tries again
                self.storage.waiting(0).write_json(self.rel, {"owner": self.owner, "beat": beat})
            except OSError as exc:  # a storage hiccup: the next beat tries again
                log.warning("lease %s: renewing failed (%s); retrying at the next beat", self.rel, exc)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        lease = self._read()
        if lease is not None and lease.get("owner") == self.owner:
            self.storage.delete(self.rel)

