"""model.weights by torchvision's names: read from torchvision's cache ($TORCH_HOME), which the
tests pre-fill with a state_dict of the right shapes under the file name of the weights' URL.

No test touches the network: every test points $TORCH_HOME at its own folder and sends HTTP(S)
through a proxy on a closed local port (urllib, which torch.hub downloads with, honours
https_proxy), so a download that is attempted fails at once with "connection refused", as it
would offline, whether or not this machine can reach download.pytorch.org."""

import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
import torchvision.models as tvm

from prunetune import pretrained, spec
from prunetune.errors import UserError
from prunetune.models import build_model
from prunetune.spec import ModelSpec

from conftest import digits_raw, error_lines


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once it is closed


def offline_env(torch_home) -> dict:
    proxy = f"http://127.0.0.1:{_closed_port()}"
    return {"TORCH_HOME": str(torch_home), "https_proxy": proxy, "HTTPS_PROXY": proxy, "http_proxy": proxy,
            "HTTP_PROXY": proxy, "no_proxy": "", "NO_PROXY": ""}


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    home = tmp_path / "torch_home"
    for key, value in offline_env(home).items():
        monkeypatch.setenv(key, value)
    return home


def prefill(arch: str, name: str, seed: int = 0) -> dict:
    """torchvision's model `arch` (untrained, its own 1000-class head) saved where torch.hub
    looks for the weights `name`; returns the saved state_dict."""
    weights = tvm.get_model_weights(arch)[name]
    torch.manual_seed(seed)
    state = tvm.get_model_builder(arch)(weights=None).state_dict()
    path = pretrained.cached_file(weights)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def test_a_weight_name_loads_torchvisions_file_from_its_cache(torch_home):
    saved = prefill("squeezenet1_0", "IMAGENET1K_V1")
    assert (torch_home / "hub" / "checkpoints" / "squeezenet1_0-b66bff10.pth").is_file()
    for name in ("IMAGENET1K_V1", "SqueezeNet1_0_Weights.IMAGENET1K_V1"):
        model = build_model(ModelSpec(arch="torchvision:squeezenet1_0", weights=name), 10, 3, 32)
        got = model.state_dict()
        head = {k for k in saved if k.startswith("classifier.1.")}  # 1000 classes there, 10 here
        assert head and all(got[k].shape != saved[k].shape for k in head)
        for k in set(saved) - head:
            assert torch.equal(got[k], saved[k]), k


def test_default_resolves_for_a_built_in_arch_and_the_small_stem_is_skipped(torch_home):
    """resnet18 at 32 px has the small stem: its 3×3 conv1 and the 10-class fc do not fit and
    keep their own values; every other tensor is the file's."""
    saved = prefill("resnet18", "IMAGENET1K_V1")  # resnet18's DEFAULT
    model = build_model(spec.validate(digits_raw(model__arch="resnet18", model__weights="DEFAULT")).model,
                        10, 3, 32)
    got = model.state_dict()
    skipped = {k for k in saved if k.startswith(("conv1.", "fc."))}
    assert {"conv1.weight", "fc.weight", "fc.bias"} <= skipped
    for k in set(saved) - skipped:
        assert torch.equal(got[k], saved[k]), k
    assert not torch.equal(got["fc.bias"][:10], saved["fc.bias"][:10])


