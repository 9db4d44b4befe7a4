"""A Phase B step of padd against TRL's GRPOTrainer, the trainer users would pick instead.

Like for like: the same student (Stage I's E = 8, top-4, of a random teacher of the tiny preset's
shape or a wider one, `--shape hidden-512`; random weights, so completions mostly run to the
budget), the same prompts in the same order, G completions each, the same completion budget and
temperature, one optimizer step per rollout batch, the GRPO loss with no KL term (padd `--method
grpo`; TRL `loss_type="grpo"`, `beta=0`), AdamW at the same learning rate, float32 on the CPU. Both
generate with transformers' `generate`; TRL runs with its default gradient checkpointing and without
it. Where vLLM is installed (its CPU build in .venv-vllm), padd also runs with `--rollout vllm`.

The runs alternate (--repeats each); the first step of a run is a warm-up and is left out, and every
other step of every run counts: the table gives medians per step (a 2-core machine shared with
others jitters by a quarter from one call to the next). Wall time is measured around the whole step;
"generation" is sampling plus grading (padd's generation phase; TRL's
`_generate_and_score_completions`), "rest" the forwards, backward and optimizer step (and padd's
weight sync to the engine).

    .venv-vllm/bin/python benchmarks/bench_trl.py     # padd, padd + vLLM, TRL, TRL with checkpointing
    .venv-vllm/bin/python benchmarks/bench_trl.py --shape hidden-512
    .venv/bin/python benchmarks/bench_trl.py          # without vLLM
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from bench_generation import SHAPES, student_of


def padd_run(student: Path, teacher: Path, work: Path, args, rollout: str) -> list[dict]:
    """Per-step wall time and its split for `padd train --method grpo` with one update per batch."""
    from padd.config import TrainConfig
    from padd.phase_b.loop import Trainer

    cfg = TrainConfig(
        student=str(student),
        teacher=str(teacher),
        data=args.data,
        out=str(work),
        method="grpo",
        steps=args.steps,
        prompts_per_step=args.prompts,
        group_size=args.group_size,
        updates_per_batch=1,
        max_new_tokens=args.max_new_tokens,
        temperature=1.0,
        lr=args.lr,
        save_every=0,
        rollout=rollout,
        seed=0,
        progress=False,
    )
    trainer = Trainer(cfg, Console(quiet=True))
    steps = []
    for _ in range(args.steps):
        start = time.perf_counter()
        (row,) = trainer.step()
        wall = time.perf_counter() - start
        steps.append({"wall": wall, "generation": row["time_generation"], "tokens": row["completion_tokens"]})
    return steps


def trl_run(student: Path, work: Path, args, prompts: list[str], answers: list[str], checkpointing: bool):
    """Per-step wall time and its split for TRL's GRPOTrainer on the same prompts."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from padd.grading import grade

    def reward(prompts, completions, answer, **_):
        return [float(grade(c, a)) for c, a in zip(completions, answer, strict=True)]

    tokenizer = AutoTokenizer.from_pretrained(student)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    config = GRPOConfig(
        output_dir=str(work),
        per_device_train_batch_size=args.prompts * args.group_size,
        num_generations=args.group_size,
        steps_per_generation=1,
        num_iterations=1,
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        beta=0.0,
        loss_type="grpo",
        max_steps=args.steps,
        shuffle_dataset=False,
        gradient_checkpointing=checkpointing,
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        logging_steps=1,
        report_to="none",
        disable_tqdm=True,
        seed=0,
    )
    dataset = Dataset.from_dict({"prompt": prompts, "answer": answers})
    trainer = GRPOTrainer(
        model=model, reward_funcs=reward, args=config, train_dataset=dataset, processing_class=tokenizer
    )
    steps: list[dict] = []
    generation: list[float] = []
    generate_and_score = trainer._generate_and_score_completions

    def timed(*a, **kw):
        start = time.perf_counter()
        out = generate_and_score(*a, **kw)
        generation.append(time.perf_counter() - start)
        tokens = out["completion_mask"].sum()
        steps_tokens.append(int(tokens))
        return out

    steps_tokens: list[int] = []
    trainer._generate_and_score_completions = timed

    class Clock(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            steps.append({"wall": time.perf_counter() - self.start})

    trainer.add_callback(Clock())
    trainer.train()
    for step, seconds, tokens in zip(steps, generation, steps_tokens, strict=True):
        step["generation"], step["tokens"] = seconds, tokens
    return steps


def summary(steps: list[dict]) -> dict:
    """Medians over the steps given (generation and the rest each their own median)."""
    out = {k: statistics.median(s[k] for s in steps) for k in ("wall", "generation", "tokens")}
    out["rest"] = statistics.median(s["wall"] - s["generation"] for s in steps)
    out["steps"] = len(steps)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per run (the first is a warm-up)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per trainer, interleaved; their steps pooled")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step")
    parser.add_argument("--group-size", type=int, default=4, help="completions per prompt (G)")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="completion budget")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--data", default="world:add+sub+mul+expr+word")
    parser.add_argument("--shape", default="tiny", choices=tuple(SHAPES), help="the random teacher's shape")
    parser.add_argument("--workdir", type=Path, help="where models and runs go (default: a temp folder)")
    args = parser.parse_args()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    from transformers import AutoTokenizer

    from padd.data import batch_problems, build_prompt, load_problems

    work = Path(tempfile.mkdtemp(prefix="padd-bench-trl-", dir=args.workdir))
    student = student_of(SHAPES[args.shape], work)
    teacher = work / "teacher"

    tokenizer = AutoTokenizer.from_pretrained(student)
    problems = load_problems(args.data, split="train", world_per_skill=2000, seed=0)
    ordered = [p for b in range(args.steps) for p in batch_problems(problems, b, args.prompts, 0, 0, 1)]
    prompts = [build_prompt(tokenizer, p.problem) for p in ordered]
    answers = [p.answer for p in ordered]

    runners = {
        "padd": lambda w: padd_run(student, teacher, w, args, "transformers"),
        "TRL GRPOTrainer": lambda w: trl_run(student, w, args, prompts, answers, checkpointing=False),
        "TRL GRPOTrainer (its default gradient checkpointing)": lambda w: trl_run(
            student, w, args, prompts, answers, checkpointing=True
        ),
    }
    if importlib.util.find_spec("vllm") is not None:
        runners["padd --rollout vllm (vLLM's CPU build)"] = lambda w: padd_run(student, teacher, w, args, "vllm")
    pooled: dict[str, list[dict]] = {name: [] for name in runners}
    for repeat in range(args.repeats):
        for index, (name, run) in enumerate(runners.items()):
            steps = run(work / f"run-{index}-{repeat}")[1:]  # the first step warms up
            pooled[name] += steps
            Console().print(f"{name}, run {repeat + 1}: {summary(steps)['wall']:.3f} s per step (median)")
    medians = {name: summary(steps) for name, steps in pooled.items()}

    trl = medians["TRL GRPOTrainer"]["wall"]
    table = Table(
        title=f"One GRPO step, {args.shape} student: {args.prompts} prompts × {args.group_size} completions, "
        f"≤ {args.max_new_tokens} tokens, one optimizer step (CPU, {torch.get_num_threads()} threads; medians)"
    )
    for col in ("trainer", "completion tokens", "generation s", "rest s", "step s", "× TRL"):
        table.add_column(col, justify="right")
    for name, r in medians.items():
        table.add_row(
            name,
            f"{r['tokens']:.0f}",
            f"{r['generation']:.3f}",
            f"{r['rest']:.3f}",
            f"{r['wall']:.3f}",
            f"{r['wall'] / trl:.2f}",
        )
    Console(width=160).print(table)
    print(json.dumps({"shape": args.shape, "threads": torch.get_num_threads(), "results": medians}))


if __name__ == "__main__":
    main()
