"""How long an outage of the tracking store holds a sweep up (issue 23: at most 5 s for 60 s).

    python benchmarks/tracking_outage.py [--outage 60] [--repeats 3]

A real `mlflow server` (SQLite backend, serving artifacts) on 127.0.0.1 is the tracking store of
a 6-trial sweep, 2 trials at a time (digits at 16 px; trials of about 70 s on a 2-core VM, so a
60 s outage ends while trials still run, as in the issue's report: a sweep whose trials all end
during the outage must wait for the store at its end, whatever the design). Each repeat runs the same
sweep three times, interleaved, each against a fresh server:

  baseline  the server up throughout
  restart   the server SIGKILLed as soon as the first trial's run is FINISHED and started again at
            once: the control, what a restart costs without an outage
  outage    the same, started again `--outage` seconds after the kill; the outage lasts until it
            answers

The holdup is a sweep's wall time minus the baseline's (median of the repeats). On this 2-core VM
a server's start costs about 10 CPU seconds on the cores the trials use, which a server on
another machine would not: the restart arm measures that cost, and "outage − restart" is what
the outage's length itself costs. The script also prints the CPU seconds the servers used, and
the trials' epochs per minute while the store was down (from when the driver took each epoch's
report): trials held up by the store make none. It also checks
what the issue asks of the outage sweep: every trial FINISHED exactly once, with all its
per-epoch metrics (every epoch's step once) and artifacts, one parent run; and that the terminal
got one line when the store stopped answering and one when it caught up.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import procs  # noqa: E402 - the tests' server helpers: started in their own session, stopped by PID

SPEC = """
name: outage
seed: 0
data: {dataset: digits, image_size: 16}
train: {batch_size: 32, lr: 0.05, dense_epochs: 1, finetune_epochs: 90}
schedule: {method: {choice: [oneshot, iterative]}, sparsity: {uniform: [0.5, 0.9]}, step_size: 0.3, step_epochs: 1}
search: {sampler: random, num_trials: 6}
resources: {cpus_per_trial: 1, max_concurrent: 2}
"""
PER_EPOCH = ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_seconds")


def client(uri: str):
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"  # this script's own polling: fail fast
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def trial_runs(uri: str) -> list:
    c = client(uri)
    exp = c.get_experiment_by_name("outage")
    runs = c.search_runs([exp.experiment_id], max_results=1000) if exp else []
    return runs


def finished(uri: str) -> int:
    try:
        return sum(r.info.status == "FINISHED" and r.data.tags.get("prunetune.kind") == "trial"
                   for r in trial_runs(uri))
    except Exception:  # noqa: BLE001 - the store not made yet
        return 0


class ServerCpu:
    """The CPU seconds of a server's processes, sampled twice a second (a process's last sample
    is kept after it ends, so short-lived helpers count too)."""

    def __init__(self):
        self.seen: dict[int, float] = {}
        self.server, self.stopped = None, threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self.stopped.wait(0.5):
            server = self.server
            for pid in procs.session_pids(server.pid) if server else ():
                used = procs.cpu_s(pid)
                if used is not None:
                    self.seen[pid] = used

    def total(self) -> float:
        self.stopped.set()
        return sum(self.seen.values())


def one_sweep(outage: float | None) -> tuple[float, str, dict]:
    """Run the sweep against a fresh server (with an outage of `outage` s, 0: a restart, or None);
    returns its wall time, its stderr and what the store holds."""
    work = Path(tempfile.mkdtemp(prefix="bench-outage-"))
    (work / "outage.yaml").write_text(textwrap.dedent(SPEC))
    port = procs.free_port()
    uri = f"http://127.0.0.1:{port}"
    cpu = ServerCpu()
    server = cpu.server = procs.mlflow_server(port, work / "server")
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "prunetune.cli", "sweep", str(work / "outage.yaml"),
                             "--tracking-uri", uri], cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    down_at = back_at = dead_until = None
    try:
        if outage is not None:
            while finished(uri) < 1 and proc.poll() is None:
                time.sleep(0.5)
            cpu.server = None
            procs.kill_session(server)
            down_at = time.time()
            time.sleep(outage)
            dead_until = time.time()  # then the new server starts (seconds of CPU on these cores)
            server = procs.mlflow_server(port, work / "server")  # returns once it answers
            cpu.server, back_at = server, time.time()
        out, err = proc.communicate()
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            sys.exit(f"the sweep failed:\n{err[-3000:]}")
        info = {"check": check(uri), "server_cpu_s": cpu.total(), **progress(uri, down_at, dead_until, back_at)}
        return wall, out + err, info
    finally:
        procs.kill_session(server)


def progress(uri: str, down_at: float | None, dead_until: float | None, back_at: float | None) -> dict:
    """The trials' epochs per minute (from when the driver took each epoch's report) over the
    sweep, and while the server was dead (before its restart began); when the last trial ended
    after the store's return."""
    c, runs = client(uri), [r for r in trial_runs(uri) if r.data.tags.get("prunetune.kind") == "trial"]
    taken = sorted(m.timestamp / 1000 for r in runs for m in c.get_metric_history(r.info.run_id, "train_loss"))
    info = {"epochs_per_min": len(taken) / (taken[-1] - taken[0]) * 60}
    if down_at is not None:
        during = [t for t in taken if down_at <= t <= dead_until]
        info.update(down_s=back_at - down_at, epochs_per_min_down=len(during) / max(dead_until - down_at, 1e-9) * 60,
                    margin_s=max(r.info.end_time / 1000 for r in runs) - back_at)
    return info


