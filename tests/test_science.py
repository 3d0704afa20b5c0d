"""The audit's fixes and the lottery-ticket / retraining features, each checked on real (tiny)
trials: the sparsity denominator, the dense reference, the split seed, the dense-cache key with a
group-lasso penalty, fractional rewinding (an exact replay of the dense phase) and the retraining
policies (finetune, lr_rewind, weight_rewind, reinit)."""

from __future__ import annotations

import pytest
import torch

from prunetune import spec
from prunetune.cache import DenseCache
from prunetune.pruning.schedules import Phase, Prune
from prunetune.trial import Trial, run_trial

from conftest import digits_raw


def _trial(**overrides) -> Trial:
    return Trial(spec.load(None, raw=digits_raw(**overrides)).trial_spec())


def test_sparsity_is_over_the_selected_layers_and_model_sparsity_over_all(tmp_path):
    """layers: last:2 at 0.9 reads 0.9 (to one weight), not the diluted fraction over every layer."""
    result = run_trial(spec.load(None, raw=digits_raw(schedule__layers="last:2", schedule__sparsity=0.9))
                       .trial_spec(), tmp_path)
    trial_layers = ["classifier.1", "classifier.3"]  # simple_cnn's last two prunable layers
    state = torch.load(tmp_path / "checkpoint" / "model.pt", weights_only=True)
    selected = [state[f"{n}.weight"] for n in trial_layers]
    every = [v for k, v in state.items() if k.endswith("weight") and v.dim() in (2, 4)]
    total = sum(w.numel() for w in selected)
    m = result.metrics
    assert m["sparsity"] == pytest.approx(0.9, abs=1 / total)
    assert m["sparsity"] == pytest.approx(sum(int((w == 0).sum()) for w in selected) / total)
    assert m["model_sparsity"] == pytest.approx(sum(int((w == 0).sum()) for w in every) / sum(w.numel() for w in every))
    assert m["model_sparsity"] < m["sparsity"] - 0.01


def test_dense_reference_is_evaluated_once_and_shared(tmp_path):
    cache = DenseCache(tmp_path / "cache")
    first = run_trial(spec.validate(digits_raw()), tmp_path / "a", cache=cache).metrics
    # the dense checkpoint on the test split, by hand
    trial = _trial()
    entry = trial.dense_phase(cache)
    logits, labels = trial.trainer.predict("test")
    assert first["dense_test_acc"] == pytest.approx(float((logits.argmax(1) == labels).mean()))
    assert first["test_acc_drop"] == pytest.approx(first["dense_test_acc"] - first["test_acc"])
    assert (entry / "dense.json").is_file()  # kept with the dense phase; a hit reads it
    second = run_trial(spec.validate(digits_raw(schedule__sparsity=0.8)), tmp_path / "b", cache=cache).metrics
    assert second["dense_test_acc"] == first["dense_test_acc"]


def test_replicates_keep_the_split_and_split_seed_draws_it():
    a, b, c = _trial(), Trial(spec.validate({**digits_raw(), "seed": 1})), _trial(data__split_seed=1)
    assert (a.dataset.split == b.dataset.split).all()  # another seed: same test images
    assert (a.dataset.split != c.dataset.split).any()
    assert not torch.equal(a.model.features[0].weight, b.model.features[0].weight)  # seed draws the init


def test_dense_phases_differ_when_their_group_lasso_penalties_differ():
    first = spec.validate(digits_raw(schedule__criterion="l1_filter", train__group_lasso=0.01)).dense_hash()
    assert spec.validate(digits_raw(schedule__criterion="l1_filter", train__group_lasso=0.01,
                                    schedule__layers="last:2")).dense_hash() != first  # other groups
    # a searched criterion: the trials that draw an unstructured one train without the penalty
    assert spec.validate(digits_raw(schedule__criterion="l1_unstructured", train__group_lasso=0.01)
                         ).dense_hash() != first
    # l1_filter and l2_filter penalise the same groups: one dense phase
    assert spec.validate(digits_raw(schedule__criterion="l2_filter", train__group_lasso=0.01)).dense_hash() == first
    # without a penalty the dense phase does not depend on the schedule: shared
    plain = spec.validate(digits_raw()).dense_hash()
    assert spec.validate(digits_raw(schedule__layers="last:2")).dense_hash() == plain
    assert spec.validate(digits_raw(schedule__criterion="l1_filter")).dense_hash() == plain


