"""N:M semi-structured sparsity (`l1_nm`): in every group of M consecutive input weights of each
output row, the N of largest magnitude survive (a conv's weights read channels-last, groups along
its input channels: the pattern NVIDIA's sparse tensor cores and
`torch.sparse.to_sparse_semi_structured` run). The target is 1 − N/M (the spec refuses any other).

Here live its rules, its mask arithmetic (`prune_nm`, `nm_view`, `nm_valid`, ...) and its metric
(`nm_valid`). `schedule.remove` makes the pattern real where hardware runs it: on a CUDA GPU of
compute capability 8.0 or newer, the 2:4 linear layers are converted to sparse semi-structured
tensors and timed against the dense model (`semistructured.py`); elsewhere it does nothing."""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING, Sequence

from prunetune.pruning.criteria.base import Criterion, allocation_breaks, needs_context, shuffle_breaks

if TYPE_CHECKING:
    import torch


NM_VALID = {"nm_valid": "schedule.criterion l1_nm, or wanda or sparsegpt with schedule.n_m (neither searched)"}


def pattern(schedule) -> tuple[int, int] | None:
    """The N:M pattern a schedule prunes to: `schedule.n_m`, [2, 4] by default for l1_nm; None
    (unstructured) for the criteria where it is optional and unset."""
    if schedule.n_m is not None:
        return tuple(schedule.n_m)
    return (2, 4) if schedule.criterion == "l1_nm" else None


def pattern_breaks(schedule) -> str | None:
    """What a schedule with an N:M pattern cannot do: another sparsity than 1 − N/M, a shuffle."""
    n, m = pattern(schedule)
    if abs(schedule.sparsity - (1 - n / m)) > 1e-9:
        return (f"schedule.sparsity must be 1 − N/M = {1 - n / m:g} with criterion {schedule.criterion} "
                f"and schedule.n_m {[n, m]} (got {schedule.sparsity:g}): the N:M pattern fixes it")
    return shuffle_breaks(schedule) or allocation_breaks(
        schedule, why=" (its N:M pattern fixes every layer's sparsity)")


def pattern_layers(model, selected: list[str], m: int) -> list[str]:
    """The selected layers whose input dimension splits into groups of M (`sparsity` counts
    them); the others (a first conv on 1 or 3 channels) stay dense."""
    from prunetune.errors import UserError

    modules = dict(model.named_modules())
    fits = [n for n in selected if nm_compatible(modules[n].weight, m)]
    if not fits:
        raise UserError(f"schedule.n_m: no selected layer has an input dimension divisible by M={m} "
                        f"(selected: {', '.join(selected)})")
    return fits


class NM(Criterion):
    name = "l1_nm"
    needs = "pattern"
    reads = frozenset({"schedule.n_m"})
    acts_on = frozenset({"schedule.remove"})
    metrics = NM_VALID

    # -- rules -------------------------------------------------------------------------------
    def check(self, schedule) -> str | None:
        return pattern_breaks(schedule)

    def reports(self, schedule, searched: Collection[str] = ()) -> frozenset[str]:
        return frozenset(self.metrics)  # not the latency: only on hardware that runs it

    # -- torch side ----------------------------------------------------------------------------
    def prune(self, masks, target, layers, scope, generator=None, context=None) -> None:
        n, m = needs_context(context, self.name).n_m
        prune_nm(masks, n, m, layers, {name: masks.weights[name].detach().abs() for name in layers})

    def layers(self, model, selected, schedule) -> list[str]:
        return pattern_layers(model, selected, pattern(schedule)[1])

    def final_metrics(self, trial) -> dict:
        """`nm_valid` (1 when every group of the selected layers holds the pattern), and with
        `schedule.remove` the semi-structured latencies where the device runs them."""
        from prunetune.pruning.semistructured import semi_structured_speedup

        n, m = pattern(trial.spec.schedule)
        out = {"nm_valid": float(all(nm_valid(trial.masks.weights[x], n, m) for x in trial.selected))}
        if trial.spec.schedule.remove:
            out.update(semi_structured_speedup(trial.model, trial.example, trial.selected, (n, m)))
        return out


l1_nm = NM()


# -- the pattern's arithmetic -------------------------------------------------------------------

def prune_nm(masks, n: int, m: int, layers: Sequence[str], scores: dict[str, torch.Tensor]) -> None:
    """In every group of `m` consecutive input weights of each output row of `layers` (see
    `nm_view`), the `n` highest-scoring survive. Pruned weights stay pruned."""
    import torch

    for name in layers:
        mask = masks.masks[name]
        s = scores[name].float().masked_fill(~mask, float("-inf"))
        groups = nm_view(s, m)
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(-1, torch.topk(groups, n, dim=-1).indices, True)
        mask &= nm_unview(keep, mask.shape)
    masks.apply()


def nm_view(weight: torch.Tensor, m: int) -> torch.Tensor:
    """A layer's weights as [rows, groups, m]: groups of `m` consecutive input weights per output
    row; a conv's [out, in, kh, kw] read channels-last ([out, kh, kw, in])."""
    w = weight.permute(0, 2, 3, 1) if weight.dim() == 4 else weight
    return w.reshape(w.shape[0], -1, m)


def nm_unview(groups: torch.Tensor, shape) -> torch.Tensor:
    """The inverse of `nm_view` for a tensor of `shape`."""
    if len(shape) == 4:
        out, cin, kh, kw = shape
        return groups.reshape(out, kh, kw, cin).permute(0, 3, 1, 2)
    return groups.reshape(shape)


def nm_compatible(weight: torch.Tensor, m: int) -> bool:
    """Whether a layer's input dimension (a conv's input channels) splits into groups of `m`."""
    return weight.shape[1] % m == 0


def nm_valid(weight: torch.Tensor, n: int, m: int) -> bool:
    """Whether every group of `m` consecutive input weights holds at most `n` non-zeros."""
    return bool(((nm_view(weight.detach(), m) != 0).sum(-1) <= n).all())
