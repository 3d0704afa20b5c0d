"""Structured pruning: whole output channels of convolutions and neurons of linear layers.

A channel is never pruned alone. Torch-Pruning's dependency graph (DepGraph) gives, for each
prunable layer, the *group* of tensor slices that must go with its output channels: the layer's
filters and bias, the batch norm after it, the next layers' input columns, every layer whose
output is added to it (ResNet's residual additions) and every layer that reads it out of a
concatenation (DenseNet). A group channel is pruned by masking every one of those slices, so
the masked model computes exactly what the model with the channel physically removed computes:
batch norm with zero scale and shift outputs zero whatever its running statistics.

`remove_channels` then removes the masked channels for real (with Torch-Pruning), giving a
smaller, faster model: what `schedule.remove` asks for. The criteria that score the channels
are `criteria/channel.py`; this module knows none of them.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

_OWN = (nn.Conv2d, nn.Linear)  # layers whose output channels are scored
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass
class Member:
    """Slices of one parameter that belong to a group: `index[i]` along `dim` goes with group
    channel `channel[i]`. `scored`: an output slice of a conv/linear weight (counts in the score)."""

    param: str
    dim: int
    index: torch.Tensor
    channel: torch.Tensor
    scored: bool


@dataclass
class Group:
    layers: tuple[str, ...]  # the conv/linear layers whose output channels these are
    channels: int
    members: list[Member]


def _out_fn(module: nn.Module):
    import torch_pruning as tp

    return tp.prune_conv_out_channels if isinstance(module, nn.Conv2d) else tp.prune_linear_out_channels


def _graph(model: nn.Module, example: torch.Tensor):
    import torch_pruning as tp

    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():  # the graph is traced through autograd
            return tp.DependencyGraph().build_dependency(model, example_inputs=example)
    finally:
        model.train(was_training)


def channel_groups(model: nn.Module, example: torch.Tensor, layers: Sequence[str],
                   exclude: Sequence[str] = ()) -> list[Group]:
    """The channel groups rooted at `layers` (conv/linear names, in forward order), one per set
    of coupled output channels. Layers in `exclude` (the classifier head) are never pruned."""
    graph = _graph(model, example)
    names = {m: n for n, m in model.named_modules()}
    modules = dict(model.named_modules())
    excluded = set(exclude)
    covered: set[str] = set()
    groups = []
    for root in layers:
        if root in covered or root in excluded:
            continue
        module = modules[root]
        channels = module.weight.shape[0]
        found = graph.get_pruning_group(module, _out_fn(module), idxs=list(range(channels)))
        members, owners = [], []
        for dep, idxs in found.items:
            target = dep.target.module
            name = names.get(target)
            if name is None or not isinstance(target, _OWN + _NORMS):
                continue  # a parameter-free operation (addition, concatenation, reshape)
            out = graph.is_out_channel_pruning_fn(dep.handler)
            # Torch-Pruning lists a member's indices in the order of the root's channels; after a
            # flatten each channel becomes k consecutive features (c·k … c·k+k-1)
            index = torch.tensor([getattr(i, "idx", i) for i in idxs], dtype=torch.long)
            channel = torch.arange(len(index)) // max(1, len(index) // channels)
            if isinstance(target, _OWN) and out:
                owners.append(name)
            if isinstance(target, _OWN):
                members.append(Member(f"{name}.weight", 0 if out else 1, index, channel,
                                      scored=out))
                if out and target.bias is not None:
                    members.append(Member(f"{name}.bias", 0, index, channel, scored=False))
            elif target.affine:  # batch norm: in and out channels are the same
                members.append(Member(f"{name}.weight", 0, index, channel, scored=False))
                members.append(Member(f"{name}.bias", 0, index, channel, scored=False))
        if excluded & set(owners):
            continue  # coupled with the head's outputs: the classes cannot be pruned
        covered.update(owners)
        groups.append(Group(tuple(owners), channels, members))
    return groups


class GroupLasso:
    """λ · Σ over groups and channels of the L2 norm of all the channel's parameters (every
    member slice: filters, bias, batch norm, next layers' input columns)."""

    def __init__(self, groups: list[Group], model: nn.Module):
        params = dict(model.named_parameters())
        device = next(model.parameters()).device
        self.terms = []
        for g in groups:
            parts = []
            for m in g.members:
                p = params[m.param]
                if not p.requires_grad:
                    continue
                parts.append((p, m.dim, m.index.to(device), m.channel.to(device)))
            if parts:
                self.terms.append((g.channels, parts))

    def __call__(self) -> torch.Tensor:
        total = 0.0
        for channels, parts in self.terms:
            sq = None
            for p, dim, index, channel in parts:
                dims = [d for d in range(p.dim()) if d != dim]
                per = p.pow(2).sum(dim=dims) if dims else p.pow(2)
                part = torch.zeros(channels, device=p.device, dtype=per.dtype).index_add(0, channel, per[index])
                sq = part if sq is None else sq + part
            total = total + (sq + 1e-12).sqrt().sum()
        return total


def remove_channels(model: nn.Module, groups: list[Group], keep: list[torch.Tensor],
                    example: torch.Tensor) -> nn.Module:
    """A copy of `model` (on the CPU, in eval mode) with the channels `keep` marks False removed
    from every member of their group."""
    compact = copy.deepcopy(model).cpu().eval()
    example = example.cpu()
    graph = _graph(compact, example)
    modules = dict(compact.named_modules())
    for group, kept in zip(groups, keep):
        pruned = (~kept.cpu()).nonzero().flatten().tolist()
        if pruned:
            root = modules[group.layers[0]]
            graph.get_pruning_group(root, _out_fn(root), idxs=pruned).prune()
    return compact


def removal_metrics(model: nn.Module, compact: nn.Module, example: torch.Tensor) -> dict:
    """The compact model's size, and the CPU latency at batch 1 of the masked and the compact model."""
    example = example.cpu()
    dense_ms = latency_ms(copy.deepcopy(model).cpu().eval(), example)
    compact_ms = latency_ms(compact, example)
    return {"compact_params": sum(p.numel() for p in compact.parameters()),
            "latency_ms_dense": dense_ms, "latency_ms_compact": compact_ms, "measured_speedup": dense_ms / compact_ms}


@torch.no_grad()
def latency_ms(model: nn.Module, example: torch.Tensor, warmup: int = 5, repeats: int = 30) -> float:
    """Median wall time (ms) of one forward pass of `example`, after `warmup` passes."""
    model.eval()
    for _ in range(warmup):
        model(example)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(example)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)
