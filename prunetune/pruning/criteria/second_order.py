"""SparseGPT (Frantar & Alistarh 2023; IST-DASLab/sparsegpt, `SparseGPT.fasterprune`): layer-wise
OBS reconstruction on calibration inputs. For each layer, in forward order and on the inputs of
the network already pruned before it: H = (2 / images) Σ x xᵀ over its inputs (a convolution's
unfolded patches, as GPTQ's `add_batch` unfolds them and counts its samples; the reference has no
convolution rule, and counts a 2-D batch as one sample), damped by
`percdamp` (0.01) × mean(diag H), and U the upper Cholesky factor of H⁻¹. Column blocks of
`blocksize` (128) are pruned in turn: the weights with the lowest w² / U_jj² over the whole block
(unstructured; or the M − N lowest of every M consecutive inputs in each row, chosen column by
column on the weights updated so far, with `schedule.n_m`) are zeroed one column at a time, the
error (w − q) / U_jj spread over the columns after it along U's row, and the block's error over
the later blocks. The updated weights are what the trial continues with.

Differences from the reference, for exact targets: it selects `<=` the block's int(n·s)-th
score, one weight more than n·s (13 of 24 at 50%), where here each block prunes its share of the
layer's count exactly (`allocation.rounded_counts`); weights pruned before (an earlier step) stay
pruned and count first; and the weights of a dead input (zero over the calibration data, e.g.
behind a neuron an earlier layer lost all its weights to) are left as they are, where the
reference zeroes them: zeroed, they would take a layer past its target (ERK's dense last layer
of a small CNN lost 200 weights so), and they are scored like the others. Computed in float64 (the reference in float32:
within 1e-5 on its test layer)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prunetune.pruning.allocation import rounded_counts
from prunetune.pruning.criteria.base import layer_inputs
from prunetune.pruning.criteria.data_aware import Calibrated

if TYPE_CHECKING:
    import torch

BLOCKSIZE, PERCDAMP = 128, 0.01  # the reference's defaults


class SparseGPT(Calibrated):
    name = "sparsegpt"

    def prune_layer(self, masks, name, model, batches, n_m, count) -> None:
        import torch

        weight = masks.weights[name]
        d_in = weight[0].numel()
        hessian = torch.zeros(d_in, d_in, dtype=torch.float64, device=weight.device)

        def take(x):
            x = x.double()
            hessian.addmm_(x.t(), x)

        images = layer_inputs(model, name, batches, take)
        hessian *= 2 / max(1, images)  # the reference's scale (2/samples; a sample is an image, as GPTQ's conv)
        # N:M groups run along a conv's input channels (channels-last, `nm.nm_view`): its columns,
        # (channel, kernel row, kernel column) in `flatten(1)`, are put in that order first
        order = torch.arange(d_in, device=weight.device)
        if n_m is not None and weight.dim() == 4:
            order = order.view(weight.shape[1:]).permute(1, 2, 0).flatten()
        pruned = masks.masks[name].flatten(1)[:, order].logical_not()
        new, drop = reconstruct(weight.detach().flatten(1)[:, order].double(), hessian[order][:, order], pruned,
                                count, n_m)
        back = torch.argsort(order)
        with torch.no_grad():
            weight.copy_(new[:, back].view_as(weight).to(weight.dtype))
        masks.masks[name] &= drop[:, back].logical_not().view_as(masks.masks[name])


def reconstruct(w: torch.Tensor, hessian: torch.Tensor, pruned: torch.Tensor, count: int | None,
                n_m: tuple[int, int] | None, blocksize: int = BLOCKSIZE,
                percdamp: float = PERCDAMP) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's `fasterprune` on weights `w` [rows, d_in] with H = `hessian`: the updated
    weights and the pruned positions (`pruned`: those pruned before; `count`: how many the layer
    leaves zero, unstructured; `n_m`: N of every M survive)."""
    import torch

    w, h = w.clone(), hessian.clone()
    dead = torch.diag(h) == 0  # an input the calibration never sets (H invertible, as the reference)
    h[dead, dead] = 1
    h += torch.eye(len(h), dtype=h.dtype, device=h.device) * percdamp * torch.diag(h).mean()
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    drop = torch.zeros_like(pruned)
    blocks = [(i, min(i + blocksize, w.shape[1])) for i in range(0, w.shape[1], blocksize)]
    shares = _block_counts(pruned, blocks, count) if n_m is None else {}
    for i1, i2 in blocks:
        w1, u1, before = w[:, i1:i2].clone(), u[i1:i2, i1:i2], pruned[:, i1:i2]
        err, block = torch.zeros_like(w1), torch.zeros_like(before)
        if n_m is None:
            score = (w1 ** 2 / torch.diag(u1) ** 2).masked_fill(before, float("-inf"))
            block.view(-1)[torch.topk(score.flatten(), shares[i1], largest=False).indices] = True
        for i in range(i2 - i1):
            if n_m is not None and i % n_m[1] == 0:
                group = slice(i, i + n_m[1])
                score = w1[:, group] ** 2 / torch.diag(u1)[group] ** 2
                score = score.masked_fill(before[:, group], float("-inf"))
                low = torch.topk(score, n_m[1] - n_m[0], dim=1, largest=False).indices
                block[:, group] = torch.zeros_like(before[:, group]).scatter_(1, low, True)
            q = w1[:, i].masked_fill(block[:, i], 0)
            e = (w1[:, i] - q) / u1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            w1[:, i] = q
            err[:, i] = e
        w[:, i1:i2], drop[:, i1:i2] = w1, block
        w[:, i2:] -= err @ u[i1:i2, i2:]
    return w, drop


def _block_counts(pruned: torch.Tensor, blocks: list[tuple[int, int]], count: int) -> dict[int, int]:
    """Each block's count: the weights pruned before in it, and its share of the new ones (by the
    weights it still has), adding up to the layer's `count`."""
    before = {i1: int(pruned[:, i1:i2].sum()) for i1, i2 in blocks}
    alive = {i1: pruned[:, i1:i2].numel() - before[i1] for i1, i2 in blocks}
    new = max(0, count - sum(before.values()))
    total_alive = sum(alive.values())
    fractions = {i1: new / total_alive if total_alive else 0.0 for i1 in alive}
    extra = rounded_counts(fractions, alive, min(new, total_alive))
    return {i1: before[i1] + extra[i1] for i1 in before}


sparsegpt = SparseGPT()
