"""Per-trial overhead of the sweep machinery (Ray Tune, Optuna, MLflow) and its 2-trial
concurrency speedup, against the same trials run one after another in one process.

    python benchmarks/sweep_overhead.py [--trials 6] [--repeats 3]

Three ways to run the same trials, each in a subprocess with a fresh dense cache and tracking
store, all timed end to end (imports and start-up included):
  baseline  one process, `run_trial` for each configuration in turn (what `prunetune trial` does)
  sweep×1   `prunetune sweep` with max_concurrent 1 (a grid over the same configurations)
  sweep×2   the same with max_concurrent 2
Prints medians, the per-trial overhead (sweep×1 − baseline) / trials, and sweep×1 / sweep×2.
"""

from __future__ import annotations

import argparse
import os
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
from prunetune import spec
from prunetune.trial import run_trial
loaded = spec.load(sys.argv[1])
for s in loaded.space["schedule.sparsity"].args:
    run_trial(loaded.resolve({"schedule.sparsity": s}), tempfile.mkdtemp())
"""


def timed(cmd: list[str], cwd: Path) -> float:
    env = {**os.environ, "PRUNETUNE_CACHE": tempfile.mkdtemp(prefix="bench-cache-")}
    start = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    sparsities = [round(0.5 + 0.4 * i / max(1, args.trials - 1), 3) for i in range(args.trials)]
    times: dict[str, list[float]] = {"baseline": [], "sweep×1": [], "sweep×2": []}
    for repeat in range(args.repeats):
        for mode in times:
            work = Path(tempfile.mkdtemp(prefix="bench-"))
            concurrent = 2 if mode == "sweep×2" else 1
            spec = work / "spec.yaml"
            spec.write_text(textwrap.dedent(SPEC.format(sparsities=sparsities, trials=args.trials,
                                                        concurrent=concurrent)))
            if mode == "baseline":
                cmd = [sys.executable, "-c", BASELINE, str(spec)]
            else:
                cmd = [sys.executable, "-m", "prunetune.cli", "sweep", str(spec)]
            times[mode].append(timed(cmd, work))
            print(f"repeat {repeat + 1}: {mode:9s} {times[mode][-1]:6.1f} s", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n{args.trials} trials, median of {args.repeats} (2 cores here: {os.cpu_count()} CPUs)")
    for k, v in med.items():
        print(f"  {k:9s} {v:6.1f} s")
    print(f"per-trial overhead of the sweep: {(med['sweep×1'] - med['baseline']) / args.trials:+.2f} s "
          f"(target < 1.5 s)")
    print(f"2-trial concurrency speedup (sweep×1 / sweep×2): {med['sweep×1'] / med['sweep×2']:.2f}× (target ≥ 1.6×)")
    print(f"sweep×2 against the one-process baseline: {med['baseline'] / med['sweep×2']:.2f}×")


if __name__ == "__main__":
    main()
