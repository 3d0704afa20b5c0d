"""A MedMNIST `.npz` (e.g. DermaMNIST, derived from HAM10000): `data.root` is the file, holding
`train_images`, `train_labels`, `val_images`, `val_labels`, `test_images` and `test_labels`.
Images are [N, H, W] (grayscale) or [N, H, W, 3]; labels are [N] or [N, 1] class indices
(MedMNIST's multi-label ChestMNIST is not a single-label task and is refused). The npz names no
classes, so classes are named by index. With `data.download: true` the file's name
(`dermamnist.npz`, `dermamnist_64.npz`) says which set and size to fetch: data/download.py."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from prunetune.data import Source, resize_uint8
from prunetune.errors import UserError

PARTS = ("train", "val", "test")
EXPECTED = "a MedMNIST .npz file with " + ", ".join(f"{p}_images, {p}_labels" for p in PARTS)


def load(data_spec) -> Source:
    if data_spec.root is None:
        raise UserError(f"data.root: medmnist needs the path of {EXPECTED}")
    path = Path(data_spec.root)
    if not path.is_file():
        raise UserError(f"data.root: {path} is not a file; expected {EXPECTED} (data.download: true fetches it "
                        "when the file name names a MedMNIST set and size, as dermamnist_64.npz)")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise UserError(f"data.root: {path} is not a readable .npz ({exc})") from None
    missing = [f"{p}_{k}" for p in PARTS for k in ("images", "labels") if f"{p}_{k}" not in arrays]
    if missing:
        raise UserError(f"data.root: {path} lacks {', '.join(missing)}; expected {EXPECTED}")
    images, labels, ids, split = [], [], [], []
    for part in PARTS:
        x, y = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        if x.ndim == 3:
            x = x[:, None]
        elif x.ndim == 4 and x.shape[-1] in (1, 3):
            x = x.transpose(0, 3, 1, 2)
        else:
            raise UserError(f"data.root: {path}: {part}_images has shape {x.shape}; expected [N, H, W] or [N, H, W, 3]")
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.ndim != 1 or len(y) != len(x):
            raise UserError(f"data.root: {path}: {part}_labels has shape {y.shape}; expected one class index "
                            f"per image ({len(x)}); multi-label MedMNIST sets are not supported")
        images.append(np.ascontiguousarray(x, dtype=np.uint8))
        labels.append(y.astype(np.int64))
        ids += [f"{part}-{i}" for i in range(len(y))]
        split += [part] * len(y)
    labels_all = np.concatenate(labels)
    if labels_all.min() < 0:
        raise UserError(f"data.root: {path} has negative labels")
    classes = [str(c) for c in range(int(labels_all.max()) + 1)]
    return Source(images=resize_uint8(np.concatenate(images), data_spec.image_size), labels=labels_all,
                  ids=ids, classes=classes, official_split=np.array(split))
