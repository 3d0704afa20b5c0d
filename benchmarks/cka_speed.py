"""cka_matrix against a pair-at-a-time computation (the torch-cka approach: for every pair of
layers and every batch, form both Gram matrices and the HSIC terms with matrix products), on the
same features in one run.

    python benchmarks/cka_speed.py [--layers 12] [--samples 2048] [--features 2048] [--batch 256] [--repeats 3]

Both compute the minibatch CKA with the unbiased HSIC in float64 on the CPU; the script checks
they agree, then prints median times and the speedup.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from prunetune.analysis.cka import cka_matrix


def hsic_unbiased_pair(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    k, l = x @ x.T, y @ y.T
    k = k - torch.diag(torch.diag(k))
    l = l - torch.diag(torch.diag(l))
    one = torch.ones(n, 1, dtype=x.dtype)
    kl = k @ l  # O(n³), once per pair
    term = torch.trace(kl) + (one.T @ k @ one) * (one.T @ l @ one) / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (one.T @ kl @ one)
    return term.squeeze() / (n * (n - 3))


def pairwise_cka(feats: list[torch.Tensor], batch: int) -> torch.Tensor:
    L = len(feats)
    out = torch.zeros(L, L, dtype=torch.float64)
    for i in range(L):
        for j in range(L):
            xy = xx = yy = 0.0
            for s in range(0, feats[i].shape[0], batch):
                a, b = feats[i][s:s + batch].double(), feats[j][s:s + batch].double()
                xy += hsic_unbiased_pair(a, b)
                xx += hsic_unbiased_pair(a, a)
                yy += hsic_unbiased_pair(b, b)
            out[i, j] = xy / torch.sqrt(xx * yy)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--samples", type=int, default=2048)
    ap.add_argument("--features", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    base = torch.randn(args.samples, 64, generator=g)
    feats = [torch.tanh(base @ torch.randn(64, args.features, generator=g)) + 0.1 * i for i in range(args.layers)]
    ours_t, theirs_t = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        ours = cka_matrix(feats, batch_size=args.batch)
        ours_t.append(time.perf_counter() - start)
        start = time.perf_counter()
        theirs = pairwise_cka(feats, args.batch)
        theirs_t.append(time.perf_counter() - start)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-8)
    mo, mt = statistics.median(ours_t), statistics.median(theirs_t)
    print(f"{args.layers} layers, {args.samples} samples, {args.features} features, batch {args.batch}, "
          f"float64, {torch.get_num_threads()} threads; medians of {args.repeats}")
    print(f"  cka_matrix (Grams once per batch, all pairs in one product): {mo:8.3f} s")
    print(f"  pair at a time (Grams and K·L per pair):                     {mt:8.3f} s")
    print(f"speedup: {mt / mo:.1f}× (target ≥ 20×); results agree to 1e-6")


if __name__ == "__main__":
    main()
