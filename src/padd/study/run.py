"""`padd reproduce`: the paper's study on one initialisation and one budget, resumable cell by cell.

A study preset (YAML: `tiny`, `mini`, or a file) names the teacher, the data and the benchmarks,
and holds the settings of each stage as overrides of that command's config. The run directory:

    study.json            the resolved preset and the rows asked for
    cells.json            finished cells with their wall time (a cell listed here is never redone)
    teacher/              trained for the built-in presets (or the given checkpoint is used)
    student/              a pretrained MoE student trained for a preset that names one (tiny-pretrained)
    stage1-{init}/        padd decompose, init cluster (PADD) and random (the −I ablation); with a
                          pretrained student, stage1-seeded/ is padd seed (unseeded: the student as it is)
    warmup-{init}/        padd warmup
    warmup-{init}-{start}/ the same experts with the other router start (padd warmup --epochs 0)
    train/{row}-s{seed}/  padd train, one run per method, ablation or swept value and seed
    eval/{row}[-s{seed}].json      padd eval of every row on every benchmark
    analysis/{row}[-s{seed}].json  NMI, ESI and expert loads against the teacher's clusters
    report.md, plots/     written by padd.report from the files above

Every row starts from the preset's router start (`warmup.router_init`); the other start (uniform
or distill) is built beside it for the NMI / ESI comparison at both starts (unless
--no-compare-inits) and for the `other-start` row, which measures what the choice of start is worth.

With a pretrained MoE student (`student:`, the paper's own setting) Stage I is `padd seed`, every
trained row starts from the seeded and warmed-up student, the Base row is the pretrained student as
it is, and PADD −I is PADD from the same warm-up of the unseeded student.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import time
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml
from rich.console import Console
from transformers import AutoTokenizer

from padd.analysis import expert_specialisation, max_logit_gap_all_experts
from padd.config import (
    BUILTIN_PRESETS,
    ConfigError,
    DecomposeConfig,
    EvalConfig,
    PlanConfig,
    ReproduceConfig,
    SeedConfig,
    TeacherConfig,
    TrainConfig,
    WarmupConfig,
    base_type,
    renamed_hint,
)
from padd.corpus import sample_corpus
from padd.errors import UserError
from padd.eval import run_eval
from padd.io import atomic_write_json
from padd.methods import ABLATIONS, METHOD_ONLY_OPTIONS, METHODS, OFF_AT_ZERO, TABLE_ROWS, options_of
from padd.models import load_causal_lm
from padd.phase_b.loop import run_train
from padd.report import write_report
from padd.stage1.decompose import decompose
from padd.stage1.reference import read_reference
from padd.stage1.seed import run_seed
from padd.stage1.warmup import run_warmup
from padd.teacher import PRESETS as TEACHER_PRESETS
from padd.teacher import train_teacher

ROUTER_STARTS = ("uniform", "distill")
# Stage I's init with and without it (the −I ablation's), by kind of student
INITS = {"cluster": "cluster", "random": "random"}
PRETRAINED_INITS = {"cluster": "seeded", "random": "unseeded"}
# the rows whose meaning changes with a pretrained student, and what they are then
PRETRAINED_LABELS = {"base": "Base (pretrained MoE student)", "no-stage1": "PADD −I (no seeding)"}

# Keys each stage section may not set: the study wires them.
_WIRED = {"teacher", "student", "corpus", "data", "out", "model", "bench", "init", "method", "seed", "resume"}
_SECTIONS = {
    "decompose": DecomposeConfig,
    "seed": SeedConfig,
    "warmup": WarmupConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "plan": PlanConfig,
}


@dataclass
class Study:
    """One study: what to decompose, train on and evaluate, with each stage's settings."""

    teacher: str = "tiny"  # a `padd teacher` preset name, or a checkpoint directory
    teacher_steps: int | None = None  # optimizer steps of a preset teacher (default: the preset's)
    # a pretrained MoE student (a `padd teacher` MoE preset trained here with the teacher's tokenizer,
    # or a checkpoint): Stage I seeds it (padd seed) instead of decomposing the teacher
    student: str | None = None
    corpus: str = "world"  # Stage I statistics and warm-up text
    data: str = "world:add+sub+mul+expr+word"  # Phase B problems (train split)
    benches: str = "world:add,world:sub,world:mul,world:expr,world:word"  # Table 1 columns
    broad: str = "world:reverse"  # the broad-skill table's columns
    analysis_corpus: str | None = None  # held-out text for NMI / ESI / loads (default: the corpus)
    analysis_split: str = "test"  # its split (the world's test split is disjoint from its train split)
    analysis_tokens: int = 4096  # tokens of it
    analysis_seq_len: int = 128  # tokens per window of it
    exactness_check: bool = True  # padd decompose's student (all experts on) against the teacher, float32, CPU
    decompose: dict = field(default_factory=dict)
    seed: dict = field(default_factory=dict)  # padd seed settings (a study with a pretrained student)
    warmup: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)  # padd train settings shared by every method
    methods: dict = field(default_factory=dict)  # method -> its own options (padd.methods), e.g. padd: {lam: 100}
    eval: dict = field(default_factory=dict)
    plan: dict = field(default_factory=dict)  # padd plan's settings of this study (hardware, prompt length)


