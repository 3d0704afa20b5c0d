"""prunetune: sweep neural-network pruning schedules with Ray Tune, Optuna and MLflow.

Importing the package does no work: frameworks (torch, ray, optuna, mlflow) load where used.
"""

__version__ = "0.2.0"
