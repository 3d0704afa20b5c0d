"""Model name → torch module, with the small-image stem, a head sized to the dataset, weights
loading (torchvision's names or a local state_dict), and the prunable layers in forward order."""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import torch
from torch import nn

from prunetune import plugins, pretrained, registry
from prunetune.attention import split_attention
from prunetune.errors import UserError


def _torchvision_models():
    """torchvision's model zoo, imported on first use: importing torchvision costs a worker
    seconds (its ops pull in torch._dynamo), and simple_cnn does not need it."""
    import torchvision.models

    return torchvision.models


class SimpleCNN(nn.Module):
    """Two convolutions and two linear layers: the seed project's baseline, and quick on digits."""

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(8 * width, 128), nn.ReLU(inplace=True), nn.Linear(128, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


def simple_cnn(num_classes: int, in_channels: int, small: bool, image_size: int) -> nn.Module:
    return SimpleCNN(num_classes, in_channels)


def _vgg(name: str):
    def build(num_classes: int, in_channels: int, small: bool, image_size: int) -> nn.Module:
        model = getattr(_torchvision_models(), name)(weights=None)
        if in_channels != 3:
            model.features[0] = nn.Conv2d(in_channels, 64, 3, padding=1)
        if small:
            # VGG already starts with a 3x3 stride-1 conv; keep as many 2x pools as the image allows
            # (five at 32 px) and use a compact head: global average pool + one linear layer.
            pools = [i for i, m in enumerate(model.features) if isinstance(m, nn.MaxPool2d)]
            for i in pools[max(0, int(math.log2(image_size))):]:
                model.features[i] = nn.Identity()
            model.avgpool = nn.AdaptiveAvgPool2d(1)
            model.classifier = nn.Sequential(nn.Flatten(), nn.Linear(512, num_classes))
        else:
            model.classifier[-1] = nn.Linear(model.classifier[-1].in_features, num_classes)
        return model
    return build


def _resnet(name: str):
    def build(num_classes: int, in_channels: int, small: bool, image_size: int) -> nn.Module:
        model = getattr(_torchvision_models(), name)(weights=None)
        if small:
            model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
            model.maxpool = nn.Identity()
        elif in_channels != 3:
            model.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        model.fc = nn.Linear(model.fc.in_features, num_classes)
        return model
    return build


def _densenet(name: str):
    def build(num_classes: int, in_channels: int, small: bool, image_size: int) -> nn.Module:
        model = getattr(_torchvision_models(), name)(weights=None)
        out = model.features.conv0.out_channels
        if small:
            model.features.conv0 = nn.Conv2d(in_channels, out, 3, stride=1, padding=1, bias=False)
            model.features.pool0 = nn.Identity()
        elif in_channels != 3:
            model.features.conv0 = nn.Conv2d(in_channels, out, 7, stride=2, padding=3, bias=False)
        model.classifier = nn.Linear(model.classifier.in_features, num_classes)
        return model
    return build


vgg11, vgg16 = _vgg("vgg11"), _vgg("vgg16")
resnet18, resnet50 = _resnet("resnet18"), _resnet("resnet50")
densenet121, densenet169 = _densenet("densenet121"), _densenet("densenet169")


def uses_small_stem(stem: str, image_size: int) -> bool:
    return stem == "small" or (stem == "auto" and image_size <= 64)


def build_model(model_spec, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """Build `model_spec.arch` for the data's classes and channels; load `weights` if given
    (torchvision's weight name, `pretrained`, or a path to a state_dict of the model as its
    builder makes it: `fit_state` keeps the tensors that fit), then make attention's projections Linear
    layers (`attention.split_attention`). A factory's model (the user's, or torchvision's) is
    checked on a batch of zeros first: a wrong output is bad input naming model.arch, not a
    trial that fails later."""
    arch = model_spec.arch
    if plugins.is_torchvision(arch):
        model = torchvision_classifier(arch.removeprefix(plugins.TORCHVISION), num_classes, in_channels,
                                       model_spec.kwargs)
    elif plugins.is_ref(arch):
        model = plugins.call_factory("model.arch", arch, num_classes, in_channels, image_size, **model_spec.kwargs)
    else:
        small = uses_small_stem(model_spec.stem, image_size)
        model = registry.lookup(registry.MODELS, arch)(num_classes, in_channels, small, image_size)
    if plugins.is_ref(arch):
        check_output(model, arch, num_classes, in_channels, image_size)
    if pretrained.is_name(model_spec.weights):  # torchvision's name: from its cache, downloaded there if missing
        fit_state(model, pretrained.state_dict(arch, model_spec.weights), f"torchvision's {model_spec.weights}")
    elif model_spec.weights:
        load_weights(model, Path(model_spec.weights).expanduser())
    split_attention(model)  # attention's projections as Linear layers, which criteria prune
    return model


def check_output(model, arch: str, num_classes: int, in_channels: int, image_size: int) -> None:
    """A factory's model must be an nn.Module giving [batch, num_classes] logits for the data's
    images, in eval mode and in training mode (a copy: the model's statistics stay untouched);
    UserError naming model.arch otherwise."""
    if not isinstance(model, nn.Module):
        raise UserError(f"model.arch: {arch} returned a {type(model).__name__}, not a torch.nn.Module")
    shape = f"[2, {in_channels}, {image_size}, {image_size}]"
    for mode, net in (("eval", model), ("training", copy.deepcopy(model))):
        was_training = net.training
        try:
            net.train(mode == "training")
            with torch.no_grad():
                out = net(torch.zeros(2, in_channels, image_size, image_size))
        except Exception as exc:  # noqa: BLE001 - the user's forward failing on the data's shape is input
            raise UserError(f"model.arch: {arch} fails on a batch of the data's images {shape} in {mode} mode "
                            f"({plugins.one_line(exc)})") from None
        finally:
            net.train(was_training)
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        if got != [2, num_classes]:
            raise UserError(f"model.arch: {arch} outputs {got} in {mode} mode for images {shape}; expected logits "
                            f"[2, {num_classes}] (the data's {num_classes} classes: size the head with the "
                            "num_classes argument)")


def torchvision_classifier(name: str, num_classes: int, in_channels: int, kwargs: dict) -> nn.Module:
    """Any classification model of torchvision.models, untrained (weights=None: nothing is
    downloaded), its head sized by `num_classes`. Data with other than 3 channels: the first
    convolution that reads the 3 RGB channels is replaced by a fresh one reading `in_channels`
    (same kernel, stride and padding; its weights initialised anew, and skipped by
    model.weights). GoogLeNet and Inception v3 are built without their auxiliary heads."""
    tvm = _torchvision_models()
    names = tvm.list_models(module=tvm)
    if name not in names:
        raise UserError(f"model.arch: torchvision:{name} is not a torchvision classification model; valid: "
                        f"{', '.join(names)}")
    builder = tvm.get_model_builder(name)
    if name in ("googlenet", "inception_v3"):
        kwargs = {"aux_logits": False, "init_weights": True, **kwargs}
    try:
        model = builder(weights=None, num_classes=num_classes, **kwargs)
    except Exception as exc:  # noqa: BLE001 - a keyword or size torchvision refuses is input
        raise UserError(f"model.arch: torchvision:{name} refuses model.kwargs {kwargs} "
                        f"({plugins.one_line(exc)})") from None
    if in_channels != 3:
        _adapt_input(model, name, in_channels)
    return model


def _adapt_input(model: nn.Module, name: str, in_channels: int) -> None:
    for path, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3:
            conv = nn.Conv2d(in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                             module.dilation, module.groups if module.groups == 1 else in_channels,
                             module.bias is not None, module.padding_mode)
            parent, _, attr = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, conv)
            return
    raise UserError(f"model.arch: torchvision:{name} has no 3-channel first convolution to adapt to "
                    f"{in_channels} channels")


def unpruned_weights(model: nn.Module, prunable: list[str]) -> dict[str, list[str]]:
    """Weight tensors (2-D or more) that no criterion prunes, by the type of their module: those
    of layers other than Conv2d and Linear (Conv1d, Embedding, attention's packed projections),
    of Conv2d/Linear layers that an eval-mode forward never calls (an auxiliary head, attention's
    out_proj, which it reads directly) or that compute with their own forward. Skipped; a sweep
    says so."""
    out: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if name in prunable:
            continue
        for pname, param in module.named_parameters(recurse=False):
            if param.dim() >= 2:
                out.setdefault(type(module).__name__, []).append(f"{name}.{pname}" if name else pname)
    return out


# torchvision's published DenseNet files name layers `norm.1`, `conv.2`, ...; its models say
# `norm1`, `conv2` (torchvision renames them the same way when it loads the file itself).
_DENSENET_OLD_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
                               r"((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")


