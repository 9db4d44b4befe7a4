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
    """(the whole model, its largest layer) bytes a training forward keeps for the backward, per token.

    Per layer: both RMSNorms' input and output in float32; the attention's q, k, v, rotated q and k,
    the keys and values repeated to every head (GQA under SDPA with a padding mask), its output and
    that output reshaped; the MLP's gate, up, activation and product. Under bf16 autocast a matmul
    input is also kept as a bfloat16 copy, and q and k norms keep their input upcast to float32. An
    MoE layer keeps the router's float32 logits and probabilities and, for each of the token's K
    experts, its input, output and four intermediates in the autocast dtype (transformers' grouped
    expert matmuls compute in bfloat16 under bf16: padd.precision.experts_in_autocast_dtype). Then
    the final norm's input and output. Attention scores are not kept (SDPA and flash attention
    recompute them). Checked against the tensors autograd saves on Glm4Moe and Qwen3-MoE, fp32 and
    bf16, within 10% (tests/test_plan.py); latent attention's terms are from its shapes alone."""
    b = dtype_bytes(precision)
    cast = b if precision == "bf16" else 0  # autocast's bfloat16 copy of a float32 matmul input
    h, n_heads, n_kv, hd = flops._attn_dims(cfg)
    if getattr(cfg, "kv_lora_rank", None):
        qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        attention = (n_heads * qk * 3 + n_heads * cfg.v_head_dim * 3 + cfg.kv_lora_rank * 2) * b + h * cast
    else:
        repeated = 2 * n_heads * hd if n_kv < n_heads else 0
        attention = (n_heads * hd * 4 + n_kv * hd * 4 + repeated) * b + (h + n_heads * hd) * cast
        if cast and _has_qk_norms(cfg):  # q and k norms upcast their bfloat16 input to float32
            attention += (n_heads + n_kv) * hd * 4
    norms = 2 * 2 * h * 4
    moe_layers = flops._moe_layers(cfg)
    per_layer = []
    for i in range(cfg.num_hidden_layers):
        if i in moe_layers:
            from padd.router_adapter import num_experts, top_k

            width = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
            shared = (getattr(cfg, "n_shared_experts", 0) or 0) * width
            shared = getattr(cfg, "shared_expert_intermediate_size", None) or shared
            routed = top_k(cfg) * (2 * h + 4 * width) * b
            mlp = 2 * num_experts(cfg) * 4 + routed + ((h + 4 * shared) * b + h * cast if shared else 0)
        else:
            mlp = 4 * cfg.intermediate_size * b + h * cast
        per_layer.append(norms + attention + mlp)
    final_norm = 2 * h * 4  # its float32 input and output, outside the layers
    return float(sum(per_layer) + final_norm), float(max(per_layer))


def _has_qk_norms(cfg) -> bool:
    """Whether the attention normalises q and k (Qwen3, Qwen3-MoE, OLMoE), as padd.flops counts them."""
    return bool(getattr(cfg, "use_qk_norm", False)) or getattr(cfg, "model_type", "") in ("qwen3", "qwen3_moe", "olmoe")


def weight_copies(model: ModelShape, precision: str, checkpointing: bool) -> float:
    """Bytes of the bfloat16 weight copies a bf16 training forward keeps for its backward: autocast
    casts each float32 weight it multiplies by (and padd the experts'), and the backward needs the
    copy, so every matmul weight's is kept (measured: exactly 2 B per such weight), on every GPU
    whatever the sharding; under activation checkpointing only the recomputed layer's and the output
    head's. None under fp32."""
    if precision != "bf16":
        return 0.0
    if checkpointing:
        return 2.0 * (model.largest_layer_matmul + model.head)
    return 2.0 * model.matmul


def training_state(
    model: ModelShape, trained: int, parallel: str, gpus: int, offloaded: bool = False, device: str = "cuda"
) -> dict[str, float]:
    """Bytes per device of a float32 student's weights, gradients and AdamW state (`trained`
    parameters), each divided over the GPUs under FSDP2; `offloaded` (FSDP2's CPU offload): all three
    in CPU memory, which on a CPU device is the same memory."""
    shards = gpus if parallel == "fsdp" else 1
    state = {
        "student weights": 4 * model.total / shards,
        "gradients": 4 * trained / shards,
        "AdamW state": 8 * trained / shards,
    }
    if offloaded and device == "cuda":
        state = dict.fromkeys(state, 0.0)
    if gpus > 1 and parallel == "ddp":
        state["DDP buckets"] = 4 * trained
    if gpus > 1 and parallel == "fsdp":
        state["FSDP2 gathers"] = 3 * 4 * model.largest_unit  # this, the prefetched one, its gradient
    return state


