"""Outputs: refuse to clobber a folder, and write folders and JSON files atomically (temp, then rename)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from padd.errors import UserError


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Raise unless `out` is absent, empty, or may be overwritten."""
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out {out} exists and is not empty; pass --overwrite to replace it")


def atomic_save_dir(out: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a sibling temp folder, then swap it in, so a crash never leaves half a checkpoint."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write(tmp)
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)


def atomic_write_json(path: Path, obj) -> None:
    """Write `obj` as indented JSON through a temp file and a rename, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)
