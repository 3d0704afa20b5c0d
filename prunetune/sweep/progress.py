"""What a user sees while a sweep runs: a Tune callback on the driver that prints progress."""

from __future__ import annotations

import os
import sys
import time
from typing import Callable

from ray import tune

from prunetune.sweep.protocol import EPOCHS_KEY, FINAL_FLAG, PHASE_KEY, failed, tune_error_text, unpack

FIRST_S = 5.0  # seconds between the piped status lines until the first trial ends
SETTLE_S = 3.0  # at most this long a done line waits for the ended trials' places to be taken again


class Progress(tune.Callback):
    """What a user sees while a sweep runs: one line per running trial (its method, phase, epoch
    x/y, last val_acc, time so far and an estimate of the rest), refreshed in place on a terminal
    and printed every `period_s` seconds when output is piped (every `FIRST_S` until the first
    trial ends, so that the shared dense phase is never silent long); a line whenever a trial ends (done /
    running / failed, the best so far, elapsed); one line when a trial is retried.

    Tune starts the trial that takes an ended trial's place a step later (a reused worker: about
    0.1 s), so a done line counted at the step the trial ended would always show one trial fewer
    running than the sweep runs (`1 running` throughout, at most 2 at once). The line waits until
    the freed places are taken again (`max_concurrent`, or as many trials as are left), at most
    `SETTLE_S` seconds (a cluster with room for fewer trials); trials that end within that wait
    share one line."""

    max_concurrent: int | None = None  # a Progress pickled before this was kept: print at once
    _due: float | None = None  # when a trial ended whose done line is not printed yet

    def __init__(self, objective: str, mode: str, total: int, max_retries: int, echo: Callable[[str], None],
                 method: str = "", period_s: float | None = None, max_concurrent: int | None = None):
        self.objective, self.mode, self.total, self.echo = objective, mode, total, echo
        self.max_concurrent = max_concurrent
        self.max_retries, self.method = max_retries, method  # method: the spec's, when not searched
        self.period_s = float(os.environ.get("PRUNETUNE_PROGRESS_S", "30")) if period_s is None else period_s
        self.start = time.monotonic()
        self._seen: set = set()
        self._running: dict[str, dict] = {}
        self._last_status = time.monotonic()
        self._live = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(echo=None, _live=None, _running={}, _due=None)
        return state

    # -- output --------------------------------------------------------------------------------
    def _print(self, line: str) -> None:
        if self._live is not None:
            self._live.console.print(line, highlight=False, markup=False)
        elif self.echo is not None:
            self.echo(line)

    def setup(self, **info):
        if self.echo is not None and sys.stderr.isatty():
            from rich.console import Console
            from rich.live import Live

            self._live = Live(console=Console(stderr=True), refresh_per_second=2, transient=True)
            self._live.start()

    def on_experiment_end(self, trials, **info):
        if self._due is not None and self.echo is not None:
            self._done_line(trials)
        if self._live is not None:
            self._live.stop()
            self._live = None

    def status_lines(self) -> list[str]:
        now = time.monotonic()
        lines = []
        for tid, t in sorted(self._running.items()):
            if "epoch" not in t:
                lines.append(f"  {tid} {t['method']:<10} starting  {_clock(now - t['start'])}")
                continue
            done, planned = t["epoch"] + 1, t.get("epochs")
            recent = t["epoch_s"][-3:]
            left = (f", ~{_clock(sum(recent) / len(recent) * (planned - done))} left"
                    if planned and recent and planned > done else "")
            val = f"  val_acc {t['val_acc']:.4f}" if t.get("val_acc") is not None else ""
            total = f"/{planned:g}" if planned else ""
            lines.append(f"  {tid} {t['method']:<10} {t.get('phase', ''):<10} epoch {done}{total}{val}  "
                         f"{_clock(now - t['start'])}{left}")
        return lines

    def _refresh(self, force: bool = False) -> None:
        if self._live is not None:
            from rich.text import Text

            self._live.update(Text("\n".join(self.status_lines()) or " "))
        elif self.echo is not None and self._running and (
                force or time.monotonic() - self._last_status >= self._period()):
            self._last_status = time.monotonic()
            elapsed = int(time.monotonic() - self.start)
            self.echo(f"[{elapsed // 60:02d}:{elapsed % 60:02d}] running:")
            for line in self.status_lines():
                self.echo(line)

    def _period(self) -> float:
        return min(self.period_s, FIRST_S) if not self._seen else self.period_s

    # -- Tune's events -------------------------------------------------------------------------
    def on_trial_start(self, iteration, trials, trial, **info):
        method = trial.config.get("schedule.method", self.method)
        self._running[trial.trial_id] = {"method": method, "start": time.monotonic(), "epoch_s": []}

    def on_trial_result(self, iteration, trials, trial, result, **info):
        t, result = self._running.get(trial.trial_id), unpack(result)
        if t is None or result.get(FINAL_FLAG) or "epoch" not in result:
            return
        t.update(epoch=result["epoch"], epochs=result.get(EPOCHS_KEY), phase=result.get(PHASE_KEY, ""),
                 val_acc=result.get("val_acc"))
        if result.get("epoch_seconds") is not None:
            t["epoch_s"].append(result["epoch_seconds"])

    def on_trial_recover(self, iteration, trials, trial, **info):
        tries = trial.run_metadata.num_failures
        self._print(f"trial {trial.trial_id} retried ({tries}/{self.max_retries}) from its last saved state: "
                    f"{tune_error_text(trial)}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._running.pop(trial.trial_id, None)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._running.pop(trial.trial_id, None)

    def on_step_end(self, iteration, trials, **info):
        if self.echo is None:
            return
        ended = {t.trial_id for t in trials if t.status in ("TERMINATED", "ERROR")}
        if ended != self._seen:
            self._seen = ended
            if self._due is None:
                self._due = time.monotonic()
        if self._due is not None and (self._refilled(trials, len(ended))
                                      or time.monotonic() - self._due >= SETTLE_S):
            self._done_line(trials)
        self._refresh()

    def _refilled(self, trials, ended: int) -> bool:
        """Whether the sweep runs as many trials as it can again: `max_concurrent`, or as many
        as are left (unknown `max_concurrent`: yes)."""
        if self.max_concurrent is None:
            return True
        running = sum(t.status == "RUNNING" for t in trials)
        return running >= min(self.max_concurrent, self.total - ended)

    def _done_line(self, trials) -> None:
        when, self._due = self._due, None
        n_failed = sum(t.status == "ERROR" or failed(t.last_result) for t in trials)
        done = sum(t.status == "TERMINATED" for t in trials) - sum(failed(t.last_result) for t in trials)
        running = sum(t.status == "RUNNING" for t in trials)
        scores = [(t.last_result or {}).get(self.objective) for t in trials if t.status == "TERMINATED"]
        scores = [s for s in scores if s is not None]
        best = (max if self.mode == "max" else min)(scores) if scores else None
        elapsed = int(when - self.start)  # when the trial ended
        best_text = f"best {self.objective} {best:.4f}" if best is not None else "no result yet"
        self._print(f"[{elapsed // 60:02d}:{elapsed % 60:02d}] {done}/{self.total} done, "
                    f"{running} running, {n_failed} failed; {best_text}")


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
