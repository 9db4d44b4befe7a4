"""`padd demo`: `padd reproduce --preset tiny` with one seed and the main rows (Teacher, Base,
GRPO, Online KD, PADD), on a smaller budget than the tiny study's (40 rollout batches instead of 60,
half the warm-up tokens), so that the whole of it takes about 5 minutes on 2 CPU cores.

It takes the tiny teacher padd ships (padd.shipped; `--train-teacher` trains it afresh on the
miniature world, as the tiny study does, in about 9 more minutes), runs Stage I with the cluster
init, warms the experts up, trains vanilla GRPO, Online KD (the pure-distillation baseline PADD
must beat) and PADD from the same start on the same budget (the three runs side by side, --jobs 3),
evaluates every row, and writes report.md with its plots; the table is printed at the end. At a
given thread count two runs print the same table and write the same eval files (padd.determinism).
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from padd.config import ConfigError, DemoConfig, ReproduceConfig
from padd.shipped import SHIPPED, shipped_model
from padd.study import run_reproduce

DEMO_METHODS = "base,grpo,online-kd,padd"


def run_demo(cfg: DemoConfig, console: Console | None = None) -> Path:
    """Run (or continue) the demo study into cfg.out; returns the report's path."""
    if cfg.teacher_seed is not None and not cfg.train_teacher:
        raise ConfigError("--teacher-seed seeds a teacher trained here: add --train-teacher")
    teacher = None if cfg.train_teacher else str(shipped_model("tiny"))
    # trained afresh, by default the shipped teacher's own run
    teacher_seed = SHIPPED["tiny"].seed if cfg.teacher_seed is None else cfg.teacher_seed
    return run_reproduce(
        ReproduceConfig(
            preset="tiny",
            out=cfg.out,
            seeds=1,
            steps=cfg.steps,
            warmup_tokens=cfg.warmup_tokens,
            methods=DEMO_METHODS,
            ablations="none",
            eval_per_skill=cfg.eval_per_skill,
            teacher=teacher,
            teacher_seed=teacher_seed if cfg.train_teacher else 0,
            compare_inits=False,  # the demo's rows all start from Stage I's student at the preset's start
            jobs=cfg.jobs,
            overwrite=cfg.overwrite,
            progress=cfg.progress,
        ),
        console,
    )
