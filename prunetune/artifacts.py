"""What a finished trial leaves in its output folder, the files `prunetune trial` and the sweep log
as a run's artifacts: `checkpoint/model.pt` (a plain state_dict, masks applied),
`checkpoint/compact.pt2` (with the pruned structure made real), `config.yaml`,
`layer_sparsity.csv`, `data/split.csv`, `metrics.json`, `history.json` and the figures."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch
import yaml

from prunetune.pruning.masks import layer_sparsity_rows


def write(trial, out_dir: Path, metrics: dict) -> None:
    """Write the artifacts of `trial` (a `trial.Trial` that has run) and its final `metrics`."""
    from prunetune import figures  # matplotlib only when artifacts are written

    (out_dir / "checkpoint").mkdir(parents=True, exist_ok=True)
    (out_dir / "data").mkdir(exist_ok=True)
    (out_dir / "figures").mkdir(exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in trial.model.state_dict().items()}, out_dir / "checkpoint" / "model.pt")
    if trial.compact is not None:
        # any batch size (traced with two samples: a size-1 dimension would be specialised)
        program = torch.export.export(trial.compact, (trial.example.cpu().expand(2, -1, -1, -1),),
                                      dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
        torch.export.save(program, out_dir / "checkpoint" / "compact.pt2")
    spec, dataset, history = trial.spec, trial.dataset, trial.trainer.history
    (out_dir / "config.yaml").write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    _write_csv(out_dir / "layer_sparsity.csv", layer_sparsity_rows(trial.model, trial.layers, trial.layer_targets()))
    _write_csv(out_dir / "data" / "split.csv", [{dataset.id_name: i, "split": s}
                                                for i, s in zip(dataset.ids, dataset.split)])
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    if trial.trainer.regrowth is not None:  # rigl, set: the mask the training ended with, and its moves
        torch.save(trial.masks.state_dict(), out_dir / "checkpoint" / "masks.pt")
        (out_dir / "regrowth.json").write_text(json.dumps({"mask_updates": trial.trainer.regrowth.updates}))
    (out_dir / "history.json").write_text(json.dumps(history))
    figures.curves(history, out_dir / "figures" / "curves.png",
                   title=f"{spec.name}: {spec.schedule.method} to {spec.schedule.sparsity:.0%}",
                   dense_epochs=spec.train.dense_epochs)
    figures.weights_hist(trial.model, trial.layers, out_dir / "figures" / "weights_hist.png")
    counts = np.bincount(dataset.labels[dataset.split == "train"], minlength=trial.num_classes)
    if counts.min() == 0 or counts.max() / counts.min() > 1.5:  # imbalanced classes
        logits, labels = trial.test_predictions
        figures.confusion(logits.argmax(1), labels, dataset.classes, out_dir / "figures" / "confusion.png")


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["empty"])
        writer.writeheader()
        writer.writerows(rows)
