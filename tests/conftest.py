"""Shared fixtures: an isolated cache per test session, and tiny datasets in their publishers'
exact on-disk layouts."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    os.environ["PRUNETUNE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield


def write_cifar100(root: Path, n_train: int = 200, n_test: int = 100, classes: int = 100, seed: int = 0) -> Path:
    """The python-pickle release of CIFAR-100: cifar-100-python/{train,test,meta}."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", n_train), ("test", n_test)):
        labels = [int(x) for x in rng.integers(0, classes, n)]
        # class-dependent mean colour so a model can learn something
        data = np.clip(rng.normal(0, 40, (n, 3072)) + np.array(labels)[:, None] * (200 / classes), 0, 255)
        batch = {b"data": data.astype(np.uint8), b"fine_labels": labels,
                 b"coarse_labels": [l // 5 for l in labels],
                 b"filenames": [f"{name}_{i}.png".encode() for i in range(n)], b"batch_label": name.encode()}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=4))
    meta = {b"fine_label_names": [f"class{i}".encode() for i in range(classes)],
            b"coarse_label_names": [f"super{i}".encode() for i in range(20)]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=4))
    return root


def write_cifar10(root: Path, n_per_batch: int = 20, n_test: int = 40, seed: int = 0) -> Path:
    """The python-pickle release of CIFAR-10: cifar-10-batches-py/data_batch_1..5, test_batch."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in [(f"data_batch_{i}", n_per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": [int(x) for x in rng.integers(0, 10, n)],
                 b"filenames": [f"{name}_{i}.png".encode() for i in range(n)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=4))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}))
    return root


def digits_raw(**overrides) -> dict:
    """A tiny, fast spec on the bundled digits."""
    raw = {"name": "t", "seed": 0, "model": {"arch": "simple_cnn"},
           "data": {"dataset": "digits", "image_size": 8},
           "train": {"batch_size": 64, "lr": 0.05, "dense_epochs": 2, "finetune_epochs": 1},
           "schedule": {"method": "oneshot", "sparsity": 0.5}}
    for key, value in overrides.items():
        section, _, leaf = key.partition("__")
        raw.setdefault(section, {})[leaf] = value
    return raw
