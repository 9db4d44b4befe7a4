"""`padd demo`: the end-to-end run on the built-in miniature setting.

Today it builds a tiny Qwen2-class teacher with its own tokenizer and an arithmetic corpus, runs
Stage I (`padd decompose`) with the PADD cluster init and with the random-split baseline, and
checks that each student reproduces the teacher exactly when every expert is active.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from rich.console import Console

from padd.config import DecomposeConfig, DemoConfig
from padd.stage1.decompose import decompose
from padd.tiny import arithmetic_corpus, make_tiny_teacher


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
    corpus = arithmetic_corpus(4000, seed=cfg.seed)
    (out / "corpus.txt").write_text("\n".join(corpus) + "\n")
    console.rule("tiny teacher")
    teacher = make_tiny_teacher(
        out / "teacher",
        "qwen2",
        texts=corpus,
        hidden_size=64,
        intermediate_size=256,
        num_layers=4,
        seed=cfg.seed,
        bias_std=0.1,
    )
    console.print(f"teacher: Qwen2-class, 4 layers, d_ff=256, written to {teacher}")
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(cfg.seed))
    for init in ("cluster", "random"):
        console.rule(f"Stage I, {init} init")
        student = out / f"student-{init}"
        decompose(
            DecomposeConfig(
                teacher=str(teacher),
                corpus=str(out / "corpus.txt"),
                out=str(student),
                experts=8,
                top_k=2,
                init=init,
                seed=cfg.seed,
                tokens=8192,
                progress=cfg.progress,
            ),
            console,
        )
        gap = max_logit_gap_all_experts(teacher, student, ids)
        console.print(f"exactness (top-k = E): max |logit gap| = {gap:.2e}")