def load_study(spec: str) -> Study:
    """The study of a built-in preset name (tiny, mini, tiny-pretrained) or a YAML file; unknown keys are errors."""
    if spec in BUILTIN_PRESETS:
        text = resources.files("padd.presets").joinpath(f"study-{spec}.yaml").read_text()
    elif Path(spec).is_file():
        text = Path(spec).read_text()
    else:
        raise ConfigError(f"--preset {spec!r}: not one of {', '.join(BUILTIN_PRESETS)} or an existing YAML file")
    raw = yaml.safe_load(text) or {}
    known = {f.name for f in dataclasses.fields(Study)}
    if unknown := set(raw) - known:
        raise ConfigError(f"{spec}: unknown study keys {sorted(unknown)}; known: {sorted(known)}")
    method_only = set(METHOD_ONLY_OPTIONS)
    for section, cls in _SECTIONS.items():
        allowed = {f.name for f in dataclasses.fields(cls)} - _WIRED - {"study"}
        if section == "train":  # method options belong under methods: METHOD; the rows set the switches
            allowed -= method_only | {"no_kd", "no_pr", "no_reward_balance"}
        if bad := set(raw.get(section) or {}) - allowed:
            hint = "; method options go under methods: METHOD:" if section == "train" and bad & method_only else ""
            hint += "".join(renamed_hint(k) for k in sorted(bad))
            raise ConfigError(f"{spec}: {section} cannot set {sorted(bad)}{hint}; it may set {sorted(allowed)}")
    for method, options in (raw.get("methods") or {}).items():
        if method not in METHODS:
            raise ConfigError(f"{spec}: methods: unknown method {method!r}; known: {', '.join(METHODS)}")
        if bad := set(options or {}) - set(METHODS[method].options):
            raise ConfigError(
                f"{spec}: methods: {method} does not use {sorted(bad)}"
                + "".join(renamed_hint(k) for k in sorted(bad))
                + f"; it reads {sorted(METHODS[method].options)}"
            )
    study = Study(**raw)
    if study.student is not None:
        if "exactness_check" in raw:
            raise ConfigError(f"{spec}: exactness_check tests padd decompose's student; a seeded student has none")
        if study.decompose:
            raise ConfigError(
                f"{spec}: a study with a pretrained student seeds it (seed:); drop the decompose: section"
            )
        if study.warmup.get("router_init", "keep") != "keep" or study.warmup.get("routing", "frozen") != "frozen":
            raise ConfigError(
                f"{spec}: with a pretrained student every row starts from the seeded router, kept (warmup "
                "router_init: keep, routing: frozen); compare other routers with padd warmup directly"
            )
        return study
    if study.seed:
        raise ConfigError(f"{spec}: seed: settings need a pretrained MoE student (student:); decompose: builds one")
    if missing := [k for k in ("experts", "top_k") if k not in study.decompose]:
        raise ConfigError(f"{spec}: decompose must set {' and '.join(missing)} (the student's shape has no default)")
    if study.warmup.get("router_init", "uniform") not in ROUTER_STARTS:
        raise ConfigError(f"{spec}: warmup router_init must be one of {', '.join(ROUTER_STARTS)} in a study")
    if study.warmup.get("routing", "uniform") != "uniform":
        raise ConfigError(
            f"{spec}: the warm-up of a decomposed student runs behind the uniform router (routing: uniform)"
        )
    return study


