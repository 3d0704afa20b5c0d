"""CIFAR-10 / CIFAR-100 from the python-pickle release, as its publisher distributes it.

`data.root` is the folder holding `cifar-10-batches-py/` (or `cifar-100-python/`), as torchvision
reads it, or that folder itself (`data.download: true` fetches it: data/download.py). We read the
pickles ourselves: torchvision's classes check MD5s (so tiny fixtures in the same layout would fail).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from prunetune.data import Source, resize_uint8
from prunetune.errors import UserError

_LAYOUTS = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                "batches.meta", b"labels", b"label_names"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", b"fine_labels", b"fine_label_names"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only what the CIFAR release holds (dicts, lists, bytes, numpy arrays)."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def _read(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return _ArrayUnpickler(f, encoding="bytes").load()
    except Exception as exc:  # noqa: BLE001 - a malformed file is bad input
        raise UserError(f"data.root: {path} is not a CIFAR python-pickle batch ({exc})") from None


def _load(data_spec, which: str) -> Source:
    folder, train_files, test_files, meta_file, label_key, names_key = _LAYOUTS[which]
    if data_spec.root is None:
        raise UserError(f"data.root: {which} needs the folder holding {folder}/ (data.download: true fetches it)")
    root = Path(data_spec.root)
    base = root / folder if (root / folder).is_dir() else root
    expected = train_files + test_files + [meta_file]
    missing = [f for f in expected if not (base / f).is_file()]
    if missing:
        raise UserError(f"data.root: {root} lacks the {which} python-pickle files {', '.join(missing)} "
                        f"(expected {folder}/ with {', '.join(expected)}; data.download: true fetches them)")
    images, labels, ids, split = [], [], [], []
    for part, files in (("train", train_files), ("test", test_files)):
        for fname in files:
            batch = _read(base / fname)
            try:
                data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
                lab = np.asarray(batch[label_key], dtype=np.int64)
            except (KeyError, ValueError) as exc:
                raise UserError(f"data.root: {base / fname} is malformed ({exc})") from None
            names = batch.get(b"filenames")
            images.append(data)
            labels.append(lab)
            ids += ([n.decode() if isinstance(n, bytes) else str(n) for n in names] if names is not None
                    else [f"{fname}-{i}" for i in range(len(lab))])
            split += [part] * len(lab)
    meta = _read(base / meta_file)
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get(names_key, [])]
    labels_all = np.concatenate(labels)
    if len(classes) <= int(labels_all.max()):
        raise UserError(f"data.root: {base / meta_file} names {len(classes)} classes, "
                        f"but labels go up to {int(labels_all.max())}")
    return Source(images=resize_uint8(np.concatenate(images), data_spec.image_size), labels=labels_all,
                  ids=ids, classes=classes, official_split=np.array(split))


def load_cifar10(data_spec) -> Source:
    return _load(data_spec, "cifar10")


def load_cifar100(data_spec) -> Source:
    return _load(data_spec, "cifar100")
