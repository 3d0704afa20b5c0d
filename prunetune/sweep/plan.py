"""What a sweep says of itself before it runs: the plan `--dry-run` prints, the first line
`prunetune sweep` prints, the search space as lines, and the parent run's params."""

from __future__ import annotations

from prunetune import tracking
from prunetune.spec import LoadedSpec
from prunetune.spec.loading import redacted
from prunetune.sweep.paths import SweepPaths


def plan_text(loaded: LoadedSpec, paths: SweepPaths, uri: str, dataset=None) -> str:
    """What `prunetune sweep --dry-run` prints; with the spec's `dataset`, also the pruning rounds
    that merge (`model_check.merged_rounds`)."""
    spec = loaded.fixed_spec()
    replicates = f" × {spec.search.replicates} seeds" if spec.search.replicates > 1 else ""
    lines = [f"sweep {spec.name}: {spec.search.num_trials} trials{replicates}, sampler {spec.search.sampler}, "
             f"objectives {', '.join(f'{o.metric} ({o.mode})' for o in spec.search.objectives)}",
             f"  model {spec.model.arch}, data {spec.data.dataset} ({spec.data.image_size} px)",
             f"  resources per trial: {spec.resources.cpus_per_trial:g} CPU, {spec.resources.gpus_per_trial:g} GPU; "
             f"at most {spec.resources.max_concurrent} at once; early stop: {spec.search.early_stop}; "
             f"retries after a worker or node dies: {spec.resources.max_retries}",
             f"  state: {paths.dir.uri}", f"  tracking: {uri}", "  search space:"]
    lines += [f"    {line}" for line in space_lines(loaded)]
    if dataset is not None:
        from prunetune.model_check import merged_rounds

        lines += merged_rounds(loaded, dataset)
    return "\n".join(lines)


def first_line(loaded: LoadedSpec) -> str:
    """What `prunetune sweep` prints first, before anything slow: what it is about to run and
    where it logs."""
    spec = loaded.fixed_spec()
    s, paths = spec.search, SweepPaths.of(spec.tracking.storage, spec.name)
    seeds = f" × {s.replicates} seeds" if s.replicates > 1 else ""
    return (f"sweep {spec.name}: {s.num_trials} trials{seeds} ({s.sampler}), at most "
            f"{spec.resources.max_concurrent} at once; runs go to {redacted(tracking.store_uri(spec.tracking.uri))}; "
            f"log {paths.log_file()}")


def space_lines(loaded: LoadedSpec) -> list[str]:
    """The search space, a line a key: `key: kind [args]`."""
    return [f"{key}: {entry.kind} {list(entry.args)}" + (f" step {entry.step}" if entry.step else "")
            for key, entry in loaded.space.items()]


def sweep_params(loaded: LoadedSpec) -> dict:
    """The parent run's params: the sweep's fixed keys, dotted (neither searched nor under a
    searched key, nor null or empty)."""
    searched = tuple(loaded.space)
    return {k: v for k, v in loaded.fixed_spec().flat().items()
            if v not in (None, {}, []) and not any(k == s or k.startswith(s + ".") for s in searched)}