def test_an_unknown_name_exits_2_listing_the_arch_names(tmp_path, torch_home):
    p = tmp_path / "spec.yaml"
    p.write_text("name: a\nmodel: {arch: densenet169, weights: IMAGENET9K_V7}\n")
    r = subprocess.run([sys.executable, "-m", "prunetune.cli", "validate", str(p)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    (line,) = error_lines(r.stderr)
    assert line.startswith("error: model.weights: IMAGENET9K_V7") and "allowed: IMAGENET1K_V1, DEFAULT" in line, line
    with pytest.raises(UserError, match="ResNet18_Weights, not densenet169's DenseNet169_Weights"):
        pretrained.resolve("densenet169", "ResNet18_Weights.IMAGENET1K_V1")


def test_a_name_for_an_arch_torchvision_does_not_build_is_refused():
    for arch in ("simple_cnn", "mypkg.models:net"):
        with pytest.raises(UserError, match=r"^spec key model\.weights: IMAGENET1K_V1 is a torchvision weight name; "
                                            r"names apply to torchvision's archs .*give .* a path"):
            spec.validate(digits_raw(model__arch=arch, model__weights="IMAGENET1K_V1"))
    assert spec.validate(digits_raw(model__weights="w.pth")).model.weights == "w.pth"  # a path still is one


def test_a_name_stays_a_name_where_a_path_would_be_made_absolute_and_checked_on_every_node():
    """A path is made absolute at load and compared across a cluster's nodes; a name is neither
    (each node reads, or downloads into, its own torchvision cache)."""
    from prunetune.sweep.preflight import _trial_paths

    named = spec.load(None, raw=digits_raw(model__arch="resnet18", model__weights="IMAGENET1K_V1"))
    assert named.fixed_spec().model.weights == "IMAGENET1K_V1" and "model.weights" not in _trial_paths(named)
    path = spec.load(None, raw=digits_raw(model__arch="resnet18", model__weights="w.pth"))
    assert _trial_paths(path)["model.weights"] == os.path.join(os.getcwd(), "w.pth")


def test_offline_without_the_file_is_one_line_naming_the_file_torchvision_expects(torch_home):
    expected = torch_home / "hub" / "checkpoints" / "squeezenet1_0-b66bff10.pth"
    with pytest.raises(UserError) as err:
        build_model(ModelSpec(arch="torchvision:squeezenet1_0", weights="DEFAULT"), 10, 3, 32)
    message = str(err.value)
    assert message.startswith("model.weights: DEFAULT (squeezenet1_0) is not in torchvision's cache and cannot be "
                              "downloaded") and "\n" not in message, message
    assert f"expected the file {expected}" in message and "by hand" in message, message
    assert not expected.exists() and not list(expected.parent.glob("*.partial"))


def test_the_dense_phase_key_follows_the_file_a_name_stands_for(torch_home):
    def key(weights):
        return spec.validate(digits_raw(model__arch="resnet50", model__weights=weights)).dense_hash()

    assert key("DEFAULT") == key("IMAGENET1K_V2") == key("ResNet50_Weights.IMAGENET1K_V2")  # DEFAULT is V2
    assert len({key("IMAGENET1K_V1"), key("IMAGENET1K_V2"), key(None)}) == 3
    # a path keeps its key as before (no torchvision resolution)
    assert spec.validate(digits_raw(model__weights="/w.pth")).dense_hash() != spec.validate(digits_raw()).dense_hash()


SWEEP = """
    name: named
    model: {arch: torchvision:squeezenet1_0, weights: IMAGENET1K_V1}
    data: {dataset: digits, image_size: 32}
    train: {batch_size: 64, lr: 0.05, dense_epochs: 1, finetune_epochs: 1}
    schedule: {method: {choice: [oneshot, iterative]}, sparsity: 0.5, step_size: 0.25}
    search: {sampler: grid, num_trials: 2}
    """


def test_a_sweep_offline_without_the_file_exits_2_before_anything_is_written(tmp_path):
    """The driver fetches named weights before Ray starts; offline, the sweep stops there with one
    line, as `prunetune trial` does when it builds the model."""
    p = tmp_path / "spec.yaml"
    p.write_text(textwrap.dedent(SWEEP))
    env = {**os.environ, **offline_env(tmp_path / "torch_home")}
    expected = tmp_path / "torch_home" / "hub" / "checkpoints" / "squeezenet1_0-b66bff10.pth"
    for command in (["sweep", str(p)], ["trial", str(p), "--set", "schedule.method=oneshot"]):
        r = subprocess.run([sys.executable, "-m", "prunetune.cli", *command], cwd=tmp_path, capture_output=True,
                           text=True, env=env, timeout=300)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        (line,) = error_lines(r.stderr)
        assert line.startswith("error: model.weights: IMAGENET1K_V1 (squeezenet1_0) is not in torchvision's cache")
        assert str(expected) in line and "by hand" in line, line
        assert not (tmp_path / "mlruns").exists()  # nothing in the tracking store, no sweep folder
    # --dry-run downloads nothing: it notes where the sweep will put the file
    r = subprocess.run([sys.executable, "-m", "prunetune.cli", "sweep", str(p), "--dry-run"], cwd=tmp_path,
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"a sweep downloads https://download.pytorch.org/models/squeezenet1_0-b66bff10.pth to {expected}" in r.stderr


def test_the_shipped_sweeps_name_weights_torchvision_knows():
    from conftest import REPO

    named = [s for s in (spec.load(p).fixed_spec() for p in sorted((REPO / "sweeps").glob("*.yaml")))
             if pretrained.is_name(s.model.weights)]
    assert "densenet169-ham10000" in {s.name for s in named}
    for s in named:
        assert pretrained.resolve(s.model.arch, s.model.weights).url.startswith("https://download.pytorch.org/")


def test_a_sweep_with_a_name_runs_its_trials_from_the_cache(tmp_path):
    """The driver finds the file in the cache (nothing downloaded, no network), notes that its
    hash is not the published one, and its Ray workers, which inherit $TORCH_HOME, load it: both
    trials finish."""
    from mlflow.tracking import MlflowClient

    p = tmp_path / "spec.yaml"
    p.write_text(textwrap.dedent(SWEEP))
    env = {**os.environ, **offline_env(tmp_path / "torch_home")}
    old_home = os.environ.get("TORCH_HOME")
    os.environ["TORCH_HOME"] = env["TORCH_HOME"]
    try:
        prefill("squeezenet1_0", "IMAGENET1K_V1")
    finally:
        os.environ.pop("TORCH_HOME") if old_home is None else os.environ.update(TORCH_HOME=old_home)
    r = subprocess.run([sys.executable, "-m", "prunetune.cli", "sweep", str(p)], cwd=tmp_path, capture_output=True,
                       text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "downloading" not in r.stderr
    # the driver hashed the cached file once: the test's file is not torchvision's, which a note says
    expected = tmp_path / "torch_home" / "hub" / "checkpoints" / "squeezenet1_0-b66bff10.pth"
    assert (f"note: model.weights IMAGENET1K_V1: {expected} is not the file torchvision publishes (its SHA-256 "
            "starts ") in r.stderr and "not b66bff10); it is used as it is" in r.stderr, r.stderr
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    runs = [run for run in client.search_runs([client.get_experiment_by_name("named").experiment_id])
            if run.data.tags.get("prunetune.kind") == "trial"]
    assert len(runs) == 2 and all(run.info.status == "FINISHED" for run in runs)
    assert {run.data.params["model.weights"] for run in runs} == {"IMAGENET1K_V1"}
