"""Linear CKA between layers (Kornblith et al. 2019), with the minibatch estimator built on the
unbiased HSIC (Song et al. 2012; Nguyen, Raghu & Kornblith 2021).

Every layer's Gram matrix is formed once per batch, on the features' device, and the HSIC of all
layer pairs comes from one matrix product of the flattened Grams: O(n²) inner products per pair,
never `trace(K @ L)` (O(n³)) one pair at a time.

Precision: each batch's features are first centred (in float64; HSIC, biased and unbiased, is
unchanged by a shift of the features, and so is CKA), then the Grams are formed in the features'
own dtype (float32 in, as torch-cka runs: the O(n²·D) part), and the HSIC terms are accumulated in
float64. Centring first keeps the Gram entries on the scale of the features' variation, so a
layer with a large offset loses nothing to rounding, and the check for constant layers compares
like with like. `dtype=torch.float64` forces float64 throughout.

    cka_matrix(feats_a, feats_b=None, batch_size=None, dtype=None) -> [len(a), len(b)] float64 tensor
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["cka_matrix", "CKAAccumulator"]

MIN_BATCH = 4  # the unbiased HSIC divides by n(n − 3)


def _grams(feats: Sequence[torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
    """[L, n, n] linear-kernel Gram matrices of the layers' centred features, formed in `dtype`
    (default: each tensor's own floating dtype) and returned in float64."""
    grams = []
    for x in feats:
        x = x.reshape(x.shape[0], -1)
        gram_dtype = dtype or (x.dtype if x.is_floating_point() else torch.float32)
        x64 = x.to(torch.float64)
        centred = (x64 - x64.mean(dim=0, keepdim=True)).to(gram_dtype)
        grams.append((centred @ centred.T).to(torch.float64))
    return torch.stack(grams)


def _center(grams: torch.Tensor) -> torch.Tensor:
    """H K H for every Gram (H the centering matrix), without forming H."""
    grams = grams - grams.mean(dim=1, keepdim=True)
    return grams - grams.mean(dim=2, keepdim=True)


def hsic_biased(grams_a: torch.Tensor, grams_b: torch.Tensor) -> torch.Tensor:
    """[La, Lb] biased HSIC, tr(K H L H) / (n − 1)², for all pairs at once."""
    n = grams_a.shape[-1]
    ca = _center(grams_a).flatten(1)
    cb = _center(grams_b).flatten(1)
    return (ca @ cb.T) / (n - 1) ** 2


def hsic_unbiased(grams_a: torch.Tensor, grams_b: torch.Tensor) -> torch.Tensor:
    """[La, Lb] unbiased HSIC (Song et al. 2012) for all pairs at once:

    1/(n(n−3)) · [ tr(K̃L̃) + (1ᵀK̃1)(1ᵀL̃1)/((n−1)(n−2)) − 2/(n−2) · 1ᵀK̃L̃1 ], K̃ = K with a zero diagonal.
    tr(K̃L̃) is the inner product of the flattened Grams; 1ᵀK̃L̃1 that of their row sums.
    """
    n = grams_a.shape[-1]
    ka = grams_a - torch.diag_embed(torch.diagonal(grams_a, dim1=1, dim2=2))
    kb = grams_b - torch.diag_embed(torch.diagonal(grams_b, dim1=1, dim2=2))
    trace = ka.flatten(1) @ kb.flatten(1).T
    rows_a, rows_b = ka.sum(dim=2), kb.sum(dim=2)  # [L, n]
    sums = torch.outer(rows_a.sum(dim=1), rows_b.sum(dim=1))
    cross = rows_a @ rows_b.T
    return (trace + sums / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * cross) / (n * (n - 3))


class CKAAccumulator:
    """Accumulates minibatch HSIC sums, so activations need not all be kept in memory.

    Call `update(feats_a, feats_b)` once per batch (the same samples through both lists), then
    `result()`. CKA = mean HSIC(K, L) / sqrt(mean HSIC(K, K) · mean HSIC(L, L)) (Nguyen et al.).
    With `unbiased=False` and a single batch of all samples this is Kornblith et al.'s linear CKA.
    """

    def __init__(self, unbiased: bool = True, dtype: torch.dtype | None = None):
        """`dtype`: the precision of the Gram matrices (default: the features'); HSIC terms are
        always accumulated in float64."""
        self.unbiased, self.dtype = unbiased, dtype
        self.cross = self.self_a = self.self_b = self.scale_a = self.scale_b = None
        self.batches = 0

    def update(self, feats_a: Sequence[torch.Tensor], feats_b: Sequence[torch.Tensor] | None = None) -> None:
        _check(feats_a, feats_b)
        n = feats_a[0].shape[0]
        if n < MIN_BATCH:
            raise ValueError(f"CKA needs batches of at least {MIN_BATCH} samples (got {n})")
        hsic = hsic_unbiased if self.unbiased else hsic_biased
        grams_a = _grams(feats_a, self.dtype)
        grams_b = grams_a if feats_b is None else _grams(feats_b, self.dtype)
        cross = hsic(grams_a, grams_b)
        self_a = torch.diagonal(cross) if feats_b is None else _self_hsic(hsic, grams_a)
        self_b = self_a if feats_b is None else _self_hsic(hsic, grams_b)
        scale_a = grams_a.flatten(1).square().mean(1)
        scale_b = scale_a if feats_b is None else grams_b.flatten(1).square().mean(1)
        if self.cross is None:
            self.cross, self.self_a, self.self_b = cross, self_a.clone(), self_b.clone()
            self.scale_a, self.scale_b = scale_a, scale_b
        else:
            self.cross += cross
            self.self_a += self_a
            self.self_b += self_b
            self.scale_a += scale_a
            self.scale_b += scale_b
        self.batches += 1

    def result(self) -> torch.Tensor:
        """The [La, Lb] CKA matrix (float64). A layer with constant activations (zero self-HSIC)
        has CKA 0 with every layer rather than NaN; a nearly constant one (5 + small noise) is an
        ordinary layer: CKA ignores offsets."""
        if self.cross is None:
            raise ValueError("CKA of no batch")
        # A layer is degenerate when its self-HSIC vanishes against the size of its own (centred)
        # Gram entries: constant activations give a zero centred Gram.
        flat_a = self.self_a <= 1e-6 * self.scale_a
        flat_b = self.self_b <= 1e-6 * self.scale_b
        degenerate = flat_a[:, None] | flat_b[None, :]
        denom = torch.sqrt(torch.where(degenerate, 1.0, torch.outer(self.self_a, self.self_b)))
        return torch.where(degenerate, torch.zeros_like(self.cross), self.cross / denom)


def _self_hsic(hsic, grams: torch.Tensor) -> torch.Tensor:
    """HSIC(K, K) for each layer alone: the diagonal, without the L×L product."""
    return torch.stack([hsic(g[None], g[None])[0, 0] for g in grams])


def _check(feats_a, feats_b) -> None:
    if not feats_a:
        raise ValueError("feats_a is empty: give one activation tensor per layer")
    n = feats_a[0].shape[0]
    for name, feats in (("feats_a", feats_a), ("feats_b", feats_b or [])):
        for i, x in enumerate(feats):
            if x.shape[0] != n:
                raise ValueError(f"{name}[{i}] has {x.shape[0]} samples but feats_a[0] has {n}: "
                                 "every layer must see the same samples")


def cka_matrix(feats_a: Sequence[torch.Tensor], feats_b: Sequence[torch.Tensor] | None = None,
               batch_size: int | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Linear CKA of every layer in `feats_a` against every layer in `feats_b` (or `feats_a`).

    Each tensor is `[n, ...]` (flattened per sample); all have the same n. `batch_size=None`:
    CKA over all n samples with the biased HSIC (Kornblith et al. 2019). An integer: the unbiased
    HSIC averaged over consecutive minibatches of that size (Nguyen et al. 2021); a last batch of
    fewer than 4 samples is left out. `dtype`: the Grams' precision (default the features';
    `torch.float64` forces it throughout). Returns a `[len(a), len(b)]` float64 tensor on the
    features' device.
    """
    _check(feats_a, feats_b)
    n = feats_a[0].shape[0]
    if batch_size is None:
        acc = CKAAccumulator(unbiased=False, dtype=dtype)
        acc.update(feats_a, feats_b)
        return acc.result()
    if batch_size < MIN_BATCH:
        raise ValueError(f"batch_size must be at least {MIN_BATCH} (got {batch_size})")
    acc = CKAAccumulator(unbiased=True, dtype=dtype)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        if stop - start < MIN_BATCH:
            break
        acc.update([x[start:stop] for x in feats_a], None if feats_b is None else [x[start:stop] for x in feats_b])
    if acc.batches == 0:
        raise ValueError(f"CKA needs at least {MIN_BATCH} samples (got {n})")
    return acc.result()
