"""Trials end to end on real (tiny) data, without Ray or MLflow."""


import pytest
import torch

from prunetune import spec
from prunetune.cache import DenseCache
from prunetune.pruning.schedules import Phase, Prune
from prunetune.trial import Trial, run_trial

from conftest import digits_raw, write_cifar100


def test_digits_iterative_80_percent(tmp_path):
    """The foundation's bar: iterative to 80% on digits, ≥ 0.85 test accuracy; the checkpoint's
    conv and linear weights are 80% zeros and match the reported sparsity."""
    raw = spec.load(None, raw={
        "name": "q", "data": {"dataset": "digits", "image_size": 16},
        "train": {"batch_size": 64, "lr": 0.05, "dense_epochs": 8, "finetune_epochs": 4},
        "schedule": {"method": "iterative", "sparsity": 0.8, "step_size": 0.2, "step_epochs": 1}})
    reported = []
    result = run_trial(raw.trial_spec(), tmp_path, report=lambda m, e: reported.append((e, m)))
    m = result.metrics
    assert m["test_acc"] >= 0.85
    state = torch.load(tmp_path / "checkpoint" / "model.pt", weights_only=True)
    weights = [v for k, v in state.items() if k.endswith("weight") and v.dim() in (2, 4)]
    zero_fraction = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zero_fraction == pytest.approx(0.8, abs=1e-4)
    assert m["sparsity"] == pytest.approx(zero_fraction, abs=1e-12)
    # per-epoch metrics, MLflow step = epoch index across phases (8 dense + 4 steps + 4 finetune)
    assert [e for e, _ in reported] == list(range(16))
    assert set(reported[0][1]) == {"train_loss", "train_acc", "val_loss", "val_acc", "sparsity", "lr", "epoch_seconds"}
    assert [round(r[1]["sparsity"], 3) for r in reported[8:12]] == [0.2, 0.4, 0.6, 0.8]
    for key in ("test_acc", "test_top5", "test_loss", "test_balanced_acc", "test_macro_f1", "sparsity",
                "nonzero_params", "total_params", "compression_ratio", "flops_dense", "flops_sparse",
                "theoretical_speedup", "checkpoint_bytes", "train_epochs_total", "trial_seconds"):
        assert key in m, key
    assert m["train_epochs_total"] == 16
    assert m["flops_sparse"] < m["flops_dense"] and m["theoretical_speedup"] > 2
    assert m["total_params"] / m["nonzero_params"] == pytest.approx(m["compression_ratio"])
    for artifact in ("checkpoint/model.pt", "config.yaml", "layer_sparsity.csv", "data/split.csv",
                     "figures/curves.png", "figures/weights_hist.png"):
        assert (tmp_path / artifact).is_file(), artifact


def _trial(**overrides):
    return Trial(spec.load(None, raw=digits_raw(**overrides)).trial_spec())


def test_lottery_rewinds_surviving_weights_to_rewind_epoch(tmp_path):
    trial = _trial(schedule__method="lottery", schedule__rewind_epoch=1, train__dense_epochs=3)
    cache = DenseCache(tmp_path / "cache")
    entry = trial.dense_phase(cache)
    rewind_state = torch.load(entry / "epoch_1.pt", weights_only=True)
    final_state = torch.load(entry / "epoch_3.pt", weights_only=True)
    # a round: prune by the trained weights' magnitude, rewind, then (0 epochs) retrain
    trial.run_phase(0, Phase("round1", 0, Prune(0.5), rewind=True), entry)
    model_state = trial.model.state_dict()
    for name in trial.layers:
        w, w1 = model_state[f"{name}.weight"], rewind_state[f"{name}.weight"]
        mask = trial.masks.masks[name]
        assert torch.equal(w[mask], w1[mask])  # survivors are back at their epoch-1 values
        assert (w[~mask] == 0).all()
    # the mask came from the trained (epoch-3) weights: the survivors are the largest of those
    trained = torch.cat([final_state[f"{n}.weight"].abs().flatten() for n in trial.layers])
    kept = torch.cat([trial.masks.masks[n].flatten() for n in trial.layers])
    assert trained[kept].min() >= trained[~kept].max()


