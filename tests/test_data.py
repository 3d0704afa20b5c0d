"""Datasets read from their published layouts; seeded, stratified splits; device batches."""

import numpy as np
import pytest
import torch

from prunetune import spec
from prunetune.data import load_dataset, stratified_split
from prunetune.data.device import DeviceData, random_crop
from prunetune.errors import UserError

from conftest import write_cifar10, write_cifar100


def data_spec(**kw):
    return spec.DataSpec(**kw)


def test_digits_split_is_seeded_and_stratified():
    a = load_dataset(data_spec(dataset="digits", image_size=8))
    b = load_dataset(data_spec(dataset="digits", image_size=8))
    c = load_dataset(data_spec(dataset="digits", image_size=8, split_seed=1))
    assert a.images.shape == (1797, 1, 8, 8) and a.images.dtype == np.uint8
    assert (a.split == b.split).all() and (a.split != c.split).any()
    for c_ in range(10):
        n = int((a.labels == c_).sum())
        assert abs(int(((a.labels == c_) & (a.split == "test")).sum()) - 0.15 * n) < 1
        assert abs(int(((a.labels == c_) & (a.split == "val")).sum()) - 0.1 * n) < 1


def test_stratified_split_keeps_groups_whole():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(300), rng.integers(1, 4, 300))
    labels = (groups % 3 == 0).astype(int)
    split = stratified_split(labels, {"test": 0.2, "val": 0.1}, seed=0, groups=groups)
    for g in np.unique(groups):
        assert len(set(split[groups == g])) == 1


@pytest.mark.parametrize("writer,name,classes", [(write_cifar10, "cifar10", 10), (write_cifar100, "cifar100", 100)])
def test_cifar_pickle_layout(tmp_path, writer, name, classes):
    root = writer(tmp_path)
    ds = load_dataset(data_spec(dataset=name, root=str(root), image_size=16))
    assert len(ds.classes) == classes and ds.images.shape[1:] == (3, 16, 16)
    assert (ds.split == "test").sum() > 0 and (ds.split == "val").sum() > 0
    # the folder itself works as root too
    inner = next(root.iterdir())
    assert len(load_dataset(data_spec(dataset=name, root=str(inner))).labels) == len(ds.labels)


def test_cifar_missing_root_names_expected_files(tmp_path):
    with pytest.raises(UserError) as exc:
        load_dataset(data_spec(dataset="cifar100", root=str(tmp_path / "nowhere")))
    assert "cifar-100-python" in str(exc.value) and "train" in str(exc.value) and "meta" in str(exc.value)
    with pytest.raises(UserError, match="data.root"):
        load_dataset(data_spec(dataset="cifar10"))


def test_cifar_malformed_file(tmp_path):
    root = write_cifar100(tmp_path)
    (root / "cifar-100-python" / "train").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="train"):
        load_dataset(data_spec(dataset="cifar100", root=str(root)))


def test_cifar_refuses_code_in_pickles(tmp_path):
    import os
    import pickle
    root = write_cifar100(tmp_path)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    (root / "cifar-100-python" / "meta").write_bytes(pickle.dumps({b"fine_label_names": Evil()}))
    with pytest.raises(UserError, match="refusing"):
        load_dataset(data_spec(dataset="cifar100", root=str(root)))


def test_device_batches_normalised_and_augmented_on_device():
    ds = load_dataset(data_spec(dataset="digits", image_size=8))
    data = DeviceData(ds, torch.device("cpu"), augment=["flip", "crop"])
    x, y = data.train_batch(torch.arange(256))
    assert x.dtype == torch.float32 and x.shape == (256, 1, 8, 8)
    plain = data.prepare(data.images_of("train", slice(0, 256)))
    assert abs(float(plain.mean())) < 0.2 and abs(float(plain.std()) - 1) < 0.2
    assert not torch.equal(x, plain)  # augmentation changed something


def test_random_crop_is_a_translation():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6) + 1
    out = random_crop(x, pad=2)
    assert out.shape == x.shape
    for i in range(2):  # each output is a shifted window of the zero-padded input
        padded = torch.nn.functional.pad(x[i], (2, 2, 2, 2))
        assert any(torch.equal(out[i], padded[:, dy:dy + 6, dx:dx + 6]) for dy in range(5) for dx in range(5))


def test_split_sizes_exact_even_with_tiny_classes():
    labels = np.repeat(np.arange(100), 2)  # 2 samples per class, as tiny fixtures have
    split = stratified_split(labels, {"val": 0.1}, seed=0)
    assert (split == "val").sum() == 20
    for c in range(100):
        assert ((labels == c) & (split == "val")).sum() <= 1


@pytest.mark.parametrize("shape,size", [((5, 1, 8, 8), 16), ((5, 1, 8, 8), 32), ((3, 3, 28, 28), 32),
                                        ((2, 3, 7, 9), 9)])
def test_numpy_upsampling_matches_torch_bilinear(shape, size):
    import torch
    import torch.nn.functional as F

    from prunetune.data import resize_uint8

    images = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    ours = resize_uint8(images, size)
    y = F.interpolate(torch.from_numpy(images).float(), size=(size, size), mode="bilinear", antialias=True,
                      align_corners=False)
    theirs = y.round().clamp(0, 255).to(torch.uint8).numpy()
    assert ours.shape == theirs.shape
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1  # float rounding at most


def test_digits_are_scikit_learns():
    from sklearn.datasets import load_digits

    ours = load_dataset(data_spec(dataset="digits", image_size=8))
    bunch = load_digits()
    assert (ours.labels == bunch.target).all()
    assert (ours.images[:, 0] == np.round(bunch.images * 255 / 16).astype(np.uint8)).all()
