"""`padd plan`'s memory per phase against what `padd train` measures, on this machine's CPU.

For each shape it builds a random-weight teacher of a world preset's shape with the world's kind of
tokenizer (a random model never emits EOS, so every completion runs to the budget, the plan's
padded length), decomposes it (E = 8, top-4, as the presets do), runs the real `padd train` for a
few rollout batches in a fresh process, and compares the peak memory each phase logged (mem_*_gb,
the largest resident set size seen while it ran, batches after the first, when gradients and AdamW
state exist) with `padd plan --device cpu` for the same settings and the longest prompt those
batches drew.

Each shape runs three times: as the presets train; with padd train's memory options
(`--micro-batch-size 4 --activation-checkpointing`: each mini-batch of 16 completions in 4
micro-batches, every decoder layer recomputed in the backward); and with all three under FSDP2 on
2 gloo processes started by torchrun (`--parallel fsdp --offload`, one thread each; each rank's
mini-batch of 8 completions in 2 micro-batches of 4). That last row is rank 0's log against the
plan of 2 processes: on a CPU, FSDP2's offload moves shards into the memory they are already in, so
the row checks the plan's sharded state, gathers and the offload's bookkeeping, not a saving.

The runs set glibc's MALLOC_MMAP_THRESHOLD_ so that freed tensors go back to the system at once:
at glibc's default the threshold grows after the first large free, later allocations come from a
fragmenting heap, and the resident set runs above the live tensors the plan predicts (the tiny
shape: 5-10% per phase; a quarter in the generate phase with 186-token prompts). On a GPU the
logged peak is torch's allocated memory, with no such gap.

    python benchmarks/bench_plan.py                    # tiny, mini and mini with a 16k vocabulary
    python benchmarks/bench_plan.py --shapes tiny --options memory,offload --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

PHASES = ("generation", "teacher", "student", "update")
# world preset shape, vocabulary padded to (None: the tokenizer's)
SHAPES = {"tiny": ("tiny", None), "mini": ("mini", None), "mini-16k": ("mini", 16384)}
# the tiny and mini study presets' padd train settings
TRAIN = dict(prompts_per_step=8, group_size=4, updates_per_batch=2, max_new_tokens=96, temperature=0.8)
DATA, PER_SKILL, SEED = "world", 50, 0
# padd train's memory options each run is planned and measured with
OPTIONS = {
    "plain": {},
    "memory": {"micro_batch_size": 4, "activation_checkpointing": True},
    "offload": {"micro_batch_size": 4, "activation_checkpointing": True, "parallel": "fsdp", "offload": True},
}


def processes_of(options: dict) -> int:
    """Processes a run of these settings takes: 2 under FSDP2 (offload needs 2+), else 1."""
    return 2 if options.get("parallel") == "fsdp" else 1


def free_port() -> int:
    """A TCP port nothing listens on, for torchrun's rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(shape: str, work: Path) -> tuple[Path, Path]:
    """(teacher, student): a random teacher of `shape` and its decomposition, saved under `work`."""
    import torch
    from rich.console import Console

    from padd.config import DecomposeConfig
    from padd.corpus import iter_texts
    from padd.stage1.decompose import decompose
    from padd.teacher import PRESETS, build_model
    from padd.tiny import build_tokenizer

    preset, vocab = SHAPES[shape]
    texts = iter_texts("world")
    tokenizer = build_tokenizer((next(texts) for _ in range(4000)), vocab_size=512)
    torch.manual_seed(0)
    model = build_model(PRESETS[preset], tokenizer)
    if vocab:  # rows no token uses: a real-size vocabulary's logits at the tiny shape's cost
        model.resize_token_embeddings(vocab)
    teacher, student = work / "teacher", work / "student"
    model.save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    config = DecomposeConfig(
        teacher=str(teacher),
        corpus="world",
        out=str(student),
        experts=8,
        top_k=4,
        tokens=1024,
        seq_len=64,
        progress=False,
    )
    decompose(config, Console(quiet=True))
    return teacher, student


def longest_prompt(student: Path, steps: int, processes: int = 1) -> int:
    """Tokens of the longest prompt rank 0 draws in the run's `steps` rollout batches (its padded
    prompt width) when `processes` ranks share each batch."""
    from transformers import AutoTokenizer

    from padd.data import batch_problems, build_prompt, load_problems

    tokenizer = AutoTokenizer.from_pretrained(student)
    problems = load_problems(DATA, split="train", world_per_skill=PER_SKILL, seed=SEED)
    size = TRAIN["prompts_per_step"]
    drawn = [p for b in range(steps) for p in batch_problems(problems, b, size, SEED, 0, processes)]
    return max(len(tokenizer(build_prompt(tokenizer, p.problem)).input_ids) for p in drawn)


