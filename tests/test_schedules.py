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
    s = dict(method=method, sparsity=0.8, step_size=0.3, step_epochs=1.5, rewind_epoch=1, scope="global")
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


def test_every_method_ends_at_target_sparsity():
    for method in schedules.METHODS:
        phases = plan(*_spec(method), LAYERS)
        assert max(p.prune.target for p in phases if p.prune) == 0.8, method


def test_conditional_keys():
    assert schedules.key_is_used("lottery", "rewind_epoch")
    assert not schedules.key_is_used("iterative", "rewind_epoch")
    assert schedules.key_is_used("oneshot", "sparsity")
    assert not schedules.key_is_used("oneshot", "step_size")


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
