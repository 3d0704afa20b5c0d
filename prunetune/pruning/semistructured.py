"""2:4 semi-structured sparsity on the hardware that runs it: NVIDIA GPUs of compute capability
8.0 or newer (sparse tensor cores), through `torch.sparse.to_sparse_semi_structured`.

Only linear layers convert (torch's semi-structured tensors are matrices; a convolution would
need its own kernel), in half precision, and only those whose shapes the kernels take (both
dimensions multiples of 64). Elsewhere nothing is measured and nothing is reported; where the
torch build has no kernel for a layer, a warning says why (the trial is not failed for it).
"""

from __future__ import annotations

import copy
import logging
import statistics
import time

import torch
from torch import nn

from prunetune.errors import first_line

log = logging.getLogger(__name__)

BATCH = 256  # sparse kernels pay off on matrices, not at batch 1
RUNS = 50


def available(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def _device_failure(exc: BaseException) -> bool:
    """Out of memory, or a fault of the device itself: not a missing kernel, never swallowed."""
    kinds = tuple(k for k in (getattr(torch, "OutOfMemoryError", None), getattr(torch, "AcceleratorError", None)) if k)
    return isinstance(exc, kinds)


def _latency_ms(model: nn.Module, x: torch.Tensor) -> float:
    times = []
    with torch.inference_mode():
        for i in range(RUNS + 5):
            torch.cuda.synchronize(x.device)
            start = time.perf_counter()
            model(x)
            torch.cuda.synchronize(x.device)
            if i >= 5:  # after warm-up
                times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def semi_structured_speedup(model: nn.Module, example: torch.Tensor, layers: list[str], n_m=(2, 4)) -> dict:
    """The model with its 2:4 linear layers as semi-structured sparse tensors: its latency at
    batch `BATCH` in float16 against the same model dense (median of `RUNS`). {} where the
    device cannot run it, the pattern is not 2:4 or no layer converts."""
    if tuple(n_m) != (2, 4) or not available(example.device):
        return {}
    from torch.sparse import to_sparse_semi_structured

    dense = copy.deepcopy(model).half().eval()
    sparse = copy.deepcopy(dense)
    modules = dict(sparse.named_modules())
    converted = 0
    for name in layers:
        module = modules[name]
        out, cin = module.weight.shape[:2]
        if isinstance(module, nn.Linear) and out % 64 == 0 and cin % 64 == 0:
            try:
                sparse_weight = to_sparse_semi_structured(module.weight.detach())
            except (RuntimeError, NotImplementedError) as exc:  # no kernel for this shape, dtype or GPU
                if _device_failure(exc):
                    raise
                log.warning("2:4 export: %s not converted: %s", name, first_line(exc)[:300])
                continue
            module.weight = nn.Parameter(sparse_weight, requires_grad=False)
            converted += 1
    if not converted:
        return {}
    x = example.half().expand(BATCH, *example.shape[1:]).contiguous()
    try:
        dense_ms, sparse_ms = _latency_ms(dense, x), _latency_ms(sparse, x)
    except (RuntimeError, NotImplementedError) as exc:  # a torch build without the sparse kernels
        if _device_failure(exc):
            raise
        log.warning("2:4 export not measured: %s", first_line(exc)[:300])
        return {}
    return {"latency_ms_dense": dense_ms, "latency_ms_compact": sparse_ms, "measured_speedup": dense_ms / sparse_ms}
