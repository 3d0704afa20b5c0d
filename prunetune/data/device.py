"""Device-resident batches: the dataset lives on the training device as one uint8 tensor, each
split as the indices of its samples; batches are gathered by indexing a seeded permutation,
converted, normalised and augmented there (no DataLoader workers, no per-sample Python).

Memory: the images are not copied per split, and on the CPU not copied at all (a tensor over the
dataset's array, which may be read-only shared memory from Ray's object store); statistics are
accumulated chunk by chunk, never over a float copy of the whole set."""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalisation(images: np.ndarray, imagenet: bool, device: torch.device,
                  index: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std (shape 1×C×1×1, on `device`) that inputs are normalised with:
    ImageNet's for 3-channel data when `imagenet` (a model from ImageNet weights), else those of
    the uint8 `images` (those at `index`: the training split), accumulated in float64 a chunk at
    a time (a float64 copy of the set would be 8× its size)."""
    channels = images.shape[1]
    if imagenet and channels == 3:
        mean, std = torch.tensor(IMAGENET_MEAN) * 255, torch.tensor(IMAGENET_STD) * 255
    else:
        index = np.arange(len(images)) if index is None else np.asarray(index)
        total, total_sq = np.zeros(channels), np.zeros(channels)
        for start in range(0, len(index), 256):
            chunk = images[index[start:start + 256]].astype(np.float64)
            total += chunk.sum(axis=(0, 2, 3))
            total_sq += np.square(chunk).sum(axis=(0, 2, 3))
        n = len(index) * images.shape[2] * images.shape[3]
        mean_np = total / n
        var = (total_sq - n * mean_np ** 2) / max(n - 1, 1)  # unbiased, as torch.std
        mean, std = torch.from_numpy(mean_np), torch.from_numpy(np.sqrt(np.maximum(var, 0))).clamp_min(1.0)
    return (mean.float().view(1, channels, 1, 1).to(device), std.float().view(1, channels, 1, 1).to(device))


class DeviceData:
    def __init__(self, dataset, device: torch.device, augment: list[str] = (), imagenet_stats: bool = False):
        self.device = device
        self.augment = list(augment)
        with warnings.catch_warnings():  # a read-only array (shared memory) is only ever read
            warnings.simplefilter("ignore", UserWarning)
            self.images = torch.from_numpy(np.ascontiguousarray(dataset.images)).to(device)
        self.index: dict[str, torch.Tensor] = {}
        self.y: dict[str, torch.Tensor] = {}
        labels = torch.from_numpy(np.asarray(dataset.labels))
        for split in ("train", "val", "test"):
            idx = torch.from_numpy(np.flatnonzero(dataset.split == split))
            self.index[split] = idx.to(device)
            self.y[split] = labels[idx].to(device)
        self.num_classes = len(dataset.classes)
        self.mean, self.std = normalisation(dataset.images, imagenet_stats, device,
                                            index=np.flatnonzero(dataset.split == "train"))

    def size(self, split: str) -> int:
        return len(self.y[split])

    def images_of(self, split: str, positions: torch.Tensor | slice) -> torch.Tensor:
        """uint8 images of `split` at `positions` (within the split)."""
        return self.images[self.index[split][positions]]

    def prepare(self, x: torch.Tensor, augment: bool = False) -> torch.Tensor:
        x = (x.float() - self.mean) / self.std
        if augment and "crop" in self.augment:
            x = random_crop(x, pad=max(1, x.shape[-1] // 8))
        if augment and "flip" in self.augment:
            flip = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < 0.5
            x = torch.where(flip, x.flip(-1), x)
        return x

    def train_batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.prepare(self.images_of("train", index), augment=True), self.y["train"][index]

    def eval_batches(self, split: str, batch_size: int):
        for start in range(0, self.size(split), batch_size):
            part = slice(start, start + batch_size)
            yield self.prepare(self.images_of(split, part)), self.y[split][part]


def random_crop(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Per-sample random translation by up to `pad` pixels (zero padding), on x's device."""
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), device=x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), device=x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    return padded[torch.arange(n, device=x.device)[:, None, None, None],
                  torch.arange(c, device=x.device)[None, :, None, None], rows, cols]
