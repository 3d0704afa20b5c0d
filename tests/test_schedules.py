"""Schedule arithmetic, by property, without torch."""

import itertools
import sys
from types import SimpleNamespace

import pytest

from prunetune.pruning import schedules
from prunetune.pruning.schedules import plan, select_layers, step_targets

SPARSITIES = [0.0, 0.05, 0.3, 0.5, 0.8, 0.9, 0.95, 0.99]
STEPS = [0.05, 0.1, 0.2, 0.3, 0.35, 0.5, 0.9]


@pytest.mark.parametrize("sparsity,step", list(itertools.product(SPARSITIES, STEPS)))
def test_step_targets_monotone_exact_end_clipped(sparsity, step):
    targets = step_targets(sparsity, step)
    if sparsity == 0:
        assert targets == []
        return
    assert targets[-1] == sparsity  # exact endpoint
    assert all(b > a for a, b in zip(targets, targets[1:]))  # strictly increasing
    for k, t in enumerate(targets[:-1], start=1):
        assert t == pytest.approx(k * step)  # full steps before the last
    assert 0 < targets[-1] - (targets[-2] if len(targets) > 1 else 0) <= step + 1e-9  # clipped last step


def _spec(method, **kw):
    s = dict(method=method, sparsity=0.8, step_size=0.3, step_epochs=1.5, rewind_epoch=1, scope="global",
             start_epoch=1.0, end_epoch=7.0, redense_lr_factor=0.1, cycles=3, step_rule="fixed", retrain="finetune",
             mask_control="none")
    s.update(kw)
    return SimpleNamespace(**s), SimpleNamespace(finetune_epochs=2, dense_epochs=4)


LAYERS = ["conv1", "conv2", "fc1", "fc2"]


def test_oneshot_plan():
    phases = plan(*_spec("oneshot"), LAYERS)
    assert [(p.prune.target, p.epochs) for p in phases] == [(0.8, 2)]


def test_iterative_plan_steps_then_finetune_with_one_lr_schedule():
    phases = plan(*_spec("iterative"), LAYERS)
    assert [p.prune.target for p in phases if p.prune] == [0.3, 0.6, 0.8]  # last step clipped
    assert [p.epochs for p in phases] == [1.5, 1.5, 1.5, 2]
    assert phases[-1].prune is None
    assert [p.lr_offset for p in phases] == [0, 1.5, 3.0, 4.5]
    assert all(p.lr_horizon == 6.5 for p in phases)


def test_layerwise_plan_each_layer_in_order_then_finetune():
    phases = plan(*_spec("layerwise"), LAYERS)
    assert [p.prune.layers for p in phases[:-1]] == [(n,) for n in LAYERS]
    assert all(p.prune.target == 0.8 and p.prune.scope == "layer" for p in phases[:-1])
    assert phases[-1].prune is None and phases[-1].epochs == 2


def test_lottery_plan_rewinds_and_replays_dense_schedule():
    phases = plan(*_spec("lottery"), LAYERS)
    assert [p.prune.target for p in phases] == [0.3, 0.6, 0.8]
    assert all(p.rewind and p.epochs == 3 and p.lr_offset == 1 and p.lr_horizon == 4 for p in phases)


def sparsity_trajectory(phases):
    """(epoch at which each phase starts, sparsity target in force during it); release → 0."""
    out, t, current = [], 0.0, 0.0
    for p in phases:
        if p.prune:
            current = p.prune.target
        if p.release_masks:
            current = 0.0
        out.append((t, current))
        t += p.epochs
    return out, t


