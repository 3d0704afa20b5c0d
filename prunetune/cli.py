"""The `prunetune` command: the only module that imports the CLI framework (click). Thin: it
parses arguments, calls the package, and turns errors into exit codes.

Exit codes: 0 success; 2 bad input (one line on stderr, no traceback, nothing written);
130 interrupted by the user; 1 anything else.
"""

from __future__ import annotations

import atexit
import functools
import gc
import sys
from pathlib import Path

import click

from prunetune import commands
from prunetune import spec as spec_mod
from prunetune.errors import UserError
from prunetune.metrics import shown_metrics

EXIT_BAD_INPUT, EXIT_INTERRUPTED = 2, 130


def handle_errors(fn):
    """Bad input → exit 2 with one line; Ctrl-C → 130. Library log lines and warnings go to a
    log file (also to stderr with --verbose), never into normal output."""
    @click.option("--verbose", "-v", is_flag=True, help="Also show the libraries' log lines and warnings.")
    @functools.wraps(fn)
    def wrapper(*args, verbose: bool = False, **kwargs):
        from prunetune.cache import cache_root
        from prunetune.logs import LogCapture

        capture = click.get_current_context().meta["prunetune.log"] = LogCapture(verbose)
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_BAD_INPUT)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        finally:
            capture.close(default=cache_root() / "logs" / f"{fn.__name__}.log")
    return wrapper


set_option = click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                          help="Override a spec key (dotted, repeatable), e.g. --set schedule.sparsity=0.8")
uri_option = click.option("--tracking-uri", default=None, metavar="URI",
                          help="MLflow tracking URI (default: the spec's tracking.uri, else $MLFLOW_TRACKING_URI, "
                               "else sqlite:///mlruns/mlflow.db)")
storage_option = click.option("--storage", default=None, metavar="URI",
                              help="Where sweep state and shared work live (default: the spec's tracking.storage): "
                                   "a path, a shared filesystem path, or s3://bucket/prefix")
spec_argument = click.argument("spec_path", metavar="SPEC", type=click.Path(dir_okay=False, path_type=Path))


def _load(*args, **kwargs) -> spec_mod.LoadedSpec:
    """`spec.load`, printing the lines it returns (where the environment chose for the user)."""
    loaded = spec_mod.load(*args, **kwargs)
    for note in loaded.notes:
        click.echo(note, err=True)
    return loaded


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="prunetune")
def main():
    """Sweep neural-network pruning schedules with Ray Tune, Optuna and MLflow."""
    # At exit Python's garbage collector walks every object the libraries made (Ray, Tune,
    # MLflow, pandas): about 1 s after a sweep. Nothing is left to collect by then. (Registered
    # once, however often main runs in one process.)
    atexit.unregister(gc.freeze)
    atexit.register(gc.freeze)


@main.command()
@spec_argument
@set_option
@handle_errors
def validate(spec_path: Path, sets: tuple[str, ...]):
    """Check a spec and its data paths; print the resolved spec."""
    resolved, summary = commands.validate_spec(_load(spec_path, list(sets)))
    click.echo(resolved, nl=False)
    click.echo(summary, err=True)


@main.command()
@spec_argument
@set_option
@uri_option
@storage_option
@handle_errors
def trial(spec_path: Path, sets: tuple[str, ...], tracking_uri: str | None, storage: str | None):
    """Run one trial in this process (no Ray); searched keys must be fixed by the spec or --set."""
    loaded = _load(spec_path, list(sets), for_trial=True, tracking_uri=tracking_uri, storage=storage)
    run_id, metrics = commands.run_trial(loaded, echo=lambda line: click.echo(line, err=True))
    _print_metrics(metrics)
    click.echo(f"run id: {run_id}\nopen the MLflow UI with: prunetune ui {spec_path}")


@main.command()
@spec_argument
@click.option("--resume", is_flag=True, help="Continue the sweep of this spec after Ctrl-C, a crash or a kill.")
@click.option("--restart", is_flag=True, help="Start this spec's sweep over (its old MLflow runs are kept).")
@click.option("--address", default=None, metavar="ADDR",
              help="Attach to a running Ray cluster: HOST:PORT, or auto for the one started on this machine "
                   "(default: $RAY_ADDRESS, else a fresh local Ray).")
@uri_option
@storage_option
@set_option
@click.option("--dry-run", is_flag=True, help="Validate the spec and print the plan; run nothing.")
@handle_errors
def sweep(spec_path: Path, resume: bool, restart: bool, address: str | None, tracking_uri: str | None,
          storage: str | None, sets: tuple[str, ...], dry_run: bool):
    """Run a sweep: Ray Tune trials, Optuna search, MLflow tracking."""
    from prunetune import sweep as sweep_mod

    loaded = _load(spec_path, list(sets), tracking_uri=tracking_uri, storage=storage)
    if dry_run:
        prepared = sweep_mod.prepare(loaded, resume=resume, restart=restart,
                                     echo=lambda line: click.echo(line, err=True), fetch=False)
        click.echo(sweep_mod.plan_text(loaded, prepared.paths, prepared.uri, prepared.dataset))
        return
    click.echo(sweep_mod.first_line(loaded), err=True)
    try:
        result = sweep_mod.run_sweep(loaded, spec_path, resume=resume, restart=restart, address=address,
                                     echo=lambda line: click.echo(line, err=True),
                                     log=click.get_current_context().meta["prunetune.log"])
    except sweep_mod.SweepInterrupted:
        click.echo(f"sweep interrupted; its state is saved. Resume with:\n  prunetune sweep {spec_path} --resume",
                   err=True)
        sys.exit(EXIT_INTERRUPTED)
    except sweep_mod.TrackingBehind as exc:
        click.echo(f"error: {exc}:\n  prunetune sweep {spec_path} --resume", err=True)
        sys.exit(1)
    _print_sweep(result, spec_path)


