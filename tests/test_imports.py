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


def test_mlflow_and_optuna_each_stay_in_one_module():
    """Only tracking.py talks to MLflow (its client is private); optuna is imported by
    stored_study.py (the stored study), search.py (the samplers) and logs.py (its log lines);
    metric names live in metrics.py, torch-free."""
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "prunetune"
    for path in package.rglob("*.py"):
        text = path.read_text()
        rel = path.relative_to(package).as_posix()
        if rel != "tracking.py":
            assert "import mlflow" not in text and "from mlflow" not in text, rel
            assert "_mlflow" not in text and ".client." not in text, rel
            assert ".info.run_id" not in text and ".data.tags" not in text, rel
        if rel not in ("stored_study.py", "search.py", "logs.py"):  # the sampler; routing its log lines
            assert "import optuna" not in text, rel
    code = "import sys, prunetune.metrics; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