@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.95])
@pytest.mark.parametrize("start,end,step", [(0, 4, 1), (1, 7, 1.5), (2, 3, 0.25), (0, 1, 2)])
def test_gradual_follows_the_cubic_ramp(sparsity, start, end, step):
    s, train = _spec("gradual", sparsity=sparsity, start_epoch=start, end_epoch=end, step_epochs=step)
    phases = plan(s, train, LAYERS)
    trajectory, total = sparsity_trajectory(phases)
    steps = max(1, round((end - start) / step))
    assert trajectory[0] == (0.0, 0.0) and phases[0].epochs == pytest.approx(start + (end - start) / steps)
    assert total == pytest.approx(end + train.finetune_epochs)
    ramp = trajectory[1:]
    assert len(ramp) == steps and ramp[-1][1] == sparsity and ramp[-1][0] == pytest.approx(end)
    for t, target in ramp:  # Zhu & Gupta: s_t = s_f (1 − (1 − (t − t0)/(t_end − t0))³)
        assert target == pytest.approx(sparsity * (1 - (1 - (t - start) / (end - start)) ** 3))
    increments = [b[1] - a[1] for a, b in zip([(0, 0.0)] + ramp, ramp)]
    assert all(x >= y - 1e-12 for x, y in zip(increments, increments[1:]))  # fast first, then slower


def test_dsd_prunes_trains_sparse_then_ends_dense_at_lower_lr():
    phases = plan(*_spec("dsd"), LAYERS)
    assert [(p.name, p.epochs) for p in phases] == [("sparse1", 1.5), ("redense1", 2)]
    assert phases[0].prune.target == 0.8 and not phases[0].release_masks
    assert phases[1].release_masks and phases[1].prune is None and phases[1].lr_factor == 0.1
    assert sparsity_trajectory(phases)[0][-1][1] == 0.0  # ends dense


def test_ist_repeats_the_dsd_cycle():
    phases = plan(*_spec("ist"), LAYERS)
    assert [p.name for p in phases] == ["sparse1", "redense1", "sparse2", "redense2", "sparse3", "redense3"]
    assert [t for _, t in sparsity_trajectory(phases)[0]] == [0.8, 0.0] * 3
    assert phases[-1].lr_horizon == pytest.approx(3 * 3.5)  # one lr schedule over all cycles


def test_every_method_ends_at_target_sparsity():
    for method in schedules.METHODS:
        phases = plan(*_spec(method), LAYERS)
        assert max(p.prune.target for p in phases if p.prune) == 0.8, method


@pytest.mark.parametrize("sparsity,step", list(itertools.product(SPARSITIES, STEPS)))
def test_geometric_step_targets_prune_a_fraction_of_the_survivors(sparsity, step):
    targets = step_targets(sparsity, step, "geometric")
    if sparsity == 0:
        assert targets == []
        return
    assert targets[-1] == sparsity and all(b > a for a, b in zip(targets, targets[1:]))
    for k, t in enumerate(targets[:-1], start=1):  # 1 − (1 − p)^k: step of the survivors each round
        assert 1 - t == pytest.approx((1 - step) ** k)
    before = targets[-2] if len(targets) > 1 else 0.0
    assert 0 < (targets[-1] - before) / (1 - before) <= step + 1e-9  # the last round clipped, never more


def test_geometric_rounds_against_fixed():
    assert step_targets(0.8, 0.2, "fixed") == [0.2, 0.4, 0.6, 0.8]
    assert step_targets(0.8, 0.2, "geometric") == pytest.approx(
        [0.2, 0.36, 0.488, 0.5904, 0.67232, 0.737856, 0.7902848, 0.8])