def offloaded_bytes(model: ModelShape, trained: int, gpus: int) -> float:
    """CPU memory of one process's offloaded shards: float32 weights, gradients and AdamW state."""
    return (4 * model.total + 12 * trained) / gpus


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


# the phases of the memory table: loading the models, Stage I, the warm-up and its end, and Phase B's
# rollout batch (generate, the teacher's forward, the student's forwards, the backward, the optimizer
# step and the weights' sync to the rollout engine)
MEMORY_PHASES = ("load", "stage1", "warmup", "warmup_end", "generation", "teacher", "student", "backward", "step")


def phase_memory(teacher: ModelShape, student: ModelShape, run: Run, hw: Hardware) -> dict[str, dict[str, float]]:
    """Bytes per device of each phase (MEMORY_PHASES) at its peak, by component; Phase B's on a
    trainer (a vLLM server's GPUs hold the server alone)."""
    resident = _resident_memory(teacher, student, run, hw)
    memory: dict[str, dict[str, float]] = {
        "load": _load_memory(teacher, student, run, hw.gpus),
        "stage1": _stage1_memory(teacher, student, run),
        "warmup": _warmup_memory(teacher, student, run, hw),
        "warmup_end": _warmup_end_memory(student, run, hw),
        "generation": _generation_memory(student, run, hw, resident),
    }
    memory |= _forward_backward_memory(teacher, student, run, hw, resident)
    memory["step"] = _step_memory(student, run, hw, resident)
    return memory


def _load_memory(teacher: ModelShape, student: ModelShape, run: Run, gpus: int) -> dict[str, float]:
    """Bytes per device while the models load, by component: padd warmup's or padd train's, whichever
    is larger."""
    # padd warmup and padd train load the student in float32 and the teacher in the run's precision:
    # whole on every device, or under FSDP2 on 2+ processes each rank's shard of both (padd.models)
    return max(
        (
            _load(teacher, student, run.warmup_parallel, run.warmup_precision, gpus, run.offloaded(gpus, True)),
            _load(teacher, student, run.parallel, run.precision, run.trainers(gpus), run.offloaded(gpus)),
        ),
        key=lambda parts: sum(parts.values()),
    )


def _stage1_memory(teacher: ModelShape, student: ModelShape, run: Run) -> dict[str, float]:
    """Bytes of Stage I's one device at its peak, by component: padd seed holds both models while it
    measures; padd decompose frees its statistics before it builds the student."""
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
    return stage1


def _warmup_memory(teacher: ModelShape, student: ModelShape, run: Run, hw: Hardware) -> dict[str, float]:
    """Bytes per device of a warm-up step, by component: every rank trains its batch_size windows per
    step (the experts, behind a frozen router), micro-batch by micro-batch, on KL(teacher || student)
    over whole windows."""
    gpus, vocab = hw.gpus, student.config.vocab_size
    wb = dtype_bytes(run.warmup_precision)
    tokens = (run.warmup_micro_batch or run.warmup_batch_size) * run.warmup_seq_len
    saved, largest = saved_bytes_per_token(student.config, run.warmup_precision)
    offloaded = run.offloaded(gpus, warmup=True)
    warm = training_state(student, student.experts, run.warmup_parallel, gpus, offloaded, hw.device)
    warm["teacher"] = _teacher_bytes(teacher, run.warmup_precision, run.warmup_parallel, gpus)
    warm["activations"] = tokens * _activations(saved, largest, student.config, run.warmup_checkpointing)
    warm["weight copies"] = weight_copies(student, run.warmup_precision, run.warmup_checkpointing)
    # both models' logits, the loss's masked copies of them, a float32 gradient, a chunk of the loss
    warm["logits"] = tokens * vocab * (4 * wb + 4) + 6 * KD_CHUNK_TOKENS * vocab * 4
    return warm


def _warmup_end_memory(student: ModelShape, run: Run, hw: Hardware) -> dict[str, float]:
    """Bytes per device at the warm-up's end, by component (none unless the warm-up ran under FSDP2
    on 2+ processes)."""
    # at its end an FSDP2 warm-up frees the teacher and the optimizer and gathers the whole float32
    # student, tensor by tensor, into rank 0's CPU memory, where rank 0 runs the router start and the
    # save (padd.distributed.unsharded_copy): a GPU holds its shards and the tensor being gathered
    # (host_memory counts the copy); on a CPU device that memory is the process's own
    end = {}
    if run.warmup_parallel == "fsdp" and hw.gpus > 1:
        if not (run.offloaded(hw.gpus, warmup=True) and hw.device == "cuda"):
            end["student weights"] = 4 * student.total / hw.gpus
        end["tensor gathered"] = 4 * student.largest_tensor
        if hw.device != "cuda":
            end["whole student"] = 4 * student.total
    return end


