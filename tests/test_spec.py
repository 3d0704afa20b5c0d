"""Spec loading and validation: every kind of bad input is one clear UserError naming the key
or file; defaults live in one place; the hash is stable."""

import textwrap
from pathlib import Path

import pytest

from prunetune import spec
from prunetune.errors import UserError

from conftest import REPO


def write(tmp_path: Path, text: str, name="spec.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def error_of(tmp_path, text, sets=(), for_trial=False) -> str:
    with pytest.raises(UserError) as exc:
        spec.load(write(tmp_path, text), list(sets), for_trial=for_trial)
    return str(exc.value)


@pytest.mark.parametrize("text,needles", [
    ("name: a\nschedul: {}\n", ["schedul", "unknown key", "schedule"]),
    ("name: a\nschedule: {sparsty: 0.5}\n", ["schedule.sparsty", "unknown key", "sparsity"]),
    ("name: a\ntrain: {lr: fast}\n", ["train.lr", "number"]),
    ("name: a\ntrain: {batch_size: '64'}\n", ["train.batch_size", "integer"]),
    ("name: a\nschedule: {sparsity: 1.0}\n", ["schedule.sparsity", "less than 1"]),
    ("name: a\nschedule: {step_size: 0}\n", ["schedule.step_size", "greater than 0"]),
    ("name: a\ntrain: {dense_epochs: -1}\n", ["train.dense_epochs", "greater than or equal to 0"]),
    ("name: a\nmodel: {arch: vgg19}\n", ["model.arch", "vgg19", "vgg16", "densenet169", "simple_cnn"]),
    ("name: a\ndata: {dataset: mnist}\n", ["data.dataset", "mnist", "digits", "cifar100"]),
    ("name: a\nschedule: {method: magic}\n", ["schedule.method", "magic", "iterative", "lottery"]),
    ("name: a\nschedule: {criterion: l3}\n", ["schedule.criterion", "l1_unstructured", "random"]),
    ("name: a\nsearch: {objectives: [{metric: accuracy, mode: max}]}\n", ["objectives", "test_acc"]),
    ("name: a\nschedule: {sparsity: {uniform: [0.5]}}\n", ["schedule.sparsity", "[lo, hi]"]),
    ("name: a\nschedule: {sparsity: {uniform: [0.9, 0.5]}}\n", ["schedule.sparsity", "lo < hi"]),
    ("name: a\nschedule: {sparsity: {between: [0.1, 0.5]}}\n", ["schedule.sparsity"]),
    ("name: a\nschedule: {sparsity: {choice: []}}\n", ["schedule.sparsity", "non-empty"]),
    ("name: a\ntrain: {lr: {loguniform: [0, 0.1]}}\n", ["train.lr", "lo > 0"]),
    ("name: a\nschedule: {rewind_epoch: {int: [0.5, 2]}}\n", ["schedule.rewind_epoch", "integer"]),
    ("name: a\nschedule: {sparsity: {uniform: [0.5, 1.5]}}\n", ["schedule.sparsity", "1.5"]),
    ("name: a\nsearch: {num_trials: {int: [1, 4]}}\n", ["search.num_trials", "only under"]),
    ("name: a\nschedule: {method: oneshot, step_size: {choice: [0.1, 0.2]}}\n",
     ["schedule.step_size", "never uses it"]),
    ("name: a\ntrain: {dense_epochs: 2}\nschedule: {method: lottery, rewind_epoch: 3}\n",
     ["rewind_epoch", "dense_epochs"]),
    ("name: a\ntrain: {dense_epochs: 2}\n"
     "schedule: {method: {choice: [oneshot, lottery]}, rewind_epoch: {int: [0, 3]}}\n",
     ["rewind_epoch", "searched value 3"]),
    ("name: a\nschedule: {layers: 'first:x'}\n", ["schedule.layers", "first:K"]),
    ("name: a\ndata: {val_fraction: 0.5, test_fraction: 0.5}\n", ["below 1"]),
    ("seed: 1\n", ["name", "required"]),
    ("name: a\ndistill: {teacher: 1234}\n", ["distill.teacher", "quote a run id"]),
    ("name: a\ndistill: {teacher: abc, alpha: 2}\n", ["distill.alpha"]),
    ("name: a\ndistill: {temperature: 2}\n", ["distill.teacher", "required"]),
    ("name: a\nschedule: {remove: true}\n", ["schedule.remove", "l1_filter"]),
    ("name: a\nschedule: {method: ist, criterion: l2_filter}\n", ["schedule.method ist", "cannot"]),
    ("name: a\nschedule: {criterion: l1_filter}\nsearch: {objectives: [{metric: measured_speedup, mode: max}]}\n",
     ["search.objectives", "measured_speedup", "schedule.remove"]),
    ("name: a\nsearch: {objectives: [{metric: teacher_test_acc, mode: max}]}\n", ["teacher_test_acc", "distill"]),
    ("name: a\nschedule: {criterion: l1_nm, sparsity: 0.7}\n", ["schedule.sparsity", "1 − N/M = 0.5", "l1_nm"]),
    ("name: a\nschedule: {criterion: l1_nm, sparsity: 0.5, mask_control: shuffle}\n",
     ["schedule.mask_control", "l1_nm"]),
    ("name: a\nsearch: {objectives: [{metric: nm_valid, mode: max}]}\n", ["nm_valid", "l1_nm"]),
    # the default objective, val_acc, on data that has no validation split
    ("name: a\ndata: {val_fraction: 0}\n", ["search.objectives", "val_acc", "data.val_fraction"]),
    ("name: a\ndata: {dataset: cifar10, val_fraction: 0}\n", ["search.objectives", "val_acc", "data.val_fraction"]),
    ("name: a\ndata: {val_fraction: {choice: [0, 0.1]}}\n", ["search.objectives", "val_acc", "data.val_fraction"]),
    ("name: a\ndata: {dataset: imagefolder, root: nowhere, val_fraction: 0}\n", ["val_acc", "imagefolder with a val/"]),
])
def test_bad_spec_is_one_clear_error(tmp_path, text, needles):
    message = error_of(tmp_path, text)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)


