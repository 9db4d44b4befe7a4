"""`padd reproduce`: the paper's study on one initialisation and one budget, resumable cell by cell.

A study preset (YAML: `tiny`, `mini`, or a file) names the teacher, the data and the benchmarks,
and holds the settings of each stage as overrides of that command's config. The run directory:

    study.json            the resolved preset and the rows asked for
    cells.json            finished cells with their wall time (a cell listed here is never redone)
    teacher/              trained for the built-in presets (or the given checkpoint is used)
    stage1-{init}/        padd decompose, init cluster (PADD) and random (the −I ablation)
    warmup-{init}/        padd warmup
    train/{row}-s{seed}/  padd train, one run per method or ablation and seed
    eval/{row}[-s{seed}].json      padd eval of every row on every benchmark
    analysis/{row}[-s{seed}].json  NMI, ESI and expert loads against the teacher's clusters
    report.md, plots/     written by padd.report from the files above
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml
from rich.console import Console

from padd.config import (
    ConfigError,
    DecomposeConfig,
    EvalConfig,
    ReproduceConfig,
    TeacherConfig,
    TrainConfig,
    WarmupConfig,
)
from padd.world.teacher import PRESETS as TEACHER_PRESETS

METHODS = ("base", "grpo", "gspo", "rspo", "online-kd", "padd")
# ablation -> (Stage I init, padd train switches)
ABLATIONS: dict[str, tuple[str, dict]] = {
    "no-stage1": ("random", {}),
    "no-kd": ("cluster", {"no_kd": True}),
    "no-pr": ("cluster", {"no_pr": True}),
    "no-balance": ("cluster", {"no_reward_balance": True}),
    "no-kd-pr-balance": ("cluster", {"no_kd": True, "no_pr": True, "no_reward_balance": True}),
}
ROW_LABELS = {
    "teacher": "Teacher (dense)",
    "base": "Base (Stage I + warm-up)",
    "grpo": "Vanilla GRPO",
    "gspo": "GSPO",
    "rspo": "RSPO",
    "online-kd": "Online KD",
    "padd": "PADD",
    "no-stage1": "PADD −I (random upcycling)",
    "no-kd": "PADD −II (no adaptive KD)",
    "no-pr": "PADD −III (no path damping)",
    "no-balance": "PADD −IV (plain load balance)",
    "no-kd-pr-balance": "PADD −II–IV",
}
# Keys each stage section may not set: the study wires them.
_WIRED = {"teacher", "student", "corpus", "data", "out", "model", "bench", "init", "method", "seed", "resume"}
_SECTIONS = {"decompose": DecomposeConfig, "warmup": WarmupConfig, "train": TrainConfig, "eval": EvalConfig}


@dataclass
class Study:
    """One study: what to decompose, train on and evaluate, with each stage's settings."""

    teacher: str = "tiny"  # a `padd teacher` preset name, or a checkpoint directory
    teacher_steps: int | None = None  # optimizer steps of a preset teacher (default: the preset's)
    corpus: str = "world"  # Stage I statistics and warm-up text
    data: str = "world:add+sub+mul+expr+word"  # Phase B problems (train split)
    benches: str = "world:add,world:sub,world:mul,world:expr,world:word"  # Table 1 columns
    broad: str = "world:reverse"  # the broad-skill table's columns
    analysis_corpus: str | None = None  # held-out text for NMI / ESI / loads (default: the corpus)
    analysis_split: str = "test"  # its split (the world's test split is disjoint from its train split)
    analysis_tokens: int = 4096  # tokens of it
    exactness_check: bool = True  # compare student (all experts on) and teacher logits in float32 on CPU
    decompose: dict = field(default_factory=dict)
    warmup: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    eval: dict = field(default_factory=dict)


