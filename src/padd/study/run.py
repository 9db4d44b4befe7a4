"""A study run: the rows `padd reproduce` was asked for, the order of their cells, and the
folder's manifest; the cells' work is padd.study.stages', their ledger padd.study.cells'."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from rich.console import Console

from padd.config import ConfigError, ReproduceConfig
from padd.errors import UserError
from padd.io import atomic_write_json
from padd.methods import ABLATIONS, TABLE_ROWS
from padd.report import write_report
from padd.shipped import resolve as resolve_shipped
from padd.study.cells import CellLedger
from padd.study.grid import StudyGrid
from padd.study.preset import load_study
from padd.study.stages import StudyStages
from padd.teacher import PRESETS as TEACHER_PRESETS


class StudyRun:
    """The rows of one study, the order of their cells, and what makes an interrupted run continue."""

    def __init__(self, cfg: ReproduceConfig, console: Console | None = None):
        self.cfg, self.console = cfg, console or Console()
        self.study = load_study(cfg.preset)
        self._apply_command_line()
        self.grid = StudyGrid(cfg, self.study)
        self.pretrained = self.grid.pretrained
        self.out = Path(cfg.out)
        self.manifest_file = self.out / "study.json"
        manifest = {
            "study": dataclasses.asdict(self.study),
            "teacher_override": cfg.teacher,
            "student_override": cfg.student,
            "teacher_seed": cfg.teacher_seed,
            "eval_split": cfg.eval_split,
        }
        self._open_folder(manifest)
        self._find_models()
        self.out.mkdir(parents=True, exist_ok=True)
        self.ledger = CellLedger(self.out, self.console)
        self.stages = StudyStages(
            cfg,
            self.study,
            self.out,
            teacher=self.teacher,
            student=self.student,
            inits=self.grid.inits,
            start=self.grid.start,
            console=self.console,
        )
        manifest.update(self.grid.manifest())
        with self.ledger.locked():
            atomic_write_json(self.manifest_file, self._merged_manifest(manifest))

    def _apply_command_line(self) -> None:
        """The study with the command line's budget and student; the options checked against it."""
        cfg = self.cfg
        if cfg.steps is not None:
            self.study.train["steps"] = cfg.steps
        if cfg.warmup_tokens is not None:
            self.study.warmup["tokens"] = cfg.warmup_tokens
        if cfg.eval_per_skill is not None:
            self.study.eval["world_per_skill"] = cfg.eval_per_skill
        if cfg.student:
            self.study.student = cfg.student
        if cfg.jobs < 1:
            raise ConfigError(f"--jobs {cfg.jobs}: give the number of processes to spread the rows over (1 or more)")
        if cfg.teacher and cfg.teacher_seed:
            raise ConfigError("--teacher-seed seeds a teacher trained here; it has no effect with --teacher")
        if cfg.student and self.study.decompose:  # the command line sets no decompose: settings
            raise ConfigError(f"--student: the {cfg.preset} study decomposes its teacher; it has no pretrained student")

    def _open_folder(self, manifest: dict) -> None:
        """Start anew (--overwrite), continue the same study, or refuse a folder that holds another."""
        if self.out.exists() and any(self.out.iterdir()):
            if self.cfg.overwrite:
                shutil.rmtree(self.out)
            elif not self.manifest_file.exists():
                raise UserError(f"--out {self.out} is not a study run; pick another folder or --overwrite")
            elif {k: v for k, v in json.loads(self.manifest_file.read_text()).items() if k in manifest} != manifest:
                raise ConfigError(
                    f"{self.out} holds a study with other settings; pass --overwrite or another --out to start anew"
                )

    def _find_models(self) -> None:
        """The teacher: a given checkpoint, else the study's checkpoint or shipped model (shipped:NAME),
        else trained here from a preset; the pretrained student (if any) the same way."""
        cfg = self.cfg
        self.train_teacher = not cfg.teacher and self.study.teacher in TEACHER_PRESETS
        self.teacher = (
            self.out / "teacher" if self.train_teacher else Path(resolve_shipped(cfg.teacher or self.study.teacher))
        )
        if not self.train_teacher and not self.teacher.exists():
            raise UserError(
                f"--teacher {self.teacher} does not exist; give a checkpoint folder, a preset name or shipped:NAME"
            )
        self.train_student = self.pretrained and self.study.student in TEACHER_PRESETS
        if self.train_student and not TEACHER_PRESETS[self.study.student].experts:
            raise ConfigError(f"student: {self.study.student} is a dense preset; name an MoE one (tiny-moe)")
        self.student = None
        if self.pretrained:
            self.student = self.out / "student" if self.train_student else Path(resolve_shipped(self.study.student))
            if not self.train_student and not self.student.exists():
                raise UserError(
                    f"--student {self.student} does not exist; give a checkpoint folder, an MoE preset or shipped:NAME"
                )

    def _merged_manifest(self, manifest: dict) -> dict:
        """The manifest the report reads: the rows of every invocation on this folder (another process
        may run other rows into it), and the last sweep asked for."""
        if not self.manifest_file.exists():
            return manifest
        before = json.loads(self.manifest_file.read_text())
        for key, order in (("methods", TABLE_ROWS), ("ablations", tuple(ABLATIONS))):
            asked = set(before.get(key, [])) | set(manifest[key])
            manifest[key] = [row for row in order if row in asked]
        manifest["seeds"] = sorted(set(before.get("seeds", [])) | set(manifest["seeds"]))
        if manifest["sweep"] is None and before.get("sweep"):
            manifest["sweep"], manifest["sweep_rows"] = before["sweep"], before["sweep_rows"]
        return manifest

    def run(self) -> Path:
        """Run every cell not done yet, the shared ones first, then the rows; returns report.md's path."""
        self._run_shared_cells()
        rows = self.grid.rows()
        if self.cfg.jobs > 1 and len(rows) > 1:
            self._run_rows_in_workers(rows)
        else:
            for row in rows:
                self.run_row(*row)
        return write_report(self.out, self.console)

    def _run_shared_cells(self) -> None:
        """The cells every row needs: the teacher (and a pretrained student), Stage I, the warm-ups
        and their analyses, the teacher's evaluation."""
        if self.train_teacher:
            self.ledger.cell("teacher", "teacher", self.stages.pretrain_teacher)
        if self.train_student:
            self.ledger.cell("student", "student", self.stages.pretrain_student)
        for init, starts in self.grid.warm_starts().items():
            if init == "seeded":
                self.ledger.cell("stage1-seeded", "stage I", self.stages.seed_student)
            elif init != "unseeded":  # the unseeded student is the pretrained one as it is
                self.ledger.cell(f"stage1-{init}", "stage I", lambda init=init: self.stages.decompose_teacher(init))
            self.ledger.cell(f"warmup-{init}", "warm-up", lambda init=init: self.stages.warm_up(init))
            for start in starts:
                if start != self.grid.start:
                    self.ledger.cell(
                        f"warmup-{init}-{start}", "warm-up", lambda i=init, s=start: self.stages.warm_up(i, restart=s)
                    )
                if self.cfg.compare_inits:
                    self.ledger.cell(
                        f"analysis/{init}-{start}",
                        "analysis",
                        lambda i=init, s=start: self.stages.analyse(f"{i}-{s}", self.stages.warm(i, s)),
                    )
        self.ledger.cell("eval/teacher", "eval", lambda: self.stages.evaluate("teacher", self.teacher))

    def run_row(self, row: str, init: str, start: str, train_kw: dict, seed: int | None) -> None:
        """Train (unless it is the base row), evaluate and analyse one row of the study."""
        name = _row_name((row, init, start, train_kw, seed))
        if row == "base":
            student = self.student if self.pretrained else self.stages.warm(init, start)
        else:
            self.ledger.cell(
                f"train/{name}",
                "phase B",
                lambda: self.stages.train_row(name, self.stages.warm(init, start), train_kw, seed),
            )
            student = self.out / "train" / name / "student"
        self.ledger.cell(f"eval/{name}", "eval", lambda: self.stages.evaluate(name, student))
        if row != "base":
            self.ledger.cell(f"analysis/{name}", "analysis", lambda: self.stages.analyse(name, student))

    def _run_rows_in_workers(self, rows: list) -> None:
        """Spread the rows over --jobs processes, each with its share of the CPU threads.

        A small model's decode step is bound by per-operation overhead, not arithmetic, so two
        single-threaded runs side by side finish sooner than the same two runs one after the other
        on two threads. Trained rows are dealt out first (they cost about the same), evaluation-only
        rows after them; the shared cells are already done, so the workers only write their own."""
        import multiprocessing

        import torch

        jobs = min(self.cfg.jobs, len(rows))
        ordered = [r for r in rows if r[0] != "base"] + [r for r in rows if r[0] == "base"]
        shares = [ordered[i::jobs] for i in range(jobs)]
        threads = max(1, torch.get_num_threads() // jobs)
        worker_cfg = dataclasses.replace(self.cfg, jobs=1, overwrite=False, progress=False)
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch state
        workers = [
            context.Process(target=_row_worker, args=(worker_cfg, share, threads), name=f"padd-rows-{i}")
            for i, share in enumerate(shares)
        ]
        self.console.print(
            f"{len(rows)} rows over {jobs} processes with {threads} thread(s) each: "
            + "; ".join(", ".join(_row_name(r) for r in share) for share in shares)
        )
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        failed = [(w.name, share) for w, share in zip(workers, shares, strict=True) if w.exitcode != 0]
        if failed:
            names = "; ".join(f"{n}: {', '.join(_row_name(r) for r in share)}" for n, share in failed)
            raise RuntimeError(
                f"row worker(s) failed ({names}); their errors are printed above. Finished cells are kept: "
                "run the same command again to continue."
            )


def _row_name(row: tuple) -> str:
    """The run name of a row of StudyRun.rows(): `padd-s0`, or `base` for a row without a seed."""
    return row[0] if row[4] is None else f"{row[0]}-s{row[4]}"


def _row_worker(cfg: ReproduceConfig, rows: list, threads: int) -> None:
    """One --jobs process: the given rows of a study whose shared cells are done."""
    import torch

    torch.set_num_threads(threads)
    run = StudyRun(cfg)
    for row in rows:
        run.run_row(*row)


def run_reproduce(cfg: ReproduceConfig, console: Console | None = None) -> Path:
    """Run (or continue) the study of cfg.preset into cfg.out; returns the report's path."""
    return StudyRun(cfg, console).run()