def test_an_nm_criterion_may_remove(tmp_path):
    """schedule.remove needs a criterion whose pruning has a shape to export: structured
    (channels) or N:M (the semi-structured model); l1_nm qualifies, l1_unstructured does not."""
    loaded = spec.load(write(tmp_path, "name: a\nschedule: {criterion: l1_nm, sparsity: 0.5, remove: true}\n"))
    assert loaded.fixed_spec().schedule.remove is True
    assert "schedule.remove" in error_of(tmp_path, "name: a\nschedule: {criterion: l1_unstructured, remove: true}\n")


def test_val_acc_objective_needs_a_validation_split_that_exists(tmp_path):
    """val_fraction 0 is fine where the dataset publishes a val split, or where the objective is
    not val_acc."""
    (tmp_path / "images" / "val").mkdir(parents=True)
    for data in ("{dataset: medmnist, root: x.npz, val_fraction: 0}",
                 f"{{dataset: imagefolder, root: {tmp_path / 'images'}, val_fraction: 0}}",
                 "{val_fraction: {uniform: [0.05, 0.2]}}"):
        spec.load(write(tmp_path, f"name: a\ndata: {data}\n"))
    spec.load(write(tmp_path, "name: a\ndata: {val_fraction: 0}\n"
                              "search: {objectives: [{metric: test_acc, mode: max}]}\n"))


def test_yaml_syntax_error_names_the_line(tmp_path):
    message = error_of(tmp_path, "name: a\nschedule:\n  sparsity: [0.5\n  method: x\n")
    assert "spec.yaml" in message and "line" in message and "YAML" in message


def test_empty_file(tmp_path):
    assert "empty" in error_of(tmp_path, "")


def test_not_a_mapping(tmp_path):
    assert "mapping" in error_of(tmp_path, "- a\n- b\n")


def test_missing_spec_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        spec.load(tmp_path / "nope.yaml")


def test_missing_base_file(tmp_path):
    message = error_of(tmp_path, "base: ../conf/nothing.yaml\nname: a\n")
    assert "base file ../conf/nothing.yaml not found" in message


