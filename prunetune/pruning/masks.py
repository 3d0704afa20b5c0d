"""Binary masks over the prunable weights (conv and linear `weight` tensors).

Contract: a prune reaches its target exactly (to one weight), masks only ever shrink, and pruned
weights stay exactly zero through every optimiser step (momentum and weight decay included).
Masks knows no criterion: a criterion (`criteria/`) scores and calls `prune_scores`, or sets the
masks with its own arithmetic.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Sequence

import torch
from torch import nn

from prunetune.pruning.allocation import Allocation, lamp_scores, rounded_counts

if TYPE_CHECKING:
    from prunetune.pruning.structured import Group


class Masks:
    """Masks for the named prunable layers of one model; True = weight kept.

    With channel `groups` (structured pruning, see `structured.py`), a structured criterion prunes
    whole group channels: every slice of the group is masked, biases and batch norms included
    (those extra tensors are masked too, but only the layers' weights count in `sparsity`).
    """

    def __init__(self, model: nn.Module, layer_names: Sequence[str], groups: "list[Group] | None" = None,
                 selected: Sequence[str] | None = None, allocation: Allocation | None = None):
        """`selected`: the layers the schedule prunes (`schedule.layers`; default all), over which
        `sparsity()` counts; `allocation`: how a prune shares its target among them (scopes layer
        and erk: see `allocation.py`; default each layer alike)."""
        modules = dict(model.named_modules())
        self.selected = list(selected if selected is not None else layer_names)
        self.allocation = allocation or Allocation("layer")
        self.weights: dict[str, torch.Tensor] = {n: modules[n].weight for n in layer_names}
        self.masks: dict[str, torch.Tensor] = {
            n: torch.ones_like(w, dtype=torch.bool) for n, w in self.weights.items()}
        self.groups = groups or []
        self.channels_kept = [torch.ones(g.channels, dtype=torch.bool) for g in self.groups]
        # group members other than the layers' weights: biases, batch-norm scales and shifts
        params = dict(model.named_parameters())
        weight_of = {f"{n}.weight": n for n in layer_names}
        self.extra: dict[str, torch.Tensor] = {
            m.param: params[m.param] for g in self.groups for m in g.members if m.param not in weight_of}
        self.extra_masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in self.extra.items()}
        # a member parameter's mask
        self._mask_of = {**{p: self.masks[n] for p, n in weight_of.items()}, **self.extra_masks}

    def _tensors(self):
        """(tensor, mask) of everything masked."""
        for n, w in self.weights.items():
            yield w, self.masks[n]
        for n, p in self.extra.items():
            yield p, self.extra_masks[n]

    # -- pruning -------------------------------------------------------------------------------
    def prune(self, target: float, criterion, layers: Iterable[str] | None = None,
              scope: str = "global", generator: torch.Generator | None = None, context=None) -> None:
        """Prune `layers` (default all) until `target` of their weights are zero, by `criterion`
        (any criterion of `registry.CRITERIA`; see `criteria/`). scope "global": one
        threshold over all the layers together; "layer": each layer alike. Weights already pruned
        stay pruned (they count towards the target). `context`: what data-driven and model-driven
        criteria score with (`criteria.Context`)."""
        names = list(self.weights) if layers is None else list(layers)
        criterion.prune(self, target, names, scope, generator, context)

    def prune_scores(self, target: float, scores: dict[str, torch.Tensor], layers: Sequence[str],
                     scope: str = "global") -> None:
        """Zero the lowest-scoring weights of `layers` until `target` of them are zero, shared
        among the layers by `scope` (see `allocation.py`): "global" one threshold over them,
        "lamp" one threshold over their LAMP scores, "layer" and "erk" each layer to its own
        count (`self.allocation`)."""
        names = list(layers)
        total = sum(self.masks[n].numel() for n in names)
        if scope in ("global", "lamp"):
            if scope == "lamp":
                scores = lamp_scores({n: scores[n].float().masked_fill(~self.masks[n], 0) for n in names})
            self._prune_group(names, scores, round(target * total))
        else:
            counts = self.layer_counts(target, names, scope)
            for n in names:
                self._prune_group([n], scores, counts[n])
        self.apply()

    def layer_counts(self, target: float, names: Sequence[str], scope: str) -> dict[str, int]:
        """How many weights of each of `names` a prune to `target` leaves zero, each layer to its
        own count (`self.allocation` for scopes layer and erk; global: each layer alike, the counts
        rounded to add up to the target; lamp: as many as one threshold over the LAMP scores of
        the weights' magnitudes takes from it): for criteria that compare weights within a layer."""
        sizes = {n: self.weights[n].numel() for n in names}
        if scope == "global":  # each layer alike, together the target to one weight
            return rounded_counts(dict.fromkeys(names, target), sizes, round(target * sum(sizes.values())))
        if scope == "lamp":  # LAMP's counts: one threshold over the LAMP scores of the magnitudes
            scores = lamp_scores({n: self.weights[n].detach().abs().float().masked_fill(~self.masks[n], 0)
                                  for n in names})
            flat = torch.cat([scores[n].flatten().masked_fill(~self.masks[n].flatten(), -1.0) for n in names])
            drop = torch.topk(flat, round(target * flat.numel()), largest=False, sorted=False).indices
            owner = torch.repeat_interleave(torch.arange(len(names)), torch.tensor([sizes[n] for n in names]))
            return dict(zip(names, torch.bincount(owner[drop], minlength=len(names)).tolist()))
        shapes = {n: tuple(self.weights[n].shape) for n in dict.fromkeys(self.selected + list(names))}
        allocation = self.allocation
        if scope == "erk" and allocation.scope != "erk":  # masks made without the schedule's
            allocation = Allocation("erk", target)
        return allocation.counts(target, shapes)

    def _prune_group(self, names: list[str], scores: dict[str, torch.Tensor], k: int) -> None:
        """Leave the `k` lowest-scoring weights of `names` zero (those already pruned first)."""
        flat_scores = torch.cat([
            scores[n].flatten().float().masked_fill(~self.masks[n].flatten(), float("-inf")) for n in names])
        if k <= 0:
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

    def shuffle(self, layers: Sequence[str], generator: torch.Generator | None = None) -> None:
        """Permute each layer's mask at random: the same density per layer, other places (the
        sanity check of Frankle et al. 2021). Weights unmasked by it keep their values (zero if
        they were pruned): a rewind or re-initialisation gives them theirs."""
        for name in layers:
            mask = self.masks[name]
            perm = torch.randperm(mask.numel(), generator=generator).to(mask.device)
            mask.copy_(mask.flatten()[perm].view_as(mask))
        self.apply()

    def mask_channels(self) -> None:
        """Mask every member slice of the group channels `channels_kept` marks pruned."""
        for g, kept in zip(self.groups, self.channels_kept):
            for m in g.members:
                mask = self._mask_of[m.param]
                pruned = m.index[~kept[m.channel]].to(mask.device)
                mask.index_fill_(m.dim, pruned, False)

    def channel_sparsity(self) -> float:
        """Fraction of the groups' channels pruned."""
        total = sum(g.channels for g in self.groups)
        return sum(int((~k).sum()) for k in self.channels_kept) / total if total else 0.0

    def release(self) -> None:
        """Make every weight trainable again (dense-sparse-dense); pruned ones restart at zero."""
        for _, mask in self._tensors():
            mask.fill_(True)
        for kept in self.channels_kept:
            kept.fill_(True)

    # -- keeping zeros zero -----------------------------------------------------------------
    @torch.no_grad()
    def apply(self) -> None:
        """Zero the pruned weights."""
        for w, mask in self._tensors():
            w.mul_(mask)

    @torch.no_grad()
    def mask_grads(self) -> None:
        """Zero the gradients of pruned weights, so optimiser state (momentum, Adam moments) for
        them stays zero and a later release (DSD) starts them from rest."""
        for w, mask in self._tensors():
            if w.grad is not None:
                w.grad.mul_(mask)

    @torch.no_grad()
    def mask_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        """Zero optimiser state (momentum buffers, Adam moments) of pruned weights."""
        for w, mask in self._tensors():
            for value in optimizer.state.get(w, {}).values():
                if torch.is_tensor(value) and value.shape == w.shape:
                    value.mul_(mask)

    # -- counting ------------------------------------------------------------------------------
    def sparsity(self, layers: Iterable[str] | None = None) -> float:
        """Fraction of zero weights over `layers` (by default the selected layers: the target's
        own denominator, so a prune to 0.9 reads 0.9 to one weight)."""
        names = self.selected if layers is None else list(layers)
        total = sum(self.weights[n].numel() for n in names)
        zeros = sum(int((self.weights[n] == 0).sum()) for n in names)
        return zeros / total if total else 0.0

    def model_sparsity(self) -> float:
        """Fraction of zero weights over all prunable layers."""
        return self.sparsity(self.weights)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {n: m.clone().cpu() for n, m in {**self.masks, **self.extra_masks}.items()}
        state.update({f"#channels{i}": k.clone() for i, k in enumerate(self.channels_kept)})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for n, m in state.items():
            if n.startswith("#channels"):
                self.channels_kept[int(n.removeprefix("#channels"))].copy_(m)
            else:
                (self.masks if n in self.masks else self.extra_masks)[n].copy_(m)
        self.apply()


def layer_sparsity_rows(model: nn.Module, layer_names: Sequence[str],
                        targets: dict[str, float] | None = None) -> list[dict]:
    """One row per prunable layer: name, shape, weights, non-zero weights, sparsity, and its
    target where it has one of its own (`targets`: scopes layer and erk)."""
    modules = dict(model.named_modules())
    rows = []
    for n in layer_names:
        w = modules[n].weight.detach()
        nonzero = int((w != 0).sum())
        rows.append({"layer": n, "type": type(modules[n]).__name__, "shape": "x".join(map(str, w.shape)),
                     "params": w.numel(), "nonzero": nonzero,
                     "target": "" if targets is None or n not in targets else targets[n],
                     "sparsity": 1 - nonzero / w.numel()})
    return rows
