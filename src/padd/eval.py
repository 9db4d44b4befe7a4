"""`padd eval`: batched generation with a KV cache, graded Pass@1 / avg@k / pass@k, per benchmark."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from padd.config import to_dict
from padd.data import PROMPT_TEMPLATES, build_prompt, load_problem_set, resolve_bench, template_of
from padd.errors import UserError
from padd.flops import forward_flops_per_token
from padd.generation.rollout import RolloutBackend, TransformersRollout
from padd.grading import extract_answer, grade
from padd.io import atomic_write_json
from padd.models import load_causal_lm

# `padd eval --backend vllm` has the GPU to itself (no trainer beside it)
EVAL_GPU_MEMORY = 0.85

DEFAULT_BENCHES = ("world:add", "world:sub", "world:mul", "world:expr", "world:word", "world:reverse")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def complete(
    backend: RolloutBackend,
    prompts: list[str],
    *,
    num_samples: int = 1,
    temperature: float = 0.0,
    max_new_tokens: int = 256,
    seed: int = 0,
) -> list[list[str]]:
    """`num_samples` completions per prompt (greedy when temperature == 0) from a generation backend
    (`TransformersRollout`: left-padded batches with a KV cache; `VLLMRollout`: a vLLM engine).

    Returns:
        completions[i][j]: the j-th completion of prompt i, decoded up to its first EOS.
    """
    torch.manual_seed(seed)  # both backends draw their sampling seeds from torch's generator
    texts = backend.sample(prompts, num_samples, temperature=temperature, max_new_tokens=max_new_tokens).texts
    return [texts[i * num_samples : (i + 1) * num_samples] for i in range(len(prompts))]


def generation_backend(cfg, tokenizer) -> RolloutBackend:
    """The engine `cfg.backend` (an EvalConfig) names, holding the model cfg.model."""
    if cfg.backend == "vllm":
        from transformers import AutoConfig

        from padd.generation.vllm import VLLMRollout, engine_length
        from padd.routing import BIAS_FILE

        if (Path(cfg.model) / BIAS_FILE).exists():
            raise UserError(
                f"{cfg.model} routes with padd's selection bias ({BIAS_FILE}, for an architecture without a "
                "native one), which vLLM does not read: evaluate it with --backend transformers"
            )
        # the checkpoint's own dtype, as transformers loads it (vLLM's "auto" runs float32 in bfloat16 on a
        # CPU), so that the two backends give the same greedy verdicts; no routing asked for
        config = AutoConfig.from_pretrained(cfg.model)
        dtype = str(getattr(config, "dtype", None) or "float32").removeprefix("torch.")
        return VLLMRollout(
            cfg.model,
            tokenizer,
            device=cfg.device,
            dtype=dtype,
            gpu_memory_utilization=EVAL_GPU_MEMORY,
            # longer prompts are cut or refused by fit_prompts
            max_model_len=engine_length(getattr(config, "max_position_embeddings", None), cfg.max_new_tokens),
            seed=cfg.seed,
            progress=cfg.progress,
        )
    model = load_causal_lm(cfg.model, dtype="auto", device=cfg.device)
    return TransformersRollout(model, tokenizer, batch_size=cfg.batch_size or 32, progress=cfg.progress)


def fit_prompts(tokenizer, prompts: list[str], context: int | None, max_new_tokens: int, truncate: bool, spec: str):
    """(prompts, how many were cut): a prompt whose tokens and the generation budget exceed the
    model's context keeps its last tokens with `truncate`, else the evaluation stops saying what to do."""
    if not context:
        return prompts, 0
    room = context - max_new_tokens
    if room <= 0:
        raise UserError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in {context} positions")
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    long = [i for i, x in enumerate(ids) if len(x) > room]
    if long and not truncate:
        raise UserError(
            f"{spec}: {len(long)} prompt(s) longer than the {context} positions minus --max-new-tokens "
            f"{max_new_tokens} (the longest {max(len(ids[i]) for i in long)} tokens); pass --truncate-prompts to "
            f"keep each one's last {room} tokens, or lower --max-new-tokens"
        )
    fitted = list(prompts)
    for i in long:
        fitted[i] = tokenizer.decode(ids[i][-room:])
    return fitted, len(long)


