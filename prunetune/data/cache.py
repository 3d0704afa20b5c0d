"""The decode cache: a dataset whose images must be decoded (JPEG, PNG) is decoded and resized
once, and kept as uint8 arrays keyed by its source files (path, size, modification time) and
`image_size`. Every later trial and sweep on the same files reads the arrays instead.

Entries live under `$PRUNETUNE_CACHE/data/` (default `~/.cache/prunetune/data/`) and are written
to a temporary file and renamed, so concurrent trials never read half an entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

# cache_root's home is prunetune.cache; cli, sweep, teachers and tracking import it from here
from prunetune.cache import cache_root
from prunetune.data import Source

FORMAT = 1  # bump when the decoding changes, so old entries are not reused


def entry_path(kind: str, files: list[Path], image_size: int) -> Path:
    """The cache file for `files` decoded at `image_size`; any change to a file changes it."""
    listing = []
    for f in files:
        st = f.stat()
        listing.append((str(f.resolve()), st.st_size, st.st_mtime_ns))
    key = hashlib.sha256(json.dumps([FORMAT, kind, image_size, listing]).encode()).hexdigest()[:16]
    return cache_root() / "data" / f"{kind}-{image_size}px-{key}.npz"


def cached(kind: str, files: list[Path], image_size: int, build: Callable[[], Source]) -> Source:
    """`build()`'s Source, decoded once: read from the cache when an entry for these files exists."""
    return _cached_at(entry_path(kind, files, image_size), build)


def cached_by_digest(name: str, image_size: int, build: Callable[[], Source]) -> Source:
    """`build()`'s Source, resized once: `name` carries a digest of what it is built from (a
    dataset factory's output)."""
    return _cached_at(cache_root() / "data" / f"{name}-{image_size}px-f{FORMAT}.npz", build)


def _cached_at(path: Path, build: Callable[[], Source]) -> Source:
    if path.is_file():
        try:
            return _read(path)
        except (OSError, ValueError, KeyError) as exc:  # an unreadable entry is rebuilt
            logging.getLogger(__name__).warning("decode cache: rebuilding unreadable entry %s (%s)", path, exc)
    src = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, images=src.images, labels=src.labels, ids=np.array(src.ids, dtype=str),
                     classes=np.array(src.classes, dtype=str), id_name=np.array(src.id_name),
                     official_split=_optional(src.official_split), groups=_optional(src.groups))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return src


def _optional(a: np.ndarray | None) -> np.ndarray:
    return np.array([], dtype=str) if a is None else np.asarray(a).astype(str)


def _read(path: Path) -> Source:
    with np.load(path, allow_pickle=False) as z:
        split, groups = z["official_split"], z["groups"]
        return Source(images=z["images"], labels=z["labels"].astype(np.int64), ids=z["ids"].tolist(),
                      classes=z["classes"].tolist(), id_name=str(z["id_name"]),
                      official_split=split if len(split) else None, groups=groups if len(groups) else None)
