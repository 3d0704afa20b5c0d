"""Memory of calibration (wanda, sparsegpt) on a DenseNet169: what it holds at once, measured.

    python benchmarks/calibration_memory.py [--size 32] [--images 8] [--batch 8]

Each arm runs in a fresh process on CPU (one thread), with `--images` and with 4× as many, and
reports its peak resident memory (/proc VmHWM) above what the process held once the model was
built; what grows with the images is what a larger calibration set costs:
  forward    baseline: one no-grad forward of the calibration images, batch by batch
  hold_all   the naive pass: one forward keeping every prunable layer's input for every image
             (what a calibration that collects all layers' activations at once holds)
  wanda      `masks.prune` with wanda to 50% per layer (`base.layer_inputs`: one layer's input
             at a time, a convolution's unfolded patches a few images at a time)
  sparsegpt  the same with sparsegpt (one d_in × d_in float64 Hessian at a time)
and, from the layer shapes (one image through the model at 224 px), what the same passes would
hold at 224 px with 128 calibration images: every layer's input at once, the largest single
layer input for one batch, the largest unfolded chunk, and the largest Hessian.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GB = 1 << 30


def peak_and_current() -> tuple[int, int]:
    """VmHWM and VmRSS of this process, in bytes."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return tuple(int(fields[k].split()[0]) * 1024 for k in ("VmHWM", "VmRSS"))


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM back to the current RSS (Linux ≥ 4.0)


def child(arm: str, size: int, images: int, batch: int) -> dict:
    import torch

    from prunetune import registry
    from prunetune.models import build_model, prunable_layers
    from prunetune.pruning.criteria.base import Context
    from prunetune.pruning.masks import Masks
    from prunetune.spec import ModelSpec

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(ModelSpec(arch="densenet169"), 10, 3, size).eval()
    layers = prunable_layers(model, 3, size)
    data = torch.randn(images, 3, size, size)

    def batches():
        for start in range(0, images, batch):
            yield data[start:start + batch], torch.zeros(len(data[start:start + batch]), dtype=torch.long)

    reset_peak()
    before = peak_and_current()[1]
    start = time.perf_counter()
    if arm == "forward":
        with torch.no_grad():
            for x, _ in batches():
                model(x)
    elif arm == "hold_all":
        held = []
        modules = dict(model.named_modules())
        hooks = [modules[n].register_forward_pre_hook(lambda m, a: held.append(a[0].detach().clone()))
                 for n in layers]
        with torch.no_grad():
            for x, _ in batches():
                model(x)
        for h in hooks:
            h.remove()
    else:
        masks = Masks(model, layers)
        context = Context(model, data[:1], calibration=batches, n_m=None)
        masks.prune(0.5, registry.criterion(arm), layers, "layer", context=context)
    seconds = time.perf_counter() - start
    return {"arm": arm, "above_model_gb": (peak_and_current()[0] - before) / GB, "seconds": seconds,
            "layers": len(layers)}


def at_224(images: int = 128, batch: int = 32) -> dict:
    """What the passes hold at 224 px, from the layer shapes (float32 activations)."""
    import torch
    from torch import nn

    from prunetune.models import build_model, prunable_layers
    from prunetune.pruning.criteria.base import PATCH_ELEMENTS
    from prunetune.spec import ModelSpec

    model = build_model(ModelSpec(arch="densenet169"), 10, 3, 224).eval()
    layers = prunable_layers(model, 3, 224)
    modules = dict(model.named_modules())
    per_image, positions = {}, {}

    def record(name):
        def hook(module, args, out):
            per_image[name] = args[0][0].numel()
            positions[name] = out.shape[-2] * out.shape[-1] if out.dim() == 4 else 0
        return hook

    hooks = [modules[n].register_forward_hook(record(n)) for n in layers]
    with torch.no_grad():
        model(torch.zeros(1, 3, 224, 224))
    for h in hooks:
        h.remove()
    d_in = {n: modules[n].weight[0].numel() for n in layers}
    largest_unfold = max(d_in[n] * positions[n] for n in layers if isinstance(modules[n], nn.Conv2d))
    return {"all_inputs_gb": sum(per_image.values()) * images * 4 / GB,
            "largest_layer_input_batch_gb": max(per_image.values()) * batch * 4 / GB,
            "largest_unfold_per_image_gb": largest_unfold * 4 / GB,
            "unfold_chunk_gb": PATCH_ELEMENTS * 4 / GB,
            "largest_hessian_gb": max(d * d for d in d_in.values()) * 8 / GB,
            "largest_d_in": max(d_in.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.size, args.images, args.batch)))
        return
    counts = (args.images, 4 * args.images)
    print(f"densenet169, {counts[0]} and {counts[1]} calibration images at {args.size} px in batches of "
          f"{args.batch}, CPU, 1 thread; peak resident memory above the built model")
    rows = {}
    for arm in ("forward", "hold_all", "wanda", "sparsegpt"):
        for n in counts:
            out = subprocess.run([sys.executable, __file__, "--child", arm, "--size", str(args.size), "--images",
                                  str(n), "--batch", str(args.batch)], capture_output=True, text=True,
                                 cwd=REPO, check=True)
            rows[arm, n] = json.loads(out.stdout.strip().splitlines()[-1])
        small, large = (rows[arm, n] for n in counts)
        print(f"  {arm:<10} {small['above_model_gb']:.3f} GB with {counts[0]} images, {large['above_model_gb']:.3f} GB "
              f"with {counts[1]} ({large['above_model_gb'] / small['above_model_gb']:.2f}×); "
              f"{small['seconds']:.1f} s, {large['seconds']:.1f} s")
    big = at_224()
    print("at 224 px, 128 calibration images in batches of 32 (float32 activations), from the layer shapes:")
    print(f"  every prunable layer's input at once: {big['all_inputs_gb']:.1f} GB")
    print(f"  the largest layer input of one batch: {big['largest_layer_input_batch_gb']:.2f} GB")
    print(f"  the largest convolution's unfolded patches of one image: {big['largest_unfold_per_image_gb']:.3f} GB "
          f"(handed over in chunks of at most {big['unfold_chunk_gb']:.3f} GB)")
    print(f"  the largest SparseGPT Hessian: d_in {big['largest_d_in']}, {big['largest_hessian_gb'] * 1024:.1f} MB "
          "(float64)")


if __name__ == "__main__":
    main()
