"""The ledger of a study run's finished cells (cells.json) and the folder lock that lets several
`padd reproduce` processes share one run folder."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from pathlib import Path

from rich.console import Console

from padd.io import atomic_write_json


class CellLedger:
    """Which cells of the run in `out` have finished, with their wall time; runs the others.

    ledger.cell("warmup-cluster", "warm-up", fn)   # fn() unless cells.json lists the cell
    """

    def __init__(self, out: Path, console: Console):
        self.out, self.console = out, console
        self.file = out / "cells.json"
        self.cells: dict = json.loads(self.file.read_text()) if self.file.exists() else {}
        self._lock_depth, self._lock_fd = 0, -1

    @contextlib.contextmanager
    def locked(self):
        """An exclusive lock on the run folder (re-entrant within this process): cells that several
        rows share (teacher, Stage I, warm-ups, analyses) run once when two processes share --out."""
        if self._lock_depth == 0:
            self._lock_fd = os.open(self.out / ".lock", os.O_CREAT | os.O_RDWR)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        self._lock_depth += 1
        try:
            yield
        finally:
            self._lock_depth -= 1
            if self._lock_depth == 0:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                os.close(self._lock_fd)

    def cell(self, name: str, stage: str, fn) -> None:
        """Run `fn` unless the cell finished before; record its wall time when it ends.

        Two `padd reproduce` processes may share one --out with disjoint rows (one per core): a cell
        every row needs runs under the folder's lock, and cells.json is re-read before each check
        and write, so neither process redoes nor drops the other's cells."""
        shared = not name.startswith(("train/", "eval/"))
        with self.locked() if shared else contextlib.nullcontext():
            self._read()
            if name in self.cells:
                self.console.print(f"[dim]✓ {name} (done, {self.cells[name]['seconds']:.0f}s)")
                return
            self.console.rule(name)
            t0, started = time.perf_counter(), time.time()
            result = fn()
            # start and end on the wall clock too: with --jobs, cells overlap and their seconds do not add up
            record = {
                "stage": stage,
                "seconds": round(time.perf_counter() - t0, 2),
                "started": round(started, 1),
                "finished": round(time.time(), 1),
            }
            if result:
                record["result"] = result
            with self.locked():
                self._read()
                self.cells[name] = record
                atomic_write_json(self.file, self.cells)

    def _read(self) -> None:
        on_disk = json.loads(self.file.read_text()) if self.file.exists() else {}
        self.cells = {**self.cells, **on_disk}
