"""Binary masks over the prunable weights (conv and linear `weight` tensors).

Contract: a prune reaches its target exactly (to one weight), masks only ever shrink, and pruned
weights stay exactly zero through every optimiser step (momentum and weight decay included).
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
from torch import nn

ScoreFn = Callable[[torch.Tensor, "torch.Generator | None"], torch.Tensor]


class Masks:
    """Masks for the named prunable layers of one model; True = weight kept."""

    def __init__(self, model: nn.Module, layer_names: Sequence[str]):
        modules = dict(model.named_modules())
        self.weights: dict[str, torch.Tensor] = {n: modules[n].weight for n in layer_names}
        self.masks: dict[str, torch.Tensor] = {
            n: torch.ones_like(w, dtype=torch.bool) for n, w in self.weights.items()}

    # -- pruning -------------------------------------------------------------------------------
    def prune(self, target: float, score_fn: ScoreFn, layers: Iterable[str] | None = None,
              scope: str = "global", generator: torch.Generator | None = None) -> None:
        """Zero the lowest-scoring weights until `target` of `layers` are zero.

        scope "global": one threshold over all the layers together; "layer": each layer alike.
        Weights already pruned stay pruned (they count towards the target).
        """
        names = list(self.weights) if layers is None else list(layers)
        scores = {n: score_fn(self.weights[n], generator) for n in names}
        groups = [names] if scope == "global" else [[n] for n in names]
        for group in groups:
            self._prune_group(group, scores, target)
        self.apply()

    def _prune_group(self, names: list[str], scores: dict[str, torch.Tensor], target: float) -> None:
        flat_scores = torch.cat([
            scores[n].flatten().float().masked_fill(~self.masks[n].flatten(), float("-inf")) for n in names])
        k = round(target * flat_scores.numel())
        if k == 0:
            return
        # Pruned weights score -inf, so they are taken first: they count towards the target and a
        # mask can only shrink.
        drop = torch.topk(flat_scores, k, largest=False, sorted=False).indices
        keep = torch.ones_like(flat_scores, dtype=torch.bool)
        keep[drop] = False
        offset = 0
        for n in names:
            size = self.masks[n].numel()
            self.masks[n] &= keep[offset:offset + size].view_as(self.masks[n])
            offset += size

    def release(self) -> None:
        """Make every weight trainable again (dense-sparse-dense); pruned ones restart at zero."""
        for n in self.masks:
            self.masks[n].fill_(True)

    # -- keeping zeros zero -----------------------------------------------------------------
    @torch.no_grad()
    def apply(self) -> None:
        """Zero the pruned weights."""
        for n, w in self.weights.items():
            w.mul_(self.masks[n])

    @torch.no_grad()
    def mask_grads(self) -> None:
        """Zero the gradients of pruned weights, so optimiser state (momentum, Adam moments) for
        them stays zero and a later release (DSD) starts them from rest."""
        for n, w in self.weights.items():
            if w.grad is not None:
                w.grad.mul_(self.masks[n])

    @torch.no_grad()
    def mask_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        """Zero optimiser state (momentum buffers, Adam moments) of pruned weights."""
        for n, w in self.weights.items():
            for value in optimizer.state.get(w, {}).values():
                if torch.is_tensor(value) and value.shape == w.shape:
                    value.mul_(self.masks[n])

    # -- counting ------------------------------------------------------------------------------
    def sparsity(self, layers: Iterable[str] | None = None) -> float:
        """Fraction of zero weights over `layers` (all prunable layers by default)."""
        names = list(self.weights) if layers is None else list(layers)
        total = sum(self.weights[n].numel() for n in names)
        zeros = sum(int((self.weights[n] == 0).sum()) for n in names)
        return zeros / total if total else 0.0

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: m.clone().cpu() for n, m in self.masks.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for n, m in state.items():
            self.masks[n].copy_(m)
        self.apply()


def layer_sparsity_rows(model: nn.Module, layer_names: Sequence[str]) -> list[dict]:
    """One row per prunable layer: name, shape, weights, non-zero weights, sparsity."""
    modules = dict(model.named_modules())
    rows = []
    for n in layer_names:
        w = modules[n].weight.detach()
        nonzero = int((w != 0).sum())
        rows.append({"layer": n, "type": type(modules[n]).__name__, "shape": "x".join(map(str, w.shape)),
                     "params": w.numel(), "nonzero": nonzero, "sparsity": 1 - nonzero / w.numel()})
    return rows
