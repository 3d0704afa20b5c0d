"""The quickstart sweep end to end (`prunetune sweep sweeps/quickstart.yaml`: Ray Tune, Optuna,
MLflow, the shared dense phase, device-resident data) against a plain sequential script that runs
the same 8 trials the way the seed projects do: a torchvision DataLoader with per-sample
transforms, `torch.nn.utils.prune` hooks, and the dense training repeated in every trial.

    python benchmarks/quickstart_vs_seed.py [--repeats 3]

Both run in subprocesses with a fresh cache and store, timed end to end (start-up included),
interleaved (sweep, script, sweep, script, ...) so a slow spell of the machine hits both. The
baseline runs exactly the configurations the sweep sampled (read back from MLflow), with the same
model, recipe and number of epochs per phase; it is what one-off scripts cost, not a strawman: no
MLflow, no checkpoints, no figures. Prints the medians, the minima and the ratio.
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
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SEED_SCRIPT = r'''
import json, sys, copy
import numpy as np, torch, torch.nn.functional as F
from torch.nn.utils import prune
from torchvision import transforms
from sklearn.datasets import load_digits
from PIL import Image
from prunetune.models import SimpleCNN

torch.set_num_threads(1)  # one core per trial, as the sweep gives each trial
trials = json.load(open(sys.argv[1]))
digits = load_digits()
images = np.round(digits.images * 255 / 16).astype(np.uint8)
labels = digits.target
rng = np.random.default_rng(0)
order = rng.permutation(len(labels))
test, val, train = order[:270], order[270:450], order[450:]
tf = transforms.Compose([transforms.Resize(16), transforms.ToTensor(), transforms.Normalize((0.5,), (0.25,))])

class Digits(torch.utils.data.Dataset):
    def __init__(self, idx): self.idx = idx
    def __len__(self): return len(self.idx)
    def __getitem__(self, i):
        j = self.idx[i]
        return tf(Image.fromarray(images[j])), int(labels[j])

loader = lambda idx, shuffle: torch.utils.data.DataLoader(Digits(idx), batch_size=64, shuffle=shuffle, num_workers=0)
train_dl, test_dl = loader(train, True), loader(test, False)

def epochs(model, n, lr):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    for _ in range(int(round(n))):
        model.train()
        for x, y in train_dl:
            opt.zero_grad(); F.cross_entropy(model(x), y).backward(); opt.step()

def accuracy(model):
    model.eval(); correct = 0
    with torch.no_grad():
        for x, y in test_dl: correct += (model(x).argmax(1) == y).sum().item()
    return correct / len(test)

def layers(model): return [(m, "weight") for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]

for t in trials:
    torch.manual_seed(0)
    model = SimpleCNN(10, 1)
    snapshots = [copy.deepcopy(model.state_dict())]
    for e in range(t["dense_epochs"]):  # dense training, repeated in every trial
        epochs(model, 1, t["lr"]); snapshots.append(copy.deepcopy(model.state_dict()))
    s, step, m = t["sparsity"], t.get("step_size") or 0.2, t["method"]
    if m == "oneshot":
        prune.global_unstructured(layers(model), prune.L1Unstructured, amount=s)
    elif m == "iterative":
        done = 0.0
        while done < s - 1e-9:
            target = min(s, done + step)
            prune.global_unstructured(layers(model), prune.L1Unstructured, amount=(target - done) / (1 - done))
            done = target; epochs(model, t["step_epochs"], t["lr"])
    elif m == "layerwise":
        for mod, name in layers(model):
            prune.l1_unstructured(mod, name, amount=s); epochs(model, t["step_epochs"], t["lr"])
    elif m == "lottery":
        done = 0.0
        while done < s - 1e-9:
            target = min(s, done + step)
            prune.global_unstructured(layers(model), prune.L1Unstructured, amount=(target - done) / (1 - done))
            done = target
            rewind = snapshots[t["rewind_epoch"]]
            with torch.no_grad():
                for name, mod in model.named_modules():
                    if hasattr(mod, "weight_orig"):
                        mod.weight_orig.copy_(rewind[name + ".weight"]); mod.bias.copy_(rewind[name + ".bias"])
            epochs(model, t["dense_epochs"] - t["rewind_epoch"], t["lr"])
    epochs(model, t["finetune_epochs"], t["lr"])
    print(m, round(s, 3), accuracy(model), flush=True)
'''


def run(cmd: list[str], cwd: Path) -> float:
    env = {**os.environ, "PRUNETUNE_CACHE": str(cwd / "cache")}
    start = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return time.perf_counter() - start


def sampled_trials(cwd: Path) -> list[dict]:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{cwd}/mlruns/mlflow.db")
    exp = c.get_experiment_by_name("quickstart")
    runs = [r for r in c.search_runs([exp.experiment_id]) if r.data.tags.get("prunetune.kind") == "trial"]
    out = []
    for r in runs:
        p = r.data.params
        out.append({"method": p["schedule.method"], "sparsity": float(p["schedule.sparsity"]),
                    "step_size": float(p["schedule.step_size"]), "step_epochs": float(p["schedule.step_epochs"]),
                    "rewind_epoch": int(float(p["schedule.rewind_epoch"])),
                    "dense_epochs": int(p["train.dense_epochs"]),
                    "finetune_epochs": float(p["train.finetune_epochs"]), "lr": float(p["train.lr"])})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    ours, seed = [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="bench-qs-") as tmp:
            tmp = Path(tmp)
            shutil.copy(REPO / "sweeps" / "quickstart.yaml", tmp / "quickstart.yaml")
            ours.append(run([sys.executable, "-m", "prunetune.cli", "sweep", "quickstart.yaml"], tmp))
            trials = sampled_trials(tmp)
            (tmp / "trials.json").write_text(json.dumps(trials))
            (tmp / "seed.py").write_text(SEED_SCRIPT)
            shutil.rmtree(tmp / "cache", ignore_errors=True)
            seed.append(run([sys.executable, "seed.py", "trials.json"], tmp))
        print(f"prunetune sweep: {ours[-1]:.1f} s; seed-style script, same {len(trials)} trials: {seed[-1]:.1f} s")
    o, s = statistics.median(ours), statistics.median(seed)
    print(f"medians over {args.repeats} run(s): prunetune {o:.1f} s, seed-style {s:.1f} s: "
          f"speedup {s / o:.2f}x (target >= 3x); minima {min(ours):.1f} s and {min(seed):.1f} s: "
          f"{min(seed) / min(ours):.2f}x; {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
