"""`padd demo`: the end-to-end run on the miniature world.

Today it trains the tiny teacher on the world, runs Stage I (`padd decompose` on the world corpus)
with PADD's cluster init and with the random-split baseline, checks each student's exactness with
every expert active, and evaluates teacher and students (top-K routing, before any training) on
every world skill.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from padd.config import DecomposeConfig, DemoConfig, EvalConfig, TeacherConfig
from padd.eval import run_eval
from padd.stage1.decompose import decompose
from padd.world.teacher import train_teacher


@torch.no_grad()
def max_logit_gap_all_experts(teacher_dir: Path, student_dir: Path, input_ids: torch.Tensor) -> float:
    """max |student - teacher| logits with every expert selected (top-k = E): the exactness check."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(student_dir)
    cfg.num_experts_per_tok = cfg.n_routed_experts
    student = AutoModelForCausalLM.from_pretrained(student_dir, config=cfg, dtype=torch.float32).eval()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    return float((student(input_ids).logits - teacher(input_ids).logits).abs().max())


def run_demo(cfg: DemoConfig, console: Console | None = None) -> None:
    console = console or Console()
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()):
        if not cfg.overwrite:
            raise FileExistsError(f"--out {out} exists and is not empty; pass --overwrite to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    console.rule("tiny teacher, trained on the world")
    teacher = out / "teacher"
    train_teacher(
        TeacherConfig(
            out=str(teacher), preset="tiny", seed=cfg.seed, eval_per_skill=cfg.eval_per_skill, progress=cfg.progress
        ),
        console,
    )
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(cfg.seed))
    models = {"teacher": teacher}
    for init in ("cluster", "random"):
        console.rule(f"Stage I, {init} init")
        student = out / f"student-{init}"
        decompose(
            DecomposeConfig(
                teacher=str(teacher),
                corpus="world",
                out=str(student),
                experts=8,
                top_k=2,
                init=init,
                seed=cfg.seed,
                tokens=8192,
                seq_len=128,
                progress=cfg.progress,
            ),
            console,
        )
        console.print(
            f"exactness (top-k = E): max |logit gap| = {max_logit_gap_all_experts(teacher, student, ids):.2e}"
        )
        models[f"{init} student"] = student
    console.rule("Pass@1 before Phase B (students route top-2 of 8 with a zero router)")
    scores = {}
    for name, path in models.items():
        report = run_eval(
            EvalConfig(
                model=str(path),
                out=str(out / f"eval-{path.name}.json"),
                world_size=cfg.eval_per_skill,
                batch_size=64,
                max_new_tokens=160,
                progress=cfg.progress,
                seed=cfg.seed,
            ),
            console,
        )
        scores[name] = report
    table = Table(title="greedy Pass@1 (%) on the world's test split")
    skills = list(next(iter(scores.values()))["benchmarks"])
    for col in ["model", *(s.split(":")[1] for s in skills), "average", "MFLOPs/token @1024"]:
        table.add_column(col, justify="right")
    for name, report in scores.items():
        table.add_row(
            name,
            *(f"{100 * report['benchmarks'][s]['pass@1']:.1f}" for s in skills),
            f"{100 * report['average']['pass@1']:.1f}",
            f"{report['flops_per_token@1024'] / 1e6:.2f}",
        )
    console.print(table)
