"""Sweeps: Ray Tune runs the trials, Optuna (through Tune's OptunaSearch) proposes them, and a
driver-side callback is the one writer to MLflow: trials report to Tune, the driver logs what they
report, keyed by trial id. This package is the only place that imports ray, and only once a sweep
runs (Ray reads some settings from the environment at import): this face imports none.

Sweep state lives in `tracking.storage` (default `mlruns/tune`) under `<name>/`: Tune's experiment,
`sweep.json` (the parent run and the search-space fingerprint) and `resume/` (each trial's own
resume state and finished artifacts), so `--resume` continues the same sweep after Ctrl-C, a crash
or SIGKILL of the driver. On a cluster the storage is one that every node reaches (a shared path,
`s3://...`): trials write there, the driver reads from there; nothing assumes one filesystem.

The driver's side: `driver` (its steps), `preflight` (node checks), `searcher` (Optuna, with seed
replicates), `mlflow_logger` and `progress` (Tune callbacks), `_ray` (starting Ray). The worker's:
`trainable`. Between them: `protocol` (the keys of a trial's reports), `paths` (where the state
lives), `plan` (what a sweep says of itself before it runs). Every private Ray API it touches: `_compat`.
"""

from prunetune.sweep.driver import SweepInterrupted, SweepResult, TrackingBehind, prepare, run_sweep
from prunetune.sweep.paths import Located, SweepPaths, locate
from prunetune.sweep.plan import first_line, plan_text

__all__ = ["Located", "SweepInterrupted", "SweepPaths", "SweepResult", "TrackingBehind", "first_line", "locate",
           "plan_text", "prepare", "run_sweep"]