def load_study(spec: str) -> Study:
    """The study of a built-in preset name (tiny, mini) or a YAML file; unknown keys are errors."""
    if spec in ("tiny", "mini"):
        text = resources.files("padd.presets").joinpath(f"study-{spec}.yaml").read_text()
    elif Path(spec).is_file():
        text = Path(spec).read_text()
    else:
        raise ConfigError(f"--preset {spec!r}: not tiny, mini or an existing YAML file")
    raw = yaml.safe_load(text) or {}
    known = {f.name for f in dataclasses.fields(Study)}
    if unknown := set(raw) - known:
        raise ConfigError(f"{spec}: unknown study keys {sorted(unknown)}; known: {sorted(known)}")
    for section, cls in _SECTIONS.items():
        allowed = {f.name for f in dataclasses.fields(cls)} - _WIRED
        if bad := set(raw.get(section) or {}) - allowed:
            raise ConfigError(f"{spec}: {section} cannot set {sorted(bad)}; it may set {sorted(allowed)}")
    return Study(**raw)


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
        if cfg.eval_per_skill is not None:
            self.study.eval["world_size"] = cfg.eval_per_skill
        self.methods = _split(cfg.methods, METHODS, "methods")
        self.ablations = _split(cfg.ablations, tuple(ABLATIONS), "ablations")
        self.seeds = list(range(cfg.seeds))
        self.out = Path(cfg.out)
        manifest = {
            "study": dataclasses.asdict(self.study),
            "teacher_override": cfg.teacher,
        }
        self.manifest_file = self.out / "study.json"
        if self.out.exists() and any(self.out.iterdir()):
            if cfg.overwrite:
                shutil.rmtree(self.out)
            elif not self.manifest_file.exists():
                raise FileExistsError(f"--out {self.out} is not a study run; pick another folder or --overwrite")
            elif json.loads(self.manifest_file.read_text())["study"] != manifest["study"]:
                raise ConfigError(
                    f"{self.out} holds a study with other settings; pass --overwrite or another --out to start anew"
                )
        # The teacher: a given checkpoint, else the study's checkpoint, else trained here from a preset.
        self.train_teacher = not cfg.teacher and self.study.teacher in TEACHER_PRESETS
        self.teacher = self.out / "teacher" if self.train_teacher else Path(cfg.teacher or self.study.teacher)
        if not self.train_teacher and not self.teacher.exists():
            raise FileNotFoundError(f"teacher checkpoint {self.teacher} does not exist")
        self.out.mkdir(parents=True, exist_ok=True)
        self.cells_file = self.out / "cells.json"
        self.cells: dict = json.loads(self.cells_file.read_text()) if self.cells_file.exists() else {}
        manifest.update(methods=self.methods, ablations=self.ablations, seeds=self.seeds)
        _write_json(self.manifest_file, manifest)

    # -- bookkeeping ------------------------------------------------------------------------------

    def cell(self, name: str, stage: str, fn) -> None:
        """Run `fn` unless the cell finished before; record its wall time when it ends."""
        if name in self.cells:
            self.console.print(f"[dim]✓ {name} (done, {self.cells[name]['seconds']:.0f}s)")
            return
        self.console.rule(name)
        t0 = time.perf_counter()
        result = fn()
        self.cells[name] = {"stage": stage, "seconds": round(time.perf_counter() - t0, 2)}
        if result:
            self.cells[name]["result"] = result
        _write_json(self.cells_file, self.cells)

    def _common(self) -> dict:
        return {"device": self.cfg.device, "progress": self.cfg.progress}

    # -- the study --------------------------------------------------------------------------------

    def rows(self) -> list[tuple[str, str, dict, int | None]]:
        """(row, Stage I init, padd-train overrides, seed) of every trained or evaluated student."""
        out = [("base", "cluster", {}, None)] if "base" in self.methods else []
        for seed in self.seeds:
            for m in self.methods:
                if m != "base":
                    out.append((m, "cluster", {"method": m}, seed))
            for a in self.ablations:
                init, switches = ABLATIONS[a]
                out.append((a, init, {"method": "padd", **switches}, seed))
        return out

    def inits(self) -> list[str]:
        """Both Stage I inits, always: the report compares their NMI / ESI even without the −I row."""
        return ["cluster", "random"]

    def run(self) -> Path:
        from padd.report import write_report

        if self.train_teacher:
            self.cell("teacher", "teacher", self._teacher)
        for init in self.inits():
            self.cell(f"stage1-{init}", "stage I", lambda init=init: self._decompose(init))
            self.cell(f"warmup-{init}", "warm-up", lambda init=init: self._warmup(init))
            self.cell(f"analysis/{init}", "analysis", lambda init=init: self._analyse(init, self.warm(init)))
        self.cell("eval/teacher", "eval", lambda: self._eval("teacher", self.teacher))
        for row, init, train_kw, seed in self.rows():
            name = row if seed is None else f"{row}-s{seed}"
            if row == "base":
                student = self.warm(init)
            else:
                self.cell(
                    f"train/{name}", "phase B", lambda n=name, i=init, kw=train_kw, s=seed: self._train(n, i, kw, s)
                )
                student = self.out / "train" / name / "student"
            self.cell(f"eval/{name}", "eval", lambda n=name, st=student: self._eval(n, st))
            if row != "base":
                self.cell(f"analysis/{name}", "analysis", lambda n=name, st=student: self._analyse(n, st))
        return write_report(self.out, self.console)

    def warm(self, init: str) -> Path:
        return self.out / f"warmup-{init}"

    def _teacher(self) -> None:
        from padd.world.teacher import train_teacher

        cfg = TeacherConfig(
            out=str(self.teacher),
            preset=self.study.teacher,
            steps=self.study.teacher_steps,
            eval_per_skill=0,
            overwrite=True,
            **self._common(),
        )
        train_teacher(cfg, self.console)

    def _decompose(self, init: str) -> dict:
        import torch

        from padd.analysis import max_logit_gap_all_experts
        from padd.stage1.decompose import decompose

        settings = {"experts": 8, "top_k": 2, **self.study.decompose}
        decompose(
            DecomposeConfig(
                teacher=str(self.teacher),
                corpus=self.study.corpus,
                out=str(self.out / f"stage1-{init}"),
                init=init,
                overwrite=True,
                **{**self._common(), **settings},
            ),
            self.console,
        )
        if not self.study.exactness_check:
            return {}
        ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
        gap = max_logit_gap_all_experts(self.teacher, self.out / f"stage1-{init}", ids)
        self.console.print(f"exactness (top-k = E): max |logit gap| = {gap:.2e}")
        return {"max_logit_gap_all_experts": gap}

    def _warmup(self, init: str) -> None:
        from padd.stage1.warmup import run_warmup

        run_warmup(
            WarmupConfig(
                student=str(self.out / f"stage1-{init}"),
                teacher=str(self.teacher),
                corpus=self.study.corpus,
                out=str(self.warm(init)),
                overwrite=True,
                **{**self._common(), **self.study.warmup},
            ),
            self.console,
        )

    def _train(self, name: str, init: str, overrides: dict, seed: int) -> None:
        from padd.phase_b.loop import run_train

        run_dir = self.out / "train" / name
        resume = (run_dir / "checkpoint" / "trainer_state.pt").exists()
        cfg = TrainConfig(
            student=str(self.warm(init)),
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
        from padd.eval import run_eval

        target = self.out / "eval" / f"{name}.json"
        tmp = target.with_suffix(".json.tmp")
        settings = {"batch_size": 64, "max_new_tokens": 160, **self.study.eval}
        run_eval(
            EvalConfig(
                model=str(model),
                out=str(tmp),
                bench=f"{self.study.benches},{self.study.broad}",
                **{**self._common(), **settings},
            ),
            self.console,
        )
        os.replace(tmp, target)

    def _analyse(self, name: str, student_dir: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from padd.analysis import expert_specialisation
        from padd.corpus import iter_texts, sample_windows
        from padd.stage1.decompose import STAGE1_FILE

        partition = json.loads((self.out / "stage1-cluster" / STAGE1_FILE).read_text())
        clusters = [torch.tensor(la["experts"]) for la in partition["layers"] if not la.get("dense")]
        tokenizer = AutoTokenizer.from_pretrained(student_dir)
        windows = sample_windows(
            iter_texts(self.study.analysis_corpus or self.study.corpus, None, self.study.analysis_split),
            tokenizer,
            n_tokens=self.study.analysis_tokens,
            seq_len=128,
            seed=0,
        )
        device = torch.device(self.cfg.device)
        student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).to(device).eval()
        teacher = AutoModelForCausalLM.from_pretrained(self.teacher, dtype=torch.float32).to(device).eval()
        result = expert_specialisation(student, teacher, windows, [c.to(device) for c in clusters])
        _write_json(self.out / "analysis" / f"{name}.json", result)
        self.console.print(f"{name}: NMI {result['nmi']:.3f}, ESI {result['esi']:.3f} against the teacher's clusters")


def _write_json(path: Path, obj) -> None:
    """Write JSON atomically (temp file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def run_reproduce(cfg: ReproduceConfig, console: Console | None = None) -> Path:
    """Run (or continue) the study of cfg.preset into cfg.out; returns the report's path."""
    return StudyRun(cfg, console).run()
