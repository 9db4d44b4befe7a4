"""`padd teacher`: train a small transformers model from scratch on the miniature world.

The dense presets (tiny, mini) are Qwen2-class teachers (SwiGLU MLP, qkv biases) with their own
byte-level BPE tokenizer (single digits). The MoE preset (tiny-moe) is the paper's other party: a
pretrained Qwen3-MoE-class student of another width and depth, with more total and fewer active
parameters than the tiny teacher, trained on less math than the teacher saw and usually with the
teacher's tokenizer (`--tokenizer`, as the paper's pairs share theirs), so that it starts weaker on
the math skills. Every model trains on prompt + step-by-step solution with the loss on the solution
only and is evaluated with greedy Pass@1 per skill; it loads with AutoModelForCausalLM /
AutoTokenizer like any hub checkpoint.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from tqdm.auto import tqdm

from padd.config import EvalConfig
from padd.data import build_prompt
from padd.determinism import deterministic_kernels
from padd.errors import UserError
from padd.eval import evaluate_bench
from padd.generation.rollout import TransformersRollout
from padd.io import atomic_write_json, check_out_dir
from padd.tiny import build_tokenizer
from padd.world.tasks import MATH_SKILLS, SKILLS, make_problems


@dataclass(frozen=True)
class TeacherPreset:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    steps: int
    batch_size: int
    lr: float
    train_per_skill: int
    # an MoE model (Qwen3-MoE) when experts > 0: routed experts per layer, top-k, width of each
    experts: int = 0
    top_k: int = 0
    moe_intermediate_size: int = 0
    head_dim: int | None = None
    # training problems per math skill, when fewer than train_per_skill (a student that saw less math)
    math_per_skill: int | None = None
    # the loss on every token, prompt included (a pretrained LM), instead of on the solution only
    loss_on_prompt: bool = False


PRESETS = {
    # tests and the demo: 404-590 s on 2 CPU cores (by the day); half the steps or half the batch
    # leaves a far weaker teacher (docs/teachers.md, "Teacher presets")
    "tiny": TeacherPreset(128, 512, 4, 4, 2, steps=1500, batch_size=32, lr=3e-3, train_per_skill=8000),
    # stronger: about 22 minutes on 2 CPU cores
    "mini": TeacherPreset(192, 768, 6, 6, 2, steps=2000, batch_size=32, lr=2e-3, train_per_skill=40000),
    # the tiny teacher pretrained as a language model (the loss on every token, prompt included): the
    # teacher of the pretrained-student study, whose warm-up distils it on whole world texts
    "tiny-lm": TeacherPreset(
        128, 512, 4, 4, 2, steps=1500, batch_size=32, lr=3e-3, train_per_skill=8000, loss_on_prompt=True
    ),
    # the tiny teacher's pretrained MoE student (the paper's setting in miniature): width 160 and 5
    # layers against 128 and 4; 3.2x the teacher's parameters, and top-2 of 16 experts of 76 neurons
    # make its active FFN FLOPs per token 0.46x the teacher's (the paper's students: 0.47x per token).
    # It pretrains as a language model (the loss on every token, prompt included), so that its loss
    # on held-out world text measures what it knows; under a fifth of the teacher's math problems and
    # 60% of its steps leave it clearly weaker at math (docs/study.md, "The paper's setting in miniature").
    "tiny-moe": TeacherPreset(
        160,
        320,
        5,
        4,
        2,
        steps=900,
        batch_size=32,
        lr=3e-3,
        train_per_skill=8000,
        experts=16,
        top_k=2,
        moe_intermediate_size=76,
        head_dim=40,
        math_per_skill=1500,
        loss_on_prompt=True,
    ),
    # the pretrained MoE student of the tiny-paper study: the tiny teacher's width and depth, top-2 of
    # 32 experts of 64 neurons (3.1x the teacher's parameters, 0.53x its FLOPs per token), trained like
    # the teacher on prompt + solution but on fewer math problems, so that its math starts below the
    # teacher's while it keeps `reverse`, which it saw in full (docs/study.md, "The tiny-paper study")
    "tiny-paper-moe": TeacherPreset(
        128,
        512,
        4,
        4,
        2,
        steps=1500,
        batch_size=32,
        lr=3e-3,
        train_per_skill=8000,
        experts=32,
        top_k=2,
        moe_intermediate_size=64,
        head_dim=32,
        math_per_skill=2250,
    ),
}


def model_config(preset: TeacherPreset, *, vocab_size: int, eos_token_id: int, pad_token_id: int):
    """The preset's model config: Qwen2 (dense) or Qwen3-MoE (experts > 0)."""
    from transformers import Qwen2Config, Qwen3MoeConfig

    common = dict(
        vocab_size=vocab_size,
        hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_layers,
        num_attention_heads=preset.num_heads,
        num_key_value_heads=preset.num_kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        bos_token_id=None,
    )
    if not preset.experts:
        return Qwen2Config(**common)
    return Qwen3MoeConfig(
        **common,
        head_dim=preset.head_dim,
        num_experts=preset.experts,
        num_experts_per_tok=preset.top_k,
        moe_intermediate_size=preset.moe_intermediate_size,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        # the router learns with the usual auxiliary load-balancing loss while it pretrains (switched
        # off in the saved config: later stages balance with padd's own routing bias)
        output_router_logits=True,
        router_aux_loss_coef=0.01,
    )


