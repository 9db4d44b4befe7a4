"""`padd demo` wall time per stage, against its 5-minute budget on 2 CPU cores.

Runs the demo into a fresh folder (or reads an existing run with --run) and prints, from the run's
cells.json, the seconds of each stage, its share of the total, and the wall time against the budget
(the demo's Phase B rows run side by side, so the wall time is less than the sum of the stages).
The demo starts from the shipped teacher; `--train-teacher` runs it as it ran before padd shipped
one (the teacher trained first), the peer the budget is measured against: each stage's time is
then also shown as a ratio to the teacher's training.

    python benchmarks/bench_demo.py                  # run the demo into a temp folder, then report
    python benchmarks/bench_demo.py --train-teacher  # the same, training the teacher first
    python benchmarks/bench_demo.py --run runs/demo  # report an existing run
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

BUDGET_S = 5 * 60


def stage_seconds(run: Path) -> dict[str, float]:
    """Seconds per stage summed over the run's cells (cells.json)."""
    stages: dict[str, float] = {}
    for cell in json.loads((run / "cells.json").read_text()).values():
        stages[cell["stage"]] = stages.get(cell["stage"], 0.0) + cell["seconds"]
    return stages


def cells_span(run: Path) -> float | None:
    """Wall seconds from the first cell's start to the last cell's end (rows run side by side with
    --jobs, so this is less than the sum of the cells); None for runs that did not record them."""
    cells = json.loads((run / "cells.json").read_text()).values()
    if not all("started" in c for c in cells):
        return None
    return max(c["finished"] for c in cells) - min(c["started"] for c in cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="report this finished demo run instead of running one")
    parser.add_argument("--train-teacher", action="store_true", help="train the teacher first (padd demo's flag)")
    args = parser.parse_args()
    console = Console()
    wall = None
    if args.run is None:
        from padd.config import DemoConfig
        from padd.demo import run_demo

        args.run = Path(tempfile.mkdtemp(prefix="padd-demo-")) / "demo"
        t0 = time.perf_counter()
        run_demo(DemoConfig(out=str(args.run), train_teacher=args.train_teacher, progress=False), console)
        wall = time.perf_counter() - t0
    stages = stage_seconds(args.run)
    total = sum(stages.values())
    teacher = stages.get("teacher")
    table = Table(title=f"padd demo: wall time per stage ({args.run})")
    # the ratio to the teacher's training only where the run trained one (--train-teacher)
    for col in ("stage", "seconds", "share", *(("× teacher training",) if teacher else ())):
        table.add_column(col, justify="right")
    pad = ("",) if teacher else ()
    for stage, sec in stages.items():
        table.add_row(stage, f"{sec:.0f}", f"{100 * sec / total:.0f}%", *((f"{sec / teacher:.2f}",) if teacher else ()))
    table.add_row("cells total", f"{total:.0f}", "100%", *pad)
    span = cells_span(args.run)
    if span is not None:
        table.add_row("first cell start → last cell end", f"{span:.0f}", "", *pad)
    if wall is not None:
        table.add_row("wall (incl. loading, report)", f"{wall:.0f}", "", *pad)
    console.print(table)
    spent = wall if wall is not None else (span if span is not None else total)
    verdict = "within" if spent <= BUDGET_S else "OVER"
    console.print(f"{spent / 60:.1f} min: {verdict} the {BUDGET_S // 60}-minute budget")


if __name__ == "__main__":
    main()