def parse_sweep(spec: str | None, study: Study) -> tuple[str, str, list] | None:
    """`METHOD:OPTION=V1,V2` -> (method, option, values), each value of the option's type; the option
    must be one the method reads or one every method shares."""
    if not spec:
        return None
    try:
        head, values = spec.split("=", 1)
        method, option = head.split(":", 1)
    except ValueError:
        raise ConfigError(f"--sweep {spec!r}: write METHOD:OPTION=V1,V2 (e.g. padd:lam=0,100,1000)") from None
    option = option.replace("-", "_")
    if method not in METHODS:
        raise ConfigError(f"--sweep: unknown method {method!r}; choose from {', '.join(METHODS)}")
    shared = {f.name for f in dataclasses.fields(TrainConfig)} - _WIRED - set(METHOD_ONLY_OPTIONS)
    if option not in options_of(method) and option not in shared:
        raise ConfigError(f"--sweep: {method} does not use {option!r}")
    kind, _ = base_type(typing.get_type_hints(TrainConfig)[option])
    try:
        parsed = [kind(v.strip()) for v in values.split(",") if v.strip()]
    except ValueError as err:
        raise ConfigError(f"--sweep {spec!r}: {option} takes {kind.__name__} values ({err})") from None
    if not parsed:
        raise ConfigError(f"--sweep {spec!r}: no values")
    return method, option, parsed


def sweep_row(method: str, option: str, value) -> str:
    """The row name of one swept value: padd@lam=100."""
    return f"{method}@{option}={value}"


