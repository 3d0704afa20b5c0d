"""GPU acceptance: every GPU path of the core runs, and how fast (issue 24).

    python benchmarks/gpu_check.py [--quick] [--device auto|cpu|cuda]

Drives the core directly (`Trial`, the pruning criteria, the `Trainer`, `cka_matrix`) on
scikit-learn's bundled digits: no download, no Ray, no MLflow. It runs from a checkout on a
machine that has torch, torchvision, numpy, scikit-learn, PyYAML and matplotlib, plus pydantic
(pydantic-core, annotated-types, typing-inspection) and torch-pruning.

Each check prints one line on stdout: `ok <check>: <figures>`, `FAIL <check>: <why>` or
`skipped (no CUDA): <check>`; the exit code is 1 when any check FAILs (tracebacks and the total
time go to stderr). Without CUDA, the checks that need no GPU run on the CPU at a small size (no
AMP) and the others print their skipped line.

- trial <method>: a trial of each method family (on CUDA with bf16 AMP): its sparsity against the
  target to one weight (as `Masks.sparsity` counts, over the selected layers), every pruned weight
  exactly zero in `checkpoint/model.pt`, every metric finite, and the checkpoint loaded on the CPU
  (`weights_only=True`) into a CPU model.
- replay: a fractional rewind's replay (`Trial.replay_dense`) against the weights the dense phase
  had at that step (taken by a forward pre-hook as it trained), max |Δ| within `REPLAY_TOLERANCE`.
- cka: `cka_matrix` on the device in float32 against a CPU float64 computation.
- throughput <arch>@<px>: the Trainer's training epoch (data on the device, `DeviceData`) against a
  bare loop written as airbench writes one, and the Trainer with `train.channels_last` and
  `train.compile` against the plain Trainer.
- packing: two processes training a small model on one GPU against one alone.
- imports: neither ray nor mlflow was imported, and prunetune imported nothing beyond the list.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # a bare GPU machine runs it from a checkout, prunetune not installed
    sys.path.insert(0, str(REPO))

import numpy as np
import torch
import torch.nn.functional as F

from prunetune import spec as spec_mod
from prunetune.analysis.cka import cka_matrix
from prunetune.cache import DenseCache
from prunetune.data import Dataset, load_dataset
from prunetune.data.device import DeviceData
from prunetune.models import build_model, prunable_layers
from prunetune.pruning.criteria.nm import nm_valid, pattern
from prunetune.pruning.masks import Masks
from prunetune.train import Trainer, make_optimizer
from prunetune.trial import Trial

# Max |Δ| allowed on CUDA between a fractional rewind's replay and the weights the dense phase had
# at that step (on a CPU the replay must be exact: 0, whatever this says). CUDA's default kernels
# are not deterministic, so a replay there is close, not bit-exact: the tolerance the README states
# for it ("schedule.rewind_epoch may be fractional") is a max |Δ| of 1e-3 over the weights. Points
# the dense phase saved as it passed them (`step_<k>.pt`) must match exactly on any device.
REPLAY_TOLERANCE = 1e-3
CKA_TOLERANCE = 1e-5  # max |Δ| of CUDA float32 CKA against CPU float64
MIN_THROUGHPUT_RATIO = 0.9  # the Trainer's epoch against the bare loop's
PAYS_OFF = 1.05  # an option pays off when it trains at least this much faster (beyond timing noise)
FORBIDDEN = ("ray", "mlflow")
# What a bare GPU machine has: import names of torch, torchvision, numpy, scikit-learn, PyYAML,
# matplotlib (and pillow, which torchvision and matplotlib require), pydantic and its three
# companions, and torch-pruning.
ALLOWED = {"torch", "torchvision", "numpy", "sklearn", "yaml", "matplotlib", "PIL", "pydantic", "pydantic_core",
           "annotated_types", "typing_inspection", "torch_pruning"}
# Beyond that list but in the device machines' image: named on the imports line, not a failure.
IN_DEVICE_IMAGE = {"pyarrow"}
THROUGHPUT_MODELS = (("vgg11", 32, 256), ("resnet18", 32, 256), ("densenet121", 224, 64))  # arch, px, batch
PACKING_MODEL = ("simple_cnn", 32, 128)
THROUGHPUT_LR = 1e-3  # the learning rate does not change the speed; a small one keeps vgg11 (no BN) finite

# The trial checks: spec overrides per method family (simple_cnn on digits; `base_raw` fills in
# the rest). The distillation teacher is the oneshot check's trial directory.
TRIALS = {
    "oneshot": {"schedule": {"method": "oneshot", "sparsity": 0.8}},
    # ... also drawing its batches with the class-balanced sampler (a CPU generator's draw)
    "iterative": {"schedule": {"method": "iterative", "sparsity": 0.8, "step_size": 0.4, "step_epochs": 0.5},
                  "train": {"class_balance": "balanced_sampler"}},
    "lottery": {"schedule": {"method": "lottery", "sparsity": 0.8, "step_size": 0.4, "rewind_epoch": 0.5}},
    "gradual": {"schedule": {"method": "gradual", "sparsity": 0.8, "start_epoch": 0.0, "end_epoch": 1.0,
                             "step_epochs": 0.5}},
    "dsd": {"schedule": {"method": "dsd", "sparsity": 0.5, "step_epochs": 1.0}},
    "structured": {"schedule": {"method": "oneshot", "criterion": "l1_filter", "sparsity": 0.5, "remove": True}},
    "l1_nm": {"schedule": {"method": "oneshot", "criterion": "l1_nm", "sparsity": 0.5, "remove": True}},
    "distillation": {"schedule": {"method": "oneshot", "sparsity": 0.8}, "distill": {"alpha": 0.5}},
    "snip": {"schedule": {"method": "oneshot", "criterion": "snip", "sparsity": 0.9}, "train": {"dense_epochs": 0}},
    "synflow": {"schedule": {"method": "oneshot", "criterion": "synflow", "sparsity": 0.9},
                "train": {"dense_epochs": 0}},
    # the Trainer's CUDA options (ignored on a CPU): masks still hold, state_dict keys unchanged
    "channels_last+compile": {"schedule": {"method": "oneshot", "sparsity": 0.8},
                              "train": {"channels_last": True, "compile": True}},
}


class CheckFailed(Exception):
    """A check's finding (its message is the FAIL line's reason)."""


@dataclass(frozen=True)
class Sizes:
    image_size: int  # digits, for the trials, the replay and CKA
    dense_epochs: int
    finetune_epochs: float
    cka_samples: int
    steps_32: int  # throughput: optimiser steps per timed epoch at 32 px
    steps_224: int  # ... at 224 px
    repeats: int  # timed epochs per variant (after one warm-up epoch), interleaved
    compile_224: bool  # also time train.compile at 224 px (its compilation alone takes minutes)
    packing_steps: int


def sizes_for(cuda: bool, quick: bool) -> Sizes:
    if not cuda:  # the CPU checks, small (the throughput and packing figures only in the tests)
        return Sizes(image_size=8, dense_epochs=2, finetune_epochs=1.0, cka_samples=256, steps_32=4, steps_224=2,
                     repeats=1, compile_224=False, packing_steps=4)
    if quick:  # within 6 minutes on one H100 (benchmarks/README.md: how it was sized)
        return Sizes(image_size=16, dense_epochs=3, finetune_epochs=2.0, cka_samples=512, steps_32=40, steps_224=12,
                     repeats=2, compile_224=False, packing_steps=200)
    return Sizes(image_size=32, dense_epochs=6, finetune_epochs=4.0, cka_samples=1024, steps_32=150, steps_224=40,
                 repeats=3, compile_224=True, packing_steps=1000)


@dataclass
class Context:
    device: torch.device
    sizes: Sizes
    work: Path
    trial_dirs: dict[str, Path] = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


# -- reporting ---------------------------------------------------------------------------------

def one_line(text: str, limit: int = 700) -> str:
    text = " / ".join(part.strip() for part in str(text).splitlines() if part.strip())
    return text if len(text) <= limit else text[:limit - 1] + "…"


class Report:
    """One line per check on stdout; counts the FAILs."""

    def __init__(self, out=None):
        self.out = out or sys.stdout
        self.counts = {"ok": 0, "FAIL": 0, "skipped": 0}

    def _line(self, kind: str, text: str) -> None:
        self.counts[kind] += 1
        print(text, file=self.out, flush=True)

    def ok(self, check: str, figures: str) -> None:
        self._line("ok", f"ok {check}: {one_line(figures)}")

    def fail(self, check: str, why: str) -> None:
        self._line("FAIL", f"FAIL {check}: {one_line(why)}")

    def skip(self, check: str) -> None:
        self._line("skipped", f"skipped (no CUDA): {check}")

    def run(self, check: str, fn: Callable[[], str]) -> None:
        """Run one check: its figures on an ok line, or its finding or error on a FAIL line."""
        start = time.perf_counter()
        try:
            figures = fn()
        except CheckFailed as exc:
            self.fail(check, str(exc))
        except Exception as exc:  # noqa: BLE001 - any error is the check's failure, reported as one line
            traceback.print_exc(file=sys.stderr)
            self.fail(check, f"{type(exc).__name__}: {exc}")
        else:
            self.ok(check, f"{figures}; {time.perf_counter() - start:.1f} s")

    @property
    def exit_code(self) -> int:
        return 1 if self.counts["FAIL"] else 0


# -- trials ------------------------------------------------------------------------------------

def base_raw(ctx: Context, name: str) -> dict:
    s = ctx.sizes
    return {"name": f"gpu-check-{name}", "seed": 0, "model": {"arch": "simple_cnn"},
            "data": {"dataset": "digits", "image_size": s.image_size},
            "train": {"device": ctx.device.type, "amp": ctx.cuda, "batch_size": 64, "lr": 0.05,
                      "dense_epochs": s.dense_epochs, "finetune_epochs": s.finetune_epochs}}


def trial_spec(ctx: Context, name: str):
    raw = spec_mod.deep_merge(base_raw(ctx, name.replace("+", "-")), TRIALS[name])
    if "distill" in raw:
        teacher = ctx.trial_dirs.get("oneshot")
        if teacher is None:
            raise CheckFailed("no teacher: the oneshot check wrote no trial directory")
        raw["distill"]["teacher"] = str(teacher)
    return spec_mod.load(None, raw=raw).trial_spec()


def check_trial(ctx: Context, name: str) -> str:
    trial = Trial(trial_spec(ctx, name))
    out = ctx.work / "trials" / name
    result = trial.run(out, DenseCache(ctx.work / "dense"))
    ctx.trial_dirs[name] = out
    state = torch.load(out / "checkpoint" / "model.pt", weights_only=True, map_location="cpu")
    parts = [precision(trial), sparsity_figures(trial, state, result), masks_figures(trial, state),
             finite_figures(result), cpu_load_figures(trial, out, state),
             method_figures(ctx, trial, out, result.metrics)]
    return ", ".join(p for p in parts if p)


def precision(trial: Trial) -> str:
    dtype = getattr(trial.trainer.autocast(), "fast_dtype", None)  # None: no autocast
    return f"{trial.device.type} " + (f"{str(dtype).removeprefix('torch.')} AMP" if dtype else "float32")


def _within_one(what: str, count: int, target: float, total: int) -> str:
    expected = round(target * total)
    if abs(count - expected) > 1:
        raise CheckFailed(f"sparsity {count / total:.6f}: {count} of {total} {what} pruned; target {target:g} "
                          f"is {expected}")
    return f"sparsity {count / total:.4f} = target {target:g} ({count - expected:+d} of {total} {what})"


def sparsity_figures(trial: Trial, state: dict, result) -> str:
    """Against the target, to one weight (one channel for a structured criterion)."""
    target, masks = trial.spec.schedule.sparsity, trial.masks
    if masks.groups:  # structured: the target is the fraction of channels
        total = sum(g.channels for g in masks.groups)
        return _within_one("channels", round(masks.channel_sparsity() * total), target, total)
    total = sum(masks.weights[n].numel() for n in trial.selected)
    if trial.spec.schedule.method in ("dsd", "ist"):  # ends dense: the sparse phase's reported sparsity
        zeros = max(round(row["sparsity"] * total) for row in result.history)
        return _within_one("weights, sparse phase", zeros, target, total)
    zeros = sum(int((state[f"{n}.weight"] == 0).sum()) for n in trial.selected)
    if abs(result.metrics["sparsity"] - zeros / total) > 1e-12:
        raise CheckFailed(f"reported sparsity {result.metrics['sparsity']:.6f} but checkpoint/model.pt has "
                          f"{zeros / total:.6f}")
    return _within_one("weights", zeros, target, total)


def masks_figures(trial: Trial, state: dict) -> str:
    """Every pruned weight (and pruned bias or batch-norm entry) exactly zero in the checkpoint."""
    if trial.spec.schedule.method in ("dsd", "ist"):
        return "masks released (ends dense)"
    masks = {**{f"{n}.weight": m for n, m in trial.masks.masks.items()}, **trial.masks.extra_masks}
    pruned = sum(int((~m).sum()) for m in masks.values())
    nonzero = sum(int((state[k][~m.cpu()] != 0).sum()) for k, m in masks.items())
    if nonzero:
        raise CheckFailed(f"{nonzero} of {pruned} pruned weights are not zero in checkpoint/model.pt")
    return f"all {pruned} pruned weights exactly 0"


def finite_figures(result) -> str:
    values = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    values.update({f"epoch {row['epoch']} {k}": v for row in result.history for k, v in row.items()
                   if isinstance(v, (int, float))})
    bad = [k for k, v in values.items() if not math.isfinite(v)]
    if bad:
        raise CheckFailed(f"non-finite metrics: {', '.join(bad[:6])}")
    return f"{len(values)} metrics finite, test_acc {result.metrics['test_acc']:.3f}"


def cpu_test_split(trial: Trial) -> tuple[torch.Tensor, torch.Tensor]:
    """The test split, normalised as the trial normalises it, on the CPU."""
    data = trial.data
    x = (data.images_of("test", slice(None)).float() - data.mean) / data.std
    return x.cpu(), data.y["test"].cpu()


def cpu_load_figures(trial: Trial, out: Path, state: dict) -> str:
    """checkpoint/model.pt (loaded with weights_only) into a CPU model: every key fits."""
    model = build_model(trial.spec.model, trial.num_classes, trial.dataset.in_channels, trial.spec.data.image_size)
    model.load_state_dict(state)  # strict: a key with `_orig_mod.` or a missing one raises
    x, y = cpu_test_split(trial)
    with torch.no_grad():
        acc = float((model.eval()(x).argmax(1) == y).float().mean())
    return f"model.pt loads on the CPU (test_acc there {acc:.3f})"


def method_figures(ctx: Context, trial: Trial, out: Path, metrics: dict) -> str:
    if trial.spec.distill is not None:
        return f"teacher_test_acc {metrics['teacher_test_acc']:.3f}"
    if trial.spec.schedule.criterion == "l1_nm":
        return nm_figures(ctx, trial, metrics)
    if trial.masks.groups and trial.spec.schedule.remove:
        return compact_figures(trial, out, metrics)
    if trial.spec.schedule.method == "lottery":
        return f"rewound to step {round(trial.spec.schedule.rewind_epoch * trial.trainer.steps_per_epoch)}"
    return ""


def nm_figures(ctx: Context, trial: Trial, metrics: dict) -> str:
    n, m = pattern(trial.spec.schedule)
    if metrics.get("nm_valid") != 1.0 or not all(nm_valid(trial.masks.weights[x], n, m) for x in trial.selected):
        raise CheckFailed(f"a group breaks the {n}:{m} pattern (nm_valid {metrics.get('nm_valid')})")
    if "measured_speedup" in metrics:
        return (f"{n}:{m} export measured_speedup {metrics['measured_speedup']:.2f}x "
                f"({metrics['latency_ms_dense']:.3f} ms dense, {metrics['latency_ms_compact']:.3f} ms sparse)")
    if not ctx.cuda:
        return f"{n}:{m} valid; the semi-structured export needs CUDA (not measured)"
    capability = torch.cuda.get_device_capability(ctx.device)
    if capability >= (8, 0):
        raise CheckFailed(f"remove: true on a GPU of compute capability {capability} gave no measured_speedup "
                          "(why, if the export raised: prunetune.pruning.semistructured's warning on stderr)")
    return f"{n}:{m} valid; no sparse tensor cores on compute capability {capability}"


def compact_figures(trial: Trial, out: Path, metrics: dict) -> str:
    """The removed model (`compact.pt2`) loads on the CPU and predicts as the masked one."""
    program = torch.export.load(out / "checkpoint" / "compact.pt2").module()
    masked = build_model(trial.spec.model, trial.num_classes, trial.dataset.in_channels, trial.spec.data.image_size)
    masked.load_state_dict(torch.load(out / "checkpoint" / "model.pt", weights_only=True, map_location="cpu"))
    x, _ = cpu_test_split(trial)
    with torch.no_grad():
        reference = masked.eval()(x)
        delta = float((program(x) - reference).abs().max())
    if delta > 1e-4 * max(1.0, float(reference.abs().max())):
        raise CheckFailed(f"compact.pt2 computes other outputs than the masked model: max |Δ| {delta:.2e}")
    return (f"compact.pt2 loads on the CPU ({metrics['compact_params']} params, max |Δ| {delta:.1e} against "
            f"the masked model; CPU speedup {metrics['measured_speedup']:.2f}x)")


# -- replay ------------------------------------------------------------------------------------

def state_at_step(model: torch.nn.Module, step: int) -> tuple[dict, torch.utils.hooks.RemovableHandle]:
    """A box that receives the model's state before its (step + 1)-th training forward, i.e.
    after `step` optimiser steps (evaluation forwards, in eval mode, are not counted)."""
    box = {"forwards": 0}

    def hook(module, args):
        if module.training and "state" not in box:
            if box["forwards"] == step:
                box["state"] = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
            box["forwards"] += 1

    return box, model.register_forward_pre_hook(hook)


def max_abs_diff(a: dict, b: dict) -> float:
    if a.keys() != b.keys():
        raise CheckFailed(f"the states hold different tensors: {sorted(set(a) ^ set(b))[:4]}")
    return max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a)


def check_replay(ctx: Context) -> str:
    raw = spec_mod.deep_merge(base_raw(ctx, "replay"), TRIALS["lottery"])
    trial = Trial(spec_mod.load(None, raw=raw).trial_spec())
    spe = trial.trainer.steps_per_epoch
    step = round(trial.spec.schedule.rewind_epoch * spe)
    box, handle = state_at_step(trial.model, step)
    try:
        entry = trial.dense_phase(DenseCache(ctx.work / "replay-cache"))
    finally:
        handle.remove()
    if "state" not in box:
        raise CheckFailed(f"the dense phase ran {box['forwards']} training steps, never step {step}")
    delta = max_abs_diff(box["state"], trial.replay_dense(entry, step))
    tolerance = REPLAY_TOLERANCE if ctx.cuda else 0.0
    figures = (f"replay_dense to step {step} (rewind_epoch {trial.spec.schedule.rewind_epoch:g}, {spe} steps/epoch) "
               f"against the state the dense phase had there: max |Δ| {delta:.3g} over {len(box['state'])} tensors "
               f"(tolerance {tolerance:g}, {ctx.device.type}{', bf16 AMP' if ctx.cuda else ''})")
    saved = entry / f"step_{step}.pt"  # the dense phase saves the rewind points it knows of as it passes them
    if saved.is_file():
        kept = max_abs_diff(box["state"], torch.load(saved, weights_only=True, map_location="cpu"))
        figures += f"; the dense phase's own {saved.name}: max |Δ| {kept:.3g}"
        if kept:
            raise CheckFailed(figures)
    if delta > tolerance:
        raise CheckFailed(figures)
    return figures


# -- CKA ---------------------------------------------------------------------------------------

def layer_features(ctx: Context) -> list[torch.Tensor]:
    """Each prunable layer's output for `cka_samples` digits, from a seeded simple_cnn, on the CPU."""
    spec = spec_mod.validate(base_raw(ctx, "cka"))
    dataset = load_dataset(spec.data)
    torch.manual_seed(0)
    model = build_model(spec.model, len(dataset.classes), dataset.in_channels, spec.data.image_size).eval()
    modules = dict(model.named_modules())
    feats: list[torch.Tensor] = []
    hooks = [modules[n].register_forward_hook(lambda m, i, o: feats.append(o.detach().flatten(1)))
             for n in prunable_layers(model, dataset.in_channels, spec.data.image_size)]
    x = torch.from_numpy(dataset.images[:ctx.sizes.cka_samples]).float() / 255.0
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return feats


