"""Your own dataset: `data.dataset: "package.module:factory"`, called as `factory(**data.kwargs)`.

The factory returns a mapping with
- `images`: uint8, [N, H, W, C] or [N, H, W] (grayscale);
- `labels`: integers in [0, K), [N];
- optionally `classes` (K names; default "0" … "K-1"), `split` (per sample "train", "val" or
  "test": kept as published, like MedMNIST's) and `groups` (per sample: a group never straddles
  splits, like HAM10000's lesions).
Without a `split`, the stratified (and group-aware) split is drawn by `data.split_seed`, as for
the built-in datasets. It may instead return `{"train": ds, "val": ds, "test": ds}` (val
optional) of `torch.utils.data.Dataset`s whose items are (image, label), the image a PIL image,
a uint8 array [H, W(, C)] or a tensor [C, H, W] (uint8, or floats in [0, 1]): they are read and
resized once, and kept in the cache keyed by the factory's code (`plugins.source_digest`), its
kwargs and the Datasets' lengths (files they read are not in the key).

The images are resized once to `data.image_size` and kept, as uint8, in the decode cache, keyed
by a digest of what the factory returned: the factory runs each time, the resize once.
"""

from __future__ import annotations

import hashlib

import numpy as np

from prunetune import plugins
from prunetune.data import Source, resize_uint8
from prunetune.errors import UserError

KEY = "data.dataset"
SPLITS = ("train", "val", "test")


def load(data_spec) -> Source:
    from prunetune.data.cache import cached_by_digest

    ref, size = data_spec.dataset, data_spec.image_size
    out = plugins.call_factory(KEY, ref, **data_spec.kwargs)
    if isinstance(out, dict) and out and set(out) <= set(SPLITS) and not isinstance(out.get("train"), np.ndarray):
        # Datasets per split: read once, keyed by what makes them (their code, kwargs and sizes)
        key = _digest(ref, repr(sorted(data_spec.kwargs.items())), plugins.source_digest(ref), _sizes(ref, out))
        return cached_by_digest(f"plugin-datasets-{key}", size, lambda: _source(_checked(ref, _materialise(ref, out)),
                                                                                 size))
    arrays = _checked(ref, out)
    return cached_by_digest(f"plugin-{_digest(*arrays)}", size, lambda: _source(arrays, size))


def _source(arrays: tuple, size: int) -> Source:
    images, labels, split, groups, classes = arrays
    return Source(images=resize_uint8(_nchw(images), size), labels=labels, ids=[f"{i}" for i in range(len(labels))],
                  classes=classes, official_split=split, groups=groups)


def _sizes(ref: str, splits: dict) -> dict[str, int]:
    try:
        return {name: len(ds) for name, ds in sorted(splits.items())}
    except TypeError:
        raise _fail(ref, "a Dataset without a length; return map-style Datasets (with __len__ and "
                         "__getitem__)") from None


def _fail(ref: str, what: str) -> UserError:
    return UserError(f"{KEY}: {ref} returned {what}")


