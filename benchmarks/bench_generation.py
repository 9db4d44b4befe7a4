"""Generation: a vLLM engine (its CPU build here) against transformers' `generate`, through padd's two
rollout backends, on the same student, prompts and budget, in one process.

Two workloads: a Phase B rollout batch (32 prompts × 1 sampled completion at temperature 1, 64 new
tokens; as a step samples 8 prompts × G = 4) and a `padd eval` pass (200 prompts, greedy, 96 new
tokens). Students: Stage I students (E = 8, top-4) of random teachers of two shapes, the tiny
preset's (`tiny`, hidden 128) and a wider one (`hidden-512`, 4 layers); random weights seldom emit EOS, so
completions run to the budget on both sides. The calls alternate (--repeats each) and the median is
kept; the engine's start (load, torch.compile, KV cache) is reported apart.

    .venv-vllm/bin/python benchmarks/bench_generation.py
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

WORKLOADS = {
    "rollout batch": dict(prompts=32, temperature=1.0, max_new_tokens=64),
    "eval pass": dict(prompts=200, temperature=0.0, max_new_tokens=96),
}
SHAPES = {
    "tiny": dict(
        hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2
    ),
    "hidden-512": dict(
        hidden_size=512, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2
    ),
}


def student_of(shape: dict, work: Path) -> Path:
    """A random Qwen2 teacher of `shape` with the world's tokenizer, decomposed by Stage I (E = 8, top-4)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from padd.config import DecomposeConfig
    from padd.corpus import iter_texts
    from padd.stage1.decompose import decompose
    from padd.tiny import build_tokenizer

    texts = iter_texts("world")
    tokenizer = build_tokenizer((next(texts) for _ in range(4000)), vocab_size=512)
    torch.manual_seed(0)
    config = Qwen2Config(
        **shape,
        vocab_size=len(tokenizer),
        tie_word_embeddings=True,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    Qwen2ForCausalLM(config).save_pretrained(work / "teacher")
    tokenizer.save_pretrained(work / "teacher")
    cfg = DecomposeConfig(
        teacher=str(work / "teacher"), corpus="world", out=str(work / "student"), experts=8, top_k=4, tokens=2048
    )
    decompose(cfg, Console(quiet=True))
    return work / "student"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="calls per backend and workload, alternating")
    parser.add_argument("--workdir", type=Path, help="where the models go (default: a temp folder)")
    args = parser.parse_args()
    logging.getLogger("vllm").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from padd.data import build_prompt, load_problems
    from padd.generation.rollout import TransformersRollout
    from padd.generation.vllm import VLLMRollout

    problems = load_problems("world", split="test", world_per_skill=50, seed=0)
    rows = []
    for shape_name, shape in SHAPES.items():
        work = Path(tempfile.mkdtemp(prefix="padd-bench-generation-", dir=args.workdir))
        student = student_of(shape, work)
        tokenizer = AutoTokenizer.from_pretrained(student)
        model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).eval()
        backends = {"transformers generate": TransformersRollout(model, tokenizer, batch_size=256)}
        start = time.perf_counter()
        backends["vLLM (CPU build)"] = VLLMRollout(
            str(student), AutoTokenizer.from_pretrained(student), device="cpu", dtype="float32"
        )
        startup = time.perf_counter() - start
        for workload, settings in WORKLOADS.items():
            prompts = [build_prompt(tokenizer, p.problem) for p in problems[: settings["prompts"]]]
            times: dict[str, list[float]] = {name: [] for name in backends}
            tokens: dict[str, int] = {}
            for _ in range(args.repeats):
                for name, backend in backends.items():
                    if hasattr(backend, "llm"):  # no prefill from the previous call's cached prefixes
                        backend.llm.reset_prefix_cache()
                    torch.manual_seed(0)
                    start = time.perf_counter()
                    rollout = backend.sample(
                        prompts, 1, temperature=settings["temperature"], max_new_tokens=settings["max_new_tokens"]
                    )
                    times[name].append(time.perf_counter() - start)
                    tokens[name] = int(rollout.completion_mask.sum())
            for name in backends:
                seconds = statistics.median(times[name])
                rows.append(
                    {
                        "shape": shape_name,
                        "workload": workload,
                        "backend": name,
                        "tokens": tokens[name],
                        "seconds": seconds,
                        "tokens_per_s": tokens[name] / seconds,
                        "startup_s": startup if name.startswith("vLLM") else 0.0,
                    }
                )
        del backends
    table = Table(title=f"Generation through padd's backends (CPU, {torch.get_num_threads()} threads)")
    for col in ("student", "workload", "backend", "tokens", "s", "tokens/s", "× generate", "engine start s"):
        table.add_column(col, justify="right")
    base = {(r["shape"], r["workload"]): r["seconds"] for r in rows if r["backend"] == "transformers generate"}
    for r in rows:
        table.add_row(
            r["shape"],
            r["workload"],
            r["backend"],
            str(r["tokens"]),
            f"{r['seconds']:.3f}",
            f"{r['tokens_per_s']:.0f}",
            f"{r['seconds'] / base[(r['shape'], r['workload'])]:.2f}",
            f"{r['startup_s']:.1f}" if r["startup_s"] else "-",
        )
    Console(width=160).print(table)
    print(
        json.dumps(
            {"threads": torch.get_num_threads(), "kv_cache_gib": os.environ.get("VLLM_CPU_KVCACHE_SPACE"), "rows": rows}
        )
    )


if __name__ == "__main__":
    main()
