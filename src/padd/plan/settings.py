"""What a plan is of: the run's settings (`Run`, resolved from the flags, a study file and padd's
defaults) and the hardware (`Hardware`)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from padd.config import CKA_TOKENS, DecomposeConfig, PlanConfig, SeedConfig, TrainConfig, WarmupConfig
from padd.plan.models import ModelShape, PlanError, decomposed_student, is_moe, load_model_config, measure_model

GIB = 2**30
# H100 SXM (dense, without sparsity): bf16 and plain float32 (padd's fp32 runs do not use TF32)
H100 = {"memory_gib": 80.0, "tflops": {"bf16": 989.0, "fp32": 67.0}, "bandwidth_tbs": 3.35, "link_gbs": 450.0}
GPU_RESERVE_GIB = 3.0  # CUDA context, NCCL buffers, allocator fragmentation


@dataclass(frozen=True)
class Hardware:
    device: str  # cuda or cpu
    gpus: int
    memory_gib: float  # per device
    tflops: float | None  # peak dense TFLOP/s at the run's precision
    tflops_fp32: float | None  # peak float32 TFLOP/s: the student's experts under bf16 (padd.plan.timing)
    bandwidth_tbs: float | None  # memory bandwidth per device
    link_gbs: float  # interconnect per GPU (FSDP2 gathers)
    mfu: float
    reserve_gib: float

    @property
    def usable_gib(self) -> float:
        return self.memory_gib - self.reserve_gib


@dataclass(frozen=True)
class Run:
    """Every setting the plan reads, resolved from the flags, the study file and padd's defaults."""

    stage1: str  # decompose or seed
    stage1_tokens: int
    stage1_seq_len: int
    stage1_batch_size: int
    stage1_extra_tokens: int  # padd seed's held-out and CKA tokens
    kmeans_iters: int
    proj_dim: int
    experts: int  # routed experts per MoE layer of the student
    warmup_tokens: int
    warmup_seq_len: int
    warmup_batch_size: int
    warmup_epochs: int
    warmup_precision: str
    warmup_parallel: str
    steps: int
    prompts_per_step: int
    group_size: int
    updates_per_batch: int
    prompt_tokens: int
    completion_tokens: int
    method: str
    kd: bool
    temperature: float
    precision: str
    parallel: str
    rollout: str
    vllm_share: float | None
    vllm_length: int | None  # the engine's longest sequence (padd.generation.vllm.engine_length)
    old_policy_forward: bool  # a π_old forward before the updates (M > 1, or a noisy training forward)
    stage1_bytes: tuple[int, int] = (4, 4)  # bytes per weight of Stage I's teacher and student
    # what-ifs padd train does not offer yet, for `report.changes`: activation checkpointing, and
    # gradient accumulation over micro-batches of this many sequences (None: the whole mini-batch)
    checkpointing: bool = False
    micro_batch: int | None = None
    offload_optimizer: bool = False  # AdamW's moments and step in CPU memory (FSDP2's CPUOffloadPolicy)
    sharded_load: bool = False  # each rank loads and gathers its shard only, whole weights via CPU memory

    @property
    def sequence(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def sequences_per_forward(self, gpus: int) -> tuple[float, int]:
        """(sequences of a rollout batch per device, sequences of one training forward): the mini-batch,
        or the what-if micro-batch."""
        seqs = self.prompts_per_step * self.group_size / gpus
        mini = math.ceil(seqs / self.updates_per_batch)
        return seqs, min(mini, self.micro_batch or mini)

    def splits_over(self, gpus: int) -> bool:
        """Whether padd train runs on `gpus` processes: every rank holds whole groups."""
        return self.prompts_per_step % gpus == 0


def runtime_footprint_gib(*configs) -> float:
    """Resident memory of a fresh Python process that has imported padd's training loop, graded an
    answer and built `configs`' model classes on the meta device: what a CPU run holds before its
    models' weights (measured, in GiB; 0 where it cannot be measured)."""
    code = (
        "import os, sys, json\n"
        "import padd.phase_b.loop\n"
        "from padd.grading import grade\n"
        "from accelerate import init_empty_weights\n"
        "from transformers import AutoConfig, AutoModelForCausalLM\n"
        "grade('\\\\boxed{1}', '1')\n"
        "for raw in json.loads(sys.stdin.read()):\n"
        "    with init_empty_weights():\n"
        "        AutoModelForCausalLM.from_config(AutoConfig.for_model(**raw))\n"
        "print(int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE'))"
    )
    payload = json.dumps([c.to_dict() for c in configs])
    try:
        out = subprocess.run(
            [sys.executable, "-c", code], input=payload, capture_output=True, text=True, check=True, timeout=600
        )
        return int(out.stdout.split()[-1]) / GIB
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return 0.0


def machine_memory_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    except (ValueError, OSError):
        return 0.0


def parse_gib(text: str | float) -> float:
    """'80', '80GB', '80GiB' or '80G' -> 80.0 (GiB: a GPU sold as 80 GB holds about 80 GiB)."""
    value = str(text).strip().lower()
    for unit in ("gib", "gb", "g"):
        value = value.removesuffix(unit)
    try:
        return float(value)
    except ValueError:
        raise PlanError(f"--gpu-memory {text!r}: give GiB per GPU, e.g. 80 or 80GB") from None


def hardware_of(cfg: PlanConfig, precision: str, *configs) -> Hardware:
    gpu = cfg.device == "cuda"
    memory = parse_gib(cfg.gpu_memory) if cfg.gpu_memory is not None else (H100["memory_gib"] if gpu else None)
    if memory is None:  # the machine's memory, shared by its processes
        memory = machine_memory_gib() / cfg.gpus
    tflops = cfg.gpu_tflops if cfg.gpu_tflops is not None else (H100["tflops"][precision] if gpu else None)
    bandwidth = cfg.bandwidth if cfg.bandwidth is not None else (H100["bandwidth_tbs"] if gpu else None)
    reserve = cfg.reserve if cfg.reserve is not None else (GPU_RESERVE_GIB if gpu else runtime_footprint_gib(*configs))
    fp32 = cfg.gpu_tflops_fp32 if cfg.gpu_tflops_fp32 is not None else (H100["tflops"]["fp32"] if gpu else None)
    if precision == "fp32" and cfg.gpu_tflops is not None:
        fp32 = cfg.gpu_tflops
    link = cfg.link_bandwidth if cfg.link_bandwidth is not None else H100["link_gbs"]
    return Hardware(cfg.device, cfg.gpus, memory, tflops, fp32, bandwidth, link, cfg.mfu, reserve)


def _pick(flag, section: dict, key: str, default):
    """A setting: the flag when given, else the study section's, else padd's default."""
    if flag is not None:
        return flag
    return section.get(key, default)


def _default(cls, name: str):
    return {f.name: f.default for f in cls.__dataclass_fields__.values()}[name]


def resolve_plan(cfg: PlanConfig) -> tuple[ModelShape, ModelShape, Run, Hardware]:
    """The models, settings and hardware a PlanConfig describes (its study, then its flags)."""
    from padd.methods import METHODS
    from padd.phase_b.loop import noisy_in_training

    # the hardware's own numbers first: nothing is built or measured for a plan that cannot be made
    if cfg.gpus < 1:
        raise PlanError(f"--gpus {cfg.gpus}: give at least 1")
    if not 0 < cfg.mfu <= 1:
        raise PlanError(f"--mfu {cfg.mfu}: give a share of the peak in (0, 1]")

    study = None
    if cfg.study is not None:
        from padd.study import load_study

        study = load_study(cfg.study)
    teacher_spec = cfg.teacher or (study.teacher if study else None)
    if teacher_spec is None:
        raise PlanError("give --teacher (a checkpoint folder, a config JSON or a preset) or --config STUDY")
    student_spec = cfg.student or (study.student if study else None)
    decompose = study.decompose if study else {}
    seed = study.seed if study else {}
    warm = study.warmup if study else {}
    train = study.train if study else {}

    teacher_config, teacher_source = load_model_config(teacher_spec)
    teacher = measure_model(teacher_config, Path(teacher_spec).name, teacher_source)
    given_shape = {k: getattr(cfg, k) for k in ("experts", "top_k", "shared_neurons", "expert_size", "dense_layers")}
    if student_spec is not None:
        if any(v is not None for v in given_shape.values()):
            raise PlanError("--experts/--top-k/... shape a decomposed student; a pretrained --student has its own")
        student_config, student_source = load_model_config(student_spec)
        if not is_moe(student_config):
            raise PlanError(f"{student_spec}: model_type {student_config.model_type!r} is not an MoE student")
        student = measure_model(student_config, Path(student_spec).name, student_source)
        stage1, section, stage_cls = "seed", seed, SeedConfig
    else:
        experts, top_k = _pick(cfg.experts, decompose, "experts", None), _pick(cfg.top_k, decompose, "top_k", None)
        if experts is None or top_k is None:
            raise PlanError("a decomposed student needs --experts and --top-k (or a study's decompose: section)")
        student_config = decomposed_student(
            teacher_config,
            experts=experts,
            top_k=top_k,
            shared=_pick(cfg.shared_neurons, decompose, "shared_neurons", 0),
            expert_size=_pick(cfg.expert_size, decompose, "expert_size", None),
            dense=_pick(cfg.dense_layers, decompose, "dense_layers", 0),
        )
        student = measure_model(student_config, f"{teacher.name} decomposed", f"padd decompose --experts {experts}")
        stage1, section, stage_cls = "decompose", decompose, DecomposeConfig
    from padd.router_adapter import num_experts

    method = _pick(cfg.method, train, "method", _default(TrainConfig, "method"))
    if method not in METHODS:
        raise PlanError(f"--method {method!r}: one of {', '.join(METHODS)}")
    precision = _pick(cfg.precision, train, "precision", _default(TrainConfig, "precision"))
    parallel = _pick(cfg.parallel, train, "parallel", _default(TrainConfig, "parallel"))
    rollout = _pick(cfg.rollout, train, "rollout", _default(TrainConfig, "rollout"))
    share = _pick(cfg.vllm_gpu_memory, train, "vllm_gpu_memory", None)
    budget = _pick(cfg.max_new_tokens, train, "max_new_tokens", _default(TrainConfig, "max_new_tokens"))
    if cfg.vllm_gpu_memory is not None and rollout != "vllm":
        raise PlanError("--vllm-gpu-memory only acts with --rollout vllm")
    vllm_length = None
    if rollout != "vllm":
        share = None  # a study's engine settings, for a plan of its transformers rollouts
    else:
        from padd.generation.vllm import GPU_SHARE, engine_length

        share = GPU_SHARE if share is None and cfg.device == "cuda" else share
        context = getattr(student.config, "max_position_embeddings", None)
        vllm_length = train.get("vllm_max_model_len") or engine_length(context, budget)
    updates = _pick(cfg.updates_per_batch, train, "updates_per_batch", _default(TrainConfig, "updates_per_batch"))
    completion = cfg.completion_tokens if cfg.completion_tokens is not None else budget
    if completion > budget:
        raise PlanError(f"--completion-tokens {completion} exceeds the budget --max-new-tokens {budget}")
    extra = 0
    if stage1 == "seed":
        cka = (section.get("cka_tokens") or CKA_TOKENS) if section.get("layer_map", "cka") == "cka" else 0
        extra = section.get("heldout_tokens", _default(SeedConfig, "heldout_tokens")) + cka
    # Stage I loads both models in --dtype; auto keeps each checkpoint's (padd decompose builds its
    # student in the teacher's)
    dtype = {"float32": 4, "bfloat16": 2, "float16": 2}.get(section.get("dtype", "auto"))
    teacher_bytes = dtype or _checkpoint_bytes(teacher.config)
    stage1_bytes = (teacher_bytes, dtype or (_checkpoint_bytes(student.config) if stage1 == "seed" else teacher_bytes))
    run = Run(
        stage1=stage1,
        stage1_bytes=stage1_bytes,
        stage1_tokens=_pick(cfg.stage1_tokens, section, "tokens", _default(stage_cls, "tokens")),
        stage1_seq_len=section.get("seq_len", _default(stage_cls, "seq_len")),
        stage1_batch_size=section.get("batch_size", _default(stage_cls, "batch_size")),
        stage1_extra_tokens=extra,
        kmeans_iters=section.get("kmeans_iters", _default(stage_cls, "kmeans_iters")),
        proj_dim=section.get("proj_dim", _default(stage_cls, "proj_dim")),
        experts=num_experts(student.config),
        warmup_tokens=_pick(cfg.warmup_tokens, warm, "tokens", _default(WarmupConfig, "tokens")),
        warmup_seq_len=_pick(cfg.warmup_seq_len, warm, "seq_len", _default(WarmupConfig, "seq_len")),
        warmup_batch_size=_pick(cfg.warmup_batch_size, warm, "batch_size", _default(WarmupConfig, "batch_size")),
        warmup_epochs=_pick(cfg.warmup_epochs, warm, "epochs", _default(WarmupConfig, "epochs")),
        warmup_precision=_pick(cfg.precision, warm, "precision", _default(WarmupConfig, "precision")),
        warmup_parallel=_pick(cfg.parallel, warm, "parallel", _default(WarmupConfig, "parallel")),
        steps=_pick(cfg.steps, train, "steps", _default(TrainConfig, "steps")),
        prompts_per_step=_pick(
            cfg.prompts_per_step, train, "prompts_per_step", _default(TrainConfig, "prompts_per_step")
        ),
        group_size=_pick(cfg.group_size, train, "group_size", _default(TrainConfig, "group_size")),
        updates_per_batch=updates,
        prompt_tokens=cfg.prompt_tokens,
        completion_tokens=completion,
        method=method,
        kd=METHODS[method].kd is not None and _method_kd_coef(study, method) != 0,
        temperature=_pick(cfg.temperature, train, "temperature", _default(TrainConfig, "temperature")),
        precision=precision,
        parallel=parallel,
        rollout=rollout,
        vllm_share=share,
        vllm_length=vllm_length,
        old_policy_forward=updates > 1 or noisy_in_training(student.config),
    )
    if not run.splits_over(cfg.gpus):
        raise PlanError(
            f"--prompts-per-step {run.prompts_per_step} does not split over {cfg.gpus} GPUs: padd train gives every "
            "rank whole groups; give a multiple of the GPUs"
        )
    return teacher, student, run, hardware_of(cfg, precision, teacher.config, student.config)


def _checkpoint_bytes(config) -> int:
    """Bytes per weight of a checkpoint's own dtype (what Stage I's --dtype auto keeps)."""
    dtype = str(getattr(config, "dtype", None) or "float32")
    return 2 if ("bfloat16" in dtype or "float16" in dtype) else 4


def _method_kd_coef(study, method: str) -> float | None:
    from padd.methods import METHODS

    options = (study.methods.get(method) or {}) if study else {}
    return options.get("kd_coef", dict(METHODS[method].options).get("kd_coef"))
