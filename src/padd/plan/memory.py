"""Bytes per device of each phase of a study, by component (see padd.plan for what is counted)."""

from __future__ import annotations

import os

from padd import flops
from padd.generation.rollout import GENERATE_BATCH
from padd.losses import KD_CHUNK_TOKENS
from padd.plan.models import ModelShape, is_moe
from padd.plan.settings import GIB, Hardware, Run


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


# the phases of the memory table: loading the models, Stage I, the warm-up, and Phase B's rollout
# batch (generate, the teacher's forward, the student's forwards, the backward, the optimizer step)
MEMORY_PHASES = ("load", "stage1", "warmup", "generation", "teacher", "student", "backward", "step")


def phase_memory(teacher: ModelShape, student: ModelShape, run: Run, hw: Hardware) -> dict[str, dict[str, float]]:
    """Bytes per device of each phase (MEMORY_PHASES) at its peak, by component."""
    gpus, b = hw.gpus, dtype_bytes(run.precision)
    vocab = student.config.vocab_size
    memory: dict[str, dict[str, float]] = {}

    # padd train and padd warmup load the whole float32 student and the whole teacher onto every
    # device, then shard them
    shards = gpus if run.sharded_load else 1
    teacher_bytes = max(dtype_bytes(run.precision), dtype_bytes(run.warmup_precision))
    memory["load"] = {"student weights": 4 * student.total / shards, "teacher": teacher_bytes * teacher.total / shards}

    # Stage I on one device: padd seed holds both models while it measures; padd decompose frees
    # its statistics before it builds the student
    t_cfg = teacher.config
    window = run.stage1_batch_size * run.stage1_seq_len
    statistics = {
        "activations": window * _layer_working_bytes(t_cfg, 4),
        "features": 4 * t_cfg.num_hidden_layers * t_cfg.intermediate_size * (run.proj_dim or run.stage1_tokens),
    }
    stage1 = {"teacher": run.stage1_bytes[0] * teacher.total}
    built = {"student model": run.stage1_bytes[1] * student.total}
    if run.stage1 == "seed" or sum(statistics.values()) > built["student model"]:
        stage1 |= statistics
    if run.stage1 == "seed" or sum(statistics.values()) <= built["student model"]:
        stage1 |= built
    memory["stage1"] = stage1

    # warm-up: every rank trains its batch_size windows per step (the experts, behind a frozen router)
    # on KL(teacher || student) over whole windows, the teacher whole
    wb = dtype_bytes(run.warmup_precision)
    tokens = run.warmup_batch_size * run.warmup_seq_len
    saved, largest = saved_bytes_per_token(student.config, run.warmup_precision)
    warm = training_state(student, student.experts, run.warmup_parallel, gpus, run.offload_optimizer)
    warm["teacher"] = wb * teacher.total
    warm["activations"] = tokens * _activations(saved, largest, student.config, run)
    # both models' logits, the loss's masked copies of them, a float32 gradient, a chunk of the loss
    warm["logits"] = tokens * vocab * (4 * wb + 4) + 6 * KD_CHUNK_TOKENS * vocab * 4
    if run.warmup_parallel == "fsdp" and gpus > 1 and not run.sharded_load:
        # at the end the sharded student is gathered whole on every rank for the router start
        warm["gathered student"] = 4 * student.total
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
        chunk = min(seqs, GENERATE_BATCH)  # generate runs the batch in chunks of this many sequences
        generation["KV cache"] = chunk * length * kv_values_per_token(student.config, "transformers") * b
        generation["activations"] = chunk * run.prompt_tokens * _layer_working_bytes(student.config, b)
        generation["logits"] = 3 * chunk * vocab * 4
    memory["generation"] = generation

    saved, largest = saved_bytes_per_token(student.config, run.precision)
    activations = mini * length * _activations(saved, largest, student.config, run)
    # the update's logits [n, C + 1, V] and their float32 log-softmax (kept for the backward), with the
    # float32 copy of the logits that feeds it while it runs
    cells = mini * completion * vocab  # entries of one forward's logits
    logits = cells * (b + 4)
    copy = cells * 4 * (2 if run.temperature not in (0, 1) else 1)
    student_phase = dict(resident) | {"activations": activations, "logits": logits + copy}
    if run.old_policy_forward:  # π_old: a no-grad forward of the whole rollout batch first
        old_seqs = min(seqs, run.micro_batch) if run.micro_batch else seqs
        old = old_seqs * completion * vocab * (b + 4 + 4) + old_seqs * length * _layer_working_bytes(student.config, b)
        if old > activations + logits + copy:
            student_phase = dict(resident) | {"activations": 0.0, "logits": old}
    memory["student"] = student_phase

    teacher_phase = dict(resident) | {"activations": activations, "logits": logits}
    if run.kd:
        teacher_phase["teacher logits"] = cells * b
        teacher_phase["teacher acts"] = mini * length * _layer_working_bytes(teacher.config, b)
    memory["teacher"] = teacher_phase

    backward = dict(resident) | {"activations": activations}
    # the logits and their log-softmax, its two float32 gradients and the logits' gradient, and with KD
    # the teacher's logits and a chunk of the loss recomputed. The KD loss's masked copies of both
    # logits and its own gradient buffers are not all alive at once: counting them adds 30% to the
    # measured backward of the mini shape with a 16k vocabulary (benchmarks/bench_plan.py), this 5%.
    backward["logits"] = logits + cells * (8 + b)
    if run.kd:
        backward["teacher logits"] = cells * b
        backward["logits"] += 6 * min(KD_CHUNK_TOKENS, cells / vocab) * vocab * 4
    memory["backward"] = backward

    # the optimizer step, once the backward has freed its activations, then the weight sync to vLLM
    step = dict(resident)
    if not run.offload_optimizer:
        step["AdamW temps"] = _optimizer_temporaries(student, run.parallel, gpus, hw.device)
    if run.rollout == "vllm" and not run.sharded_load:
        # checkpoint_weights gathers whole float32 weights (FSDP2) or splits the grouped experts
        step["weights for vLLM"] = 4 * (student.total if run.parallel == "fsdp" and gpus > 1 else student.routed)
    memory["step"] = step
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
