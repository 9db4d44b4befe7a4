"""Seconds of each phase of a study: FLOPs at the MFU where compute bounds it, bytes over the memory
bandwidth (or the interconnect) where they do."""

from __future__ import annotations

import math

from padd.generation.rollout import GENERATE_BATCH
from padd.plan.memory import dtype_bytes, kv_values_per_token
from padd.plan.models import ModelShape
from padd.plan.settings import GIB, Hardware, Run

# per decode step and layer, the Python and kernel-launch time of transformers' generate (no CUDA graphs)
GENERATE_LAYER_OVERHEAD_S = 2e-4
OPTIMIZER_BYTES = 28  # AdamW per parameter: read weight, grad, two moments; write weight, two moments


def phase_seconds(teacher: ModelShape, student: ModelShape, run: Run, hw: Hardware) -> tuple[dict, dict, list]:
    """(wall seconds of each phase over the whole run, FLOPs of each Phase B phase per rollout batch
    over all GPUs, notes on what bounds them)."""
    notes: list[str] = []
    compute = hw.tflops * 1e12 * hw.mfu if hw.tflops else None
    bandwidth = hw.bandwidth_tbs * 1e12 if hw.bandwidth_tbs else None
    # padd keeps the student's weights in float32 and transformers' grouped expert matmuls run in the
    # weights' dtype (outside autocast): under bf16 the experts still compute at the float32 rate
    expert_compute = compute
    if run.precision == "bf16" and compute and student.moe:
        expert_compute = hw.tflops_fp32 * 1e12 * hw.mfu if hw.tflops_fp32 else compute
        if expert_compute < compute:
            notes.append(
                f"under bf16 the student's experts run in float32 ({hw.tflops_fp32:g} TFLOP/s peak): "
                f"{student.expert_share(run.sequence):.0%} of its FLOPs"
            )

    def at_mfu(work: float) -> float:
        return work / compute if compute else math.nan

    def student_at_mfu(work: float, context: int) -> float:
        if not compute:
            return math.nan
        share = student.expert_share(context)
        return work * (1 - share) / compute + work * share / expert_compute

    seconds: dict[str, float] = {}
    # Stage I: the teacher over the sampled tokens (padd seed: both models, before and after, and the
    # CKA layer map), then a balanced K-Means per layer; one device
    t_flops = teacher.flops_per_token(run.stage1_seq_len)
    s_flops = student.flops_per_token(run.stage1_seq_len)
    work = t_flops * (run.stage1_tokens + run.stage1_extra_tokens)
    if run.stage1 == "seed":
        work += s_flops * (run.stage1_tokens + 2 * run.stage1_extra_tokens)
    d_ff = teacher.config.intermediate_size
    kmeans = teacher.config.num_hidden_layers * run.kmeans_iters * 2 * 2 * d_ff * run.experts * (run.proj_dim or 1)
    seconds["stage1"] = at_mfu(work + kmeans)

    # warm-up: teacher forward, student forward and backward (and the recomputed forward under
    # checkpointing) over every token, on all GPUs; an AdamW step on the experts per batch of windows
    length = run.warmup_seq_len
    tokens = run.warmup_tokens * run.warmup_epochs / hw.gpus
    student_passes = 3 + (1 if run.checkpointing else 0)
    optimizer_steps = tokens / (run.warmup_batch_size * length)  # each rank steps on its own batch_size windows
    optimizer = OPTIMIZER_BYTES * student.experts / (hw.gpus if run.warmup_parallel == "fsdp" else 1)
    seconds["warmup"] = (
        at_mfu(teacher.flops_per_token(length) * tokens)
        + student_at_mfu(student_passes * student.flops_per_token(length) * tokens, length)
        + (optimizer_steps * optimizer / bandwidth if bandwidth else 0.0)
    )

    # Phase B, per rollout batch and device
    seqs = run.prompts_per_step * run.group_size / hw.gpus
    length, completion = run.sequence, run.completion_tokens
    s_fwd = student.flops_per_token(length) * seqs * length
    step_flops = {
        "generation": (
            student.flops_per_token(run.prompt_tokens) * seqs * run.prompt_tokens
            + student.flops_per_token(run.prompt_tokens + completion // 2) * seqs * completion
        )
        * hw.gpus,
        "teacher": (teacher.flops_per_token(length) * seqs * length if run.kd else 0.0) * hw.gpus,
        "student": s_fwd * ((2 if run.old_policy_forward else 1) + (1 if run.checkpointing else 0)) * hw.gpus,
        "update": 2 * s_fwd * hw.gpus,
    }
    per_step = {
        "teacher": at_mfu(step_flops["teacher"] / hw.gpus),
        "student": student_at_mfu(step_flops["student"] / hw.gpus, length),
        "update": student_at_mfu(step_flops["update"] / hw.gpus, length),
        "generation": _generation_seconds(student, run, hw, compute, expert_compute, bandwidth, notes),
    }
    if bandwidth:
        shards = hw.gpus if run.parallel == "fsdp" else 1
        per_step["update"] += run.updates_per_batch * OPTIMIZER_BYTES * student.total / shards / bandwidth
    if hw.gpus > 1 and run.parallel == "fsdp":
        # weights gathered for the forward and again for the backward, gradients reduce-scattered
        moved = 3 * 4 * student.total * (hw.gpus - 1) / hw.gpus * run.updates_per_batch
        link = moved / (hw.link_gbs * 1e9)
        training = per_step["student"] + per_step["update"]
        if link > training:
            notes.append(f"FSDP2's gathers ({link:.1f} s per batch) outlast the training compute: interconnect-bound")
            per_step["update"] += link - training
    for phase in ("generation", "teacher", "student", "update"):
        seconds[phase] = per_step[phase] * run.steps
    return seconds, step_flops, notes


def _generation_seconds(
    student: ModelShape, run: Run, hw: Hardware, compute, expert_compute, bandwidth, notes: list
) -> float:
    """Prefill at the MFU, then one decode step per completion token, each bounded by the bytes it reads
    (the weights the batch's tokens route to, and the KV cache) or its FLOPs, whichever is longer.
    transformers' generate decodes the batch in chunks of GENERATE_BATCH sequences, one after the other;
    vLLM all at once, in waves where its KV cache holds fewer tokens."""
    seqs = run.prompts_per_step * run.group_size / hw.gpus
    chunks = math.ceil(seqs / GENERATE_BATCH) if run.rollout == "transformers" else 1
    seqs = seqs / chunks
    cfg = student.config
    if not compute:
        return math.nan
    context = run.prompt_tokens + run.completion_tokens // 2
    share = student.expert_share(context)
    rate = 1 / ((1 - share) / compute + share / expert_compute)  # FLOP/s over the student's mix
    prefill = student.flops_per_token(run.prompt_tokens) * seqs * run.prompt_tokens
    decode_flops = student.flops_per_token(context) * seqs
    # each token picks K of E experts: the share of routed weights a decode step of `seqs` tokens reads
    touched = 1.0
    if student.moe:
        from padd.router_adapter import num_experts, top_k

        touched = 1 - (1 - top_k(cfg) / num_experts(cfg)) ** seqs
    weight_bytes = (student.total - student.routed + student.routed * touched) * (
        dtype_bytes(run.precision) if run.rollout == "vllm" else 4
    )
    kv = seqs * (run.prompt_tokens + run.completion_tokens / 2) * kv_values_per_token(cfg, run.rollout)
    kv_bytes = kv * dtype_bytes(run.precision)
    per_token = max(decode_flops / rate, (weight_bytes + kv_bytes) / bandwidth if bandwidth else 0.0)
    if run.rollout == "transformers":
        per_token += GENERATE_LAYER_OVERHEAD_S * cfg.num_hidden_layers
        if hw.gpus > 1 and run.parallel == "fsdp":
            gather = 4 * student.total * (hw.gpus - 1) / hw.gpus / (hw.link_gbs * 1e9)
            if gather > per_token:
                engine = dtype_bytes("bf16") * student.total / GIB
                alternative = (
                    f"--rollout vllm would decode from an unsharded copy, if its share holds the student's "
                    f"{engine:.0f} GiB of bf16 weights (plan it with --rollout vllm --vllm-gpu-memory SHARE)"
                    if engine < 0.5 * hw.memory_gib
                    else f"a vLLM engine beside the trainer would hold the student's {engine:.0f} GiB of bf16 weights "
                    "on every GPU, which padd cannot place"
                )
                notes.append(
                    f"generate on the FSDP2-sharded student gathers every layer at every token ({gather:.2f} s per "
                    f"token); {alternative}"
                )
            per_token = max(per_token, gather)
    waves = 1
    if run.rollout == "vllm" and hw.device == "cuda":
        capacity = vllm_kv_tokens(student, run, hw)
        needed = seqs * run.sequence  # the rollout batch's own lengths, not the engine's longest
        if 0 < capacity < needed:
            waves = math.ceil(needed / capacity)
            notes.append(f"vLLM's KV cache holds {capacity:,.0f} tokens of {needed:,.0f}: it decodes in {waves} waves")
    return chunks * (prefill / rate + waves * run.completion_tokens * per_token)


def vllm_kv_tokens(student: ModelShape, run: Run, hw: Hardware) -> float:
    """Tokens the engine's KV cache holds: its share less the weights and about 1 GiB of activations."""
    free = run.vllm_share * hw.memory_gib * GIB - dtype_bytes(run.precision) * student.total - GIB
    return free / (kv_values_per_token(student.config, "vllm") * dtype_bytes(run.precision))