@pytest.mark.parametrize("method", ["oneshot", "iterative"])
@pytest.mark.parametrize("retrain", ["lr_rewind", "weight_rewind", "reinit"])
def test_retraining_replays_the_dense_lr_schedule_from_rewind_epoch(method, retrain):
    """Renda et al.: each prune is followed by dense_epochs − rewind_epoch epochs on the dense
    phase's schedule from rewind_epoch; the weights are kept, rewound or re-drawn; a fresh optimiser."""
    phases = plan(*_spec(method, retrain=retrain, step_rule="geometric"), LAYERS)
    targets = [0.8] if method == "oneshot" else step_targets(0.8, 0.3, "geometric")
    assert [p.prune.target for p in phases] == targets  # no finetune phase after the rounds
    for p in phases:
        assert p.epochs == 3 and p.lr_offset == 1 and p.lr_horizon == 4 and p.restart
    *search, last = phases
    assert (last.rewind, last.reinit, last.mask_search) == (retrain == "weight_rewind", retrain == "reinit", False)
    # the reinit control trains the ticket's mask: the rounds before its last are the ticket's
    # (weight rewinding), run only to find that mask
    assert all((p.rewind, p.reinit, p.mask_search, p.ticket) == (True, False, True, True) if retrain == "reinit"
               else (p.rewind, p.reinit, p.mask_search) == (retrain == "weight_rewind", False, False) for p in search)
    assert last.ticket == (retrain == "weight_rewind")


def test_lottery_is_iterative_with_weight_rewinding():
    for rule in ("fixed", "geometric"):
        assert plan(*_spec("lottery", step_rule=rule), LAYERS) == \
            plan(*_spec("iterative", step_rule=rule, retrain="weight_rewind"), LAYERS)


def test_conditional_keys():
    assert schedules.key_is_used("lottery", "rewind_epoch")
    assert not schedules.key_is_used("iterative", "rewind_epoch")
    assert schedules.key_is_used("iterative", "rewind_epoch", "lr_rewind")  # retraining replays from it
    assert not schedules.key_is_used("iterative", "step_epochs", "reinit")  # ... instead of step_epochs
    assert schedules.key_is_used("oneshot", "retrain") and not schedules.key_is_used("lottery", "retrain")
    assert schedules.key_is_used("lottery", "step_rule") and not schedules.key_is_used("oneshot", "step_rule")
    assert schedules.key_is_used("oneshot", "sparsity")
    assert not schedules.key_is_used("oneshot", "step_size")
    assert schedules.key_is_used("gradual", "end_epoch") and not schedules.key_is_used("dsd", "end_epoch")
    assert schedules.key_is_used("ist", "cycles") and not schedules.key_is_used("dsd", "cycles")


def test_select_layers():
    names = ["features.0", "features.3", "classifier.1", "classifier.3"]
    assert select_layers(names, "all") == names
    assert select_layers(names, "first:2") == names[:2]
    assert select_layers(names, "last:1") == ["classifier.3"]
    assert select_layers(names, ["features.*"]) == names[:2]
    assert select_layers(names, ["*.3"]) == ["features.3", "classifier.3"]
    with pytest.raises(ValueError):
        select_layers(names, "first:0")


def test_schedules_import_no_torch():
    # schedules are pure: importing them must not pull in torch (checked in a fresh interpreter)
    import subprocess
    code = "import prunetune.pruning.schedules, prunetune.spec, sys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# -- equal budgets (train.budget_epochs) ---------------------------------------------------------

def _budget_variants():
    """Every registered method, with each retraining policy it reads and both mask controls
    (a control's mask-search rounds are not its training): (method, retrain, mask_control)."""
    from typing import get_args

    from prunetune.spec import ScheduleSpec

    retrains = get_args(ScheduleSpec.model_fields["retrain"].annotation)
    return [(m, r, c) for m in schedules.METHODS
            for r in (retrains if schedules.key_is_used(m, "retrain") else ["finetune"])
            for c in ("none", "shuffle")]


def _budget_spec(method, retrain, control, budget, **train):
    """Real spec sections (no torch): every key a method may read, new ones included."""
    from prunetune.spec import ScheduleSpec, TrainSpec

    s = ScheduleSpec(method=method, retrain=retrain, mask_control=control, sparsity=0.8, step_size=0.3,
                     step_epochs=1.5, rewind_epoch=1.0, start_epoch=1.0, end_epoch=7.0, cycles=3)
    return s, TrainSpec(**{"dense_epochs": 4, "finetune_epochs": 2.0, "budget_epochs": budget, **train})


