"""Device-resident batches: each split lives on the training device as one uint8 tensor;
batches are taken by indexing a seeded permutation, converted, normalised and augmented there
(no DataLoader workers, no per-sample Python)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalisation(train_images: np.ndarray, imagenet: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std (shape 1×C×1×1, on `device`) that inputs are normalised with:
    ImageNet's for 3-channel data when `imagenet` (a model from ImageNet weights), else those of
    the training split's uint8 images."""
    channels = train_images.shape[1]
    if imagenet and channels == 3:
        mean, std = torch.tensor(IMAGENET_MEAN) * 255, torch.tensor(IMAGENET_STD) * 255
    else:
        # Per-channel statistics of the training split, in float64 for a stable sum.
        train = torch.from_numpy(train_images).double()
        mean = train.mean(dim=(0, 2, 3))
        std = train.std(dim=(0, 2, 3)).clamp_min(1.0)
    return (mean.float().view(1, channels, 1, 1).to(device), std.float().view(1, channels, 1, 1).to(device))


class DeviceData:
    def __init__(self, dataset, device: torch.device, augment: list[str] = (), imagenet_stats: bool = False):
        self.device = device
        self.augment = list(augment)
        self.x: dict[str, torch.Tensor] = {}
        self.y: dict[str, torch.Tensor] = {}
        for split in ("train", "val", "test"):
            images, labels = dataset.part(split)
            self.x[split] = torch.from_numpy(np.ascontiguousarray(images)).to(device)
            self.y[split] = torch.from_numpy(labels).to(device)
        self.num_classes = len(dataset.classes)
        self.mean, self.std = normalisation(dataset.part("train")[0], imagenet_stats, device)

    def size(self, split: str) -> int:
        return len(self.y[split])

    def prepare(self, x: torch.Tensor, augment: bool = False) -> torch.Tensor:
        x = (x.float() - self.mean) / self.std
        if augment and "crop" in self.augment:
            x = random_crop(x, pad=max(1, x.shape[-1] // 8))
        if augment and "flip" in self.augment:
            flip = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < 0.5
            x = torch.where(flip, x.flip(-1), x)
        return x

    def train_batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.prepare(self.x["train"][index], augment=True), self.y["train"][index]

    def eval_batches(self, split: str, batch_size: int):
        for start in range(0, self.size(split), batch_size):
            yield self.prepare(self.x[split][start:start + batch_size]), self.y[split][start:start + batch_size]


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