def test_replaying_the_dense_phase_retraces_it_exactly(tmp_path):
    """With augmentation on: every step's randomness is seeded by (seed, step), so training from
    the initialisation for one epoch's steps gives the saved epoch-1 weights bit for bit."""
    trial = _trial(data__augment=["flip", "crop"], train__dense_epochs=2)
    entry = trial.dense_phase(DenseCache(tmp_path / "cache"))
    replayed = trial.replay_dense(entry, trial.trainer.steps_per_epoch)
    saved = torch.load(entry / "epoch_1.pt", weights_only=True)
    assert all(torch.equal(replayed[k], saved[k]) for k in saved)


def test_fractional_rewind_is_the_dense_phase_at_that_step(tmp_path):
    trial = _trial(schedule__method="lottery", schedule__rewind_epoch=0.5, train__dense_epochs=2,
                   data__augment=["flip"])
    entry = trial.dense_phase(DenseCache(tmp_path / "cache"))
    spe = trial.trainer.steps_per_epoch
    state = trial.rewind_state(entry)
    assert (entry / f"step_{round(0.5 * spe)}.pt").is_file()  # kept for other trials
    expected = trial.replay_dense(entry, round(0.5 * spe))
    assert all(torch.equal(state[k], expected[k]) for k in state)
    for bound in ("epoch_0.pt", "epoch_1.pt"):  # neither the initialisation nor the epoch end
        other = torch.load(entry / bound, weights_only=True)
        assert not torch.equal(state["features.0.weight"], other["features.0.weight"])
    trial.run_phase(0, Phase("round1", 0, Prune(0.5), rewind=True), entry)
    for name in trial.layers:
        mask = trial.masks.masks[name]
        assert torch.equal(trial.model.state_dict()[f"{name}.weight"][mask], state[f"{name}.weight"][mask])


@pytest.mark.parametrize("retrain", ["finetune", "lr_rewind", "weight_rewind", "reinit"])
def test_retraining_policies_start_from_the_weights_they_name(tmp_path, retrain):
    trial = _trial(schedule__method="oneshot", schedule__retrain=retrain, schedule__rewind_epoch=1,
                   train__dense_epochs=2)
    entry = trial.dense_phase(DenseCache(tmp_path / "cache"))
    trained = {k: v.clone() for k, v in trial.model.state_dict().items()}
    rewound = torch.load(entry / "epoch_1.pt", weights_only=True)
    init = torch.load(entry / "epoch_0.pt", weights_only=True)
    phases = trial.plan()
    first = phases[0]
    trial.run_phase(0, Phase(first.name, 0, first.prune, rewind=first.rewind, reinit=first.reinit,
                             restart=first.restart), entry)
    assert trial.masks.sparsity() == pytest.approx(0.5, abs=1e-3)
    now = trial.model.state_dict()
    for name in trial.layers:
        key, mask = f"{name}.weight", trial.masks.masks[name]
        assert (now[key][~mask] == 0).all()
        survivors = now[key][mask]
        if retrain in ("finetune", "lr_rewind"):
            assert torch.equal(survivors, trained[key][mask])
        elif retrain == "weight_rewind":
            assert torch.equal(survivors, rewound[key][mask])
        else:  # a fresh draw: neither the trained, the rewound nor the original initialisation
            for other in (trained, rewound, init):
                assert not torch.equal(survivors, other[key][mask])
    if retrain == "finetune":
        assert [p.epochs for p in phases] == [1]  # finetune_epochs
    else:  # dense_epochs − rewind_epoch on the dense schedule from rewind_epoch
        assert [(p.epochs, p.lr_offset, p.lr_horizon) for p in phases] == [(1, 1, 2)]


def test_a_reinit_trial_reaches_its_target_and_trains(tmp_path):
    result = run_trial(spec.load(None, raw=digits_raw(schedule__method="iterative", schedule__retrain="reinit",
                                                      schedule__step_size=0.3, schedule__sparsity=0.6,
                                                      schedule__step_rule="geometric")).trial_spec(), tmp_path)
    assert result.metrics["sparsity"] == pytest.approx(0.6, abs=1e-3)
    # 2 dense epochs, then the ticket's rounds to 0.3 and 0.51 (1 − 0.7^k) find the mask without
    # being this trial's training; the control trains the final 0.6 mask once, for
    # dense_epochs − rewind_epoch = 2 epochs
    assert len(result.history) == 2 + 2
    assert [round(h["sparsity"], 2) for h in result.history[2:]] == [0.6, 0.6]
    assert result.metrics["train_epochs_total"] == 4


