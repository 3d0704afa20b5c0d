"""A dataset factory: scikit-learn's digits, as your own loader would return any data.

A spec names it as `data.dataset: "examples.digits_data:load"`; prunetune calls
`load(**data.kwargs)` and resizes, splits, caches and serves what it returns.
"""

import numpy as np


def load(per_class: int | None = None, seed: int = 0) -> dict:
    """`per_class`: keep at most this many images of each digit (a smaller, quicker dataset)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255 / 16)).astype(np.uint8)  # [N, 8, 8], grayscale
    labels = bunch.target
    if per_class is not None:
        rng = np.random.default_rng(seed)
        keep = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(10)])
        images, labels = images[np.sort(keep)], labels[np.sort(keep)]
    return {"images": images, "labels": labels, "classes": [str(d) for d in range(10)]}
