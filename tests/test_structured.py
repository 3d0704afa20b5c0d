"""Structured (filter/neuron) pruning: channel groups, exact targets, physical removal that
computes what the masked model computes, the group-lasso penalty, and the trial's outputs."""

import pytest
import torch
from torch import nn

from prunetune import spec
from prunetune.cache import DenseCache
from prunetune.errors import UserError
from prunetune.models import build_model, prunable_layers
from prunetune.pruning.criteria.channel import channel_scores, l1_filter, l2_filter
from prunetune.pruning.masks import Masks
from prunetune.pruning.structured import GroupLasso, channel_groups, remove_channels
from prunetune.spec import ModelSpec
from prunetune.trial import Trial

from conftest import digits_raw


def _setup(arch: str, size: int = 16, classes: int = 10, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(ModelSpec(arch=arch), classes, 3, size)
    # batch norms with non-trivial statistics and affine parameters, as after training
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    layers = prunable_layers(model, 3, size)
    example = torch.zeros(1, 3, size, size)
    groups = channel_groups(model, example, layers, exclude=layers[-1:])
    return model, layers, groups, Masks(model, layers, groups), example


@pytest.mark.parametrize("arch", ["simple_cnn", "vgg11", "resnet18", "densenet121"])
def test_removed_model_computes_what_the_masked_model_computes(arch):
    """Batch norm, the next layers' inputs, ResNet's additions, DenseNet's concatenations."""
    model, layers, groups, masks, example = _setup(arch)
    masks.prune(0.5, l1_filter, layers, "global")
    model.eval()
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        masked = model(x)
    compact = remove_channels(model, groups, masks.channels_kept, example)
    with torch.no_grad():
        removed = compact(x)
    assert removed.shape == masked.shape
    torch.testing.assert_close(removed, masked, rtol=1e-4, atol=1e-5)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(compact) < 0.5 * n(model)
    # every group lost what its mask says, and no group lost its last channel
    assert all(0 < int(k.sum()) < len(k) for k in masks.channels_kept)


def test_resnet_residual_channels_are_one_group():
    """Channels added together in a residual stream are pruned together."""
    _, _, groups, _, _ = _setup("resnet18")
    stem = next(g for g in groups if "conv1" in g.layers)
    # the stem's output is added to the output of every block of layer1 (and to nothing else)
    assert set(stem.layers) == {"conv1", "layer1.0.conv2", "layer1.1.conv2"}
    members = {m.param for m in stem.members}
    assert {"bn1.weight", "layer1.0.bn2.bias", "layer1.1.conv1.weight", "layer2.0.conv1.weight"} <= members
    assert len({g.layers for g in groups}) == len(groups)  # no channel in two groups


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_channel_targets_are_exact_and_masks_only_shrink(scope):
    model, layers, groups, masks, _ = _setup("vgg11")
    total = sum(g.channels for g in groups)
    before = None
    for target in (0.3, 0.5, 0.7):
        masks.prune(target, l2_filter, layers, scope)
        pruned = [int((~k).sum()) for k in masks.channels_kept]
        if scope == "layer":
            assert pruned == [round(target * g.channels) for g in groups]
        else:
            assert sum(pruned) == round(target * total)
        if before is not None:
            assert all(bool((old | ~new).all()) for old, new in zip(before, masks.channels_kept))  # kept ⊆ kept before
        before = [k.clone() for k in masks.channels_kept]
    assert masks.channel_sparsity() == pytest.approx(0.7, abs=len(groups) / total)  # per-layer rounding
    # the pruned channels' slices are zero in every member: filters, next layer's inputs
    params = dict(model.named_parameters())
    for g, kept in zip(groups, masks.channels_kept):
        for m in g.members:
            w = params[m.param].detach()
            pruned_index = m.index[~kept[m.channel]]
            assert float(w.index_select(m.dim, pruned_index).abs().sum()) == 0.0
            if m.param.endswith(".weight"):  # (torchvision initialises biases to zero)
                kept_index = m.index[kept[m.channel]]
                assert bool((w.index_select(m.dim, kept_index).abs().flatten(1 - m.dim if w.dim() > 1 else 0)
                             .sum(-1) > 0).all()) if w.dim() > 1 else bool((w[kept_index] != 0).all())


def test_scores_are_filter_norms_and_the_lowest_go_first():
    model, layers, groups, masks, _ = _setup("simple_cnn")
    conv = model.features[0]
    params = dict(model.named_parameters())
    first = groups[0]
    assert first.layers == ("features.0",)
    torch.testing.assert_close(channel_scores(first, params, 1), conv.weight.detach().abs().flatten(1).sum(1))
    torch.testing.assert_close(channel_scores(first, params, 2), conv.weight.detach().flatten(1).norm(dim=1))
    expected_pruned = set(conv.weight.detach().abs().flatten(1).sum(1).argsort()[:8].tolist())
    masks.prune(0.25, l1_filter, ["features.0"], "layer")
    assert set((~masks.channels_kept[0]).nonzero().flatten().tolist()) == expected_pruned
    assert masks.channels_kept[1].all() and masks.channels_kept[2].all()  # other layers untouched
    assert float(model.features[1].weight.detach()[list(expected_pruned)].abs().sum()) == 0.0  # its batch norm


def test_group_lasso_is_the_sum_of_channel_norms():
    model, _, groups, _, _ = _setup("simple_cnn")
    f = model.features
    c0 = torch.sqrt(f[0].weight.pow(2).flatten(1).sum(1) + f[0].bias.pow(2) + f[1].weight.pow(2)
                    + f[1].bias.pow(2) + f[4].weight.pow(2).sum((0, 2, 3)))
    lasso = GroupLasso(groups[:1], model)
    torch.testing.assert_close(lasso(), c0.sum(), rtol=1e-5, atol=1e-5)
    lasso().backward()  # differentiable
    assert f[0].weight.grad is not None and float(f[0].weight.grad.abs().sum()) > 0


def test_group_lasso_shrinks_channel_norms_in_training(tmp_path):
    norms = {}
    for lam in (0.0, 0.05):
        trial = Trial(spec.load(None, raw=digits_raw(
            schedule__criterion="l1_filter", schedule__sparsity=0.0, train__group_lasso=lam,
            train__dense_epochs=3)).trial_spec())
        trial.dense_phase(DenseCache(tmp_path / str(lam)))
        with torch.no_grad():
            norms[lam] = float(GroupLasso(trial.masks.groups, trial.model)())
    assert norms[0.05] < 0.8 * norms[0.0]


def test_structured_trial_with_removal_logs_an_exported_compact_model(tmp_path):
    trial = Trial(spec.load(None, raw=digits_raw(
        schedule__method="iterative", schedule__criterion="l1_filter", schedule__sparsity=0.5,
        schedule__step_size=0.25, schedule__step_epochs=0.5, schedule__remove=True)).trial_spec())
    result = trial.run(tmp_path)
    m = result.metrics
    assert m["channel_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert m["compact_params"] < 0.5 * m["total_params"]
    assert m["measured_speedup"] == pytest.approx(m["latency_ms_dense"] / m["latency_ms_compact"])
    assert m["test_acc"] > 0.5
    program = torch.export.load(tmp_path / "checkpoint" / "compact.pt2")
    x, _ = next(trial.data.eval_batches("test", 32))
    trial.model.eval()
    with torch.no_grad():
        expected = trial.model(x)
    torch.testing.assert_close(program.module()(x.cpu()), expected.cpu(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(program.module()(x[:1].cpu()), expected[:1].cpu(), rtol=1e-4, atol=1e-5)
    assert sum(p.numel() for p in program.module().parameters()) == m["compact_params"]


def test_structured_keys_need_a_structured_criterion():
    with pytest.raises(UserError, match="schedule.remove: needs a structured"):
        spec.load(None, raw=digits_raw(schedule__remove=True))
    with pytest.raises(UserError, match="train.group_lasso: needs a structured"):
        spec.load(None, raw=digits_raw(train__group_lasso=0.001))
    # a searched criterion: applies to the trials that sample a structured one
    spec.load(None, raw=digits_raw(schedule__criterion={"choice": ["l1_unstructured", "l1_filter"]},
                                   schedule__remove=True))


def test_head_only_layers_is_a_clear_error():
    with pytest.raises(UserError, match="selects no layer with prunable channels"):
        Trial(spec.load(None, raw=digits_raw(schedule__criterion="l1_filter", schedule__layers="last:1")).trial_spec())


def test_vgg11_half_the_filters_removed_leaves_at_most_30_percent_of_conv_params():
    """The issue's bar on size (its speed half is measured by benchmarks/structured_speedup.py)."""
    model, layers, groups, masks, example = _setup("vgg11", size=32)
    masks.prune(0.5, l1_filter, layers, "layer")
    compact = remove_channels(model, groups, masks.channels_kept, example)
    conv = lambda m: sum(c.weight.numel() for c in m.modules() if isinstance(c, nn.Conv2d))  # noqa: E731
    assert conv(compact) <= 0.30 * conv(model)
    assert [c.out_channels for c in compact.modules() if isinstance(c, nn.Conv2d)] == \
        [32, 64, 128, 128, 256, 256, 256, 256]
