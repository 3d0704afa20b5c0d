"""The report's files, from a DataFrame of a sweep's trials: the results table, the summary
(objectives by configuration: method × every other key the sweep varied × sparsity, mean ± std
with n; one dense reference per dense phase), the figures (one line per configuration), and
Optuna's importances.
Pure pandas + matplotlib: it reads no store. `commands.report` reads the runs back from MLflow
and the study from Optuna, calls this, and logs the files to the sweep's parent run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from prunetune.figures import pyplot
from prunetune.metrics import LABELS
from prunetune.pruning import schedules
from prunetune.tracking import TAG_DENSE, TAG_REPLICATE, TAG_STATE, TAG_TRIAL_ID

METHOD, SPARSITY, LAYERS, SEED = "schedule.method", "schedule.sparsity", "schedule.layers", "seed"
DENSE = "dense_test_acc"  # the unpruned reference (the shared dense phase's checkpoint on the test split)
EPOCHS = "train_epochs_total"
DENSE_PHASE = "dense_phase"  # the dense phase's hash (tag prunetune.dense_hash), where runs carry it


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
                     DENSE_PHASE: r.tags.get(TAG_DENSE),
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
    ids = ["run_id", "trial_id", "state", "replicate", DENSE_PHASE]
    param_cols = sorted(c[len("param:"):] for c in params)
    metric_cols = sorted(c for c in df.columns if c not in ids and c not in param_cols)
    return df[ids + param_cols + metric_cols].sort_values("trial_id", kind="stable").reset_index(drop=True)


def finished(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["state"] == "FINISHED"] if not df.empty else df


# -- what a sweep varied: its configurations --------------------------------------------------

RETRAIN = "schedule.retrain"
CONFIG = "configuration"  # the label of a trial's configuration: its method and the other keys varied
UNUSED = "—"  # a varied key the trial's method does not read
NOT_DIMENSIONS = {METHOD, SPARSITY, SEED, "name"}  # the table's own axes; seeds are a cell's replicates
DENSE_KEYS = ("model.", "data.", "train.", "distill")  # what the dense phase's hash covers (with the seed)
NOT_DENSE = {"train.finetune_epochs", "train.budget_epochs"}


def is_param(column: str) -> bool:
    """A spec key (dotted, or a top-level key), not a metric or an identifier."""
    return "." in column or column in ("seed", "name")


def _reads(method, retrain, key: str) -> bool:
    """Whether a trial of `method` (and `retrain`) reads `key` (method-specific schedule keys)."""
    if not key.startswith("schedule.") or method not in schedules.METHODS:
        return True
    return schedules.key_is_used(method, key.split(".", 1)[1], retrain if isinstance(retrain, str) else "finetune")


def _text(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return "" if value is None else str(value)


def dimension_values(df: pd.DataFrame, key: str) -> pd.Series:
    """`key`'s values as text, `UNUSED` where a trial's method does not read it."""
    retrain = df[RETRAIN] if RETRAIN in df.columns else pd.Series("finetune", index=df.index)
    return pd.Series([_text(v) if _reads(m, r, key) else UNUSED
                      for v, m, r in zip(df[key], df[METHOD], retrain)], index=df.index, dtype=object)


def dimensions(df: pd.DataFrame) -> list[str]:
    """The spec keys a sweep varied besides method and sparsity: those whose value differs among
    the finished trials whose method reads them (the seed and replicate aside), in column order."""
    done = finished(df)
    if done.empty:
        return []
    return [c for c in done.columns if is_param(c) and c not in NOT_DIMENSIONS
            and dimension_values(done, c).loc[lambda v: v != UNUSED].nunique() > 1]


def short(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def with_configurations(df: pd.DataFrame, dims: list[str] | None = None) -> pd.DataFrame:
    """The trials with each varied key as text (`UNUSED` where the method does not read it) and
    `CONFIG`, their label: the method and the varied keys it reads ("iterative · retrain=reinit")."""
    dims = dimensions(df) if dims is None else dims
    out = df.copy()
    for key in dims:
        out[key] = dimension_values(df, key)
    out[CONFIG] = [" · ".join([str(row[METHOD])] + [f"{short(k)}={row[k]}" for k in dims if row[k] != UNUSED])
                   for _, row in out.iterrows()] if not out.empty else []
    return out


def summarize(df: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """Mean, std and n of `metrics` over the finished trials of each configuration: method × the
    other varied keys × sparsity (rounded to 2 decimals, so a continuous search still groups).
    The replicates (seeds) of a configuration fall into one cell."""
    dims = dimensions(df)
    done = finished(with_configurations(df, dims)).copy()
    if done.empty:
        return pd.DataFrame()
    done[SPARSITY] = done[SPARSITY].astype(float).round(2)
    return done.groupby([METHOD, *dims, SPARSITY])[metrics].agg(["mean", "std", "count"])


def _cell(row, epochs: str = "") -> str:
    std = "" if pd.isna(row["std"]) else f" ± {row['std']:.4f}"
    return f"{row['mean']:.4f}{std} (n={int(row['count'])}{epochs})"


def summary_markdown(summary: pd.DataFrame, metrics: list[str], title: str, df: pd.DataFrame) -> str:
    dims = dimensions(df)
    done = finished(with_configurations(df, dims))
    lines = [f"# {title}", "", f"{len(df)} trials: {len(done)} finished"
             + "".join(f", {n} {s.lower()}" for s, n in df["state"].value_counts().items() if s != "FINISHED")
             + ". Mean ± standard deviation over the finished trials of each configuration "
               "(n: trials behind the cell, its seeds; std needs n ≥ 2)."]
    epochs = _epochs_by_cell(done, dims)
    if epochs:
        lines[-1] += " ep: the mean epochs trained, the dense phase's included (train_epochs_total)."
    if dims:
        lines[-1] += (f" Besides method and sparsity the sweep varied {', '.join(dims)}; "
                      f"{UNUSED} marks a key the trial's method does not use.")
    lines.append("")
    if summary.empty:
        return "\n".join(lines + ["No finished trial."]) + "\n"
    if dims:
        return "\n".join(lines + _long_table(summary, metrics, dims, epochs) + _dense_table(done, dims)) + "\n"
    for metric in metrics:
        lines += _pivot_table(summary[metric], metric, done, epochs)
    return "\n".join(lines)


def _pivot_table(table: pd.DataFrame, metric: str, done: pd.DataFrame, epochs: dict) -> list[str]:
    """The study's table: sparsity by method, and the dense reference row under test_acc."""
    sparsities = sorted(table.index.get_level_values(-1).unique())
    methods = list(dict.fromkeys(table.index.get_level_values(0)))
    lines = [f"## {metric}", "", "| sparsity | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    if metric == "test_acc" and DENSE in done.columns and done[DENSE].notna().any():
        # the unpruned reference: the dense phases behind each method's trials (one per seed)
        cells = []
        for m in methods:
            dense = _dense_values(done[done[METHOD] == m])
            std = f" ± {dense.std():.4f}" if len(dense) > 1 else ""
            cells.append(f"{dense.mean():.4f}{std} (n={len(dense)})" if len(dense) else "")
        lines.append("| dense (0%) | " + " | ".join(cells) + " |")
    for s in sparsities:
        cells = [_cell(table.loc[(m, s)], epochs.get((m, s), "")) if (m, s) in table.index else ""
                 for m in methods]
        lines.append(f"| {s:.0%} | " + " | ".join(cells) + " |")
    return lines + [""]


def _long_table(summary: pd.DataFrame, metrics: list[str], dims: list[str], epochs: dict) -> list[str]:
    """One row per configuration: method, the varied keys, sparsity, then each metric."""
    head = ["method", *map(short, dims), "sparsity", *metrics]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for cell in summary.index:
        values = [_cell(summary.loc[cell, m], epochs.get(cell, "")) for m in metrics]
        lines.append("| " + " | ".join([*map(str, cell[:-1]), f"{cell[-1]:.0%}", *values]) + " |")
    return lines + [""]


def _dense_table(done: pd.DataFrame, dims: list[str]) -> list[str]:
    """The unpruned references: one per distinct dense phase, averaged over seeds, by the varied
    keys the dense phase depends on."""
    if DENSE not in done.columns or not done[DENSE].notna().any():
        return []
    keys = [k for k in dims if k.startswith(DENSE_KEYS) and k not in NOT_DENSE]
    lines = [f"## {DENSE} (the unpruned reference: each dense phase once, n = dense phases)", ""]
    lines += ["| " + " | ".join([*map(short, keys), DENSE]) + " |", "|---" * (len(keys) + 1) + "|"]
    for group, part in (done.groupby(keys, sort=True) if keys else [((), done)]):
        group = group if isinstance(group, tuple) else (group,)
        dense = _dense_values(part)
        std = f" ± {dense.std():.4f}" if len(dense) > 1 else ""
        lines.append("| " + " | ".join([*map(str, group), f"{dense.mean():.4f}{std} (n={len(dense)})"]) + " |")
    return lines + [""]


def _epochs_by_cell(done: pd.DataFrame, dims: list[str]) -> dict:
    """The text ", N ep" of each cell, grouped as `summarize` groups: the mean epochs trained
    behind it, so a reader sees whether the methods had equal budgets or not."""
    if EPOCHS not in done.columns or done[EPOCHS].isna().all():
        return {}
    means = done.groupby([done[METHOD], *(done[k] for k in dims), done[SPARSITY].astype(float).round(2)])[EPOCHS].mean()
    return {cell: f", {round(v, 1):g} ep" for cell, v in means.items() if pd.notna(v)}


def _dense_values(trials: pd.DataFrame) -> pd.Series:
    """dense_test_acc once per dense phase: trials of one dense phase share theirs (runs from
    before the dense phase's tag: trials of one seed and model and data)."""
    if DENSE not in trials.columns:
        return pd.Series(dtype=float)
    rows = trials.dropna(subset=[DENSE])
    if DENSE_PHASE in rows.columns and rows[DENSE_PHASE].notna().all():
        return rows.drop_duplicates(subset=[DENSE_PHASE])[DENSE]
    keys = [c for c in rows.columns if c == SEED or (c.startswith(DENSE_KEYS) and c not in NOT_DENSE)]
    return rows.drop_duplicates(subset=keys + [DENSE])[DENSE]


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
    fig.savefig(path, dpi=110, bbox_inches="tight")  # "tight": the legend beside the plot is kept
    pyplot().close(fig)


def _legend_outside(ax, title: str | None = None) -> None:
    ax.legend(title=title, loc="upper left", bbox_to_anchor=(1.02, 1), fontsize="small", borderaxespad=0)


def _lines_by_configuration(done: pd.DataFrame, x: str, metric: str, xlabel: str, path: Path, title: str,
                            references: list[tuple[float, str]] = ()) -> None:
    """One line per configuration (`CONFIG`): the mean of `metric` against column `x`, std as
    error bars; and horizontal `references` lines (value, label)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    groups = list(done.dropna(subset=[x]).groupby(CONFIG))
    colors = plt.get_cmap("tab10" if len(groups) <= 10 else "tab20").colors
    for i, (config, part) in enumerate(groups):  # beyond 20 lines, the marker tells them apart
        g = part.groupby(x)[metric].agg(["mean", "std"]).reset_index()
        ax.errorbar(g[x], g["mean"], yerr=g["std"].fillna(0), marker="osD^v<>"[i // len(colors) % 7], capsize=3,
                    color=colors[i % len(colors)], label=config)
    for i, (value, text) in enumerate(references):
        ax.axhline(value, color="k", linestyle=("--", ":", "-.")[i % 3], linewidth=1, label=text)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(label(metric))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _legend_outside(ax, "configuration")
    _save(fig, path)


def dense_references(done: pd.DataFrame, dims: list[str]) -> list[tuple[float, str]]:
    """The unpruned model's test accuracy: one (mean, label) per varied dense-phase setting."""
    keys = [k for k in dims if k.startswith(DENSE_KEYS) and k not in NOT_DENSE]
    groups = done.groupby(keys, sort=True) if keys else [((), done)]
    out = []
    for group, part in groups:
        group = group if isinstance(group, tuple) else (group,)
        dense = _dense_values(part)
        if len(dense):
            named = ", ".join(f"{short(k)}={v}" for k, v in zip(keys, group))
            out.append((float(dense.mean()), f"dense (unpruned{', ' + named if named else ''}): {dense.mean():.4f}"))
    return out


def accuracy_vs_sparsity(df: pd.DataFrame, metric: str, path: Path, title: str) -> None:
    """One line per configuration; with `test_acc`, the unpruned model's accuracy as reference
    lines (one per varied dense-phase setting)."""
    dims = dimensions(df)
    done = finished(with_configurations(df, dims))
    done["sparsity %"] = done[SPARSITY].astype(float).round(2) * 100
    references = []
    if metric == "test_acc" and DENSE in done.columns and done[DENSE].notna().any():
        references = dense_references(done, dims)
    _lines_by_configuration(done, "sparsity %", metric, "target sparsity (%)", path, title, references)


def pareto(df: pd.DataFrame, objectives: list[tuple[str, str]], path: Path, title: str) -> None:
    """The first two objectives of every finished trial; the non-dominated ones highlighted."""
    (mx, dx), (my, dy) = objectives[:2]
    done = finished(with_configurations(df)).dropna(subset=[mx, my])
    front = pareto_mask(done[[mx, my]].to_numpy(), [dx, dy])
    fig, ax = pyplot().subplots(figsize=(6.5, 4.2))
    for config, part in done.groupby(CONFIG):
        ax.scatter(part[mx], part[my], alpha=0.6, label=config)
    best = done[front].sort_values(mx)
    ax.plot(best[mx], best[my], "k-", lw=1)
    ax.scatter(best[mx], best[my], s=120, facecolors="none", edgecolors="k", label="Pareto front")
    ax.set_xlabel(f"{label(mx)} ({dx})")
    ax.set_ylabel(f"{label(my)} ({dy})")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _legend_outside(ax)
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
    """One line per configuration (the layers aside: they are the x axis)."""
    done = finished(with_configurations(df, [k for k in dimensions(df) if k != LAYERS]))
    done["layers pruned"] = done[LAYERS].map(layers_count)
    _lines_by_configuration(done, "layers pruned", metric, "prunable layers pruned (count)", path, title)


def write(df: pd.DataFrame, objectives: list[tuple[str, str]], out: Path, title: str,
          best_history: list[dict] | None = None, dense_epochs: int | None = None,
          best_title: str = "best pruned trial") -> list[Path]:
    """results.csv, summary.md and the figures into `out`; returns the files written.
    `best_title`: what curves.png shows (the best trial's id, method and sparsity)."""
    from prunetune import figures

    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.csv", out / "summary.md"]
    df.to_csv(written[0], index=False)
    done = finished(df)
    metrics = [m for m, _ in objectives if m in df.columns]
    if "test_acc" in df.columns and "test_acc" not in metrics:
        metrics.append("test_acc")
    written[1].write_text(summary_markdown(summarize(df, metrics), metrics, title, df))
    if done.empty:
        return written
    acc = "test_acc" if "test_acc" in done.columns else metrics[0]
    accuracy_vs_sparsity(df, acc, out / "accuracy_vs_sparsity.png", f"{title}: {acc} by configuration")
    written.append(out / "accuracy_vs_sparsity.png")
    if len(objectives) >= 2 and all(m in done.columns for m, _ in objectives[:2]):
        pareto(df, objectives, out / "pareto.png", f"{title}: trade-off of the objectives")
        written.append(out / "pareto.png")
    if best_history:
        figures.curves(best_history, out / "curves.png", f"{title}: {best_title} (dense phase first)",
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
