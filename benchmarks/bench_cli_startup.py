"""Start-up time of the command line against `import torch`, each in a fresh interpreter.

`padd --help` and `padd train --help` must not import model code (transformers, datasets, torch):
the target is under 1.5x the time of `python -c "import torch"`, the floor of any command that
trains. Each command runs `--repeats` times; the table shows the median wall seconds.

    python benchmarks/bench_cli_startup.py
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from rich.console import Console
from rich.table import Table

COMMANDS = {
    'python -c "import torch"': [sys.executable, "-c", "import torch"],
    "padd --help": [sys.executable, "-m", "padd", "--help"],
    "padd train --help": [sys.executable, "-m", "padd", "train", "--help"],
}


def wall_seconds(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="runs per command (the median is shown)")
    args = parser.parse_args()
    for argv in COMMANDS.values():  # warm the file cache, so the first command is not charged for it
        wall_seconds(argv)
    medians = {
        name: statistics.median(wall_seconds(argv) for _ in range(args.repeats)) for name, argv in COMMANDS.items()
    }
    torch_s = medians['python -c "import torch"']
    table = Table(title=f"command-line start-up, median of {args.repeats} runs")
    for column in ("command", "seconds", "× import torch", "target"):
        table.add_column(column, justify="right" if column != "command" else "left")
    for name, seconds in medians.items():
        target = "" if name.startswith("python") else ("< 1.5 ✓" if seconds < 1.5 * torch_s else "< 1.5 ✗")
        table.add_row(name, f"{seconds:.2f}", f"{seconds / torch_s:.2f}", target)
    Console().print(table)


if __name__ == "__main__":
    main()
