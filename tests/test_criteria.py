"""Pruning at initialisation (snip, grasp, synflow), N:M sparsity (l1_nm) and the mask controls:
exact targets, the no-collapse property, N:M validity and the controls' densities."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from prunetune import registry, spec
from prunetune.errors import UserError
from prunetune.models import build_model, prunable_layers
from prunetune.pruning.criteria import at_init, base, magnitude
from prunetune.pruning.criteria import nm as nm_criterion
from prunetune.pruning.criteria.nm import nm_valid, nm_view
from prunetune.pruning.masks import Masks
from prunetune.spec import ModelSpec
from prunetune.trial import Trial, run_trial

from conftest import digits_raw

AT_INIT = ["snip", "grasp", "synflow"]


def _model(arch="simple_cnn", channels=1, size=8, classes=10, seed=0):
    torch.manual_seed(seed)
    model = build_model(ModelSpec(arch=arch), classes, channels, size)
    return model, prunable_layers(model, channels, size)


def _context(model, channels=1, size=8, classes=10, iters=10, n_m=(2, 4)):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, channels, size, size, generator=gen)
    y = torch.randint(0, classes, (64,), generator=gen)
    return base.Context(model, x[:1], lambda: iter([(x[:32], y[:32]), (x[32:], y[32:])]), iters, n_m)


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("name", AT_INIT)
def test_at_init_criteria_reach_the_target_exactly(name, scope):
    model, layers = _model()
    masks = Masks(model, layers)
    crit = registry.criterion(name)
    for target in (0.3, 0.8):  # a second prune on top of the first: masks only shrink
        before = {n: m.clone() for n, m in masks.masks.items()}
        masks.prune(target, crit, scope=scope, context=_context(model))
        names = layers if scope == "global" else None
        for group in ([layers] if names else [[n] for n in layers]):
            total = sum(masks.weights[n].numel() for n in group)
            assert masks.sparsity(group) == pytest.approx(target, abs=1 / total)
        assert all(not (masks.masks[n] & ~before[n]).any() for n in layers)
        assert all(bool((masks.weights[n][~masks.masks[n]] == 0).all()) for n in layers)


def test_snip_and_grasp_use_the_data_and_leave_the_model_as_it_was():
    model, layers = _model()
    model.eval()
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    a = Masks(model, layers)
    a.prune(0.5, at_init.snip, context=_context(model))
    assert not model.training and all(torch.equal(buffers[n], t) for n, t in model.named_buffers())
    assert all(p.grad is None for p in model.parameters())
    # the masks depend on the data: other labels, another mask
    fresh, _ = _model()
    b = Masks(fresh, layers)
    ctx = _context(fresh)
    x, y = next(ctx.batches())
    b.prune(0.5, at_init.snip, context=base.Context(fresh, x[:1], lambda: iter([(x, (y + 1) % 10)])))
    assert any(not torch.equal(a.masks[n], b.masks[n]) for n in layers)
    # grasp keeps other weights than snip on the same model and data
    model, _ = _model()
    s = Masks(model, layers)
    s.prune(0.5, at_init.snip, context=_context(model))
    model, _ = _model()
    g = Masks(model, layers)
    g.prune(0.5, at_init.grasp, context=_context(model))
    assert any(not torch.equal(s.masks[n], g.masks[n]) for n in layers)


def test_grasp_scores_are_minus_w_hg_negated():
    """On a linear model with a hand-checkable Hessian: score = w ⊙ Hg (the paper's −w ⊙ Hg,
    lowest first), with g and Hg of the loss at temperature 200."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3, bias=False))
    masks = Masks(model, ["1"])
    x, y = torch.randn(8, 1, 2, 2), torch.randint(0, 3, (8,))
    ctx = base.Context(model, x[:1], lambda: iter([(x, y)]))
    w = model[1].weight
    loss = lambda: nn.functional.cross_entropy(model(x) / 200.0, y)  # noqa: E731
    g = torch.autograd.grad(loss(), w)[0]
    hg = torch.autograd.grad((g * torch.autograd.grad(loss(), w, create_graph=True)[0]).sum(), w)[0]
    scores = at_init.grasp.scores(masks, ["1"], ctx)
    torch.testing.assert_close(scores["1"], w.detach() * hg)


def _kept(scores: dict[str, torch.Tensor], target: float) -> dict[str, torch.Tensor]:
    """By hand: keep all but the round(target · n) lowest scores over the layers together. The
    cut must fall between two different scores, so that the mask is the only right one."""
    flat = torch.cat([s.flatten().float() for s in scores.values()]).sort().values
    k = round(target * flat.numel())
    assert flat[k - 1] < flat[k], "a tie at the cut: the hand mask is not unique"
    return {n: s.float() >= flat[k] for n, s in scores.items()}


