"""The first thing to run on a GPU machine (`make gpu-check`): padd at one of the paper's pairs'
shapes, two decoder layers each, with the settings of its study preset, and what it measured.

It builds random-weight models of the pair's published configs (padd's bundled copies) cut to
`--layers` decoder layers, with a small world tokenizer (the vocabulary rows stay the real size),
then runs, each as a user would:

1. the bf16 expert check: under autocast, the routed experts' grouped matmuls run in bfloat16;
2. one `padd warmup` step under torchrun on every GPU (FSDP2, bf16, micro-batches, activation
   checkpointing, the preset's sequence length): its time and peak memory per rank;
3. one `padd train` rollout batch the same way: each phase's time and peak memory, the tokens;
4. with `--vllm`, the same batch with the preset's rollout on a vLLM engine.

`--shrink K` divides every width by K, so that the same script runs on a CPU (gloo, `--device cpu`):
that is how it is tested; at K = 1 it has run only where a GPU was at hand.

    python benchmarks/gpu_check.py                               # Qwen pair, every visible GPU
    python benchmarks/gpu_check.py --pair deepseek --processes 2
    python benchmarks/gpu_check.py --device cpu --shrink 32 --processes 1   # a CPU dry run
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

PAIRS = {  # teacher, student (padd's bundled configs) and the study preset whose settings apply
    "qwen": ("Qwen2.5-Math-7B", "Qwen3-30B-A3B", "configs/study-qwen2.5-math-7b-to-qwen3-30b-a3b.yaml"),
    "deepseek": (
        "deepseek-math-7b-instruct",
        "DeepSeek-V2-Lite",
        "configs/study-deepseek-math-7b-to-deepseek-v2-lite.yaml",
    ),
}
WIDTHS = ("hidden_size", "intermediate_size", "moe_intermediate_size", "q_lora_rank", "kv_lora_rank")
HEADS = ("num_attention_heads", "num_key_value_heads")
ROOT = Path(__file__).resolve().parent.parent


def pair_config(name: str, layers: int, shrink: int):
    """The bundled config `name` cut to `layers` decoder layers and every width divided by `shrink`."""
    from padd.plan.models import load_model_config

    config, _ = load_model_config(name)
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:layers]
    for width in WIDTHS:
        if getattr(config, width, None):
            setattr(config, width, max(16, getattr(config, width) // shrink))
    for heads in HEADS:
        if getattr(config, heads, None):
            setattr(config, heads, max(1, getattr(config, heads) // shrink))
    if shrink > 1 and getattr(config, "head_dim", None):
        config.head_dim = max(32, config.head_dim // shrink)
    return config


def build(config, tokenizer, out: Path, device: str, dtype: torch.dtype) -> Path:
    """A random-weight model of `config` saved with `tokenizer` (the world's)."""
    from transformers import AutoModelForCausalLM

    config.eos_token_id, config.pad_token_id, config.bos_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id, None
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model
    return out


def expert_dtypes(student: Path, device: str) -> set[str]:
    """The input dtypes of the student's grouped expert matmuls in one training forward under bf16
    autocast, with padd's precision hooks (padd.precision)."""
    from torch.overrides import TorchFunctionMode

    from padd.models import load_causal_lm
    from padd.precision import experts_in_autocast_dtype, routers_in_fp32

    seen: set[str] = set()

    class Spy(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in ("grouped_mm", "_grouped_mm"):
                seen.add(str(args[0].dtype).removeprefix("torch."))
            return func(*args, **(kwargs or {}))

    model = load_causal_lm(student, device=device, train=True)
    routers_in_fp32(model)
    experts_in_autocast_dtype(model)
    ids = torch.randint(0, 256, (2, 64), device=device)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16), Spy():
        model(input_ids=ids)
    del model
    return seen or {"(no grouped matmul: eager experts, autocast ops)"}


def padd_command(args: list[str], processes: int, device: str) -> float:
    """`padd ARGS` under torchrun with `processes` ranks (or in this interpreter's process for 1);
    returns its wall seconds. Fails with its stderr's tail."""
    if processes > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        start = ["-m", "torch.distributed.run", f"--nproc_per_node={processes}", f"--master_port={port}", "-m"]
    else:
        start = ["-m"]
    env = {**os.environ}
    if device == "cpu":
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    began = time.perf_counter()
    proc = subprocess.run([sys.executable, *start, "padd", *args], env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"padd {args[0]} failed:\n{proc.stderr[-4000:]}")
    return time.perf_counter() - began


def flags(options: dict) -> list[str]:
    out = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is not False and value is not None:
            out += [flag, str(value)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", default="qwen", choices=tuple(PAIRS))
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of each model")
    parser.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    parser.add_argument("--processes", type=int, default=None, help="ranks (default: every visible GPU, 1 on a CPU)")
    parser.add_argument("--shrink", type=int, default=1, help="divide every width by this (a CPU dry run)")
    parser.add_argument("--vllm", action="store_true", help="also one rollout batch on a vLLM engine")
    parser.add_argument("--workdir", type=Path, help="where the models and runs go (default: a temp folder)")
    args = parser.parse_args()
    import yaml

    from padd.corpus import iter_texts
    from padd.tiny import build_tokenizer

    processes = args.processes or (torch.cuda.device_count() if args.device == "cuda" else 1)
    teacher_name, student_name, preset = PAIRS[args.pair]
    study = yaml.safe_load((ROOT / preset).read_text())
    work = Path(tempfile.mkdtemp(prefix=f"padd-gpu-check-{args.pair}-", dir=args.workdir))
    texts = iter_texts("world")
    tokenizer = build_tokenizer((next(texts) for _ in range(4000)), vocab_size=512)
    teacher = build(
        pair_config(teacher_name, args.layers, args.shrink), tokenizer, work / "teacher", args.device, torch.bfloat16
    )
    student = build(
        pair_config(student_name, args.layers, args.shrink), tokenizer, work / "student", args.device, torch.float32
    )
    measured: list[tuple[str, str]] = [
        ("models", f"{teacher_name} → {student_name}, {args.layers} layers, widths / {args.shrink}")
    ]

    measured.append(("bf16 experts: grouped matmul inputs", ", ".join(sorted(expert_dtypes(student, args.device)))))

    shared = dict(device=args.device, precision="bf16", progress=False)
    if processes > 1:
        shared |= dict(parallel="fsdp")
    memory = dict(micro_batch_size=1, activation_checkpointing=True)
    warm = study["warmup"]
    seq_len = warm["seq_len"] if args.shrink == 1 else 128
    warm_flags = dict(
        student=student,
        teacher=teacher,
        corpus="world",
        out=work / "warmup",
        tokens=seq_len * 2 * processes,
        seq_len=seq_len,
        batch_size=2,
        lr=warm["lr"],
        **shared,
        **memory,
    )
    seconds = padd_command(["warmup", *flags(warm_flags)], processes, args.device)
    record = json.loads((work / "warmup" / "padd_warmup.json").read_text())
    measured.append(
        ("warm-up: steps, s (wall incl. load)", f"{record['steps']}, {record['warmup_seconds']:.1f} ({seconds:.0f})")
    )
    measured.append(("warm-up: peak memory per rank (rank 0)", f"{record['peak_memory_gb']:.2f} GiB"))

    train = study["train"]
    new_tokens = train["max_new_tokens"] if args.shrink == 1 else 32
    rollouts = {"transformers": {}}
    if args.vllm:
        rollouts["vllm"] = dict(rollout="vllm")
    for name, rollout in rollouts.items():
        out = work / f"train-{name}"
        train_flags = dict(
            student=student,
            teacher=teacher,
            data="world:add+sub",
            world_per_skill=64,
            out=out,
            steps=1,
            prompts_per_step=2 * processes,
            group_size=train["group_size"],
            updates_per_batch=2,
            max_new_tokens=new_tokens,
            save_every=0,
            **shared,
            **memory,
            **rollout,
        )
        seconds = padd_command(["train", *flags(train_flags)], processes, args.device)
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        last = rows[-1]
        times = ", ".join(f"{p} {last[f'time_{p}']:.1f}" for p in ("generation", "teacher", "student", "update"))
        peaks = ", ".join(
            f"{p} {last[f'mem_{p}_gb']:.2f}"
            for p in ("generation", "teacher", "student", "update")
            if f"mem_{p}_gb" in last
        )
        measured.append((f"Phase B ({name}): tokens, wall s", f"{last['completion_tokens']}, {seconds:.0f}"))
        measured.append((f"Phase B ({name}): seconds by phase", times))
        measured.append((f"Phase B ({name}): peak GiB by phase (rank 0)", peaks))

    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    table = Table(title=f"padd gpu-check: {processes} × {where}, precision bf16" + (", FSDP2" if processes > 1 else ""))
    table.add_column("check")
    table.add_column("measured")
    for row in measured:
        table.add_row(*row)
    Console(width=140).print(table)
    print(json.dumps({"device": where, "processes": processes, "measured": dict(measured)}))


if __name__ == "__main__":
    main()
