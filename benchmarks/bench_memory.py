"""Peak memory and time of a Phase B step with each memory option, against the plain run in the same
process, like for like: the same student, teacher, prompts, seed and budget.

It decomposes a random-weight teacher of the `mini` preset's shape (E=8, top-4, as the presets do;
random weights never emit EOS, so every completion runs the whole budget and every run trains on
the same number of tokens) and runs the real `padd train` for a few rollout batches with PADD's
defaults and each setting, reading the logged per-phase peaks (mem_*_gb, the largest resident set
seen in the phase on a CPU, allocator peak on CUDA) and seconds from metrics.jsonl; the first batch
is left out. "student" is the training forward (where activations are stored), "update" the
backward and the optimizer step.

    python benchmarks/bench_memory.py                       # mini shape on CPU, 2 rollout batches
    python benchmarks/bench_memory.py --device cuda --shape qwen2.5-0.5b
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from bench_phase_b import decomposed_student, phase_means, random_teacher

SETTINGS = {
    "plain": {},
    "micro 4": dict(micro_batch_size=4),
    "checkpointing": dict(activation_checkpointing=True),
    "micro 4 + checkpointing": dict(micro_batch_size=4, activation_checkpointing=True),
}
TRAIN = dict(prompts_per_step=8, group_size=4, updates_per_batch=2)  # the presets': mini-batches of 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="mini", help="mini (a teacher preset's shape) or qwen2.5-0.5b")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--steps", type=int, default=2, help="rollout batches per run (the first is a warm-up)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="completion length (random weights: all of it)")
    parser.add_argument("--workdir", type=Path, help="where the runs go (default: a temp folder)")
    args = parser.parse_args()
    from padd.config import TrainConfig
    from padd.phase_b.loop import run_train

    quiet = Console(quiet=True)
    work = Path(tempfile.mkdtemp(prefix="padd-bench-memory-", dir=args.workdir))
    teacher = random_teacher(args.shape, work / "teacher")
    student = decomposed_student(teacher, work / "student", args.device)
    results = {}
    for name, options in SETTINGS.items():
        run = work / name.replace(" ", "-").replace("+", "and")
        cfg = TrainConfig(
            student=str(student),
            teacher=str(teacher),
            data="world:add+sub+mul+expr+word",
            out=str(run),
            steps=args.steps,
            max_new_tokens=args.max_new_tokens,
            save_every=0,
            device=args.device,
            progress=False,
            **TRAIN,
            **options,
        )
        run_train(cfg, quiet)
        results[name] = phase_means(run)

    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    table = Table(title=f"Phase B with each memory option, {args.shape} shape, {where}: peak GB and seconds per batch")
    for col in (
        "setting",
        "tokens",
        "mem student",
        "× plain",
        "mem update",
        "× plain",
        "student s",
        "update s",
        "step s",
    ):
        table.add_column(col, justify="right")
    plain = results["plain"]
    for name, r in results.items():
        table.add_row(
            name,
            f"{r['tokens']:.0f}",
            f"{r['mem_student']:.2f}",
            f"{r['mem_student'] / plain['mem_student']:.2f}",
            f"{r['mem_update']:.2f}",
            f"{r['mem_update'] / plain['mem_update']:.2f}",
            f"{r['student']:.2f}",
            f"{r['update']:.2f}",
            f"{r['step']:.2f}",
        )
    Console(width=160).print(table)
    print(json.dumps({"device": where, "shape": args.shape, "results": results}))


if __name__ == "__main__":
    main()