def _split(value: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    if value == "all":
        return list(allowed)
    if value in ("", "none"):
        return []
    items = [v.strip() for v in value.split(",") if v.strip()]
    if bad := [v for v in items if v not in allowed]:
        raise ConfigError(f"--{flag}: unknown {bad}; choose from {', '.join(allowed)} (or all / none)")
    return items


class StudyRun:
    """The cells of one study and the bookkeeping that makes an interrupted run continue."""

    def __init__(self, cfg: ReproduceConfig, console: Console | None = None):
        self.cfg, self.console = cfg, console or Console()
        self.study = load_study(cfg.preset)
        if cfg.steps is not None:
            self.study.train["steps"] = cfg.steps
        if cfg.warmup_tokens is not None:
            self.study.warmup["tokens"] = cfg.warmup_tokens
        if cfg.eval_per_skill is not None:
            self.study.eval["world_per_skill"] = cfg.eval_per_skill
        self.methods = _split(cfg.methods, TABLE_ROWS, "methods")
        self.ablations = _split(cfg.ablations, tuple(ABLATIONS), "ablations")
        self.sweep = parse_sweep(cfg.sweep, self.study)
        self.seeds = list(range(cfg.seeds))
        if cfg.student:
            self.study.student = cfg.student
        self.pretrained = self.study.student is not None
        self.inits = PRETRAINED_INITS if self.pretrained else INITS
        # every row's router start
        self.start = self.study.warmup.get("router_init", "keep" if self.pretrained else "uniform")
        if self.pretrained and cfg.ablations == "all":  # every ablation that applies to a pretrained student
            self.ablations.remove("other-start")
        elif self.pretrained and "other-start" in self.ablations:
            raise ConfigError(
                "--ablations other-start compares router starts of a decomposed student; a pretrained student keeps "
                "its seeded router (leave other-start out)"
            )
        if cfg.jobs < 1:
            raise ConfigError(f"--jobs {cfg.jobs}: give the number of processes to spread the rows over (1 or more)")
        if cfg.teacher and cfg.teacher_seed:
            raise ConfigError("--teacher-seed seeds a teacher trained here; it has no effect with --teacher")
        if cfg.student and load_study(cfg.preset).decompose:
            raise ConfigError(f"--student: the {cfg.preset} study decomposes its teacher; it has no pretrained student")
        self.out = Path(cfg.out)
        manifest = {
            "study": dataclasses.asdict(self.study),
            "teacher_override": cfg.teacher,
            "student_override": cfg.student,
            "teacher_seed": cfg.teacher_seed,
            "eval_split": cfg.eval_split,
        }
        self.manifest_file = self.out / "study.json"
        if self.out.exists() and any(self.out.iterdir()):
            if cfg.overwrite:
                shutil.rmtree(self.out)
            elif not self.manifest_file.exists():
                raise UserError(f"--out {self.out} is not a study run; pick another folder or --overwrite")
            elif {k: v for k, v in json.loads(self.manifest_file.read_text()).items() if k in manifest} != manifest:
                raise ConfigError(
                    f"{self.out} holds a study with other settings; pass --overwrite or another --out to start anew"
                )
        # The teacher: a given checkpoint, else the study's checkpoint, else trained here from a preset.
        self.train_teacher = not cfg.teacher and self.study.teacher in TEACHER_PRESETS
        self.teacher = self.out / "teacher" if self.train_teacher else Path(cfg.teacher or self.study.teacher)
        if not self.train_teacher and not self.teacher.exists():
            raise UserError(f"--teacher {self.teacher} does not exist; give a checkpoint folder or a preset name")
        # The pretrained student, the same way: a given or the study's checkpoint, or trained here.
        self.train_student = self.pretrained and self.study.student in TEACHER_PRESETS
        if self.train_student and not TEACHER_PRESETS[self.study.student].experts:
            raise ConfigError(f"student: {self.study.student} is a dense preset; name an MoE one (tiny-moe)")
        self.student = None
        if self.pretrained:
            self.student = self.out / "student" if self.train_student else Path(self.study.student)
            if not self.train_student and not self.student.exists():
                raise UserError(f"--student {self.student} does not exist; give a checkpoint folder or an MoE preset")
        self.out.mkdir(parents=True, exist_ok=True)
        self._lock_depth, self._lock_fd = 0, -1
        self.cells_file = self.out / "cells.json"
        self.cells: dict = json.loads(self.cells_file.read_text()) if self.cells_file.exists() else {}
        manifest.update(
            methods=self.methods,
            ablations=self.ablations,
            seeds=self.seeds,
            router_start=self.start,
            inits=self.inits,
            row_labels=PRETRAINED_LABELS if self.pretrained else {},
            sweep=None
            if self.sweep is None
            else {
                "method": self.sweep[0],
                "option": self.sweep[1],
                "values": self.sweep[2],
                "base": self.setting(self.sweep[0], self.sweep[1]),
            },
            sweep_rows=self.sweep_rows(),
        )
        with self._locked():
            atomic_write_json(self.manifest_file, self._merged_manifest(manifest))

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

    @contextlib.contextmanager
    def _locked(self):
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

    # -- bookkeeping ------------------------------------------------------------------------------

    def cell(self, name: str, stage: str, fn) -> None:
        """Run `fn` unless the cell finished before; record its wall time when it ends.

        Two `padd reproduce` processes may share one --out with disjoint rows (one per core): a cell
        every row needs runs under the folder's lock, and cells.json is re-read before each check
        and write, so neither process redoes nor drops the other's cells."""
        shared = not name.startswith(("train/", "eval/"))
        with self._locked() if shared else contextlib.nullcontext():
            self._read_cells()
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
            with self._locked():
                self._read_cells()
                self.cells[name] = record
                atomic_write_json(self.cells_file, self.cells)

    def _read_cells(self) -> None:
        on_disk = json.loads(self.cells_file.read_text()) if self.cells_file.exists() else {}
        self.cells = {**self.cells, **on_disk}

    def _common(self) -> dict:
        return {"device": self.cfg.device, "progress": self.cfg.progress}

    # -- the study --------------------------------------------------------------------------------

    def method_settings(self, method: str, switches: dict | None = None) -> dict:
        """padd train overrides of one method's row: the preset's options for that method, without
        those its ablation switches turn off."""
        used = options_of(method, switches)
        return {k: v for k, v in (self.study.methods.get(method) or {}).items() if k in used}

    def setting(self, method: str, option: str):
        """The value `method`'s own row trains with: the preset's, else padd.methods', else padd train's."""
        for source in (self.study.methods.get(method) or {}, self.study.train, METHODS[method].options):
            if option in source:
                return source[option]
        return next(f.default for f in dataclasses.fields(TrainConfig) if f.name == option)

    def sweep_rows(self) -> list[str]:
        if self.sweep is None:
            return []
        method, option, values = self.sweep
        return [sweep_row(method, option, v) for v in values]

    def rows(self) -> list[tuple[str, str, str, dict, int | None]]:
        """(row, Stage I init, router start, padd-train overrides, seed) of every trained or evaluated student."""
        with_stage1 = self.inits["cluster"]
        out = [("base", with_stage1, self.start, {}, None)] if "base" in self.methods else []
        for seed in self.seeds:
            for m in self.methods:
                if m != "base":
                    out.append((m, with_stage1, self.start, {"method": m, **self.method_settings(m)}, seed))
            for a in self.ablations:
                v = ABLATIONS[a]
                kw = {"method": "padd", **v.switches, **self.method_settings("padd", v.switches), **v.shared}
                out.append((a, self.inits[v.init], self.other_start if v.start == "other" else self.start, kw, seed))
            if self.sweep is not None:
                method, option, values = self.sweep
                for value, row in zip(values, self.sweep_rows(), strict=True):
                    # at 0 the option turns its stage off: the preset's options of that stage go with it
                    off = OFF_AT_ZERO.get(option, ()) if value == 0 else ()
                    kept = {k: v for k, v in self.method_settings(method).items() if k not in off}
                    kw = {"method": method, **kept, option: value}
                    out.append((row, with_stage1, self.start, kw, seed))
        return out

    @property
    def other_start(self) -> str:
        """The router start the preset does not use (built beside it for NMI / ESI and other-start)."""
        return next(s for s in ROUTER_STARTS if s != self.start)

    def run(self) -> Path:

        if self.train_teacher:
            self.cell("teacher", "teacher", self._teacher)
        if self.train_student:
            self.cell("student", "student", self._student)
        for init, starts in self.warm_starts().items():
            if init == "seeded":
                self.cell("stage1-seeded", "stage I", self._seed)
            elif init != "unseeded":  # the unseeded student is the pretrained one as it is
                self.cell(f"stage1-{init}", "stage I", lambda init=init: self._decompose(init))
            self.cell(f"warmup-{init}", "warm-up", lambda init=init: self._warmup(init))
            for start in starts:
                if start != self.start:
                    self.cell(f"warmup-{init}-{start}", "warm-up", lambda i=init, s=start: self._warmup(i, restart=s))
                if self.cfg.compare_inits:
                    self.cell(
                        f"analysis/{init}-{start}",
                        "analysis",
                        lambda i=init, s=start: self._analyse(f"{i}-{s}", self.warm(i, s)),
                    )
        self.cell("eval/teacher", "eval", lambda: self._eval("teacher", self.teacher))
        rows = self.rows()
        if self.cfg.jobs > 1 and len(rows) > 1:
            self._run_rows_in_workers(rows)
        else:
            for row in rows:
                self.run_row(*row)
        return write_report(self.out, self.console)

    def run_row(self, row: str, init: str, start: str, train_kw: dict, seed: int | None) -> None:
        """Train (unless it is the base row), evaluate and analyse one row of the study."""
        name = _row_name((row, init, start, train_kw, seed))
        if row == "base":
            student = self.student if self.pretrained else self.warm(init, start)
        else:
            self.cell(f"train/{name}", "phase B", lambda: self._train(name, self.warm(init, start), train_kw, seed))
            student = self.out / "train" / name / "student"
        self.cell(f"eval/{name}", "eval", lambda: self._eval(name, student))
        if row != "base":
            self.cell(f"analysis/{name}", "analysis", lambda: self._analyse(name, student))

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

    def warm_starts(self) -> dict[str, list[str]]:
        """The warmed-up students to build: init -> router starts. Both inits at both starts for the
        report's NMI / ESI comparison (--compare-inits), else only those the rows train from."""
        if self.pretrained:  # one start (the seeded router, kept); both inits to compare them
            inits = {init for _, init, _, _, _ in self.rows()} | {self.inits["cluster"]}
            if self.cfg.compare_inits:
                inits |= set(self.inits.values())
            return {init: [self.start] for init in self.inits.values() if init in inits}
        if self.cfg.compare_inits:
            return {init: [self.start, self.other_start] for init in ("cluster", "random")}
        needed: dict[str, list[str]] = {"cluster": [self.start]}
        for _, init, start, _, _ in self.rows():
            needed.setdefault(init, [self.start])
            if start not in needed[init]:
                needed[init].append(start)
        return needed

    def warm(self, init: str, start: str | None = None) -> Path:
        """The warmed-up student of one init, with the preset's router start or another one."""
        start = start or self.start
        return self.out / (f"warmup-{init}" if start == self.start else f"warmup-{init}-{start}")

    def _pretrain(self, out: Path, preset: str, **options) -> None:
        """`padd teacher` for a model the preset names: the teacher, or the pretrained student."""
        cfg = TeacherConfig(
            out=str(out),
            preset=preset,
            seed=self.cfg.teacher_seed,
            eval_per_skill=0,
            overwrite=True,
            **options,
            **self._common(),
        )
        train_teacher(cfg, self.console)

    def _teacher(self) -> None:
        self._pretrain(self.teacher, self.study.teacher, steps=self.study.teacher_steps)

    def _student(self) -> None:
        # with the teacher's tokenizer: the paper's pairs share theirs
        self._pretrain(self.student, self.study.student, tokenizer=str(self.teacher))

    def _seed(self) -> dict:
        record = run_seed(
            SeedConfig(
                teacher=str(self.teacher),
                student=str(self.student),
                corpus=self.study.corpus,
                out=str(self.out / "stage1-seeded"),
                overwrite=True,
                **{**self._common(), **self.study.seed},
            ),
            self.console,
        )
        kept = ("layer_map", "nmi", "esi", "topk_agreement_with_pretrained", "lm_loss", "next_token_agreement")
        return {k: record[k] for k in kept}

    def _decompose(self, init: str) -> dict:
        import torch

        decompose(
            DecomposeConfig(
                teacher=str(self.teacher),
                corpus=self.study.corpus,
                out=str(self.out / f"stage1-{init}"),
                init=init,
                overwrite=True,
                **{**self._common(), **self.study.decompose},
            ),
            self.console,
        )
        if not self.study.exactness_check:
            return {}
        ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
        gap = max_logit_gap_all_experts(self.teacher, self.out / f"stage1-{init}", ids)
        self.console.print(f"exactness (top-k = E): max |logit gap| = {gap:.2e}")
        return {"max_logit_gap_all_experts": gap}

    def _warmup(self, init: str, restart: str | None = None) -> None:
        """The warm-up of one init; with `restart`, only another router start on its experts."""

        settings = {**self.study.warmup}
        source, out = self.out / f"stage1-{init}", self.warm(init)
        if init == "unseeded":
            source = self.student
        if restart is not None:
            settings.update(epochs=0, router_init=restart)
            source, out = self.warm(init), self.warm(init, restart)
        run_warmup(
            WarmupConfig(
                student=str(source),
                teacher=str(self.teacher),
                corpus=self.study.corpus,
                out=str(out),
                overwrite=True,
                **{**self._common(), **settings},
            ),
            self.console,
        )

    def _train(self, name: str, student: Path, overrides: dict, seed: int) -> None:

        run_dir = self.out / "train" / name
        resume = (run_dir / "checkpoint" / "trainer_state.pt").exists()
        cfg = TrainConfig(
            student=str(student),
            teacher=str(self.teacher),
            data=self.study.data,
            out=str(run_dir),
            seed=seed,
            resume=resume,
            overwrite=not resume,
            **{**self._common(), **self.study.train, **overrides},
        )
        run_train(cfg, self.console)

    def _eval(self, name: str, model: Path) -> None:

        target = self.out / "eval" / f"{name}.json"
        tmp = target.with_suffix(".json.tmp")
        run_eval(
            EvalConfig(
                model=str(model),
                out=str(tmp),
                overwrite=True,  # the cell's own scratch file, left by an interrupted run
                bench=f"{self.study.benches},{self.study.broad}",
                split=self.cfg.eval_split,
                **{**self._common(), **self.study.eval},
            ),
            self.console,
        )
        os.replace(tmp, target)

    def _analyse(self, name: str, student_dir: Path) -> None:
        import torch

        reference = read_reference(self.out / f"stage1-{self.inits['cluster']}")
        tokenizer = AutoTokenizer.from_pretrained(student_dir)
        windows = sample_corpus(
            self.study.analysis_corpus or self.study.corpus,
            tokenizer,
            n_tokens=self.study.analysis_tokens,
            seq_len=self.study.analysis_seq_len,
            split=self.study.analysis_split,
        )
        device = torch.device(self.cfg.device)
        student = load_causal_lm(student_dir, device=device)
        teacher = load_causal_lm(self.teacher, device=device)
        ref = reference.to(device)
        result = expert_specialisation(student, teacher, windows, ref.clusters, teacher_layers=ref.teacher_layers)
        atomic_write_json(self.out / "analysis" / f"{name}.json", result)
        self.console.print(f"{name}: NMI {result['nmi']:.3f}, ESI {result['esi']:.3f} against the teacher's clusters")


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
