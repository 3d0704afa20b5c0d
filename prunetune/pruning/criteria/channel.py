"""Structured criteria (`l1_filter`, `l2_filter`, `taylor_filter`): whole output channels of
convolutions and neurons of linear layers, each with its group (`structured.py`: the filters and
bias, the batch norm after it, the next layers' input columns, what residual additions and
concatenations couple to it). A group channel's score is the L`p` norm of its filters, or for
`taylor_filter` (Molchanov et al. 2019) the first-order Taylor estimate of the loss change when the
whole group channel is zeroed, (Σ g·w)² over every parameter of it, averaged over calibration
batches.

`schedule.remove`: after training the pruned channels are removed for real (`structured.
remove_channels`), the trial keeps the compact model (`Trial.compact`, exported as
`checkpoint/compact.pt2`) and reports its size and its CPU latency against the masked model's.
`train.group_lasso` penalises the same groups from the dense phase on."""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import TYPE_CHECKING

from prunetune.pruning.criteria.base import Criterion, allocation_breaks, needs_context, scoring_mode, shuffle_breaks

if TYPE_CHECKING:
    import torch

REMOVAL_METRICS = ("compact_params", "latency_ms_dense", "latency_ms_compact", "measured_speedup")


class ChannelNorm(Criterion):
    needs = "weights"
    structured = True
    acts_on = frozenset({"schedule.remove", "train.group_lasso"})
    metrics = {"channel_sparsity": "a structured schedule.criterion (not searched)",
               **dict.fromkeys(REMOVAL_METRICS, "a structured schedule.criterion with schedule.remove: true "
                                                "(neither searched)")}

    def __init__(self, p: int):
        self.p = p
        self.name = f"l{p}_filter"

    # -- rules -------------------------------------------------------------------------------
    def check(self, schedule) -> str | None:
        from prunetune.pruning.schedules import METHODS

        if schedule.method in METHODS and METHODS[schedule.method].regrows:
            # A pruned channel has all of its group at zero (filters, batch norm, next layers'
            # inputs): every gradient of it is zero, so it could never regrow after the release.
            return (f"schedule.method {schedule.method} re-grows pruned weights from zero, which a pruned "
                    f"channel cannot (its whole group is zero, so are its gradients); use "
                    f"l1_unstructured or random with {schedule.method}")
        return shuffle_breaks(schedule) or allocation_breaks(
            schedule, why=" (it prunes whole channels; erk, lamp and per-layer targets share single weights)")

    def dense_key(self, spec) -> dict:
        if spec.train.group_lasso > 0:
            # the penalty acts from the first step on the channel groups of the selected layers
            # (the same groups for every structured criterion; none for an unstructured one)
            return {"penalty": {"groups": "channels", "layers": spec.schedule.layers}}
        return {}

    def reports(self, schedule, searched: Collection[str] = ()) -> frozenset[str]:
        removed = schedule.remove and "schedule.remove" not in searched
        return frozenset(("channel_sparsity",) + (REMOVAL_METRICS if removed else ()))

    # -- torch side ----------------------------------------------------------------------------
    def prune(self, masks, target: float, layers: list[str], scope: str, generator=None, context=None) -> None:
        params = {**{f"{n}.weight": w for n, w in masks.weights.items()}, **masks.extra}
        prune_channels(masks, target, lambda group: channel_scores(group, params, self.p), layers, scope)
        masks.apply()

    def groups(self, model, example, selected, head, schedule) -> list:
        """The channel groups rooted at the selected layers; the classifier `head` keeps its
        outputs (the classes)."""
        from prunetune.errors import UserError
        from prunetune.pruning.structured import channel_groups

        groups = channel_groups(model, example, selected, exclude=[head])
        if not groups:
            raise UserError(f"schedule.layers: {schedule.layers!r} selects no layer with prunable "
                            f"channels (the classifier head {head} keeps its outputs)")
        return groups

    def final_metrics(self, trial) -> dict:
        """`channel_sparsity`; with `schedule.remove` the compact model's size and latencies
        (and `trial.compact` set to it)."""
        from prunetune.pruning.structured import removal_metrics, remove_channels

        out = {"channel_sparsity": trial.masks.channel_sparsity()}
        if trial.spec.schedule.remove:
            trial.compact = remove_channels(trial.model, trial.masks.groups, trial.masks.channels_kept, trial.example)
            out.update(removal_metrics(trial.model, trial.compact, trial.example))
        return out


l1_filter, l2_filter = ChannelNorm(1), ChannelNorm(2)


