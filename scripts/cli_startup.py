"""Measure how long light ``pgbus`` commands take to start: the figure of docs/performance.md.

Runs each command ``--runs`` times as a fresh process (as a shell would) next to a bare
``python -c pass`` of the same interpreter, and prints median, min and max in ms. The
target is ``pgbus --help`` in under 0.25 s on the project's 2-core machine.

    python scripts/cli_startup.py            # --help, --version, listen --help
    python scripts/cli_startup.py --runs 50

Timing belongs here, not in the tests: the tests check what ``--help`` imports.
"""

# ruff: noqa: INP001, S603 - a script, not a package; it runs only the commands it lists
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "pgbus --help": [sys.executable, "-m", "pgbus", "--help"],
    "pgbus --version": [sys.executable, "-m", "pgbus", "--version"],
    "pgbus listen --help": [sys.executable, "-m", "pgbus", "listen", "--help"],
}
TARGET_MS = 250.0


def measure(argv: list[str], runs: int) -> list[float]:
    """Wall-clock milliseconds of ``runs`` fresh runs of ``argv`` (after one warm-up)."""
    subprocess.run(argv, check=True, capture_output=True)  # warm the page cache
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        times.append((time.perf_counter() - start) * 1000)
    return times


def main() -> int:
    """Measure every command and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="runs per command (default 20)")
    args = parser.parse_args()
    print("| command | median ms | min | max |")  # noqa: T201 - a script's output
    print("| --- | ---: | ---: | ---: |")  # noqa: T201
    help_median = 0.0
    for name, argv in COMMANDS.items():
        times = measure(argv, args.runs)
        median = statistics.median(times)
        if name == "pgbus --help":
            help_median = median
        print(f"| `{name}` | {median:.0f} | {min(times):.0f} | {max(times):.0f} |")  # noqa: T201
    verdict = "met" if help_median < TARGET_MS else "missed"
    print(f"\n`pgbus --help` target < {TARGET_MS:.0f} ms: {verdict}")  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
