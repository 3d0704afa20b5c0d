"""How long the commands a user types first take: `prunetune --help` and `prunetune validate` of
the quickstart (the spec and its data checked, the resolved spec printed), against starting the
Python interpreter alone, in the same run; and how long `prunetune sweep` of the quickstart takes
to print its first line (then it is stopped; its store is a temporary folder).

    python benchmarks/cli_latency.py [--repeats 7]

Each command runs in a fresh process, interleaved, timed end to end. Medians and minima.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "prunetune --help": [sys.executable, "-m", "prunetune.cli", "--help"],
    "prunetune validate quickstart": [sys.executable, "-m", "prunetune.cli", "validate", "sweeps/quickstart.yaml"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.repeats):
        for name, cmd in COMMANDS.items():
            start = time.perf_counter()
            r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            times[name].append(time.perf_counter() - start)
            if r.returncode != 0:
                sys.exit(f"{name} failed: {r.stderr[-2000:]}")
        times.setdefault("prunetune sweep: first line", []).append(first_line_s())
    print(f"{args.repeats} interleaved runs each, fresh processes:")
    for name, t in times.items():
        target = "< 1 s" if "first line" in name else "< 2 s"
        print(f"  {name:32s} median {statistics.median(t):5.2f} s   min {min(t):5.2f} s   "
              f"(target for prunetune: {target})")


def first_line_s() -> float:
    """Seconds from starting `prunetune sweep sweeps/quickstart.yaml` to its first line on stderr."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        spec = str(REPO / "sweeps" / "quickstart.yaml")
        proc = subprocess.Popen([sys.executable, "-m", "prunetune.cli", "sweep", spec,
                                 "--tracking-uri", f"sqlite:///{tmp}/mlflow.db", "--storage", f"{tmp}/tune"],
                                cwd=tmp, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                                start_new_session=True)
        line = proc.stderr.readline()
        took = time.perf_counter() - start
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if not line.startswith("sweep quickstart"):
            sys.exit(f"unexpected first line: {line!r}")
        return took


if __name__ == "__main__":
    main()