def _checked(ref: str, out):
    """The factory's arrays, checked: UserError naming data.dataset and what is wrong."""
    if not isinstance(out, dict) or "images" not in out or "labels" not in out:
        raise _fail(ref, f"a {type(out).__name__}; expected a mapping with 'images' (uint8 [N, H, W, C] or "
                         "[N, H, W]) and 'labels' (int [N]), or {'train': Dataset, 'test': Dataset}")
    extra = sorted(set(out) - {"images", "labels", "classes", "split", "groups"})
    if extra:
        raise _fail(ref, f"unknown key {extra[0]!r}; allowed: images, labels, classes, split, groups")
    images, labels = np.asarray(out["images"]), np.asarray(out["labels"])
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or len(images) == 0:
        raise _fail(ref, f"images of dtype {images.dtype} and shape {list(images.shape)}; expected uint8 "
                         "[N, H, W, C] or [N, H, W]")
    if images.ndim == 4 and images.shape[-1] not in (1, 3):
        raise _fail(ref, f"images of shape {list(images.shape)}: channels go last, [N, H, W, C] with C 1 or 3"
                         + (" (this looks like [N, C, H, W]: transpose it)" if images.shape[1] in (1, 3) else ""))
    n = len(images)
    if not np.issubdtype(labels.dtype, np.integer) or labels.shape != (n,):
        raise _fail(ref, f"labels of dtype {labels.dtype} and shape {list(labels.shape)}; expected integers [{n}]")
    if labels.min() < 0:
        raise _fail(ref, f"a negative label ({labels.min()}); labels are class indices 0 … K-1")
    classes = out.get("classes")
    k = int(labels.max()) + 1
    classes = [str(c) for c in (classes if classes is not None else range(k))]
    if len(classes) < k:
        raise _fail(ref, f"{len(classes)} classes, but labels up to {k - 1}")
    split = _per_sample(ref, out, "split", n)
    if split is not None:
        split = split.astype(str)
        bad = sorted(set(split.tolist()) - set(SPLITS))
        if bad:
            raise _fail(ref, f"split value {bad[0]!r}; allowed: train, val, test")
    groups = _per_sample(ref, out, "groups", n)
    return images, labels.astype(np.int64), split, None if groups is None else groups.astype(str), classes


def _per_sample(ref: str, out: dict, key: str, n: int) -> np.ndarray | None:
    if out.get(key) is None:
        return None
    values = np.asarray(out[key])
    if values.shape != (n,):
        raise _fail(ref, f"{key} of shape {list(values.shape)}; expected one value per sample [{n}]")
    return values


def _nchw(images: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2))


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        if part is None:
            h.update(b"-")
        elif isinstance(part, np.ndarray):
            h.update(f"{part.dtype}{part.shape}".encode())
            h.update(np.ascontiguousarray(part).tobytes() if part.dtype != object else repr(part.tolist()).encode())
        else:
            h.update(repr(part).encode())
    return h.hexdigest()[:16]


def _materialise(ref: str, splits: dict) -> dict:
    """{"train": Dataset, ...} → one mapping with a `split`: every item read once."""
    images, labels, split = [], [], []
    for name, ds in splits.items():
        try:
            for i in range(len(ds)):
                image, label = ds[i]
                images.append(_uint8_hwc(ref, image))
                labels.append(int(label))
                split.append(name)
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - the user's dataset failing is their input
            raise UserError(f"{KEY}: reading {ref}'s {name} dataset failed ({plugins.one_line(exc)}); items "
                            "must be (image, label)") from None
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise _fail(ref, f"images of {len(shapes)} shapes ({', '.join(map(str, sorted(shapes)[:3]))}); "
                         "a Dataset's images must share one size")
    return {"images": np.stack(images), "labels": np.array(labels, dtype=np.int64), "split": np.array(split)}


def _uint8_hwc(ref: str, image) -> np.ndarray:
    """A Dataset's image as uint8 [H, W(, C)]: a PIL image (as L or RGB), a uint8 array
    [H, W(, C)], or a tensor [C, H, W] of uint8 or of floats in [0, 1] (ToTensor's)."""
    if hasattr(image, "convert") and hasattr(image, "mode"):  # a PIL image
        return np.asarray(image if image.mode in ("L", "RGB") else image.convert("RGB"), dtype=np.uint8)
    if hasattr(image, "detach"):
        arr = image.detach().cpu().numpy()
        if arr.ndim == 3:
            arr = arr.transpose(1, 2, 0)
        if arr.dtype != np.uint8:
            if arr.size and (arr.min() < 0 or arr.max() > 1):
                raise _fail(ref, f"a Dataset image tensor with values in [{arr.min():.3g}, {arr.max():.3g}]; "
                                 "expected uint8, or floats in [0, 1] (leave normalisation to prunetune)")
            arr = np.round(arr * 255.0).astype(np.uint8)
        return arr
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise _fail(ref, f"a Dataset image of dtype {arr.dtype}; expected a PIL image, uint8 array or tensor")
    return arr
