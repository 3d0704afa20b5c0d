"""The user's own model and data (`package.module:factory`, `torchvision:<name>`): built, checked,
pruned by every criterion and method, cached by their source, and refused with one line where
they are wrong. Sweeps with real Ray are at the end (a cluster's in test_cluster.py)."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from prunetune import plugins
from prunetune import spec as spec_mod
from prunetune.errors import UserError

from conftest import REPO, error_lines
from test_cli import prunetune

MODEL = '''
    from torch import nn


    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv = nn.Conv2d(c, c, 3, padding=1)
            self.bn = nn.BatchNorm2d(c)

        def forward(self, x):
            return x + self.bn(self.conv(x)).relu()  # a residual add


    class Net(nn.Module):
        def __init__(self, num_classes, in_channels, width):
            super().__init__()
            self.stem = nn.Conv2d(in_channels, width, 3, padding=1)
            self.block = Block(width)
            self.head = nn.Linear(width, num_classes)

        def forward(self, x):
            return self.head(self.block(self.stem(x)).mean((2, 3)))


    def build(num_classes, in_channels, image_size, width=8):
        return Net(num_classes, in_channels, width)


    def not_a_module(num_classes, in_channels, image_size):
        return "a string"


    def raises(num_classes, in_channels, image_size):
        raise ValueError("width must be even")


    def wrong_head(num_classes, in_channels, image_size):
        return Net(num_classes + 1, in_channels, 4)


    class WithEmbedding(Net):
        def __init__(self, num_classes, in_channels):
            super().__init__(num_classes, in_channels, 4)
            self.table = nn.Embedding(3, 4)
            self.mix = nn.Conv1d(4, 4, 1)


    def with_embedding(num_classes, in_channels, image_size):
        return WithEmbedding(num_classes, in_channels)


    class StandardisedConv(nn.Conv2d):  # computes with a function of its weight: masking it is not pruning
        def forward(self, x):
            w = self.weight
            return self._conv_forward(x, (w - w.mean()) / (w.std() + 1e-5), self.bias)


    def standardised(num_classes, in_channels, image_size):
        net = Net(num_classes, in_channels, 4)
        net.stem = StandardisedConv(in_channels, 4, 3, padding=1)
        return net


    class AuxNet(Net):
        def forward(self, x):
            out = super().forward(x)
            return (out, out) if self.training else out


    def aux_in_training(num_classes, in_channels, image_size):
        return AuxNet(num_classes, in_channels, 4)


    def even_only(num_classes, in_channels, image_size, width=4):
        if width % 2:
            raise ValueError(f"width must be even, got {width}")
        return Net(num_classes, in_channels, width)
    '''

DATA = '''
    import numpy as np


    def load(n=120, classes=3, size=10, rgb=False, published=False, groups=False):
        rng = np.random.default_rng(0)
        labels = np.arange(n) % classes
        shape = (n, size, size, 3) if rgb else (n, size, size)
        images = rng.integers(0, 60, shape).astype(np.uint8)
        images[:, : size // 2] += (labels * 60).astype(np.uint8).reshape((-1,) + (1,) * (len(shape) - 1))
        out = {"images": images, "labels": labels, "classes": [f"c{i}" for i in range(classes)]}
        if published:
            out["split"] = np.array(["train"] * (n - 30) + ["val"] * 10 + ["test"] * 20)
        if groups:
            out["groups"] = np.arange(n) // 4  # four images per group (a patient, a lesion)
        return out


    def floats():
        return {"images": np.zeros((10, 8, 8), dtype=np.float32), "labels": np.zeros(10, dtype=int)}


    def channels_first():
        return {"images": np.zeros((10, 3, 8, 8), dtype=np.uint8), "labels": np.arange(10) % 2}


    def normalised():
        import torch
        from torch.utils.data import TensorDataset

        x = torch.randn(20, 1, 8, 8)  # mean/std normalised: not an image's [0, 1]
        return {"train": TensorDataset(x, torch.arange(20) % 2), "test": TensorDataset(x, torch.arange(20) % 2)}


    def datasets():
        import torch
        from torch.utils.data import TensorDataset

        x = torch.rand(40, 1, 8, 8)
        y = torch.arange(40) % 2
        return {"train": TensorDataset(x[:30], y[:30]), "test": TensorDataset(x[30:], y[30:])}
    '''


@pytest.fixture
def user_code(tmp_path, monkeypatch):
    """mynet.py and mydata.py in a fresh folder, the working directory."""
    (tmp_path / "mynet.py").write_text(textwrap.dedent(MODEL))
    (tmp_path / "mydata.py").write_text(textwrap.dedent(DATA))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("mynet", "mydata"):
        sys.modules.pop(name, None)
    plugins.source_digest.cache_clear()
    yield tmp_path
    for name in ("mynet", "mydata"):
        sys.modules.pop(name, None)


def raw(**over) -> dict:
    base = {"name": "plug", "model": {"arch": "mynet:build"},
            "data": {"dataset": "mydata:load", "image_size": 8},
            "train": {"batch_size": 32, "lr": 0.05, "dense_epochs": 1, "finetune_epochs": 1},
            "schedule": {"method": "oneshot", "sparsity": 0.5}}
    for key, value in over.items():
        spec_mod.set_dotted(base, key.replace("__", "."), value)
    return base


# -- model factories -------------------------------------------------------------------------------

def test_a_factory_gets_the_data_shape_and_its_searched_kwargs(user_code):
    from prunetune.data import load_dataset
    from prunetune.models import build_model

    loaded = spec_mod.load(None, raw=raw(model__kwargs={"width": {"choice": [4, 6]}}))
    assert "model.kwargs.width" in loaded.space
    spec = loaded.resolve({"model.kwargs.width": 6})
    assert spec.flat()["model.kwargs.width"] == 6  # logged to MLflow as a param like any key
    dataset = load_dataset(spec.data)
    model = build_model(spec.model, len(dataset.classes), dataset.in_channels, 8)
    assert model.stem.out_channels == 6 and model.stem.in_channels == 1 and model.head.out_features == 3


def test_bad_model_references_are_one_line_naming_model_arch(user_code):
    from prunetune.models import build_model

    with pytest.raises(UserError, match=r"model\.arch: cannot import module 'nosuch'"):
        spec_mod.load(None, raw=raw(model__arch="nosuch:build"))
    with pytest.raises(UserError, match=r"model\.arch: module 'mynet' .* has no attribute 'nope'"):
        spec_mod.load(None, raw=raw(model__arch="mynet:nope"))
    with pytest.raises(UserError, match=r"model\.arch.*'package\.module:factory'"):
        spec_mod.load(None, raw=raw(model__arch="no_such_builtin"))
    with pytest.raises(UserError, match=r"model\.kwargs: only a factory"):
        spec_mod.load(None, raw=raw(model__arch="simple_cnn", model__kwargs={"width": 3}))
    for arch, message in [("mynet:not_a_module", "returned a str, not a torch.nn.Module"),
                          ("mynet:raises", "raised ValueError: width must be even"),
                          ("mynet:wrong_head", r"outputs \[2, 4\] in eval mode .* expected logits \[2, 3\]"),
                          ("mynet:aux_in_training", "outputs tuple in training mode")]:
        spec = spec_mod.load(None, raw=raw(model__arch=arch)).fixed_spec()
        with pytest.raises(UserError, match=rf"^model\.arch: {arch} {message}"):
            build_model(spec.model, 3, 1, 8)


def test_torchvision_models_get_the_datas_head_and_channels_and_load_local_weights(user_code, tmp_path):
    from prunetune.models import build_model, prunable_layers

    spec = spec_mod.load(None, raw=raw(model__arch="torchvision:mobilenet_v3_small")).fixed_spec()
    model = build_model(spec.model, 5, 1, 32)  # grayscale: the first conv reads one channel
    assert model.features[0][0].in_channels == 1 and model(torch.zeros(2, 1, 32, 32)).shape == (2, 5)
    assert prunable_layers(model, 1, 32)[0] == "features.0.0"
    # model.weights: a local state_dict (an RGB, 1000-class file), the shapes that fit loaded
    import torchvision

    donor = torchvision.models.mobilenet_v3_small(weights=None)
    torch.save(donor.state_dict(), tmp_path / "w.pth")
    spec = spec_mod.load(None, raw=raw(model__arch="torchvision:mobilenet_v3_small",
                                       model__weights=str(tmp_path / "w.pth"))).fixed_spec()
    loaded = build_model(spec.model, 5, 1, 32)
    assert torch.equal(loaded.features[1].block[0][0].weight, donor.features[1].block[0][0].weight)
    spec = spec_mod.load(None, raw=raw(model__arch="torchvision:not_a_net")).fixed_spec()
    with pytest.raises(UserError, match=r"^model\.arch: torchvision:not_a_net is not a torchvision classification"):
        build_model(spec.model, 5, 1, 32)


def test_a_missing_import_inside_the_module_is_not_blamed_on_where_modules_are_found(user_code):
    (user_code / "broken.py").write_text("import not_installed_anywhere\n")
    with pytest.raises(UserError, match=r"No module named 'not_installed_anywhere'\); raised while importing it$"):
        spec_mod.load(None, raw=raw(model__arch="broken:build"))


def test_every_searched_combination_of_model_values_is_built_before_a_trial(user_code):
    from prunetune.data import load_dataset
    from prunetune.model_check import check_models

    # (even_only, 5) is the one bad pair: trying each value alone, with the others at their first, misses it
    loaded = spec_mod.load(None, raw=raw(model__arch={"choice": ["mynet:build", "mynet:even_only"]},
                                         model__kwargs={"width": {"choice": [4, 5]}}))
    with pytest.raises(UserError, match="mynet:even_only raised ValueError: width must be even, got 5"):
        check_models(loaded, load_dataset(loaded.fixed_spec().data))
    # searched data keys: each dataset is loaded, and the model checked against its classes
    loaded = spec_mod.load(None, raw=raw(data__kwargs={"classes": {"choice": [3, 4]}}))
    assert check_models(loaded, load_dataset(loaded.fixed_spec().data)) == []
    loaded = spec_mod.load(None, raw=raw(model__arch="mynet:wrong_head", data__kwargs={"classes": {"choice": [3, 5]}}))
    with pytest.raises(UserError, match=r"expected logits \[2, 3\]"):
        check_models(loaded, load_dataset(loaded.fixed_spec().data))


def test_editing_the_model_source_changes_the_dense_phase_key(user_code):
    spec = spec_mod.load(None, raw=raw()).fixed_spec()
    before = spec.dense_hash()
    assert before == spec_mod.load(None, raw=raw()).fixed_spec().dense_hash()
    (user_code / "mynet.py").write_text(textwrap.dedent(MODEL) + "\n# a change\n")
    plugins.source_digest.cache_clear()
    assert spec.dense_hash() != before
    # a module beside it that it imports is its code too: shipped and digested with it
    (user_code / "helper.py").write_text("WIDTH = 4\n")
    (user_code / "withhelper.py").write_text("from helper import WIDTH\nfrom mynet import Net\n\n\n"
                                             "def build(num_classes, in_channels, image_size):\n"
                                             "    return Net(num_classes, in_channels, WIDTH)\n")
    assert [Path(p).name for p in plugins.ship_paths([("model.arch", "withhelper:build")])] == \
        ["withhelper.py", "helper.py", "mynet.py"]
    with_helper = spec_mod.load(None, raw=raw(model__arch="withhelper:build")).fixed_spec()
    before = with_helper.dense_hash()
    (user_code / "helper.py").write_text("WIDTH = 6\n")
    plugins.source_digest.cache_clear()
    assert with_helper.dense_hash() != before
    builtin = spec_mod.load(None, raw=raw(model__arch="simple_cnn")).fixed_spec()
    (user_code / "mynet.py").write_text(textwrap.dedent(MODEL) + "\n# another\n")
    plugins.source_digest.cache_clear()
    assert builtin.dense_hash() != spec.dense_hash()  # (its data factory's source is in it too)


# -- dataset factories ------------------------------------------------------------------------------

def test_a_dataset_factory_is_resized_split_and_cached_by_its_output(user_code):
    from prunetune.cache import cache_root
    from prunetune.data import load_dataset

    def entries() -> set:
        return set((cache_root() / "data").glob("plugin-*-6px-*"))

    before = entries()
    spec = spec_mod.load(None, raw=raw(data__kwargs={"rgb": True}, data__image_size=6)).fixed_spec()
    d = load_dataset(spec.data)
    assert d.images.shape == (120, 3, 6, 6) and d.images.dtype == np.uint8 and d.classes == ["c0", "c1", "c2"]
    assert {s: int((d.split == s).sum()) for s in ("train", "val", "test")} == {"train": 90, "val": 12, "test": 18}
    written = entries() - before
    assert len(written) == 1 and np.array_equal(load_dataset(spec.data).images, d.images)
    assert entries() - before == written  # read back, not written again
    other = spec_mod.load(None, raw=raw(data__kwargs={"rgb": True, "n": 90}, data__image_size=6)).fixed_spec()
    load_dataset(other.data)
    assert len(entries() - before) == 2  # other output, other entry


def test_a_published_split_is_kept_and_groups_never_straddle_splits(user_code):
    from prunetune.data import load_dataset

    d = load_dataset(spec_mod.load(None, raw=raw(data__kwargs={"published": True})).fixed_spec().data)
    assert list(d.split[-30:]) == ["val"] * 10 + ["test"] * 20
    d = load_dataset(spec_mod.load(None, raw=raw(data__kwargs={"groups": True})).fixed_spec().data)
    for g in np.unique(d.groups):
        assert len(set(d.split[d.groups == g])) == 1


def test_torch_datasets_per_split_are_read_once(user_code):
    from prunetune.data import load_dataset

    spec = spec_mod.load(None, raw=raw(data__dataset="mydata:datasets")).fixed_spec()
    d = load_dataset(spec.data)
    assert d.images.shape == (40, 1, 8, 8) and int((d.split == "test").sum()) == 10
    assert d.classes == ["0", "1"] and int((d.split == "val").sum()) == 3  # val carved from train
    # materialised once: a second load reads the cache, not the Datasets' items
    import torch.utils.data

    calls = []
    original = torch.utils.data.TensorDataset.__getitem__
    torch.utils.data.TensorDataset.__getitem__ = lambda self, i: calls.append(i) or original(self, i)
    try:
        again = load_dataset(spec.data)
    finally:
        torch.utils.data.TensorDataset.__getitem__ = original
    assert calls == [] and np.array_equal(again.images, d.images)


def test_bad_data_is_one_line_naming_data_dataset(user_code):
    from prunetune.data import load_dataset

    with pytest.raises(UserError, match=r"channels go last.*this looks like \[N, C, H, W\]"):
        load_dataset(spec_mod.load(None, raw=raw(data__dataset="mydata:channels_first")).fixed_spec().data)
    with pytest.raises(UserError, match=r"tensor with values in \[-.*expected uint8, or floats in \[0, 1\]"):
        load_dataset(spec_mod.load(None, raw=raw(data__dataset="mydata:normalised")).fixed_spec().data)

    with pytest.raises(UserError, match=r"^data\.dataset: mydata:floats returned images of dtype float32"):
        load_dataset(spec_mod.load(None, raw=raw(data__dataset="mydata:floats")).fixed_spec().data)
    with pytest.raises(UserError, match=r"^data\.dataset: mydata:load raised TypeError"):
        load_dataset(spec_mod.load(None, raw=raw(data__kwargs={"nope": 1})).fixed_spec().data)
    with pytest.raises(UserError, match=r"data\.root: a dataset factory"):
        spec_mod.load(None, raw=raw(data__root="/tmp"))


# -- everything works on them -------------------------------------------------------------------------

CRITERIA = [("l1_unstructured", {}), ("random", {}), ("snip", {}), ("grasp", {}), ("synflow", {"synflow_iters": 5}),
            ("l1_nm", {"sparsity": 0.5, "n_m": [2, 4]}), ("l1_filter", {"remove": True})]


@pytest.mark.parametrize("criterion, extra", CRITERIA, ids=[c for c, _ in CRITERIA])
def test_every_criterion_prunes_a_user_model(user_code, criterion, extra, tmp_path):
    from prunetune.trial import Trial

    schedule = {"method": "oneshot", "criterion": criterion, "sparsity": 0.5, **extra}
    spec = spec_mod.load(None, raw=raw(schedule=schedule)).fixed_spec()
    result = Trial(spec).run(tmp_path / "out")
    if criterion == "l1_filter":  # whole channels, removed for real through the residual add
        assert result.metrics["channel_sparsity"] == pytest.approx(0.5, abs=0.06), result.metrics
        assert result.metrics["compact_params"] == result.metrics["nonzero_params"] < result.metrics["total_params"]
    else:
        assert result.metrics["sparsity"] == pytest.approx(0.5, abs=0.06), result.metrics


METHODS = ["iterative", "layerwise", "gradual", "lottery", "dsd", "ist"]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_on_a_user_model(user_code, method, tmp_path):
    from prunetune.trial import Trial

    schedule = {"method": method, "sparsity": 0.6, "step_size": 0.3, "step_epochs": 0.5, "end_epoch": 1}
    spec = spec_mod.load(None, raw=raw(schedule=schedule)).fixed_spec()
    result = Trial(spec).run(tmp_path / "out")
    assert result.metrics["test_acc"] > 0 and result.metrics["train_epochs_total"] > 1
    # dense-sparse-dense and its iterated form end dense; every other method at its sparsity
    assert result.metrics["sparsity"] == (0 if method in ("dsd", "ist") else pytest.approx(0.6, abs=0.05))


def test_weights_no_criterion_prunes_are_named_in_a_note(user_code):
    from prunetune.data import load_dataset
    from prunetune.model_check import check_models

    loaded = spec_mod.load(None, raw=raw(model__arch="mynet:with_embedding"))
    notes = check_models(loaded, load_dataset(loaded.fixed_spec().data))
    assert len(notes) == 1 and "2 weight tensors are not pruned" in notes[0] and "Conv1d, Embedding" in notes[0]


def test_a_conv_with_its_own_forward_is_left_unpruned_not_masked_wrongly(user_code, tmp_path):
    """A weight-standardised conv computes with a function of its weight: zeros in the weight are
    not zeros in what it computes, so masking it would report a sparsity the model does not have."""
    from prunetune.data import load_dataset
    from prunetune.model_check import check_models
    from prunetune.trial import Trial

    loaded = spec_mod.load(None, raw=raw(model__arch="mynet:standardised"))
    notes = check_models(loaded, load_dataset(loaded.fixed_spec().data))
    assert len(notes) == 1 and "StandardisedConv" in notes[0] and "stem.weight" in notes[0]
    trial = Trial(loaded.fixed_spec())
    assert "stem" not in trial.layers and trial.layers[0] == "block.conv"
    trial.run(tmp_path / "out")
    assert torch.count_nonzero(trial.model.stem.weight) == trial.model.stem.weight.numel()


# -- the command line -----------------------------------------------------------------------------------

SPEC = """
    name: plug
    model: {{arch: "{arch}"}}
    data: {{dataset: "{dataset}", image_size: 8}}
    train: {{batch_size: 32, lr: 0.05, dense_epochs: 1, finetune_epochs: 1}}
    schedule: {{method: oneshot, sparsity: {{uniform: [0.3, 0.6]}}}}
    search: {{num_trials: 2}}
    resources: {{cpus_per_trial: 1, max_concurrent: 2}}
    analysis: {{cka: {{top: 0}}}}
    """


def write_spec(folder: Path, arch="mynet:build", dataset="mydata:load", name="spec.yaml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(SPEC.format(arch=arch, dataset=dataset)))
    return path


BAD = [("nosuch:build", "mydata:load", "model.arch: cannot import module 'nosuch'"),
       ("mynet:missing", "mydata:load", "model.arch: module 'mynet'"),
       ("mynet:raises", "mydata:load", "model.arch: mynet:raises raised ValueError: width must be even"),
       ("mynet:not_a_module", "mydata:load", "not a torch.nn.Module"),
       ("mynet:wrong_head", "mydata:load", "model.arch: mynet:wrong_head outputs [2, 4]"),
       ("mynet:build", "mydata:floats", "data.dataset: mydata:floats returned images of dtype float32")]


@pytest.mark.slow
def test_bad_user_code_exits_2_with_one_line_and_writes_nothing(user_code):
    for i, (arch, dataset, message) in enumerate(BAD):
        spec = write_spec(user_code, arch, dataset)
        for command in (["sweep"], ["validate"])[:2 if i == 0 else 1]:
            r = prunetune([*command, str(spec)], cwd=user_code)
            assert r.returncode == 2, (arch, dataset, r.stderr[-2000:])
            assert message in r.stderr and "Traceback" not in r.stderr, r.stderr
            assert len(error_lines(r.stderr)) == 1, r.stderr
            assert not (user_code / "mlruns").exists()


@pytest.mark.slow
def test_a_sweep_imports_user_code_beside_the_spec_from_another_working_directory(tmp_path):
    """The modules live in the spec's folder; the sweep runs from elsewhere: the driver and the
    local Ray's workers import them from there."""
    folder, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    folder.mkdir()
    elsewhere.mkdir()
    (folder / "mynet.py").write_text(textwrap.dedent(MODEL))
    (folder / "mydata.py").write_text(textwrap.dedent(DATA))
    spec = write_spec(folder)
    spec.write_text(spec.read_text().replace("cka: {top: 0}", "cka: {top: 2, samples: 32, batch_size: 16}"))
    r = prunetune(["sweep", str(spec)], cwd=elsewhere)
    assert r.returncode == 0, r.stderr[-3000:]
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{elsewhere}/mlruns/mlflow.db")
    runs = c.search_runs([c.get_experiment_by_name("plug").experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
    assert {r.data.params["model.arch"] for r in children} == {"mynet:build"}
    # the report, CKA of the best checkpoints and layer sensitivity rebuild the user's model
    for command in (["report", str(spec), "--out", "report"], ["cka", str(spec)],
                    ["sensitivity", str(spec), "--out", "sens"]):
        r = prunetune(command, cwd=elsewhere)
        assert r.returncode == 0, (command, r.stderr[-3000:])
    assert "mean diagonal CKA" in prunetune(["cka", str(spec)], cwd=elsewhere).stdout
    assert (elsewhere / "sens" / "sensitivity.csv").read_text().count("stem") > 0
    # a student (another width) distilled from the best trial of the user's model
    best = max(children, key=lambda r: r.data.metrics["val_acc"]).info.run_id
    student = folder / "student.yaml"
    student.write_text(spec.read_text().replace("name: plug", "name: student").replace(
        'arch: "mynet:build"', f'arch: "mynet:build", kwargs: {{width: 4}}}}\ndistill: {{teacher: "{best}"'))
    r = prunetune(["trial", str(student), "--set", "schedule.sparsity=0.5"], cwd=elsewhere)
    assert r.returncode == 0, r.stderr[-3000:]
    run = c.get_run(r.stdout.split("run id: ")[1].split()[0])
    assert run.data.params["model.kwargs.width"] == "4" and "teacher_test_acc" in run.data.metrics


def test_the_examples_folder_and_its_sweep_validate():
    r = prunetune(["validate", "sweeps/custom_digits.yaml"], cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "model.kwargs.width" in r.stderr and "examples.digits_data:load, 10 classes" in r.stderr


def test_a_teachers_model_from_user_code_is_shipped_and_checked_like_the_students(user_code):
    """Trials build the distillation teacher too: its model's module (named in the teacher's
    config.yaml) is user code every node must import, and its digest is recorded."""
    from prunetune.sweep.driver import prepare

    (user_code / "teachernet.py").write_text(textwrap.dedent(MODEL))
    teacher = user_code / "teacher"
    for f in ("checkpoint/model.pt", "data/split.csv"):
        (teacher / f).parent.mkdir(parents=True, exist_ok=True)
        (teacher / f).write_text("")
    (teacher / "config.yaml").write_text(yaml.safe_dump(raw(model__arch="teachernet:build")))
    spec = {**raw(distill={"teacher": str(teacher)}),
            "tracking": {"uri": f"sqlite:///{user_code}/m.db", "storage": str(user_code / "state")}}
    code = prepare(spec_mod.load(None, raw=spec), resume=False, restart=False, echo=print).code
    assert ("distill.teacher", "teachernet:build") in code and ("model.arch", "mynet:build") in code
    assert str(user_code / "teachernet.py") in plugins.ship_paths(code)
    assert "teachernet:build" in plugins.digests(code)
    # a teacher whose module cannot be imported, or whose config is not a trial's: exit 2 before Ray
    (teacher / "config.yaml").write_text(yaml.safe_dump(raw(model__arch="nosuchnet:build")))
    with pytest.raises(UserError, match=r"distill.teacher: cannot import module 'nosuchnet'"):
        prepare(spec_mod.load(None, raw=spec), resume=False, restart=False, echo=print)
    (teacher / "config.yaml").write_text("- not a config\n")
    with pytest.raises(UserError, match=r"distill.teacher: .*config.yaml is not a prunetune trial config"):
        prepare(spec_mod.load(None, raw=spec), resume=False, restart=False, echo=print)


def test_resuming_a_sweep_whose_model_code_changed_is_refused(user_code):
    """sweep.json records the digest of the user's code; --resume on edited code would mix trials
    of two models in one study."""
    from prunetune.sweep.driver import prepare
    from prunetune.sweep.paths import SweepPaths, space_fingerprint

    spec = {**raw(), "tracking": {"uri": f"sqlite:///{user_code}/m.db", "storage": str(user_code / "state")}}
    loaded = spec_mod.load(None, raw=spec)
    SweepPaths.of(str(user_code / "state"), "plug").dir.write_json(SweepPaths.META, {
        "space": space_fingerprint(loaded.space), "code": plugins.digests(loaded.user_code())})
    assert prepare(loaded, resume=True, restart=False, echo=print)  # unchanged: resumes
    (user_code / "mynet.py").write_text(textwrap.dedent(MODEL) + "\n# edited\n")
    plugins.source_digest.cache_clear()
    with pytest.raises(UserError, match=r"--resume: the code of mynet:build changed since the sweep started"):
        prepare(loaded, resume=True, restart=False, echo=print)
