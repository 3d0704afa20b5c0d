"""A distillation teacher named in a spec → its local checkpoint directory (the edge between
`distill.teacher` and the tracking store; `distill.py` itself reads only directories)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from prunetune import tracking
from prunetune.errors import UserError


def teacher_dir(teacher: str, uri: str, artifacts: str) -> Path:
    """The local checkpoint directory of a distillation teacher: `teacher` itself when it is a
    directory, else the artifacts of MLflow run `teacher` (config.yaml, checkpoint/model.pt,
    data/split.csv), downloaded once into the cache."""
    from prunetune.cache import cache_root
    from prunetune.distill import TEACHER_FILES

    local = Path(teacher).expanduser()
    if local.is_dir():
        return local
    if not (len(teacher) == 32 and all(c in "0123456789abcdef" for c in teacher)):
        raise UserError(f"distill.teacher: {teacher!r} is neither a directory nor an MLflow run id "
                        "(32 hex digits)")
    entry = cache_root() / "teachers" / teacher
    if all((entry / f).is_file() for f in TEACHER_FILES):
        return entry
    uri = tracking.absolute_sqlite_uri(uri)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise UserError(f"distill.teacher: no run {teacher} (the tracking store {uri} does not exist)")
    tracker = tracking.Tracker(uri, artifacts)
    if tracker.run(teacher) is None:
        raise UserError(f"distill.teacher: no run {teacher} in {uri}")
    tmp = entry.parent / f"{teacher}.tmp-{os.getpid()}"
    try:
        for f in TEACHER_FILES:
            (tmp / f).parent.mkdir(parents=True, exist_ok=True)
            tracker.download(teacher, f, (tmp / f).parent)
    except Exception:  # noqa: BLE001 - the store's own error types
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"distill.teacher: run {teacher} lacks the artifacts {', '.join(TEACHER_FILES)} "
                        "(is it a prunetune trial that finished?)") from None
    if not entry.is_dir():
        tmp.rename(entry)
    return entry
