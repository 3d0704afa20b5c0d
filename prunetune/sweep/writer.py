"""The driver's writes to the tracking store, off Tune's event loop: Tune's callbacks hand each
write (a plain JSON record) to a `Writer`, which returns at once; one background thread applies
the records in the order they came, so each run's writes keep their order.

Why this shape:

- **Never block a trial.** Tune's trials wait on its driver loop, and the loop used to wait on
  MLflow's HTTP retries (minutes during an outage). Now the loop only appends a line to a file.
- **One thread, one order.** Records are applied in submission order (a run is created before
  its metrics, its metrics before its end); a store that is down holds everything behind it,
  which is what an outage means anyway.
- **A write-ahead journal.** Every record is appended to a JSONL journal in the sweep's state
  (`tracking-journal.jsonl`) before it is queued, and the thread notes the last record applied
  (`tracking-journal.done`). A driver killed mid-outage (SIGKILL, Ctrl-C) thus loses nothing
  it was handed: `--resume` applies what follows the mark. Every record is idempotent (metrics
  carry their own timestamps, which MLflow dedupes; params, tags, artifacts and ends overwrite
  with the same values), so a mark written a moment late costs nothing.
- **Bounded memory.** At most `bound` records are held in memory; beyond that they stay only in
  the journal and are read back from it (by file offset) once the thread catches up.
- **Retry with backoff, one line per outage.** A failed record is retried with exponential
  backoff (capped at `max_delay_s`, so a store that answers again is noticed within that). After
  a failure the thread probes what the record needs (the tracking store, the sweep's storage): if
  the probe fails too, that is an outage (retried as long as it lasts; one line when it begins,
  one when the backlog is written); if the probe answers, the record itself is at fault and is
  dropped, with its error in the log, after `max_tries`.

What a record means is the `apply`/`probe` pair given to the Writer (the sweep's:
`mlflow_logger.Records`); this module knows nothing of MLflow.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable, Protocol

log = logging.getLogger(__name__)


class Journal:
    """An append-only JSONL file of records, each with a sequence number (`seq`), and a mark
    (`<name>.done`) of the last record applied. Not thread-safe: the Writer holds its lock."""

    def __init__(self, path: Path):
        self.path, self.mark_path = path, path.with_suffix(".done")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.done = int(self.mark_path.read_text()) if self.mark_path.is_file() else -1
        self.next_seq, self.pending_offset = 0, None
        if path.is_file():
            for seq, offset, _, _ in self._scan(0):
                self.next_seq = seq + 1
                if seq > self.done and self.pending_offset is None:
                    self.pending_offset = offset  # the first record not applied before
        self._file = open(path, "ab")  # noqa: SIM115 - open for the writer's life, closed in close()
        if self._file.tell() and not self._ends_a_line():
            self._file.write(b"\n")  # a line torn by a kill: new records start on a line of their own
        self._marked_at = 0.0

    def _ends_a_line(self) -> bool:
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"

    def _scan(self, offset: int):
        """(seq, offset, next offset, record) from `offset` on; a torn last line is skipped."""
        with open(self.path, "rb") as f:
            f.seek(offset)
            for line in f:
                start, offset = offset, offset + len(line)
                try:
                    record = json.loads(line)
                except ValueError:
                    log.warning("tracking journal %s: skipped an unreadable line at byte %d", self.path, start)
                    continue
                yield record["seq"], start, offset, record

    def records(self):
        """Every record in the journal, in order (for a resumed sweep's summary)."""
        self._file.flush()
        if self.path.is_file():
            for _, _, _, record in self._scan(0):
                yield record

    def append(self, record: dict) -> tuple[int, int]:
        """Write `record` (a `seq` added) at the end; returns (its seq, its offset)."""
        seq, offset = self.next_seq, self._file.tell()
        self._file.write(json.dumps({"seq": seq, **record}, separators=(",", ":")).encode() + b"\n")
        self._file.flush()  # in the OS's hands: a killed driver loses nothing
        self.next_seq += 1
        return seq, offset

    def read(self, offset: int, limit: int) -> tuple[list[tuple[int, dict]], int | None]:
        """Up to `limit` records from `offset`, and where the next one starts (None: at the end)."""
        self._file.flush()
        out = []
        for seq, start, _, record in self._scan(offset):
            if len(out) == limit:
                return out, start
            out.append((seq, record))
        return out, None

    def mark(self, seq: int, force: bool = False) -> None:
        """Note that every record up to `seq` is applied (written at most twice a second)."""
        self.done = seq
        if force or time.monotonic() - self._marked_at >= 0.5:
            tmp = self.mark_path.with_name(f".{self.mark_path.name}.tmp")
            tmp.write_text(str(seq))
            os.replace(tmp, self.mark_path)
            self._marked_at = time.monotonic()

    def close(self, remove: bool = False) -> None:
        self._file.close()
        if remove:
            Journal.remove(self.path)

    @staticmethod
    def remove(path: Path) -> None:
        """Delete a journal and its mark (nothing when absent)."""
        path.unlink(missing_ok=True)
        path.with_suffix(".done").unlink(missing_ok=True)


class Records(Protocol):
    """What the records mean: applying one, and probing what it needs when it failed."""

    def apply(self, record: dict) -> None: ...

    def probe(self, record: dict) -> str | None:
        """The name of what the record needs that does not answer (e.g. "the tracking store at
        http://…"), or None when all of it answers."""


PERMANENT = ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS", "BAD_REQUEST",
             "INVALID_STATE", "PERMISSION_DENIED")


