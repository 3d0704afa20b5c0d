"""Tune's searcher: Optuna (through Tune's OptunaSearch) proposing configurations of the spec's
space, told each trial's final metrics, with each configuration run as several seed replicates
when asked (their mean is what Optuna is told).

What an Optuna user sees of the sweep's study: its objectives by name (`set_metric_names`), and
on each Optuna trial the user attributes `trial_id` (Tune's trial) and `mlflow_run_id` (the
trial's MLflow run, set once the store has made it, while the trial runs), so `optuna-dashboard`
leads from a trial to its run. With replicates, these name the first replicate.

Tune pickles this searcher with the sweep's state; its sampler is a `samplers.Rebuilt`, which
pickles whatever the Optuna release (see `samplers.py`)."""

from __future__ import annotations

import os
import pickle

import numpy as np
from ray.tune.search import Repeater
from ray.tune.search.optuna import OptunaSearch

from prunetune import samplers, search
from prunetune.spec import LoadedSpec
from prunetune.sweep import _compat
from prunetune.sweep.mlflow_logger import run_id_of
from prunetune.sweep.protocol import FINAL_FLAG, failed, succeeded

TRIAL_ATTR, RUN_ATTR = "trial_id", "mlflow_run_id"  # the Optuna trials' user attributes


class _OptunaSearch(OptunaSearch):
    def __init__(self, *args, sweep: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self.sweep = sweep
        self._linked: set[str] = set()  # trials whose MLflow run id Optuna has

    def suggest(self, trial_id):
        config = super().suggest(trial_id)
        ot_trial = _compat.optuna_trial(self, trial_id)
        if ot_trial is not None:
            ot_trial.set_user_attr(TRIAL_ATTR, trial_id)
        return config

    def _link(self, trial_id: str) -> None:
        """Give the Optuna trial its MLflow run id, once the tracking writer has made the run."""
        if trial_id in self._linked:
            return
        run_id = run_id_of(self.sweep, trial_id)
        ot_trial = _compat.optuna_trial(self, trial_id)
        if run_id is not None and ot_trial is not None:
            ot_trial.set_user_attr(RUN_ATTR, run_id)
            self._linked.add(trial_id)

    def on_trial_result(self, trial_id, result):
        self._link(trial_id)
        super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id, result=None, error=False):
        self._link(trial_id)
        # A trial stopped early (ASHA) has no final metrics: it is PRUNED in Optuna; one that
        # failed by its own error is FAIL.
        error = error or failed(result)
        if not succeeded(result):
            result = None
        super().on_trial_complete(trial_id, result, error)


def make_searcher(loaded: LoadedSpec, objectives: list[tuple[str, str]], seed: int, replicates: int = 1,
                  study_name: str | None = None, storage=None, user_attrs: dict | None = None):
    """Tune's searcher: Optuna sampling the spec's space (`search.DefineByRun`) into the study in
    `storage` (Optuna's RDB storage, or None: in memory), each configuration run `replicates`
    times; `user_attrs` are set on the study (where its MLflow runs are)."""
    # Objectives are always given as a list: OptunaSearch then reads them only from a trial's
    # last result (our final report), not from every per-epoch report.
    optuna_search = _OptunaSearch(space=search.DefineByRun(loaded), metric=[m for m, _ in objectives],
                                  mode=[d for _, d in objectives], sampler=samplers.Rebuilt(loaded, seed),
                                  study_name=study_name, storage=storage, sweep=study_name or "")
    study = _compat.optuna_study(optuna_search)
    study.set_metric_names([m for m, _ in objectives])
    for key, value in (user_attrs or {}).items():
        study.set_user_attr(key, value)
    return optuna_search if replicates == 1 else _Replicates(optuna_search, replicates)


class _Replicates(Repeater):
    """Each configuration Optuna samples runs as `repeat` Tune trials (config[REPLICATE] = 0..R-1,
    seed + index); Optuna is told the mean of each objective once all of them have ended.
    Ray's Repeater averages one metric and forgets its groups on restore: this one averages
    every objective, treats a replicate without final metrics (failed, stopped early) as absent,
    and saves its groups beside the searcher's state so a resumed sweep completes them."""

    def __init__(self, searcher, repeat: int):
        super().__init__(searcher, repeat)
        self._finals: dict[str, dict[str, dict | None]] = {}  # primary trial id → replicate → final result
        self._errors: set[str] = set()  # replicates that failed

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False, **kwargs):
        primary, replicates = _compat.replicate_group(self, trial_id)
        done = self._finals.setdefault(primary, {})
        done[trial_id] = result if succeeded(result) else None
        if error or failed(result):
            self._errors.add(trial_id)
        if len(done) < replicates:
            return
        finals = [r for r in done.values() if r is not None]
        if not finals:
            self.searcher.on_trial_complete(primary, None, error=bool(set(done) & self._errors))
            return
        mean = {m: float(np.mean([r[m] for r in finals])) for m in self.searcher.metric}
        self.searcher.on_trial_complete(primary, {**mean, FINAL_FLAG: True})

    def save(self, checkpoint_path: str):
        self.searcher.save(checkpoint_path)
        with open(checkpoint_path + ".replicates", "wb") as f:
            pickle.dump(self.get_state(), f)

    def restore(self, checkpoint_path: str):
        self.searcher.restore(checkpoint_path)
        if os.path.exists(checkpoint_path + ".replicates"):
            with open(checkpoint_path + ".replicates", "rb") as f:
                self.set_state(pickle.load(f))
