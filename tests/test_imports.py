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
    stored_study.py (the stored study), samplers.py (the samplers) and logs.py (its log lines);
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
        if rel not in ("stored_study.py", "samplers.py", "logs.py"):  # the samplers; its log lines
            assert "import optuna" not in text, rel
    code = "import sys, prunetune.metrics; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_a_sweep_driver_without_a_model_to_check_keeps_torch_out(tmp_path):
    """The driver lives as long as the sweep: it imports torch (0.45 GB resident) only where it
    builds a model to check it (a factory's model, a budget) or has a distillation teacher."""
    spec = tmp_path / "s.yaml"
    spec.write_text("name: s\ndata: {dataset: digits, image_size: 8}\nsearch: {num_trials: 1}\n")
    code = ("import sys\nfrom prunetune.spec import load\nfrom prunetune.sweep.driver import prepare\n"
            f"prepare(load({str(spec)!r}), resume=False, restart=False, echo=lambda _: None)\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


def test_no_two_modules_of_the_package_import_each_other():
    """No import loop, lazy imports included (a package's __init__ aside): a module can be read,
    and moved, without the one it leans on leaning back."""
    import ast
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "prunetune"
    files = {".".join(p.relative_to(package.parent).with_suffix("").parts): p
             for p in package.rglob("*.py") if p.name != "__init__.py"}
    edges = {}
    for name, path in files.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(name.split(".")[:-node.level] + ([base] if base else []))
                targets |= {base} | {f"{base}.{a.name}" for a in node.names}
        edges[name] = {t for t in targets if t in files and t != name}

    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for b in edges[todo.pop()]:
                if b not in seen:
                    seen.add(b)
                    todo.append(b)
        return seen

    loops = sorted({tuple(sorted((a, b))) for a in files for b in edges[a] if a in reach(b)})
    assert loops == []


def test_every_criterion_module_imports_without_torch():
    """The spec reads every criterion's rules (registry.criterion) without importing torch."""
    code = ("import sys\nfrom prunetune import registry\n"
            "[registry.criterion(n).check for n in registry.CRITERIA]\nprint('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