def flags_of(options: dict) -> list[str]:
    """`padd train` flags of settings: --name=value, or --name for a switch that is on."""
    flags = []
    for key, value in options.items():
        flag = f"--{key.replace('_', '-')}"
        if isinstance(value, bool):
            flags += [flag] if value else []
        else:
            flags.append(f"{flag}={value}")
    return flags


def measured_peaks(teacher: Path, student: Path, out: Path, steps: int, options: dict) -> dict[str, float]:
    """Each phase's logged peak (GiB, rank 0's under torchrun) over the batches after the first, from
    a fresh `padd train`."""
    flags = flags_of({**TRAIN, **options})
    processes = processes_of(options)
    start = [sys.executable, "-m"]
    if processes > 1:
        start += ["torch.distributed.run", f"--nproc_per_node={processes}", "--master_addr=127.0.0.1"]
        start += [f"--master_port={free_port()}", "-m"]
    command = [*start, "padd", "train", "--student", str(student), "--teacher", str(teacher)]
    command += ["--data", DATA, "--world-per-skill", str(PER_SKILL), "--out", str(out), "--steps", str(steps)]
    command += [*flags, "--save-every", "0", "--overwrite", "--no-progress"]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    if processes > 1:  # one thread per process on this machine's 2 cores, as the tests run torchrun
        env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"padd train failed ({' '.join(command)}):\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    later = [r for r in rows if r["batch"] > 1]
    return {p: max(r[f"mem_{p}_gb"] for r in later) for p in PHASES}


def predicted_peaks(teacher: Path, prompt_tokens: int, steps: int, options: dict) -> dict[str, float]:
    """`padd plan --device cpu`'s peak (GiB) of each Phase B phase for the same run."""
    from padd.config import PlanConfig
    from padd.plan.report import make_plan
    from padd.plan.settings import GIB, resolve_plan

    cfg = PlanConfig(
        teacher=str(teacher),
        experts=8,
        top_k=4,
        device="cpu",
        steps=steps,
        prompt_tokens=prompt_tokens,
        gpus=processes_of(options),
        **TRAIN,
        **options,
    )
    plan = make_plan(*resolve_plan(cfg))
    peaks = dict(plan.peaks)
    peaks["update"] = max(peaks["backward"], peaks["step"])  # padd train logs the two as one phase
    return {p: (peaks[p] / GIB + plan.hardware.reserve_gib) for p in PHASES}


def compare(
    shape: str, work: Path, steps: int = 3, options: tuple[str, ...] = ("plain",)
) -> dict[str, dict[str, tuple[float, float]]]:
    """options -> phase -> (predicted, measured) peak GiB for `shape` (one teacher and student for all)."""
    teacher, student = build(shape, work)
    result = {}
    for name in options:
        prompt = longest_prompt(student, steps, processes_of(OPTIONS[name]))
        measured = measured_peaks(teacher, student, work / f"run-{name}", steps, OPTIONS[name])
        predicted = predicted_peaks(teacher, prompt, steps, OPTIONS[name])
        result[name] = {p: (predicted[p], measured[p]) for p in PHASES}
    return result


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated of {', '.join(SHAPES)}")
    parser.add_argument("--steps", type=int, default=3, help="rollout batches per run (the first is left out)")
    parser.add_argument("--options", default=",".join(OPTIONS), help=f"comma-separated of {', '.join(OPTIONS)}")
    args = parser.parse_args()
    table = Table(title="Peak memory per phase on CPU (GiB): padd plan against padd train's log")
    table.add_column("shape")
    table.add_column("memory options")
    for phase in PHASES:
        table.add_column(f"{phase} plan / run", justify="right")
    table.add_column("largest gap", justify="right")
    options = tuple(args.options.split(","))
    for shape in args.shapes.split(","):
        with tempfile.TemporaryDirectory(prefix=f"padd-bench-plan-{shape}-") as work:
            results = compare(shape, Path(work), args.steps, options)
        for name, result in results.items():
            gap = max(abs(pred / meas - 1) for pred, meas in result.values())
            cells = [f"{pred:.2f} / {meas:.2f}" for pred, meas in result.values()]
            given = " ".join(flags_of(OPTIONS[name])).replace("=", " ")
            table.add_row(shape, given or "-", *cells, f"{gap:.0%}")
    Console(width=max(170, Console().width)).print(table)


if __name__ == "__main__":
    main()
