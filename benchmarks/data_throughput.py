"""Training-epoch throughput on the HAM10000 layout: prunetune's pipeline (decode once into the
uint8 cache, batches from device-resident tensors, augmentation on the device) against the seed
projects' pipeline (torchvision ImageFolder + DataLoader workers that decode and resize every
JPEG every epoch), in one run, on the same images, model and batch size.

    python benchmarks/data_throughput.py [--images 2000] [--size 64] [--epochs 4] [--workers N] [--device auto]
                                         [--model simple_cnn|none]

It writes a synthetic HAM10000 release (HAM10000_metadata.csv + 600×450 ISIC_*.jpg in
HAM10000_images_part_1/_part_2, the published size and layout) to a temporary folder, with an
ImageFolder view of the same files (symlinks), and uses an empty decode cache. Each epoch is a
full pass of SGD steps of prunetune's simple_cnn (small, so the data pipeline is what is timed;
`--model none` times the batches alone: each is only reduced to a sum).
Epoch 1 of prunetune includes the one-time decoding; the ratio is taken over epochs 2+ (medians).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def write_ham(root: Path, n: int, seed: int = 0) -> None:
    from torchvision.io import encode_jpeg

    rng = np.random.default_rng(seed)
    classes = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    weights = np.array([327, 514, 1099, 115, 1113, 6705, 142], dtype=float)  # HAM10000's class counts
    labels = rng.choice(7, n, p=weights / weights.sum())
    lines = ["lesion_id,image_id,dx,dx_type,age,sex,localization"]
    yy, xx = np.mgrid[0:450, 0:600]
    for i, label in enumerate(labels):
        folder = root / f"HAM10000_images_part_{1 + i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        # a smooth, lesion-like blob on skin tone, plus noise: JPEG sizes near the real files'
        r = np.hypot(yy - 225 + rng.integers(-40, 40), xx - 300 + rng.integers(-40, 40))
        blob = (r < rng.integers(100, 200))[..., None] * np.array([-90, -60, -50]) * (0.5 + label / 12)
        img = np.clip(np.array([200, 150, 130]) + blob + rng.normal(0, 12, (450, 600, 3)), 0, 255).astype(np.uint8)
        image_id = f"ISIC_{24306 + i:07d}"
        (folder / f"{image_id}.jpg").write_bytes(bytes(encode_jpeg(torch.from_numpy(img).permute(2, 0, 1).contiguous(),
                                                                   quality=90).numpy()))
        lines.append(f"HAM_{i // 2:07d},{image_id},{classes[label]},histo,50.0,male,back")
        view = root.parent / "imagefolder" / "train" / classes[label]
        view.mkdir(parents=True, exist_ok=True)
        (view / f"{image_id}.jpg").symlink_to(folder / f"{image_id}.jpg")
    (root / "HAM10000_metadata.csv").write_text("\n".join(lines) + "\n")


def sgd_step(model, opt, x, y) -> None:
    if model is None:  # --model none: the batches alone
        float(x.sum())
        return
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def make_model(name: str, size: int, device: torch.device):
    from prunetune.models import simple_cnn

    if name == "none":
        return None, None
    torch.manual_seed(0)
    model = simple_cnn(7, 3, True, size).to(device)
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def time_prunetune(root: Path, size: int, epochs: int, batch: int, device: torch.device, arch: str) -> list[float]:
    from prunetune import spec
    from prunetune.data import load_dataset
    from prunetune.data.device import DeviceData
    rates = []
    model, opt = make_model(arch, size, device)
    t0 = time.perf_counter()
    # epoch 1 pays for reading and decoding (an empty cache); later trials read the cache
    data = DeviceData(load_dataset(spec.DataSpec(dataset="ham10000", root=str(root), image_size=size,
                                                 val_fraction=0.1, test_fraction=0.15)),
                      device, augment=["flip", "crop"])
    n = data.size("train")
    for epoch in range(epochs):
        if epoch:
            t0 = time.perf_counter()
        perm = torch.randperm(n, device=device)
        for s in range(0, n - batch + 1, batch):
            sgd_step(model, opt, *data.train_batch(perm[s:s + batch]))
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append((n // batch) * batch / (time.perf_counter() - t0))
    return rates


def time_imagefolder(root: Path, size: int, epochs: int, batch: int, device: torch.device, workers: int,
                     arch: str) -> list[float]:
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.Resize((size, size)), transforms.RandomCrop(size, padding=size // 8),
                             transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                             transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    loader = torch.utils.data.DataLoader(datasets.ImageFolder(str(root), tf), batch_size=batch, shuffle=True,
                                         drop_last=True, num_workers=workers, pin_memory=device.type == "cuda",
                                         persistent_workers=workers > 0)
    model, opt = make_model(arch, size, device)
    rates = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        seen = 0
        for x, y in loader:
            sgd_step(model, opt, x.to(device, non_blocking=True), y.to(device, non_blocking=True))
            seen += len(y)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(seen / (time.perf_counter() - t0))
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--model", default="simple_cnn", choices=["simple_cnn", "none"])
    args = ap.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["PRUNETUNE_CACHE"] = str(Path(tmp) / "cache")  # an empty decode cache
        ham = Path(tmp) / "HAM10000"
        t0 = time.perf_counter()
        write_ham(ham, args.images)
        print(f"wrote {args.images} 600x450 JPEGs in {time.perf_counter() - t0:.0f} s; device {device}, "
              f"{os.cpu_count()} CPUs, {args.workers} DataLoader workers, {args.size} px, batch {args.batch}, "
              f"model {args.model}")
        base = time_imagefolder(Path(tmp) / "imagefolder" / "train", args.size, args.epochs, args.batch, device,
                                args.workers, args.model)
        ours = time_prunetune(ham, args.size, args.epochs, args.batch, device, args.model)
    print(f"{'epoch':>5} {'ImageFolder+DataLoader img/s':>30} {'prunetune img/s':>17}")
    for i, (b, o) in enumerate(zip(base, ours), 1):
        print(f"{i:>5} {b:>30.0f} {o:>17.0f}" + ("   (prunetune: includes decoding once)" if i == 1 else ""))
    b2, o2 = statistics.median(base[1:]), statistics.median(ours[1:])
    print(f"epochs 2-{args.epochs}, medians: ImageFolder {b2:.0f} img/s, prunetune {o2:.0f} img/s: "
          f"{o2 / b2:.1f}x")


if __name__ == "__main__":
    main()