def _print_sweep(result, spec_path: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    metric, mode = result.objectives[0]
    done = result.ranked()
    failed = sum(r["state"] == "ERROR" for r in result.rows)
    table = Table(title=f"sweep {result.name}: top trials by {metric} ({mode}); "
                        f"{len(done)} finished, {failed} failed")
    params = sorted({k for r in result.rows for k in r if "." in k})
    leaves = [p.rsplit(".", 1)[1] for p in params]
    headers = leaves if len(set(leaves)) == len(leaves) else params
    shown = shown_metrics([m for m, _ in result.objectives])  # test_acc reported, not selected on
    for col in ["trial", *headers, *shown, "MLflow run"]:
        table.add_column(col, no_wrap=True)
    for r in done[:10]:
        table.add_row(r["trial_id"], *[_fmt(r.get(p)) for p in params], *[_fmt(r.get(m)) for m in shown],
                      r["run_id"] or "")
    console = Console()
    if not console.is_terminal:  # piped or logged: do not cut the table at 80 columns
        console = Console(width=220)
    console.print(table)
    if done:
        click.echo(f"best run: {done[0]['run_id']} (trial {done[0]['trial_id']})")
    else:
        click.echo("no trial finished", err=True)
    where = result.experiment_page or f"prunetune ui {spec_path}"
    click.echo(f"parent run: {result.parent_run_id}\ncompare runs in the MLflow UI: {where}")
    if result.log_path is not None:
        click.echo(f"Ray, MLflow and Optuna log: {result.log_path}")
    if not done:
        sys.exit(1)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))


@main.command()
@spec_argument
@uri_option
@click.option("--port", default=5000, show_default=True, help="Port on 127.0.0.1.")
@handle_errors
def ui(spec_path: Path, tracking_uri: str | None, port: int):
    """Serve the MLflow UI of the spec's tracking store, bound to 127.0.0.1."""
    uri, cmd, url = commands.ui_command(_load(spec_path, tracking_uri=tracking_uri).fixed_spec(), port)
    from prunetune.cache import cache_root

    server_log = cache_root() / "logs" / "mlflow-ui.log"
    click.echo(f"MLflow UI for {uri}: {url}", err=True)
    click.echo(f"Ctrl-C stops the server; its output goes to {server_log}", err=True)
    sys.exit(commands.serve(cmd, server_log))


@main.command()
@click.argument("target", metavar="SPEC_OR_SWEEP", type=click.Path(path_type=Path))
@click.option("--top", type=int, default=None, help="The sweep's best K trials by its first objective "
              "(default: analysis.cka.top).")
@click.option("--runs", multiple=True, metavar="RUN_ID", help="Compare these MLflow runs instead (repeatable).")
@uri_option
@storage_option
@handle_errors
def cka(target: Path, top: int | None, runs: tuple[str, ...], tracking_uri: str | None, storage: str | None):
    """Layer-similarity (linear CKA) within and between the best checkpoints of a sweep."""
    from prunetune.analysis import similarity

    checkpoints, matrices, run_id = commands.cka(target, list(runs), top, tracking_uri, storage)
    for line in similarity.summary_lines(checkpoints, matrices):
        click.echo(line)
    click.echo(f"CKA run: {run_id} (CSV matrices and heatmaps under its artifacts, cka/)")


@main.command()
@click.argument("target", metavar="SPEC_OR_SWEEP", type=click.Path(path_type=Path))
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for results.csv, summary.md and the figures (default: reports/<name>).")
@uri_option
@storage_option
@handle_errors
def report(target: Path, out: Path | None, tracking_uri: str | None, storage: str | None):
    """The sweep's results table, its summary by method and sparsity, and figures."""
    parent, out, files = commands.report(target, out, tracking_uri, storage)
    click.echo(files[1].read_text())
    click.echo(f"wrote {', '.join(f.name for f in files)} to {out}/ (also logged to the sweep's run {parent}, "
               "artifacts report/)")


@main.command()
@spec_argument
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a spec key (repeatable).")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for sensitivity.csv and sensitivity.png (default: reports/<name>/sensitivity).")
@uri_option
@storage_option
@handle_errors
def sensitivity(spec_path: Path, sets: tuple[str, ...], out: Path | None, tracking_uri: str | None,
                storage: str | None):
    """Prune each prunable layer alone at 10%…90% from the dense checkpoint; evaluate without fine-tuning."""
    loaded = _load(spec_path, list(sets), tracking_uri=tracking_uri, storage=storage)
    done = commands.sensitivity(loaded, out)
    worst = sorted((r for r in done.rows[1:] if r["sparsity"] == 0.9), key=lambda r: -r["acc_drop"])[:3]
    click.echo("most sensitive layers at 90%: " + ", ".join(f"{r['layer']} (−{r['acc_drop']:.3f})" for r in worst))
    click.echo(f"wrote {', '.join(f.name for f in done.files)} to {done.out}/; MLflow run {done.run_id} "
               "(prunetune.kind=sensitivity)")


def _print_metrics(metrics: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="final metrics")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in metrics.items():
        if "recall_class" in k:
            continue
        table.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
    Console().print(table)


if __name__ == "__main__":
    main()