def check_cka(ctx: Context) -> str:
    feats = layer_features(ctx)
    on_device = [f.to(ctx.device) for f in feats]
    as64 = [f.double() for f in feats]
    batch = ctx.sizes.cka_samples // 4
    deltas = {}
    for label, size in (("biased, all samples", None), (f"minibatch {batch}", batch)):
        reference = cka_matrix(as64, batch_size=size, dtype=torch.float64)
        deltas[label] = float((cka_matrix(on_device, batch_size=size).cpu() - reference).abs().max())
    figures = (f"{ctx.device.type} float32 against CPU float64, {len(feats)}x{len(feats)} layers, "
               f"{len(feats[0])} samples: max |Δ| " + ", ".join(f"{d:.1e} ({k})" for k, d in deltas.items())
               + f"; tolerance {CKA_TOLERANCE:g}")
    if max(deltas.values()) > CKA_TOLERANCE:
        raise CheckFailed(figures)
    return figures


# -- throughput --------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], None], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def digits_rgb(size: int, n: int, device: torch.device) -> DeviceData:
    """`n` digits (repeated as needed) at `size` px as three channels, all of them the training
    split, on `device`: one epoch of batch b is n // b steps."""
    source = load_dataset(spec_mod.DataSpec(dataset="digits", image_size=size))
    idx = np.arange(n) % len(source.labels)
    dataset = Dataset(images=np.repeat(source.images[idx], 3, axis=1), labels=source.labels[idx],
                      ids=[str(i) for i in range(n)], classes=source.classes, split=np.full(n, "train"))
    return DeviceData(dataset, device)


