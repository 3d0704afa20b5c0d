"""The medical-imaging path: HAM10000, ImageFolder and MedMNIST read from their published layouts,
lesion-grouped stratified splits, the decode cache, imbalance metrics and options, and transfer
learning from a local state_dict."""

import csv
import os

import numpy as np
import pytest
import torch

from prunetune import spec
from prunetune.data import ham10000, load_dataset
from prunetune.data.device import IMAGENET_MEAN
from prunetune.errors import UserError
from prunetune.train import classification_metrics
from prunetune.trial import Trial, run_trial

from conftest import HAM_CLASSES, write_ham10000, write_imagefolder, write_medmnist


def ham_spec(root, **kw):
    return spec.DataSpec(dataset="ham10000", root=str(root), image_size=kw.pop("image_size", 16), **kw)


def test_ham10000_layout_classes_and_lesion_grouped_split(tmp_path):
    root = write_ham10000(tmp_path / "HAM10000")
    ds = load_dataset(ham_spec(root, val_fraction=0.1, test_fraction=0.2))
    meta = list(csv.DictReader((root / "HAM10000_metadata.csv").read_text().splitlines()))
    assert ds.classes == list(HAM_CLASSES) and ds.id_name == "image_id"
    assert ds.ids == [r["image_id"] for r in meta]
    assert [ds.classes[c] for c in ds.labels] == [r["dx"] for r in meta]
    assert ds.images.shape == (len(meta), 3, 16, 16) and ds.images.dtype == np.uint8
    lesion = np.array([r["lesion_id"] for r in meta])
    for g in np.unique(lesion):  # no lesion straddles splits
        assert len(set(ds.split[lesion == g])) == 1, g
    # per class, each split holds its share within rounding: whole lesions of up to 3 images
    for c in range(7):
        n = int((ds.labels == c).sum())
        for part, fraction in (("test", 0.2), ("val", 0.1)):
            got = int(((ds.labels == c) & (ds.split == part)).sum())
            assert got <= fraction * n + 1 and got >= fraction * n - 3, (c, part, got, n)
    # images decoded from the JPEGs: class-dependent colour survives (red channel rises with class)
    red = [ds.images[ds.labels == c, 0].mean() for c in range(7)]
    assert red == sorted(red)


def test_ham10000_one_folder_gives_the_same_data(tmp_path):
    parts = load_dataset(ham_spec(write_ham10000(tmp_path / "a")))
    one = load_dataset(ham_spec(write_ham10000(tmp_path / "b", one_folder=True)))
    assert (parts.images == one.images).all() and parts.ids == one.ids and (parts.split == one.split).all()


@pytest.mark.parametrize("damage,needle", [
    ("no_root", "HAM10000_metadata.csv"),
    ("no_csv", "HAM10000_metadata.csv"),
    ("missing_image", ".jpg"),
    ("bad_dx", "allowed: akiec, bcc, bkl, df, mel, nv, vasc"),
    ("no_column", "lesion_id"),
])
def test_ham10000_bad_layouts_say_what_is_expected(tmp_path, damage, needle):
    root = write_ham10000(tmp_path / "HAM10000", lesions_per_class=(1,) * 7)
    csv_path = root / "HAM10000_metadata.csv"
    if damage == "no_root":
        root = tmp_path / "nowhere"
    elif damage == "no_csv":
        csv_path.unlink()
    elif damage == "missing_image":
        next(root.glob("*/ISIC_*.jpg")).unlink()
    elif damage == "bad_dx":
        csv_path.write_text(csv_path.read_text().replace(",nv,", ",naevus,"))
    elif damage == "no_column":
        csv_path.write_text(csv_path.read_text().replace("lesion_id,", "lesion,", 1))
    with pytest.raises(UserError) as exc:
        load_dataset(ham_spec(root))
    assert str(exc.value).startswith("data.root") and needle in str(exc.value)


def test_decode_cache_is_hit_on_the_second_run(tmp_path, monkeypatch):
    root = write_ham10000(tmp_path / "HAM10000")
    calls = []
    real = ham10000.decode_all
    monkeypatch.setattr(ham10000, "decode_all", lambda paths, size: calls.append(len(paths)) or real(paths, size))
    first = load_dataset(ham_spec(root, image_size=12))
    second = load_dataset(ham_spec(root, image_size=12, split_seed=1))
    assert len(calls) == 1  # decoded once, read from the cache the second time
    assert (first.images == second.images).all() and first.ids == second.ids
    assert (first.groups == second.groups).all() and first.classes == second.classes
    load_dataset(ham_spec(root, image_size=10))  # another size: another entry
    assert len(calls) == 2
    img = next(root.glob("*/ISIC_*.jpg"))
    os.utime(img, ns=(img.stat().st_atime_ns, img.stat().st_mtime_ns + 10**9))  # a changed file
    load_dataset(ham_spec(root, image_size=12))
    assert len(calls) == 3


