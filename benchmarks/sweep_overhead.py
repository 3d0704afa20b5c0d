"""Per-trial overhead of the sweep machinery (Ray Tune, Optuna, MLflow) and its 2-trial
concurrency speedup, against the same trials run one after another in one process.

    python benchmarks/sweep_overhead.py [--trials 4] [--repeats 3]

Three ways to run the same trials, each in a subprocess with a fresh dense cache and tracking
store (the cache keeps only MLflow's migrated empty store, made once per machine), all timed end to end
(imports and start-up included):
  baseline  one process, `run_trial` for each configuration in turn (what `prunetune trial` does),
            with one torch thread, as each sweep trial has (cpus_per_trial: 1)
  sweep×1   `prunetune sweep` with max_concurrent 1 (a grid over the same configurations)
  sweep×2   the same with max_concurrent 2
each with N and 2N trials, the six runs interleaved within each repeat. Medians (and minima) of
the repeats. The difference between 2N and N trials cancels what a sweep pays once (Ray and
MLflow start-up, the first worker's imports, the shared dense phase), so the report separates the
per-trial overhead (slope) from the fixed start-up cost. It also reads each sweep×1 trial's own
`trial_seconds` back from MLflow: the rest of the wall time is the machinery's.

Concurrency is printed three ways. The slope ratio (time per extra trial at ×1 over ×2, from the
medians) is what the goal names, but it is a quotient of two differences of noisy wall times; so
the same ratio is also taken within each repeat (its runs are minutes apart) and its median
printed; and the steady state is read from the trials' own MLflow run times in the 2N-trial
sweeps: a trial's cycle is from its start to the start of the trial that takes its place (the
first start after it ends), so cycle / concurrency is the time each further trial costs once the
first trials (the dense phase, and the wait for it) are past.

The per-trial overhead is likewise printed twice: as the difference of slopes, and trial by trial
at the steady state: each sweep×1 trial's cycle against the baseline's wall time for the same
configuration (its figures and artifacts included in both), median per repeat.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

SPEC = """
name: overhead
seed: 0
data: {{dataset: digits, image_size: 16}}
train: {{batch_size: 64, lr: 0.05, dense_epochs: 3, finetune_epochs: 3}}
schedule: {{method: iterative, sparsity: {{choice: {sparsities}}}, step_size: 0.2, step_epochs: 1}}
search: {{sampler: grid, num_trials: {trials}}}
resources: {{cpus_per_trial: 1, max_concurrent: {concurrent}}}
"""

BASELINE = """
import sys, tempfile
import torch
torch.set_num_threads(1)  # the sweep's trials have cpus_per_trial: 1, so one thread each
from prunetune import spec
from prunetune.trial import run_trial
import json, time
loaded = spec.load(sys.argv[1])
total, walls = 0.0, {}
for s in loaded.space["schedule.sparsity"].args:
    start = time.perf_counter()
    total += run_trial(loaded.resolve({"schedule.sparsity": s}), tempfile.mkdtemp()).metrics["trial_seconds"]
    walls[float(s)] = time.perf_counter() - start  # the whole trial: its artifacts and figures too
print(f"walls {json.dumps(list(walls.items()))}")
print(f"trial_seconds {total}")
"""


def trial_runs(cwd: Path) -> list:
    """The sweep's trial runs, from its MLflow store in `cwd`."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{cwd}/mlruns/mlflow.db")
    runs = c.search_runs([c.get_experiment_by_name("overhead").experiment_id])
    return [r for r in runs if r.data.tags.get("prunetune.kind") == "trial"]


def trial_seconds(cwd: Path) -> float:
    return sum(r.data.metrics.get("trial_seconds", 0.0) for r in trial_runs(cwd))


def trial_cycles(cwd: Path, concurrent: int) -> dict[float, float]:
    """Each trial's cycle (s), by its sparsity: from its start to the start of the trial that
    follows it on its slot (the first start after it ends), skipping the first `concurrent` trials
    (the dense phase, and the wait for it) and the last ones (nothing follows them)."""
    spans = sorted((r.info.start_time / 1e3, r.info.end_time / 1e3, float(r.data.params["schedule.sparsity"]))
                   for r in trial_runs(cwd))
    cycles = {}
    for start, end, sparsity in spans[concurrent:]:
        following = [s for s, _, _ in spans if s >= end]
        if following:
            cycles[sparsity] = min(following) - start
    return cycles


def fresh_cache() -> str:
    """A new cache (so each run trains its own dense phase) holding the one thing a user's second
    sweep finds there: MLflow's migrated empty store, which a first sweep makes once (~5 s)."""
    from prunetune.tracking import empty_store

    cache = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    template = empty_store()
    (cache / "mlflow").mkdir()
    shutil.copy(template, cache / "mlflow" / template.name)
    return str(cache)


