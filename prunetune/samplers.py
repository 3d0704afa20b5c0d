"""The samplers a spec names (`search.sampler`, registered in `registry.SAMPLERS`), built from the
spec and its seed, and `Rebuilt`, the one sampler Tune holds.

Tune pickles its searcher, and with it the sampler, into the sweep's state. Whether an Optuna
sampler pickles is Optuna's business and changes between releases: Optuna 5.1's NSGAIISampler
holds a thread lock and does not. So Tune never sees Optuna's object: `Rebuilt` pickles as its
recipe (the spec and the seed) and builds the sampler again when it is next used. Everything a
sampler learns from the past it reads from the study's trials each time it samples (TPE's
observations, NSGA-II's generations and population, the grid's visited points, CMA-ES's state in
the trials' system attributes), and the study is stored; only its random state is new, drawn
from the seed and the number of trials the study holds then, so a resumed sweep does not replay
the draws it started with.

Imported only where a sweep builds its searcher (optuna is imported here, at the top).
"""

from __future__ import annotations

import importlib

import numpy as np
import optuna

from prunetune import registry, search
from prunetune.errors import UserError
from prunetune.spec import LoadedSpec


def tpe(loaded: LoadedSpec, seed: int):
    num_trials = loaded.fixed_spec().search.num_trials
    # group=True lets multivariate TPE model a conditional (method-dependent) space
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True,
                                      n_startup_trials=min(10, max(2, num_trials // 3)))


def nsga2(loaded: LoadedSpec, seed: int):
    return optuna.samplers.NSGAIISampler(seed=seed)


def random(loaded: LoadedSpec, seed: int):
    return optuna.samplers.RandomSampler(seed=seed)


def grid(loaded: LoadedSpec, seed: int):
    return optuna.samplers.GridSampler(search.grid(loaded), seed=seed)


def cmaes(loaded: LoadedSpec, seed: int):
    # CMA-ES models the numeric keys; a categorical one (the method) is sampled independently
    return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)


def build(loaded: LoadedSpec, seed: int):
    """The Optuna sampler `search.sampler` names, seeded."""
    name = loaded.fixed_spec().search.sampler
    return registry.lookup(registry.SAMPLERS, name)(loaded, seed)


def check(loaded: LoadedSpec) -> None:
    """Whether the spec's sampler can run here: the packages it needs import, and it can be built
    (UserError naming search.sampler otherwise)."""
    search_spec = loaded.fixed_spec().search
    entry = registry.SAMPLERS[search_spec.sampler]
    for package in entry.needs:
        try:
            importlib.import_module(package)
        except ImportError:
            raise UserError(f"search.sampler: {search_spec.sampler} needs the package {package!r}, which is not "
                            f"installed here (pip install {package}); or choose one of "
                            f"{', '.join(n for n, s in registry.SAMPLERS.items() if not s.needs)}") from None
    if not entry.multi_objective and len(search_spec.objectives) > 1:
        raise UserError(f"search.sampler: {search_spec.sampler} optimises one objective and search.objectives has "
                        f"{len(search_spec.objectives)}; use nsga2, tpe, random or grid for a Pareto front")
    build(loaded, 0)


class Rebuilt(optuna.samplers.BaseSampler):
    """The spec's sampler, pickled as its recipe (see the module's text)."""

    def __init__(self, loaded: LoadedSpec, seed: int):
        self._loaded, self._seed = loaded, seed
        self._sampler = build(loaded, seed)

    def __getstate__(self) -> dict:
        return {"_loaded": self._loaded, "_seed": self._seed}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._sampler = None  # built on first use, when the study says how many trials it holds

    def _of(self, study):
        if self._sampler is None:
            held = len(study.get_trials(deepcopy=False))
            self._sampler = build(self._loaded, int(np.random.SeedSequence([self._seed, held]).generate_state(1)[0]))
        return self._sampler

    def __str__(self) -> str:
        return f"Rebuilt({self._loaded.fixed_spec().search.sampler})"

    def infer_relative_search_space(self, study, trial):
        return self._of(study).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._of(study).sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._of(study).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial) -> None:
        self._of(study).before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        self._of(study).after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        if self._sampler is not None:
            self._sampler.reseed_rng()