def test_imagefolder_with_and_without_published_splits(tmp_path):
    root = write_imagefolder(tmp_path / "full", {"train": {"b": 6, "a": 8}, "val": {"a": 2, "b": 2},
                                                 "test": {"a": 3, "b": 1}})
    ds = load_dataset(spec.DataSpec(dataset="imagefolder", root=str(root), image_size=8))
    assert ds.classes == ["a", "b"] and ds.images.shape == (22, 3, 8, 8)
    assert [(ds.split == s).sum() for s in ("train", "val", "test")] == [14, 4, 4]
    assert "test/b/0.jpg" in ds.ids and "train/a/1.png" in ds.ids
    only_train = write_imagefolder(tmp_path / "train_only", {"train": {"a": 20, "b": 20}})
    ds = load_dataset(spec.DataSpec(dataset="imagefolder", root=str(only_train), image_size=8,
                                    val_fraction=0.1, test_fraction=0.2))
    assert [(ds.split == s).sum() for s in ("train", "val", "test")] == [28, 4, 8]
    with pytest.raises(UserError, match="train/"):
        load_dataset(spec.DataSpec(dataset="imagefolder", root=str(tmp_path)))


@pytest.mark.parametrize("channels", [1, 3])
def test_medmnist_npz(tmp_path, channels):
    path = write_medmnist(tmp_path / "dermamnist.npz", channels=channels)
    ds = load_dataset(spec.DataSpec(dataset="medmnist", root=str(path), image_size=16))
    z = np.load(path)
    assert ds.in_channels == channels and ds.images.shape[0] == 92
    assert [(ds.split == s).sum() for s in ("train", "val", "test")] == [60, 12, 20]
    assert (ds.labels[ds.split == "test"] == z["test_labels"][:, 0]).all()


def test_medmnist_refuses_multilabel_and_missing_keys(tmp_path):
    bad = tmp_path / "chest.npz"
    np.savez(bad, **{f"{p}_images": np.zeros((4, 28, 28), np.uint8) for p in ("train", "val", "test")},
             **{f"{p}_labels": np.zeros((4, 14), np.uint8) for p in ("train", "val", "test")})
    with pytest.raises(UserError, match="multi-label"):
        load_dataset(spec.DataSpec(dataset="medmnist", root=str(bad)))
    np.savez(bad, train_images=np.zeros((4, 28, 28), np.uint8))
    with pytest.raises(UserError, match="train_labels"):
        load_dataset(spec.DataSpec(dataset="medmnist", root=str(bad)))


def test_imbalance_metrics_on_a_hand_computed_case():
    # 3 classes; labels 0 0 0 0 1 1 2 2; predictions 0 0 0 1 1 0 2 0
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    pred = np.array([0, 0, 0, 1, 1, 0, 2, 0])
    logits = np.eye(3)[pred] * 5.0
    m = classification_metrics(logits, labels, 3)
    assert m["test_acc"] == pytest.approx(5 / 8)
    # recall: 3/4, 1/2, 1/2 -> balanced accuracy 7/12
    assert [m[f"test_recall_class{c}"] for c in range(3)] == pytest.approx([0.75, 0.5, 0.5])
    assert m["test_balanced_acc"] == pytest.approx(7 / 12)
    # precision: 3/5, 1/2, 1/1; F1: 2·.6·.75/1.35, 0.5, 2·1·.5/1.5
    f1 = [2 * 0.6 * 0.75 / 1.35, 0.5, 2 / 3]
    assert m["test_macro_f1"] == pytest.approx(sum(f1) / 3)
    # always predicting the majority class: high accuracy, balanced accuracy 1/3
    majority = classification_metrics(np.eye(3)[np.zeros(8, int)], labels, 3)
    assert majority["test_acc"] == 0.5 and majority["test_balanced_acc"] == pytest.approx(1 / 3)


def _ham_trial_spec(root, **overrides):
    raw = {"name": "ham", "model": {"arch": "simple_cnn"},
           "data": {"dataset": "ham10000", "root": str(root), "image_size": 16},
           "train": {"batch_size": 32, "lr": 0.05, "dense_epochs": 2, "finetune_epochs": 1},
           "schedule": {"method": "oneshot", "sparsity": 0.5}}
    for key, value in overrides.items():
        section, _, leaf = key.partition("__")
        raw.setdefault(section, {})[leaf] = value
    return spec.validate(raw)


