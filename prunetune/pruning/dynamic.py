"""Sparse training from scratch: the mask moves while the network trains (schedule.method rigl, set).

Every `update_every` optimiser steps of the sparse training, until `update_until` of it, each
layer drops the fraction α_t of its active weights with the smallest magnitude and grows as many
inactive ones (Evci et al. 2020, Algorithm 1; Mocanu et al. 2018):

    α_t = drop_fraction · ½ (1 + cos(π t / T_end)),   n_drop = floor(α_t · active)

- RigL grows where |dense gradient| of the current batch is largest, SET at random.
- The arithmetic follows google-research/rigl's `SparseRigLOptimizer` (`_get_update_op`): the drop
  keeps the `active − n_drop` largest magnitudes; the grow ranks every position the drop did not
  keep (a weight just dropped may be grown again, and then keeps its value, as the reference's
  `reinit_when_same=False`); a newly grown weight starts at zero with its optimiser state
  (momentum, Adam moments) zeroed.
- Deliberate differences: the reference adds N(0, 1e-5) noise to the drop scores to break ties;
  here ties go to the lower index (a stable sort), so a trial is a function of its seed alone. The
  reference's first update follows the first step; here updates follow steps ΔT, 2ΔT, … (the
  paper's `t mod ΔT = 0`).
- The update happens after the optimiser step, on the weights it left; the gradient is the one
  that step used. A layer keeps its number of active weights: sparsity is exact at every step.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

RULES = ("gradient", "random")  # rigl, set


def drop_fraction_at(alpha: float, t: int, t_end: int) -> float:
    """The fraction of a layer's active weights an update at step `t` drops: `alpha` decayed by a
    cosine to zero at `t_end` (the reference's `cosine_decay(alpha, t, t_end)`)."""
    if t_end <= 0:
        return 0.0
    return alpha * 0.5 * (1 + math.cos(math.pi * min(t, t_end) / t_end))


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """A boolean mask of the `k` largest `scores` (flat), ties to the lower index."""
    chosen = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        order = torch.sort(scores.flatten(), descending=True, stable=True).indices
        chosen[order[:k]] = True
    return chosen


def update_layer(mask: torch.Tensor, weight: torch.Tensor, grow_scores: torch.Tensor,
                 fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's drop and grow. Returns (the new mask, the newly active positions), both shaped
    like `mask`; the number of active weights is unchanged."""
    flat = mask.flatten()
    active = int(flat.sum())
    n_drop = int(active * fraction)  # the reference casts to int: floor
    magnitude = weight.detach().abs().flatten().float().masked_fill(~flat, float("-inf"))
    kept = _top(magnitude, active - n_drop)
    grow = grow_scores.flatten().float().masked_fill(kept, float("-inf"))
    grown = _top(grow, n_drop)
    new = kept | grown
    return new.view_as(mask), (grown & ~flat).view_as(mask)


class Regrowth:
    """The mask updates of one sparse training run over `layers` of `masks` (a `Masks`).

    `rule`: "gradient" (RigL) or "random" (SET). Steps count from the start of the sparse
    training (`start_step`, a global optimiser step); updates at steps ΔT, 2ΔT, … below `end_step`
    steps. Call `due(step)` after each backward pass with the step about to complete; if due,
    `capture()` before the gradients are masked and `update(step, optimizer)` after the step."""

    def __init__(self, masks, layers: Sequence[str], rule: str, update_every: int, drop_fraction: float,
                 start_step: int, end_step: int, seed: int):
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
        self.masks, self.layers, self.rule = masks, list(layers), rule
        self.update_every, self.drop_fraction = update_every, drop_fraction
        self.start_step, self.end_step, self.seed = start_step, end_step, seed
        self.updates = 0  # updates done (the resume state holds it)
        self.regrown_epoch = 0  # weights newly grown since the last epoch's report
        self._grads: dict[str, torch.Tensor] = {}

    def due(self, global_step: int) -> bool:
        t = global_step - self.start_step
        return t > 0 and t % self.update_every == 0 and t < self.end_step

    def capture(self) -> None:
        """Keep |dense gradient| of each layer (RigL): the positions the mask zeroes too."""
        if self.rule == "gradient":
            self._grads = {n: self.masks.weights[n].grad.detach().abs().clone() for n in self.layers}

    def _grow_scores(self, name: str, update: int) -> torch.Tensor:
        if self.rule == "gradient":
            return self._grads[name]
        weight = self.masks.weights[name]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + 7 * update + self.layers.index(name))
        return torch.rand(weight.shape, generator=generator).to(weight.device)

    @torch.no_grad()
    def update(self, global_step: int, optimizer: torch.optim.Optimizer | None) -> int:
        """Drop and grow every layer; returns the number of weights newly grown."""
        fraction = drop_fraction_at(self.drop_fraction, global_step - self.start_step, self.end_step)
        total = 0
        for name in self.layers:
            mask, weight = self.masks.masks[name], self.masks.weights[name]
            new_mask, grown = update_layer(mask, weight, self._grow_scores(name, self.updates), fraction)
            mask.copy_(new_mask)
            weight.masked_fill_(grown, 0.0)
            for value in (optimizer.state.get(weight, {}).values() if optimizer is not None else ()):
                if torch.is_tensor(value) and value.shape == weight.shape:
                    value.masked_fill_(grown, 0.0)
            total += int(grown.sum())
        self.masks.apply()
        self._grads = {}
        self.updates += 1
        self.regrown_epoch += total
        return total

    def epoch_metrics(self) -> dict[str, int]:
        """The epoch's `regrown` (weights newly grown in it), and start the next epoch's count."""
        regrown, self.regrown_epoch = self.regrown_epoch, 0
        return {"regrown": regrown}

    def state_dict(self) -> dict[str, int]:
        return {"updates": self.updates, "regrown_epoch": self.regrown_epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.updates, self.regrown_epoch = int(state["updates"]), int(state["regrown_epoch"])


def for_phase(spec, masks, layers: Sequence[str], steps_per_epoch: int, start_clock: float, epochs: float,
              state: dict | None = None) -> Regrowth | None:
    """The mask updates of a sparse training phase of `epochs` starting at epoch `start_clock`
    (None where `spec`'s method keeps its mask), continuing a checkpoint's `state` if given."""
    from prunetune.pruning.schedules import METHODS

    s = spec.schedule
    rule = METHODS[s.method].regrowth
    if rule is None:
        return None
    start = round(start_clock * steps_per_epoch)
    steps = round((start_clock + epochs) * steps_per_epoch) - start
    regrowth = Regrowth(masks, layers, rule, s.update_every, s.drop_fraction, start,
                        math.floor(s.update_until * steps), spec.seed)
    if state is not None:
        regrowth.load_state_dict(state)
    return regrowth
