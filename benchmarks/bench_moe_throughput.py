"""MoE student vs its dense teacher: prefill and decode tokens/s against the FLOPs ratio.

A random-weight dense teacher is decomposed into Stage I students (random partition: the speed does
not depend on which neurons share an expert) at equal hidden size, one per --top-k. Each model is
timed on one prefill forward and on `generate` decoding a fixed number of tokens at --batch; each
student once per transformers experts implementation given (default `eager` and `grouped_mm`;
`batched_mm` gathers a weight copy per token and selection, tens of GB at prefill sizes, so it is
opt-in). The peer is the teacher in the same run: "speed-up" is the student's
tokens/s over the teacher's, "vs FLOPs" is that speed-up over the ideal 1 / FLOPs ratio.

    python benchmarks/bench_moe_throughput.py                        # CPU, a small shape
    python benchmarks/bench_moe_throughput.py --device cuda          # GPU, a Qwen2.5-7B shape, batch 64
    python benchmarks/bench_moe_throughput.py --device cuda --shape qwen2.5-0.5b
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from rich.console import Console
from rich.table import Table

from shapes import QWEN25_05B, QWEN25_7B

# name -> (Qwen2Config kwargs, experts, default top-k values); --vocab sets the vocabulary
SMALL = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2)
SHAPES = {"small": (SMALL, 8, "2,4"), "qwen2.5-0.5b": (QWEN25_05B, 8, "2,4"), "qwen2.5-7b": (QWEN25_7B, 64, "8,20")}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def make_teacher(shape: str, vocab: int, dtype: torch.dtype, device: str):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    kwargs, _, _ = SHAPES[shape]
    torch.manual_seed(0)
    cfg = Qwen2Config(
        **{**kwargs, "vocab_size": vocab or kwargs.get("vocab_size", 32000)}, max_position_embeddings=4096
    )
    with torch.device(device):
        return Qwen2ForCausalLM(cfg).to(dtype).eval()


def make_student(teacher, experts: int, top_k: int):
    """A Stage I student of `teacher` (random partition), on the teacher's device and dtype."""
    from padd.stage1.build import build_student
    from padd.stage1.partition import plan_layer

    d_ff = teacher.config.intermediate_size
    plans = [
        plan_layer(
            None, None, d_ff=d_ff, n_experts=experts, expert_size=d_ff // experts, shared=0, init="random", seed=i
        )
        for i in range(teacher.config.num_hidden_layers)
    ]
    return build_student(teacher, plans, top_k=top_k)


@torch.no_grad()
def tokens_per_second(model, device: str, *, batch: int, prompt: int, new: int, prefill_len: int, repeats: int):
    """(prefill tokens/s on [batch, prefill_len], decode tokens/s of `new` greedy tokens at `batch`)."""
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    x = torch.randint(0, vocab, (batch, prefill_len), generator=gen).to(device)
    prompts = torch.randint(0, vocab, (batch, prompt), generator=gen).to(device)

    def decode():
        model.generate(
            input_ids=prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=new,
            min_new_tokens=new,  # no early stop: every row decodes exactly `new` tokens
            do_sample=False,
            pad_token_id=0,
        )

    model(input_ids=x[:, :16])  # warm the kernels up
    decode()
    timings = {}
    for name, fn in (("prefill", lambda: model(input_ids=x, logits_to_keep=1)), ("decode", decode)):
        best = float("inf")
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            best = min(best, time.perf_counter() - start)
        timings[name] = best
    return batch * prefill_len / timings["prefill"], batch * new / timings["decode"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--shape", choices=list(SHAPES), help="default: small on CPU, qwen2.5-7b on a GPU")
    parser.add_argument("--top-k", help="comma-separated top-k values, one student each (default: per shape)")
    parser.add_argument("--batch", type=int, help="decode batch (default: 64 on a GPU, 16 on CPU)")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens before decoding")
    parser.add_argument("--new-tokens", type=int, help="decoded tokens per row (default: 128 on a GPU, 32 on CPU)")
    parser.add_argument("--prefill-len", type=int, default=512, help="sequence length of the prefill forward")
    parser.add_argument(
        "--vocab", type=int, help="vocabulary size of the random teacher (default: the shape's, small 32000)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (best kept)")
    parser.add_argument("--impls", default="eager,grouped_mm", help="transformers experts implementations to time")
    args = parser.parse_args()
    gpu = args.device == "cuda"
    shape = args.shape or ("qwen2.5-7b" if gpu else "small")
    _, experts, default_k = SHAPES[shape]
    batch = args.batch or (64 if gpu else 16)
    new = args.new_tokens or (128 if gpu else 32)
    dtype = torch.bfloat16 if gpu else torch.float32
    from padd.flops import forward_flops_per_token

    context = args.prompt + new // 2
    teacher = make_teacher(shape, args.vocab, dtype, args.device)
    measure = dict(batch=batch, prompt=args.prompt, new=new, prefill_len=args.prefill_len, repeats=args.repeats)
    t_prefill, t_decode = tokens_per_second(teacher, args.device, **measure)
    t_flops = forward_flops_per_token(teacher.config, context)
    rows = [dict(model="teacher (dense)", impl="-", flops=1.0, prefill=t_prefill, decode=t_decode)]
    default_impl = None
    for top_k in (int(k) for k in (args.top_k or default_k).split(",")):
        student = make_student(teacher, experts, top_k)
        default_impl = student.config._experts_implementation
        flops = forward_flops_per_token(student.config, context) / t_flops
        for impl in args.impls.split(","):
            try:
                student.set_experts_implementation(impl)
                prefill, decode = tokens_per_second(student, args.device, **measure)
            except (ValueError, ImportError, RuntimeError, NotImplementedError) as err:
                rows.append(dict(model=f"student top-{top_k}/{experts}", impl=impl, error=str(err).splitlines()[0]))
                continue
            rows.append(
                dict(model=f"student top-{top_k}/{experts}", impl=impl, flops=flops, prefill=prefill, decode=decode)
            )
        del student
        if gpu:
            torch.cuda.empty_cache()

    where = torch.cuda.get_device_name() if gpu else f"CPU, {torch.get_num_threads()} threads"
    table = Table(
        title=f"{shape}-shaped teacher vs Stage I students ({where}, {dtype}); decode batch {batch}, "
        f"{args.prompt}+{new} tokens; prefill {args.prefill_len} tokens; transformers default experts "
        f"implementation here: {default_impl}"
    )
    for col in [
        "model",
        "experts impl",
        "FLOPs ×",
        "prefill tok/s",
        "speed-up",
        "vs FLOPs",
        "decode tok/s",
        "speed-up",
        "vs FLOPs",
    ]:
        table.add_column(col, justify="right")
    for r in rows:
        if "error" in r:
            table.add_row(r["model"], r["impl"], "-", f"unavailable: {r['error'][:60]}", *["-"] * 5)
            continue
        ideal = 1 / r["flops"]
        sp_p, sp_d = r["prefill"] / t_prefill, r["decode"] / t_decode
        table.add_row(
            r["model"],
            r["impl"],
            f"{r['flops']:.3f}",
            f"{r['prefill']:.0f}",
            f"{sp_p:.2f}x",
            f"{sp_p / ideal:.2f}",
            f"{r['decode']:.0f}",
            f"{sp_d:.2f}x",
            f"{sp_d / ideal:.2f}",
        )
    Console(width=200).print(table)
    print(json.dumps({"device": where, "shape": shape, "default_impl": default_impl, "rows": rows}))


if __name__ == "__main__":
    main()