class TaylorFilter(ChannelNorm):
    """Molchanov et al. 2019 ("Importance Estimation for Neural Network Pruning"): a group
    channel's importance is (Σ_s g_s·w_s)², s over every parameter the channel's removal zeroes
    (its filters and bias, its batch-norm scale and shift, the next layers' input columns), g the
    gradient of the cross-entropy on one calibration batch (`schedule.calibration_samples`
    training images, in batches of `train.batch_size`), averaged over the batches. Scored in eval
    mode (running statistics), the model left as it was.

    The sum is taken inside the square over the whole group (the paper's group form: one estimate
    of removing the group together). Torch-Pruning's `TaylorImportance` by default sums |w·g| per
    layer and averages over the group's layers; with `multivariable=True` it takes |Σ w·g| per
    layer. Under scope global the scores are compared as they are, not divided by their mean: each
    estimates the same quantity, a change of the loss, whatever the layer's fan-in."""

    needs = "data"
    name = "taylor_filter"
    reads = frozenset({"schedule.calibration_samples"})

    def __init__(self):
        super().__init__(2)
        self.name = "taylor_filter"

    def prune(self, masks, target: float, layers: list[str], scope: str, generator=None, context=None) -> None:
        context = needs_context(context, self.name)
        masks.apply()
        with scoring_mode(context.model, False):
            scores = taylor_scores(context.model, masks.groups, context.calibration or context.batches)
        prune_channels(masks, target, lambda group: scores[id(group)], layers, scope, normalise=False)
        masks.apply()


taylor_filter = TaylorFilter()


# -- the channels' arithmetic -------------------------------------------------------------------

def prune_channels(masks, target: float, score: Callable, names: list[str], scope: str,
                   normalise: bool = True) -> None:
    """Prune whole group channels of the groups owned by `names` until `target` of their channels
    are pruned, by `score(group)` (a score per channel). scope "layer": each group alike;
    "global": one threshold over the groups, with `normalise` each group's scores divided by
    their mean (norms of layers of different fan-in are not comparable); never a group's last
    channel."""
    import torch

    chosen = [i for i, g in enumerate(masks.groups) if set(g.layers) & set(names)]
    scores = {}
    for i in chosen:
        s = score(masks.groups[i]).detach().float().cpu()
        kept = masks.channels_kept[i]
        s = s / s[kept].mean().clamp_min(1e-12) if scope == "global" and normalise else s
        s = s.masked_fill(~kept, float("-inf"))
        s[s.argmax()] = float("inf")  # a group keeps at least one channel
        scores[i] = s
    batches = [chosen] if scope == "global" else [[i] for i in chosen]
    for batch in batches:
        flat = torch.cat([scores[i] for i in batch])
        k = min(round(target * flat.numel()), flat.numel() - len(batch))
        if k <= 0:
            continue
        keep = torch.ones_like(flat, dtype=torch.bool)
        keep[torch.topk(flat, k, largest=False, sorted=False).indices] = False
        offset = 0
        for i in batch:
            masks.channels_kept[i] &= keep[offset:offset + masks.groups[i].channels]
            offset += masks.groups[i].channels
    masks.mask_channels()


def channel_scores(group, params: dict[str, torch.Tensor], p: int) -> torch.Tensor:
    """Score of each channel of `group` (a `structured.Group`): the L`p` norm of all its filters
    (output slices)."""
    import torch

    total = None
    for m in group.members:
        if not m.scored:
            continue
        w = params[m.param].detach().float()
        per = w.abs().flatten(1).sum(1) if p == 1 else w.pow(2).flatten(1).sum(1)
        part = torch.zeros(group.channels, device=w.device).index_add_(0, m.channel.to(w.device),
                                                                       per[m.index.to(w.device)])
        total = part if total is None else total + part
    return total if p == 1 else total.sqrt()


def taylor_scores(model, groups: list, batches) -> dict[int, torch.Tensor]:
    """Each group's (by `id`) channel importances: the mean over `batches` of (Σ g·w)², the sum
    running over every member parameter slice of the channel (`taylor_filter`)."""
    import torch
    import torch.nn.functional as F

    params = dict(model.named_parameters())
    names = sorted({m.param for g in groups for m in g.members})
    totals = {id(g): torch.zeros(g.channels) for g in groups}
    count = 0
    for x, y in batches():
        grads = dict(zip(names, torch.autograd.grad(F.cross_entropy(model(x), y), [params[n] for n in names])))
        for g in groups:
            total = torch.zeros(g.channels, dtype=torch.float64, device=x.device)
            for m in g.members:
                gw = (grads[m.param] * params[m.param]).detach().double()
                per = gw.transpose(0, m.dim).flatten(1).sum(1) if gw.dim() > 1 else gw
                total.index_add_(0, m.channel.to(x.device), per[m.index.to(x.device)])
            totals[id(g)] += total.pow(2).float().cpu()
        count += 1
    if count == 0:
        raise ValueError("taylor_filter: no calibration batch")
    return {k: v / count for k, v in totals.items()}
