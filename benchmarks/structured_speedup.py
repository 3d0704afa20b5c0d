"""Filter pruning with physical removal: parameters left and measured CPU speedup at batch 1.

    python benchmarks/structured_speedup.py [--archs vgg11 resnet18] [--sparsities 0.3 0.5 0.7]
                                            [--size 32] [--classes 100] [--scope layer] [--repeats 50]

For each architecture (CIFAR-shaped input, `stem: small`) and filter sparsity, the model is
pruned with `l1_filter` by prunetune's own masks and channel groups, the pruned channels are
removed (`structured.remove_channels`, what `schedule.remove: true` does), and the script checks
that the removed model computes what the masked model computes. It then times one forward pass
of the masked (dense-shaped) model and of the compact model on the CPU, batch 1, median of
`--repeats` runs after warm-up, in the same process, and prints the ratio. The weights are the
initial ones: the time of a forward pass does not depend on their values.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from prunetune.models import build_model, prunable_layers
from prunetune.pruning.criteria.channel import l1_filter
from prunetune.pruning.masks import Masks
from prunetune.pruning.structured import channel_groups, latency_ms, remove_channels
from prunetune.spec import ModelSpec


def conv_params(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archs", nargs="+", default=["vgg11", "resnet18"])
    ap.add_argument("--sparsities", nargs="+", type=float, default=[0.3, 0.5, 0.7])
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--scope", choices=["layer", "global"], default="layer")
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, input 1x3x{args.size}x{args.size}, "
          f"scope {args.scope}, median of {args.repeats} runs")
    print("| model | filter sparsity | conv params left | params (dense → compact) | latency dense ms | "
          "latency compact ms | measured speedup |")
    print("|---|---|---|---|---|---|---|")
    for arch in args.archs:
        for sparsity in args.sparsities:
            torch.manual_seed(0)
            model = build_model(ModelSpec(arch=arch, stem="small"), args.classes, 3, args.size).eval()
            layers = prunable_layers(model, 3, args.size)
            example = torch.randn(1, 3, args.size, args.size)
            groups = channel_groups(model, example, layers, exclude=layers[-1:])
            masks = Masks(model, layers, groups)
            masks.prune(sparsity, l1_filter, layers, args.scope)
            compact = remove_channels(model, groups, masks.channels_kept, example)
            with torch.no_grad():
                torch.testing.assert_close(compact(example), model(example), rtol=1e-3, atol=1e-4)
            dense_ms = latency_ms(model, example, warmup=10, repeats=args.repeats)
            compact_ms = latency_ms(compact, example, warmup=10, repeats=args.repeats)
            total = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
            print(f"| {arch} | {sparsity:.0%} | {conv_params(compact) / conv_params(model):.1%} | "
                  f"{total(model):,} → {total(compact):,} | {dense_ms:.2f} | {compact_ms:.2f} | "
                  f"{dense_ms / compact_ms:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