def timed(cmd: list[str], cwd: Path) -> tuple[float, str]:
    env = {**os.environ, "PRUNETUNE_CACHE": fresh_cache()}
    start = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return elapsed, r.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=4, help="N: runs are timed with N and 2N trials")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    sizes = (args.trials, 2 * args.trials)
    times: dict[tuple[str, int], list[float]] = {(m, n): [] for n in sizes for m in ("baseline", "sweep×1", "sweep×2")}
    outside: dict[int, list[float]] = {n: [] for n in sizes}  # sweep×1 wall − Σ trial_seconds
    base_outside: dict[int, list[float]] = {n: [] for n in sizes}  # the same for the baseline
    cost: dict[str, list[float]] = {"sweep×1": [], "sweep×2": []}  # steady-state cost per trial, 2N trials
    walls: dict[float, float] = {}  # the baseline's wall per trial (2N trials), this repeat
    direct: list[float] = []  # per repeat: median over configurations of sweep×1 cycle − baseline wall
    for repeat in range(args.repeats):
        for mode, n in times:
            sparsities = [round(0.5 + 0.4 * i / (n - 1), 4) for i in range(n)]
            work = Path(tempfile.mkdtemp(prefix="bench-"))
            spec = work / "spec.yaml"
            spec.write_text(textwrap.dedent(SPEC.format(sparsities=sparsities, trials=n,
                                                        concurrent=2 if mode == "sweep×2" else 1)))
            cmd = ([sys.executable, "-c", BASELINE, str(spec)] if mode == "baseline"
                   else [sys.executable, "-m", "prunetune.cli", "sweep", str(spec)])
            elapsed, out = timed(cmd, work)
            times[mode, n].append(elapsed)
            extra = ""
            if mode == "baseline":
                if n == sizes[1]:
                    first = json.loads(out.split("walls ")[1].splitlines()[0])
                    walls = dict(first[1:])  # the first trial trains the dense phase
                base_outside[n].append(elapsed - float(out.split("trial_seconds ")[-1]))
                extra = f" ({base_outside[n][-1]:.1f} s outside the trials' own trial_seconds)"
            if mode == "sweep×1":
                outside[n].append(times[mode, n][-1] - trial_seconds(work))
                extra = f" ({outside[n][-1]:.1f} s outside the trials' own trial_seconds)"
            if mode != "baseline" and n == sizes[1]:
                # steady state: the cost of one more trial is its cycle over the concurrency
                concurrent = 2 if mode == "sweep×2" else 1
                cycles = trial_cycles(work, concurrent)
                cost[mode].append(statistics.median(cycles.values()) / concurrent if cycles else float("nan"))
                extra += f" (steady state: {cost[mode][-1]:.2f} s per trial)"
                if mode == "sweep×1":
                    direct.append(statistics.median(cycles[k] - walls[k] for k in cycles if k in walls))
                    extra += f" (each trial {direct[-1]:+.2f} s beyond the same trial in the baseline)"
            print(f"repeat {repeat + 1}: {mode:9s} {n:2d} trials {times[mode, n][-1]:6.1f} s{extra}", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    n1, n2 = sizes
    print(f"\nmedians (minima) of {args.repeats} interleaved repeats on {os.cpu_count()} CPUs:")
    for (mode, n), v in med.items():
        print(f"  {mode:9s} {n:2d} trials {v:6.1f} s ({min(times[mode, n]):6.1f} s)")
    for n in sizes:
        print(f"sweep×1 of {n} trials outside its trials' trial_seconds: median {statistics.median(outside[n]):.1f} s "
              f"(min {min(outside[n]):.1f} s; target for 4 trials ≤ 8 s); the baseline's: "
              f"median {statistics.median(base_outside[n]):.1f} s (process start, imports, artifacts)")
    slope = {m: (med[m, n2] - med[m, n1]) / (n2 - n1) for m in ("baseline", "sweep×1", "sweep×2")}
    print(f"time per extra trial: baseline {slope['baseline']:.2f} s, sweep×1 {slope['sweep×1']:.2f} s, "
          f"sweep×2 {slope['sweep×2']:.2f} s")
    print(f"per-trial overhead of the sweep (slope sweep×1 − slope baseline): "
          f"{slope['sweep×1'] - slope['baseline']:+.2f} s (target ≤ 0.5 s)")
    print(f"  the same, trial by trial at the steady state ({n2} trials: each sweep×1 trial's cycle against the "
          f"baseline's wall time for the same configuration, figures and artifacts in both): per repeat "
          f"{', '.join(f'{d:+.2f}' for d in direct)} s; median {statistics.median(direct):+.2f} s")
    fixed = (med["sweep×1", n1] - n1 * slope["sweep×1"]) - (med["baseline", n1] - n1 * slope["baseline"])
    print(f"fixed start-up cost of a sweep beyond the baseline's: {fixed:.1f} s (target ≤ 6 s)")
    print(f"overhead per trial, all included, at {n2} trials: {(med['sweep×1', n2] - med['baseline', n2]) / n2:+.2f} s")
    print(f"2-trial concurrency speedup per extra trial (slope ×1 / slope ×2): "
          f"{slope['sweep×1'] / slope['sweep×2']:.2f}× (target ≥ 1.7×)")
    per_repeat = [(times["sweep×1", n2][i] - times["sweep×1", n1][i])
                  / (times["sweep×2", n2][i] - times["sweep×2", n1][i]) for i in range(args.repeats)]
    print(f"  the same within each repeat: {', '.join(f'{r:.2f}×' for r in per_repeat)}; "
          f"median {statistics.median(per_repeat):.2f}×")
    steady = [a / b for a, b in zip(cost["sweep×1"], cost["sweep×2"])]
    print(f"  steady state, from the trials' run times ({n2}-trial sweeps): sweep×1 "
          f"{statistics.median(cost['sweep×1']):.2f} s per trial, sweep×2 {statistics.median(cost['sweep×2']):.2f} s; "
          f"per repeat {', '.join(f'{r:.2f}×' for r in steady)}; median {statistics.median(steady):.2f}×")
    print(f"2-trial concurrency speedup, whole sweep of {n2}: {med['sweep×1', n2] / med['sweep×2', n2]:.2f}×")


if __name__ == "__main__":
    main()
