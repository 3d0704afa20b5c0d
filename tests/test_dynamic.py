"""Sparse training from scratch (schedule.method rigl, set, static): the mask update's arithmetic
against google-research/rigl's `SparseRigLOptimizer._get_update_op`, on fixed numbers; trials
that keep the exact count at every step, report what moved, and resume."""

import json
import math

import pytest
import torch
from torch import nn

from prunetune import spec
from prunetune.cache import DenseCache
from prunetune.errors import UserError
from prunetune.pruning import dynamic
from prunetune.pruning.masks import Masks
from prunetune.trial import Trial, run_trial

from conftest import digits_raw
from test_cli import prunetune, write


def test_the_drop_fraction_decays_by_a_cosine_to_zero_at_update_until():
    # the reference: tf.train.cosine_decay(0.3, t, T_end); 0.15 · (1 + cos(π/4)) = 0.256066
    got = [dynamic.drop_fraction_at(0.3, t, 100) for t in (0, 25, 50, 75, 100, 150)]
    assert got == pytest.approx([0.3, 0.2560660, 0.15, 0.0439340, 0.0, 0.0], abs=1e-7)


def test_one_layer_drops_the_smallest_and_grows_the_largest_gradients_as_the_reference():
    weight = torch.tensor([[0.5, -0.1, 0.0, 0.9],
                           [0.05, 0.15, -0.7, 0.0],
                           [0.2, 0.0, 0.0, -0.3]])
    mask = weight != 0  # 8 active
    grad = torch.tensor([[9.0, 5.0, 0.3, 0.0],
                         [0.0, 0.0, 0.0, 0.1],
                         [0.0, 4.0, 0.2, 0.0]])
    new, grown = dynamic.update_layer(mask, weight, grad, 0.3)
    # floor(8 · 0.3) = 2 dropped: the smallest magnitudes, 0.05 at (1,0) and 0.1 at (0,1). Grown:
    # the 2 largest |grad| where the drop kept nothing, (0,1) (5.0: just dropped; the reference
    # ranks it too) and (2,1) (4.0); (0,0)'s 9.0 is kept anyway, so it does not count
    expected = mask.clone()
    expected[1, 0], expected[2, 1] = False, True
    assert torch.equal(new, expected)
    assert grown.nonzero().tolist() == [[2, 1]]  # (0,1) was active: it keeps its value (reinit_when_same=False)
    assert int(new.sum()) == int(mask.sum())


def test_drop_counts_floor_as_the_reference():
    weight = torch.arange(1.0, 11.0)  # 10 active
    for fraction, dropped in ((0.29, 2), (0.3, 3), (0.05, 0), (0.999, 9)):
        new, _ = dynamic.update_layer(weight != 0, weight, torch.zeros(10), fraction)
        assert torch.equal(new[dropped:], torch.ones(10 - dropped, dtype=torch.bool)), fraction
        assert int(new.sum()) == 10


def _layer(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5))
    masks = Masks(model, ["0"])
    masks.masks["0"].view(-1)[torch.randperm(30)[:20]] = False  # 10 of 30 active
    masks.apply()
    return model, masks


@pytest.mark.parametrize("rule", ["gradient", "random"])
def test_an_update_keeps_each_count_zeroes_grown_weights_and_their_momentum(rule):
    model, masks = _layer()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    regrowth = dynamic.Regrowth(masks, ["0"], rule, update_every=1, drop_fraction=0.5, start_step=0,
                                end_step=10, seed=3)
    x, y = torch.randn(8, 6), torch.randn(8, 5)
    total = 0
    for step in (1, 2):
        before = masks.masks["0"].clone()
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        assert regrowth.due(step)
        regrowth.capture()
        masks.mask_grads()
        opt.step()
        masks.apply()
        momentum = opt.state[model[0].weight]["momentum_buffer"]
        momentum.fill_(1.0)  # so a reset shows
        grown = regrowth.update(step, opt)
        after = masks.masks["0"]
        fresh = after & ~before
        # floor(10 · 0.5 · ½(1 + cos(π·step/10))) dropped, as many grown (some may be the dropped)
        dropped = int(10 * dynamic.drop_fraction_at(0.5, step, 10))
        assert int(after.sum()) == 10 and int((before & ~after).sum()) == int(fresh.sum()) <= dropped
        assert grown == int(fresh.sum())
        total += grown
        assert torch.all(model[0].weight[fresh] == 0)
        assert torch.all(momentum[fresh] == 0) and torch.all(momentum[~fresh] == 1)
        assert torch.all(model[0].weight[~after] == 0)
    assert regrowth.updates == 2 and regrowth.epoch_metrics() == {"regrown": total}
    assert regrowth.epoch_metrics() == {"regrown": 0}  # counted afresh each epoch


