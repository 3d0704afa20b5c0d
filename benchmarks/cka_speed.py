"""cka_matrix against a pair-at-a-time computation (the torch-cka approach: for every pair of
layers and every batch, form both Gram matrices and the HSIC terms with matrix products), on the
same float32 features in one run, each in the features' precision (float32), as torch-cka runs.

    python benchmarks/cka_speed.py [--layers 12] [--samples 2048] [--features 2048] [--batch 256] [--repeats 5]

Both compute the minibatch CKA with the unbiased HSIC on the CPU. The script checks cka_matrix
(float32 Grams, float64 HSIC sums) against an all-float64 reference (within 1e-5), then prints
median and minimum times of interleaved repeats, the speedup, and what forcing float64 costs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from prunetune.analysis.cka import cka_matrix


def hsic_unbiased_pair(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    gram_x, gram_y = x @ x.T, y @ y.T  # K and L of the unbiased HSIC, diagonals zeroed
    gram_x = gram_x - torch.diag(torch.diag(gram_x))
    gram_y = gram_y - torch.diag(torch.diag(gram_y))
    one = torch.ones(n, 1, dtype=x.dtype)
    kl = gram_x @ gram_y  # O(n³), once per pair
    term = (torch.trace(kl) + (one.T @ gram_x @ one) * (one.T @ gram_y @ one) / ((n - 1) * (n - 2))
            - 2.0 / (n - 2) * (one.T @ kl @ one))
    return term.squeeze() / (n * (n - 3))


def pairwise_cka(feats: list[torch.Tensor], batch: int) -> torch.Tensor:
    L = len(feats)
    out = torch.zeros(L, L, dtype=torch.float64)
    for i in range(L):
        for j in range(L):
            xy = xx = yy = 0.0
            for s in range(0, feats[i].shape[0], batch):
                a, b = feats[i][s:s + batch], feats[j][s:s + batch]  # in the features' float32
                xy += hsic_unbiased_pair(a, b).double()
                xx += hsic_unbiased_pair(a, a).double()
                yy += hsic_unbiased_pair(b, b).double()
            out[i, j] = xy / torch.sqrt(xx * yy)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--samples", type=int, default=2048)
    ap.add_argument("--features", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    base = torch.randn(args.samples, 64, generator=g)
    feats = [torch.tanh(base @ torch.randn(64, args.features, generator=g)) + 0.1 * i for i in range(args.layers)]
    runs = {"cka_matrix (float32 Grams)": lambda: cka_matrix(feats, batch_size=args.batch),
            "cka_matrix (dtype=float64)": lambda: cka_matrix(feats, batch_size=args.batch, dtype=torch.float64),
            "pair at a time (float32)": lambda: pairwise_cka(feats, args.batch)}
    times = {name: [] for name in runs}
    results = {}
    for _ in range(args.repeats):  # interleaved: a slow spell of the machine hits all alike
        for name, fn in runs.items():
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
    reference = results["cka_matrix (dtype=float64)"]
    ours = results["cka_matrix (float32 Grams)"]
    error = float((ours - reference).abs().max())
    theirs_error = float((results["pair at a time (float32)"] - reference).abs().max())
    print(f"{args.layers} layers, {args.samples} samples, {args.features} features, batch {args.batch}, float32 "
          f"features, {torch.get_num_threads()} threads; {args.repeats} interleaved repeats")
    for name, t in times.items():
        print(f"  {name:28s} median {statistics.median(t):8.3f} s   min {min(t):8.3f} s")
    med = {name: statistics.median(t) for name, t in times.items()}
    pair, ours = "pair at a time (float32)", "cka_matrix (float32 Grams)"
    print(f"speedup over pair at a time, same precision: {med[pair] / med[ours]:.1f}× "
          f"(median; min {min(times[pair]) / min(times[ours]):.1f}×; target ≥ 20×)")
    print(f"float32 Grams against all-float64: max |Δ CKA| {error:.2e} (target ≤ 1e-5; pair-at-a-time float32: "
          f"{theirs_error:.2e}); forcing float64 costs {med['cka_matrix (dtype=float64)'] / med[ours]:.2f}×")
    if error > 1e-5:
        raise SystemExit("float32 result is further than 1e-5 from float64")


if __name__ == "__main__":
    main()
