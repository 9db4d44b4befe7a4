"""Phase B step time per phase (generation, teacher, student, update) and each phase's peak memory.

For each model shape it decomposes a teacher into a student (E=8, top-4, as the presets do) and runs
the real `padd train` for a few rollout batches with `padd` and with vanilla `grpo`, reading the
per-phase seconds and peak memory (mem_*_gb) from the runs' metrics.jsonl; the first batch is a
warm-up and is left out of the means. The methods alternate (--repeats runs each) and each keeps
its fastest run, so a slow spell of the machine does not land on one of them. The peer is vanilla
GRPO in the same run: the ratio is the cost of PADD's extra terms (the teacher forward of II, the
routing shift of III, the bias of IV).

The tiny and mini shapes use the trained teachers given with --teacher (e.g. runs/demo/teacher) and
warmed-up students given with --student (else decomposed here, not warmed up), or else random
weights of the preset's shape; a random model never emits EOS, so every completion runs
to max_new_tokens (the worst case of generation). `qwen2.5-0.5b` is a random-weight 0.5B-class model
(Qwen2.5-0.5B's shape and vocabulary) for a GPU.

    python benchmarks/bench_phase_b.py                                   # tiny and mini on CPU
    python benchmarks/bench_phase_b.py --teacher tiny=runs/demo/teacher --student tiny=runs/demo/warmup-cluster
    python benchmarks/bench_phase_b.py --device cuda --shapes qwen2.5-0.5b
    python benchmarks/bench_phase_b.py --device cuda --shapes qwen2.5-0.5b --rollout vllm   # vs. generate
    .venv-vllm/bin/python benchmarks/bench_phase_b.py --shapes tiny --rollout vllm          # vLLM's CPU build
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from shapes import QWEN25_05B

PHASES = ("generation", "teacher", "student", "update")
# the train settings of the tiny/mini study presets, and a GPU-sized batch for the 0.5B shape
TRAIN = {
    "tiny": dict(prompts_per_step=8, group_size=4, updates_per_batch=2, max_new_tokens=96),
    "mini": dict(prompts_per_step=8, group_size=4, updates_per_batch=2, max_new_tokens=96),
    "qwen2.5-0.5b": dict(prompts_per_step=16, group_size=8, updates_per_batch=2, max_new_tokens=256),
}


def random_teacher(shape: str, out: Path) -> Path:
    """A random-weight Qwen2 teacher of `shape` with the miniature world's kind of tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from padd.corpus import iter_texts
    from padd.teacher import PRESETS
    from padd.tiny import build_tokenizer

    texts = iter_texts("world")
    tokenizer = build_tokenizer((next(texts) for _ in range(4000)), vocab_size=512)
    if shape in PRESETS:
        p = PRESETS[shape]
        dims = dict(
            hidden_size=p.hidden_size,
            intermediate_size=p.intermediate_size,
            num_hidden_layers=p.num_layers,
            num_attention_heads=p.num_heads,
            num_key_value_heads=p.num_kv_heads,
            vocab_size=len(tokenizer),
            tie_word_embeddings=True,
        )
    else:
        dims = QWEN25_05B
    torch.manual_seed(0)
    cfg = Qwen2Config(
        **dims,
        max_position_embeddings=2048,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    Qwen2ForCausalLM(cfg).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def decomposed_student(teacher: Path, out: Path, device: str) -> Path:
    """`teacher` decomposed into a student at `out` as the presets do (E=8, top-4), not warmed up:
    the speed and memory of a step do not depend on it."""
    from padd.config import DecomposeConfig
    from padd.stage1.decompose import decompose

    cfg = DecomposeConfig(
        teacher=str(teacher),
        corpus="world",
        out=str(out),
        experts=8,
        top_k=4,
        tokens=2048,
        seq_len=128,
        device=device,
        progress=False,
    )
    decompose(cfg, Console(quiet=True))
    return out


def phase_means(run: Path) -> dict[str, float]:
    """Mean seconds per rollout batch of each phase and the max of each phase's peak memory (GB),
    leaving the first batch out (kernel warm-up, allocator growth)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    per_batch = {r["batch"]: r for r in rows}  # the time_*/mem_* fields are per rollout batch
    batches = [r for b, r in sorted(per_batch.items()) if b > 1] or list(per_batch.values())
    out = {p: statistics.mean(r[f"time_{p}"] for r in batches) for p in PHASES}
    out["step"] = sum(out[p] for p in PHASES)
    out["tokens"] = statistics.mean(r["completion_tokens"] for r in batches)
    for p in PHASES:
        mems = [r[f"mem_{p}_gb"] for r in batches if f"mem_{p}_gb" in r]
        if mems:
            out[f"mem_{p}"] = max(mems)
    return out


def per_1k(result: dict) -> float:
    """Milliseconds of a rollout batch per 1000 completion tokens: runs whose completions differ in
    length compare on this."""
    return 1e6 * result["step"] / max(result["tokens"], 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=None, help="comma-separated: tiny, mini, qwen2.5-0.5b")
    parser.add_argument("--teacher", action="append", default=[], help="SHAPE=DIR: a trained teacher for that shape")
    parser.add_argument(
        "--student", action="append", default=[], help="SHAPE=DIR: its warmed-up student (default: decompose it)"
    )
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument(
        "--rollout",
        default="transformers",
        choices=("transformers", "vllm"),
        help="rollout backend (vllm: its GPU build with --device cuda, or its CPU build in .venv-vllm)",
    )
    parser.add_argument("--steps", type=int, default=4, help="rollout batches per run (the first is a warm-up)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per method, interleaved; the fastest is kept")
    parser.add_argument("--workdir", type=Path, help="where checkpoints and runs go (default: a temp folder)")
    args = parser.parse_args()
    from padd.config import TrainConfig
    from padd.phase_b.loop import run_train

    shapes = (args.shapes or ("qwen2.5-0.5b" if args.device == "cuda" else "tiny,mini")).split(",")
    given = dict(t.split("=", 1) for t in args.teacher)
    students = dict(t.split("=", 1) for t in args.student)
    quiet = Console(quiet=True)
    results = []
    for shape in shapes:
        work = Path(tempfile.mkdtemp(prefix=f"padd-bench-phase-b-{shape}-", dir=args.workdir))
        teacher = Path(given[shape]) if shape in given else random_teacher(shape, work / "teacher")
        if shape in students:
            student = Path(students[shape])
        else:
            student = decomposed_student(teacher, work / "student", args.device)
        best: dict[str, dict] = {}
        for repeat, method in ((r, m) for r in range(args.repeats) for m in ("grpo", "padd")):
            run = work / f"{method}-{repeat}"
            run_train(
                TrainConfig(
                    student=str(student),
                    teacher=str(teacher),
                    data="world:add+sub+mul+expr+word",
                    out=str(run),
                    method=method,
                    steps=args.steps,
                    temperature=1.0,
                    save_every=0,
                    device=args.device,
                    rollout=args.rollout,
                    progress=False,
                    **TRAIN[shape],
                ),
                quiet,
            )
            result = {"shape": shape, "weights": "trained" if shape in given else "random", "method": method}
            result |= phase_means(run)
            if method not in best or result["step"] < best[method]["step"]:
                best[method] = result
        results += [best["grpo"], best["padd"]]

    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    table = Table(
        title=f"Phase B seconds per rollout batch by phase, and peak memory (GB) of each ({where}, {args.rollout})"
    )
    columns = ["shape", "weights", "method", "tokens", *PHASES, "step s", "× GRPO", "ms/1k tok", "× GRPO"]
    for col in [*columns, *(f"mem {p}" for p in PHASES)]:
        table.add_column(col, justify="right")
    grpo = {r["shape"]: r for r in results if r["method"] == "grpo"}
    for r in results:
        table.add_row(
            r["shape"],
            r["weights"],
            r["method"],
            f"{r['tokens']:.0f}",
            *(f"{r[p]:.2f}" for p in PHASES),
            f"{r['step']:.2f}",
            f"{r['step'] / grpo[r['shape']]['step']:.2f}",
            f"{per_1k(r):.0f}",
            f"{per_1k(r) / per_1k(grpo[r['shape']]):.2f}",
            *(f"{r[f'mem_{p}']:.2f}" if f"mem_{p}" in r else "-" for p in PHASES),
        )
    Console(width=200).print(table)
    print(json.dumps({"device": where, "rollout": args.rollout, "results": results}))


if __name__ == "__main__":
    main()