def evaluate_bench(backend: RolloutBackend, spec: str, cfg, console: Console | None = None) -> dict:
    """Greedy Pass@1 (and avg@k, pass@k with k samples) on one benchmark SPEC, keeping every completion."""
    problems, skipped = load_problem_set(
        resolve_bench(spec, getattr(cfg, "bench_dir", None)),
        split=cfg.split,
        world_per_skill=cfg.world_per_skill,
        limit=cfg.limit,
        problem_field=cfg.problem_field,
        answer_field=cfg.answer_field,
    )
    template = getattr(cfg, "prompt_template", "auto")
    tokenizer = backend.tokenizer
    prompts = [build_prompt(tokenizer, p.problem, template) for p in problems]
    context = backend.context
    prompts, truncated = fit_prompts(
        tokenizer, prompts, context, cfg.max_new_tokens, getattr(cfg, "truncate_prompts", False), spec
    )
    if truncated and console is not None:
        console.print(f"[yellow]{spec}: {truncated} prompt(s) cut to their last {context - cfg.max_new_tokens} tokens")
    kw = {"max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed}
    greedy = complete(backend, prompts, **kw)
    rows = []
    for p, g in zip(problems, greedy, strict=True):
        rows.append(
            {
                "source": p.source,
                "problem": p.problem,
                "answer": p.answer,
                "greedy": g[0],
                "extracted": extract_answer(g[0]),
                "greedy_correct": grade(g[0], p.answer),
            }
        )
    result = {
        "n": len(rows),
        "skipped": skipped,
        "truncated_prompts": truncated,
        "pass@1": sum(r["greedy_correct"] for r in rows) / len(rows),
    }
    if cfg.samples > 1:
        sampled = complete(backend, prompts, num_samples=cfg.samples, temperature=cfg.temperature, **kw)
        for row, p, comps in zip(rows, problems, sampled, strict=True):
            row["samples"] = comps
            row["samples_correct"] = [grade(c, p.answer) for c in comps]
        k = cfg.samples
        result["k"], result["temperature"] = k, cfg.temperature
        result[f"avg@{k}"] = sum(sum(r["samples_correct"]) / k for r in rows) / len(rows)
        result[f"pass@{k}"] = sum(pass_at_k(k, sum(r["samples_correct"]), k) for r in rows) / len(rows)
    result["rows"] = rows
    return result


def run_eval(cfg, console: Console | None = None) -> dict:
    """Evaluate a model directory on every benchmark of cfg.bench; write cfg.out (JSON) and print a table."""
    from transformers import AutoConfig, AutoTokenizer

    if Path(cfg.out).exists() and not cfg.overwrite:  # before the model loads, as every --out is checked
        raise UserError(f"--out {cfg.out} exists; pass --overwrite to replace it, or choose another path")
    console = console or Console()
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    backend = generation_backend(cfg, tokenizer)
    benches = [b.strip() for b in (cfg.bench or ",".join(DEFAULT_BENCHES)).split(",") if b.strip()]
    results = {b: evaluate_bench(backend, b, cfg, console) for b in benches}
    metric_names = [m for m in next(iter(results.values())) if m.startswith(("pass@", "avg@"))]
    average = {m: sum(r[m] for r in results.values()) / len(results) for m in metric_names}
    report = {
        "model": str(cfg.model),
        "flops_per_token@1024": forward_flops_per_token(AutoConfig.from_pretrained(cfg.model), 1024),
        "average": average,
        "prompt_template": template_of(tokenizer, cfg.prompt_template),
        "prompt_template_text": PROMPT_TEMPLATES[template_of(tokenizer, cfg.prompt_template)],
        "benchmarks": results,
        "config": to_dict(cfg),
    }
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(cfg.out), report)
    table = Table(title=f"{cfg.model}  ({report['flops_per_token@1024'] / 1e6:.2f} MFLOPs/token @1024)")
    table.add_column("benchmark")
    table.add_column("n", justify="right")
    for m in metric_names:
        table.add_column(m, justify="right")
    for b, r in results.items():
        table.add_row(b, str(r["n"]), *(f"{100 * r[m]:.1f}" for m in metric_names))
    table.add_row("[bold]average", "", *(f"[bold]{100 * average[m]:.1f}" for m in metric_names))
    console.print(table)
    return report
