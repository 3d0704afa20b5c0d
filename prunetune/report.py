"""The report's files, from a DataFrame of a sweep's trials: the results table, the summary
(objectives by method × sparsity, mean ± std with n), the figures, and Optuna's importances.
Pure pandas + matplotlib: it reads no store. `commands.report` reads the runs back from MLflow
and the study from Optuna, calls this, and logs the files to the sweep's parent run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from prunetune.figures import pyplot
from prunetune.metrics import LABELS
from prunetune.pruning import schedules
from prunetune.tracking import TAG_REPLICATE, TAG_STATE, TAG_TRIAL_ID

METHOD, SPARSITY, LAYERS, SEED = "schedule.method", "schedule.sparsity", "schedule.layers", "seed"
DENSE = "dense_test_acc"  # the unpruned reference (the shared dense phase's checkpoint on the test split)
EPOCHS = "train_epochs_total"


def label(metric: str) -> str:
    return LABELS.get(metric, metric)


# -- the table ------------------------------------------------------------------------------------

def runs_frame(runs) -> pd.DataFrame:
    """One row per trial run (`tracking.RunRecord`): run_id, trial_id, state, the dotted params (numbers where they
    parse) and the final metrics (last value)."""
    rows = []
    for r in runs:
        state = r.tags.get(TAG_STATE) or r.status
        rows.append({"run_id": r.run_id, "trial_id": r.tags.get(TAG_TRIAL_ID, ""),
                     "state": state, "replicate": int(r.tags.get(TAG_REPLICATE, 0)),
                     **{f"param:{k}": v for k, v in r.params.items()}, **r.metrics})
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    params = [c for c in df.columns if c.startswith("param:")]
    for c in params:
        numeric = pd.to_numeric(df[c], errors="coerce")
        if numeric.notna().sum() == df[c].notna().sum():  # every value parses: a number column
            df[c] = numeric
    df = df.rename(columns={c: c[len("param:"):] for c in params})
    # params first (sorted), then metrics (sorted), after the identifiers
    ids = ["run_id", "trial_id", "state", "replicate"]
    param_cols = sorted(c[len("param:"):] for c in params)
    metric_cols = sorted(c for c in df.columns if c not in ids and c not in param_cols)
    return df[ids + param_cols + metric_cols].sort_values("trial_id", kind="stable").reset_index(drop=True)


def finished(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["state"] == "FINISHED"] if not df.empty else df


RETRAIN = "schedule.retrain"


def with_variants(df: pd.DataFrame) -> pd.DataFrame:
    """The method column, with the retraining policy where the sweep varied it and the method
    uses it ("iterative · reinit"), so tables and figures keep the variants apart."""
    if df.empty or RETRAIN not in df.columns or df[RETRAIN].nunique() < 2:
        return df
    out = df.copy()
    out[METHOD] = [f"{m} · {r}" if m in schedules.METHODS and schedules.key_is_used(m, "retrain") else m
                   for m, r in zip(df[METHOD], df[RETRAIN])]
    return out


def summarize(df: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """Mean, std and n of `metrics` over the finished trials, by method × sparsity (sparsity
    rounded to 2 decimals, so a continuous search still groups). Replicates (seeds) of one
    setting fall into one group."""
    done = finished(with_variants(df)).copy()
    if done.empty:
        return pd.DataFrame()
    done[SPARSITY] = done[SPARSITY].astype(float).round(2)
    return done.groupby([METHOD, SPARSITY])[metrics].agg(["mean", "std", "count"])


def summary_markdown(summary: pd.DataFrame, metrics: list[str], title: str, df: pd.DataFrame) -> str:
    lines = [f"# {title}", ""]
    df = with_variants(df)
    done = finished(df)
    lines.append(f"{len(df)} trials: {len(done)} finished"
                 + "".join(f", {n} {s.lower()}" for s, n in df["state"].value_counts().items() if s != "FINISHED")
                 + ". Mean ± standard deviation over the finished trials of each method and sparsity "
                   "(n: trials behind the cell; std needs n ≥ 2).")
    epochs = _epochs_by_cell(done)
    if epochs:
        lines[-1] += " ep: the mean epochs trained, the dense phase's included (train_epochs_total)."
    lines.append("")
    if summary.empty:
        return "\n".join(lines + ["No finished trial."]) + "\n"
    for metric in metrics:
        table = summary[metric]
        sparsities = sorted(table.index.get_level_values(1).unique())
        methods = list(dict.fromkeys(table.index.get_level_values(0)))
        lines += [f"## {metric}", "", "| sparsity | " + " | ".join(methods) + " |",
                  "|---|" + "---|" * len(methods)]
        if metric == "test_acc" and DENSE in done.columns and done[DENSE].notna().any():
            # the unpruned reference: the dense phases behind each method's trials (one per seed)
            cells = []
            for m in methods:
                dense = _dense_values(done[done[METHOD] == m])
                std = f" ± {dense.std():.4f}" if len(dense) > 1 else ""
                cells.append(f"{dense.mean():.4f}{std} (n={len(dense)})" if len(dense) else "")
            lines.append("| dense (0%) | " + " | ".join(cells) + " |")
        for s in sparsities:
            cells = []
            for m in methods:
                if (m, s) not in table.index:
                    cells.append("")
                    continue
                row = table.loc[(m, s)]
                std = "" if pd.isna(row["std"]) else f" ± {row['std']:.4f}"
                cells.append(f"{row['mean']:.4f}{std} (n={int(row['count'])}{epochs.get((m, s), '')})")
            lines.append(f"| {s:.0%} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _epochs_by_cell(done: pd.DataFrame) -> dict:
    """The text ", N ep" of each (method, sparsity) cell, grouped as `summarize` groups: the mean
    epochs trained behind it, so a reader sees whether the methods had equal budgets or not."""
    if EPOCHS not in done.columns or done[EPOCHS].isna().all():
        return {}
    means = done.groupby([done[METHOD], done[SPARSITY].astype(float).round(2)])[EPOCHS].mean()
    return {cell: f", {round(v, 1):g} ep" for cell, v in means.items() if pd.notna(v)}


def _dense_values(trials: pd.DataFrame) -> pd.Series:
    """dense_test_acc once per dense phase: trials of one seed share theirs."""
    if DENSE not in trials.columns:
        return pd.Series(dtype=float)
    keys = [c for c in (SEED, "model.arch", "data.dataset") if c in trials.columns]
    rows = trials.dropna(subset=[DENSE])
    return (rows.drop_duplicates(subset=keys + [DENSE]) if keys else rows)[DENSE]


# -- Pareto -------------------------------------------------------------------------------------

def pareto_mask(values: np.ndarray, modes: list[str]) -> np.ndarray:
    """True for the non-dominated rows of `values` [n, k] (mode per column: "max" or "min")."""
    v = np.asarray(values, dtype=float) * np.array([1.0 if m == "max" else -1.0 for m in modes])
    keep = np.ones(len(v), dtype=bool)
    for i in range(len(v)):
        dominated = (v >= v[i]).all(axis=1) & (v > v[i]).any(axis=1)
        keep[i] = not dominated.any()
    return keep


# -- figures ------------------------------------------------------------------------------------

def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


def _lines_by_method(done: pd.DataFrame, x: str, metric: str, xlabel: str, path: Path, title: str,
                     reference: tuple[float, str] | None = None) -> None:
    """One line per method: the mean of `metric` against column `x`, std as error bars; and a
    horizontal `reference` line (value, label)."""
    fig, ax = pyplot().subplots(figsize=(6.5, 4.2))
    for method, part in done.dropna(subset=[x]).groupby(METHOD):
        g = part.groupby(x)[metric].agg(["mean", "std"]).reset_index()
        ax.errorbar(g[x], g["mean"], yerr=g["std"].fillna(0), marker="o", capsize=3, label=method)
    if reference is not None:
        ax.axhline(reference[0], color="k", linestyle="--", linewidth=1, label=reference[1])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(label(metric))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(title="method")
    _save(fig, path)


def accuracy_vs_sparsity(df: pd.DataFrame, metric: str, path: Path, title: str) -> None:
    """One line per method; with `test_acc`, the unpruned model's accuracy as a reference line."""
    done = finished(df).copy()
    done["sparsity %"] = done[SPARSITY].astype(float).round(2) * 100
    reference = None
    if metric == "test_acc" and DENSE in done.columns and done[DENSE].notna().any():
        dense = _dense_values(done)
        reference = (float(dense.mean()), f"dense (unpruned): {dense.mean():.4f}")
    _lines_by_method(done, "sparsity %", metric, "target sparsity (%)", path, title, reference)