def test_base_deep_merge_and_set(tmp_path):
    (tmp_path / "conf").mkdir()
    write(tmp_path / "conf", "train: {lr: 0.1, momentum: 0.5}\nschedule: {sparsity: 0.3}\n", "recipe.yaml")
    (tmp_path / "sweeps").mkdir()
    p = write(tmp_path / "sweeps", "base: ../conf/recipe.yaml\nname: a\ntrain: {momentum: 0.8}\n")
    loaded = spec.load(p, ["schedule.sparsity=0.9", "train.optimizer=adam"])
    s = loaded.fixed_spec()
    assert (s.train.lr, s.train.momentum, s.train.optimizer, s.schedule.sparsity) == (0.1, 0.8, "adam", 0.9)


def test_base_cycle(tmp_path):
    write(tmp_path, "base: b.yaml\nname: a\n", "a.yaml")
    write(tmp_path, "base: a.yaml\n", "b.yaml")
    with pytest.raises(UserError, match="cycle"):
        spec.load(tmp_path / "a.yaml")


def test_set_errors(tmp_path):
    p = write(tmp_path, "name: a\n")
    with pytest.raises(UserError, match="KEY=VALUE"):
        spec.load(p, ["schedule.sparsity"])
    with pytest.raises(UserError, match="schedule.sparsity"):
        spec.load(p, ["schedule.sparsity=2"])
    loaded = spec.load(p, ["schedule.sparsity={uniform: [0.5, 0.9]}"])
    assert loaded.space["schedule.sparsity"].kind == "uniform"


def test_scientific_notation_is_a_float(tmp_path):
    assert spec.load(write(tmp_path, "name: a\ntrain: {lr: 1e-3}\n")).fixed_spec().train.lr == 1e-3


def test_search_space_parsed(tmp_path):
    loaded = spec.load(write(tmp_path, """
        name: a
        schedule:
          method: {choice: [oneshot, iterative, lottery]}
          sparsity: {uniform: [0.5, 0.95]}
          step_size: {choice: [0.1, 0.2]}
          rewind_epoch: {int: [0, 3], step: 1}
        train: {lr: {loguniform: [1.0e-3, 1.0e-1]}}
        """))
    assert set(loaded.space) == {"schedule.method", "schedule.sparsity", "schedule.step_size",
                                 "schedule.rewind_epoch", "train.lr"}
    assert loaded.space["schedule.rewind_epoch"] == spec.SearchEntry("int", (0, 3), 1)
    resolved = loaded.resolve({"schedule.method": "oneshot", "schedule.sparsity": 0.7, "train.lr": 0.01})
    assert resolved.schedule.sparsity == 0.7
    assert resolved.schedule.step_size == spec.ScheduleSpec().step_size  # unsampled: default


def test_trial_spec_needs_active_searched_keys_fixed(tmp_path):
    p = write(tmp_path, """
        name: a
        schedule:
          method: {choice: [oneshot, lottery]}
          sparsity: {uniform: [0.5, 0.9]}
          rewind_epoch: {int: [0, 2]}
        """)
    with pytest.raises(UserError) as exc:
        spec.load(p, for_trial=True).trial_spec()
    assert "schedule.method" in str(exc.value) and "--set" in str(exc.value)
    # with the method fixed to oneshot, rewind_epoch is not needed, sparsity still is
    with pytest.raises(UserError) as exc:
        spec.load(p, ["schedule.method=oneshot"], for_trial=True).trial_spec()
    assert "schedule.sparsity" in str(exc.value) and "rewind_epoch" not in str(exc.value)
    s = spec.load(p, ["schedule.method=oneshot", "schedule.sparsity=0.6"], for_trial=True).trial_spec()
    assert (s.schedule.method, s.schedule.sparsity) == ("oneshot", 0.6)


def test_defaults_file_matches_the_schema():
    text = (REPO / "conf" / "defaults.yaml").read_text()
    body = "\n".join(line for line in text.splitlines() if not line.startswith("#")) + "\n"
    assert body == spec.defaults_yaml(), "regenerate conf/defaults.yaml from prunetune.spec.defaults_yaml()"


