"""taylor_filter (Molchanov et al. 2019): a group channel's importance is (Σ g·w)² over every
parameter its removal zeroes, averaged over calibration batches. Checked against an independent
computation: the derivative of the loss with respect to a scale on the whole group channel, by
central finite differences in float64."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunetune import spec
from prunetune.models import build_model, prunable_layers
from prunetune.pruning.criteria.base import Context
from prunetune.pruning.criteria.channel import taylor_filter, taylor_scores
from prunetune.pruning.masks import Masks
from prunetune.pruning.structured import channel_groups
from prunetune.trial import Trial

from conftest import digits_raw


def _setup(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(spec.ModelSpec(arch=arch), 10, 3, 16)
    layers = prunable_layers(model, 3, 16)
    model.double()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # as after training: statistics and affine parameters
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    model.eval()
    groups = channel_groups(model, torch.zeros(1, 3, 16, 16, dtype=torch.float64), layers, exclude=layers[-1:])
    batches = [(torch.randn(6, 3, 16, 16, dtype=torch.float64), torch.randint(0, 10, (6,))) for _ in range(2)]
    return model, layers, groups, batches


def _loss_with_channel_scaled(model, group, channel, scale, batches) -> list[float]:
    """The loss on each batch with every parameter slice of `channel` of `group` times `scale`."""
    params = dict(model.named_parameters())
    saved = {m.param: params[m.param].detach().clone() for m in group.members}
    with torch.no_grad():
        for m in group.members:
            index = m.index[m.channel == channel]
            params[m.param].index_copy_(m.dim, index, params[m.param].index_select(m.dim, index) * scale)
        losses = [float(F.cross_entropy(model(x), y)) for x, y in batches]
        for name, value in saved.items():
            params[name].copy_(value)
    return losses


@pytest.mark.parametrize("arch", ["simple_cnn", "resnet18"])
def test_scores_are_the_squared_derivative_of_the_loss_along_the_whole_group(arch):
    """resnet18: the stem's group spans conv1, bn1, the residual stream's convs and the next
    layers' inputs; every one of them is in the sum."""
    model, _, groups, batches = _setup(arch)
    scores = taylor_scores(model, groups, lambda: iter(batches))
    eps = 1e-6
    for group in groups[:3]:
        for channel in range(0, group.channels, max(1, group.channels // 4)):
            up = _loss_with_channel_scaled(model, group, channel, 1 + eps, batches)
            down = _loss_with_channel_scaled(model, group, channel, 1 - eps, batches)
            # d/ds L(s·w_group) at s = 1 is Σ g·w over the group channel; squared per batch, averaged
            expected = sum(((u - d) / (2 * eps)) ** 2 for u, d in zip(up, down)) / len(batches)
            assert float(scores[id(group)][channel]) == pytest.approx(expected, rel=1e-4, abs=1e-12)


def test_the_least_important_channels_go_and_the_model_is_left_as_it_was():
    model, layers, groups, batches = _setup("simple_cnn")
    model.train()  # the trial's mode; scoring runs in eval mode and gives it back
    masks = Masks(model, layers, groups)
    before = {n: b.clone() for n, b in model.named_buffers()}
    expected = taylor_scores(model.eval(), groups, lambda: iter(batches))[id(groups[0])]
    model.train()
    context = Context(model, torch.zeros(1, 3, 16, 16), calibration=lambda: iter(batches))
    masks.prune(0.25, taylor_filter, [groups[0].layers[0]], "layer", context=context)
    assert set((~masks.channels_kept[0]).nonzero().flatten().tolist()) == set(expected.argsort()[:8].tolist())
    assert all(k.all() for k in masks.channels_kept[1:])
    assert model.training and all(torch.equal(b, before[n]) for n, b in model.named_buffers())
    assert all(p.grad is None for p in model.parameters())


def test_a_taylor_trial_removes_channels_and_exports_the_compact_model(tmp_path):
    trial = Trial(spec.load(None, raw=digits_raw(
        schedule__method="oneshot", schedule__criterion="taylor_filter", schedule__sparsity=0.5,
        schedule__scope="global", schedule__remove=True, schedule__calibration_samples=64)).trial_spec())
    m = trial.run(tmp_path).metrics
    assert m["channel_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert m["compact_params"] < m["total_params"]
    assert (tmp_path / "checkpoint" / "compact.pt2").exists()
