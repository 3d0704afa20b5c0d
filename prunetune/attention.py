"""`nn.MultiheadAttention` as four `nn.Linear` layers computing the same function, so that every
criterion prunes attention's projections as it prunes any linear layer.

torch's `nn.MultiheadAttention` keeps the query, key and value projections packed in one
parameter (`in_proj_weight`), not a layer, and reads `out_proj.weight` directly, never calling
the layer: masking them would need a criterion of their own for each. `split_attention` replaces
each one in a built model with `SplitAttention`: `q_proj`, `k_proj`, `v_proj` and `out_proj`, the
same weights (the packed one cut in three), the same forward signature and outputs (tested against
torch's on every argument torchvision's models use, and masks). A `MultiheadAttention` whose key
and value widths differ from the query's, or with `bias_k` or `add_zero_attn`, stays as it is
(its weights then stay dense, and `prunetune validate` names them)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class SplitAttention(nn.Module):
    """Multi-head attention whose projections are `nn.Linear` layers; built from (and computing
    what) an `nn.MultiheadAttention` computes."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        d, bias = mha.embed_dim, mha.in_proj_bias is not None
        self.num_heads, self.dropout, self.batch_first = mha.num_heads, mha.dropout, mha.batch_first
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d, d, bias) for _ in range(3))
        self.out_proj = nn.Linear(d, d, mha.out_proj.bias is not None)
        with torch.no_grad():
            for i, layer in enumerate((self.q_proj, self.k_proj, self.v_proj)):
                layer.weight.copy_(mha.in_proj_weight[i * d:(i + 1) * d])
                if bias:
                    layer.bias.copy_(mha.in_proj_bias[i * d:(i + 1) * d])
            self.out_proj.weight.copy_(mha.out_proj.weight)
            if self.out_proj.bias is not None:
                self.out_proj.bias.copy_(mha.out_proj.bias)
        self.to(mha.in_proj_weight.device, mha.in_proj_weight.dtype)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if not self.batch_first:  # (length, batch, features) → (batch, length, features)
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        q, k, v = (self._heads(p(t)) for p, t in ((self.q_proj, query), (self.k_proj, key), (self.v_proj, value)))
        bias = _additive_mask(attn_mask, key_padding_mask, is_causal, q, k)
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + bias
        weights = F.dropout(scores.softmax(-1), self.dropout, self.training)
        out = (weights @ v).transpose(1, 2).flatten(2)
        out = self.out_proj(out)
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, weights.mean(1) if average_attn_weights else weights

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, length, features) → (batch, heads, length, features per head)."""
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)


def _additive_mask(attn_mask, key_padding_mask, is_causal, q, k) -> torch.Tensor | float:
    """torch's masks as one additive bias: a True of a boolean mask (or -inf of a float one)
    keeps that key from that query; `key_padding_mask` is [batch, keys], `attn_mask` [queries,
    keys] or [batch · heads, queries, keys]."""
    def additive(mask):
        return torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(mask, float("-inf")) \
            if mask.dtype == torch.bool else mask.to(q.dtype)

    bias = 0.0
    if attn_mask is None and is_causal:
        attn_mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).triu(1)
    if attn_mask is not None:
        mask = additive(attn_mask)
        bias = mask.view(q.shape[0], q.shape[1], *mask.shape[-2:]) if mask.dim() == 3 else mask
    if key_padding_mask is not None:
        bias = bias + additive(key_padding_mask)[:, None, None, :]
    return bias


def split_attention(model: nn.Module) -> list[str]:
    """Replace every `nn.MultiheadAttention` of `model` that `SplitAttention` computes exactly
    (same widths for query, key and value; no bias_k, no add_zero_attn) by one; the names of those
    replaced."""
    replaced = []
    for name, module in list(model.named_modules()):
        if (isinstance(module, nn.MultiheadAttention) and module._qkv_same_embed_dim
                and module.bias_k is None and not module.add_zero_attn):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, SplitAttention(module))
            replaced.append(name)
    return replaced
