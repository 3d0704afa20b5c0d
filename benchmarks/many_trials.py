"""A sweep of many tiny trials: does the driver slow down, grow, or pay more per trial as the runs
pile up? (issue 23, "Many trials")

    python benchmarks/many_trials.py [--trials 200] [--concurrent 2]

One `prunetune sweep` (digits at 8 px, 1 dense + 1 fine-tuning epoch, random sampler over
method and sparsity, a SQLite tracking store and an Optuna RDB beside it, as by default) in a
subprocess, watched from outside every 0.5 s: the driver's resident memory (VmRSS, and VmHWM at
the end) and its CPU seconds (utime + stime). Afterwards the trials' MLflow runs give each trial's
end; the trials are cut in thirds by the order they ended in, and for the first and the last third:

  throughput   trials ended per minute (a third's trials over the time from the previous third's
               last end to its own last end; the first third from the end of the first
               `--concurrent` trials, which train the shared dense phase while the workers warm
               up); target last/first ≥ 0.9
  driver CPU   the driver's CPU seconds over that span, per trial: what it costs the driver to
               take a trial's reports, hand them to MLflow and tell Optuna, and Tune's own state
  driver RSS   at the end of each third; peak over the whole sweep (target < 1 GB)

Then Tune's own experiment state, which it rewrites every second (`TUNE_GLOBAL_CHECKPOINT_S=1`):
its size, per trial, the share that is Tune's statistics of the trials' metrics, and the time
one write of it takes (its `json.dumps`, median of 5).

Then the per-trial work against the stores themselves, timed directly in this process against the
store the sweep left (N runs, N trials) and against an empty one, medians of 20:

  MLflow       what the tracking writer does for one trial (create the run, its params, its
               dataset input, two epochs of metrics, its final metrics, two small artifacts, its
               end, the parent's best-trial tag)
  Optuna       one ask (the sweep's random sampler) and its tell in the sweep's RDB study
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
name: many
seed: 0
data: {{dataset: digits, image_size: 8}}
train: {{batch_size: 128, lr: 0.05, dense_epochs: 1, finetune_epochs: 1}}
schedule:
  method: {{choice: [oneshot, iterative]}}
  sparsity: {{uniform: [0.5, 0.9]}}
  step_size: 0.3
  step_epochs: 0.5
search: {{sampler: random, num_trials: {trials}}}
resources: {{cpus_per_trial: 1, max_concurrent: {concurrent}}}
"""


def proc_sample(pid: int) -> tuple[float, float, float] | None:
    """(CPU seconds, VmRSS GB, VmHWM GB) of a process, or None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    kb = {line.split(":")[0]: int(line.split()[1]) for line in status.splitlines() if line.startswith("Vm")}
    if "VmRSS" not in kb:
        return None  # it has exited (a zombie until it is waited for)
    return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK"), kb["VmRSS"] / 2**20, kb["VmHWM"] / 2**20


def run_sweep(work: Path, trials: int, concurrent: int) -> list[tuple[float, float, float, float]]:
    """Run the sweep; returns samples (time, CPU s, RSS GB, HWM GB) of its driver."""
    spec = work / "many.yaml"
    spec.write_text(textwrap.dedent(SPEC.format(trials=trials, concurrent=concurrent)))
    log = open(work / "sweep.err", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "prunetune.cli", "sweep", str(spec)], cwd=work,
                            stdout=subprocess.DEVNULL, stderr=log, env={**os.environ, "PRUNETUNE_PROGRESS_S": "60"})
    samples = []
    while proc.poll() is None:
        sample = proc_sample(proc.pid)
        if sample is not None:
            samples.append((time.time(), *sample))
        time.sleep(0.5)
    log.close()
    if proc.returncode != 0:
        sys.exit(f"the sweep failed:\n{(work / 'sweep.err').read_text()[-3000:]}")
    return samples


def at(samples, t: float) -> tuple:
    """The last sample at or before time t."""
    before = [s for s in samples if s[0] <= t]
    return before[-1] if before else samples[0]


def thirds(work: Path, samples, concurrent: int) -> None:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{work}/mlruns/mlflow.db")
    runs = c.search_runs([c.get_experiment_by_name("many").experiment_id], max_results=50_000)
    trials = [r for r in runs if r.data.tags.get("prunetune.kind") == "trial"]
    states = statistics.multimode([r.info.status for r in trials])
    ends = sorted(r.info.end_time / 1000 for r in trials)
    first_start = min(r.info.start_time / 1000 for r in trials)
    n = len(ends)
    print(f"{n} trial runs ({sum(r.info.status == 'FINISHED' for r in trials)} FINISHED; most: {states}), "
          f"sweep driver up {samples[-1][0] - samples[0][0]:.0f} s")
    # the first trials train the shared dense phase and warm their workers up: the first third
    # is counted from the end of the first `concurrent` trials, so it measures the steady state
    warm = concurrent
    cut = [warm, n // 3, n - n // 3, n]
    rates, costs = [], []
    for name, lo, hi in (("first", cut[0], cut[1]), ("middle", cut[1], cut[2]), ("last", cut[2], cut[3])):
        start = ends[lo - 1]
        span = ends[hi - 1] - start
        cpu = at(samples, ends[hi - 1])[1] - at(samples, start)[1]
        rates.append((hi - lo) / span * 60)
        costs.append(cpu / (hi - lo) * 1000)
        rss = at(samples, ends[hi - 1])[2]
        print(f"  {name:6s} third (trials {lo + 1}-{hi}): {rates[-1]:5.1f} trials/min, driver CPU "
              f"{costs[-1]:5.0f} ms per trial, driver RSS at its end {rss:.3f} GB")
    print(f"  (the first {warm} trials, with the dense phase and the workers' start: "
          f"{(ends[warm - 1] - first_start):.1f} s)")
    print(f"throughput last third / first third: {rates[2] / rates[0]:.2f} (target ≥ 0.9); last / middle "
          f"{rates[2] / rates[1]:.2f}")
    print(f"driver CPU per trial, last third / first third: {costs[2] / costs[0]:.2f}")
    top = max(samples, key=lambda s: s[2])
    print(f"driver peak RSS (VmHWM): {samples[-1][3]:.3f} GB; largest VmRSS sampled {top[2]:.3f} GB, "
          f"{top[0] - ends[-1]:+.0f} s from the last trial's end (target < 1 GB)")


def tune_state(work: Path) -> None:
    """The size of Tune's experiment state the sweep left, and the time to serialise it."""
    import json

    [path] = (work / "mlruns" / "tune").rglob("experiment_state-*.json")
    text = path.read_text()
    state = json.loads(text)
    trials = state["trial_data"]
    stats = sum(len(json.dumps(json.loads(m)[k], indent=2)) for _, m in trials
                for k in ("metric_analysis", "metric_n_steps"))
    times = []
    for _ in range(5):
        start = time.perf_counter()
        json.dumps(state, indent=2)
        times.append(time.perf_counter() - start)
    counted = sorted(json.loads(trials[0][1])["metric_analysis"])
    print(f"Tune's experiment state: {len(text) / 1e6:.2f} MB for {len(trials)} trials, "
          f"{len(text) / len(trials) / 1e3:.1f} KB per trial, {stats / len(text):.0%} of it statistics of "
          f"{len(counted)} numbers per trial; one write's json.dumps {statistics.median(times) * 1000:.0f} ms")
    print(f"  numbers Tune counts: {', '.join(counted)}")


