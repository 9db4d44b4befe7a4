"""Stage I (`padd decompose`) at 7B shapes, random weights: wall time per phase against a plain forward.

For a Qwen2.5-7B-shaped and a Llama-7B-shaped teacher it writes a random-weight checkpoint, runs the
real `padd decompose` on it (8192 tokens of the miniature world's text) and prints the seconds of
each phase from the run's own record. The peer is one plain forward of the decoder over the same
tokens, measured in the same process: "total / forward" says how many such forwards Stage I costs.

On CPU the teachers keep only their first few layers (--layers, stated in the table); every phase but
sample/load/save scales with the layer count. On a GPU the default is the full depth in bfloat16,
the setting of the docs/method.md §7 target (the whole 7B Stage I in minutes on one GPU).

    python benchmarks/bench_stage1.py                          # CPU: 2 layers of each shape
    python benchmarks/bench_stage1.py --device cuda            # GPU: all layers, bfloat16
    python benchmarks/bench_stage1.py --shapes qwen2.5-7b --layers 1
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from shapes import LLAMA_7B, QWEN25_7B

# name -> (transformers config class, config kwargs, experts, top-k); expert sizes are multiples of 8
SHAPES = {"qwen2.5-7b": ("Qwen2Config", QWEN25_7B, 64, 8), "llama-7b": ("LlamaConfig", LLAMA_7B, 32, 4)}
PHASES = ["sample", "load", "activations", "cluster", "build", "save"]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def write_random_teacher(shape: str, layers: int | None, dtype: torch.dtype, device: str, out: Path):
    """A random-weight teacher of `shape` (first `layers` layers) with a small saved tokenizer."""
    import transformers
    from transformers import AutoModelForCausalLM

    from padd.corpus import iter_texts
    from padd.tiny import build_tokenizer

    cls_name, kwargs, _, _ = SHAPES[shape]
    depth = {"num_hidden_layers": layers} if layers else {}
    cfg = getattr(transformers, cls_name)(**{**kwargs, **depth, "max_position_embeddings": 4096})
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.eval()
    texts = iter_texts("world")
    tokenizer = build_tokenizer((next(texts) for _ in range(2000)), vocab_size=512)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return model, tokenizer


@torch.no_grad()
def plain_forward_seconds(model, tokenizer, n_tokens: int, seq_len: int, batch_size: int, device: str) -> float:
    """Seconds of the decoder's forward over n_tokens in [batch_size, seq_len] batches (no hooks)."""
    from padd.corpus import iter_texts, sample_windows

    windows = sample_windows(iter_texts("world"), tokenizer, n_tokens=n_tokens, seq_len=seq_len, seed=0)
    model.model(input_ids=windows[:batch_size].to(device), use_cache=False)  # warm the kernels up
    _sync(device)
    start = time.perf_counter()
    for i in range(0, windows.shape[0], batch_size):
        model.model(input_ids=windows[i : i + batch_size].to(device), use_cache=False)
    _sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, from {', '.join(SHAPES)}")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="device of the whole Stage I")
    parser.add_argument("--layers", type=int, help="teacher layers kept (default: 2 on CPU, all on a GPU)")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens of the co-activation sample")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per window of the activation pass")
    parser.add_argument("--batch-size", type=int, help="windows per forward (default: 16 on a GPU, 4 on CPU)")
    parser.add_argument("--workdir", type=Path, help="where the checkpoints go (default: a temp folder)")
    args = parser.parse_args()
    from padd.config import DecomposeConfig
    from padd.stage1.decompose import decompose

    gpu = args.device == "cuda"
    layers = args.layers if args.layers is not None else (None if gpu else 2)
    batch_size = args.batch_size or (16 if gpu else 4)
    dtype = torch.bfloat16 if gpu else torch.float32
    console = Console(width=200)
    where = torch.cuda.get_device_name() if gpu else f"CPU, {torch.get_num_threads()} threads"
    table = Table(title=f"Stage I at 7B shapes, random weights, {args.tokens} tokens ({where}, {dtype})")
    for col in ["teacher", "layers", "E / top-k", *PHASES, "total s", "forward s", "total / forward"]:
        table.add_column(col, justify="right")
    results = []
    for shape in args.shapes.split(","):
        _, kwargs, experts, top_k = SHAPES[shape]
        work = Path(tempfile.mkdtemp(prefix="padd-bench-stage1-", dir=args.workdir))
        model, tokenizer = write_random_teacher(shape, layers, dtype, args.device, work / "teacher")
        forward_s = plain_forward_seconds(model, tokenizer, args.tokens, args.seq_len, batch_size, args.device)
        del model
        if gpu:
            torch.cuda.empty_cache()
        cfg = DecomposeConfig(
            teacher=str(work / "teacher"),
            corpus="world",
            out=str(work / "student"),
            experts=experts,
            top_k=top_k,
            tokens=args.tokens,
            seq_len=args.seq_len,
            batch_size=batch_size,
            device=args.device,
            dtype="bfloat16" if gpu else "float32",
            progress=False,
        )
        record = decompose(cfg, Console(quiet=True))
        times = record["timings_s"]
        total = sum(times.values())
        n_layers = layers or kwargs["num_hidden_layers"]
        depth = f"{n_layers} of {kwargs['num_hidden_layers']}"
        table.add_row(
            shape,
            depth,
            f"{experts} / {top_k}",
            *(f"{times.get(p, 0.0):.1f}" for p in PHASES),
            f"{total:.1f}",
            f"{forward_s:.1f}",
            f"{total / forward_s:.2f}x",
        )
        results.append({"shape": shape, "layers": n_layers, "timings_s": times, "forward_s": forward_s})
    console.print(table)
    print(json.dumps({"device": where, "results": results}))


if __name__ == "__main__":
    main()