def load_weights(model: nn.Module, path: Path) -> list[str]:
    """Load a local state_dict (e.g. torchvision's ImageNet weights) into `model` (`fit_state`).
    Returns the names of the skipped tensors."""
    if not path.is_file():
        raise UserError(f"model.weights: file {path} not found (expected a torchvision state_dict .pth, or "
                        "torchvision's weight name such as IMAGENET1K_V1)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input
        raise UserError(f"model.weights: {path} is not a readable state_dict ({type(exc).__name__})") from None
    if not isinstance(state, dict):
        raise UserError(f"model.weights: {path} holds a {type(state).__name__}, not a state_dict")
    return fit_state(model, state, str(path))


def fit_state(model: nn.Module, state: dict, source: str) -> list[str]:
    """Load the tensors of `state` that fit `model`, skipping those whose shapes differ (the head
    sized to the dataset, a small stem's or a grayscale first conv). Returns the names of the
    model's tensors left as they were."""
    state = {_DENSENET_OLD_KEY.sub(r"\1\2", k): v for k, v in state.items()}
    own = model.state_dict()
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not matched:
        raise UserError(f"model.weights: no tensor in {source} fits this model (wrong arch or stem?)")
    model.load_state_dict(matched, strict=False)
    return sorted(set(own) - set(matched))


def forward_order(model: nn.Module, example: torch.Tensor, types=(nn.Conv2d, nn.Linear)) -> list[str]:
    """Names of the modules of `types`, in the order a forward pass calls them."""
    order: list[str] = []
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: order.append(name))
             for name, m in model.named_modules() if isinstance(m, types)]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    seen: dict[str, None] = {}
    for n in order:
        seen.setdefault(n)
    return list(seen)


def prunable_layers(model: nn.Module, in_channels: int, image_size: int) -> list[str]:
    """Conv and linear layers (their `weight` is pruned), in forward order: those that compute
    with torch's own forward from their `weight` as it is. A subclass with its own forward (a
    weight-standardised conv) or a parametrized weight would compute with something other than
    the masked weight, so it is left out (`unpruned_weights` names it)."""
    device = next(model.parameters()).device
    order = forward_order(model, torch.zeros(1, in_channels, image_size, image_size, device=device))
    modules = dict(model.named_modules())
    return [n for n in order if _plain(modules[n])]


def _plain(module: nn.Module) -> bool:
    base = nn.Conv2d if isinstance(module, nn.Conv2d) else nn.Linear
    return type(module).forward is base.forward and not hasattr(module, "parametrizations")