def build_model(preset: TeacherPreset, tokenizer):
    """A randomly initialised model of the preset's shape (`model_config`) for `tokenizer`."""
    from transformers import Qwen2ForCausalLM, Qwen3MoeForCausalLM

    config = model_config(
        preset, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    return (Qwen3MoeForCausalLM if preset.experts else Qwen2ForCausalLM)(config)


def _examples(tokenizer, rows: list[dict]) -> list[tuple[list[int], int]]:
    """(token ids, prompt length) of prompt + " " + solution + EOS for each row."""
    out = []
    for r in rows:
        prompt = tokenizer(build_prompt(tokenizer, r["problem"]), add_special_tokens=False)["input_ids"]
        answer = tokenizer(" " + r["solution"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        out.append((prompt + answer, len(prompt)))
    return out


def _batch(examples, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full_like(input_ids, -100)
    mask = torch.zeros_like(input_ids)
    for i, (ids, n_prompt) in enumerate(examples):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
        mask[i, : len(ids)] = 1
    return input_ids, labels, mask


# A batch is sorted by length and run as this many micro-batches, each padded only to its own longest
# example: the same gradient as the whole batch (the loss is summed over every answer token of the
# batch and divided by their count) on about 13% fewer padded positions, 11% faster on 2 CPU cores.
MICRO_BATCHES = 2


def accumulate_batch_gradient(model, examples, pad_id: int, device, micro_batches: int = MICRO_BATCHES) -> float:
    """Backward of the mean next-token loss over every answer token of `examples` (token ids, prompt
    length), run as `micro_batches` length-sorted parts; returns the loss. Gradients accumulate in
    the model's .grad as one backward of the whole batch would leave them."""
    ordered = sorted(examples, key=lambda e: len(e[0]))
    targets = sum(len(ids) - n_prompt for ids, n_prompt in ordered)  # labels that survive the shift
    size = -(-len(ordered) // micro_batches)
    total = 0.0
    for start in range(0, len(ordered), size):
        input_ids, labels, mask = (t.to(device) for t in _batch(ordered[start : start + size], pad_id))
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels, num_items_in_batch=targets).loss
        loss.backward()
        total += loss.item()
    return total


def _problems_per_skill(cfg, preset: TeacherPreset) -> dict[str, int]:
    """Training problems per skill: cfg's or the preset's count, capped for the math skills at the
    preset's math_per_skill (a student that saw less math)."""
    n_train = cfg.train_per_skill or preset.train_per_skill
    n_math = min(n_train, preset.math_per_skill or n_train)
    return {s: n_math if s in MATH_SKILLS else n_train for s in SKILLS}


def _training_rows(per_skill: dict[str, int], seed: int) -> list[dict]:
    """The training problems of every skill (`per_skill` of each), shuffled with `seed`."""
    rows = [r for s in SKILLS for r in make_problems(s, "train", per_skill[s], seed, allow_fewer=True)]
    random.Random(seed).shuffle(rows)
    return rows


def _teacher_tokenizer(tokenizer_path: str | None, rows: list[dict]):
    """The tokenizer at `tokenizer_path` if given, else a byte-level BPE tokenizer trained on `rows`."""
    if tokenizer_path:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(tokenizer_path)
    # The tokenizer sees whole training texts, prompt template included, so the fixed instruction
    # costs a few tokens rather than one per character.
    return build_tokenizer(
        (build_prompt(None, r["problem"]) + " " + r["solution"] for r in rows[:20000]), vocab_size=512
    )


def _training_examples(
    tokenizer, rows: list[dict], loss_on_prompt: bool, batch_size: int
) -> list[tuple[list[int], int]]:
    """(token ids, prompt length) per row, the prompt length 0 when the loss covers the prompt too;
    raises UserError when there are fewer examples than one batch."""
    examples = _examples(tokenizer, rows)
    if loss_on_prompt:
        examples = [(ids, 0) for ids, _ in examples]
    if len(examples) < batch_size:
        raise UserError(
            f"{len(examples)} training examples is fewer than one batch of {batch_size}; raise --train-per-skill"
        )
    return examples


def _train_steps(model, examples, pad_id: int, cfg, *, steps: int, batch_size: int, lr: float) -> float | None:
    """Train `model` for `steps` AdamW steps on batches sampled from `examples` with seed cfg.seed + 1;
    returns the exponential moving average of the loss (None when steps is 0)."""
    optim = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    # Warm-up, stable, decay: a constant rate through the middle reaches the point where the model
    # learns to copy operands from the prompt sooner than a cosine that starts decaying at once.
    warmup, decay = max(1, steps // 20), max(1, steps // 5)
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: min(1.0, (s + 1) / warmup, max(0.0, (steps - s) / decay))
    )
    gen = random.Random(cfg.seed + 1)
    model.train()
    bar = tqdm(range(steps), desc=f"teacher ({cfg.preset})", disable=not cfg.progress)
    loss_ema = None
    for _ in bar:
        value = accumulate_batch_gradient(model, gen.sample(examples, batch_size), pad_id, cfg.device)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        sched.step()
        optim.zero_grad(set_to_none=True)
        loss_ema = value if loss_ema is None else 0.95 * loss_ema + 0.05 * value
        bar.set_postfix(loss=f"{loss_ema:.3f}")
    return loss_ema


def _save_trained(model, tokenizer, out: Path) -> None:
    """Switch `model` to eval mode and save it and `tokenizer` into `out`."""
    model.eval()
    model.config.output_router_logits = False  # an MoE's auxiliary loss was for pretraining only
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _evaluate_skills(model, tokenizer, cfg, out: Path) -> dict[str, float]:
    """Greedy Pass@1 per skill on cfg.eval_per_skill test problems each ({} when that is 0)."""
    eval_cfg = EvalConfig(
        model=str(out),
        out=str(out / "padd_teacher.json"),
        world_per_skill=cfg.eval_per_skill,
        max_new_tokens=160,
        batch_size=64,
        seed=cfg.seed,
        progress=cfg.progress,
    )
    if cfg.eval_per_skill <= 0:
        return {}
    generator = TransformersRollout(model, tokenizer, batch_size=eval_cfg.batch_size, progress=eval_cfg.progress)
    return {s: evaluate_bench(generator, f"world:{s}", eval_cfg)["pass@1"] for s in SKILLS}


def _print_scores(cfg, scores: dict[str, float], console: Console) -> None:
    """The per-skill Pass@1 table on the terminal, when there are scores."""
    if not scores:
        return
    table = Table(title=f"teacher {cfg.preset}: greedy Pass@1 on {cfg.eval_per_skill} test problems per skill")
    for s in SKILLS:
        table.add_column(s, justify="right")
    table.add_row(*(f"{100 * scores[s]:.1f}" for s in SKILLS))
    console.print(table)


def train_teacher(cfg, console: Console | None = None) -> dict:
    """Train the preset's model into cfg.out; returns {"pass@1": {skill: score}, ...}."""
    console = console or Console()
    preset = PRESETS[cfg.preset]
    steps = cfg.steps or preset.steps
    batch_size = cfg.batch_size or preset.batch_size
    lr = cfg.lr or preset.lr
    out = Path(cfg.out)
    check_out_dir(out, cfg.overwrite)
    deterministic_kernels(cfg.device)
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    per_skill = _problems_per_skill(cfg, preset)
    rows = _training_rows(per_skill, cfg.seed)
    tokenizer = _teacher_tokenizer(cfg.tokenizer, rows)
    examples = _training_examples(tokenizer, rows, preset.loss_on_prompt, batch_size)
    console.print(
        f"{len(examples)} training examples, tokenizer of {len(tokenizer)} tokens ({time.perf_counter() - t0:.0f}s)"
    )
    model = build_model(preset, tokenizer).to(cfg.device)
    final_loss = _train_steps(model, examples, tokenizer.pad_token_id, cfg, steps=steps, batch_size=batch_size, lr=lr)
    train_s = time.perf_counter() - t0
    _save_trained(model, tokenizer, out)
    scores = _evaluate_skills(model, tokenizer, cfg, out)
    record = {
        "preset": cfg.preset,
        "architecture": model.config.model_type,
        "train_per_skill": per_skill,
        "tokenizer": str(Path(cfg.tokenizer).resolve()) if cfg.tokenizer else "trained",
        "steps": steps,
        "lr": lr,
        "batch_size": batch_size,
        "train_seconds": round(train_s, 1),
        "final_loss": final_loss,
        "pass@1": scores,
        "eval_per_skill": cfg.eval_per_skill,
        "seed": cfg.seed,
    }
    atomic_write_json(out / "padd_teacher.json", record)
    _print_scores(cfg, scores, console)
    console.print(f"trained {steps} steps in {train_s:.0f}s, written to {out}")
    return record
