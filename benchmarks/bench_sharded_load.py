"""Peak resident memory of each process as `padd train` / `padd warmup --parallel fsdp` load a model,
2 CPU processes (gloo): the sharded load against the path it replaces, measured in the same run.

    sharded   padd.models.load_sharded_causal_lm: built on the meta device, sharded by FSDP2, each
              rank reading only its rows of each tensor from the safetensors file
    whole     the path before: `from_pretrained` of the whole model on every rank, then FSDP2
              sharding it (padd.distributed.shard), as padd train did for its student and teacher

The model is written first: a GLM-4-MoE (the class of the students padd decompose writes) with random
weights, few layers but wide, 1.4 GB in float32 by default. Each path runs in fresh processes. Each
process first imports torch, transformers and padd, starts the process group and builds the model on
the meta device (its modeling code imported, no weights): its peak RSS then is the runtime baseline.
The peak after the load, over that baseline, is what the load costs (peaks are VmHWM of
/proc/self/status: `ru_maxrss` would carry the parent's peak over from the fork that started the
process). The target: the sharded load within 0.6 x the model per process (2 ranks hold 0.5 x as
their shards), where the whole load needs at least the whole model.

    python benchmarks/bench_sharded_load.py                 # 1.4 GB model (3 layers, hidden 1536)
    python benchmarks/bench_sharded_load.py --layers 2 --hidden 1024 --experts 16   # 0.5 GB, quicker
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time
from pathlib import Path

PATHS = ("whole", "sharded")
TARGET = 0.6  # the sharded load's peak over the runtime, as a share of the model
WORLD = 2


def write_model(out: Path, *, layers: int, hidden: int, experts: int, moe_intermediate: int, vocab: int) -> int:
    """A random-weight GLM-4-MoE checkpoint in `out`; returns its float32 weight bytes."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    config = transformers.Glm4MoeConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        moe_intermediate_size=moe_intermediate,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 128,
        num_key_value_heads=max(1, hidden // 512),
        head_dim=128,
        n_routed_experts=experts,
        num_experts_per_tok=min(8, experts),
        n_shared_experts=1,
        first_k_dense_replace=0,
        n_group=1,
        topk_group=1,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(out)
    return size


def peak_rss() -> int:
    """This process's peak resident memory so far, in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # kB
    raise OSError("no VmHWM in /proc/self/status: peak RSS is measured on Linux only")


def _rank(rank: int, port: int, path: str, how: str, results: str) -> None:
    """One process of one load path: its peak RSS before (the runtime) and after the load, written to
    `results`."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank))
    os.environ["WORLD_SIZE"] = str(WORLD)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging

    from padd.distributed import setup, shard
    from padd.models import load_causal_lm

    torch.set_num_threads(1)  # 2 processes on a CPU: one thread each
    logging.disable_progress_bar()
    ranks = setup("cpu")
    with torch.device("meta"):  # the modeling code imported, as the loads need it: part of the runtime
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    ranks.barrier()
    runtime = peak_rss()
    start = time.perf_counter()
    if how == "whole":
        model = load_causal_lm(path)
        shard(model)
    else:
        model = load_causal_lm(path, sharded=True)
    ranks.barrier()
    seconds = time.perf_counter() - start
    row = {"path": how, "rank": rank, "runtime": runtime, "peak": peak_rss(), "seconds": seconds}
    Path(results, f"{how}.{rank}.json").write_text(json.dumps(row))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(model_dir: Path, paths=PATHS) -> list[dict]:
    """One row per (path, rank): peak RSS in bytes before (runtime) and after the load, the load's seconds.
    Each path runs in fresh processes, one path at a time."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as results:
        for how in paths:
            mp.spawn(_rank, args=(_free_port(), str(model_dir), how, results), nprocs=WORLD)
        return [json.loads(Path(results, f"{how}.{r}.json").read_text()) for how in paths for r in range(WORLD)]


def over_runtime(rows: list[dict]) -> dict[tuple[str, int], int]:
    """(path, rank) -> the load's peak RSS over the same process's runtime baseline, in bytes."""
    return {(r["path"], r["rank"]): r["peak"] - r["runtime"] for r in rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--moe-intermediate", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args()
    from rich.console import Console
    from rich.table import Table

    gb = 1e9
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        size = write_model(
            model_dir,
            layers=args.layers,
            hidden=args.hidden,
            experts=args.experts,
            moe_intermediate=args.moe_intermediate,
            vocab=args.vocab,
        )
        rows = measure(model_dir)
    extra = over_runtime(rows)
    table = Table(
        title=f"load under --parallel fsdp, {WORLD} processes (gloo): GLM-4-MoE, {args.layers} layers, "
        f"hidden {args.hidden}, {args.experts} experts; {size / gb:.2f} GB of float32 weights"
    )
    for col in ("path", "rank", "runtime GB", "peak RSS GB", "over runtime GB", "over runtime / model", "load s"):
        table.add_column(col, justify="left" if col == "path" else "right")
    for r in rows:
        over = extra[(r["path"], r["rank"])]
        table.add_row(
            r["path"],
            str(r["rank"]),
            f"{r['runtime'] / gb:.2f}",
            f"{r['peak'] / gb:.2f}",
            f"{over / gb:.2f}",
            f"{over / size:.2f}",
            f"{r['seconds']:.1f}",
        )
    console = Console()
    console.print(table)
    worst = max(v for (how, _), v in extra.items() if how == "sharded") / size
    console.print(
        f"sharded: at most {worst:.2f} x the model over the runtime per process (target {TARGET}); "
        f"whole: at least {min(v for (how, _), v in extra.items() if how == 'whole') / size:.2f} x"
    )


if __name__ == "__main__":
    main()