def train_spec(device: torch.device, batch: int, **options) -> spec_mod.TrainSpec:
    return spec_mod.TrainSpec(device=device.type, batch_size=batch, lr=THROUGHPUT_LR, amp=device.type == "cuda",
                              **options)


def seeded_model(arch: str, size: int, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(spec_mod.ModelSpec(arch=arch), 10, 3, size).to(device)


def make_trainer(arch: str, size: int, data: DeviceData, spec: spec_mod.TrainSpec) -> Trainer:
    """A trial's Trainer (dense masks kept applied, as in a dense phase) of a fresh model."""
    model = seeded_model(arch, size, data.device)
    masks = Masks(model, prunable_layers(model, 3, size))
    return Trainer(model, data, spec, masks, lambda metrics, epoch: None, seed=0)


class BareLoop:
    """A training loop as airbench writes one: the normalised data already on the GPU as one
    tensor, a random permutation per epoch, batches by indexing; the same model, batch, AMP and
    optimiser as the Trainer, and nothing else (no masks, no per-step seeds, no metrics)."""

    def __init__(self, arch: str, size: int, data: DeviceData, spec: spec_mod.TrainSpec):
        self.model = seeded_model(arch, size, data.device)
        self.optimizer = make_optimizer(self.model.parameters(), spec)
        self.x = (data.images_of("train", slice(None)).float() - data.mean) / data.std
        self.y = data.y["train"]
        self.batch, self.amp = spec.batch_size, spec.amp

    def epoch(self) -> None:
        self.model.train()
        perm = torch.randperm(len(self.y), device=self.y.device)
        for i in range(len(self.y) // self.batch):
            idx = perm[i * self.batch:(i + 1) * self.batch]
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
                loss = F.cross_entropy(self.model(self.x[idx]), self.y[idx])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()


def trainer_epoch(trainer: Trainer) -> Callable[[], None]:
    return lambda: trainer.run(1.0, lambda t: THROUGHPUT_LR)


def time_variants(variants: dict[str, Callable[[], None]], repeats: int, device) -> tuple[dict, dict, dict]:
    """Seconds per epoch of each variant (median of `repeats`, interleaved), after one warm-up
    epoch each (returned too: compilation happens there). A variant whose warm-up raises is left
    out, and its error returned."""
    first, errors = {}, {}
    for name, epoch in variants.items():
        try:
            first[name] = timed(epoch, device)
        except Exception as exc:  # noqa: BLE001 - reported on the check's line; the other variants are timed
            traceback.print_exc(file=sys.stderr)
            errors[name] = f"{type(exc).__name__}: {exc}"
    times: dict[str, list[float]] = {name: [] for name in first}
    for _ in range(repeats):
        for name in first:
            times[name].append(timed(variants[name], device))
    return {name: statistics.median(t) for name, t in times.items()}, first, errors


def throughput_variants(ctx: Context, arch: str, size: int, batch: int, data: DeviceData) -> dict:
    def trainer(**options) -> Callable[[], None]:
        return trainer_epoch(make_trainer(arch, size, data, train_spec(ctx.device, batch, **options)))

    variants = {"bare": BareLoop(arch, size, data, train_spec(ctx.device, batch)).epoch, "trainer": trainer(),
                "channels_last": trainer(channels_last=True)}
    if size <= 64 or ctx.sizes.compile_224:
        variants["compile"] = trainer(compile=True)
    return variants


def describe_throughput(rate: dict, first: dict, errors: dict, cuda: bool) -> str:
    ratio = rate["trainer"] / rate["bare"]
    gains = {name: rate[name] / rate["trainer"] for name in ("channels_last", "compile") if name in rate}
    paying = [name for name, gain in gains.items() if gain >= PAYS_OFF]
    options = [f"{name} {gain:.2f}x" for name, gain in gains.items()]
    options += [f"{name} failed ({error})" for name, error in errors.items()]
    note = (" (both ignored on a CPU)" if not cuda
            else f" (compile's first epoch {first['compile']:.0f} s)" if "compile" in first
            else "" if "compile" in errors else " (compile not timed at this size with --quick)")
    return (f"trainer {rate['trainer']:,.0f} img/s = {ratio:.2f}x the bare loop's {rate['bare']:,.0f}; "
            f"against the plain trainer {', '.join(options)}{note}: {' and '.join(paying) or 'neither'} pays off")


def throughput_figures(ctx: Context, arch: str, size: int, batch: int) -> str:
    steps = ctx.sizes.steps_224 if size > 64 else ctx.sizes.steps_32
    data = digits_rgb(size, batch * steps, ctx.device)
    variants = throughput_variants(ctx, arch, size, batch, data)
    seconds, first, errors = time_variants(variants, ctx.sizes.repeats, ctx.device)
    if "bare" in errors or "trainer" in errors:
        raise CheckFailed("; ".join(f"{name}: {error}" for name, error in errors.items()))
    rate = {name: batch * steps / s for name, s in seconds.items()}
    figures = (describe_throughput(rate, first, errors, ctx.cuda) + f"; batch {batch}, "
               + f"{'bf16 AMP' if ctx.cuda else 'float32'}, {ctx.sizes.repeats} x {steps} steps")
    ratio = rate["trainer"] / rate["bare"]
    if ratio < MIN_THROUGHPUT_RATIO:
        raise CheckFailed(f"the trainer runs at {ratio:.2f}x the bare loop (< {MIN_THROUGHPUT_RATIO}): {figures}")
    if errors:
        raise CheckFailed(figures)
    return figures


# -- packing -----------------------------------------------------------------------------------

def packing_worker(device: str, steps: int) -> int:
    """One process of the packing check: a warm-up epoch, then on "go" (stdin) one timed epoch;
    prints `ready`, then a JSON line with its images, seconds and peak memory."""
    dev = torch.device(device)
    if dev.type == "cpu":
        torch.set_num_threads(1)  # two workers share the cores
    arch, size, batch = PACKING_MODEL
    trainer = make_trainer(arch, size, digits_rgb(size, batch * steps, dev), train_spec(dev, batch))
    epoch = trainer_epoch(trainer)
    timed(epoch, dev)
    print("ready", flush=True)
    sys.stdin.readline()
    seconds = timed(epoch, dev)
    cuda = dev.type == "cuda"
    print(json.dumps({"images": batch * steps, "seconds": seconds,
                      "allocated": torch.cuda.max_memory_allocated(dev) if cuda else None,
                      "reserved": torch.cuda.max_memory_reserved(dev) if cuda else None}), flush=True)
    return 0


WORKER_WAIT_S = 300  # for a packing worker's next line (start-up, or its timed steps)


def _read(proc: subprocess.Popen) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], WORKER_WAIT_S)
    if not ready:
        proc.kill()
        raise CheckFailed(f"a packing worker wrote nothing for {WORKER_WAIT_S} s (killed)")
    line = proc.stdout.readline()
    if not line:
        raise CheckFailed(f"a packing worker exited with code {proc.wait()} (its stderr is above)")
    return line


