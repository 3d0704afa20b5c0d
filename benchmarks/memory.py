"""Peak memory per process of a sweep at the study's scale, against the size of the decoded data.

    python benchmarks/memory.py [--images 2500] [--size 224]

Builds a HAM10000-layout set (the metadata CSV and 600×450 JPEGs, as published) in a temp folder,
then runs two sweeps of two concurrent trials (simple_cnn, a few optimiser steps: memory, not
accuracy, is measured) while sampling every 0.2 s the resident memory of the driver and of each
Ray trial worker (/proc: VmRSS; RssAnon, the process's own memory; RssShmem, shared memory such as
Ray's object store):
  digits    the same sweep on the bundled digits upsampled to `--size` px: the framework's own
            memory (torch, Ray, the model's activations at that size), less its 0.09 GB of data
  ham       the HAM10000 set at `--size` px
and, for scale, the floor under any trial of this model: a bare process (no Ray, no data, no
prunetune) that imports torch and takes three training steps of the same model on one random
batch of 32 at `--size` px (torch itself, and the activations that training at that size keeps).
The goal: a trial's peak ≤ 1.5 × the decoded arrays + 1.2 GB of framework, the trials of a node
sharing one copy of the decoded arrays, and a driver that does not keep the whole dataset.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SPEC = """
name: memory
seed: 0
model: {{arch: simple_cnn}}
data: {data}
train: {{batch_size: 32, lr: 0.01, dense_epochs: 0, finetune_epochs: {epochs}}}
schedule: {{method: oneshot, sparsity: {{choice: [0.5, 0.8]}}}}
search: {{sampler: grid, num_trials: 2}}
resources: {{cpus_per_trial: 1, max_concurrent: 2}}
"""


def write_ham(root: Path, n: int) -> None:
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import write_ham10000

    per_class = [max(1, round(n / 2 * f)) for f in (0.033, 0.051, 0.11, 0.011, 0.111, 0.67, 0.014)]
    write_ham10000(root, lesions_per_class=per_class, size=(450, 600))


def status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (its peak), RssAnon, RssShmem of a process, in bytes."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        pid = _parent(pid)
        if pid == ancestor:
            return True
    return False


def kind(pid: int, driver: int) -> str | None:
    """The driver, or one of its sweep's trial workers (Ray's processes descend from the driver
    that started them; other sweeps on the machine are not counted)."""
    if pid == driver:
        return "driver"
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    if cmdline.startswith(b"ray::ImplicitFunc") and _descends_from(pid, driver):
        return f"trial worker {pid}"
    return None


FLOOR = """
import os, sys
import torch
from benchmarks.memory import status
from prunetune.models import SimpleCNN
torch.set_num_threads(1)
size = int(sys.argv[1])
model = SimpleCNN(7, 3)
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
x, y = torch.randn(32, 3, size, size), torch.randint(0, 7, (32,))
for _ in range(3):
    loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
now = status(os.getpid())
print(now["VmHWM"], now["VmRSS"])
"""


def floor_peak(size: int) -> tuple[int, int]:
    """A bare torch process training the model at `size` px: its peak and its final VmRSS (bytes)."""
    out = subprocess.run([sys.executable, "-c", FLOOR, str(size)], capture_output=True, text=True, check=True,
                         cwd=REPO).stdout.split()
    return int(out[0]), int(out[1])


def sweep_peaks(spec: Path, cwd: Path) -> dict[str, dict[str, int]]:
    env = {**os.environ, "PRUNETUNE_CACHE": str(cwd / "cache")}
    proc = subprocess.Popen([sys.executable, "-m", "prunetune.cli", "sweep", str(spec)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks: dict[str, dict[str, int]] = {}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for entry in Path("/proc").glob("[0-9]*"):
                name = kind(int(entry.name), proc.pid)
                if name is None:
                    continue
                now = status(int(entry.name))
                peak = peaks.setdefault(name, {})
                for key, value in now.items():
                    peak[key] = max(peak.get(key, 0), value)
            time.sleep(0.2)

    thread = threading.Thread(target=sample)
    thread.start()
    out, err = proc.communicate()
    done.set()
    thread.join()
    if proc.returncode != 0:
        sys.exit(f"sweep failed:\n{err[-3000:]}")
    return peaks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2500)
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-mem-"))
    write_ham(work / "HAM10000", args.images)
    n_images = len((work / "HAM10000" / "HAM10000_metadata.csv").read_text().splitlines()) - 1
    decoded = n_images * 3 * args.size * args.size
    # the framework reference: the same model trained at the same image size on digits (1,797
    # one-channel images: 0.09 GB at 224 px), so model activations count as framework, not data
    runs = {"digits": f"{{dataset: digits, image_size: {args.size}}}",
            "ham": f"{{dataset: ham10000, root: {work / 'HAM10000'}, image_size: {args.size}}}"}
    results = {}
    for name, data in runs.items():
        folder = work / name
        folder.mkdir()
        spec = folder / "spec.yaml"
        spec.write_text(textwrap.dedent(SPEC.format(data=data, epochs=0.02 if name == "ham" else 0.2)))
        results[name] = sweep_peaks(spec, folder)
    gb = 1024 ** 3
    print(f"HAM10000 layout: {n_images} JPEGs (600×450) at {args.size} px: {decoded / gb:.2f} GB decoded (uint8)")
    digits = 1797 * args.size * args.size  # the reference's own decoded data (one channel)
    framework = max((v.get("VmRSS", 0) for k, v in results["digits"].items() if k.startswith("trial")), default=0)
    framework -= digits
    floor, after = floor_peak(args.size)
    print(f"floor (a bare torch process training the model at {args.size} px, batch 32): peak VmRSS "
          f"{floor / gb:.2f} GB, of which the activations training keeps {(floor - after) / gb:.2f} GB "
          f"(its VmRSS after the steps: {after / gb:.2f} GB)")
    print(f"framework (a digits trial worker's peak VmRSS at {args.size} px, less its 0.09 GB of data: torch, Ray, "
          f"the model's activations at batch 32): {framework / gb:.2f} GB")
    for name in runs:
        print(f"{name}:")
        for proc, peak in sorted(results[name].items()):
            print(f"  {proc:22s} peak VmRSS {peak.get('VmRSS', 0) / gb:5.2f} GB  "
                  f"RssAnon {peak.get('RssAnon', 0) / gb:5.2f} GB  RssShmem {peak.get('RssShmem', 0) / gb:5.2f} GB")
    for proc, peak in sorted(results["ham"].items()):
        if proc.startswith("trial"):
            extra = peak.get("VmRSS", 0) - framework
            goal = 1.5 * decoded + 1.2 * gb
            print(f"{proc}: peak VmRSS beyond the framework = {extra / decoded:.2f}× the decoded data "
                  f"(target ≤ 1.5×); of it shared with the other trials (RssShmem) "
                  f"{peak.get('RssShmem', 0) / decoded:.2f}×; peak {peak.get('VmRSS', 0) / gb:.2f} GB against "
                  f"the goal 1.5 × data + 1.2 GB = {goal / gb:.2f} GB")
    driver = results["ham"].get("driver", {})
    print(f"driver: peak VmRSS {driver.get('VmRSS', 0) / gb:.2f} GB = {driver.get('VmRSS', 0) / decoded:.2f}× the data")


if __name__ == "__main__":
    main()
