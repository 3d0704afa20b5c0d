"""scikit-learn's bundled 8×8 digits (1,797 grayscale images, 10 classes): needs no files."""

from __future__ import annotations

import numpy as np

from prunetune.data import Source, resize_uint8


def load(data_spec) -> Source:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Pixel values are 0..16; scale to the uint8 range every dataset shares.
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    return Source(
        images=resize_uint8(images, data_spec.image_size),
        labels=bunch.target.astype(np.int64),
        ids=[f"digits-{i}" for i in range(len(images))],
        classes=[str(c) for c in bunch.target_names],
    )
