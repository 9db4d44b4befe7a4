"""The first thing to run on a GPU machine (`make gpu-check`): padd at one of the paper's pairs'
shapes, two decoder layers each, with the settings of its study preset, and what it measured.

It builds random-weight models of the pair's published configs (padd's bundled copies) cut to
`--layers` decoder layers, with a small world tokenizer (the vocabulary rows stay the real size),
then runs, each as a user would:

1. the bf16 expert check: under autocast, the routed experts' grouped matmuls run in bfloat16;
2. one `padd warmup` step under torchrun on every GPU (FSDP2, bf16, micro-batches, activation
   checkpointing, the preset's sequence length): its time and peak memory per rank;
3. one `padd train` rollout batch the same way: each phase's time and peak memory, the tokens;
4. with `--vllm`, the same batch on a vLLM engine beside the trainer;
5. with `--vllm-server`, two batches from a vLLM server of its own (on the second half of the
   GPUs, the trainer on the first; sharing the one GPU where there is one), the trainer pushing
   its weights after each update. The second batch is sampled from the pushed weights: its largest
   gap between the server's log-probabilities of its tokens and the trainer's own (sampler_logp_gap)
   shows the push arrived (the transformers row's gap is the same check on the trainer's own
   generate: the level of bf16 rounding); then the server's greedy completions of a few prompts
   against the trained student's `generate` (random weights have near-tied tokens, which any
   difference of kernels flips, so this is a share, not a pass/fail).

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
WIDTHS = ("hidden_size", "intermediate_size", "moe_intermediate_size", "kv_lora_rank")
MLA_HEADS = ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")  # DeepSeek's latent attention
ROOT = Path(__file__).resolve().parent.parent


def pair_config(name: str, layers: int, shrink: int):
    """The bundled config `name` cut to `layers` decoder layers and every width divided by `shrink`
    (heads too, keeping head dims of at least 32, which vLLM's CPU kernels need)."""
    from padd.plan.models import load_model_config

    config, _ = load_model_config(name)
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:layers]
    if shrink == 1:
        return config
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    implied = config.hidden_size == heads * head_dim  # dense Llama/Qwen2: head_dim = hidden / heads
    for width in WIDTHS:
        if getattr(config, width, None):
            setattr(config, width, max(32, getattr(config, width) // shrink))
    for dim in MLA_HEADS:
        if getattr(config, dim, None):
            setattr(config, dim, max(16, getattr(config, dim) // shrink))
    config.num_attention_heads = max(1, heads // shrink)
    config.num_key_value_heads = max(1, kv // shrink)
    if config.num_attention_heads % config.num_key_value_heads:
        config.num_key_value_heads = 1
    config.head_dim = max(32, head_dim // shrink)
    if implied:
        config.hidden_size = config.num_attention_heads * config.head_dim
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


def start_server(student: Path, gpus: list[int], device: str, log: Path) -> tuple[subprocess.Popen, str]:
    """A vLLM server on `student`, started as docs/vllm-server.md says, on `gpus` (a CPU: vLLM's CPU
    build); returns it once /health answers (10 minutes at most)."""
    import urllib.request

    from padd.generation.vllm_server import SERVE_FLAGS

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(student)]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-num-seqs", "16", *SERVE_FLAGS]
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    if device == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
        argv += ["--tensor-parallel-size", str(len(gpus)), "--gpu-memory-utilization", "0.3" if gpus == [0] else "0.85"]
    with open(log, "ab") as out:
        server = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and server.poll() is None:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    return server, url
        except OSError:
            time.sleep(2)
    stop(server)
    raise SystemExit(f"the vLLM server did not start: {log.read_text(errors='replace')[-3000:]}")


def stop(server: subprocess.Popen) -> None:
    import signal

    if server.poll() is None:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=60)


def greedy_agreement(url: str, student: Path, device: str, max_new_tokens: int) -> str:
    """How many of 8 prompts the server completes greedily exactly as the trained `student`'s own
    `generate` does."""
    from transformers import AutoTokenizer

    from padd.data import build_prompt, load_problems
    from padd.generation.rollout import TransformersRollout
    from padd.generation.vllm_server import VLLMServerRollout
    from padd.models import load_causal_lm

    tokenizer = AutoTokenizer.from_pretrained(student)
    model = load_causal_lm(student, device=device)
    prompts = [build_prompt(tokenizer, p.problem) for p in load_problems("world:add", split="val", world_per_skill=8)]
    server = VLLMServerRollout(
        url, str(student), tokenizer, model, weights_dir=student.parent, max_new_tokens=max_new_tokens
    )
    server.pending = None  # it has just taken these weights from padd train's last push
    own = TransformersRollout(model, tokenizer).sample(prompts, 1, temperature=0.0, max_new_tokens=max_new_tokens)
    served = server.sample(prompts, 1, temperature=0.0, max_new_tokens=max_new_tokens)
    same = prefix = 0
    for a, m, b, n in zip(
        own.completion_ids, own.completion_mask, served.completion_ids, served.completion_mask, strict=True
    ):
        a, b = a[m.bool()], b[n.bool()]
        same += int(torch.equal(a, b))
        width = min(len(a), len(b))
        differs = (a[:width] != b[:width]).nonzero()
        prefix += int(differs[0]) if len(differs) else width
    mean = prefix / len(prompts)
    return f"{same} of {len(prompts)} identical; on average the first {mean:.1f} of {max_new_tokens} tokens agree"


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
    parser.add_argument(
        "--vllm", action="store_true", help="also one rollout batch on a vLLM engine beside the trainer"
    )
    parser.add_argument("--vllm-server", action="store_true", help="also one rollout batch from a vLLM server")
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
    server = None
    trainer_processes = processes
    if args.vllm_server:
        gpus = list(range(processes))
        trainer_gpus, server_gpus = (gpus[: processes // 2], gpus[processes // 2 :]) if processes > 1 else ([0], [0])
        trainer_processes = len(trainer_gpus)
        server, url = start_server(student, server_gpus, args.device, work / "server.log")
        rollouts["vllm-server"] = dict(rollout="vllm-server", vllm_server_url=url)
        if args.device == "cuda":
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, trainer_gpus))
    for name, rollout in rollouts.items():
        ranks = trainer_processes if name == "vllm-server" else processes
        out = work / f"train-{name}"
        train_flags = dict(
            student=student,
            teacher=teacher,
            data="world:add+sub",
            world_per_skill=64,
            out=out,
            steps=2 if name == "vllm-server" else 1,  # the second batch samples the pushed weights
            prompts_per_step=2 * processes,
            group_size=train["group_size"],
            updates_per_batch=2,
            max_new_tokens=new_tokens,
            save_every=0,
            **shared,
            **memory,
            **rollout,
        )
        if ranks < processes:  # the trainer's share of the GPUs: half the prompts
            train_flags["prompts_per_step"] = 2 * ranks
            train_flags["parallel"] = "fsdp" if ranks > 1 else None
        seconds = padd_command(["train", *flags(train_flags)], ranks, args.device)
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
        if "sampler_logp_gap" in last:
            gap = f"{last['sampler_logp_gap']:.4f} (rollout batch {last['batch']})"
            measured.append((f"Phase B ({name}): max |log p sampler - log p trainer|", gap))
        if name == "vllm-server":
            agree = greedy_agreement(rollout["vllm_server_url"], out / "student", args.device, new_tokens)
            measured.append(("vLLM server after the push: greedy vs generate", agree))
    if server is not None:
        stop(server)

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