def test_dense_phase_is_shared_and_replayed(tmp_path):
    cache = DenseCache(tmp_path / "cache")
    first = []
    run_trial(spec.validate(digits_raw()), tmp_path / "a", report=lambda m, e: first.append((e, m)), cache=cache)
    second = []
    trial = Trial(spec.validate(digits_raw(schedule__sparsity=0.7)), lambda m, e: second.append((e, m)))
    entry = trial.dense_phase(cache)
    (key,) = [p.name for p in (tmp_path / "cache").iterdir()]  # one entry, trained once
    assert {p.name for p in (tmp_path / "cache" / key).iterdir()} == {"done", entry.name, "lease.json.lock"}
    assert second == first[:2]  # the dense epochs are replayed, not retrained
    assert sorted(p.name for p in entry.glob("epoch_*.pt")) == ["epoch_0.pt", "epoch_1.pt", "epoch_2.pt"]


@pytest.mark.parametrize("method", ["oneshot", "iterative", "layerwise", "lottery", "gradual", "dsd", "ist"])
def test_every_method_reaches_its_target(tmp_path, method):
    overrides = dict(schedule__method=method, schedule__sparsity=0.7, schedule__step_size=0.3,
                     schedule__step_epochs=0.5, train__dense_epochs=1, train__finetune_epochs=0.5,
                     schedule__end_epoch=1.5)
    if method in ("dsd", "ist"):  # pruned to the target, then the masks released: ends dense
        overrides.update(schedule__step_epochs=1, train__finetune_epochs=1)
        reported = []
        trial = Trial(spec.load(None, raw=digits_raw(**overrides)).trial_spec(),
                      lambda m, e: reported.append(m["sparsity"]))
        result = trial.run(tmp_path)
        assert reported[1:] == pytest.approx([0.7, 0.0, 0.7, 0.0][:len(reported) - 1], abs=0.05)
        assert reported[1] == pytest.approx(0.7, abs=1e-4)  # the sparse epoch, masks in force
        assert all(bool(m.all()) for m in trial.masks.state_dict().values())  # released
        assert result.metrics["sparsity"] < 0.05  # pruned weights trained again from zero
        return
    result = run_trial(spec.load(None, raw=digits_raw(**overrides)).trial_spec(), tmp_path)
    assert result.metrics["sparsity"] == pytest.approx(0.7, abs=1e-4)
    rows = (tmp_path / "layer_sparsity.csv").read_text().splitlines()
    if method == "layerwise":  # every layer alike
        assert all(abs(float(r.split(",")[-1]) - 0.7) < 1e-2 for r in rows[1:])


def test_fractional_step_epochs_count_steps(tmp_path):
    overrides = dict(schedule__method="iterative", schedule__sparsity=0.6, schedule__step_size=0.2,
                     schedule__step_epochs=0.5, train__dense_epochs=1, train__finetune_epochs=0.25)
    reported = []
    result = run_trial(spec.validate(digits_raw(**overrides)), tmp_path, report=lambda m, e: reported.append(e))
    # 1 dense + 3 × 0.5 + 0.25 = 2.75 epochs: epochs 0, 1 full, epoch 2 reported partial at the end
    assert result.metrics["train_epochs_total"] == pytest.approx(2.75, abs=0.05)
    assert reported == [0, 1, 2]