def _bn_model(mean: list[float] | None = None) -> nn.Sequential:
    """Linear → BatchNorm → activation → Linear, with running statistics unlike a batch's, so
    that training mode (batch statistics) and eval mode (running ones) compute differently."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
    with torch.no_grad():
        model[1].running_mean.copy_(torch.tensor(mean) if mean else torch.randn(8))
        model[1].running_var.uniform_(0.2, 3.0)
    return model


def _snip_by_hand(model: nn.Module, x, y, layers, target: float, train: bool):
    """|∂L/∂w ⊙ w| on (x, y) with the model (a copy) in training or eval mode, then the kept mask."""
    model = copy.deepcopy(model).train(train)
    modules = dict(model.named_modules())
    nn.functional.cross_entropy(model(x), y).backward()
    return _kept({n: (modules[n].weight.grad * modules[n].weight).abs().detach() for n in layers}, target)


def test_snip_scores_in_eval_mode_as_the_reference_code_does():
    """snip-public (`is_train: False`) and Synaptic-Flow score SNIP in eval mode: the kept mask is
    the one of eval-mode gradients, not of training-mode ones, and the model is left as it was."""
    model, layers = _bn_model(), ["0", "3"]
    x, y = torch.randn(32, 16, generator=torch.Generator().manual_seed(1)), torch.arange(32) % 3
    expected = _snip_by_hand(model, x, y, layers, 0.6, train=False)
    in_train_mode = _snip_by_hand(model, x, y, layers, 0.6, train=True)
    assert any(not torch.equal(expected[n], in_train_mode[n]) for n in layers)  # the test can tell
    model.train()
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    masks = Masks(model, layers)
    masks.prune(0.6, at_init.snip, context=base.Context(model, x[:1], lambda: iter([(x, y)])))
    assert all(torch.equal(masks.masks[n], expected[n]) for n in layers)
    assert all(m.training for m in model.modules()) and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(buffers[n], b) for n, b in model.named_buffers())


def test_snip_scores_on_the_calibration_samples():
    """DESIGN.md: snip scores on `schedule.calibration_samples` training images (Context.calibration),
    not on the other batches a context carries; a trial draws exactly that many, in batches of
    `train.batch_size`."""
    model, layers = _bn_model(), ["0", "3"]
    x, y = torch.randn(32, 16, generator=torch.Generator().manual_seed(1)), torch.arange(32) % 3
    other = torch.randn(32, 16, generator=torch.Generator().manual_seed(2))
    expected = _snip_by_hand(model, x, y, layers, 0.6, train=False)
    assert any(not torch.equal(expected[n], _snip_by_hand(model, other, y, layers, 0.6, train=False)[n])
               for n in layers)  # the test can tell
    masks = Masks(model, layers)
    masks.prune(0.6, at_init.snip, context=base.Context(model, x[:1], lambda: iter([(other, y)]),
                                                        calibration=lambda: iter([(x, y)])))
    assert all(torch.equal(masks.masks[n], expected[n]) for n in layers)
    trial = Trial(spec.validate(digits_raw(schedule__criterion="snip", schedule__calibration_samples=40,
                                           train__batch_size=16)))
    sizes = [len(x) for x, _ in trial.criteria_context().calibration()]
    assert sizes == [16, 16, 8]


def _synflow_by_hand(model: nn.Module, layers, target: float, abs_buffers: bool):
    """One synflow round: float64 copy in eval mode, |parameters| (and |float buffers|), R = Σ f(𝟙),
    scores |θ ⊙ ∂R/∂θ|, then the kept mask."""
    probe = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for t in [*probe.parameters(), *(probe.buffers() if abs_buffers else [])]:
            if t.is_floating_point():
                t.abs_()
    modules = dict(probe.named_modules())
    weights = [modules[n].weight for n in layers]
    grads = torch.autograd.grad(probe(torch.ones(1, 16, dtype=torch.float64)).sum(), weights)
    return _kept({n: (w * g).abs().detach() for n, w, g in zip(layers, weights, grads)}, target)


def test_synflow_takes_the_absolute_value_of_the_buffers_too():
    """Synaptic-Flow's `linearize` takes |·| of the whole state_dict, batch-norm running means
    included: with negative ones, the mask is the one of |running_mean|."""
    model, layers = _bn_model(mean=[-3.0, 2.0, -1.5, 0.5, -4.0, 1.0, -0.5, -2.5]), ["0", "3"]
    expected = _synflow_by_hand(model, layers, 0.5, abs_buffers=True)
    signed = _synflow_by_hand(model, layers, 0.5, abs_buffers=False)
    assert any(not torch.equal(expected[n], signed[n]) for n in layers)  # the test can tell
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    masks = Masks(model, layers)
    masks.prune(0.5, at_init.synflow, context=base.Context(model, torch.zeros(1, 16), synflow_iters=1))
    assert all(torch.equal(masks.masks[n], expected[n]) for n in layers)
    assert all(torch.equal(buffers[n], b) for n, b in model.named_buffers())  # only the probe's


def test_synflow_avoids_layer_collapse_where_magnitude_at_init_does_not():
    """vgg11 at 99.5%: global magnitude at initialisation empties a layer (the classifier, whose
    weights are small), so nothing reaches the output; synflow keeps every layer connected."""
    model, layers = _model("vgg11", channels=3, size=32, classes=10)
    by_magnitude = Masks(model, layers)
    by_magnitude.prune(0.995, magnitude.l1_unstructured)
    assert min(int(by_magnitude.masks[n].sum()) for n in layers) == 0
    model, layers = _model("vgg11", channels=3, size=32, classes=10)
    flow = Masks(model, layers)
    flow.prune(0.995, at_init.synflow, context=_context(model, 3, 32, iters=5))
    assert flow.sparsity() == pytest.approx(0.995, abs=1 / sum(w.numel() for w in flow.weights.values()))
    kept = {n: int(flow.masks[n].sum()) for n in layers}
    assert min(kept.values()) > 0, kept


def test_synflow_rounds_follow_the_exponential_schedule():
    assert at_init._round_target(0.0, 0.99, 1, 2) == pytest.approx(0.9)  # density 1 → 0.1 → 0.01
    assert at_init._round_target(0.0, 0.99, 2, 2) == 0.99
    assert at_init._round_target(0.5, 0.875, 1, 2) == pytest.approx(0.75)  # from density 0.5


@pytest.mark.parametrize("n_m", [(2, 4), (1, 4), (4, 8)])
def test_l1_nm_keeps_the_n_largest_of_every_m(n_m):
    n, m = n_m
    model, layers = _model()
    fits = [name for name in layers if dict(model.named_modules())[name].weight.shape[1] % m == 0]
    assert fits and len(fits) < len(layers)  # simple_cnn's first conv has 1 input channel
    masks = Masks(model, layers, selected=fits)
    original = {name: masks.weights[name].detach().clone() for name in fits}
    masks.prune(1 - n / m, nm_criterion.l1_nm, fits, context=_context(model, n_m=n_m))
    assert masks.sparsity() == pytest.approx(1 - n / m)
    for name in fits:
        assert nm_valid(masks.weights[name], n, m)
        kept = nm_view(masks.masks[name], m)
        assert bool((kept.sum(-1) == n).all())
        # the survivors of each group are its n largest magnitudes
        groups = nm_view(original[name].abs(), m)
        smallest_kept = groups.masked_fill(~kept, float("inf")).min(-1).values
        largest_pruned = groups.masked_fill(kept, float("-inf")).max(-1).values
        assert bool((smallest_kept >= largest_pruned).all())


def test_nm_groups_run_along_input_channels_of_a_conv():
    w = torch.zeros(2, 8, 3, 3)
    w[:, :2] = 1.0  # two non-zero input channels of every 4, at every kernel position
    assert nm_valid(w, 2, 4)
    w[0, 2, 1, 1] = 1.0  # a third in one group
    assert not nm_valid(w, 2, 4)


def test_shuffle_keeps_each_layers_density_and_moves_the_mask():
    model, layers = _model()
    masks = Masks(model, layers)
    masks.prune(0.7, magnitude.l1_unstructured)
    before = {n: m.clone() for n, m in masks.masks.items()}
    masks.shuffle(layers, torch.Generator().manual_seed(3))
    for n in layers:
        assert int(masks.masks[n].sum()) == int(before[n].sum())
        assert not torch.equal(masks.masks[n], before[n])
        assert bool((masks.weights[n][~masks.masks[n]] == 0).all())


def test_trials_prune_at_init_and_log_nm_valid(tmp_path):
    """snip at dense_epochs 0 prunes before any training; l1_nm reports nm_valid and a shuffled
    control keeps the per-layer densities of the mask it shuffles."""
    snip = run_trial(spec.validate(digits_raw(train__dense_epochs=0, schedule__criterion="snip",
                                              schedule__sparsity=0.8)), tmp_path / "snip").metrics
    assert snip["sparsity"] == pytest.approx(0.8, abs=1e-3) and snip["test_acc"] > 0.2
    nm = run_trial(spec.validate(digits_raw(schedule__criterion="l1_nm", schedule__sparsity=0.5)),
                   tmp_path / "nm").metrics
    assert nm["nm_valid"] == 1.0 and nm["sparsity"] == pytest.approx(0.5)
    assert nm["model_sparsity"] < 0.5  # the first conv (1 input channel) stays dense

    plain = Trial(spec.validate(digits_raw(schedule__sparsity=0.8)))
    shuffled = Trial(spec.validate(digits_raw(schedule__sparsity=0.8, schedule__mask_control="shuffle",
                                              schedule__retrain="reinit")))
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    plain.prune(0.8, plain.selected, "global", gen())
    shuffled.prune(0.8, shuffled.selected, "global", gen(), shuffle=True)
    for n in plain.selected:
        assert int(plain.masks.masks[n].sum()) == int(shuffled.masks.masks[n].sum())
    assert any(not torch.equal(plain.masks.masks[n], shuffled.masks.masks[n]) for n in plain.selected)


def test_spec_refuses_what_the_new_keys_cannot_do():
    with pytest.raises(UserError, match="1 − N/M"):
        spec.validate(digits_raw(schedule__criterion="l1_nm", schedule__sparsity=0.7))
    assert spec.validate(digits_raw(schedule__criterion="l1_nm", schedule__n_m=[1, 4],
                                    schedule__sparsity=0.75)).schedule.n_m == [1, 4]
    with pytest.raises(UserError, match="schedule.n_m"):
        spec.validate(digits_raw(schedule__criterion="l1_nm", schedule__n_m=[4, 4]))
    with pytest.raises(UserError, match="mask_control"):
        spec.validate(digits_raw(schedule__criterion="l1_filter", schedule__mask_control="shuffle"))
    with pytest.raises(UserError, match="synflow_iters"):
        spec.validate(digits_raw(schedule__criterion="synflow", schedule__synflow_iters=0))
    assert registry.structured_criteria() == ["l1_filter", "l2_filter", "taylor_filter"]


def test_a_2_4_export_torch_cannot_run_is_a_warning_not_a_failed_trial(monkeypatch, caplog):
    """Where torch has no semi-structured kernel for a layer (here: its real error for a CPU
    tensor, standing in for a GPU or build without one), the trial keeps its other metrics: no
    latency is reported and a warning says why."""
    from prunetune.pruning import semistructured

    monkeypatch.setattr(semistructured, "available", lambda device: True)
    model = nn.Sequential(nn.Flatten(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    with torch.no_grad():
        model[1].weight[:, 1::2] = 0  # 2:4 in every group of four inputs
    with caplog.at_level("WARNING", logger="prunetune.pruning.semistructured"):
        assert semistructured.semi_structured_speedup(model, torch.randn(1, 128), ["1"]) == {}
    assert "2:4 export: 1 not converted" in caplog.text and "Only CUDA tensors" in caplog.text


def test_grasp_scores_on_its_authors_class_balanced_sample():
    """alecwangcq/GraSP's `GraSP_fetch_data`: samples_per_class (25) training images of each class,
    ordered by class, scored in two halves; the other criteria keep their seeded sample."""
    trial = Trial(spec.validate(digits_raw(schedule__criterion="grasp")))
    context = trial.criteria_context()
    halves = [y for _, y in context.balanced()]
    assert [len(y) for y in halves] == [125, 125]
    labels = torch.cat(halves)
    assert labels.tolist() == sorted(labels.tolist())  # in class order, as theirs
    assert torch.bincount(labels).tolist() == [25] * 10
    fewer = Trial(spec.validate(digits_raw(schedule__criterion="grasp", schedule__samples_per_class=3)))
    assert sum(len(y) for _, y in fewer.criteria_context().balanced()) == 30
    assert sum(len(y) for _, y in context.batches()) == 100  # max(batch_size 64, 10 × classes)
    # grasp scores on the balanced sample, not on the other batches
    model, layers = _model()
    def unused():
        raise AssertionError("grasp scored on the other criteria's batches")

    ctx = base.Context(model, torch.zeros(1, 1, 8, 8), unused, balanced=_context(model).batches)
    masks = Masks(model, layers)
    masks.prune(0.5, at_init.grasp, context=ctx)
    assert masks.sparsity() == pytest.approx(0.5, abs=1e-3)
