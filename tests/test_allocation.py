"""Per-layer allocation (`schedule.scope` erk and lamp, `schedule.layer_sparsity`): the arithmetic
against its references' (numbers from running google-research/rigl's `get_sparsities` and
jaeho-lee/layer-adaptive-sparsity's `prune_weights_lamp` on these inputs; their code is not
here), and every allocation with every method that prunes to a target reaching its targets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunetune import spec
from prunetune.errors import UserError
from prunetune.models import build_model, prunable_layers
from prunetune.pruning import allocation, schedules
from prunetune.pruning.criteria.magnitude import l1_unstructured
from prunetune.pruning.masks import Masks
from prunetune.spec import ModelSpec
from prunetune.trial import Trial

from conftest import digits_raw

# PyTorch layout (out, in, kh, kw); ERK's sum/prod do not depend on the layout
SHAPES = {"c1": (16, 1, 3, 3), "c2": (32, 16, 3, 3), "c3": (64, 32, 3, 3), "fc": (10, 64)}


@pytest.mark.parametrize("sparsity, reference, ours", [
    # rigl keeps Σ (N_i − floor(s·N_i)) weights (per-layer floors); here (1 − s)·N exactly
    (0.9, [1.0, 25 / 208, 425 / 7488, 1.0], [1.0, 0.1200721, 0.0567007, 1.0]),
    (0.8, [1.0, 0.29912860576923084, 0.14125517494658124, 1.0], [1.0, 0.2990385, 0.1412126, 1.0]),
])
def test_erk_densities_are_rigls(sparsity, reference, ours):
    densities = allocation.erk_densities(SHAPES, sparsity)
    assert list(densities.values()) == pytest.approx(ours, abs=1e-7)
    assert list(densities.values()) == pytest.approx(reference, abs=2e-3)  # the budget's rounding only
    sizes = {n: torch.Size(s).numel() for n, s in SHAPES.items()}
    assert sum(densities[n] * sizes[n] for n in SHAPES) == pytest.approx((1 - sparsity) * sum(sizes.values()))


def test_erk_prunes_to_the_overall_target_exactly():
    model = nn.Sequential(nn.Conv2d(1, 16, 3), nn.Conv2d(16, 32, 3), nn.Conv2d(32, 64, 3), nn.Flatten(),
                          nn.Linear(64, 10))
    with torch.no_grad():
        model[4].weight.copy_(torch.randn(10, 64))
    layers = ["0", "1", "2", "4"]
    masks = Masks(model, layers, allocation=allocation.Allocation("erk", 0.9))
    masks.prune(0.9, l1_unstructured, layers, "erk")
    total = sum(w.numel() for w in masks.weights.values())
    assert round(masks.sparsity() * total) == round(0.9 * total)  # to one weight
    assert masks.sparsity(["0"]) == 0 and masks.sparsity(["4"]) == 0  # kept dense, as rigl
    assert masks.sparsity(["2"]) == pytest.approx(1 - 0.0567007, abs=1 / 18432)


W1 = [[0.5, -1.0, 0.25], [2.0, 0.0, -0.5]]
W2 = [[0.1, -0.3], [0.2, 0.05]]


def test_lamp_scores_and_survivors_are_the_references():
    scores = allocation.lamp_scores({"a": torch.tensor(W1).abs(), "b": torch.tensor(W2).abs()})
    # the tied 0.5 and -0.5 score differently, as in the reference (the first ranked lower)
    assert scores["a"].flatten().tolist() == pytest.approx([0.25 / 5.5, 1 / 5, 0.0625 / 5.5625, 1.0, 0.0, 0.25 / 5.25])
    assert scores["b"].flatten().tolist() == pytest.approx([0.01 / 0.14, 1.0, 0.04 / 0.13, 0.0025 / 0.1425])
    model = nn.Sequential(nn.Linear(3, 2, bias=False), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor(W1))
        model[1].weight.copy_(torch.tensor(W2))
    masks = Masks(model, ["0", "1"])
    masks.prune(0.5, l1_unstructured, ["0", "1"], "lamp")
    assert masks.masks["0"].int().tolist() == [[0, 1, 0], [1, 0, 0]]
    assert masks.masks["1"].int().tolist() == [[1, 1], [1, 0]]  # global magnitude would prune 0.1 and 0.05


def test_lamp_counts_are_what_lamp_takes_from_each_layer_for_criteria_that_choose_within_layers():
    """Wanda and SparseGPT choose within a layer: under scope lamp each layer loses as many
    weights as LAMP over the magnitudes takes from it, which magnitude itself does (LAMP is
    monotone in |w| within a layer), including weights pruned before."""
    model, layers = _simple_cnn()
    lamp = Masks(model, layers)
    lamp.prune(0.3, l1_unstructured, layers, "lamp")
    counts = lamp.layer_counts(0.7, layers, "lamp")
    lamp.prune(0.7, l1_unstructured, layers, "lamp")
    assert counts == {n: int((~lamp.masks[n]).sum()) for n in layers}
    assert sum(counts.values()) == round(0.7 * sum(lamp.masks[n].numel() for n in layers))
    assert len(set(round(c / lamp.masks[n].numel(), 2) for n, c in counts.items())) > 1  # not uniform


def _simple_cnn():
    torch.manual_seed(0)
    model = build_model(ModelSpec(arch="simple_cnn"), 10, 1, 8)
    return model, prunable_layers(model, 1, 8)  # features.0, features.4, classifier.1, classifier.3


SCHEDULES = {
    "global": {"scope": "global"}, "layer": {"scope": "layer"}, "erk": {"scope": "erk"}, "lamp": {"scope": "lamp"},
    "layer_sparsity": {"scope": "layer", "layer_sparsity": {"features.*": 0.5, "classifier.1": 0.95}},
}


@pytest.mark.parametrize("method", [m for m in schedules.METHODS if not schedules.METHODS[m].regrows])
@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_every_allocation_reaches_its_targets_with_every_method(method, name):
    """The plan's prunes applied in order (no training): each layer reaches its own target
    (layer, erk, layer_sparsity) or the layers together the overall one (global, lamp)."""
    keys = {f"schedule__{k}": v for k, v in SCHEDULES[name].items()}
    s = spec.validate(digits_raw(schedule__method=method, schedule__sparsity=0.8, schedule__step_size=0.3,
                                 schedule__step_epochs=0.5, **keys))
    model, layers = _simple_cnn()
    masks = Masks(model, layers, allocation=allocation.Allocation.of(s.schedule))
    for phase in schedules.plan(s.schedule, s.train, layers):
        if phase.prune is not None:
            before = {n: m.clone() for n, m in masks.masks.items()}
            masks.prune(phase.prune.target, l1_unstructured, phase.prune.layers or layers, phase.prune.scope)
            assert all((masks.masks[n] <= before[n]).all() for n in layers)  # masks only shrink
    shapes = {n: tuple(masks.weights[n].shape) for n in layers}
    if name in ("global", "lamp") and method != "layerwise":
        total = sum(w.numel() for w in masks.weights.values())
        assert round(masks.sparsity() * total) == round(0.8 * total)
        return
    own = name not in ("global", "lamp")  # layerwise prunes each layer to the target in turn
    targets = masks.allocation.final_targets(shapes) if own else dict.fromkeys(layers, 0.8)
    for n in layers:
        assert masks.sparsity([n]) == pytest.approx(targets[n], abs=1 / masks.weights[n].numel()), n
    if name == "layer_sparsity":
        assert targets == {"features.0": 0.5, "features.4": 0.5, "classifier.1": 0.95, "classifier.3": 0.8}


def test_per_layer_targets_are_searched_under_keys_with_dots(tmp_path):
    loaded = spec.load(None, raw=digits_raw(schedule__scope="layer", schedule__layer_sparsity={
        "classifier.1": {"uniform": [0.5, 0.95]}, "features.*": 0.5}))
    assert list(loaded.space) == ["schedule.layer_sparsity.classifier.1"]
    resolved = loaded.resolve({"schedule.layer_sparsity.classifier.1": 0.9})
    assert resolved.schedule.layer_sparsity == {"classifier.1": 0.9, "features.*": 0.5}
    assert resolved.flat()["schedule.layer_sparsity.classifier.1"] == 0.9
    trial = Trial(resolved)
    assert trial.layer_targets() == {"features.0": 0.5, "features.4": 0.5, "classifier.1": 0.9, "classifier.3": 0.5}
    from prunetune.tracking import param_key

    assert param_key("schedule.layer_sparsity.features.*") == "schedule.layer_sparsity.features._any_"


@pytest.mark.parametrize("extra, message", [
    ({"schedule__layer_sparsity": {"features.*": 1.0}}, r"schedule.layer_sparsity.*outside \[0, 1\)"),
    ({"schedule__layer_sparsity": {"features.*": 0.5}, "schedule__scope": "global"}, r"scope layer"),
    ({"schedule__scope": "erk", "schedule__criterion": "l1_filter"}, r"schedule.scope erk does not apply to "
                                                                      r"criterion l1_filter"),
    ({"schedule__scope": "lamp", "schedule__criterion": "grasp"}, r"schedule.scope lamp .* grasp"),
    ({"schedule__scope": "erk", "schedule__criterion": "l1_nm"}, r"schedule.scope erk .* l1_nm"),
])
def test_bad_allocations_name_the_key(extra, message):
    raw = digits_raw(**extra)
    if raw["schedule"].get("criterion") == "l1_nm":
        raw["schedule"]["sparsity"] = 0.5
    with pytest.raises(UserError, match=message):
        spec.load(None, raw=raw)


@pytest.mark.parametrize("globs, message", [
    ({"conv*": 0.5}, r"'conv\*' matches no prunable layer; the model's are: features.0"),
    ({"features.*": 0.5, "features.0": 0.6}, r"'features.\*' and 'features.0' both match layer features.0"),
])
def test_globs_that_name_no_layer_or_overlap_are_refused(globs, message):
    with pytest.raises(UserError, match=message):
        Trial(spec.validate(digits_raw(schedule__scope="layer", schedule__layer_sparsity=globs)))
