"""Wanda and SparseGPT against their references on one small layer: the masks and updated weights
that locuslab/wanda's `prune_wanda` and IST-DASLab/sparsegpt's `SparseGPT.fasterprune` give on
these inputs (run on them; their code is not here), and the criteria in real trials."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunetune import spec
from prunetune.errors import UserError
from prunetune.pruning.criteria.base import Context
from prunetune.pruning.criteria.data_aware import wanda
from prunetune.pruning.criteria.second_order import reconstruct, sparsegpt
from prunetune.pruning.masks import Masks
from prunetune.trial import run_trial

from conftest import digits_raw

W = ((torch.arange(24) % 7) - 3).float().reshape(3, 8) / 3  # a Linear(8, 3)'s weight
X = torch.linspace(-1, 1, 40).reshape(5, 8)  # 5 calibration inputs


def _pruned(criterion, target, n_m=None):
    model = nn.Sequential(nn.Linear(8, 3, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(W)
    masks = Masks(model, ["0"])
    context = Context(model, X[:1], n_m=n_m, calibration=lambda: iter([(X, torch.zeros(5, dtype=torch.long))]))
    masks.prune(target, criterion, ["0"], "layer", context=context)
    return masks.masks["0"].int().tolist(), model[0].weight.detach()


def test_wanda_is_the_references():
    assert _pruned(wanda, 0.5)[0] == [[1, 1, 0, 0, 0, 0, 1, 1], [1, 0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1, 0]]
    assert _pruned(wanda, 0.5, (2, 4))[0] == [[1, 1, 0, 0, 0, 0, 1, 1], [1, 1, 0, 0, 0, 1, 1, 0],
                                              [1, 0, 0, 1, 1, 1, 0, 0]]
    keep, weight = _pruned(wanda, 0.5)
    assert torch.equal(weight, W * torch.tensor(keep))  # no update: only a mask


def test_sparsegpt_is_the_references():
    """The reference prunes int(n·s) + 1 weights of a block (13 of 24 at 50%): the same mask and
    weights here at 13/24."""
    keep, weight = _pruned(sparsegpt, 13 / 24)
    assert keep == [[1, 0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1, 1]]
    torch.testing.assert_close(weight, torch.tensor([[-1.0, 0.0, 0.0, 0.0, 0.0, -0.720318, 0.788711, -0.035595],
                                                     [0.0, 0.0, 0.0, 0.0, 0.0, 0.027323, -0.991519, 0.322976],
                                                     [0.0, 0.0, 0.0, 0.0, 1.39994, -0.756407, -0.579417, -0.402426]]),
                               atol=1e-4, rtol=0)
    keep, weight = _pruned(sparsegpt, 0.5, (2, 4))
    assert keep == [[1, 1, 0, 0, 0, 0, 1, 1], [1, 0, 0, 1, 0, 0, 1, 1], [0, 0, 1, 1, 0, 1, 0, 1]]
    torch.testing.assert_close(weight, torch.tensor([[-1.0, -0.666667, 0.0, 0.0, 0.0, 0.0, 1.41286, -0.754857],
                                                     [-0.666667, 0.0, 0.0, 0.032527, 0.0, 0.0, 0.406749, -0.485828],
                                                     [0.0, 0.0, 0.079073, 0.491983, 0.0, -0.189126, 0.0, -0.720278]]),
                               atol=1e-4, rtol=0)


def test_sparsegpt_in_blocks_and_with_a_dead_input():
    h = X.double().t() @ X.double()
    w, drop = reconstruct(W.double(), h, torch.zeros(3, 8, dtype=torch.bool), 14, None, blocksize=4)
    assert (~drop).int().tolist() == [[1, 1, 0, 0, 0, 0, 1, 1], [1, 0, 0, 1, 0, 0, 0, 1], [0, 0, 0, 1, 0, 1, 0, 1]]
    torch.testing.assert_close(w.float(), torch.tensor([[-1.0, -0.666667, 0.0, 0.0, 0.0, 0.0, 1.41286, -0.754857],
                                                        [-0.666667, 0.0, 0.0, 0.032527, 0.0, 0.0, 0.0, -0.092962],
                                                        [0.0, 0.0, 0.0, 0.549435, 0.0, -0.139997, 0.0, -0.749191]]),
                               atol=1e-4, rtol=0)
    dead = X.clone()
    dead[:, 3] = 0  # an input the calibration never sets: the reference zeroes its weights, here they are kept
    w, drop = reconstruct(W.double(), 2 * dead.double().t() @ dead.double(), torch.zeros(3, 8, dtype=torch.bool),
                          13, None)
    assert int(drop.sum()) == 13  # the layer's count, exactly
    kept = ~drop[:, 3]
    assert torch.equal(w[kept, 3], W.double()[kept, 3])  # nothing compensates into or out of a dead input


def test_weights_pruned_before_stay_pruned_and_count():
    before = torch.zeros(3, 8, dtype=torch.bool)
    before[0, 0] = before[2, 7] = True
    w, drop = reconstruct(W.double(), X.double().t() @ X.double(), before, 12, None, blocksize=4)
    assert drop[0, 0] and drop[2, 7] and int(drop.sum()) == 12


@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("extra", [{}, {"schedule__n_m": [2, 4], "schedule__sparsity": 0.5},
                                   {"schedule__scope": "erk", "schedule__method": "iterative"},
                                   {"schedule__scope": "lamp"}])
def test_in_a_trial_on_convolutions_and_linear_layers(tmp_path, criterion, extra):
    keys = {"schedule__sparsity": 0.8, **extra}
    raw = digits_raw(schedule__criterion=criterion, schedule__calibration_samples=64, **keys)
    result = run_trial(spec.load(None, raw=raw).trial_spec(), tmp_path)
    assert result.metrics["sparsity"] == pytest.approx(raw["schedule"]["sparsity"], abs=1e-4)
    assert result.metrics["test_acc"] > 0.2
    if "schedule__n_m" in extra:
        assert result.metrics["nm_valid"] == 1.0


@pytest.mark.parametrize("extra, message", [
    ({"schedule__method": "dsd"}, r"schedule.method dsd releases its masks"),
    ({"schedule__criterion": "l1_filter", "schedule__scope": "lamp"}, r"schedule.scope lamp does not apply"),
    ({"schedule__n_m": [2, 4], "schedule__sparsity": 0.8}, r"schedule.sparsity must be 1 − N/M = 0.5"),
])
def test_what_they_cannot_run_names_the_key(extra, message):
    with pytest.raises(UserError, match=message):
        spec.load(None, raw=digits_raw(**{"schedule__criterion": "wanda", **extra}))


@pytest.mark.parametrize("stride, padding, dilation", [(1, 1, 1), (2, 0, 1), (1, 2, 2)])
def test_a_convolutions_input_features_are_its_patches_in_weight_order(monkeypatch, stride, padding, dilation):
    """Wanda's norm of a conv weight (o, c, i, j) runs over every image and output position of
    the input value that weight multiplies: the same as a convolution of x² with a one-hot kernel
    at (c, i, j), summed (an independent computation of the column order and the padding)."""
    from prunetune.pruning.criteria import data_aware

    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, stride=stride, padding=padding, dilation=dilation, bias=False)
    model = nn.Sequential(conv)
    x = torch.randn(6, 3, 9, 9)
    seen = {}
    monkeypatch.setattr(data_aware, "prune_rows", lambda masks, name, scores, count: seen.setdefault("s", scores))
    masks = Masks(model, ["0"])
    context = Context(model, x[:1], n_m=None, calibration=lambda: iter([(x[:4], None), (x[4:], None)]))
    masks.prune(0.5, wanda, ["0"], "layer", context=context)
    one_hot = torch.eye(27).view(27, 3, 3, 3)
    squared = torch.nn.functional.conv2d(x ** 2, one_hot, stride=stride, padding=padding, dilation=dilation)
    expected = conv.weight.detach().abs() * squared.sum((0, 2, 3)).sqrt().view(1, 3, 3, 3)
    torch.testing.assert_close(seen["s"].float(), expected, rtol=1e-5, atol=1e-6)
