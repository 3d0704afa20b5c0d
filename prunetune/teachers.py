"""A distillation teacher named in a spec → its local checkpoint directory (the edge between
`distill.teacher` and the tracking store; `distill.py` itself reads only directories), and a
sweep's teachers: which they are, fetched on the driver, published where every node reads them."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from prunetune import tracking
from prunetune.errors import UserError
from prunetune.spec import LoadedSpec
from prunetune.storage import Storage


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


def teacher_names(loaded: LoadedSpec) -> list[str]:
    """Every distillation teacher the sweep may use (run ids or directories)."""
    entry = loaded.space.get("distill.teacher")
    spec = loaded.fixed_spec()
    return list(entry.probe_values()) if entry else [spec.distill.teacher] if spec.distill else []


def local_teachers(loaded: LoadedSpec, uri: str) -> dict[str, str]:
    """Every distillation teacher of the sweep → its local checkpoint directory on the driver."""
    artifacts = loaded.fixed_spec().tracking.artifacts
    return {t: str(teacher_dir(t, uri, artifacts)) for t in teacher_names(loaded)}


def teacher_code(local: dict[str, str], spec_folder: Path | None) -> list[tuple[str, str]]:
    """("distill.teacher", reference) of each teacher whose model is the user's code (its
    `config.yaml`'s `model.arch`): trials build the teacher, so every node must import it. Each is
    imported here (from beside the spec, then the working directory, as the student's code is):
    one that cannot be fails now, naming the key."""
    import yaml

    from prunetune import plugins

    archs = []
    for directory in local.values():
        config = Path(directory) / "config.yaml"
        try:
            arch = yaml.safe_load(config.read_text())["model"]["arch"]
        except Exception as exc:  # noqa: BLE001 - the user's file
            raise UserError(f"distill.teacher: {config} is not a prunetune trial config ({type(exc).__name__})") \
                from None
        if isinstance(arch, str) and plugins.is_user_code(arch) and arch not in archs:
            archs.append(arch)
    if archs:
        plugins.add_search_paths(spec_folder)
    for arch in archs:
        plugins.load_factory("distill.teacher", arch)
    return [("distill.teacher", arch) for arch in archs]


def publish_teachers(local: dict[str, str], state: Storage) -> dict[str, str]:
    """Copy each teacher's files into the sweep's state (`state`), where every node reads them;
    returns teacher → its folder there (relative to `state`)."""
    if not local:
        return {}
    from prunetune.distill import TEACHER_FILES  # imports torch: only where there is a teacher

    published = {}
    for teacher, directory in local.items():
        rel = f"teachers/{hashlib.sha256(teacher.encode()).hexdigest()[:16]}"
        if not state.exists(f"{rel}/complete"):
            for f in TEACHER_FILES:
                state.put_file(Path(directory) / f, f"{rel}/{f}")
            state.write_text(f"{rel}/complete", "ok\n")
        published[teacher] = rel
    return published
