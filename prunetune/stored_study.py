"""The sweep's Optuna study, stored: where (an RDB beside the tracking store: Optuna calls it the
study's "storage", not to be confused with `tracking.storage`, the sweep's state), starting it
over, closing what a killed driver left open, and what Optuna knows about it (parameter
importances, the Pareto front) for the report. (Sampling the spec's space is `search.py`.)

Ray Tune's OptunaSearch asks and tells through this RDB, so `optuna.load_study(study_name=
<sweep name>, storage=<url>)` and `optuna-dashboard <url>` open the sweep's study, and a resumed
sweep continues the same study."""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def study_url(tracking_uri: str) -> str | None:
    """The RDB URL where the sweep's study is stored: `$PRUNETUNE_OPTUNA_STORAGE` (any Optuna RDB
    URL, e.g. a PostgreSQL the cluster shares) when set, else beside a SQLite tracking store
    (`…/mlflow.db` → `…/optuna.db`). With an MLflow server and no such URL: None, and the study
    stays in memory, saved with the sweep's state (it resumes; nothing is written to the driver's
    disk)."""
    if os.environ.get("PRUNETUNE_OPTUNA_STORAGE"):
        return os.environ["PRUNETUNE_OPTUNA_STORAGE"]
    if tracking_uri.startswith("sqlite:///"):
        return f"sqlite:///{Path(tracking_uri[len('sqlite:///'):]).with_name('optuna.db')}"
    return None


def _optuna():
    """optuna, imported on first use (its log lines go where prunetune puts library logs)."""
    import optuna

    return optuna


def rdb_storage(url: str | None):
    """Optuna's RDB storage at `url` (the file and its tables made on first use); None: Optuna's
    in-memory one."""
    if url is None:
        return None
    optuna = _optuna()
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.RDBStorage(url)


def _rdb_holding(url: str | None, name: str):
    """The RDB storage that holds study `name`, or None (no URL, no file yet, or no such study).
    Made once per call: each RDBStorage checks its schema when it is made."""
    if url is None:
        return None
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).is_file():
        return None
    store = rdb_storage(url)
    return store if any(s.study_name == name for s in _optuna().get_all_study_summaries(store)) else None


def delete(url: str | None, name: str) -> bool:
    """Delete a study (a sweep started over, or a new sweep of a name whose state is gone);
    whether there was one."""
    store = _rdb_holding(url, name)
    if store is not None:
        _optuna().delete_study(study_name=name, storage=store)
    return store is not None


def fail_unfinished(url: str | None, name: str) -> int:
    """Mark FAIL the study's trials still RUNNING once the sweep has ended (asked by a driver
    that was killed before it could tell); returns how many."""
    store = _rdb_holding(url, name)
    if store is None:
        return 0
    optuna = _optuna()
    study = optuna.load_study(study_name=name, storage=store)
    stale = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    for t in stale:
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)  # by number: public API, no storage ids
    return len(stale)


def load(url: str | None, name: str):
    """The sweep's study, or None (a sweep from before studies were stored)."""
    store = _rdb_holding(url, name)
    return None if store is None else _optuna().load_study(study_name=name, storage=store)


def importances(study, objectives: list[str]):
    """Optuna's parameter importances (its default evaluator, fANOVA) for each objective: rows
    (objective, param, importance). Empty where fewer than two trials completed or no searched
    param varied."""
    import warnings

    import pandas as pd

    optuna = _optuna()
    rows = []
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(done) < 2:
        return pd.DataFrame(columns=["objective", "param", "importance"])
    for i, name in enumerate(objectives):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ExperimentalWarning and friends
            try:
                values = optuna.importance.get_param_importances(
                    study, target=(lambda t, i=i: t.values[i]))
            except (RuntimeError, ValueError) as exc:  # nothing varied, or too few distinct values
                log.info("no parameter importances for %s: %s", name, exc)
                continue
        rows += [{"objective": name, "param": p, "importance": float(v)} for p, v in values.items()]
    return pd.DataFrame(rows, columns=["objective", "param", "importance"])


def pareto_front(study, objectives: list[str]):
    """The study's best trials (its Pareto front with several objectives): number, params, values."""
    import pandas as pd

    rows = [{"trial": t.number, **{f"param:{k}": v for k, v in t.params.items()},
             **dict(zip(objectives, t.values))} for t in study.best_trials]
    return pd.DataFrame(rows)
