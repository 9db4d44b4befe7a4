"""`padd demo`: `padd reproduce --preset tiny` with one seed and the main rows (Teacher, Base,
GRPO, Online KD, PADD), on a smaller budget than the tiny study's (40 rollout batches instead of 60,
half the warm-up tokens) so that the whole of it takes under 15 minutes on 2 CPU cores.

It trains the tiny teacher on the miniature world, runs Stage I with the cluster init, warms the
experts up, trains vanilla GRPO, Online KD (the pure-distillation baseline PADD must beat) and PADD
from the same start on the same budget (the three runs side by side, --jobs 3), evaluates every
row, and writes report.md with its plots; the table is printed at the end.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from padd.config import DemoConfig, ReproduceConfig
from padd.study import run_reproduce

DEMO_METHODS = "base,grpo,online-kd,padd"


def run_demo(cfg: DemoConfig, console: Console | None = None) -> Path:
    """Run (or continue) the demo study into cfg.out; returns the report's path."""
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
            teacher_seed=cfg.teacher_seed,
            compare_inits=False,  # the demo's rows all start from Stage I's student at the preset's start
            jobs=cfg.jobs,
            overwrite=cfg.overwrite,
            progress=cfg.progress,
        ),
        console,
    )
