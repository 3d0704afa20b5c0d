"""The pruning engine, by property: exact targets, masks only shrink, zeros survive training,
and global L1 picks what torch.nn.utils.prune picks."""

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from prunetune.pruning.criteria.magnitude import l1_unstructured, random_scores
from prunetune.pruning.masks import Masks


def small_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10))


LAYERS = ["0", "2", "5", "7"]


def zeros(model, names):
    mods = dict(model.named_modules())
    return sum(int((mods[n].weight == 0).sum()) for n in names)


def total(model, names):
    mods = dict(model.named_modules())
    return sum(mods[n].weight.numel() for n in names)


@pytest.mark.parametrize("target", [0.0, 0.1, 0.333, 0.5, 0.8, 0.97])
@pytest.mark.parametrize("criterion", [l1_unstructured, random_scores])
def test_global_target_exact_to_one_weight(target, criterion):
    model = small_net()
    masks = Masks(model, LAYERS)
    masks.prune(target, criterion, scope="global", generator=torch.Generator().manual_seed(1))
    assert zeros(model, LAYERS) == round(target * total(model, LAYERS))


@pytest.mark.parametrize("target", [0.2, 0.5, 0.9])
def test_layer_scope_prunes_each_layer_alike(target):
    model = small_net()
    Masks(model, LAYERS).prune(target, l1_unstructured, scope="layer")
    mods = dict(model.named_modules())
    for n in LAYERS:
        w = mods[n].weight
        assert int((w == 0).sum()) == round(target * w.numel())


def test_only_selected_layers_are_touched():
    model = small_net()
    before = copy.deepcopy(model.state_dict())
    Masks(model, LAYERS).prune(0.7, l1_unstructured, layers=["2", "5"])
    after = model.state_dict()
    for n in ("0", "7"):
        assert torch.equal(before[f"{n}.weight"], after[f"{n}.weight"])
    assert zeros(model, ["2", "5"]) == round(0.7 * total(model, ["2", "5"]))


@pytest.mark.parametrize("criterion", [l1_unstructured, random_scores])
def test_masks_only_shrink(criterion):
    model = small_net()
    masks = Masks(model, LAYERS)
    previous = masks.state_dict()
    gen = torch.Generator().manual_seed(3)
    for target in (0.2, 0.4, 0.4, 0.3, 0.7, 0.9):  # 0.3 after 0.4: nothing is un-pruned
        # perturb weights between steps, as training would, so scores change order
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        masks.apply()
        masks.prune(target, criterion, generator=gen)
        current = masks.state_dict()
        for n in LAYERS:
            assert not (current[n] & ~previous[n]).any(), "a pruned weight came back"
        previous = current
    assert zeros(model, LAYERS) == round(0.9 * total(model, LAYERS))


def test_global_l1_matches_torch_prune():
    ours, theirs = small_net(5), small_net(5)
    Masks(ours, LAYERS).prune(0.6, l1_unstructured, scope="global")
    mods = dict(theirs.named_modules())
    torch_prune.global_unstructured([(mods[n], "weight") for n in LAYERS],
                                    pruning_method=torch_prune.L1Unstructured, amount=0.6)
    for n in LAYERS:
        ours_mask = dict(ours.named_modules())[n].weight != 0
        assert torch.equal(ours_mask, mods[n].weight_mask.bool()), n


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_pruned_weights_stay_exactly_zero_through_optimizer_steps(optimizer):
    model = small_net()
    params = model.parameters()
    opt = {"sgd": lambda: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-2),
           "adam": lambda: torch.optim.Adam(params, lr=0.05, weight_decay=1e-2),
           "adamw": lambda: torch.optim.AdamW(params, lr=0.05, weight_decay=1e-2)}[optimizer]()
    masks = Masks(model, LAYERS)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))

    def steps(n):
        for _ in range(n):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            masks.mask_grads()
            opt.step()
            masks.apply()

    steps(3)  # momentum / Adam moments are non-zero for every weight now
    masks.prune(0.75, l1_unstructured)
    masks.mask_optimizer_state(opt)
    pruned = {n: ~m for n, m in masks.state_dict().items()}
    steps(10)
    mods = dict(model.named_modules())
    for n in LAYERS:
        assert (mods[n].weight[pruned[n]] == 0).all()
        state = opt.state[mods[n].weight]
        for v in state.values():
            if torch.is_tensor(v) and v.shape == mods[n].weight.shape:
                assert (v[pruned[n]] == 0).all(), "optimiser state of pruned weights must be zero"
    assert masks.sparsity() == pytest.approx(0.75, abs=1 / total(model, LAYERS))


def test_release_makes_weights_trainable_from_zero():
    model = small_net()
    masks = Masks(model, LAYERS)
    masks.prune(0.5, l1_unstructured)
    masks.release()
    assert masks.sparsity() == pytest.approx(0.5, abs=1e-3)  # released weights restart at zero
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    nn.functional.cross_entropy(model(torch.randn(4, 3, 8, 8)), torch.tensor([0, 1, 2, 3])).backward()
    opt.step()
    masks.apply()
    assert masks.sparsity() < 0.4  # most released weights moved off zero (dead ReLUs keep some)