def check(uri: str) -> str:
    """What the store holds of the sweep, checked as the issue asks: one line."""
    c, runs = client(uri), trial_runs(uri)
    parents = [r for r in runs if r.data.tags.get("prunetune.kind") == "sweep"]
    trials = [r for r in runs if r.data.tags.get("prunetune.kind") == "trial"]
    problems = []
    if len(parents) != 1 or parents[0].info.status != "FINISHED":
        problems.append(f"{len(parents)} parent runs")
    if len(trials) != 6 or len({r.data.tags["prunetune.trial_id"] for r in trials}) != 6:
        problems.append(f"{len(trials)} trial runs")
    for r in trials:
        epochs = int(r.data.metrics.get("train_epochs_total", 0) + 0.999)
        for key in PER_EPOCH:
            steps = [m.step for m in c.get_metric_history(r.info.run_id, key)]
            if key == "val_acc":
                steps = steps[:-1]  # its final value, logged once more after the last epoch
            if steps != list(range(epochs)):
                problems.append(f"{r.info.run_id} {key} steps {steps}")
        files = {a.path for a in c.list_artifacts(r.info.run_id)}
        if r.info.status != "FINISHED" or not {"checkpoint", "config.yaml", "data", "figures"} <= files:
            problems.append(f"{r.info.run_id} {r.info.status} artifacts {sorted(files)}")
    return "ok: 6/6 trial runs FINISHED once, every epoch's metrics once, artifacts, one parent" \
        if not problems else "PROBLEMS: " + "; ".join(problems)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--outage", type=float, default=60.0)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    holdups: dict[str, list[float]] = {"restart": [], "outage": []}
    for repeat in range(args.repeats):
        base, _, b = one_sweep(None)
        print(f"repeat {repeat + 1}: baseline {base:6.1f} s; trials {b['epochs_per_min']:.0f} epochs/min; the server "
              f"used {b['server_cpu_s']:.1f} CPU s ({b['check']})", flush=True)
        for arm, outage in (("restart", 0.0), ("outage", args.outage)):
            wall, text, o = one_sweep(outage)
            holdups[arm].append(wall - base)
            pace = (f"the trials while it was dead {o['epochs_per_min_down']:.0f} epochs/min "
                    f"({o['epochs_per_min']:.0f} over the sweep)" if outage else
                    f"the trials {o['epochs_per_min']:.0f} epochs/min over the sweep")
            print(f"repeat {repeat + 1}: {arm:8s} {wall:6.1f} s, holdup {holdups[arm][-1]:+.1f} s; the server down "
                  f"{o['down_s']:.1f} s (SIGKILL to answering again), {pace}; the last "
                  f"trial ended {o['margin_s']:.1f} s after the server was back; the servers used "
                  f"{o['server_cpu_s']:.1f} CPU s ({o['check']})", flush=True)
            for line in text.splitlines():
                if line.startswith("tracking:") or "waiting up to" in line:
                    print(f"    terminal: {line}")
            if "View run" in text:
                print("    MLflow's 'View run' lines reached the terminal")
    beyond = [o - r for o, r in zip(holdups["outage"], holdups["restart"])]
    print(f"holdup by a restart of the server (the control): median {statistics.median(holdups['restart']):+.1f} s "
          f"(per repeat {', '.join(f'{h:+.1f}' for h in holdups['restart'])})")
    print(f"holdup by a {args.outage:.0f} s outage: median {statistics.median(holdups['outage']):+.1f} s "
          f"(per repeat {', '.join(f'{h:+.1f}' for h in holdups['outage'])}; target ≤ 5 s)")
    print(f"the outage beyond the restart, per repeat: {', '.join(f'{h:+.1f}' for h in beyond)}; "
          f"median {statistics.median(beyond):+.1f} s")


if __name__ == "__main__":
    main()