def _resident_memory(teacher: ModelShape, student: ModelShape, run: Run, hw: Hardware) -> dict[str, float]:
    """Bytes per trainer that stay resident through Phase B's rollout batch, by component (the
    gradients live until the next backward)."""
    trainers = run.trainers(hw.gpus)
    resident = training_state(student, student.total, run.parallel, trainers, run.offloaded(hw.gpus), hw.device)
    resident["teacher"] = _teacher_bytes(teacher, run.precision, run.parallel, trainers)
    if run.rollout == "vllm" and not run.vllm_sleep:
        resident |= vllm_memory(student, run, hw)
    return resident


def _generation_memory(student: ModelShape, run: Run, hw: Hardware, resident: dict[str, float]) -> dict[str, float]:
    """Bytes per trainer while the rollout batch is generated, by component: `resident`, and under
    transformers' generate its KV cache, activations and logits."""
    generation = dict(resident)
    if run.vllm_sleep:  # the engine wakes whole (weights and KV cache) to sample, and sleeps after
        generation |= vllm_memory(student, run, hw)
    if run.rollout == "transformers":
        b, vocab = dtype_bytes(run.precision), student.config.vocab_size
        seqs, _ = run.sequences_per_forward(hw.gpus)
        chunk = min(seqs, GENERATE_BATCH)  # generate runs the batch in chunks of this many sequences
        generation["KV cache"] = chunk * run.sequence * kv_values_per_token(student.config, "transformers") * b
        generation["activations"] = chunk * run.prompt_tokens * _layer_working_bytes(student.config, b)
        generation["logits"] = 3 * chunk * vocab * 4
    return generation


def _forward_backward_memory(
    teacher: ModelShape, student: ModelShape, run: Run, hw: Hardware, resident: dict[str, float]
) -> dict[str, dict[str, float]]:
    """Bytes per trainer of Phase B's student forwards (π_old, Γ and the update's), the teacher's
    forward and the backward, by phase ("student", "teacher", "backward": the plan JSON's order) and
    component, each on top of `resident`."""
    b, vocab = dtype_bytes(run.precision), student.config.vocab_size
    seqs, micro = run.sequences_per_forward(hw.gpus)  # per trainer: a rollout batch, one training forward
    completion, length = run.completion_tokens + 1, run.sequence
    saved, largest = saved_bytes_per_token(student.config, run.precision)
    activations = micro * length * _activations(saved, largest, student.config, run.checkpointing)
    copies = weight_copies(student, run.precision, run.checkpointing)
    # the update's logits [n, C + 1, V] and their float32 log-softmax (kept for the backward), with the
    # float32 copy of the logits that feeds it while it runs
    cells = micro * completion * vocab  # entries of one forward's logits
    logits = cells * (b + 4)
    copy = cells * 4 * (2 if run.temperature not in (0, 1) else 1)
    graph = {"activations": activations, "weight copies": copies}  # the training forward's, to its backward
    student_phase = dict(resident) | graph | {"logits": logits + copy}
    if run.old_policy_forward:  # π_old: no-grad forwards of the rollout batch, micro-batch by micro-batch
        old_seqs = min(seqs, run.micro_batch) if run.micro_batch else seqs
        old = old_seqs * completion * vocab * (b + 4 + 4) + old_seqs * length * _layer_working_bytes(student.config, b)
        if old > activations + copies + logits + copy:
            student_phase = dict(resident) | {"logits": old}

    teacher_phase = dict(resident) | graph | {"logits": logits}
    if run.kd:
        teacher_phase["teacher logits"] = cells * b
        teacher_phase["teacher acts"] = micro * length * _layer_working_bytes(teacher.config, b)

    backward = dict(resident) | graph
    # the logits and their log-softmax, its two float32 gradients and the logits' gradient, and with KD
    # the teacher's logits and a chunk of the loss recomputed. The KD loss's masked copies of both
    # logits and its own gradient buffers are not all alive at once: counting them adds 30% to the
    # measured backward of the mini shape with a 16k vocabulary (benchmarks/bench_plan.py), this 5%.
    backward["logits"] = logits + cells * (8 + b)
    if run.kd:
        backward["teacher logits"] = cells * b
        backward["logits"] += 6 * min(KD_CHUNK_TOKENS, cells / vocab) * vocab * 4
    return {"student": student_phase, "teacher": teacher_phase, "backward": backward}


