"""Criteria that score each weight from its own tensor: `l1_unstructured` (|w|, as
torch.nn.utils.prune.L1Unstructured) and `random` (uniform random scores, seeded per trial: the
random-pruning baseline)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from prunetune.pruning.criteria.base import Criterion

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class WeightScore(Criterion):
    """A criterion scoring each weight from its own tensor: `fn(weight, generator) → scores`."""

    fn: Callable[..., torch.Tensor]

    def __call__(self, weight: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.fn(weight, generator)

    def prune(self, masks, target, layers, scope, generator=None, context=None) -> None:
        masks.prune_scores(target, {n: self.fn(masks.weights[n], generator) for n in layers}, layers, scope)


def _magnitude(weight: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    return weight.detach().abs()


def _random(weight: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    import torch

    return torch.rand(weight.shape, generator=generator, device="cpu").to(weight.device)


l1_unstructured = WeightScore(_magnitude)
random_scores = WeightScore(_random)
