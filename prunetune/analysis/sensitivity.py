"""Layer sensitivity (after Distiller's sensitivity analysis): from the dense checkpoint, prune
each prunable layer alone to each sparsity and evaluate on the validation split without
fine-tuning. The drop in accuracy tells which layers tolerate pruning."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from prunetune.figures import pyplot

SPARSITIES = tuple(round(0.1 * k, 1) for k in range(1, 10))


def analyse(trial, cache, sparsities=SPARSITIES) -> list[dict]:
    """Rows of (layer, sparsity, val_acc, val_loss, acc_drop) for every prunable layer of
    `trial.model`, starting each time from the dense phase's weights."""
    trial.dense_phase(cache, replay=False)
    split = "val" if trial.data.size("val") else "test"
    dense = {k: v.detach().clone() for k, v in trial.model.state_dict().items()}
    base = trial.trainer.evaluate(split)
    rows = [{"layer": "(dense)", "sparsity": 0.0, f"{split}_acc": base["acc"], f"{split}_loss": base["loss"],
             "acc_drop": 0.0}]
    for layer in trial.layers:
        for s in sparsities:
            trial.model.load_state_dict(dense)
            trial.masks.release()
            gen = torch.Generator().manual_seed(trial.spec.seed)
            trial.masks.prune(s, trial.criterion, [layer], "layer", gen, trial.criteria_context())
            m = trial.trainer.evaluate(split)
            rows.append({"layer": layer, "sparsity": s, f"{split}_acc": m["acc"], f"{split}_loss": m["loss"],
                         "acc_drop": base["acc"] - m["acc"]})
    trial.model.load_state_dict(dense)
    trial.masks.release()
    return rows


def write(rows: list[dict], out: Path, title: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out / "sensitivity.csv", out / "sensitivity.png"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    acc_key = next(k for k in rows[0] if k.endswith("_acc"))
    layers = list(dict.fromkeys(r["layer"] for r in rows[1:]))
    sparsities = sorted({r["sparsity"] for r in rows[1:]})
    grid = np.full((len(layers), len(sparsities)), np.nan)
    for r in rows[1:]:
        grid[layers.index(r["layer"]), sparsities.index(r["sparsity"])] = r[acc_key]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(sparsities), 1.5 + 0.32 * len(layers)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=max(1e-9, float(np.nanmax(grid))))
    ax.set_xticks(range(len(sparsities)), [f"{s:.0%}" for s in sparsities])
    ax.set_yticks(range(len(layers)), layers, fontsize=8)
    ax.set_xlabel("sparsity of the one pruned layer")
    ax.set_ylabel("pruned layer (forward order)")
    ax.set_title(f"{title}: {acc_key.replace('_', ' ')} (dense {rows[0][acc_key]:.3f})")
    fig.colorbar(im, ax=ax, label=f"{acc_key.replace('_', ' ')} (fraction)")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return [csv_path, png_path]
