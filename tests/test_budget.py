"""Equal budgets (`train.budget_epochs`): every method trains the same epochs after the dense
phase, on real (tiny) trials; a budget a method's own steps exceed is refused at spec load, by the
sweep before any trial starts (layers known once the model is built), and by a trial before it
trains."""

import textwrap

import pytest

from prunetune import spec
from prunetune.cache import DenseCache
from prunetune.errors import UserError
from prunetune.model_check import LayerSelection
from prunetune.pruning import schedules
from prunetune.trial import Trial

from conftest import digits_raw, error_lines
from test_cli import prunetune


def test_every_method_trains_the_same_epochs_under_one_budget(tmp_path):
    """The methods' own steps differ (layerwise 4 × 0.3 on simple_cnn, lottery 2 rounds of 1,
    gradual 1.5, ...); under budget 2.5 each trains dense_epochs + 2.5 in all."""
    cache = DenseCache(tmp_path / "cache")  # one dense phase for all: the budget is not part of it
    owns, totals = {}, {}
    for method in schedules.METHODS:
        raw = digits_raw(schedule__method=method, schedule__sparsity=0.5, schedule__step_size=0.3,
                         schedule__step_epochs=0.3, schedule__rewind_epoch=1, schedule__end_epoch=1.5,
                         train__batch_size=128, train__budget_epochs=2.5)
        trial = Trial(spec.validate(raw))
        owns[method] = schedules.trained_epochs(schedules.plan(trial.spec.schedule, trial.spec.train.model_copy(
            update={"budget_epochs": None, "finetune_epochs": 0.0}), trial.selected))
        totals[method] = trial.run(tmp_path / method, cache).metrics["train_epochs_total"]
        step = 1 / trial.trainer.steps_per_epoch
    assert len(set(owns.values())) >= 5 and max(owns.values()) < 2.5, owns  # the methods' own steps differ ...
    # ... the epochs trained do not (phase ends are rounded on one cumulative clock)
    assert len(set(totals.values())) == 1, totals
    assert totals["oneshot"] == pytest.approx(2 + 2.5, abs=step)


def test_a_budget_below_the_steps_is_refused_at_load_naming_the_key():
    raw = digits_raw(schedule__method="layerwise", schedule__layers="first:3", schedule__step_epochs=2,
                     train__budget_epochs=5)
    with pytest.raises(UserError, match=r"train\.budget_epochs \(5\) is less than the 6 epochs .*layerwise.*3 × 2"):
        spec.load(None, raw=raw)
    # a searched value is probed like any other: iterative to 0.9 in steps of 0.1 takes 9 epochs
    raw = digits_raw(schedule__method="iterative", schedule__sparsity={"choice": [0.5, 0.9]},
                     schedule__step_size=0.1, train__budget_epochs=8)
    with pytest.raises(UserError, match=r"train\.budget_epochs \(8\).*searched value 0\.9 of schedule\.sparsity"):
        spec.load(None, raw=raw)
    with pytest.raises(UserError, match=r"train\.budget_epochs"):
        spec.load(None, raw=digits_raw(train__budget_epochs=-1))


def test_the_budget_is_not_part_of_the_dense_phase():
    a, b = spec.validate(digits_raw()), spec.validate(digits_raw(train__budget_epochs=4))
    assert a.dense_hash() == b.dense_hash() and a.config_hash() != b.config_hash()


def test_layerwise_over_all_layers_is_checked_by_the_trial_before_training():
    # simple_cnn has 4 prunable layers: 4 × 1 epoch of steps; at load, `all` is only known to be ≥ 1
    raw = digits_raw(schedule__method="layerwise", schedule__step_epochs=1, train__budget_epochs=3)
    resolved = spec.load(None, raw=raw).trial_spec()
    with pytest.raises(UserError, match=r"^train\.budget_epochs \(3\) is less than the 4 epochs .*4 × 1"):
        Trial(resolved)  # the constructor: nothing has trained


SWEEP = """
    name: budget
    data: {dataset: digits, image_size: 8}
    train: {batch_size: 64, lr: 0.05, dense_epochs: 1, budget_epochs: 3}
    schedule: {method: {choice: [oneshot, layerwise]}, sparsity: 0.5, step_epochs: 1}
    search: {sampler: grid, num_trials: 2}
    """


def test_a_sweep_refuses_a_layerwise_budget_before_any_trial(tmp_path):
    p = tmp_path / "spec.yaml"
    p.write_text(textwrap.dedent(SWEEP))
    r = prunetune(["sweep", str(p)], cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    (line,) = error_lines(r.stderr)
    assert "train.budget_epochs (3) is less than the 4 epochs" in line and "layerwise" in line, line
    assert not (tmp_path / "mlruns").exists()  # nothing written, no trial started
    # with room for simple_cnn's 4 layer steps, the same sweep passes the check (--dry-run stops there)
    r = prunetune(["sweep", str(p), "--set", "train.budget_epochs=4", "--dry-run"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]


def test_the_sweeps_check_counts_the_layers_a_trial_prunes():
    """The driver's check selects layers as a trial does: l1_nm leaves simple_cnn's first conv (one
    input channel) dense, so layerwise steps through 3 of its 4 layers."""
    from prunetune.data import load_dataset

    def loaded(criterion):
        return spec.load(None, raw=digits_raw(schedule__method="layerwise", schedule__criterion=criterion,
                                              schedule__sparsity=0.5, schedule__step_epochs=1, train__budget_epochs=3))

    select = LayerSelection(load_dataset(loaded("l1_nm").fixed_spec().data))
    spec.check_with_layers(loaded("l1_nm"), select)  # 3 × 1 epochs fit
    with pytest.raises(UserError, match=r"train\.budget_epochs \(3\) is less than the 4 epochs"):
        spec.check_with_layers(loaded("l1_unstructured"), select)
