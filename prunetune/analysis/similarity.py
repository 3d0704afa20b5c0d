"""Layer similarity of trained checkpoints: activation capture and the CKA matrices within each
model and between every pair, streamed batch by batch (activations are never all kept).

Imports no mlflow: `prunetune cka` finds the checkpoints and logs the results (`commands.cka`,
through tracking.py).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from prunetune.analysis.cka import CKAAccumulator
from prunetune.errors import UserError
from prunetune.spec import Spec


@dataclass
class Checkpoint:
    """A trained model to compare: its label (run id and method), its resolved spec, and the
    input normalisation it was trained with (`mean`, `std`: 1×C×1×1)."""

    label: str
    spec: Spec
    model: nn.Module
    layers: list[str] = field(default_factory=list)
    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images → this model's inputs, normalised as in its own training."""
        return (images.float() - self.mean) / self.std


def load_checkpoint(label: str, config_yaml: Path, state_path: Path, dataset, device: torch.device = torch.device("cpu")
                    ) -> Checkpoint:
    """A run's model from its config.yaml and checkpoint, with its own input normalisation:
    ImageNet's when it started from `model.weights`, else its training split's statistics."""
    import yaml

    from prunetune.data.device import normalisation
    from prunetune.models import build_model, prunable_layers
    from prunetune.spec import validate

    raw = yaml.safe_load(config_yaml.read_text())
    imagenet = bool(raw["model"].get("weights"))
    raw["model"]["weights"] = None  # the checkpoint holds every weight
    spec = validate(raw)
    in_channels = dataset.in_channels
    model = build_model(spec.model, len(dataset.classes), in_channels, spec.data.image_size)
    model.load_state_dict(torch.load(state_path, map_location="cpu", weights_only=True))
    model.to(device).eval()
    mean, std = normalisation(dataset.images, imagenet, device, index=np.flatnonzero(dataset.split == "train"))
    return Checkpoint(label, spec, model, prunable_layers(model, in_channels, spec.data.image_size), mean, std)


class _Capture:
    """Forward hooks that keep each named module's outputs of one forward pass. A module the
    forward calls more than once (a shared layer) is represented by all its calls' outputs side
    by side, not by whichever came last."""

    def __init__(self, model: nn.Module, names: list[str]):
        modules = dict(model.named_modules())
        self.outputs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        self.hooks = [modules[n].register_forward_hook(self._hook(n)) for n in names]
        self.names = names

    def _hook(self, name):
        def hook(module, inputs, output):
            self.outputs[name].append(output.detach().flatten(1))
        return hook

    def features(self, model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        """Run `model` on `x`; each named module's features, [batch, features], in `names` order."""
        for outs in self.outputs.values():
            outs.clear()
        model(x)
        return [torch.cat(self.outputs[n], dim=1) for n in self.names]

    def close(self):
        for h in self.hooks:
            h.remove()


@torch.no_grad()
def cka_matrices(checkpoints: list[Checkpoint], batches) -> dict[tuple[int, int], torch.Tensor]:
    """CKA within each checkpoint (i, i) and between each pair (i, j), i < j, over `batches`
    (an iterable of uint8 image tensors, each normalised for each model as it was trained).
    Minibatch estimator with the unbiased HSIC."""
    captures = [_Capture(c.model, c.layers) for c in checkpoints]
    pairs = [(i, j) for i in range(len(checkpoints)) for j in range(i, len(checkpoints))]
    accs = {p: CKAAccumulator(unbiased=True) for p in pairs}
    try:
        for x in batches:
            if len(x) < 4:
                continue  # the unbiased HSIC needs 4 samples; a short last batch is left out
            feats = [cap.features(c.model, c.inputs(x)) for c, cap in zip(checkpoints, captures)]
            for i, j in pairs:
                accs[i, j].update(feats[i], None if i == j else feats[j])
    finally:
        for cap in captures:
            cap.close()
    return {p: acc.result() for p, acc in accs.items()}


def write_matrix(path: Path, matrix: torch.Tensor, rows: list[str], cols: list[str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["layer"] + cols)
        for name, values in zip(rows, matrix.tolist()):
            w.writerow([name] + [f"{v:.6f}" for v in values])


ANNOTATED = 40  # heatmaps of up to this many layers a side show each cell's value


def heatmap(path: Path, matrix: torch.Tensor, rows: list[str], cols: list[str], title: str,
            xlabel: str, ylabel: str) -> None:
    from prunetune.figures import pyplot

    plt = pyplot()
    size = max(4.0, 0.28 * max(len(rows), len(cols)) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    values = matrix.cpu().numpy()
    im = ax.imshow(values, vmin=0, vmax=1, cmap="magma", origin="lower")
    if max(values.shape) <= ANNOTATED:  # each cell's value, where the cells are large enough to read
        for (i, j), v in np.ndenumerate(values):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=5, color="white" if v < 0.6 else "black")
    ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    fig.colorbar(im, ax=ax, label="linear CKA")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def eval_batches(spec: Spec, samples: int, batch_size: int, device: torch.device = torch.device("cpu")):
    """The fixed evaluation subset: the first `samples` test images of the spec's data (uint8, on
    `device`), in batches; each model normalises them as it was trained (`Checkpoint.inputs`)."""
    from prunetune.data import load_dataset

    dataset = load_dataset(spec.data)
    x = torch.from_numpy(dataset.images[np.flatnonzero(dataset.split == "test")[:samples]]).to(device)
    if len(x) < 4:
        raise UserError(f"analysis.cka.samples: the test split has {len(x)} samples; CKA needs at least 4")
    return dataset, [x[s:s + batch_size] for s in range(0, len(x), batch_size)]


def summary_lines(checkpoints: list[Checkpoint], matrices: dict[tuple[int, int], torch.Tensor]) -> list[str]:
    lines = []
    for (i, j), m in matrices.items():
        a, b = checkpoints[i].label, checkpoints[j].label
        if i == j:
            n = m.shape[0]
            off = (m.sum() - m.diagonal().sum()) / max(1, n * n - n)
            lines.append(f"within {a}: mean off-diagonal CKA {float(off):.3f} over {n} layers")
        elif m.shape[0] == m.shape[1]:
            lines.append(f"{a} vs {b}: mean diagonal CKA {float(m.diagonal().mean()):.3f}")
        else:
            lines.append(f"{a} vs {b}: best-match CKA {float(m.max(dim=1).values.mean()):.3f} "
                         f"({m.shape[0]} vs {m.shape[1]} layers)")
    return lines


def write_results(out: Path, checkpoints: list[Checkpoint], matrices: dict[tuple[int, int], torch.Tensor]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for (i, j), m in matrices.items():
        a, b = checkpoints[i], checkpoints[j]
        stem = f"within_{_slug(a.label)}" if i == j else f"{_slug(a.label)}__vs__{_slug(b.label)}"
        write_matrix(out / f"{stem}.csv", m, a.layers, b.layers)
        title = (f"CKA within {a.label}" if i == j else f"CKA: {a.label} vs {b.label}")
        heatmap(out / f"{stem}.png", m, a.layers, b.layers, title,
                xlabel=f"layers of {b.label}", ylabel=f"layers of {a.label}")


def _slug(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in label)
