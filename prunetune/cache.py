"""Where shared work is kept: this machine's cache folder (`cache_root`), and the dense cache
(`DenseCache`), through which the trials of a sweep, on any node, train each dense phase (and
each lottery-ticket round) once. No torch, ray or mlflow here."""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from prunetune.storage import Lease, Storage

log = logging.getLogger(__name__)


def cache_root() -> Path:
    """Where shared work (dense checkpoints, decoded data) is kept: $PRUNETUNE_CACHE or
    ~/.cache/prunetune."""
    return Path(os.environ.get("PRUNETUNE_CACHE") or Path.home() / ".cache" / "prunetune")


class DenseCache:
    """Dense-phase checkpoints in storage (`tracking.storage`'s `_dense/`, or a local folder),
    content-addressed by the spec's dense hash, so the trials of a sweep, on any node, train each
    dense phase once. The trial that claims an entry's lease (`storage.Lease`, which works across
    nodes) trains it; the others wait for its `done` marker. An entry is written under its
    trainer's own folder and `done` names that folder last, so readers never see a mix of two
    trainers' files, even if a lost lease race made two trials train it."""

    def __init__(self, root: Storage | str | Path | None = None):
        root = root if root is not None else cache_root() / "dense"
        self.storage = root if isinstance(root, Storage) else Storage(str(root))

    def get(self, key: str, train: Callable[[Path], None]) -> tuple[Path, bool]:
        """The entry's local folder, trained by `train(folder)` if absent; and whether it was a hit."""
        lease = Lease(self.storage, f"{key}/lease.json")
        while True:
            owner = self._done(key)
            if owner is not None:
                return self._local(key, owner), True
            if lease.try_claim():
                break
            # a waiting trial starts about as soon as the entry is done (a local check is a stat
            # and a lock; an object store is asked less often)
            time.sleep(0.25 if self.storage.is_local else 2.0)
        owner = lease.owner
        try:
            if self.storage.is_local:
                folder = self.storage.local_path(f"{key}/{owner}")
                folder.mkdir(parents=True)
                train(folder)
            else:  # train in this node's cache, then publish it
                tmp = _copies() / f".{key}-{uuid.uuid4().hex[:8]}"
                tmp.mkdir(parents=True)
                train(tmp)
                self.storage.put_dir(tmp, f"{key}/{owner}")
                folder = _settle(tmp, _copies() / key, owner)
            self.storage.write_text(f"{key}/done", owner)
        finally:
            lease.release()
        return folder, False

    def _done(self, key: str) -> str | None:
        try:
            return self.storage.read_text(f"{key}/done").strip()
        except FileNotFoundError:  # not trained yet
            return None

    def _local(self, key: str, owner: str) -> Path:
        if self.storage.is_local:
            return self.storage.local_path(f"{key}/{owner}")
        local = _copies() / key  # each node downloads an entry once
        if _owner_of(local) == owner:
            return local
        tmp = self.storage.get_dir(f"{key}/{owner}", _copies() / f".{key}-{uuid.uuid4().hex[:8]}")
        return _settle(tmp, local, owner)


def _copies() -> Path:
    """This node's copies of entries of a remote dense cache."""
    return cache_root() / "dense-copies"


def _owner_of(local: Path) -> str | None:
    """The entry folder a node-local copy was taken from; None where there is no complete copy."""
    try:
        return (local / ".owner").read_text()
    except (FileNotFoundError, NotADirectoryError):  # no complete copy there
        return None


def _settle(tmp: Path, final: Path, owner: str) -> Path:
    """Move a complete node-local copy into place; another process of this node may have been first."""
    (tmp / ".owner").write_text(owner)
    for _ in range(2):
        try:
            tmp.rename(final)
            return final
        except OSError:
            if _owner_of(final) == owner:
                shutil.rmtree(tmp, ignore_errors=True)
                return final
            shutil.rmtree(final, ignore_errors=True)  # a copy of an older entry
    log.warning("dense cache: could not move %s into place at %s; using it where it is", tmp, final)
    return tmp
