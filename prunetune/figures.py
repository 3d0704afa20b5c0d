"""Figures of one trial (matplotlib, Agg backend): training curves, weight histogram, confusion.
matplotlib is imported, and its backend chosen, on the first figure (`pyplot`), not on import."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def pyplot():
    """matplotlib.pyplot on the Agg backend (figures go to files; no display is needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curves(history: list[dict], path: Path, title: str, dense_epochs: int | None = None) -> None:
    """Loss and accuracy per epoch (train and val), with sparsity on a second axis."""
    if not history:
        return
    plt = pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for key, ax in (("loss", ax_loss), ("acc", ax_acc)):
        for split, style in (("train", "-"), ("val", "--")):
            values = [h.get(f"{split}_{key}") for h in history]
            if any(v is not None for v in values):
                ax.plot(epochs, values, style, label=split)
        if dense_epochs:
            ax.axvline(dense_epochs - 0.5, color="grey", lw=0.8, ls=":", label="end of dense phase")
        ax.set_xlabel("epoch")
        ax.set_ylabel("cross-entropy loss" if key == "loss" else "accuracy (fraction)")
        ax.legend(loc="best", fontsize=8)
    twin = ax_acc.twinx()
    twin.plot(epochs, [h.get("sparsity", 0) for h in history], color="tab:red", alpha=0.5)
    twin.set_ylabel("sparsity (fraction of zero weights)", color="tab:red")
    twin.set_ylim(0, 1)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def weights_hist(model, layer_names: list[str], path: Path) -> None:
    """Histogram of the non-zero prunable weights, with the count of zeros in the title."""
    modules = dict(model.named_modules())
    w = np.concatenate([modules[n].weight.detach().float().cpu().numpy().ravel() for n in layer_names])
    nonzero = w[w != 0]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    if len(nonzero):  # one filled outline, not 120 bar patches (three times cheaper to draw)
        counts, edges = np.histogram(nonzero, bins=120)
        ax.stairs(counts, edges, fill=True, color="tab:blue")
    ax.set_xlabel("weight value")
    ax.set_ylabel("count")
    ax.set_title(f"prunable weights: {len(nonzero):,} non-zero, {len(w) - len(nonzero):,} zero")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def confusion(pred: np.ndarray, labels: np.ndarray, classes: list[str], path: Path) -> None:
    """Row-normalised confusion matrix (rows: true class; each row sums to 1), with counts."""
    k = len(classes)
    counts = np.zeros((k, k), dtype=int)
    np.add.at(counts, (labels, pred), 1)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1 + 0.6 * k, 0.8 + 0.55 * k))
    im = ax.imshow(rates, vmin=0, vmax=1, cmap="Blues")
    ax.set_xticks(range(k), classes, rotation=45, ha="right")
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if k <= 20:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, counts[i, j], ha="center", va="center", fontsize=7,
                        color="white" if rates[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, label="fraction of the true class")
    ax.set_title("test confusion matrix")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
