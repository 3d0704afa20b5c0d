"""Criteria that score through the model, to prune at initialisation or at any step: `snip` and
`grasp` on training batches (`Context.batches`, `Context.balanced`), `synflow` data-free, over
`Context.synflow_iters` rounds. torch is imported inside them: the spec reads their rules
without it."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from prunetune.pruning.criteria.base import Batches, Context, Criterion, allocation_breaks, needs_context, scoring_mode

if TYPE_CHECKING:
    import torch
    from torch import nn


def _gradients(model: nn.Module, batches: Batches, params: dict[str, torch.Tensor],
               temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """The loss's gradient (logits divided by `temperature`) with respect to `params`, summed
    over the batches."""
    import torch
    import torch.nn.functional as F

    grads = {n: torch.zeros_like(p) for n, p in params.items()}
    for x, y in batches():
        g = torch.autograd.grad(F.cross_entropy(model(x) / temperature, y), list(params.values()))
        for n, gi in zip(params, g):
            grads[n] += gi
    return grads


class _ScoredThroughModel(Criterion):
    """Scores taken through the model in the mode its reference code scores in (`train_mode`:
    batch statistics and dropout, or eval mode: running statistics, no dropout), leaving the
    model as it was: every module's mode, its buffers (batch-norm running statistics) and the
    parameters' `.grad`."""

    name = ""
    train_mode = False

    def scores(self, masks, layers, context: Context) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def prune(self, masks, target, layers, scope, generator=None, context=None) -> None:
        context = needs_context(context, self.name)
        masks.apply()
        with scoring_mode(context.model, self.train_mode):
            scores = self.scores(masks, layers, context)
        masks.prune_scores(target, scores, layers, scope)


class Snip(_ScoredThroughModel):
    """SNIP (Lee et al. 2019): connection sensitivity |∂L/∂w ⊙ w| on `schedule.calibration_samples`
    training images (`Context.calibration`; the authors score one batch of 100–128), the
    gradients summed over batches of `train.batch_size`, in eval mode, as the authors' code
    scores (namhoonlee/snip-public's prune.py feeds `is_train: False`) and as Synaptic-Flow's
    prune loop does by default."""

    name = "snip"
    needs = "data"
    reads = frozenset({"schedule.calibration_samples"})
    train_mode = False

    def scores(self, masks, layers, context):
        weights = {n: masks.weights[n] for n in layers}
        grads = _gradients(context.model, context.calibration or context.batches, weights)
        return {n: (grads[n] * weights[n].detach()).abs() for n in layers}


class Grasp(_ScoredThroughModel):
    """GraSP (Wang et al. 2020): the score −w ⊙ Hg of the paper, whose largest values are pruned
    (removing them reduces gradient flow least); here negated, as lowest-first. Logits are divided
    by the temperature of the authors' code (200) in the gradient passes. In training mode, as the
    authors' code scores: alecwangcq/GraSP's pruner scores a copy of the freshly built network,
    whose `.eval()` is commented out (Synaptic-Flow's re-implementation scores it in eval mode).
    On their sample: `schedule.samples_per_class` (25) training images of each class, ordered by
    class and passed as two halves (`Context.balanced`). Unlike their code, linear layers are not
    re-initialised (xavier) before scoring: the trial's network is scored as it is."""

    name = "grasp"
    needs = "data"
    reads = frozenset({"schedule.samples_per_class"})
    train_mode = True
    temperature = 200.0

    def check(self, schedule) -> str | None:
        return allocation_breaks(schedule, ("global", "layer", "erk"), layer_targets=True,
                                 why=" (its scores take either sign; LAMP normalises squares)")

    def scores(self, masks, layers, context):
        import torch
        import torch.nn.functional as F

        model, T = context.model, self.temperature
        batches = context.balanced or context.batches
        weights = [masks.weights[n] for n in layers]
        g = list(_gradients(model, batches, dict(zip(layers, weights)), T).values())  # no graph kept
        hg = [torch.zeros_like(w) for w in weights]
        for x, y in batches():  # Hg: the gradient of gᵀ∇L
            grad = torch.autograd.grad(F.cross_entropy(model(x) / T, y), weights, create_graph=True)
            z = sum((gi.detach() * d).sum() for gi, d in zip(g, grad))
            for h, d in zip(hg, torch.autograd.grad(z, weights)):
                h += d
        return {n: w.detach() * h for n, w, h in zip(layers, weights, hg)}


class Synflow(Criterion):
    """SynFlow (Tanaka et al. 2020), data-free: with every parameter replaced by its absolute
    value, R = Σ f(𝟙) for an all-ones input, and a weight's score is |θ ⊙ ∂R/∂θ|. Pruned over
    `synflow_iters` rounds, the density falling exponentially (d₀·(d/d₀)^(k/n) in round k), each
    round rescoring the surviving weights: this is what avoids layer collapse. Computed in float64
    (R overflows float32 in deep networks) on a copy of the model in eval mode, whose
    floating-point buffers (batch-norm running statistics) are made absolute too: the reference
    (Synaptic-Flow's `linearize`) takes |·| of the whole state_dict, in its prune loop's default
    eval mode."""

    name = "synflow"
    needs = "model"
    reads = frozenset({"schedule.synflow_iters"})
    train_mode = False

    def check(self, schedule) -> str | None:
        return allocation_breaks(schedule, why=" (its rounds lower each layer's or the layers' density "
                                               "exponentially on their own)")

    def prune(self, masks, target, layers, scope, generator=None, context=None) -> None:
        import torch

        context = needs_context(context, self.name)
        masks.apply()
        rounds = max(1, int(context.synflow_iters))
        probe = copy.deepcopy(context.model).double().train(self.train_mode)
        for p in probe.parameters():
            p.requires_grad_(True)
        with torch.no_grad():  # eval mode never updates them: once for every round
            for b in probe.buffers():
                if b.is_floating_point():
                    b.abs_()
        ones = torch.ones_like(context.example, dtype=torch.float64)
        names = dict(context.model.named_parameters())
        name_of = {id(p): n for n, p in names.items()}
        weight_names = {n: name_of[id(masks.weights[n])] for n in layers}
        # each layer's (layer scope) or the layers' (global) density falls from where it starts
        starts = {n: masks.sparsity([n]) for n in layers} if scope == "layer" else {"": masks.sparsity(layers)}
        for k in range(1, rounds + 1):
            with torch.no_grad():
                for n, p in probe.named_parameters():
                    p.copy_(names[n].detach().abs())
            probe.zero_grad(set_to_none=True)
            probe(ones).sum().backward()
            params = dict(probe.named_parameters())
            scores = {n: (params[weight_names[n]] * params[weight_names[n]].grad).detach().abs() for n in layers}
            for key, start in starts.items():
                group = [key] if key else list(layers)
                masks.prune_scores(_round_target(start, target, k, rounds), scores, group, scope)


def _round_target(start: float, target: float, k: int, rounds: int) -> float:
    """Round k's sparsity when the density falls exponentially from 1 − start to 1 − target."""
    d0, d = 1.0 - start, 1.0 - target
    if k == rounds or d0 <= d:
        return target
    return 1.0 - d0 * (d / d0) ** (k / rounds)


snip, grasp, synflow = Snip(), Grasp(), Synflow()