def test_rigl_grows_where_the_dense_gradient_is_largest():
    model, masks = _layer()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the step leaves the weights as they are
    regrowth = dynamic.Regrowth(masks, ["0"], "gradient", 1, 0.5, 0, 10, seed=0)
    nn.functional.mse_loss(model(torch.randn(8, 6)), torch.randn(8, 5)).backward()
    dense = model[0].weight.grad.abs().clone()  # before the masks zero it
    before = masks.masks["0"].clone()
    regrowth.capture()
    masks.mask_grads()
    opt.step()
    regrowth.update(1, opt)
    after = masks.masks["0"]
    n = int((before & ~after).sum())
    candidates = dense.masked_fill(after & before, -1)  # what the drop did not keep
    expected = set(torch.topk(candidates.flatten(), n).indices.tolist())
    assert set((after & ~before).flatten().nonzero().flatten().tolist()) <= expected


def test_set_grows_at_random_and_is_a_function_of_its_seed():
    masks_of = []
    for seed in (1, 1, 2):
        model, masks = _layer()
        regrowth = dynamic.Regrowth(masks, ["0"], "random", 1, 0.5, 0, 10, seed=seed)
        regrowth.update(1, None)
        masks_of.append(masks.masks["0"].clone())
    assert torch.equal(masks_of[0], masks_of[1]) and not torch.equal(masks_of[0], masks_of[2])


def test_updates_follow_every_update_every_steps_until_update_until():
    model, masks = _layer()
    regrowth = dynamic.Regrowth(masks, ["0"], "random", update_every=100, drop_fraction=0.3, start_step=40,
                                end_step=750, seed=0)
    due = [step for step in range(0, 1000) if regrowth.due(step)]
    assert due == [140, 240, 340, 440, 540, 640, 740]  # t = 100 … 700 < 750


def _dst(method, **overrides):
    raw = digits_raw(**{"schedule__method": method, "schedule__sparsity": 0.9, "schedule__update_every": 4,
                        "train__finetune_epochs": 3, **overrides})
    del raw["train"]["dense_epochs"]  # sparse from scratch: 0 unless set
    return spec.validate(raw)


def test_a_rigl_trial_holds_each_layers_count_at_every_update_and_reports_what_moved(tmp_path):
    s = _dst("rigl", train__finetune_epochs=4)
    assert s.train.dense_epochs == 0 and s.schedule.scope == "erk"
    rows = []
    trial = Trial(s, lambda metrics, epoch: rows.append(metrics))
    counts = []
    update = dynamic.Regrowth.update

    def checked(self, step, optimizer):
        grown = update(self, step, optimizer)
        counts.append({n: int(m.sum()) for n, m in self.masks.masks.items()})
        assert all(torch.all(w[~self.masks.masks[n]] == 0) for n, w in self.masks.weights.items())
        return grown

    dynamic.Regrowth.update = checked
    try:
        result = trial.run(tmp_path)
    finally:
        dynamic.Regrowth.update = update
    shapes = {n: tuple(trial.masks.weights[n].shape) for n in trial.selected}
    kept = {n: math.prod(shape) - c for n, (shape, c) in
            zip(shapes, zip(shapes.values(), trial.masks.allocation.counts(0.9, shapes).values()))}
    steps = 4 * trial.trainer.steps_per_epoch
    expected_updates = len(range(4, math.floor(0.75 * steps), 4))
    assert len(counts) == expected_updates == result.metrics["mask_updates"] > 0
    assert all(c == kept for c in counts)  # ERK's count per layer, exactly, after every update
    assert sum(r["regrown"] for r in rows) > 0 and rows[-1]["regrown"] == 0  # none after update_until
    assert steps - math.floor(0.75 * steps) >= trial.trainer.steps_per_epoch  # (the last epoch is past it)
    assert json.loads((tmp_path / "regrowth.json").read_text()) == {"mask_updates": expected_updates}
    saved = torch.load(tmp_path / "checkpoint" / "masks.pt", weights_only=True)
    assert all(torch.equal(saved[n], trial.masks.masks[n]) for n in trial.selected)