# own epochs here are at most 9 (lottery: 3 rounds × (4 − 1)); 9 is a budget with nothing left over
@pytest.mark.parametrize("budget", [9, 12.5, 30, 101.3])
@pytest.mark.parametrize("method,retrain,control", _budget_variants())
def test_every_method_trains_exactly_the_budget_after_the_dense_phase(method, retrain, control, budget):
    s, train = _budget_spec(method, retrain, control, budget)
    phases = plan(s, train, LAYERS)
    # a control's budget counts its ticket's mask-search rounds (see the control test below)
    assert sum(p.epochs for p in phases) == pytest.approx(budget, abs=1e-9)
    assert all(p.epochs >= 0 for p in phases)
    # the budget changes how long, never what is pruned
    free = plan(s, train.model_copy(update={"budget_epochs": None}), LAYERS)
    assert [p.prune for p in phases if p.prune] == [p.prune for p in free if p.prune]


@pytest.mark.parametrize("method,retrain,control", _budget_variants())
def test_a_budget_below_the_methods_own_steps_is_refused(method, retrain, control):
    s, train = _budget_spec(method, retrain, control, None)
    own = sum(p.epochs for p in plan(s, train.model_copy(update={"finetune_epochs": 0.0}), LAYERS))
    if own == 0:  # oneshot with finetune prunes and fine-tunes: no step of its own
        return
    fits = plan(s, train.model_copy(update={"budget_epochs": own}), LAYERS)
    assert sum(p.epochs for p in fits) == pytest.approx(own)
    with pytest.raises(schedules.BudgetError, match=r"^train\.budget_epochs \(.*\) is less than the .* epochs"):
        plan(s, train.model_copy(update={"budget_epochs": own - 0.25}), LAYERS)


def test_without_a_budget_finetune_epochs_is_as_given():
    for method, retrain, control in _budget_variants():
        s, train = _budget_spec(method, retrain, control, None)
        ns = SimpleNamespace(**{k: getattr(train, k) for k in ("dense_epochs", "finetune_epochs")})
        assert plan(s, train, LAYERS) == plan(s, ns, LAYERS), (method, retrain, control)


def test_the_remainder_goes_where_finetune_epochs_would():
    s, train = _budget_spec("ist", "finetune", "none", 20)  # 3 cycles of 1.5 sparse epochs
    phases = plan(s, train, LAYERS)
    assert [p.epochs for p in phases if p.release_masks] == pytest.approx([(20 - 4.5) / 3] * 3)
    assert phases[-1].lr_horizon == pytest.approx(20)  # one lr schedule over the budget
    s, train = _budget_spec("layerwise", "finetune", "none", 20)
    assert [p.epochs for p in plan(s, train, LAYERS)] == [1.5] * 4 + [14]
    s, train = _budget_spec("dsd", "finetune", "none", 20)
    assert [(p.name, p.epochs) for p in plan(s, train, LAYERS)] == [("sparse1", 1.5), ("redense1", 18.5)]


@pytest.mark.parametrize("method,retrain", [("lottery", "finetune"), ("iterative", "lr_rewind"),
                                            ("oneshot", "reinit"), ("iterative", "weight_rewind")])
def test_rewinding_retraining_gets_the_remainder_as_a_final_finetune(method, retrain):
    s, train = _budget_spec(method, retrain, "none", 20)
    phases = plan(s, train, LAYERS)
    rounds, last = phases[:-1], phases[-1]
    assert rounds == plan(s, train.model_copy(update={"budget_epochs": None}), LAYERS)  # unchanged
    assert last.name == "finetune" and last.prune is None and last.restart  # a fresh optimiser
    assert (last.epochs, last.lr_offset, last.lr_horizon) == (20 - schedules.trained_epochs(rounds), 0, last.epochs)


def test_stand_in_layers_count_what_the_spec_knows():
    assert len(schedules.stand_in_layers("first:5")) == len(schedules.stand_in_layers("last:5")) == 5
    assert len(schedules.stand_in_layers("all")) == len(schedules.stand_in_layers(["features.*"])) == 1


