"""Pruning criteria. Each is a `Pruner`: `prune(masks, target, layers, scope, generator,
context)` and the special cases it owns (which layers, which channel groups, which final metrics),
registered by name in `registry.CRITERIA`, whose entries (`registry.Criterion`) hold its
torch-free rules (spec checks, dense-hash part, which metrics it reports).

- weight criteria score each weight from its own tensor (`WeightScore`: |w|, random);
- at-initialisation criteria score through the model: `snip` and `grasp` on training batches
  (`Context.batches`), `synflow` data-free, over `Context.synflow_iters` rounds;
- `l1_nm` keeps the N largest of every M consecutive input weights (`Context.n_m`);
- the structured criteria (`l1_filter`, `l2_filter`) live in `structured.py`.

Every criterion but `l1_nm` reaches its target exactly (to one weight) with global or layer scope;
`l1_nm`'s sparsity is 1 − N/M by construction. The lowest scores are pruned first.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from prunetune.errors import UserError
from prunetune.pruning.semistructured import semi_structured_speedup

Batches = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]


@dataclass
class Context:
    """What criteria that score through the model use: the model, an example input (its shape
    is synflow's all-ones input), training batches (snip, grasp), and keys of the schedule."""

    model: nn.Module
    example: torch.Tensor
    batches: Batches = field(default=lambda: iter(()))
    synflow_iters: int = 100
    n_m: tuple[int, int] = (2, 4)
    # grasp: `samples_per_class` training images of each class, in class order, as two batches
    # (its authors' sample); None: `batches`
    balanced: Batches | None = None


class Pruner:
    """The torch side of a pruning criterion: how it prunes (`prune`), and what it does beyond
    that. The defaults are an unstructured criterion's (single weights, every selected layer, no
    metric of its own); `NM` and `structured.ChannelNorm` override what differs. Its torch-free
    rules (spec checks, dense-hash part, the metrics it reports) are on its registry entry,
    `registry.Criterion`."""

    def prune(self, masks, target: float, layers: list[str], scope: str, generator=None, context=None) -> None:
        """Prune `layers` of `masks` until `target` of their weights are zero (see `Masks.prune`)."""
        raise NotImplementedError

    def layers(self, model: nn.Module, selected: list[str], schedule) -> list[str]:
        """Which of the `selected` layers it prunes (and `sparsity` counts): all of them."""
        return list(selected)

    def groups(self, model: nn.Module, example: torch.Tensor, selected: list[str], head: str,
               schedule) -> list | None:
        """The channel groups it prunes whole (`structured.Group`s), or None: single weights."""
        return None

    def final_metrics(self, trial) -> dict:
        """What it adds to a finished trial's final metrics (`metrics.BY_CRITERION`)."""
        return {}


def _needs(context: Context | None, name: str) -> Context:
    if context is None:
        raise ValueError(f"criterion {name} scores through the model: pass a criteria.Context")
    return context


@dataclass(frozen=True)
class WeightScore(Pruner):
    """A criterion scoring each weight from its own tensor: `fn(weight, generator) → scores`."""

    fn: Callable[[torch.Tensor, "torch.Generator | None"], torch.Tensor]

    def __call__(self, weight: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.fn(weight, generator)

    def prune(self, masks, target, layers, scope, generator=None, context=None) -> None:
        masks.prune_scores(target, {n: self.fn(masks.weights[n], generator) for n in layers}, layers, scope)


def _magnitude(weight: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    return weight.detach().abs()


def _random(weight: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    return torch.rand(weight.shape, generator=generator, device="cpu").to(weight.device)


l1_unstructured = WeightScore(_magnitude)  # |w|, as torch.nn.utils.prune.L1Unstructured
random_scores = WeightScore(_random)  # uniform random: the random-pruning baseline, seeded per trial


# -- at initialisation -------------------------------------------------------------------------

def _gradients(model: nn.Module, batches: Batches, params: dict[str, torch.Tensor],
               temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """The loss's gradient (logits divided by `temperature`) with respect to `params`, summed
    over the batches."""
    grads = {n: torch.zeros_like(p) for n, p in params.items()}
    for x, y in batches():
        g = torch.autograd.grad(F.cross_entropy(model(x) / temperature, y), list(params.values()))
        for n, gi in zip(params, g):
            grads[n] += gi
    return grads


class _ScoredThroughModel(Pruner):
    """Scores taken through the model in the mode its reference code scores in (`train_mode`:
    batch statistics and dropout, or eval mode: running statistics, no dropout), leaving the
    model as it was: every module's mode, its buffers (batch-norm running statistics) and the
    parameters' `.grad`."""

    name = ""
    train_mode = False

    def scores(self, masks, layers, context: Context) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def prune(self, masks, target, layers, scope, generator=None, context=None) -> None:
        context = _needs(context, self.name)
        model = context.model
        masks.apply()
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        modes = {m: m.training for m in model.modules()}  # per module: a model may mix modes
        model.train(self.train_mode)
        try:
            scores = self.scores(masks, layers, context)
        finally:
            for m, training in modes.items():
                m.training = training
            with torch.no_grad():
                for n, b in model.named_buffers():
                    b.copy_(buffers[n])
        masks.prune_scores(target, scores, layers, scope)


class Snip(_ScoredThroughModel):
    """SNIP (Lee et al. 2019): connection sensitivity |∂L/∂w ⊙ w| on training batches, in eval
    mode, as the authors' code scores (namhoonlee/snip-public's prune.py feeds `is_train: False`)
    and as Synaptic-Flow's prune loop does by default."""

    name = "snip"
    train_mode = False

    def scores(self, masks, layers, context):
        weights = {n: masks.weights[n] for n in layers}
        grads = _gradients(context.model, context.batches, weights)
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
    train_mode = True
    temperature = 200.0

    def scores(self, masks, layers, context):
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


class Synflow(Pruner):
    """SynFlow (Tanaka et al. 2020), data-free: with every parameter replaced by its absolute
    value, R = Σ f(𝟙) for an all-ones input, and a weight's score is |θ ⊙ ∂R/∂θ|. Pruned over
    `synflow_iters` rounds, the density falling exponentially (d₀·(d/d₀)^(k/n) in round k), each
    round rescoring the surviving weights: this is what avoids layer collapse. Computed in float64
    (R overflows float32 in deep networks) on a copy of the model in eval mode, whose
    floating-point buffers (batch-norm running statistics) are made absolute too: the reference
    (Synaptic-Flow's `linearize`) takes |·| of the whole state_dict, in its prune loop's default
    eval mode."""

    name = "synflow"
    train_mode = False

    def prune(self, masks, target, layers, scope, generator=None, context=None) -> None:
        context = _needs(context, self.name)
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


class NM(Pruner):
    """N:M semi-structured sparsity: in every group of M consecutive input weights the N of
    largest magnitude survive. The target is 1 − N/M (the spec refuses any other).

    `schedule.remove` makes the pattern real where hardware runs it: on a CUDA GPU of compute
    capability 8.0 or newer, the 2:4 linear layers are converted to sparse semi-structured tensors
    and timed against the dense model (`semistructured.py`); elsewhere it does nothing."""

    name = "l1_nm"

    def prune(self, masks, target, layers, scope, generator=None, context=None) -> None:
        n, m = _needs(context, self.name).n_m
        masks.prune_nm(n, m, layers, {name: masks.weights[name].detach().abs() for name in layers})

    def layers(self, model, selected, schedule) -> list[str]:
        """The selected layers whose input dimension splits into groups of M (`sparsity` counts
        them); the others (a first conv on 1 or 3 channels) stay dense."""
        # imported here: masks imports structured, which imports this module
        from prunetune.pruning.masks import nm_compatible

        m = schedule.n_m[1]
        modules = dict(model.named_modules())
        fits = [n for n in selected if nm_compatible(modules[n].weight, m)]
        if not fits:
            raise UserError(f"schedule.n_m: no selected layer has an input dimension divisible by M={m} "
                            f"(selected: {', '.join(selected)})")
        return fits

    def final_metrics(self, trial) -> dict:
        """`nm_valid` (1 when every group of the selected layers holds the pattern), and with
        `schedule.remove` the semi-structured latencies where the device runs them."""
        from prunetune.pruning.masks import nm_valid

        n, m = trial.spec.schedule.n_m
        out = {"nm_valid": float(all(nm_valid(trial.masks.weights[x], n, m) for x in trial.selected))}
        if trial.spec.schedule.remove:
            out.update(semi_structured_speedup(trial.model, trial.example, trial.selected, (n, m)))
        return out


snip, grasp, synflow, l1_nm = Snip(), Grasp(), Synflow(), NM()
