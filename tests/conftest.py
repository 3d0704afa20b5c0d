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
                 b"coarse_labels": [label // 5 for label in labels],
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


HAM_CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")


def _encode_image(path: Path, image: np.ndarray) -> None:
    """Write uint8 HWC as a JPEG or PNG (by suffix), with torchvision's encoders."""
    import torch
    from torchvision.io import encode_jpeg, encode_png

    chw = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    data = encode_png(chw) if path.suffix == ".png" else encode_jpeg(chw, quality=90)
    path.write_bytes(bytes(data.numpy()))


def _class_image(rng, label: int, classes: int, h: int, w: int) -> np.ndarray:
    """An HWC image whose mean colour depends on its class, so a model can learn something."""
    base = np.array([40 + 170 * label / max(1, classes - 1), 120, 210 - 170 * label / max(1, classes - 1)])
    return np.clip(rng.normal(0, 25, (h, w, 3)) + base, 0, 255).astype(np.uint8)


def write_ham10000(root: Path, lesions_per_class=(6, 8, 10, 3, 9, 40, 4), seed: int = 0,
                   one_folder: bool = False, size=(45, 60)) -> Path:
    """HAM10000 as published: HAM10000_metadata.csv and ISIC_*.jpg in HAM10000_images_part_1/
    and _part_2/ (or one folder). Lesions have 1 to 3 images; `nv` dominates, as in the real set."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows, image_no = [], 24306
    for label, n_lesions in enumerate(lesions_per_class):
        for _ in range(n_lesions):
            lesion = f"HAM_{len(rows) + 1000:07d}"
            for _ in range(int(rng.integers(1, 4))):
                rows.append((lesion, f"ISIC_{image_no:07d}", HAM_CLASSES[label]))
                image_no += 1
    rng.shuffle(rows)
    lines = ["lesion_id,image_id,dx,dx_type,age,sex,localization"]
    for i, (lesion, image, dx) in enumerate(rows):
        lines.append(f"{lesion},{image},{dx},histo,{30 + i % 50}.0,{'male' if i % 2 else 'female'},back")
        folder = root if one_folder else root / f"HAM10000_images_part_{1 + i % 2}"
        folder.mkdir(exist_ok=True)
        _encode_image(folder / f"{image}.jpg", _class_image(rng, HAM_CLASSES.index(dx), 7, *size))
    (root / "HAM10000_metadata.csv").write_text("\n".join(lines) + "\n")
    return root


def write_imagefolder(root: Path, counts: dict[str, dict[str, int]], seed: int = 0) -> Path:
    """root/<split>/<class>/<n>.{jpg,png}: counts[split][class] images each."""
    rng = np.random.default_rng(seed)
    classes = sorted({c for per in counts.values() for c in per})
    for split, per in counts.items():
        for cls, n in per.items():
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                _encode_image(root / split / cls / f"{i}.{'png' if i % 2 else 'jpg'}",
                              _class_image(rng, classes.index(cls), len(classes), 20, 24))
    return root


def write_medmnist(path: Path, n=(60, 12, 20), classes: int = 7, size: int = 28, channels: int = 3,
                   seed: int = 0) -> Path:
    """A MedMNIST .npz (as DermaMNIST): {train,val,test}_images [N, H, W(, 3)], *_labels [N, 1]."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for part, count in zip(("train", "val", "test"), n):
        labels = rng.integers(0, classes, (count, 1))
        shape = (count, size, size, 3) if channels == 3 else (count, size, size)
        arrays[f"{part}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        arrays[f"{part}_labels"] = labels.astype(np.uint8)
    np.savez_compressed(path, **arrays)
    return path


STARTUP = ("sweep ", "reading ", "downloading torchvision's ", "starting Ray (", "attaching to the Ray cluster at ")


def error_lines(stderr: str) -> list[str]:
    """A command's stderr less the start-up lines `prunetune sweep` prints before its checks end
    (what it will run, then each stage): where input is bad, the one error line."""
    return [line for line in stderr.strip().splitlines() if not line.startswith(STARTUP)]
