"""Decoding image files (JPEG, PNG, ...) into one uint8 [N, 3, size, size] array, in parallel
threads. Images are resized to a square `size` × `size` (bilinear, antialiased), as the usual
HAM10000 pipelines do; the aspect ratio is not kept."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms.v2 import functional as TF

from prunetune.errors import UserError

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


def decode_one(path: Path, size: int) -> np.ndarray:
    try:
        img = decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError) as exc:
        raise UserError(f"data.root: cannot decode image {path} ({exc})") from None
    if img.shape[-2:] != (size, size):
        img = TF.resize(img, [size, size], antialias=True)
    return img.to(torch.uint8).numpy()


def decode_all(paths: list[Path], size: int) -> np.ndarray:
    """Every image in `paths`, decoded and resized, in order."""
    out = np.empty((len(paths), 3, size, size), dtype=np.uint8)

    def work(i: int) -> None:
        out[i] = decode_one(paths[i], size)

    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        list(pool.map(work, range(len(paths))))  # list(): re-raise the first error
    return out