def test_cifar100_vgg11_trial_from_pickle_layout(tmp_path):
    root = write_cifar100(tmp_path / "data", n_train=128, n_test=64)
    raw = {"name": "c", "model": {"arch": "vgg11"},
           "data": {"dataset": "cifar100", "root": str(root), "image_size": 32, "augment": ["flip", "crop"]},
           "train": {"batch_size": 32, "dense_epochs": 1, "finetune_epochs": 0.25},
           "schedule": {"method": "oneshot", "sparsity": 0.5}}
    result = run_trial(spec.validate(raw), tmp_path / "out")
    assert result.metrics["sparsity"] == pytest.approx(0.5, abs=1e-6)
    assert "test_top5" in result.metrics
    split = (tmp_path / "out" / "data" / "split.csv").read_text().splitlines()
    assert split[0] == "sample_id,split" and len(split) == 1 + 128 + 64
    assert sum(row.endswith(",test") for row in split) == 64  # the official test split is kept


def test_random_criterion_and_layer_subsets(tmp_path):
    trial = _trial(schedule__criterion="random", schedule__layers=["features.*"])
    assert trial.selected == ["features.0", "features.4"]
    result = trial.run(tmp_path)
    lines = (tmp_path / "layer_sparsity.csv").read_text().splitlines()[1:]
    rows = {r.split(",")[0]: float(r.split(",")[-1]) for r in lines}
    assert rows["classifier.1"] == 0 and rows["classifier.3"] == 0
    assert result.metrics["sparsity"] > 0


def test_non_finite_loss_fails_the_trial(tmp_path):
    """Checked once an epoch (a per-step check would sync a GPU every step): the diverged epoch
    fails the trial before it is reported or saved."""
    import math
    import pickle

    from prunetune.train import NonFiniteLoss
    reported = []
    with pytest.raises(NonFiniteLoss, match=r"^non-finite training loss in epoch 0 \(by step \d+\)$") as raised:
        run_trial(spec.validate(digits_raw(train__lr=1e12, train__optimizer="sgd")), tmp_path,
                  report=lambda metrics, epoch: reported.append(metrics))
    assert all(math.isfinite(m["train_loss"]) for m in reported)
    assert raised.value.epoch == 0 and pickle.loads(pickle.dumps(raised.value)).epoch == 0


@pytest.mark.parametrize("method,criterion", [("iterative", "l1_unstructured"), ("lottery", "l1_unstructured"),
                                              ("iterative", "l1_filter")])
def test_resume_from_checkpoint_matches_uninterrupted_run(tmp_path, method, criterion):
    """A trial checkpointed at an epoch boundary and resumed in a new process ends exactly as
    one that ran through (CPU, same seed); structured masks (channels, batch norms) included."""
    overrides = dict(schedule__method=method, schedule__sparsity=0.6, schedule__step_size=0.3,
                     schedule__step_epochs=1.5, train__dense_epochs=2, train__finetune_epochs=1,
                     schedule__criterion=criterion)
    cache = DenseCache(tmp_path / "cache")
    full = run_trial(spec.validate(digits_raw(**overrides)), tmp_path / "full", cache=cache)

    saved = {}
    first = Trial(spec.validate(digits_raw(**overrides)))

    def report(metrics, epoch):
        if first.can_checkpoint and epoch == 3:
            first.save_checkpoint(tmp_path / "ckpt.pt")
            saved["epoch"] = epoch
            raise KeyboardInterrupt  # the driver is killed here
    first.report = report
    with pytest.raises(KeyboardInterrupt):
        first.run(tmp_path / "first", cache)
    assert saved["epoch"] == 3

    reported = []
    resumed = Trial(spec.validate(digits_raw(**overrides)), lambda m, e: reported.append(e))
    result = resumed.run(tmp_path / "resumed", cache, resume_from=tmp_path / "ckpt.pt")
    # the saved history is reported again first (a receiver skips what it holds), then training goes on
    assert reported == [h["epoch"] for h in full.history]
    assert [h["epoch"] for h in result.history] == [h["epoch"] for h in full.history]
    for key in ("test_acc", "test_loss", "sparsity", "nonzero_params"):
        assert result.metrics[key] == pytest.approx(full.metrics[key], rel=1e-5), key
    if criterion == "l1_filter":
        assert result.metrics["channel_sparsity"] == full.metrics["channel_sparsity"] > 0.5
