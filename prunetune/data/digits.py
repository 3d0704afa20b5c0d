"""scikit-learn's bundled 8×8 digits (1,797 grayscale images, 10 classes): needs no files.

Read from the CSV scikit-learn ships (`sklearn/datasets/data/digits.csv.gz`) without importing
scikit-learn, whose import costs seconds (it pulls in SciPy); the same data as `load_digits()`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from prunetune.data import Source, resize_uint8
from prunetune.errors import UserError


def _csv_path() -> Path:
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("data.dataset: digits is scikit-learn's bundled dataset; install scikit-learn")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "digits.csv.gz"


def load(data_spec) -> Source:
    path = _csv_path()
    if path.is_file():
        table = np.loadtxt(path, delimiter=",", dtype=np.float64)
        pixels, target = table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    else:  # a scikit-learn that keeps them elsewhere
        from sklearn.datasets import load_digits

        bunch = load_digits()
        pixels, target = bunch.images, bunch.target.astype(np.int64)
    # Pixel values are 0..16; scale to the uint8 range every dataset shares.
    images = np.round(pixels * (255.0 / 16.0)).astype(np.uint8)[:, None]
    return Source(
        images=resize_uint8(images, data_spec.image_size),
        labels=target,
        ids=[f"digits-{i}" for i in range(len(images))],
        classes=[str(c) for c in range(10)],
    )
