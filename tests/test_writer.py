"""The tracking writer's own logic (sweep/writer.py): order, spill to the journal and back, retry
with backoff through an outage with one line at each end, a refused record dropped without
holding the rest, and a journal replayed after a kill. The store here is a stub that records what
it is given (the writer knows nothing of MLflow); the real-server tests are in test_tracking.py."""

from __future__ import annotations

import threading
import time

from prunetune.sweep.writer import Journal, Writer


class Store:
    """A stub store: applies records into `applied`; `down` makes it (and its probe) fail."""

    def __init__(self, delay_s: float = 0.0):
        self.applied: list[int] = []
        self.down = threading.Event()
        self.refuse: set[int] = set()
        self.delay_s = delay_s
        self.calls = 0

    def apply(self, record: dict) -> None:
        self.calls += 1
        if self.down.is_set():
            raise ConnectionError("connection refused")
        if record["n"] in self.refuse:
            exc = ValueError("bad value")
            exc.error_code = "INVALID_PARAMETER_VALUE"
            raise exc
        time.sleep(self.delay_s)
        self.applied.append(record["n"])

    def probe(self, record: dict) -> str | None:
        return "the stub store" if self.down.is_set() else None


def writer(tmp_path, store, lines=None, **kw) -> Writer:
    return Writer(store, Journal(tmp_path / "journal.jsonl"), (lines if lines is not None else []).append, **kw)


def test_records_are_applied_in_order_and_the_journal_goes_once_all_are(tmp_path):
    store = Store()
    w = writer(tmp_path, store)
    for n in range(200):
        w.submit({"op": "x", "n": n})
    assert w.close(timeout=30, remove=True)
    assert store.applied == list(range(200))
    assert not (tmp_path / "journal.jsonl").exists() and not (tmp_path / "journal.done").exists()


def test_beyond_the_bound_records_wait_in_the_journal_and_come_back_in_order(tmp_path):
    store = Store(delay_s=0.002)
    w = writer(tmp_path, store, bound=10)
    for n in range(300):
        w.submit({"op": "x", "n": n})
        assert len(w._queue) <= 10  # memory stays bounded while the store is slower than the caller
    assert w.flush(timeout=60)
    assert store.applied == list(range(300))
    w.close(0)


def test_an_outage_is_retried_with_one_line_at_each_end_and_nothing_waits(tmp_path):
    store, lines = Store(), []
    w = writer(tmp_path, store, lines, max_delay_s=0.2)
    store.down.set()
    started = time.monotonic()
    for n in range(50):
        w.submit({"op": "x", "n": n})
    assert time.monotonic() - started < 1.0  # submit returns at once while the store is down
    time.sleep(1.5)
    assert w.down == "the stub store" and w.behind == 50 and store.applied == []
    calls = store.calls
    time.sleep(1.0)
    assert store.calls - calls <= 7  # backoff: a few tries a second at most, not a busy loop
    store.down.clear()
    assert w.flush(timeout=10)
    assert store.applied == list(range(50))
    time.sleep(0.1)
    assert len(lines) == 2, lines
    assert "stopped answering" in lines[0] and "caught up" in lines[1] and "stub store" in lines[1]
    w.close(0)


def test_a_refused_record_is_dropped_and_the_rest_go_on(tmp_path):
    store = Store()
    store.refuse.add(3)
    w = writer(tmp_path, store)
    for n in range(6):
        w.submit({"op": "x", "n": n})
    assert w.close(timeout=10)
    assert store.applied == [0, 1, 2, 4, 5]


def test_a_killed_writer_leaves_its_records_to_the_next_one(tmp_path):
    store = Store()
    w = writer(tmp_path, store)
    for n in range(5):
        w.submit({"op": "x", "n": n})
    assert w.flush(timeout=10)
    store.down.set()
    for n in range(5, 9):
        w.submit({"op": "x", "n": n})
    time.sleep(0.3)
    assert not w.close(timeout=0)  # as a killed driver: the store never got 5..8
    # a torn last line (killed mid-write) is skipped
    with open(tmp_path / "journal.jsonl", "ab") as f:
        f.write(b'{"seq": 9, "op": "x", "n"')
    again = Store()
    w2 = writer(tmp_path, again)
    assert [r["n"] for r in w2.journal_records()] == list(range(9))
    w2.submit({"op": "x", "n": 9})
    assert w2.flush(timeout=10)
    assert [r["n"] for r in w2.journal_records()] == list(range(10))
    assert w2.close(timeout=10, remove=True)
    assert again.applied == [5, 6, 7, 8, 9]
