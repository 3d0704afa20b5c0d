"""The sweep's progress lines (`sweep/progress.Progress`), driven with Tune's trial states as a
sweep of 2 trials at once passes through them (no Ray started)."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

from prunetune.sweep import progress
from prunetune.sweep.progress import Progress


def trial(tid: str, status: str, val_acc: float | None = None):
    return SimpleNamespace(trial_id=tid, status=status, last_result={} if val_acc is None else {"val_acc": val_acc},
                           config={})


def progress_lines(max_concurrent: int | None = 2):
    lines: list[str] = []
    p = Progress("val_acc", "max", 3, 0, lines.append, period_s=1e9, max_concurrent=max_concurrent)
    return p, lines


def done_lines(lines: list[str]) -> list[str]:
    return [line for line in lines if " done, " in line]


def test_a_done_line_counts_the_trial_that_took_the_ended_ones_place():
    # Tune starts the next trial a step after one ends: counted at once, a sweep of 2 trials at
    # once would read "1 running" after every trial
    p, lines = progress_lines()
    p.on_step_end(0, [trial("a", "RUNNING"), trial("b", "RUNNING")])
    p.on_step_end(1, [trial("a", "TERMINATED", 0.5), trial("b", "RUNNING")])
    assert done_lines(lines) == []  # the freed place is not taken yet
    p.on_step_end(2, [trial("a", "TERMINATED", 0.5), trial("b", "RUNNING"), trial("c", "PENDING")])
    assert done_lines(lines) == []
    p.on_step_end(3, [trial("a", "TERMINATED", 0.5), trial("b", "RUNNING"), trial("c", "RUNNING")])
    assert done_lines(lines) == ["[00:00] 1/3 done, 2 running, 0 failed; best val_acc 0.5000"]
    # the last trials: as many running as are left, then none
    p.on_step_end(4, [trial("a", "TERMINATED", 0.5), trial("b", "TERMINATED", 0.7), trial("c", "RUNNING")])
    p.on_step_end(5, [trial("a", "TERMINATED", 0.5), trial("b", "TERMINATED", 0.7), trial("c", "TERMINATED", 0.6)])
    assert done_lines(lines)[1:] == ["[00:00] 2/3 done, 1 running, 0 failed; best val_acc 0.7000",
                                     "[00:00] 3/3 done, 0 running, 0 failed; best val_acc 0.7000"]


def test_a_done_line_waits_for_the_freed_place_only_so_long(monkeypatch):
    # a cluster with room for fewer trials than max_concurrent: the line comes after SETTLE_S
    clock = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    p, lines = progress_lines()
    ended = [trial("a", "TERMINATED", 0.5), trial("b", "RUNNING"), trial("c", "PENDING")]
    p.on_step_end(1, ended)
    clock[0] += progress.SETTLE_S - 0.1
    p.on_step_end(2, ended)
    assert done_lines(lines) == []
    clock[0] += 0.1
    p.on_step_end(3, ended)
    assert done_lines(lines) == ["[00:00] 1/3 done, 1 running, 0 failed; best val_acc 0.5000"]


def test_a_done_line_without_max_concurrent_or_at_the_end_comes_at_once():
    p, lines = progress_lines(max_concurrent=None)  # e.g. a Progress pickled by an older release
    p.on_step_end(1, [trial("a", "TERMINATED", 0.5), trial("b", "RUNNING")])
    assert done_lines(lines) == ["[00:00] 1/3 done, 1 running, 0 failed; best val_acc 0.5000"]
    p, lines = progress_lines()
    trials = [trial("a", "TERMINATED", 0.5), trial("b", "RUNNING")]
    p.on_step_end(1, trials)
    p.on_experiment_end(trials)  # the sweep stopped: the line is not lost
    assert done_lines(lines) == ["[00:00] 1/3 done, 1 running, 0 failed; best val_acc 0.5000"]


def test_an_older_pickled_progress_still_prints():
    p, _ = progress_lines()
    state = pickle.loads(pickle.dumps(p)).__dict__
    del state["max_concurrent"], state["_due"]
    old = Progress.__new__(Progress)
    old.__dict__.update(state)
    lines: list[str] = []
    old.echo = lines.append
    old.on_step_end(1, [trial("a", "TERMINATED", 0.5), trial("b", "RUNNING")])
    assert done_lines(lines) == ["[00:00] 1/3 done, 1 running, 0 failed; best val_acc 0.5000"]
