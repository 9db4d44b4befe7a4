"""Bytes per device of each phase of a study, by component (see padd.plan for what is counted)."""

from __future__ import annotations

import os

from padd import flops
from padd.plan.models import ModelShape, is_moe
from padd.plan.settings import GIB, Hardware, Run

KD_CHUNK_TOKENS = 1024  # padd.losses' chunk of the KD loss


def dtype_bytes(precision: str) -> int:
    """Bytes of an autocast activation (and of the teacher's weights) at `precision`."""
    return 2 if precision == "bf16" else 4


def saved_bytes_per_token(cfg, precision: str) -> tuple[float, float]:
    """(all layers, the largest one) bytes a training forward keeps for the backward, per token.

    Per layer: both RMSNorms' input and output in float32; the attention's q, k, v, rotated q and k,
    the keys and values repeated to every head (GQA under SDPA with a padding mask), its output and
    that output reshaped; the MLP's gate, up, activation and product. Under bf16 autocast a matmul
    input is also kept as a bfloat16 copy. An MoE layer keeps the router's float32 logits and
    probabilities and, for each of the token's K experts, its input, output and four intermediates,
    in float32 at any precision: transformers' grouped expert matmuls are outside autocast and run
    in the weights' dtype, which padd keeps in float32. Attention scores are not kept (SDPA and flash
    attention recompute them). Checked against the tensors autograd saves on Glm4Moe and Qwen3-MoE
    (within 10%); latent attention's terms are from its shapes alone."""
    b = dtype_bytes(precision)
    cast = b if precision == "bf16" else 0  # autocast's bfloat16 copy of a float32 matmul input
    h, n_heads, n_kv, hd = flops._attn_dims(cfg)
    if getattr(cfg, "kv_lora_rank", None):
        qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        attention = (n_heads * qk * 3 + n_heads * cfg.v_head_dim * 3 + cfg.kv_lora_rank * 2) * b + h * cast
    else:
        repeated = 2 * n_heads * hd if n_kv < n_heads else 0
        attention = (n_heads * hd * 4 + n_kv * hd * 4 + repeated) * b + (h + n_heads * hd) * cast
    norms = 2 * 2 * h * 4
    moe_layers = flops._moe_layers(cfg)
    per_layer = []
    for i in range(cfg.num_hidden_layers):
        if i in moe_layers:
            from padd.router_adapter import num_experts, top_k

            width = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
            shared = (getattr(cfg, "n_shared_experts", 0) or 0) * width
            shared = getattr(cfg, "shared_expert_intermediate_size", None) or shared
            routed = top_k(cfg) * (2 * h + 4 * width) * 4
            mlp = 2 * num_experts(cfg) * 4 + routed + ((h + 4 * shared) * b + h * cast if shared else 0)
        else:
            mlp = 4 * cfg.intermediate_size * b + h * cast
        per_layer.append(norms + attention + mlp)
    return float(sum(per_layer)), float(max(per_layer))


def training_state(
    model: ModelShape, trained: int, parallel: str, gpus: int, offload: bool = False
) -> dict[str, float]:
    """Bytes per device of a float32 student's weights, gradients and AdamW state (`trained` parameters;
    `offload`: the AdamW state in CPU memory instead)."""
    shards = gpus if parallel == "fsdp" else 1
    state = {
        "student weights": 4 * model.total / shards,
        "gradients": 4 * trained / shards,
        "AdamW state": 0.0 if offload else 8 * trained / shards,
    }
    if gpus > 1 and parallel == "ddp":
        state["DDP buckets"] = 4 * trained
    if gpus > 1 and parallel == "fsdp":
        state["FSDP2 gathers"] = 3 * 4 * model.largest_unit  # this, the prefetched one, its gradient
    return state


def kv_values_per_token(cfg, engine: str) -> int:
    """Values per token of the KV cache over all layers: transformers keeps latent attention's keys and
    values expanded per head; vLLM keeps the latent and the rotary key."""
    h, n_heads, n_kv, hd = flops._attn_dims(cfg)
    if getattr(cfg, "kv_lora_rank", None):
        if engine == "vllm":
            return cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        return cfg.num_hidden_layers * n_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim)
    return cfg.num_hidden_layers * 2 * n_kv * hd