def test_retrain_keys_are_validated():
    from prunetune.errors import UserError

    with pytest.raises(UserError, match="does not apply to method lottery"):
        spec.validate(digits_raw(schedule__method="lottery", schedule__retrain="reinit"))
    with pytest.raises(UserError, match="rewind_epoch"):
        spec.validate(digits_raw(schedule__method="oneshot", schedule__retrain="lr_rewind", schedule__rewind_epoch=3))
    # searched retrain with method choice: lottery never samples it, so the space is valid
    loaded = spec.load(None, raw=digits_raw(schedule__method={"choice": ["oneshot", "lottery"]},
                                            schedule__retrain={"choice": ["finetune", "reinit"]},
                                            schedule__rewind_epoch={"uniform": [0.0, 1.5]}))
    assert set(loaded.space) == {"schedule.method", "schedule.retrain", "schedule.rewind_epoch"}
    with pytest.raises(UserError, match="never uses it"):
        spec.load(None, raw=digits_raw(schedule__method="oneshot", schedule__rewind_epoch={"uniform": [0.0, 1.0]}))


# -- the controls as Frankle et al. (2021) and open_lth run them --------------------------------

def _nonzero(path):
    state = torch.load(path / "checkpoint" / "model.pt", weights_only=True)
    return {k: v != 0 for k, v in state.items() if k.endswith("weight") and v.dim() in (2, 4)}


def test_a_shuffled_mask_trains_its_survivors_from_their_values_not_from_zero(tmp_path):
    """The check from outside: oneshot to 0.9 with a shuffled mask and no training after it
    leaves exactly 10% of the weights non-zero (the shuffled survivors keep their trained
    values; before the fix most of them sat at the zeros the prune had left)."""
    run_trial(spec.validate(digits_raw(schedule__sparsity=0.9, schedule__mask_control="shuffle",
                                       train__finetune_epochs=0)), tmp_path)
    kept = _nonzero(tmp_path)
    total = sum(m.numel() for m in kept.values())
    assert sum(int(m.sum()) for m in kept.values()) / total == pytest.approx(0.1, abs=2 / total)


def test_the_reinit_control_trains_the_tickets_mask(tmp_path):
    """iterative + reinit and iterative + weight_rewind, same seed and schedule, end on the same
    non-zero pattern; and the control trains once, taking the ticket's rounds from the cache."""
    cache = DenseCache(tmp_path / "cache")
    raw = dict(schedule__method="iterative", schedule__step_size=0.4, schedule__sparsity=0.8,
               schedule__step_rule="geometric", schedule__rewind_epoch=0.5)
    ticket = run_trial(spec.validate(digits_raw(schedule__retrain="weight_rewind", **raw)), tmp_path / "t", cache=cache)
    entries = {p for p in (tmp_path / "cache").iterdir()}
    reported = []
    control = run_trial(spec.validate(digits_raw(schedule__retrain="reinit", **raw)), tmp_path / "c",
                        report=lambda m, e: reported.append((e, round(m["sparsity"], 2))), cache=cache)
    assert {p for p in (tmp_path / "cache").iterdir()} == entries  # every round it needed was cached
    # only its own training is reported: the dense phase and the one round on the final mask,
    # none of the ticket's rounds it took from the cache (their epochs would shadow its own)
    assert reported == [(0, 0.0), (1, 0.0), (2, 0.8), (3, 0.8)]
    a, b = _nonzero(tmp_path / "t"), _nonzero(tmp_path / "c")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # 0.4, 0.64, 0.784, 0.8: the ticket trains 4 rounds of 1.5 epochs, the control one
    assert ticket.metrics["train_epochs_total"] == pytest.approx(2 + 4 * 1.5)
    assert control.metrics["train_epochs_total"] == pytest.approx(2 + 1.5, abs=0.5 / 21)  # to a step


