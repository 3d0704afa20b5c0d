"""Datasets: each reads its publisher's on-disk layout from `data.root` (fetched there first with
`data.download: true` where the publisher serves it with a checksum: data/download.py), resized
once to `data.image_size` as uint8, then split (seeded, stratified by class).

A loader in the registry takes the DataSpec and returns a `Source`; `load_dataset` adds the split.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from prunetune import plugins, registry
from prunetune.data import download
from prunetune.errors import UserError


@dataclass
class Source:
    """What a dataset loader reads: all samples, resized, as uint8 [N, C, H, W]."""

    images: np.ndarray
    labels: np.ndarray  # int64 [N]
    ids: list[str]  # a stable id per sample, written to data/split.csv
    classes: list[str]
    official_split: np.ndarray | None = None  # "train"/"val"/"test" per sample where published
    groups: np.ndarray | None = None  # samples of one group never straddle splits (HAM lesion_id)
    id_name: str = "sample_id"  # the ids' column name in data/split.csv (HAM10000: image_id)


@dataclass
class Dataset(Source):
    split: np.ndarray | None = None  # "train" | "val" | "test" per sample

    def part(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """The images and labels of a split (copies: training reads through indices instead)."""
        idx = np.flatnonzero(self.split == name)
        return self.images[idx], self.labels[idx]

    @property
    def in_channels(self) -> int:
        return int(self.images.shape[1])


def stratified_split(labels: np.ndarray, fractions: dict[str, float], seed: int,
                     groups: np.ndarray | None = None) -> np.ndarray:
    """Assign each sample to "train" or one of `fractions`' splits, per class, seeded.

    Per class, fraction · n_class samples (rounded so the split's total is round(fraction · n)) go
    to each split. With
    `groups`, whole groups are assigned (by their majority class), so no group straddles splits.
    """
    rng = np.random.default_rng(seed)
    out = np.full(len(labels), "train", dtype=object)
    if groups is None:
        units = np.arange(len(labels))
        unit_of = units
        unit_label = labels
        unit_size = np.ones(len(labels), dtype=int)
    else:
        units, unit_of = np.unique(groups, return_inverse=True)
        unit_label = np.array([np.bincount(labels[unit_of == u]).argmax() for u in range(len(units))])
        unit_size = np.bincount(unit_of)
    assignment = np.full(len(units), "train", dtype=object)
    classes = np.unique(unit_label)
    class_size = np.array([unit_size[unit_label == c].sum() for c in classes])
    want = {name: _largest_remainder(fraction * class_size, round(fraction * class_size.sum()), rng)
            for name, fraction in fractions.items()}
    taken = np.zeros(len(units), dtype=bool)
    for ci, c in enumerate(classes):
        members = rng.permutation(np.flatnonzero(unit_label == c))
        for name in fractions:
            got = 0
            # whole units (samples, or groups), in random order, while they fit the split's share
            for m in members:
                if not taken[m] and got + unit_size[m] <= want[name][ci]:
                    assignment[m] = name
                    got += unit_size[m]
                    taken[m] = True
                    if got == want[name][ci]:
                        break
    out[:] = assignment[unit_of]
    return out.astype(str)


def _largest_remainder(quotas: np.ndarray, total: int, rng: np.random.Generator) -> np.ndarray:
    """Integers near `quotas` (each floor or ceil) that sum to `total`: per-class counts that keep
    class proportions within rounding while the split's size is exact, even for tiny classes."""
    counts = np.floor(quotas).astype(int)
    remainder = quotas - counts
    order = np.lexsort((rng.random(len(quotas)), -remainder))
    counts[order[:max(0, total - counts.sum())]] += 1
    return counts


def load_dataset(data_spec, echo=None) -> Dataset:
    """Read `data_spec.dataset` from its root (fetched first with `data.download: true` if its files
    are not there, saying so through `echo`), resized to `image_size`, and split it. The split of
    data without a published one is drawn by `data_spec.split_seed` alone: a trial's `seed` (and
    its replicates) change initialisation, batch order and augmentation, never the test images."""
    download.fetch(data_spec, echo)  # on every machine that reads data.root: nodes need not share a disk
    seed = data_spec.split_seed
    if plugins.is_ref(data_spec.dataset):  # the user's own factory
        from prunetune.data.plugin import load as load_plugin

        src: Source = load_plugin(data_spec)
    else:
        src = registry.lookup(registry.DATASETS, data_spec.dataset)(data_spec)
    if src.official_split is not None:
        # Published splits are kept; a split the publisher left out is carved from train.
        split = src.official_split.astype(object).copy()
        missing = {name: fraction for name, fraction in (("test", data_spec.test_fraction),
                                                         ("val", data_spec.val_fraction))
                   if fraction > 0 and not (split == name).any()}
        if missing:
            train = np.flatnonzero(split == "train")
            split[train] = stratified_split(src.labels[train], missing, seed,
                                            None if src.groups is None else src.groups[train])
        split = split.astype(str)
    else:
        split = stratified_split(src.labels, {"test": data_spec.test_fraction, "val": data_spec.val_fraction},
                                 seed, src.groups)
    for part in ("train", "test"):
        if not (split == part).any():
            raise UserError(f"data: the {part} split of {data_spec.dataset} is empty ({len(split)} samples"
                            + (", split by group" if src.groups is not None else "")
                            + "); raise data.test_fraction or use more data")
    return Dataset(**vars(src), split=split)


def resize_uint8(images: np.ndarray, size: int) -> np.ndarray:
    """Resize uint8 [N, C, H, W] to size × size (bilinear, antialiased), in chunks. Enlarging
    (digits, MedMNIST) is plain bilinear interpolation, done in NumPy: no torch import for it."""
    if images.shape[2] == size and images.shape[3] == size:
        return images
    if size >= images.shape[2] and size >= images.shape[3]:
        return _upsample_bilinear(images, size)
    import torch
    import torch.nn.functional as F

    out = np.empty((images.shape[0], images.shape[1], size, size), dtype=np.uint8)
    for start in range(0, len(images), 1024):
        x = torch.from_numpy(images[start:start + 1024]).float()
        y = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[start:start + 1024] = y.round().clamp(0, 255).to(torch.uint8).numpy()
    return out


def _linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of bilinear interpolation from n_in to n_out samples, with
    torch's `align_corners=False` convention (pixel centres at i + 0.5)."""
    x = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
    i0 = np.floor(x).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, x - i0


def _upsample_bilinear(images: np.ndarray, size: int) -> np.ndarray:
    r0, r1, wr = _linear_taps(images.shape[2], size)
    c0, c1, wc = _linear_taps(images.shape[3], size)
    out = np.empty((images.shape[0], images.shape[1], size, size), dtype=np.uint8)
    for start in range(0, len(images), 1024):
        x = images[start:start + 1024].astype(np.float32)
        rows = x[:, :, r0] * (1 - wr)[:, None].astype(np.float32) + x[:, :, r1] * wr[:, None].astype(np.float32)
        y = rows[..., c0] * (1 - wc).astype(np.float32) + rows[..., c1] * wc.astype(np.float32)
        out[start:start + 1024] = np.clip(np.round(y), 0, 255).astype(np.uint8)
    return out
