"""What moving the mask costs: RigL and SET against static sparse training, seconds per epoch.

    python benchmarks/dst_overhead.py [--arch simple_cnn] [--size 16] [--epochs 6]
                                      [--update-every 10] [--sparsity 0.9] [--repeats 3]

Each arm is a real trial (prunetune's Trial, no Ray or MLflow) on scikit-learn's digits, sparse
from the first step (a random ERK mask), trained `--epochs` epochs in the same process, arms
interleaved `--repeats` times. It prints the median `epoch_seconds` of each arm (every epoch but
the first, which warms up) and the ratio to static. RigL's update reads the gradient the step
already computed (PyTorch computes a dense weight's whole gradient; the masks zero it after), so
what it adds is the drop and grow themselves, every `--update-every` steps. The script also times
each update itself and prints their total per epoch: on a busy machine the epochs' medians move by
more than that.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from prunetune.pruning import dynamic
from prunetune.spec import validate
from prunetune.trial import Trial

UPDATE_SECONDS: list[float] = []  # each mask update's own time, as a check on the epochs' difference
_update = dynamic.Regrowth.update


def _timed_update(self, step, optimizer):
    start = time.perf_counter()
    try:
        return _update(self, step, optimizer)
    finally:
        UPDATE_SECONDS.append(time.perf_counter() - start)


dynamic.Regrowth.update = _timed_update


def epoch_seconds(method: str, args) -> list[float]:
    raw = {"name": "dst-overhead", "model": {"arch": args.arch},
           "data": {"dataset": "digits", "image_size": args.size},
           "train": {"batch_size": 64, "lr": 0.05, "finetune_epochs": args.epochs, "device": "cpu"},
           "schedule": {"method": method, "sparsity": args.sparsity, "update_every": args.update_every}}
    seconds: list[float] = []
    trial = Trial(validate(raw), lambda metrics, epoch: seconds.append(metrics["epoch_seconds"]))
    with tempfile.TemporaryDirectory() as out:
        trial.run(out)
    return seconds[1:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="simple_cnn")
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--update-every", type=int, default=10)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    arms = ("static", "set", "rigl")
    times: dict[str, list[float]] = {arm: [] for arm in arms}
    updates: dict[str, list[float]] = {arm: [] for arm in arms}
    for _ in range(args.repeats):
        for arm in arms:
            UPDATE_SECONDS.clear()
            epochs = epoch_seconds(arm, args)
            times[arm] += epochs
            updates[arm].append(sum(UPDATE_SECONDS) / (len(epochs) + 1))
    base = statistics.median(times["static"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {args.arch} on digits at "
          f"{args.size} px, {args.sparsity:.0%} sparse, update every {args.update_every} steps, "
          f"{args.repeats} × {args.epochs - 1} epochs an arm")
    print("| method | median s/epoch | vs static | mask updates' own s/epoch |")
    print("|---|---|---|---|")
    for arm in arms:
        median = statistics.median(times[arm])
        print(f"| {arm} | {median:.3f} | {median / base:.3f}× | {statistics.median(updates[arm]):.4f} |")


if __name__ == "__main__":
    main()
