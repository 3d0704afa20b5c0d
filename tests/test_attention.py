"""Attention's projections as Linear layers (`attention.split_attention`): the same function as
torch's MultiheadAttention, and a ViT whose attention every criterion prunes."""

import pytest
import torch
from torch import nn
from torchvision.models import VisionTransformer

from prunetune import spec
from prunetune.attention import SplitAttention, split_attention
from prunetune.models import prunable_layers, unpruned_weights
from prunetune.trial import run_trial

from conftest import digits_raw


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_split_attention_computes_what_multihead_attention_computes(batch_first, bias):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, bias=bias, batch_first=batch_first).eval()
    if bias:
        nn.init.normal_(mha.out_proj.bias)
    split = SplitAttention(mha).eval()
    shape = (3, 7, 16) if batch_first else (7, 3, 16)
    q, k, v = (torch.randn(shape) for _ in range(3))
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[0, -2:] = True
    causal = torch.ones(7, 7, dtype=torch.bool).triu(1)
    float_mask = torch.randn(3 * 4, 7, 7)
    for kwargs in ({}, {"need_weights": False}, {"key_padding_mask": padding}, {"attn_mask": causal},
                   {"attn_mask": float_mask, "average_attn_weights": False},
                   {"attn_mask": causal, "is_causal": True, "key_padding_mask": padding}):
        expected, expected_weights = mha(q, k, v, **kwargs)
        got, weights = split(q, k, v, **kwargs)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        if expected_weights is None:
            assert weights is None
        else:
            torch.testing.assert_close(weights, expected_weights, rtol=1e-5, atol=1e-6)


def test_a_vision_transformer_is_the_same_function_with_every_projection_a_linear_layer():
    torch.manual_seed(0)
    vit = VisionTransformer(16, 4, 2, 2, 32, 64, num_classes=10).eval()
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        expected = vit(x)
        assert split_attention(vit) == ["encoder.layers.encoder_layer_0.self_attention",
                                        "encoder.layers.encoder_layer_1.self_attention"]
        torch.testing.assert_close(vit(x), expected, rtol=1e-5, atol=1e-5)
    layers = prunable_layers(vit, 3, 16)
    block = "encoder.layers.encoder_layer_0"
    assert {f"{block}.self_attention.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")} <= set(layers)
    assert {f"{block}.mlp.0", f"{block}.mlp.3", "conv_proj", "heads.head"} <= set(layers)
    # what stays dense: the class token and the position embedding (and the layer norms, 1-D)
    assert unpruned_weights(vit, layers) == {"VisionTransformer": ["class_token"], "Encoder": ["encoder.pos_embedding"]}


def test_a_multihead_attention_it_cannot_split_stays_as_it_is():
    model = nn.Sequential(nn.MultiheadAttention(8, 2, kdim=4, vdim=4))
    assert split_attention(model) == [] and isinstance(model[0], nn.MultiheadAttention)


@pytest.mark.parametrize("criterion, extra", [("wanda", {}), ("sparsegpt", {}),
                                              ("sparsegpt", {"schedule__n_m": [2, 4], "schedule__sparsity": 0.5})])
def test_wanda_and_sparsegpt_prune_a_vit_through_its_attention_and_mlp(tmp_path, criterion, extra):
    raw = digits_raw(model__arch="examples.tiny_vit:build", data__image_size=16, schedule__criterion=criterion,
                     schedule__calibration_samples=32, **{"schedule__sparsity": 0.7, **extra})
    trial_spec = spec.load(None, raw=raw).trial_spec()
    result = run_trial(trial_spec, tmp_path)
    assert result.metrics["sparsity"] == pytest.approx(raw["schedule"]["sparsity"], abs=1e-4)
    rows = {r["layer"]: r for r in _csv(tmp_path / "layer_sparsity.csv")}
    for name in ("encoder.layers.encoder_layer_1.self_attention.v_proj", "encoder.layers.encoder_layer_1.mlp.0"):
        assert float(rows[name]["sparsity"]) == pytest.approx(raw["schedule"]["sparsity"], abs=0.01)


def _csv(path):
    import csv

    with open(path) as f:
        return list(csv.DictReader(f))
