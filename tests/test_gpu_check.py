"""benchmarks/gpu_check.py, the GPU acceptance script, as this CPU machine runs it: the checks that
need no GPU pass, the others say they were skipped, neither ray nor mlflow is imported, and a
check that finds a fault fails the run. The GPU-only checks' code runs here too, at a tiny size."""

from __future__ import annotations

import importlib.util
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
LINE = re.compile(r"^(ok (?P<ok>[^:]+): .+|FAIL (?P<fail>[^:]+): .+|skipped \(no CUDA\): (?P<skipped>.+))$")


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


gpu_check = _load()


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def ctx(tmp_path, one_thread):
    return gpu_check.Context(torch.device("cpu"), gpu_check.sizes_for(False, True), tmp_path)


def test_quick_run_passes_the_cpu_checks_and_skips_the_gpu_ones(tmp_path):
    env = dict(os.environ, PRUNETUNE_CACHE=str(tmp_path / "cache"))
    run = subprocess.run([sys.executable, "-X", "importtime", str(SCRIPT), "--quick"], check=False,
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    lines = run.stdout.splitlines()
    assert lines and all(LINE.match(line) for line in lines), run.stdout  # one line per check, nothing else
    kinds = {kind: [m[kind] for m in map(LINE.match, lines) if m[kind]] for kind in ("ok", "fail", "skipped")}
    assert kinds["fail"] == [], run.stdout + run.stderr[-3000:]
    assert run.returncode == 0
    cpu_checks = [f"trial {name}" for name in gpu_check.TRIALS] + ["replay", "cka", "imports"]
    assert set(cpu_checks) <= set(kinds["ok"])
    if not torch.cuda.is_available():
        gpu_checks = [f"throughput {a}@{s}" for a, s, _ in gpu_check.THROUGHPUT_MODELS] + ["packing simple_cnn@32"]
        assert kinds["skipped"] == gpu_checks
    imported = {m.group(1).strip().split(".")[0]
                for m in re.finditer(r"^import time:\s+\d+ \|\s+\d+ \|(.+)$", run.stderr, re.MULTILINE)}
    assert "torch" in imported and "prunetune" in imported  # the import log was read
    assert not imported & {"ray", "mlflow"}
    replay = next(line for line in lines if line.startswith("ok replay:"))
    assert "max |Δ| 0 over" in replay  # exact on a CPU


def test_a_failing_check_fails_the_run():
    out = io.StringIO()
    report = gpu_check.Report(out)
    report.run("fine", lambda: "3 of 3")
    assert report.exit_code == 0

    def finding():
        raise gpu_check.CheckFailed("2 pruned weights\nare not zero")

    def crash():
        raise ValueError("a CPU generator met a CUDA tensor")

    report.run("found", finding)
    report.run("crashed", crash)
    report.skip("needs a GPU")
    assert report.exit_code == 1
    assert out.getvalue().splitlines() == [
        out.getvalue().splitlines()[0], "FAIL found: 2 pruned weights / are not zero",
        "FAIL crashed: ValueError: a CPU generator met a CUDA tensor", "skipped (no CUDA): needs a GPU"]
    assert re.fullmatch(r"ok fine: 3 of 3; \d+\.\d s", out.getvalue().splitlines()[0])


def test_the_trial_checks_find_a_weight_that_escaped_its_mask(ctx):
    """The checks read the checkpoint: a pruned weight that is not zero, or a sparsity off the
    target by more than one weight, is a finding."""
    trial = gpu_check.Trial(gpu_check.trial_spec(ctx, "oneshot"))
    result = trial.run(ctx.work / "t", gpu_check.DenseCache(ctx.work / "dense"))
    state = torch.load(ctx.work / "t" / "checkpoint" / "model.pt", weights_only=True)
    assert gpu_check.masks_figures(trial, state).startswith("all ")
    gpu_check.sparsity_figures(trial, state, result)
    name = trial.selected[0]
    pruned = (~trial.masks.masks[name]).nonzero()[0]
    state[f"{name}.weight"][tuple(pruned)] = 0.5
    with pytest.raises(gpu_check.CheckFailed, match="1 of .* pruned weights are not zero"):
        gpu_check.masks_figures(trial, state)
    result.metrics["sparsity"] = 0.7
    with pytest.raises(gpu_check.CheckFailed, match="reported sparsity"):
        gpu_check.sparsity_figures(trial, state, result)
    trial.spec.schedule.sparsity = 0.79
    state[f"{name}.weight"][tuple(pruned)] = 0.0
    result.metrics["sparsity"] = trial.masks.sparsity()
    with pytest.raises(gpu_check.CheckFailed, match="target 0.79"):
        gpu_check.sparsity_figures(trial, state, result)


def test_gpu_only_checks_run_on_the_cpu_at_a_tiny_size(ctx):
    """Throughput and packing are skipped without CUDA; their code runs here anyway (figures
    meaningless on a busy CPU), so the first GPU session does not meet a typo."""
    try:
        figures = gpu_check.throughput_figures(ctx, "simple_cnn", 16, 32)
    except gpu_check.CheckFailed as exc:  # the ratio on a shared CPU is noise
        figures = str(exc)
    assert re.search(r"trainer [\d,]+ img/s = [\d.]+x the bare loop's [\d,]+; against the plain trainer "
                     r"channels_last [\d.]+x, compile [\d.]+x \(both ignored on a CPU\)", figures), figures
    (alone,) = gpu_check.run_workers(ctx, 1)
    assert alone["images"] == gpu_check.PACKING_MODEL[2] * ctx.sizes.packing_steps and alone["seconds"] > 0
    assert "img/s combined" in gpu_check.describe_packing(ctx, alone, [alone, alone])
