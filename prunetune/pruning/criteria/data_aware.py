"""Wanda (Sun et al. 2023; locuslab/wanda): a weight's score is |W_ij| · ‖X_j‖₂, its magnitude
times the norm of its input feature over the calibration inputs (`schedule.calibration_samples`
training images), compared within each output row, its comparison group. Layers go in forward
order, each on the inputs of the network already pruned before it, as the reference prunes block
after block on re-propagated inputs.

For a convolution an input feature is one input channel at one kernel position: a column of the
unfolded input (`base.layer_inputs`), whose norm runs over every image and position. That is the
linear layer the convolution applies to each patch, so Wanda's rule carries over unchanged; the
reference prunes only Linear layers (ConvNeXt's pointwise convolutions are Linear there) and has
no rule for convolutions. Grouped convolutions are refused.

With `schedule.n_m` the N of every M consecutive inputs with the largest scores survive in each
row (the reference's N:M), else each row keeps its share of the layer's target. The layer's count
comes from `schedule.scope` (`Masks.layer_counts`): each layer alike under global and layer (the
references' uniform sparsity), ERK's densities, per-layer targets, or under lamp the count one
LAMP threshold over the weights' magnitudes takes from the layer (LAMP's allocation; Wanda's or
SparseGPT's own rule then chooses which weights of the layer go)."""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING

from prunetune.pruning.criteria.base import Criterion, allocation_breaks, layer_inputs, needs_context, scoring_mode
from prunetune.pruning.criteria.nm import NM_VALID, pattern, pattern_breaks, pattern_layers, prune_nm

if TYPE_CHECKING:
    import torch


class Calibrated(Criterion):
    """What wanda and sparsegpt share: calibration inputs through the model, layer after layer,
    in eval mode (the model's modes and buffers left as they were), unstructured or N:M."""

    needs = "data"
    reads = frozenset({"schedule.calibration_samples", "schedule.n_m"})
    metrics = NM_VALID

    def check(self, schedule) -> str | None:
        from prunetune.pruning.schedules import METHODS

        if METHODS[schedule.method].regrows:
            return (f"schedule.method {schedule.method} releases its masks and regrows, which criterion "
                    f"{self.name} (a one-shot prune of a trained layer, with calibration data) does not model; "
                    "use l1_unstructured or random")
        if schedule.n_m is not None:
            return pattern_breaks(schedule)
        return allocation_breaks(schedule, ("global", "layer", "erk", "lamp"), layer_targets=True)

    def note(self, spec) -> str | None:
        if spec.train.dense_epochs == 0 and spec.model.weights is None:
            return (f"note: schedule.criterion {self.name} with train.dense_epochs 0 prunes an untrained network; "
                    "its reference prunes trained ones")
        return None

    def reports(self, schedule, searched: Collection[str] = ()) -> frozenset[str]:
        return frozenset(NM_VALID) if schedule.n_m is not None and "schedule.n_m" not in searched else frozenset()

    def layers(self, model, selected, schedule) -> list[str]:
        from torch import nn

        from prunetune.errors import UserError

        modules = dict(model.named_modules())
        for n in selected:
            m = modules[n]
            if isinstance(m, nn.Conv2d) and (m.groups != 1 or isinstance(m.padding, str)
                                             or m.padding_mode != "zeros"):
                raise UserError(f"schedule.criterion {self.name}: layer {n} is a grouped convolution or pads "
                                "other than with zeros, which it cannot unfold; leave it out with schedule.layers")
        n_m = pattern(schedule)
        return pattern_layers(model, selected, n_m[1]) if n_m else list(selected)

    def final_metrics(self, trial) -> dict:
        from prunetune.pruning.criteria.nm import nm_valid

        n_m = pattern(trial.spec.schedule)
        if n_m is None:
            return {}
        return {"nm_valid": float(all(nm_valid(trial.masks.weights[x], *n_m) for x in trial.selected))}

    def prune(self, masks, target, layers, scope, generator=None, context=None) -> None:

        context = needs_context(context, self.name)
        model, batches = context.model, context.calibration or context.batches
        counts = None if context.n_m else masks.layer_counts(target, layers, scope)
        with scoring_mode(model, False):
            for name in layers:  # forward order: each on the already-pruned network's inputs
                masks.apply()
                self.prune_layer(masks, name, model, batches, context.n_m, counts and counts[name])
        masks.apply()

    def prune_layer(self, masks, name: str, model, batches, n_m, count: int | None) -> None:
        raise NotImplementedError


class Wanda(Calibrated):
    name = "wanda"

    def prune_layer(self, masks, name, model, batches, n_m, count) -> None:
        import torch

        weight = masks.weights[name]
        norms = torch.zeros(weight[0].numel(), dtype=torch.float64, device=weight.device)

        def take(x):
            norms.add_(x.double().pow(2).sum(0))

        layer_inputs(model, name, batches, take)
        scores = (weight.detach().double().flatten(1).abs() * norms.sqrt()).view_as(weight)
        if n_m:
            prune_nm(masks, n_m[0], n_m[1], [name], {name: scores})
        else:
            prune_rows(masks, name, scores, count)


def prune_rows(masks, name: str, scores: torch.Tensor, count: int) -> None:
    """Leave `count` weights of layer `name` zero, the lowest-scoring within each output row:
    every row its share (count // rows), the rows whose next-lowest score is smallest one more,
    so the layer reaches `count` exactly. Pruned weights are taken first."""
    import torch

    mask = masks.masks[name]
    s = scores.flatten(1).double().masked_fill(~mask.flatten(1), float("-inf"))
    rows, cols = s.shape
    count = max(0, min(count, rows * cols))
    base, extra = divmod(count, rows)
    order = torch.sort(s, dim=1, stable=True)
    drop = torch.zeros_like(s, dtype=torch.bool)
    drop.scatter_(1, order.indices[:, :base], True)
    if extra:
        more = torch.topk(order.values[:, base], extra, largest=False).indices
        drop[more, order.indices[more, base]] = True
    mask &= ~drop.view_as(mask)


wanda = Wanda()