def test_rigl_with_no_update_due_is_the_static_baseline(tmp_path):
    """The same random ERK mask to start (seeded by the trial's seed), and nothing else differs."""
    static = run_trial(_dst("static"), tmp_path / "static")
    frozen = run_trial(_dst("rigl", schedule__update_every=10_000), tmp_path / "rigl")
    assert frozen.metrics["mask_updates"] == 0
    assert frozen.metrics["test_acc"] == static.metrics["test_acc"]
    assert frozen.metrics["test_loss"] == pytest.approx(static.metrics["test_loss"], rel=1e-6)


@pytest.mark.parametrize("method", ["rigl", "set"])
def test_a_resumed_trial_goes_on_with_its_mask_and_its_update_count(tmp_path, method):
    s = _dst(method)
    cache = DenseCache(tmp_path / "cache")
    full = run_trial(s, tmp_path / "full", cache=cache)
    first = Trial(s)

    def report(metrics, epoch):
        if first.can_checkpoint and epoch == 1:
            first.save_checkpoint(tmp_path / "ckpt.pt")
            raise KeyboardInterrupt  # the worker dies here
    first.report = report
    with pytest.raises(KeyboardInterrupt):
        first.run(tmp_path / "first", cache)
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["regrowth"]["updates"] > 0
    result = Trial(s).run(tmp_path / "resumed", cache, resume_from=tmp_path / "ckpt.pt")
    assert result.metrics["mask_updates"] == full.metrics["mask_updates"]
    for key in ("test_acc", "test_loss", "sparsity", "nonzero_params"):
        assert result.metrics[key] == pytest.approx(full.metrics[key], rel=1e-5), key
    assert [h["regrown"] for h in result.history] == [h["regrown"] for h in full.history]


def test_equal_budgets_give_sparse_training_the_whole_budget():
    s = _dst("set", train__budget_epochs=5)
    trial = Trial(s)
    assert [(p.name, p.epochs) for p in trial.phases] == [("sparse", 5)]
    assert trial.planned_epochs == 5


@pytest.mark.parametrize("schedule,needle", [
    ({"method": "rigl", "update_every": 0}, "schedule.update_every"),
    ({"method": "set", "drop_fraction": 1.0}, "schedule.drop_fraction"),
    ({"method": "set", "drop_fraction": 0}, "schedule.drop_fraction"),
    ({"method": "rigl", "update_until": 0}, "schedule.update_until"),
    ({"method": "rigl", "update_until": 1.5}, "schedule.update_until"),
    ({"method": "rigl", "criterion": "l1_filter"}, "schedule.criterion"),
    ({"method": "set", "criterion": "taylor_filter"}, "schedule.criterion"),
    ({"method": "rigl", "n_m": [2, 4]}, "schedule.n_m"),
])
def test_bad_values_are_refused_naming_the_key(schedule, needle):
    with pytest.raises(UserError, match=needle.replace(".", r"\.")):
        spec.validate({"name": "a", "schedule": schedule})


def test_bad_input_exits_2_with_one_line(tmp_path):
    p = write(tmp_path, "name: a\nschedule: {method: rigl, criterion: l1_filter}\n")
    r = prunetune(["trial", str(p)], cwd=tmp_path)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1 and "schedule.criterion" in lines[0] and "rigl" in lines[0]
    assert not (tmp_path / "mlruns").exists()