def test_the_ticket_takes_its_rounds_from_a_control_that_found_them(tmp_path):
    """The other order: a control first trains the ticket's rounds before the last (reporting
    none of them); the ticket then reports them from the cache and trains only its last round,
    ending where a ticket trained alone ends."""
    raw = digits_raw(schedule__method="lottery", schedule__step_size=0.5, schedule__sparsity=0.75,
                     schedule__step_rule="geometric", schedule__rewind_epoch=1)
    alone = run_trial(spec.validate(raw), tmp_path / "alone", cache=DenseCache(tmp_path / "a"))
    cache = DenseCache(tmp_path / "b")
    shuffled = run_trial(spec.validate({**raw, "schedule": {**raw["schedule"], "mask_control": "shuffle"}}),
                         tmp_path / "s", cache=cache)
    reported = []
    trial = Trial(spec.validate(raw), lambda m, e: reported.append(e))
    shared = trial.run(tmp_path / "shared", cache)
    assert [h["epoch"] for h in shuffled.history] == [0, 1, 2]  # dense, then one round of 1 epoch
    assert reported == [0, 1, 2, 3]  # dense, the cached round, the round trained here
    assert shared.metrics["test_acc"] == alone.metrics["test_acc"]
    assert shared.history == [dict(h, epoch_seconds=s["epoch_seconds"]) for h, s in zip(alone.history, shared.history)]
    # the shuffled control: the ticket's per-layer densities, other places, rewound values
    a, s = _nonzero(tmp_path / "alone"), _nonzero(tmp_path / "s")
    assert all(int(a[k].sum()) == int(s[k].sum()) for k in a)
    assert any(not torch.equal(a[k], s[k]) for k in a)


def test_shuffling_needs_a_value_for_every_weight_it_may_keep():
    from prunetune.errors import UserError

    for method, retrain in (("iterative", "finetune"), ("iterative", "lr_rewind"), ("gradual", "finetune")):
        with pytest.raises(UserError, match="mask_control shuffle needs a value"):
            spec.validate(digits_raw(schedule__method=method, schedule__retrain=retrain,
                                     schedule__mask_control="shuffle"))
    for method, retrain in (("iterative", "reinit"), ("iterative", "weight_rewind"), ("layerwise", "finetune")):
        spec.validate(digits_raw(schedule__method=method, schedule__retrain=retrain, schedule__mask_control="shuffle"))


# -- Renda et al.'s fine-tuning baseline --------------------------------------------------------

def test_finetune_final_lr_retrains_each_round_at_the_dense_schedules_last_rate(tmp_path):
    seen = []
    trial = Trial(spec.validate(digits_raw(schedule__method="iterative", schedule__retrain="finetune_final_lr",
                                           schedule__step_size=0.5, schedule__sparsity=0.75,
                                           schedule__step_rule="geometric", schedule__rewind_epoch=0.5,
                                           train__lr_schedule="step")),
                  lambda m, e: seen.append(m["lr"]))
    phases = trial.plan()
    # the same budget per round as rewinding to 0.5: dense_epochs − rewind_epoch
    assert [(p.epochs, p.final_lr, p.rewind, p.restart) for p in phases] == [(1.5, True, False, True)] * 2
    trial.run(tmp_path, DenseCache(tmp_path / "cache"))
    spe = trial.trainer.steps_per_epoch
    # the step schedule's last rate (×0.01 after 75% of the dense phase), held for every round
    assert seen[2:] == [pytest.approx(0.05 * 0.01)] * (len(seen) - 2)
    assert trial.trainer.global_step == 2 * spe + round(3 * spe)


# -- exactness of a fractional rewind -------------------------------------------------------------

def test_fractional_rewind_points_are_saved_as_the_dense_phase_passes_them(tmp_path):
    """A saved point is exact on any device (a CUDA replay is not bit-exact by default): the
    trial's own point and the sweep's other points are written during the dense phase, and
    equal the (CPU-exact) replay."""
    trial = Trial(spec.validate(digits_raw(schedule__method="lottery", schedule__rewind_epoch=0.5,
                                           train__dense_epochs=2, data__augment=["flip"])),
                  rewind_epochs=[0.25, 1, 1.5])
    entry = trial.dense_phase(DenseCache(tmp_path / "cache"))
    spe = trial.trainer.steps_per_epoch
    steps = sorted(int(p.stem.split("_")[1]) for p in entry.glob("step_*.pt"))
    assert steps == sorted({round(0.25 * spe), round(0.5 * spe), round(1.5 * spe)})
    for k in steps:
        saved = torch.load(entry / f"step_{k}.pt", weights_only=True)
        assert all(torch.equal(saved[n], v) for n, v in trial.replay_dense(entry, k).items())
    # stopping on the way changed nothing: the epoch ends equal a dense phase trained straight
    plain = Trial(spec.validate(digits_raw(train__dense_epochs=2, data__augment=["flip"])))
    other = plain.dense_phase(DenseCache(tmp_path / "plain"))
    for e in (1, 2):
        a, b = (torch.load(x / f"epoch_{e}.pt", weights_only=True) for x in (entry, other))
        assert all(torch.equal(a[n], b[n]) for n in a)
