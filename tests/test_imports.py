"""Frameworks stay at the edges: the core imports neither ray nor mlflow (nor the CLI)."""

import subprocess
import sys

CORE = ["prunetune.spec", "prunetune.pruning.masks", "prunetune.pruning.schedules", "prunetune.models",
        "prunetune.data", "prunetune.data.device", "prunetune.train", "prunetune.trial"]


def test_core_imports_no_ray_no_mlflow():
    code = ("import sys\n" + "".join(f"import {m}\n" for m in CORE)
            + "print(sorted(m for m in ('ray', 'mlflow', 'optuna', 'click') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