def _permanent(exc: Exception) -> bool:
    """An error the store answered with that a retry cannot mend (a client error)."""
    return getattr(exc, "error_code", None) in PERMANENT


class Writer:
    """Applies records in a background thread, in order (see the module's text)."""

    def __init__(self, records: Records, journal: Journal, echo: Callable[[str], None], *, bound: int = 5000,
                 max_delay_s: float = 2.0, max_tries: int = 20):
        self.records, self.journal, self.echo = records, journal, echo
        self.bound, self.max_delay_s, self.max_tries = bound, max_delay_s, max_tries
        self._cv = threading.Condition()
        self._queue: collections.deque[tuple[int, dict]] = collections.deque()
        self._backlog = journal.pending_offset  # records only in the journal, from this offset
        self._submitted = journal.next_seq - 1
        self._closing = False
        self._abandon = threading.Event()
        self._down: str | None = None  # what stopped answering; None when all answers
        self._down_since = 0.0
        self._recovered = False  # an outage ended; its backlog is being written
        self._outage_s = 0.0
        self._last_down = ""
        self._thread = threading.Thread(target=self._loop, name="prunetune-tracking", daemon=True)
        self._thread.start()

    # -- the caller's side (Tune's thread) ---------------------------------------------------------
    def submit(self, record: dict) -> None:
        """Queue a record (journaled first); returns at once."""
        with self._cv:
            seq, offset = self.journal.append(record)
            if self._backlog is None and len(self._queue) < self.bound:
                self._queue.append((seq, record))
            elif self._backlog is None:
                self._backlog = offset  # spilled: it is read back from the journal later
            self._submitted = seq
            self._cv.notify_all()

    def journal_records(self) -> list[dict]:
        """Every record the journal holds (a resumed sweep's logger learns from them)."""
        with self._cv:
            return list(self.journal.records())

    @property
    def down(self) -> str | None:
        """What does not answer now (None: the last write went through)."""
        return self._down

    @property
    def behind(self) -> int:
        """How many records are not applied yet."""
        with self._cv:
            return self._submitted - self.journal.done

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every record submitted so far is applied; False if `timeout` (s) passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            target = self._submitted
            while self.journal.done < target:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cv.wait(left)
        return True

    def close(self, timeout: float | None = None, remove: bool = False) -> bool:
        """Flush (up to `timeout` s), then stop the thread. Returns whether all was applied. With
        `remove`, the journal is deleted, if all was (else `--resume` applies the rest). Closing
        again does nothing."""
        if not self._thread.is_alive() and self._closing:
            return self.behind <= 0
        flushed = self.flush(timeout)
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        self._abandon.set()
        self._thread.join(timeout=60)
        with self._cv:
            if self.journal.done >= 0:
                self.journal.mark(self.journal.done, force=True)
            self.journal.close(remove=flushed and remove)
        return flushed

    # -- the thread --------------------------------------------------------------------------------
    def _next(self) -> tuple[int, dict] | None:
        """The next record to apply (from memory, else read back from the journal); None once
        closing with nothing left."""
        with self._cv:
            while True:
                if self._queue:
                    return self._queue.popleft()
                if self._backlog is not None:
                    records, self._backlog = self.journal.read(self._backlog, self.bound)
                    self._queue.extend((seq, r) for seq, r in records if seq > self.journal.done)
                    continue
                self._idle()
                if self._closing:
                    return None
                self._cv.wait()

    def _idle(self) -> None:
        """Nothing left to write: note it, and close an outage's story with one line."""
        if self.journal.done >= 0:
            self.journal.mark(self.journal.done, force=True)
        if self._recovered:
            self._recovered = False
            line = (f"tracking: {self._last_down} answers again and has caught up: everything held is written "
                    f"(it was out for {_clock(self._outage_s)})")
            log.info(line)
            self.echo(line)

    def _loop(self) -> None:
        while True:
            item = self._next()
            if item is None:
                return
            seq, record = item
            if not self._apply(record):
                return  # abandoned (closing while the store is down): the journal keeps it
            with self._cv:
                self.journal.mark(seq)
                self._cv.notify_all()

    def _apply(self, record: dict) -> bool:
        """Apply one record, retrying as the module's text says; False if abandoned."""
        tries, delay = 0, 0.25
        while not self._abandon.is_set():
            try:
                self.records.apply(record)
                self._answered()
                return True
            except Exception as exc:  # noqa: BLE001 - every failure is retried or logged
                down = self.records.probe(record)
                if down is not None:
                    self._stopped(down, exc)
                else:
                    tries += 1
                    if _permanent(exc) or tries >= self.max_tries:
                        log.error("tracking: dropped a %s record after %d tries: %s", record.get("op"), tries,
                                  exc)
                        self._answered()
                        return True
                    log.warning("tracking: %s record failed (try %d): %s", record.get("op"), tries, exc)
            self._abandon.wait(delay)
            delay = min(delay * 2, self.max_delay_s)
        return False

    def _stopped(self, what: str, exc: Exception) -> None:
        log.log(logging.DEBUG if self._down else logging.WARNING, "tracking: %s does not answer: %s", what, exc)
        if self._down is None and not self._recovered:
            self._down_since = time.monotonic()
            line = (f"tracking: {what} stopped answering; trials go on and their records are kept "
                    f"({self.journal.path}) until it answers")
            self.echo(line)
        self._down, self._recovered = what, False

    def _answered(self) -> None:
        if self._down is not None:
            log.info("tracking: %s answers again", self._down)
            self._last_down, self._down, self._recovered = self._down, None, True
            self._outage_s = time.monotonic() - self._down_since


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds} s"