def test_class_balance_options(tmp_path):
    root = write_ham10000(tmp_path / "HAM10000")
    plain = Trial(_ham_trial_spec(root))
    counts = np.bincount(plain.dataset.part("train")[1], minlength=7)
    weighted = Trial(_ham_trial_spec(root, train__class_balance="weighted_loss"))
    logits, y = torch.randn(10, 7), torch.tensor([0, 1, 2, 3, 4, 5, 6, 5, 5, 5])
    w = torch.tensor(counts.sum() / (7 * counts), dtype=torch.float32)
    expected = (w[y] * torch.nn.functional.cross_entropy(logits, y, reduction="none")).sum() / w[y].sum()
    assert weighted.trainer.loss_fn(logits, y).item() == pytest.approx(expected.item(), rel=1e-5)
    sampled = Trial(_ham_trial_spec(root, train__class_balance="balanced_sampler"))
    drawn = np.concatenate([sampled.data.y["train"][sampled.trainer._batch_index(e * sampled.trainer.steps_per_epoch)]
                            .numpy() for e in range(40)])
    share = np.bincount(drawn, minlength=7) / len(drawn)
    assert share.max() - share.min() < 0.06  # every class about 1/7, although nv is most of the data
    assert counts.max() / counts.sum() > 0.4


def test_ham_trial_logs_image_ids_per_class_recall_and_confusion(tmp_path):
    root = write_ham10000(tmp_path / "HAM10000")
    result = run_trial(_ham_trial_spec(root), tmp_path / "out")
    rows = list(csv.DictReader((tmp_path / "out" / "data" / "split.csv").read_text().splitlines()))
    assert set(rows[0]) == {"image_id", "split"} and rows[0]["image_id"].startswith("ISIC_")
    assert {f"test_recall_class{c}" for c in range(7)} & set(result.metrics)
    assert (tmp_path / "out" / "figures" / "confusion.png").is_file()


def _imagenet_state(tmp_path, arch="resnet18"):
    import torchvision
    torch.manual_seed(123)
    state = getattr(torchvision.models, arch)(weights=None).state_dict()  # the shapes of the ImageNet file
    path = tmp_path / f"{arch}-imagenet.pth"
    torch.save(state, path)
    return path, state


def test_pretrained_weights_arrive_unchanged_except_the_head(tmp_path):
    path, state = _imagenet_state(tmp_path)
    root = write_ham10000(tmp_path / "HAM10000", lesions_per_class=(4,) * 7)
    trial = Trial(_ham_trial_spec(root, model__arch="resnet18", model__weights=str(path), model__stem="imagenet"))
    own = trial.model.state_dict()
    for key, value in state.items():
        if key.startswith("fc."):
            assert own[key].shape[0] == 7  # the head, replaced for the dataset's classes
        else:
            assert torch.equal(own[key].cpu(), value), key
    # ImageNet statistics normalise the inputs of a pretrained model
    assert torch.allclose(trial.data.mean.flatten().cpu(), torch.tensor(IMAGENET_MEAN) * 255)


def test_frozen_parameters_do_not_move(tmp_path):
    path, _ = _imagenet_state(tmp_path)
    root = write_ham10000(tmp_path / "HAM10000", lesions_per_class=(4,) * 7)
    trial = Trial(_ham_trial_spec(root, model__arch="resnet18", model__weights=str(path), model__stem="imagenet",
                                  model__freeze=["conv1", "bn1", "layer1", "layer2", "layer3"],
                                  schedule__sparsity=0.0, train__dense_epochs=2, train__finetune_epochs=0))
    before = {k: v.detach().clone() for k, v in trial.model.named_parameters()}
    trial.run(tmp_path / "out")
    after = dict(trial.model.named_parameters())
    for key, value in before.items():
        moved = not torch.equal(after[key].detach(), value)
        frozen = key.split(".")[0] in ("conv1", "bn1", "layer1", "layer2", "layer3")
        assert moved != frozen, key


def test_too_few_lesions_for_a_test_split_is_a_clear_error(tmp_path):
    root = write_ham10000(tmp_path / "HAM10000", lesions_per_class=(1,) * 7)
    with pytest.raises(UserError, match="data: the test split of ham10000 is empty"):
        load_dataset(ham_spec(root, test_fraction=0.05))


def test_missing_weights_file_is_a_clear_error(tmp_path):
    root = write_ham10000(tmp_path / "HAM10000")
    with pytest.raises(UserError, match=r"model.weights: file .*nowhere.pth not found"):
        Trial(_ham_trial_spec(root, model__arch="resnet18", model__weights=str(tmp_path / "nowhere.pth")))


def test_densenet_weights_with_torchvision_published_key_names_load(tmp_path):
    """torchvision's DenseNet files say `norm.1`/`conv.2` where its models say `norm1`/`conv2`."""
    import re

    import torchvision

    from prunetune.models import load_weights
    state = torchvision.models.densenet121(weights=None).state_dict()
    old = {re.sub(r"(denselayer\d+\.(?:norm|conv))([12])\.", r"\1.\2.", k): v for k, v in state.items()}
    assert any(".norm.1." in k for k in old)
    torch.save(old, tmp_path / "densenet121.pth")
    model = torchvision.models.densenet121(weights=None, num_classes=7)
    skipped = load_weights(model, tmp_path / "densenet121.pth")
    assert skipped == ["classifier.bias", "classifier.weight"]
    for key, value in state.items():
        if not key.startswith("classifier"):
            assert torch.equal(model.state_dict()[key], value), key
