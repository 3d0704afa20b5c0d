"""Where a sweep's state lives (`<tracking.storage>/<name>/`: Tune's experiment, `sweep.json`,
the trials' `resume/` folder, the driver's log and its tracking journal), and finding a sweep again from its spec or
its folder (`locate`, for `prunetune cka` and `prunetune report`). No ray here."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from prunetune import tracking
from prunetune.errors import UserError, first_line
from prunetune.spec import SearchEntry, Spec, load
from prunetune.storage import Storage


def space_fingerprint(space: dict[str, SearchEntry]) -> dict:
    """The search space as sweep.json records it: a resumed sweep must have the same one."""
    return {k: {"kind": e.kind, "args": list(e.args), "step": e.step} for k, e in sorted(space.items())}


@dataclass
class SweepPaths:
    """Where a sweep's state lives: `<storage>/<name>/`."""

    storage: Storage  # tracking.storage (Tune's storage_path)
    name: str

    META = "sweep.json"
    RESUME = "resume"  # trials' own resume state and finished artifacts; removed when the sweep completes

    @classmethod
    def of(cls, storage: str, name: str) -> SweepPaths:
        return cls(Storage(storage), name)

    @property
    def dir(self) -> Storage:
        return self.storage.child(self.name)

    def log_file(self) -> Path:
        """The driver's log: beside the sweep's state when that is local, else in the cache."""
        if self.dir.is_local:
            return self.dir.local_path("logs/driver.log")
        from prunetune.cache import cache_root

        return cache_root() / "logs" / f"{self.name}.log"

    def journal_file(self) -> Path:
        """The driver's tracking journal (`sweep/writer.py`): beside the sweep's state when that is
        local (a shared path included), else in this machine's cache (an object store takes no
        appends), keyed by the storage's URI, so `--resume` replays it from this machine."""
        if self.dir.is_local:
            return self.dir.local_path("tracking-journal.jsonl")
        import hashlib

        from prunetune.cache import cache_root

        key = hashlib.sha256(self.dir.uri.encode()).hexdigest()[:12]
        return cache_root() / "journals" / f"{self.name}-{key}.jsonl"

    def read_meta(self) -> dict | None:
        try:
            return self.dir.read_json(self.META)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise UserError(f"tracking.storage: cannot read {self.dir.uri} ({first_line(exc)})") from None


class Located(NamedTuple):
    """What `prunetune cka` and `prunetune report` read of a sweep: its spec (search entries at a
    representative value), its parent run (None before the sweep ran), the tracking URI, and its
    Optuna study's RDB URL (None for a sweep from before studies were stored)."""

    spec: Spec
    parent_run_id: str | None
    tracking_uri: str
    study_url: str | None


def locate(target: Path, tracking_uri: str | None = None, storage: str | None = None) -> Located:
    """SPEC_OR_SWEEP → the sweep, from its sweep.json (read once). `tracking_uri` and `storage`:
    the CLI's --tracking-uri and --storage (a sweep folder records its own tracking URI)."""
    if target.is_dir():
        meta = target / SweepPaths.META
        if not meta.is_file():
            raise UserError(f"{target}: not a sweep directory (no {SweepPaths.META})")
        info = json.loads(meta.read_text())
        spec = load(None, raw=info["spec"]).fixed_spec()
        return Located(spec, info["parent_run_id"], tracking_uri or info["tracking_uri"], info.get("optuna_storage"))
    spec = load(target, tracking_uri=tracking_uri, storage=storage).fixed_spec()
    uri = tracking.store_uri(spec.tracking.uri)
    meta = SweepPaths.of(spec.tracking.storage, spec.name).read_meta() or {}
    return Located(spec, meta.get("parent_run_id"), uri, meta.get("optuna_storage"))
