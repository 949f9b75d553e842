"""Start-up time of the light commands, each a fresh process, beside `python -c "import torch"`
as the floor (docs/ARCHITECTURE.md, "Layers": light commands import neither Lightning nor
MLflow). Prints the median of --rounds runs of each and its ratio to the floor, measured in the
same run (absolute times drift on a shared machine; ratios hold). The aim for `proposals check`
is 1.5x the floor or less.

    .venv/bin/python benchmarks/cli_startup.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "cpm_lightning.cli"]
COMMANDS = {
    "python -c 'import torch' (floor)": [sys.executable, "-c", "import torch"],
    "cpm-lightning --help": [*CLI, "--help"],
    "proposals check proposals/": [*CLI, "proposals", "check", "proposals/"],
    "proposals list": [*CLI, "proposals", "list"],
    "proposals show 5": [*CLI, "proposals", "show", "5"],
    "model info --preset cpm-ant-10b": [*CLI, "model", "info", "--preset", "cpm-ant-10b"],
    "tokenizer train --help": [*CLI, "tokenizer", "train", "--help"],
}


def seconds(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per command (default 3)")
    args = parser.parse_args()
    # Interleaved rounds, so that a burst of load on the machine hits every command alike.
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.rounds):
        for name, argv in COMMANDS.items():
            times[name].append(seconds(argv))
    medians = {name: statistics.median(t) for name, t in times.items()}
    floor = medians[next(iter(COMMANDS))]
    width = max(map(len, COMMANDS))
    print(f"{'command':<{width}}  median s  x floor")
    for name, median in medians.items():
        print(f"{name:<{width}}  {median:8.2f}  {median / floor:7.2f}")
    print(f"proposals check / import torch: {medians['proposals check proposals/'] / floor:.2f} (aim: <= 1.5)")


if __name__ == "__main__":
    main()