def test_hash_is_stable_and_content_addressed():
    a = spec.validate({"name": "a", "schedule": {"sparsity": 0.5}})
    b = spec.validate({"name": "b", "schedule": {"sparsity": 0.5}, "tracking": {"uri": "sqlite:///x.db"}})
    c = spec.validate({"name": "a", "schedule": {"sparsity": 0.6}})
    assert a.config_hash() == b.config_hash() != c.config_hash()
    assert a.dense_hash() == c.dense_hash()  # the schedule does not change the dense phase
    d = spec.validate({"name": "a", "train": {"finetune_epochs": 3}})
    assert d.dense_hash() == a.dense_hash() and d.config_hash() != a.config_hash()
    e = spec.validate({"name": "a", "seed": 1})
    assert e.dense_hash() != a.dense_hash()
    assert len(a.config_hash()) == 16
    assert a.config_hash() == spec.validate({"name": "a", "schedule": {"sparsity": 0.5}}).config_hash()


def test_flat_params_are_dotted():
    flat = spec.validate({"name": "a"}).flat()
    assert flat["schedule.method"] == "oneshot" and flat["train.lr"] == 0.01
    assert "analysis.cka.top" in flat


@pytest.mark.parametrize("path", sorted((REPO / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_specs_validate(path):
    spec.load(path)


def test_search_checks(tmp_path):
    from prunetune import search
    grid = spec.load(write(tmp_path, """
        name: a
        schedule: {method: {choice: [oneshot, iterative]}, step_size: {choice: [0.1, 0.2]}}
        search: {sampler: grid, num_trials: 5}
        """))
    with pytest.raises(UserError, match="4 points .3 distinct"):
        search.check(grid)
    ranged = spec.load(write(tmp_path, "name: a\nschedule: {sparsity: {uniform: [0.5, 0.9]}}\n"
                                       "search: {sampler: grid}\n"))
    with pytest.raises(UserError, match="grid searches choice entries only"):
        search.check(ranged)


def test_define_by_run_is_conditional(tmp_path):
    import optuna

    from prunetune import search
    loaded = spec.load(write(tmp_path, """
        name: a
        schedule:
          method: {choice: [oneshot, iterative, lottery]}
          sparsity: {uniform: [0.5, 0.9]}
          step_size: {choice: [0.1, 0.2]}
          rewind_epoch: {int: [0, 2]}
          layers: {choice: [all, [features.*]]}
        """))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: search.DefineByRun(loaded)(t) or 0.0, n_trials=30)
    for t in study.trials:
        method = t.params["schedule.method"]
        assert ("schedule.step_size" in t.params) == (method in ("iterative", "lottery"))
        assert ("schedule.rewind_epoch" in t.params) == (method == "lottery")
        resolved = loaded.resolve(search.decode(loaded, t.params))  # lists of globs round-trip
        assert resolved.schedule.layers in ("all", ["features.*"])
    assert {t.params["schedule.method"] for t in study.trials} == {"oneshot", "iterative", "lottery"}


def test_the_clis_tracking_options_apply_at_load(tmp_path, monkeypatch):
    """Where runs go, first match wins: --tracking-uri, the spec's own tracking.uri (its file or
    --set), $MLFLOW_TRACKING_URI (with a note, its credentials left out), the default; --storage
    over tracking.storage; the fixed spec is resolved once per load."""
    p = write(tmp_path, "name: a\ntracking: {uri: 'sqlite:///spec.db', storage: spec-state}\n")
    bare = write(tmp_path, "name: b\n", "bare.yaml")
    default = spec.load(bare).fixed_spec().tracking.uri
    assert spec.load(p).fixed_spec().tracking.uri == "sqlite:///spec.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://alice:s3cret@mlflow.example.org")
    assert spec.load(p).fixed_spec().tracking.uri == "sqlite:///spec.db" and spec.load(p).notes == ()
    assert spec.load(bare, ["tracking.uri=sqlite:///set.db"]).fixed_spec().tracking.uri == "sqlite:///set.db"
    from_env = spec.load(bare)
    assert from_env.fixed_spec().tracking.uri == "https://alice:s3cret@mlflow.example.org" != default
    assert from_env.notes == ("tracking: runs go to $MLFLOW_TRACKING_URI (https://mlflow.example.org); "
                              "the spec sets no tracking.uri",)
    loaded = spec.load(p, tracking_uri="sqlite:///cli.db", storage="cli-state")
    assert (loaded.fixed_spec().tracking.uri, loaded.fixed_spec().tracking.storage) == ("sqlite:///cli.db", "cli-state")
    assert loaded.fixed_spec() is loaded.fixed_spec()
