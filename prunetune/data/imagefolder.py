"""One folder per class: `root/train/<class>/*` and, optionally, `root/val/<class>/*` and
`root/test/<class>/*` (a split that is absent is carved from train). Classes are the folder
names under `train/`, sorted. Images (JPEG, PNG, BMP, GIF, WebP) are read as RGB. Sample ids
are the paths relative to the root."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from prunetune.data import Source
from prunetune.data.cache import cached
from prunetune.data.images import EXTENSIONS, decode_all
from prunetune.errors import UserError

EXPECTED = "train/<class>/<image> (and optionally val/<class>/ and test/<class>/)"


def load(data_spec) -> Source:
    if data_spec.root is None:
        raise UserError(f"data.root: imagefolder needs a folder holding {EXPECTED}")
    root = Path(data_spec.root)
    if not (root / "train").is_dir():
        raise UserError(f"data.root: {root} lacks train/; expected {EXPECTED}")
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if not classes:
        raise UserError(f"data.root: {root / 'train'} has no class folders; expected {EXPECTED}")
    paths, labels, split = [], [], []
    for part in ("train", "val", "test"):
        if not (root / part).is_dir():
            continue
        for folder in sorted(p for p in (root / part).iterdir() if p.is_dir()):
            if folder.name not in classes:
                raise UserError(f"data.root: {folder} is a class that train/ lacks; train's classes: "
                                f"{', '.join(classes)}")
            files = sorted(f for f in folder.iterdir() if f.suffix.lower() in EXTENSIONS)
            paths += files
            labels += [classes.index(folder.name)] * len(files)
            split += [part] * len(files)
    if "train" not in split:
        raise UserError(f"data.root: {root / 'train'} holds no images ({', '.join(EXTENSIONS)})")

    def build() -> Source:
        return Source(images=decode_all(paths, data_spec.image_size), labels=np.array(labels, dtype=np.int64),
                      ids=[str(p.relative_to(root)) for p in paths], classes=classes,
                      official_split=np.array(split))

    return cached("imagefolder", paths, data_spec.image_size, build)
