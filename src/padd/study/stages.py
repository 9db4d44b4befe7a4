"""The work of each cell of a study run: train the teacher (and a pretrained student), Stage I,
the warm-ups, Phase B, the evaluations and the expert analyses, each a call of the padd command
that does it, with the study's settings for that command and the run folder's paths."""

from __future__ import annotations

import os
from pathlib import Path

from rich.console import Console
from transformers import AutoTokenizer

from padd.analysis import expert_specialisation, max_logit_gap_all_experts
from padd.config import (
    DecomposeConfig,
    EvalConfig,
    ReproduceConfig,
    SeedConfig,
    TeacherConfig,
    TrainConfig,
    WarmupConfig,
)
from padd.corpus import sample_corpus
from padd.eval import run_eval
from padd.io import atomic_write_json
from padd.models import load_causal_lm
from padd.phase_b.loop import run_train
from padd.stage1.decompose import decompose
from padd.stage1.reference import read_reference
from padd.stage1.seed import run_seed
from padd.stage1.warmup import run_warmup
from padd.study.preset import Study
from padd.teacher import train_teacher


class StudyStages:
    """The cells' work for one run folder: each method writes its stage's output under `out`."""

    def __init__(
        self,
        cfg: ReproduceConfig,
        study: Study,
        out: Path,
        *,
        teacher: Path,
        student: Path | None,
        inits: dict[str, str],
        start: str,
        console: Console,
    ):
        self.cfg, self.study, self.out, self.console = cfg, study, out, console
        self.teacher, self.student, self.inits, self.start = teacher, student, inits, start

    def _common(self) -> dict:
        return {"device": self.cfg.device, "progress": self.cfg.progress}

    def warm(self, init: str, start: str | None = None) -> Path:
        """The warmed-up student of one init, with the preset's router start or another one."""
        start = start or self.start
        return self.out / (f"warmup-{init}" if start == self.start else f"warmup-{init}-{start}")

    def pretrain(self, out: Path, preset: str, **options) -> None:
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

    def pretrain_teacher(self) -> None:
        self.pretrain(self.teacher, self.study.teacher, steps=self.study.teacher_steps)

    def pretrain_student(self) -> None:
        # with the teacher's tokenizer: the paper's pairs share theirs
        self.pretrain(self.student, self.study.student, tokenizer=str(self.teacher))

    def seed_student(self) -> dict:
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

    def decompose_teacher(self, init: str) -> dict:
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

    def warm_up(self, init: str, restart: str | None = None) -> None:
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

    def train_row(self, name: str, student: Path, overrides: dict, seed: int) -> None:

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

    def evaluate(self, name: str, model: Path) -> None:

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

    def analyse(self, name: str, student_dir: Path) -> None:
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
