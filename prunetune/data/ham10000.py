"""HAM10000 (Tschandl et al. 2018) in the layout its publisher distributes: `data.root` holds
`HAM10000_metadata.csv` (lesion_id, image_id, dx, dx_type, age, sex, localization) and the
`ISIC_*.jpg` images under `HAM10000_images_part_1/` and `HAM10000_images_part_2/`, or in one
folder (one level below the root, or the root itself).

Classes are the seven `dx` codes in alphabetical order, the order DermaMNIST also uses:
akiec, bcc, bkl, df, mel, nv, vasc. Images of one lesion (`lesion_id`) are one group: a split
never separates them. The sample ids written to `data/split.csv` are the `image_id`s.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from prunetune.data import Source
from prunetune.data.cache import cached
from prunetune.data.download import HAM10000_MANUAL
from prunetune.data.images import decode_all
from prunetune.errors import UserError

CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
METADATA = "HAM10000_metadata.csv"
EXPECTED = (f"{METADATA} (lesion_id, image_id, dx, ...) and the ISIC_*.jpg images under "
            "HAM10000_images_part_1/ and HAM10000_images_part_2/ (or one folder)")


def read_metadata(path: Path) -> list[dict]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"data.root: cannot read {path} ({exc})") from None
    if not rows:
        raise UserError(f"data.root: {path} has no rows")
    missing = {"lesion_id", "image_id", "dx"} - set(rows[0])
    if missing:
        raise UserError(f"data.root: {path} lacks the column(s) {', '.join(sorted(missing))} "
                        "(expected lesion_id, image_id, dx, ...)")
    bad = sorted({r["dx"] for r in rows} - set(CLASSES))
    if bad:
        raise UserError(f"data.root: {path} has unknown dx value(s) {', '.join(bad)}; "
                        f"allowed: {', '.join(CLASSES)}")
    return rows


def find_images(root: Path) -> dict[str, Path]:
    """image_id → file, from the root and the folders one level below it."""
    found: dict[str, Path] = {}
    for folder in [root, *sorted(p for p in root.iterdir() if p.is_dir())]:
        for f in sorted(folder.glob("*.jpg")):
            found.setdefault(f.stem, f)  # Kaggle's copy holds each part twice; the first is kept
    return found


def load(data_spec) -> Source:
    if data_spec.root is None:
        raise UserError(f"data.root: ham10000 needs the folder holding {EXPECTED}; {HAM10000_MANUAL}")
    root = Path(data_spec.root)
    if not (root / METADATA).is_file():
        raise UserError(f"data.root: {root} lacks {METADATA}; expected {EXPECTED}; {HAM10000_MANUAL}")
    rows = read_metadata(root / METADATA)
    images = find_images(root)
    absent = [r["image_id"] for r in rows if r["image_id"] not in images]
    if absent:
        raise UserError(f"data.root: {len(absent)} image(s) listed in {METADATA} are missing under {root}, "
                        f"e.g. {absent[0]}.jpg; expected {EXPECTED}; {HAM10000_MANUAL}")
    paths = [images[r["image_id"]] for r in rows]

    def build() -> Source:
        return Source(images=decode_all(paths, data_spec.image_size),
                      labels=np.array([CLASSES.index(r["dx"]) for r in rows], dtype=np.int64),
                      ids=[r["image_id"] for r in rows], classes=list(CLASSES),
                      groups=np.array([r["lesion_id"] for r in rows]), id_name="image_id")

    return cached("ham10000", [root / METADATA, *paths], data_spec.image_size, build)
