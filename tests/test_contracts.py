"""One contract per registry, run over every entry (as optuna runs one contract over every
sampler): a criterion, schedule method or model is tested by being registered.

- every criterion (`registry.CRITERIA`) reaches its target exactly (channel criteria: in channels;
  N:M: its pattern), its masks only shrink, pruned weights stay zero through optimiser steps, and
  a trial with it reports exactly the criterion-specific metrics its entry says;
- every method (`schedules.METHODS`) plans phases whose prune targets end at `sparsity`, and trains
  on digits in a tiny trial, emitting one `Epoch` per reported epoch;
- every model (`registry.MODELS`) builds for 1- and 3-channel input, its prunable layers are found
  in forward order and its output has `num_classes` columns.
"""

from __future__ import annotations

import typing

import pytest
import torch
from torch import nn

from prunetune import metrics, registry, spec
from prunetune.cache import DenseCache
from prunetune.models import build_model, prunable_layers
from prunetune.pruning import schedules
from prunetune.pruning.criteria.base import Context
from prunetune.pruning.criteria.nm import nm_valid, pattern
from prunetune.pruning.masks import Masks
from prunetune.trial import Trial

from conftest import digits_raw

CRITERIA = sorted(registry.CRITERIA)
METHODS = sorted(schedules.METHODS)
# the slowest builds (with the forward pass, 2-5 s per channel count on a busy 2-core CPU, where
# simple_cnn takes 0.2 s): their families stay in the fast run through vgg11, densenet121, resnet18
SLOW_MODELS = {"vgg16", "densenet169", "resnet50"}
MODELS = [pytest.param(a, marks=pytest.mark.slow) if a in SLOW_MODELS else a for a in sorted(registry.MODELS)]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> DenseCache:
    """One dense cache for the module's tiny trials: their dense phases are all the same one."""
    return DenseCache(tmp_path_factory.mktemp("dense"))


def _tiny(**overrides) -> dict:
    """A tiny trial on digits: one dense epoch, large batches (few optimiser steps)."""
    return digits_raw(train__dense_epochs=1, train__finetune_epochs=0.5, train__batch_size=256, **overrides)


# -- criteria -----------------------------------------------------------------------------------

def _schedule(name: str, sparsity: float, scope: str = "global"):
    """A schedule of criterion `name`, not validated (so the criterion's own check can judge it)."""
    schedule = spec.validate(digits_raw(schedule__scope=scope)).schedule
    return schedule.model_copy(update={"criterion": name, "sparsity": sparsity})


def _targets(name: str) -> list[float]:
    """Two increasing targets the criterion accepts (an N:M criterion accepts only 1 − N/M)."""
    entry = registry.criterion(name)
    accepted = [t for t in (0.3, 0.5, 0.75) if entry.check(_schedule(name, t)) is None]
    return accepted[:2] if len(accepted) > 1 else accepted * 2


def _pruned(name: str, scope: str):
    """simple_cnn (3 channels, 8 px) pruned twice by `name`, as a trial sets it up: the layers and
    groups the criterion chooses. Returns the masks after each prune, the masks and the model."""
    torch.manual_seed(0)
    size, channels = 8, 3
    model = build_model(spec.validate(digits_raw()).model, 10, channels, size)
    layers = prunable_layers(model, channels, size)
    example = torch.zeros(1, channels, size, size)
    targets = _targets(name)
    schedule = _schedule(name, targets[-1], scope)
    criterion = registry.criterion(name)
    selected = criterion.layers(model, layers, schedule)
    masks = Masks(model, layers, criterion.groups(model, example, selected, layers[-1], schedule), selected=selected)
    x = torch.randn(64, channels, size, size, generator=torch.Generator().manual_seed(1))
    y = torch.arange(64) % 10
    context = Context(model, example, lambda: iter([(x[:32], y[:32]), (x[32:], y[32:])]), 5, pattern(schedule))
    states = []
    for target in targets:
        masks.prune(target, criterion, selected, scope, torch.Generator().manual_seed(0), context)
        states.append(({n: m.clone() for n, m in masks.masks.items()}, [k.clone() for k in masks.channels_kept]))
    return states, masks, model, (x, y), targets[-1]


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("name", CRITERIA)
def test_every_criterion_reaches_its_target_exactly(name, scope):
    states, masks, _, _, target = _pruned(name, scope)
    selected = masks.selected
    if masks.groups:  # whole channels: the target is a fraction of the groups' channels
        pruned = [int((~k).sum()) for k in masks.channels_kept]
        if scope == "global":
            assert sum(pruned) == round(target * sum(g.channels for g in masks.groups))
        else:
            assert pruned == [min(round(target * g.channels), g.channels - 1) for g in masks.groups]
    elif registry.criterion(name).needs == "pattern":  # its N:M pattern, in every selected layer
        n, m = pattern(_schedule(name, target))
        assert all(nm_valid(masks.weights[layer], n, m) for layer in selected)
        assert masks.sparsity() == pytest.approx(1 - n / m)
    else:
        groups = [selected] if scope == "global" else [[layer] for layer in selected]
        for group in groups:
            total = sum(masks.weights[layer].numel() for layer in group)
            assert masks.sparsity(group) == pytest.approx(target, abs=1 / total)
    assert all(bool((masks.weights[n][~masks.masks[n]] == 0).all()) for n in masks.masks)


@pytest.mark.parametrize("name", CRITERIA)
def test_every_criterions_masks_only_shrink(name):
    (first, first_channels), (second, second_channels) = _pruned(name, "global")[0]
    assert all(not (second[n] & ~first[n]).any() for n in first)
    assert all(not (b & ~a).any() for a, b in zip(first_channels, second_channels))


