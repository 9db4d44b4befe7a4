"""Seconds of each phase of a study: FLOPs at the MFU where compute bounds it, bytes over the memory
bandwidth, the interconnect or the GPU-to-CPU link where they do."""

from __future__ import annotations

import math

from padd.generation.rollout import GENERATE_BATCH
from padd.plan.memory import dtype_bytes, kv_values_per_token
from padd.plan.models import ModelShape
from padd.plan.settings import GIB, Hardware, Run

# per decode step and layer, the Python and kernel-launch time of transformers' generate (no CUDA graphs)
GENERATE_LAYER_OVERHEAD_S = 2e-4
OPTIMIZER_BYTES = 28  # AdamW per parameter: read weight, grad, two moments; write weight, two moments
ACCUMULATE_BYTES = 12  # an offloaded gradient accumulated on the CPU: read it and the new one, write the sum


def phase_seconds(teacher: ModelShape, student: ModelShape, run: Run, hw: Hardware) -> tuple[dict, dict, list]:
    """(wall seconds of each phase over the whole run, FLOPs of each Phase B phase per rollout batch
    over all trainers, notes on what bounds them)."""
    notes: list[str] = []
    compute = hw.tflops * 1e12 * hw.mfu if hw.tflops else None
    bandwidth = hw.bandwidth_tbs * 1e12 if hw.bandwidth_tbs else None

    def at_mfu(work: float) -> float:
        return work / compute if compute else math.nan

    seconds: dict[str, float] = {
        "stage1": at_mfu(_stage1_flops(teacher, student, run)),
        "warmup": _warmup_seconds(teacher, student, run, hw, at_mfu, bandwidth),
    }

    # Phase B, per rollout batch and trainer: the compute, unless what moves overlapped with it takes longer
    trainers = run.trainers(hw.gpus)
    step_flops = _step_flops(teacher, student, run, hw)
    per_step = {phase: at_mfu(step_flops[phase] / trainers) for phase in ("teacher", "student", "update")}
    gather, copy = _gather_and_copy_seconds(student, run, hw)
    for phase, transfer in _overlapped_transfers(teacher, student, run, hw, gather, copy).items():
        if transfer > per_step[phase]:
            notes.append(_transfer_bound_note(run, hw, phase, transfer, per_step[phase]))
            per_step[phase] = transfer

    # not overlapped: the optimizer step and the weights' sync to the rollout engine
    per_step["update"] = _with_optimizer_step(per_step["update"], student, run, hw, copy, bandwidth)
    sync = _sync_seconds(student, run, hw, gather, copy, bandwidth)
    per_step["update"] += sync
    if run.rollout == "vllm-server":
        notes.append(
            f"the weights' push to the vLLM server takes {sync:.1f} s per batch: the whole float32 student "
            f"({4 * student.total / GIB:.0f} GiB) gathered, written to a file and read by the server at "
            f"{hw.file_gbs:g} GB/s (--file-bandwidth)"
        )
    per_step["generation"] = _generation_seconds(student, run, hw, compute, bandwidth, gather + copy, notes)
    for phase in ("generation", "teacher", "student", "update"):
        seconds[phase] = per_step[phase] * run.steps
    return seconds, step_flops, notes


def _stage1_flops(teacher: ModelShape, student: ModelShape, run: Run) -> float:
    """FLOPs of Stage I on its one device: the teacher over the sampled tokens (padd seed: both
    models, before and after, and the CKA layer map), then a balanced K-Means per layer."""
    t_flops = teacher.flops_per_token(run.stage1_seq_len)
    s_flops = student.flops_per_token(run.stage1_seq_len)
    work = t_flops * (run.stage1_tokens + run.stage1_extra_tokens)
    if run.stage1 == "seed":
        work += s_flops * (run.stage1_tokens + 2 * run.stage1_extra_tokens)
    d_ff = teacher.config.intermediate_size
    kmeans = teacher.config.num_hidden_layers * run.kmeans_iters * 2 * 2 * d_ff * run.experts * (run.proj_dim or 1)
    return work + kmeans


