"""Size and cost of a (pruned) model: parameter counts, FLOPs, compressed checkpoint size."""

from __future__ import annotations

import io
import zlib

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def param_counts(model: nn.Module) -> dict:
    total = sum(p.numel() for p in model.parameters())
    nonzero = sum(int((p != 0).sum()) for p in model.parameters())
    return {"total_params": total, "nonzero_params": nonzero,
            "compression_ratio": total / nonzero if nonzero else float("inf")}


@torch.no_grad()
def flops(model: nn.Module, example: torch.Tensor, layer_names: list[str]) -> dict:
    """FLOPs of one forward pass on `example` (batch 1), counted by torch's FlopCounterMode.

    `flops_sparse` scales each prunable layer's FLOPs by its weight density: the work a sparse
    kernel that skips zero weights would do. Other operations count in full.
    """
    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter:
        model(example)
    model.train(was_training)
    dense = counter.get_total_flops()
    per_module = counter.get_flop_counts()
    modules = dict(model.named_modules())
    prefix = type(model).__name__
    saved = 0.0
    for name in layer_names:
        layer_flops = sum(per_module.get(f"{prefix}.{name}", {}).values())
        w = modules[name].weight
        saved += layer_flops * float((w == 0).sum()) / w.numel()
    sparse = dense - saved
    return {"flops_dense": int(dense), "flops_sparse": int(round(sparse)),
            "theoretical_speedup": dense / sparse if sparse > 0 else float("inf")}


def sparse_checkpoint_bytes(state_dict: dict[str, torch.Tensor]) -> int:
    """Size of the checkpoint stored sparsely and compressed: each floating tensor as a bitmask of
    its non-zeros plus their float32 values, other tensors as they are, the whole deflated."""
    buf = io.BytesIO()
    arrays = {}
    for name, t in state_dict.items():
        a = t.detach().cpu().numpy()
        if np.issubdtype(a.dtype, np.floating):
            nz = a != 0
            arrays[name + ".mask"] = np.packbits(nz.ravel())
            arrays[name + ".values"] = a[nz].astype(np.float32)
        else:
            arrays[name] = a
    np.savez(buf, **arrays)
    return len(zlib.compress(buf.getvalue(), 6))
