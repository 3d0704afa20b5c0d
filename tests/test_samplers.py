"""Every sampler the spec accepts (`registry.SAMPLERS`, so a sampler added there is covered here
without edits) survives Tune's pickling of its searcher, whatever the Optuna release, and goes on
from the stored study; a sampler that cannot run here is one line naming search.sampler. Real
Optuna and Tune's real OptunaSearch (no Ray cluster); the sweeps themselves are in
test_sweep.py's contract tests."""

from __future__ import annotations

import pickle
import subprocess
import sys

import optuna
import pytest

from prunetune import registry, samplers, spec
from prunetune.errors import UserError
from prunetune.sweep.protocol import FINAL_FLAG

from conftest import digits_raw, error_lines

GRIDDABLE = {"schedule__method": {"choice": ["oneshot", "iterative"]},
             "schedule__sparsity": {"choice": [0.5, 0.7, 0.9]}, "schedule__step_size": {"choice": [0.2, 0.3]}}


def _loaded(sampler: str, **overrides):
    return spec.load(None, raw=digits_raw(search__sampler=sampler, search__num_trials=8, **{**GRIDDABLE, **overrides}))


def _searcher(loaded, storage):
    from prunetune.sweep.searcher import make_searcher

    return make_searcher(loaded, [("val_acc", "max")], seed=0, study_name="s", storage=storage)


def _run(searcher, ids, value=lambda config: 0.5):
    for trial_id in ids:
        config = searcher.suggest(trial_id)
        assert config and "schedule.method" in config
        searcher.on_trial_complete(trial_id, {"val_acc": value(config), FINAL_FLAG: True})


def _stores(tmp_path):
    return {"memory": None, "rdb": optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/optuna.db")}


@pytest.mark.parametrize("store", ["memory", "rdb"])
@pytest.mark.parametrize("name", sorted(registry.SAMPLERS))
def test_every_sampler_pickles_as_tune_pickles_it_and_goes_on_after(tmp_path, name, store):
    loaded = _loaded(name)
    searcher = _searcher(loaded, _stores(tmp_path)[store])
    _run(searcher, ["a", "b"])
    blob = pickle.dumps(searcher)  # Tune's Tuner state holds the searcher pickled
    searcher.save(str(tmp_path / "searcher.pkl"))  # and its experiment checkpoint, through save()
    for restored in (pickle.loads(blob), _searcher(loaded, _stores(tmp_path)[store])):
        if restored._ot_study.get_trials(deepcopy=False) == []:  # the new searcher of a resumed sweep
            restored.restore(str(tmp_path / "searcher.pkl"))
        study = restored._ot_study
        held = len(study.get_trials(deepcopy=False))
        assert held >= 2  # the history came along
        _run(restored, ["c", "d"])
        assert [t.state for t in study.get_trials(deepcopy=False)] == [optuna.trial.TrialState.COMPLETE] * (held + 2)
        assert len({tuple(sorted(t.params.items())) for t in study.get_trials(deepcopy=False)}) >= 2
        pickle.dumps(restored)  # and again, after it sampled


def test_a_rebuilt_nsga2_continues_its_population_from_the_stored_trials(tmp_path):
    """NSGA-II's generations are read from the stored trials: a sampler rebuilt after 55 trials
    (population 50) samples generation 1, not generation 0 again."""
    loaded = _loaded("nsga2", schedule__sparsity={"uniform": [0.5, 0.9]})
    searcher = _searcher(loaded, _stores(tmp_path)["rdb"])
    _run(searcher, [f"t{i}" for i in range(55)], value=lambda config: config["schedule.sparsity"])
    restored = pickle.loads(pickle.dumps(searcher))
    assert restored._sampler._sampler is None  # Optuna's object was not pickled: it is built again
    _run(restored, [f"t{i}" for i in range(55, 60)], value=lambda config: config["schedule.sparsity"])

    def generation(t):
        [value] = [v for k, v in t.system_attrs.items() if k.endswith(":generation")]
        return value

    trials = restored._ot_study.get_trials(deepcopy=False)
    assert [generation(t) for t in trials[50:]] == [1] * 10
    # the second generation's children come from the first's parents: high sparsity was rewarded
    assert sum(t.params["schedule.sparsity"] for t in trials[55:]) / 5 > 0.7


def test_a_rebuilt_sampler_does_not_replay_the_draws_it_started_with(tmp_path):
    loaded = _loaded("random", schedule__sparsity={"uniform": [0.5, 0.9]})
    first = _searcher(loaded, None)
    _run(first, ["a", "b", "c"])
    restored = pickle.loads(pickle.dumps(first))
    _run(restored, ["d", "e", "f"])
    values = [t.params["schedule.sparsity"] for t in restored._ot_study.get_trials(deepcopy=False)]
    assert len(set(values)) == 6


def test_a_two_objective_sweep_with_a_one_objective_sampler_is_refused():
    loaded = spec.load(None, raw=digits_raw(search__sampler="cmaes", search__objectives=[
        {"metric": "val_acc", "mode": "max"}, {"metric": "nonzero_params", "mode": "min"}]))
    with pytest.raises(UserError, match=r"^search.sampler: cmaes optimises one objective"):
        samplers.check(loaded)


def test_an_unknown_sampler_names_the_key_and_the_choices(tmp_path):
    with pytest.raises(UserError, match=r"search.sampler.*unknown name 'bayes'.*cmaes, grid, nsga2, random, tpe"):
        spec.load(None, raw=digits_raw(search__sampler="bayes")).fixed_spec()


def test_a_sampler_whose_package_is_missing_exits_2_in_one_line(tmp_path):
    """`cmaes` needs the cmaes package: where it cannot be imported (blocked in this subprocess,
    as on a machine without it) the sweep exits 2, one line naming search.sampler, and writes
    nothing."""
    spec_path = tmp_path / "s.yaml"
    spec_path.write_text("name: s\ndata: {dataset: digits, image_size: 8}\nsearch: {sampler: cmaes, num_trials: 2}\n")
    code = ("import sys; sys.modules['cmaes'] = None\n"  # what `import cmaes` meets where it is absent
            "from prunetune.cli import main\n"
            f"sys.argv = ['prunetune', 'sweep', {str(spec_path)!r}]\nmain()")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: search.sampler: cmaes needs the package 'cmaes'"), lines
    assert "Traceback" not in r.stderr and not (tmp_path / "mlruns").exists()
