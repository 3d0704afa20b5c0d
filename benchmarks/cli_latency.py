"""How long the commands a user types first take: `prunetune --help` and `prunetune validate` of
the quickstart (the spec and its data checked, the resolved spec printed), against starting the
Python interpreter alone, in the same run.

    python benchmarks/cli_latency.py [--repeats 7]

Each command runs in a fresh process, interleaved, timed end to end. Medians and minima.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
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
    print(f"{args.repeats} interleaved runs each, fresh processes:")
    for name, t in times.items():
        print(f"  {name:32s} median {statistics.median(t):5.2f} s   min {min(t):5.2f} s   "
              "(target for prunetune: < 2 s)")


if __name__ == "__main__":
    main()