def _final_mask_epochs(phases) -> float:
    """How long a plan trains the mask it ends with: from its last prune to its end."""
    last = max(i for i, p in enumerate(phases) if p.prune is not None)
    return sum(p.epochs for p in phases[last:])


@pytest.mark.parametrize("budget", [None, 12, 15, 40])
def test_the_controls_train_their_final_mask_exactly_as_long_as_the_ticket(budget):
    """A 4-round lottery (dense 3, rewind 0): the ticket trains its final mask for its last round
    plus the budget's remainder (15: 3 + 3); the reinit and shuffle controls train the ticket's
    mask exactly as long (they trained it for 3 + 12 before)."""
    from prunetune.spec import ScheduleSpec, TrainSpec

    train = TrainSpec(dense_epochs=3, finetune_epochs=2.0, budget_epochs=budget)
    ticket = ScheduleSpec(method="iterative", retrain="weight_rewind", sparsity=0.8, step_size=0.2, rewind_epoch=0)
    reinit = ticket.model_copy(update={"retrain": "reinit"})
    shuffle = ticket.model_copy(update={"mask_control": "shuffle"})
    lottery = ScheduleSpec(method="lottery", sparsity=0.8, step_size=0.2, rewind_epoch=0)
    plans = {name: plan(s, train, LAYERS) for name, s in
             [("ticket", ticket), ("reinit", reinit), ("shuffle", shuffle), ("lottery", lottery)]}
    assert [p.prune.target for p in plans["ticket"] if p.prune] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    expected = 3 + (budget - 12 if budget else 0)
    assert {name: _final_mask_epochs(p) for name, p in plans.items()} == pytest.approx(
        dict.fromkeys(plans, expected))
    # the controls search the ticket's mask with the ticket's own rounds, not counted as their training
    assert [p.mask_search for p in plans["reinit"] if p.prune] == [True, True, True, False]


def test_finetune_final_lr_under_a_budget_stays_at_the_final_rate():
    """Renda et al.'s fine-tuning baseline: its remainder trains on at the dense schedule's final
    rate (it restarted at the peak rate before)."""
    s, train = _budget_spec("iterative", "finetune_final_lr", "none", 20)
    phases = plan(s, train, LAYERS)
    assert all(p.final_lr for p in phases)
    assert phases[-1].name == "finetune" and not phases[-1].restart
    assert sum(p.epochs for p in phases) == pytest.approx(20)


def test_a_round_that_would_remove_less_than_one_weight_merges_with_the_round_before():
    raw = schedules.step_targets(0.87, 0.01, "geometric")
    assert len(raw) == 204 and raw[-2] == pytest.approx(0.869999655, abs=1e-9) and raw[-1] == 0.87
    merged = schedules.step_targets(0.87, 0.01, "geometric", weights=10_000)  # 0.0035 of a weight
    assert merged == raw[:-2] + [0.87]
    assert schedules.step_targets(0.87, 0.01, "geometric", weights=10_000_000) == raw  # 3.5 weights: kept
    assert schedules.step_targets(0.9000001, 0.3, "fixed", weights=1000) == [0.3, 0.6, 0.9000001]
    # a trial's plan knows its layers' sizes: global scope counts all of them, layer scope the largest
    s = SimpleNamespace(method="lottery", sparsity=0.87, step_size=0.01, step_rule="geometric", rewind_epoch=0,
                        scope="global", retrain="weight_rewind", mask_control="none", step_epochs=1)
    train = SimpleNamespace(dense_epochs=2, finetune_epochs=0, budget_epochs=None)
    rounds = [p.prune.target for p in plan(s, train, {"a": 6_000, "b": 4_000}) if p.prune]
    assert rounds == merged
    assert len([p for p in plan(s, train, ["a", "b"]) if p.prune]) == 204  # names only: sizes unknown
    assert schedules.round_weights("layer", {"a": 6_000, "b": 4_000}) == 6_000