def _step_flops(teacher: ModelShape, student: ModelShape, run: Run, hw: Hardware) -> dict[str, float]:
    """FLOPs of each Phase B phase (generation, teacher, student, update) per rollout batch, over all
    trainers."""
    trainers = run.trainers(hw.gpus)
    seqs = run.prompts_per_step * run.group_size / trainers
    length, completion = run.sequence, run.completion_tokens
    forwards = run.forwards(hw.gpus)
    s_fwd = student.flops_per_token(length) * seqs * length  # one forward over the trainer's sequences
    # π_old's and Γ's no-grad forwards and the training forward; the backward (twice a forward) and
    # under activation checkpointing the forward it recomputes
    student_passes = 1 + (forwards["old"] > 0) + (forwards["gamma"] > 0)
    update_passes = 2 + run.checkpointing
    sequences = run.prompts_per_step * run.group_size
    return {
        "generation": student.flops_per_token(run.prompt_tokens) * sequences * run.prompt_tokens
        + student.flops_per_token(run.prompt_tokens + completion // 2) * sequences * completion,
        "teacher": (teacher.flops_per_token(length) * seqs * length if run.kd else 0.0) * trainers,
        "student": s_fwd * student_passes * trainers,
        "update": s_fwd * update_passes * trainers,
    }


def _gather_and_copy_seconds(student: ModelShape, run: Run, hw: Hardware) -> tuple[float, float]:
    """(seconds of one FSDP2 gather of the whole student on a trainer, 0 unsharded; seconds of one
    copy of its --offload shards to the GPU, 0 without)."""
    trainers = run.trainers(hw.gpus)
    link, host_link = hw.link_gbs * 1e9, hw.host_link_gbs * 1e9
    sharded = run.parallel == "fsdp" and trainers > 1
    gather = 4 * student.total * (trainers - 1) / trainers / link if sharded else 0.0
    copy = 4 * student.total / trainers / host_link if run.offloaded(hw.gpus) else 0.0
    return gather, copy


def _overlapped_transfers(
    teacher: ModelShape, student: ModelShape, run: Run, hw: Hardware, gather: float, copy: float
) -> dict[str, float]:
    """Seconds per rollout batch of what moves on a trainer while the student, update and teacher
    phases compute, by phase: FSDP2's gathers of every layer for each forward and again for each
    backward, and the gradients' reduce-scatter (the teacher's weights gathered for its forwards);
    with --offload each rank's shards copied to the GPU for each forward and backward and its
    gradients back; DDP's all-reduce once per optimizer step."""
    trainers = run.trainers(hw.gpus)
    forwards = run.forwards(hw.gpus)
    link = hw.link_gbs * 1e9
    moved = {
        "student": (forwards["old"] + forwards["gamma"] + forwards["train"]) * (gather + copy),
        # each backward's gathers and reduce-scatter, its shards' copy in, the first micro-batch's
        # gradients' copy out (the others' are synchronous: _with_optimizer_step)
        "update": forwards["train"] * (2 * gather + copy) + run.updates_per_batch * copy,
        "teacher": 0.0,
    }
    if run.parallel == "fsdp" and trainers > 1 and run.kd:
        teacher_gather = dtype_bytes(run.precision) * teacher.total * (trainers - 1) / trainers / link
        moved["teacher"] = forwards["teacher"] * teacher_gather
    if run.parallel == "ddp" and trainers > 1:
        moved["update"] += run.updates_per_batch * 2 * 4 * student.total * (trainers - 1) / trainers / link
    return moved


def _transfer_bound_note(run: Run, hw: Hardware, phase: str, transfer: float, compute: float) -> str:
    """The note that a Phase B phase's transfers (`transfer` seconds per batch) outlast its compute."""
    what = "FSDP2's gathers" if run.parallel == "fsdp" and run.trainers(hw.gpus) > 1 else "DDP's all-reduce"
    what += " and --offload's copies" if run.offloaded(hw.gpus) else ""
    return f"{what} ({transfer:.1f} s per batch) outlast the {phase} phase's compute ({compute:.1f} s): transfer-bound"


def _with_optimizer_step(update: float, student: ModelShape, run: Run, hw: Hardware, copy: float, bandwidth) -> float:
    """The update phase's seconds per rollout batch, `update`, with the AdamW steps added: on the CPU
    when offloaded, where FSDP2 also adds each later micro-batch's gradients to the earlier ones',
    after a copy out it waits for; else at the memory bandwidth."""
    shards = run.trainers(hw.gpus) if run.parallel == "fsdp" else 1
    if run.offloaded(hw.gpus):
        host = hw.host_gbs * 1e9
        accumulated = run.forwards(hw.gpus)["train"] - run.updates_per_batch  # micro-batches adding to others'
        update += run.updates_per_batch * OPTIMIZER_BYTES * student.total / shards / host
        update += accumulated * (copy + ACCUMULATE_BYTES * student.total / shards / host)
    elif bandwidth:
        update += run.updates_per_batch * OPTIMIZER_BYTES * student.total / shards / bandwidth
    return update


def _warmup_seconds(teacher: ModelShape, student: ModelShape, run: Run, hw: Hardware, at_mfu, bandwidth) -> float:
    """The warm-up on all GPUs: per micro-batch, the teacher's forward and the student's forward and
    backward (and the recomputed forward under checkpointing), or under FSDP2 its gathers (and with
    --offload the shards' copies), whichever is longer; an AdamW step on the experts per batch of
    windows, on the CPU when offloaded."""
    gpus, length = hw.gpus, run.warmup_seq_len
    tokens = run.warmup_tokens * run.warmup_epochs / gpus  # each rank's
    windows = run.warmup_micro_batch or run.warmup_batch_size
    micro_batches = tokens / (windows * length)
    optimizer_steps = tokens / (run.warmup_batch_size * length)  # each rank steps on its own batch_size windows
    passes = 3 + run.warmup_checkpointing
    per_micro = at_mfu((teacher.flops_per_token(length) + passes * student.flops_per_token(length)) * windows * length)
    sharded = run.warmup_parallel == "fsdp" and gpus > 1
    offloaded = run.offloaded(gpus, warmup=True)
    link, host_link = hw.link_gbs * 1e9, hw.host_link_gbs * 1e9
    # every weight gathered for the forward and the backward, the experts' gradients reduce-scattered;
    # offloaded, the shards copied in for both and the gradients out
    moved = 2 * 4 * student.total + 4 * student.experts
    transfer = moved * (gpus - 1) / gpus / link if sharded else 0.0
    transfer += moved / gpus / host_link if offloaded else 0.0
    seconds = micro_batches * max(per_micro, transfer)
    if run.warmup_parallel == "ddp" and gpus > 1:
        seconds += optimizer_steps * 2 * 4 * student.experts * (gpus - 1) / gpus / link
    shards = gpus if run.warmup_parallel == "fsdp" else 1
    if offloaded:
        host = hw.host_gbs * 1e9
        seconds += optimizer_steps * OPTIMIZER_BYTES * student.experts / shards / host
        accumulated = micro_batches - optimizer_steps  # each waits for its gradients' copy out, then adds them
        seconds += accumulated * (
            4 * student.experts / shards / host_link + ACCUMULATE_BYTES * student.experts / shards / host
        )
    elif bandwidth:
        seconds += optimizer_steps * OPTIMIZER_BYTES * student.experts / shards / bandwidth
    return seconds + warmup_end_seconds(student, run, hw, at_mfu)


def warmup_end_seconds(student: ModelShape, run: Run, hw: Hardware, at_mfu) -> float:
    """The warm-up's router start: its forwards over `router_tokens` tokens (one for the fit report of
    a kept or uniform start; a fitted start's layer-by-layer ones, about half a forward per layer,
    first), on the device at the MFU, or after an FSDP2 warm-up on rank 0's CPU at the host's rate,
    once the whole float32 student is gathered there (every tensor over the interconnect, then over
    rank 0's GPU-to-CPU link; with --offload each shard copied in first). The save is not counted."""
    length = run.warmup_seq_len
    tokens = max(1, run.router_tokens // length) * length
    layers = student.config.num_hidden_layers
    forwards = 1 + ((layers + 1) / 2 if run.warmup_router_init in ("centroid", "distill") else 0)
    work = forwards * student.flops_per_token(length) * tokens
    if not (run.warmup_parallel == "fsdp" and hw.gpus > 1):
        return at_mfu(work)
    whole = 4 * student.total
    gather = whole * (hw.gpus - 1) / hw.gpus / (hw.link_gbs * 1e9) + whole / (hw.host_link_gbs * 1e9)
    if run.offloaded(hw.gpus, warmup=True):
        gather += whole / hw.gpus / (hw.host_link_gbs * 1e9)
    return gather + work / (hw.host_tflops * 1e12)


def _sync_seconds(student: ModelShape, run: Run, hw: Hardware, gather: float, copy: float, bandwidth) -> float:
    """The weights' sync to the rollout engine once per rollout batch: under FSDP2 one whole gather
    (and with --offload one copy of the shards) on every trainer, then into a colocated engine at the
    memory bandwidth, or to a vLLM server through a file (padd's safetensors transfer backend): the
    float32 weights copied to rank 0's CPU memory (under FSDP2 each tensor as it is gathered), written,
    and read by the server."""
    if run.rollout == "transformers":
        return 0.0  # generate samples from the trained model itself
    if run.rollout == "vllm":
        engine = dtype_bytes(run.precision) * student.total
        return gather + copy + (engine / bandwidth if bandwidth else 0.0)
    weights = 4 * student.total
    return gather + copy + weights / (hw.host_link_gbs * 1e9) + 2 * weights / (hw.file_gbs * 1e9)


def _generation_seconds(
    student: ModelShape, run: Run, hw: Hardware, compute, bandwidth, gather: float, notes: list
) -> float:
    """Prefill at the MFU, then one decode step per completion token, each bounded by the bytes it reads
    (the weights the batch's tokens route to, and the KV cache) or its FLOPs, whichever is longer.
    transformers' generate decodes each trainer's sequences in chunks of GENERATE_BATCH, one after
    the other, FSDP2's shards gathered (`gather` seconds) at every token; a colocated vLLM engine
    decodes its GPU's sequences all at once; a vLLM server the whole batch, its weights, KV cache,
    FLOP/s and bandwidth split over its GPUs (tensor parallel); vLLM in waves where its KV cache holds
    fewer tokens."""
    if not compute:
        return math.nan
    sequences = run.prompts_per_step * run.group_size
    engine_gpus = 1
    if run.rollout == "vllm-server":
        seqs, engine_gpus = float(sequences), run.server_gpus
    elif run.rollout == "vllm":
        seqs = sequences / hw.gpus
    else:
        seqs = sequences / run.trainers(hw.gpus)
    vllm = run.rollout.startswith("vllm")
    waves = 1
    if vllm and hw.device == "cuda":
        capacity = vllm_kv_tokens(student, run, hw)
        needed = seqs * run.sequence  # the rollout batch's own lengths, not the engine's longest
        if 0 < capacity < needed:
            waves = math.ceil(needed / capacity)
            notes.append(f"vLLM's KV cache holds {capacity:,.0f} tokens of {needed:,.0f}: it decodes in {waves} waves")
    # generate's chunks and vLLM's waves run one after the other, each over its share of the sequences
    parts = math.ceil(seqs / GENERATE_BATCH) if run.rollout == "transformers" else waves
    seqs = seqs / parts
    cfg = student.config
    rate = compute * engine_gpus
    context = run.prompt_tokens + run.completion_tokens // 2
    prefill = student.flops_per_token(run.prompt_tokens) * seqs * run.prompt_tokens
    decode_flops = student.flops_per_token(context) * seqs
    # each token picks K of E experts: the share of routed weights a decode step of `seqs` tokens reads
    touched = 1.0
    if student.moe:
        from padd.router_adapter import num_experts, top_k

        touched = 1 - (1 - top_k(cfg) / num_experts(cfg)) ** seqs
    weight_bytes = (student.total - student.routed + student.routed * touched) * (
        dtype_bytes(run.precision) if vllm else 4
    )
    kv = seqs * (run.prompt_tokens + run.completion_tokens / 2) * kv_values_per_token(cfg, "vllm" if vllm else "")
    kv_bytes = kv * dtype_bytes(run.precision)
    read = (weight_bytes + kv_bytes) / (bandwidth * engine_gpus) if bandwidth else 0.0
    per_token = max(decode_flops / rate, read)
    if run.rollout == "transformers":
        per_token += GENERATE_LAYER_OVERHEAD_S * cfg.num_hidden_layers
        if gather > per_token:
            engine = dtype_bytes("bf16") * student.total / GIB
            alternative = (
                f"--rollout vllm would decode from an unsharded copy, if its share holds the student's "
                f"{engine:.0f} GiB of bf16 weights (plan it with --rollout vllm --vllm-gpu-memory SHARE)"
                if engine < 0.5 * hw.memory_gib
                else f"a vLLM server on GPUs of its own would hold the student's {engine:.0f} GiB of bf16 weights "
                "(plan it with --rollout vllm-server --server-gpus N)"
            )
            notes.append(
                f"generate on the FSDP2-sharded student gathers every layer at every token ({gather:.2f} s per "
                f"token); {alternative}"
            )
            per_token = max(per_token, gather)
    return parts * (prefill / rate + run.completion_tokens * per_token)


def vllm_kv_tokens(student: ModelShape, run: Run, hw: Hardware) -> float:
    """Tokens the engine's KV cache holds: its share (of each of a server's GPUs) less the weights and
    about 1 GiB of activations per GPU."""
    gpus = run.server_gpus if run.rollout == "vllm-server" else 1
    free = gpus * (run.vllm_share * hw.memory_gib - 1) * GIB - dtype_bytes(run.precision) * student.total
    return free / (kv_values_per_token(student.config, "vllm") * dtype_bytes(run.precision))