def per_trial_store_cost(work: Path, repeats: int = 20) -> None:
    """The writer's per-trial MLflow work and an Optuna ask/tell: on the sweep's stores (N runs and
    N trials) against empty ones, interleaved (one trial on each in turn), medians of `repeats`."""
    import optuna

    from prunetune.tracking import Tracker, dataset_input

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    empty = Path(tempfile.mkdtemp(prefix="bench-empty-"))
    art = work / "art"
    art.mkdir(exist_ok=True)
    (art / "a.txt").write_text("a")
    (art / "b.json").write_text("{}")
    data = dataset_input("digits", [str(i) for i in range(1797)], ["train"] * 1797, '{"dataset": "digits"}', "code")
    stores = {}
    for label, folder in (("empty store", empty), ("the sweep's store", work)):
        tracker = Tracker(f"sqlite:///{folder}/mlruns/mlflow.db", str(folder / "mlruns" / "artifacts"))
        study = optuna.create_study(study_name="many" if folder == work else "bench", load_if_exists=True,
                                    storage=f"sqlite:///{folder}/mlruns/optuna.db", directions=["maximize"],
                                    sampler=optuna.samplers.RandomSampler(seed=0))
        stores[label] = (tracker, tracker.start_run("many", "bench-parent", {"prunetune.kind": "bench"}), study,
                         len(study.trials), [], [])
    for i in range(repeats):
        for tracker, parent, study, _, times, asks in stores.values():
            start = time.perf_counter()
            run = tracker.create_run("many", f"bench-{i}", {"prunetune.kind": "bench"}, parent_run_id=parent)
            tracker.log_params(run, {f"p{k}": k for k in range(40)})
            tracker.log_dataset(run, data)
            for step in range(2):
                tracker.log_metric_rows(run, [({f"m{k}": 0.5 for k in range(7)}, step)])
            tracker.log_metrics(run, {f"final{k}": 1.0 for k in range(20)}, 2)
            tracker.finish_trial_run(run, art)
            tracker.set_tags(parent, {"prunetune.best_run_id": run})
            times.append(time.perf_counter() - start)
            start = time.perf_counter()
            trial = study.ask()
            trial.suggest_categorical("schedule.method", ["oneshot", "iterative"])
            trial.suggest_float("schedule.sparsity", 0.5, 0.9)
            trial.set_user_attr("trial_id", "x")
            study.tell(trial, 0.5)
            asks.append(time.perf_counter() - start)
    for label, (_, _, _, n_trials, times, asks) in stores.items():
        print(f"  {label:17s}: MLflow per trial {statistics.median(times) * 1000:6.1f} ms (min "
              f"{min(times) * 1000:.1f}); Optuna ask+tell {statistics.median(asks) * 1000:5.1f} ms "
              f"(min {min(asks) * 1000:.1f}; study of {n_trials} trials)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--concurrent", type=int, default=2)
    ap.add_argument("--stores-of", type=Path, default=None, metavar="DIR",
                    help="only time the per-trial store work, against the stores a run left in DIR")
    args = ap.parse_args()
    if args.stores_of is not None:
        per_trial_store_cost(args.stores_of)
        return
    work = Path(tempfile.mkdtemp(prefix="bench-many-"))
    print(f"{args.trials} trials, {args.concurrent} at a time, on {os.cpu_count()} CPUs, in {work}", flush=True)
    samples = run_sweep(work, args.trials, args.concurrent)
    thirds(work, samples, args.concurrent)
    tune_state(work)
    print("per-trial work against the stores (medians of 20, interleaved):")
    per_trial_store_cost(work)


if __name__ == "__main__":
    main()