def vllm_memory(student: ModelShape, run: Run, hw: Hardware) -> dict[str, float]:
    """The engine's bytes per device: on a GPU its share of the memory; on a CPU its weights and the KV
    cache VLLM_CPU_KVCACHE_SPACE sizes (padd's default 1 GiB)."""
    if hw.device == "cpu":
        weights = dtype_bytes(run.precision) * student.total
        return {"vLLM engine": weights + float(os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")) * GIB}
    return {"vLLM engine": run.vllm_share * hw.memory_gib * GIB}


def phase_memory(teacher: ModelShape, student: ModelShape, run: Run, hw: Hardware) -> dict[str, dict[str, float]]:
    """Bytes per device of each phase at its peak, by component."""
    gpus, b = hw.gpus, dtype_bytes(run.precision)
    vocab = student.config.vocab_size
    memory: dict[str, dict[str, float]] = {}

    # Stage I: the teacher (and the student it builds or seeds) on one device, with the features
    t_layers = teacher.config.num_hidden_layers
    features = 4 * t_layers * teacher.config.intermediate_size * (run.proj_dim or run.stage1_tokens)
    window = run.stage1_batch_size * run.stage1_seq_len
    stage1 = {
        "teacher": run.stage1_bytes[0] * teacher.total,
        "student model": run.stage1_bytes[1] * student.total,
        "activations": window * _layer_working_bytes(teacher.config, 4) + 4 * window * teacher.config.vocab_size,
        "features": features,
    }
    memory["stage1"] = stage1

    # warm-up: the experts train behind a frozen router on KL(teacher || student) over whole windows
    wb = dtype_bytes(run.warmup_precision)
    warm_tokens = run.warmup_batch_size * run.warmup_seq_len / gpus
    saved, largest = saved_bytes_per_token(student.config, run.warmup_precision)
    warm = training_state(student, student.experts, run.warmup_parallel, gpus, run.offload_optimizer)
    warm["teacher"] = dtype_bytes(run.warmup_precision) * teacher.total  # padd warmup never shards it
    warm["activations"] = warm_tokens * _activations(saved, largest, student.config, run)
    # student and teacher logits, the log-softmax chunks of the loss and the logits' gradient
    warm["logits"] = warm_tokens * vocab * (2 * wb + 4) + 6 * KD_CHUNK_TOKENS * vocab * 4
    memory["warmup"] = warm

    # Phase B: what stays resident through a rollout batch (gradients live until the next backward)
    resident = training_state(student, student.total, run.parallel, gpus, run.offload_optimizer)
    resident["teacher"] = _teacher_bytes(teacher, run.precision, run.parallel, gpus)
    if run.rollout == "vllm":
        resident |= vllm_memory(student, run, hw)
    seqs, mini = run.sequences_per_forward(gpus)  # per device: a rollout batch, one training forward
    completion, length = run.completion_tokens + 1, run.sequence

    generation = dict(resident)
    if run.rollout == "transformers":
        generation["KV cache"] = seqs * length * kv_values_per_token(student.config, "transformers") * b
        generation["activations"] = seqs * run.prompt_tokens * _layer_working_bytes(student.config, b)
        generation["logits"] = 3 * seqs * vocab * 4
    memory["generation"] = generation

    saved, largest = saved_bytes_per_token(student.config, run.precision)
    activations = mini * length * _activations(saved, largest, student.config, run)
    # the update's logits [n, C + 1, V] and their float32 log-softmax (kept for the backward), with the
    # float32 copy of the logits that feeds it while it runs
    logits = mini * completion * vocab * (b + 4)
    copy = mini * completion * vocab * 4 * (2 if run.temperature not in (0, 1) else 1)
    student_phase = dict(resident) | {"activations": activations, "logits": logits + copy}
    if run.updates_per_batch > 1:  # π_old: a no-grad forward of the whole rollout batch first
        if run.micro_batch:
            seqs = min(seqs, run.micro_batch)
        old = seqs * completion * vocab * (b + 4 + 4) + seqs * length * _layer_working_bytes(student.config, b)
        if old > activations + logits + copy:
            student_phase = dict(resident) | {"activations": 0.0, "logits": old}
    memory["student"] = student_phase

    teacher_phase = dict(resident) | {"activations": activations, "logits": logits}
    if run.kd:
        tb = dtype_bytes(run.precision)
        teacher_phase["teacher logits"] = mini * completion * vocab * tb
        teacher_phase["teacher acts"] = mini * length * _layer_working_bytes(teacher.config, tb)
    memory["teacher"] = teacher_phase

    update = dict(resident) | {"activations": activations}
    # backward: the logits, their log-softmax and its two float32 gradients, the logits' gradient,
    # and the KD loss's recomputed chunks
    update["logits"] = logits + mini * completion * vocab * (8 + b)
    if run.kd:
        update["teacher logits"] = mini * completion * vocab * dtype_bytes(run.precision)
        update["logits"] += 6 * min(KD_CHUNK_TOKENS, mini * completion) * vocab * 4
    if not run.offload_optimizer:
        update["AdamW temps"] = _optimizer_temporaries(student, run.parallel, gpus, hw.device)
    memory["update"] = update
    return memory


def _teacher_bytes(teacher: ModelShape, precision: str, parallel: str, gpus: int) -> float:
    if parallel == "fsdp" and gpus > 1:
        return dtype_bytes(precision) * (teacher.total / gpus + 2 * teacher.largest_unit)
    return dtype_bytes(precision) * teacher.total


def _activations(saved: float, largest: float, cfg, run: Run) -> float:
    """Bytes per token kept for the backward: every layer's, or under checkpointing each layer's
    float32 input plus one layer recomputed."""
    if not run.checkpointing:
        return saved
    return 4 * cfg.hidden_size * cfg.num_hidden_layers + largest


def _layer_working_bytes(cfg, b: int) -> float:
    """Bytes per token a no-grad forward holds at once: about one layer's intermediates."""
    h = cfg.hidden_size
    width = getattr(cfg, "moe_intermediate_size", None) if is_moe(cfg) else None
    if width:
        from padd.router_adapter import top_k

        return (4 * h + 3 * top_k(cfg) * width) * b
    return (4 * h + 3 * cfg.intermediate_size) * b


def _optimizer_temporaries(student: ModelShape, parallel: str, gpus: int, device: str) -> float:
    """AdamW's working memory: on CUDA the foreach implementation holds one float32 copy of the
    moments it updates; on a CPU it steps one tensor at a time."""
    if device == "cpu":
        return 2 * 4 * student.largest_tensor
    return 4 * student.total / (gpus if parallel == "fsdp" else 1)