def pareto(df: pd.DataFrame, objectives: list[tuple[str, str]], path: Path, title: str) -> None:
    """The first two objectives of every finished trial; the non-dominated ones highlighted."""
    (mx, dx), (my, dy) = objectives[:2]
    done = finished(df).dropna(subset=[mx, my])
    front = pareto_mask(done[[mx, my]].to_numpy(), [dx, dy])
    fig, ax = pyplot().subplots(figsize=(6.5, 4.2))
    for method, part in done.groupby(METHOD):
        ax.scatter(part[mx], part[my], alpha=0.6, label=method)
    best = done[front].sort_values(mx)
    ax.plot(best[mx], best[my], "k-", lw=1)
    ax.scatter(best[mx], best[my], s=120, facecolors="none", edgecolors="k", label="Pareto front")
    ax.set_xlabel(f"{label(mx)} ({dx})")
    ax.set_ylabel(f"{label(my)} ({dy})")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def layers_count(value) -> float:
    """How many layers a `schedule.layers` value names: first:K / last:K → K, a list → its length."""
    text = str(value)
    if text.startswith(("first:", "last:")):
        return float(text.split(":", 1)[1])
    if text.startswith("["):
        return float(len([p for p in text.strip("[]").split(",") if p.strip()]))
    return float("nan")  # "all"