def _step_memory(student: ModelShape, run: Run, hw: Hardware, resident: dict[str, float]) -> dict[str, float]:
    """Bytes per trainer of the optimizer step (on the CPU when offloaded), once the backward has
    freed its activations, then of the weights' sync to the rollout engine, by component."""
    trainers = run.trainers(hw.gpus)
    step = dict(resident)
    if not (run.offloaded(hw.gpus) and hw.device == "cuda"):
        step["AdamW temps"] = _optimizer_temporaries(student, run.parallel, trainers, hw.device)
    sharded = run.parallel == "fsdp" and trainers > 1
    if run.rollout == "vllm-server" and sharded:
        # the push to a server gathers each tensor into rank 0's CPU memory in turn
        # (checkpoint_weights(rank0_cpu=True)): a GPU holds its shards and one whole tensor; rank 0's
        # host the whole float32 student while it writes the file (host_memory)
        step["tensor gathered"] = 4 * student.largest_tensor
        if hw.device != "cuda":
            step["weights for vLLM"] = 4 * student.total
    elif run.rollout.startswith("vllm"):
        # the sync to a colocated engine takes checkpoint_weights gathered whole on every rank's device
        # (FSDP2); unsharded, the grouped experts split (a server's push copies them to rank 0's host)
        step["weights for vLLM"] = 4 * (student.total if sharded else student.routed)
        if run.vllm_sleep:  # the sync wakes the engine's weights (level 2 kept none) to load the trainer's
            step["vLLM weights (awake)"] = dtype_bytes(run.precision) * student.total
    return step


def host_memory(student: ModelShape, run: Run, hw: Hardware) -> dict[str, dict[str, float]]:
    """Bytes of CPU memory on the machine (every process's) where padd keeps the most there, by
    component: the warm-up, its end and Phase B's update hold FSDP2's --offload shards (weights,
    gradients and AdamW state; at the warm-up's end only the weights, the optimizer freed); the
    warm-up's end and a push to a vLLM server also rank 0's whole float32 student (the router start
    and the save; the safetensors file it writes). GPU runs only (on a CPU device the phases' memory
    is this memory)."""
    if hw.device != "cuda":
        return {}
    gpus, trainers = hw.gpus, run.trainers(hw.gpus)
    whole = 4 * student.total
    warm_off = run.offloaded(gpus, warmup=True)
    train_off = run.offloaded(gpus)
    host: dict[str, dict[str, float]] = {
        "warmup": {"offloaded shards": offloaded_bytes(student, student.experts, gpus) * gpus if warm_off else 0.0},
        "warmup_end": {},
        "update": {
            "offloaded shards": offloaded_bytes(student, student.total, trainers) * trainers if train_off else 0.0
        },
        "push": {},
    }
    if run.warmup_parallel == "fsdp" and gpus > 1:
        host["warmup_end"] = {"offloaded shards": whole if warm_off else 0.0, "whole student (rank 0)": whole}
    if run.rollout == "vllm-server":
        host["push"] = dict(host["update"]) | {"whole student (rank 0)": whole}
    return host


def _load(teacher: ModelShape, student: ModelShape, parallel: str, precision: str, gpus: int, offloaded: bool):
    """Bytes per device while padd warmup or padd train loads its models: whole on every device, or
    under FSDP2 on 2+ processes built sharded on the meta device, each rank reading its shards from
    the safetensors files (the student's into CPU memory when `offloaded`) beside the tensor being
    read (counted whole, in float32)."""
    b = dtype_bytes(precision)
    if parallel != "fsdp" or gpus < 2:
        return {"student weights": 4 * student.total, "teacher": b * teacher.total}
    return {
        "student weights": 0.0 if offloaded else 4 * student.total / gpus,
        "teacher": b * teacher.total / gpus,
        "tensor read": 4 * max(student.largest_tensor, teacher.largest_tensor),
    }


def server_memory(student: ModelShape, run: Run, hw: Hardware) -> dict[str, float]:
    """Bytes per GPU of a vLLM server (--rollout vllm-server): its share of each of its GPUs, the
    student's weights split over them (tensor parallel) and the KV cache in the rest."""
    weights = dtype_bytes(run.precision) * student.total / run.server_gpus
    share = run.vllm_share * hw.memory_gib * GIB
    return {"weights": weights, "KV cache and activations": max(share - weights, 0.0)}


def _teacher_bytes(teacher: ModelShape, precision: str, parallel: str, gpus: int) -> float:
    if parallel == "fsdp" and gpus > 1:
        return dtype_bytes(precision) * (teacher.total / gpus + 2 * teacher.largest_unit)
    return dtype_bytes(precision) * teacher.total


def _activations(saved: float, largest: float, cfg, checkpointing: bool) -> float:
    """Bytes per token kept for the backward: every layer's, or under activation checkpointing each
    layer's float32 input, the final norm's, and one layer recomputed."""
    if not checkpointing:
        return saved
    return 4 * cfg.hidden_size * cfg.num_hidden_layers + 2 * cfg.hidden_size * 4 + largest


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
