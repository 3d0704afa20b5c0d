"""How much of each layer: `schedule.scope` and `schedule.layer_sparsity`.

- `global`: one threshold over the selected layers' scores;
- `layer`: each layer to the target, or to its own (`layer_sparsity`: {"<module glob>": value});
- `erk`: Erdős–Rényi-Kernel densities (Evci et al. 2020, google-research/rigl's `get_sparsities`):
  a layer's density proportional to (sum of its weight's dimensions) / (their product), a layer
  whose density would exceed 1 kept dense and the rest rescaled, the largest first, one pass at a
  time; the criterion's scores choose which weights go within each layer;
- `lamp`: LAMP scores (Lee et al. 2021, jaeho-lee/layer-adaptive-sparsity): a score s (|w| for
  magnitude) becomes s² over the sum of s'² of the weights of its layer ranked at or above it, and
  one threshold over those decides. Criteria that choose weights within a layer (wanda, sparsegpt)
  take from each layer as many weights as that threshold over the magnitudes' LAMP scores does.

Per-layer targets (`layer`, `erk`) are the targets at the schedule's final `sparsity`; a prune on
the way there (an iterative step, a gradual event) takes each layer the same fraction of the way,
T_i · t / sparsity, so a layer's mask only shrinks and the selected layers together reach t.
With `erk` the per-layer counts are rounded so that they add up to the overall target exactly
(to one weight), where rigl floors each layer's count. Torch-free except `lamp_scores`.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

SCOPES = ("global", "layer", "erk", "lamp")


def erk_densities(shapes: dict[str, tuple[int, ...]], sparsity: float) -> dict[str, float]:
    """Each layer's density under ERK so that the layers keep (1 − sparsity) of their weights
    together. As rigl: raw_i = sum(shape_i) / prod(shape_i); while the largest raw · ε exceeds 1,
    the layers with that largest raw are made dense (ε recomputed without them)."""
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    raw = {n: sum(s) / sizes[n] for n, s in shapes.items()}
    keep = (1.0 - sparsity) * sum(sizes.values())
    dense: set[str] = set()
    while True:
        rest = [n for n in shapes if n not in dense]
        if not rest:
            return dict.fromkeys(shapes, 1.0)
        eps = (keep - sum(sizes[n] for n in dense)) / sum(raw[n] * sizes[n] for n in rest)
        largest = max(raw[n] for n in rest)
        if largest * eps <= 1:
            return {n: 1.0 if n in dense else eps * raw[n] for n in shapes}
        dense |= {n for n in rest if raw[n] == largest}


def rounded_counts(fractions: dict[str, float], sizes: dict[str, int], total: int) -> dict[str, int]:
    """Per-layer counts near fraction · size that add up to `total` (largest remainders)."""
    exact = {n: fractions[n] * sizes[n] for n in fractions}
    counts = {n: min(sizes[n], math.floor(v)) for n, v in exact.items()}
    order = sorted(exact, key=lambda n: (counts[n] - exact[n], n))  # largest remainder first
    for n in order[:max(0, total - sum(counts.values()))]:
        counts[n] += 1
    return counts


def matching(globs: dict[str, float], layers: list[str]) -> dict[str, str]:
    """Layer → the `layer_sparsity` glob that names it (module names, fnmatch)."""
    return {n: g for n in layers for g in globs if fnmatch.fnmatchcase(n, g)}


def check_globs(globs: dict[str, float], layers: list[str]) -> str | None:
    """Why `schedule.layer_sparsity` cannot apply to these prunable `layers`: a glob that matches
    none, or a layer two globs match; None when it can."""
    for g in globs:
        if not any(fnmatch.fnmatchcase(n, g) for n in layers):
            return (f"schedule.layer_sparsity: {g!r} matches no prunable layer; the model's are: "
                    f"{', '.join(layers)}")
    for n in layers:
        both = [g for g in globs if fnmatch.fnmatchcase(n, g)]
        if len(both) > 1:
            return f"schedule.layer_sparsity: {both[0]!r} and {both[1]!r} both match layer {n}; make them disjoint"
    return None


@dataclass
class Allocation:
    """How a trial's prunes share a target among the layers (see the module's text): `scope`,
    the schedule's final `sparsity`, and the `layer_sparsity` globs."""

    scope: str = "global"
    sparsity: float = 0.0
    layer_sparsity: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, schedule) -> Allocation:
        return cls(schedule.scope, schedule.sparsity, dict(schedule.layer_sparsity))

    def final_targets(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, float]:
        """Each layer's target at the schedule's final sparsity."""
        if self.scope == "erk":
            return {n: 1.0 - d for n, d in erk_densities(shapes, self.sparsity).items()}
        named = matching(self.layer_sparsity, list(shapes))
        return {n: float(self.layer_sparsity[named[n]]) if n in named else self.sparsity for n in shapes}

    def counts(self, target: float, shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
        """How many weights of each layer a prune to overall `target` leaves zero (scopes layer
        and erk)."""
        sizes = {n: math.prod(s) for n, s in shapes.items()}
        if self.scope != "erk" and not self.layer_sparsity:
            return {n: round(target * sizes[n]) for n in shapes}  # each layer alike, as ever
        fraction = target / self.sparsity if self.sparsity > 0 else 0.0
        final = self.final_targets(shapes)
        fractions = {n: min(1.0, final[n] * fraction) for n in shapes}
        if self.scope == "erk":
            return rounded_counts(fractions, sizes, round(target * sum(sizes.values())))
        return {n: round(fractions[n] * sizes[n]) for n in shapes}


def lamp_scores(scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LAMP: within each layer, s² divided by the sum of s'² over the weights ranked at or above it
    (sorted ascending, stably: of two equal scores the first in the layer's order is ranked lower,
    as the reference's sort does). Weights already pruned must score 0 (they rank lowest)."""
    import torch

    out = {}
    for n, s in scores.items():
        sq = s.detach().double().flatten() ** 2
        order = torch.sort(sq, stable=True).indices
        ranked = sq[order]
        above = ranked.flip(0).cumsum(0).flip(0)  # the sum from each rank to the top
        lamp = torch.empty_like(sq)
        lamp[order] = ranked / above.clamp_min(1e-300)
        out[n] = lamp.view_as(s)
    return out