@pytest.mark.parametrize("name", CRITERIA)
def test_every_criterions_pruned_weights_stay_zero_through_training_steps(name):
    """SGD with momentum and weight decay, as the Trainer steps: every masked tensor (weights,
    and a channel group's biases and batch norms) stays exactly zero where it is masked."""
    _, masks, model, (x, y), _ = _pruned(name, "global")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        masks.mask_grads()
        optimizer.step()
        masks.apply()
    for tensor, mask in masks._tensors():
        assert bool((tensor[~mask] == 0).all())
    assert masks.sparsity() > 0


@pytest.mark.parametrize("name", CRITERIA)
def test_every_criterion_reports_the_metrics_its_entry_says(tmp_path, cache, name):
    """A tiny trial: the criterion-specific final metrics it logs are exactly `reports`."""
    raw = _tiny(schedule__criterion=name, schedule__sparsity=_targets(name)[-1], schedule__synflow_iters=5)
    trial = Trial(spec.validate(raw))
    result = trial.run(tmp_path, cache)
    entry = registry.criterion(name)
    assert set(metrics.by_criterion()) & set(result.metrics) == entry.reports(trial.spec.schedule)
    assert set(result.metrics) <= set(metrics.final_metrics()) | {k for k in result.metrics if "recall_class" in k}


# -- schedule methods ---------------------------------------------------------------------------

def _variants() -> list[tuple[str, str]]:
    """Every method, with every retraining policy where the method reads `schedule.retrain`."""
    retrains = typing.get_args(type(spec.validate(digits_raw()).schedule).model_fields["retrain"].annotation)
    return [(m, r) for m in METHODS for r in (retrains if schedules.key_is_used(m, "retrain") else ["finetune"])]


def _method_raw(method: str, retrain: str = "finetune") -> dict:
    return _tiny(schedule__method=method, schedule__retrain=retrain, schedule__sparsity=0.7, schedule__step_size=0.35,
                 schedule__step_epochs=0.5, schedule__rewind_epoch=0.5, schedule__end_epoch=1.5)


@pytest.mark.parametrize("method,retrain", _variants())
def test_every_method_plans_prune_targets_that_end_at_sparsity(method, retrain):
    """Per layer, the targets the phases prune it to never fall, and the last is `sparsity`."""
    s = spec.validate(_method_raw(method, retrain))
    layers = ["a", "b", "c"]
    phases = schedules.plan(s.schedule, s.train, layers)
    assert phases and all(p.epochs >= 0 for p in phases)
    for layer in layers:
        targets = [p.prune.target for p in phases if p.prune and layer in (p.prune.layers or layers)]
        assert targets and targets == sorted(targets)
        assert targets[-1] == pytest.approx(s.schedule.sparsity, abs=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_a_tiny_trial_and_emits_one_event_per_epoch(tmp_path, cache, method):
    events = []

    def on_epoch(event):
        if event.save is not None and not (tmp_path / "state.pt").exists():
            event.save(tmp_path / "state.pt")
        events.append(event)

    trial = Trial(spec.validate(_method_raw(method)), on_epoch=on_epoch)
    result = trial.run(tmp_path / "out", cache)
    phases = {p.name: p for p in trial.phases}
    assert [e.index for e in events] == [h["epoch"] for h in result.history] == list(range(len(events)))
    assert [e.metrics for e in events] == [{k: v for k, v in h.items() if k != "epoch"} for h in result.history]
    assert [e.phase for e in events[:1]] == ["dense"] and set(e.phase for e in events) <= {"dense", *phases}
    order = ["dense", *phases]
    assert [order.index(e.phase) for e in events] == sorted(order.index(e.phase) for e in events)
    assert all(e.resumed_from_epoch is None for e in events)
    # a resume state can be taken after the dense phase, outside the cached ticket rounds
    assert all(e.save is None for e in events if e.phase == "dense")
    assert all(e.save is not None for e in events if e.phase != "dense" and not phases[e.phase].ticket)
    if any(e.save is not None for e in events):
        assert {"model", "masks", "phase_index"} <= set(torch.load(tmp_path / "state.pt", weights_only=True))
    assert all(e.planned_epochs == trial.planned_epochs for e in events)
    spe = trial.trainer.steps_per_epoch
    assert result.metrics["train_epochs_total"] == pytest.approx(trial.planned_epochs, abs=1 / spe)
    if any(p.release_masks for p in trial.phases):  # dense-sparse-dense: ends with every weight trainable
        assert all(bool(m.all()) for m in trial.masks.state_dict().values())
    else:
        assert result.metrics["sparsity"] == pytest.approx(0.7, abs=1e-3)


# -- models -------------------------------------------------------------------------------------

@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("arch", MODELS)
def test_every_model_builds_and_its_prunable_layers_are_found(arch, channels):
    size, classes = 8, 7
    model = build_model(spec.validate(digits_raw(model__arch=arch)).model, classes, channels, size)
    layers = prunable_layers(model, channels, size)
    modules = dict(model.named_modules())
    assert layers and len(set(layers)) == len(layers)
    assert all(isinstance(modules[n], (nn.Conv2d, nn.Linear)) for n in layers)
    assert modules[layers[0]].weight.shape[1] == channels  # forward order: the stem first
    head = modules[layers[-1]]  # ... and the classifier head last
    assert isinstance(head, nn.Linear) and head.out_features == classes
    with torch.no_grad():
        out = model.eval()(torch.zeros(2, channels, size, size))
    assert out.shape == (2, classes)