def layers_pruned(df: pd.DataFrame, metric: str, path: Path, title: str) -> None:
    done = finished(df).copy()
    done["layers pruned"] = done[LAYERS].map(layers_count)
    _lines_by_method(done, "layers pruned", metric, "prunable layers pruned (count)", path, title)


def write(df: pd.DataFrame, objectives: list[tuple[str, str]], out: Path, title: str,
          best_history: list[dict] | None = None, dense_epochs: int | None = None) -> list[Path]:
    """results.csv, summary.md and the figures into `out`; returns the files written."""
    from prunetune import figures

    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.csv", out / "summary.md"]
    df.to_csv(written[0], index=False)
    df = with_variants(df)  # tables and figures: "iterative · reinit" where retraining varied
    done = finished(df)
    metrics = [m for m, _ in objectives if m in df.columns]
    if "test_acc" in df.columns and "test_acc" not in metrics:
        metrics.append("test_acc")
    written[1].write_text(summary_markdown(summarize(df, metrics), metrics, title, df))
    if done.empty:
        return written
    acc = "test_acc" if "test_acc" in done.columns else metrics[0]
    accuracy_vs_sparsity(df, acc, out / "accuracy_vs_sparsity.png", f"{title}: {acc} by method")
    written.append(out / "accuracy_vs_sparsity.png")
    if len(objectives) >= 2 and all(m in done.columns for m, _ in objectives[:2]):
        pareto(df, objectives, out / "pareto.png", f"{title}: trade-off of the objectives")
        written.append(out / "pareto.png")
    if best_history:
        figures.curves(best_history, out / "curves.png", f"{title}: best pruned trial (dense phase first)",
                       dense_epochs=dense_epochs)
        written.append(out / "curves.png")
    if LAYERS in done.columns and done[LAYERS].nunique() > 1:
        layers_pruned(df, acc, out / "layers_pruned.png", f"{title}: {acc} against layers pruned")
        written.append(out / "layers_pruned.png")
    return written


def write_importances(imp: pd.DataFrame, out: Path, title: str) -> list[Path]:
    """importances.csv and importances.png (one panel per objective) from Optuna's parameter
    importances; nothing where there are none (fewer than two trials, or nothing varied)."""
    if imp.empty:
        return []
    csv = out / "importances.csv"
    imp.to_csv(csv, index=False)
    objectives = list(dict.fromkeys(imp["objective"]))
    fig, axes = pyplot().subplots(1, len(objectives), figsize=(5 * len(objectives), 0.4 * imp["param"].nunique() + 1.6),
                             squeeze=False)
    for ax, name in zip(axes[0], objectives):
        part = imp[imp["objective"] == name].sort_values("importance")
        ax.barh(part["param"], part["importance"], color="tab:blue")
        ax.set_xlabel("importance (fANOVA, fraction of variance)")
        ax.set_title(label(name))
    fig.suptitle(f"{title}: what the objectives depend on (Optuna)")
    _save(fig, out / "importances.png")
    return [csv, out / "importances.png"]