def run_workers(ctx: Context, count: int) -> list[dict]:
    """`count` worker processes that start their timed epochs together."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "packing", "--device", ctx.device.type,
           "--steps", str(ctx.sizes.packing_steps)]
    procs = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(count)]
    try:
        for p in procs:
            _read(p)  # ready: imported, data on the device, warmed up
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        return [json.loads(_read(p)) for p in procs]
    finally:
        for p in procs:
            p.stdin.close()
            try:
                p.wait(timeout=120)
            except subprocess.TimeoutExpired:
                p.kill()


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.0f} MiB"


def check_packing(ctx: Context) -> str:
    (alone,) = run_workers(ctx, 1)
    return describe_packing(ctx, alone, run_workers(ctx, 2))


def describe_packing(ctx: Context, alone: dict, pair: list[dict]) -> str:
    alone_rate = alone["images"] / alone["seconds"]
    combined = sum(r["images"] for r in pair) / max(r["seconds"] for r in pair)
    each = " and ".join(f"{r['images'] / r['seconds']:,.0f}" for r in pair)
    memory = " and ".join(f"{_mib(r['allocated'])} allocated, {_mib(r['reserved'])} reserved" for r in pair)
    arch, size, batch = PACKING_MODEL
    return (f"{arch}@{size}, batch {batch}, {ctx.sizes.packing_steps} steps: alone {alone_rate:,.0f} img/s; "
            f"two processes {combined:,.0f} img/s combined ({combined / alone_rate:.2f}x alone; {each} each); "
            f"peak memory per process {memory} (alone {_mib(alone['allocated'])} allocated)")


# -- imports -----------------------------------------------------------------------------------

def imported_names(path: Path) -> set[str]:
    """Top-level names of the absolute imports in a source file (module level or in functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def check_imports(ctx: Context) -> str:
    """No ray or mlflow in this process; prunetune's modules imported (in this run) nothing a
    bare GPU machine lacks."""
    loaded = {name.split(".")[0] for name in sys.modules}
    forbidden = [m for m in FORBIDDEN if m in loaded]
    if forbidden:
        raise CheckFailed(f"{', '.join(forbidden)} imported")
    used: dict[str, str] = {}
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if name.startswith("prunetune") and path and path.endswith(".py"):
            for top in imported_names(Path(path)):
                if top in loaded and top not in sys.stdlib_module_names and top != "prunetune":
                    used.setdefault(top, name)
    lacking = {top: by for top, by in used.items() if top not in ALLOWED | IN_DEVICE_IMAGE}
    if lacking:
        raise CheckFailed("prunetune imported what a bare GPU machine lacks: "
                          + ", ".join(f"{top} (by {by})" for top, by in sorted(lacking.items())))
    image = [f"{top} (by {by})" for top, by in sorted(used.items()) if top in IN_DEVICE_IMAGE]
    return (f"no {' or '.join(FORBIDDEN)}; prunetune imported {', '.join(sorted(set(used) - IN_DEVICE_IMAGE))}"
            + (f", and beyond that list {', '.join(image)}, which the device image has" if image else ""))


# -- main --------------------------------------------------------------------------------------

def plan(ctx: Context) -> list[tuple[str, Callable[[], str], bool]]:
    """(check, function, needs CUDA) in the order they run."""
    checks: list[tuple[str, Callable[[], str], bool]] = [
        (f"trial {name}", lambda name=name: check_trial(ctx, name), False) for name in TRIALS]
    checks += [("replay", lambda: check_replay(ctx), False), ("cka", lambda: check_cka(ctx), False)]
    checks += [(f"throughput {arch}@{size}", lambda a=arch, s=size, b=batch: throughput_figures(ctx, a, s, b), True)
               for arch, size, batch in THROUGHPUT_MODELS]
    arch, size, _ = PACKING_MODEL
    checks += [(f"packing {arch}@{size}", lambda: check_packing(ctx), True),
               ("imports", lambda: check_imports(ctx), False)]
    return checks


def run_checks(ctx: Context, report: Report) -> None:
    for check, fn, needs_cuda in plan(ctx):
        if needs_cuda and not ctx.cuda:
            report.skip(check)
        else:
            report.run(check, fn)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer epochs and steps (within 6 minutes on one H100)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--worker", choices=["packing"], help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=0, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def environment(device: torch.device) -> str:
    """One line on stderr: what the checks ran with (what a compile or the 2:4 export needs)."""
    parts = [f"torch {torch.__version__}", f"python {sys.version.split()[0]}",
             f"C compiler {shutil.which('cc') or shutil.which('gcc') or 'none'} (torch.compile's Triton needs one)"]
    try:
        if device.type == "cuda":
            parts += [f"CUDA {torch.version.cuda}", torch.cuda.get_device_name(device),
                      f"compute capability {torch.cuda.get_device_capability(device)}",
                      f"cuSPARSELt {torch.backends.cusparselt.is_available()}"]
    except Exception as exc:  # noqa: BLE001 - a description only: the checks say what fails
        parts.append(f"({type(exc).__name__} describing the GPU: {exc})")
    return "gpu_check: " + ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return packing_worker(args.device, args.steps)
    name = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    device = torch.device(name)
    if device.type == "cpu":
        torch.set_num_threads(1)  # the CPU checks check, they do not time: one thread each is fastest on a busy machine
    start = time.perf_counter()
    print(environment(device), file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        os.environ.setdefault("PRUNETUNE_CACHE", str(Path(work) / "cache"))
        ctx = Context(device, sizes_for(device.type == "cuda", args.quick), Path(work))
        report = Report()
        run_checks(ctx, report)
    gpu = f" on {torch.cuda.get_device_name(device)}" if device.type == "cuda" else " on the CPU"
    print(f"gpu_check: {report.counts['ok']} ok, {report.counts['FAIL']} FAIL, {report.counts['skipped']} skipped"
          f"{gpu} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return report.exit_code


if __name__ == "__main__":
    sys.exit(main())
