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

from padd.config import CKA_TOKENS, DecomposeConfig, MemoryOptions, PlanConfig, SeedConfig, TrainConfig, WarmupConfig
from padd.memory import check_equal_mini_batches
from padd.plan.models import ModelShape, PlanError, decomposed_student, is_moe, load_model_config, measure_model

GIB = 2**30
# H100 SXM (dense, without sparsity): bf16 and plain float32 (padd's fp32 runs do not use TF32); its
# PCIe 5.0 x16 link to the host; a DGX H100's CPU memory bandwidth (2 sockets × 8 channels of
# DDR5-4800: 614 GB/s) shared by its 8 GPUs' processes
H100 = {
    "memory_gib": 80.0,
    "tflops": {"bf16": 989.0, "fp32": 67.0},
    "bandwidth_tbs": 3.35,
    "link_gbs": 450.0,
    "host_link_gbs": 64.0,
    "host_gbs": 614.0 / 8,
}
# a DGX H100's host: 2 TiB of CPU memory, where FSDP2's --offload and rank 0's whole float32 copies
# (the warm-up's end, a push to a vLLM server) live; and a modest float32 rate for the forwards rank 0
# runs there (the router start after an FSDP2 warm-up): its 112 cores peak near 7 TFLOP/s, a
# transformers forward of an MoE on them reaches a fraction, and under torchrun (OMP_NUM_THREADS=1
# unless set) a single core's
HOST = {"memory_gib": 2048.0, "tflops": 1.0}
# a weights file written and read on one machine (padd's safetensors push to a vLLM server): a local
# NVMe drive's sequential rate, about that of a single-threaded write through the page cache
FILE_GBS = 5.0
GPU_RESERVE_GIB = 3.0  # CUDA context, NCCL buffers, allocator fragmentation
# padd train's rollout engines; vllm-server: a vLLM server on GPUs of its own, the trainer pushing its
# weights after each rollout batch's updates
ROLLOUTS = ("transformers", "vllm", "vllm-server")
SERVER_SHARE = 0.9  # a vLLM server's share of its own GPUs: vLLM's default gpu_memory_utilization


@dataclass(frozen=True)
class Hardware:
    device: str  # cuda or cpu
    gpus: int  # every GPU of the run: the trainers and a vLLM server's
    memory_gib: float  # per device
    tflops: float | None  # peak dense TFLOP/s at the run's precision
    bandwidth_tbs: float | None  # memory bandwidth per device
    link_gbs: float  # interconnect per GPU (FSDP2's gathers)
    host_link_gbs: float  # GPU-to-CPU link per GPU (--offload's copies)
    host_gbs: float  # CPU memory bandwidth per GPU (--offload's AdamW step on the CPU)
    file_gbs: float  # a weights file's write and read (the push to a vLLM server)
    mfu: float
    reserve_gib: float
    host_memory_gib: float = HOST["memory_gib"]  # CPU memory of the machine, shared by its processes
    host_tflops: float = HOST["tflops"]  # float32 TFLOP/s of a forward on rank 0's CPU

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
    # III's damping divides Γ by its running mean (padd's shift_norm running-mean, λ > 0): with more
    # than one micro-batch per mini-batch, a no-grad training forward of each measures Γ first
    gamma_running_mean: bool = False
    stage1_bytes: tuple[int, int] = (4, 4)  # bytes per weight of Stage I's teacher and student
    # padd.config.MemoryOptions of padd train (Phase B) and of padd warmup: sequences (windows) per
    # forward/backward (None: the whole mini-batch), activation checkpointing, FSDP2's CPU offload
    micro_batch: int | None = None
    checkpointing: bool = False
    offload: bool = False
    warmup_micro_batch: int | None = None
    warmup_checkpointing: bool = False
    warmup_offload: bool = False
    server_gpus: int = 0  # --rollout vllm-server: the server's GPUs, of the run's
    # --rollout vllm --vllm-sleep: the colocated engine holds its memory only while it samples, and
    # its weights (not its KV cache) while the trainer's are loaded into it
    vllm_sleep: bool = False
    # the warm-up's router start (padd warmup --router-init) and the tokens of its fit and fit report
    warmup_router_init: str = "keep"
    router_tokens: int = 4096

    @property
    def sequence(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def trainers(self, gpus: int) -> int:
        """Processes of padd train: every GPU but a vLLM server's."""
        return gpus - self.server_gpus

    def sequences_per_forward(self, gpus: int) -> tuple[float, int]:
        """(sequences of a rollout batch per trainer, sequences of one training forward: the
        mini-batch, or the micro-batch)."""
        seqs = self.prompts_per_step * self.group_size / self.trainers(gpus)
        mini = math.ceil(seqs / self.updates_per_batch)
        return seqs, min(mini, self.micro_batch or mini)

    def forwards(self, gpus: int) -> dict[str, int]:
        """Forwards per rollout batch and trainer: `train`, the student's forward/backward passes
        (every mini-batch's micro-batches); `old`, its no-grad π_old forwards (in micro-batches too);
        `gamma`, its no-grad forwards that measure Γ before the first micro-batch's loss; `teacher`,
        the teacher's (KD only)."""
        seqs, micro = self.sequences_per_forward(gpus)
        per_update = math.ceil(math.ceil(seqs / self.updates_per_batch) / micro)
        train = self.updates_per_batch * per_update
        return {
            "train": train,
            "old": math.ceil(seqs / (self.micro_batch or seqs)) if self.old_policy_forward else 0,
            "gamma": train if self.gamma_running_mean and per_update > 1 else 0,
            "teacher": train if self.kd else 0,
        }

    def offloaded(self, gpus: int, warmup: bool = False) -> bool:
        """Whether FSDP2's CPU offload acts: asked for, under FSDP2, on 2+ processes (in one process
        padd shards nothing, so --offload changes nothing there)."""
        if warmup:
            return self.warmup_offload and self.warmup_parallel == "fsdp" and gpus > 1
        return self.offload and self.parallel == "fsdp" and self.trainers(gpus) > 1

    def splits_over(self, gpus: int) -> bool:
        """Whether padd train runs on `gpus` GPUs (a server's apart): every rank holds whole groups."""
        trainers = self.trainers(gpus)
        return trainers > 0 and self.prompts_per_step % trainers == 0


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
    return Hardware(
        device=cfg.device,
        gpus=cfg.gpus,
        memory_gib=memory,
        tflops=tflops,
        bandwidth_tbs=bandwidth,
        link_gbs=_given(cfg.link_bandwidth, H100["link_gbs"]),
        host_link_gbs=_given(cfg.host_link_bandwidth, H100["host_link_gbs"]),
        host_gbs=_given(cfg.host_bandwidth, H100["host_gbs"]),
        file_gbs=_given(cfg.file_bandwidth, FILE_GBS),
        mfu=cfg.mfu,
        reserve_gib=reserve,
    )


def _given(value, default):
    return default if value is None else value


def _pick(flag, section: dict, key: str, default):
    """A setting: the flag when given, else the study section's, else padd's default."""
    if flag is not None:
        return flag
    return section.get(key, default)


def _default(cls, name: str):
    return {f.name: f.default for f in cls.__dataclass_fields__.values()}[name]


def resolve_plan(cfg: PlanConfig) -> tuple[ModelShape, ModelShape, Run, Hardware]:
    """The models, settings and hardware a PlanConfig describes (its study, then its flags)."""
    # the hardware's own numbers first: nothing is built or measured for a plan that cannot be made
    _check_hardware_numbers(cfg)
    study = _study_of(cfg)
    teacher = _teacher_of(cfg, study)
    student, stage1 = _student_of(cfg, study, teacher)
    run = Run(
        # padd train's first, so that its refusals come before the other sections are read
        **_train_settings(cfg, study, student),
        **_stage1_settings(cfg, study, stage1, teacher, student),
        **_warmup_settings(cfg, study.warmup if study else {}, stage1),
    )
    _check_prompts_split(run, cfg.gpus)
    check_memory_options(run, cfg.gpus)
    return teacher, student, run, hardware_of(cfg, run.precision, teacher.config, student.config)


def _check_hardware_numbers(cfg: PlanConfig) -> None:
    """Refuse (PlanError) a GPU count below 1 or an MFU outside (0, 1]; returns nothing."""
    if cfg.gpus < 1:
        raise PlanError(f"--gpus {cfg.gpus}: give at least 1")
    if not 0 < cfg.mfu <= 1:
        raise PlanError(f"--mfu {cfg.mfu}: give a share of the peak in (0, 1]")


def _study_of(cfg: PlanConfig):
    """The study cfg names, loaded (padd.study.load_study), or None when it names none."""
    if cfg.study is None:
        return None
    from padd.study import load_study

    return load_study(cfg.study)


def _teacher_of(cfg: PlanConfig, study) -> ModelShape:
    """The teacher's shape: --teacher's, else the study's."""
    teacher_spec = cfg.teacher or (study.teacher if study else None)
    if teacher_spec is None:
        raise PlanError("give --teacher (a checkpoint folder, a config JSON or a preset) or --config STUDY")
    teacher_config, teacher_source = load_model_config(teacher_spec)
    return measure_model(teacher_config, Path(teacher_spec).name, teacher_source)


def _student_of(cfg: PlanConfig, study, teacher: ModelShape) -> tuple[ModelShape, str]:
    """(the student's shape, the Stage I that makes it): a pretrained MoE's (--student, else the
    study's) for padd seed, else one decomposed from the teacher by padd decompose."""
    student_spec = cfg.student or (study.student if study else None)
    given_shape = {k: getattr(cfg, k) for k in ("experts", "top_k", "shared_neurons", "expert_size", "dense_layers")}
    if student_spec is not None:
        if any(v is not None for v in given_shape.values()):
            raise PlanError("--experts/--top-k/... shape a decomposed student; a pretrained --student has its own")
        student_config, student_source = load_model_config(student_spec)
        if not is_moe(student_config):
            raise PlanError(f"{student_spec}: model_type {student_config.model_type!r} is not an MoE student")
        return measure_model(student_config, Path(student_spec).name, student_source), "seed"
    decompose = study.decompose if study else {}
    experts, top_k = _pick(cfg.experts, decompose, "experts", None), _pick(cfg.top_k, decompose, "top_k", None)
    if experts is None or top_k is None:
        raise PlanError("a decomposed student needs --experts and --top-k (or a study's decompose: section)")
    student_config = decomposed_student(
        teacher.config,
        experts=experts,
        top_k=top_k,
        shared=_pick(cfg.shared_neurons, decompose, "shared_neurons", 0),
        expert_size=_pick(cfg.expert_size, decompose, "expert_size", None),
        dense=_pick(cfg.dense_layers, decompose, "dense_layers", 0),
    )
    student = measure_model(student_config, f"{teacher.name} decomposed", f"padd decompose --experts {experts}")
    return student, "decompose"


def _train_settings(cfg: PlanConfig, study, student: ModelShape) -> dict:
    """Run's fields of padd train (Phase B), from the flags, the study's train: and methods: sections
    and padd's defaults."""
    from padd.phase_b.loop import noisy_in_training

    train = study.train if study else {}
    method = _method_settings(cfg, study, train)
    precision = _pick(cfg.precision, train, "precision", _default(TrainConfig, "precision"))
    parallel = _pick(cfg.parallel, train, "parallel", _default(TrainConfig, "parallel"))
    budget = _pick(cfg.max_new_tokens, train, "max_new_tokens", _default(TrainConfig, "max_new_tokens"))
    engine = _rollout_settings(cfg, train, student, budget)
    updates = _pick(cfg.updates_per_batch, train, "updates_per_batch", _default(TrainConfig, "updates_per_batch"))
    completion = cfg.completion_tokens if cfg.completion_tokens is not None else budget
    if completion > budget:
        raise PlanError(f"--completion-tokens {completion} exceeds the budget --max-new-tokens {budget}")
    return dict(
        steps=_pick(cfg.steps, train, "steps", _default(TrainConfig, "steps")),
        prompts_per_step=_pick(
            cfg.prompts_per_step, train, "prompts_per_step", _default(TrainConfig, "prompts_per_step")
        ),
        group_size=_pick(cfg.group_size, train, "group_size", _default(TrainConfig, "group_size")),
        updates_per_batch=updates,
        prompt_tokens=cfg.prompt_tokens,
        completion_tokens=completion,
        temperature=_pick(cfg.temperature, train, "temperature", _default(TrainConfig, "temperature")),
        precision=precision,
        parallel=parallel,
        old_policy_forward=updates > 1 or noisy_in_training(student.config),
        micro_batch=_pick(cfg.micro_batch_size, train, "micro_batch_size", None),
        checkpointing=bool(_pick(cfg.activation_checkpointing, train, "activation_checkpointing", False)),
        offload=bool(_pick(cfg.offload, train, "offload", False)),
        **method,
        **engine,
    )


def _method_settings(cfg: PlanConfig, study, train: dict) -> dict:
    """Run's fields of the Phase B method: `method`, and whether it runs a KD term (`kd`) and
    measures Γ's running mean (`gamma_running_mean`)."""
    from padd.methods import METHODS

    method = _pick(cfg.method, train, "method", _default(TrainConfig, "method"))
    if method not in METHODS:
        raise PlanError(f"--method {method!r}: one of {', '.join(METHODS)}")
    lam = _method_option(study, method, "lam")
    return dict(
        method=method,
        kd=METHODS[method].kd is not None and _method_option(study, method, "kd_coef") != 0,
        gamma_running_mean=METHODS[method].policy is not None
        and bool(lam)
        and _method_option(study, method, "shift_norm") == "running-mean",
    )


def _rollout_settings(cfg: PlanConfig, train: dict, student: ModelShape, budget: int) -> dict:
    """Run's fields of the rollout engine: `rollout`, `vllm_share` and `vllm_length` (None without
    vLLM) and `server_gpus` (0 without a vLLM server)."""
    rollout = _pick(cfg.rollout, train, "rollout", _default(TrainConfig, "rollout"))
    if rollout not in ROLLOUTS:
        raise PlanError(f"rollout {rollout!r}: one of {', '.join(ROLLOUTS)}")
    share = _pick(cfg.vllm_gpu_memory, train, "vllm_gpu_memory", None)
    if cfg.vllm_gpu_memory is not None and not rollout.startswith("vllm"):
        raise PlanError("--vllm-gpu-memory only acts with --rollout vllm or vllm-server")
    server_gpus = _server_gpus(cfg, rollout)
    sleep = bool(_pick(cfg.vllm_sleep, train, "vllm_sleep", False))
    if sleep and (rollout != "vllm" or cfg.device != "cuda"):
        raise PlanError("--vllm-sleep only acts with --rollout vllm on a GPU (--device cuda): vLLM's sleep mode")
    vllm_length = None
    if not rollout.startswith("vllm"):
        share = None  # a study's engine settings, for a plan of its transformers rollouts
    else:
        from padd.generation.vllm import GPU_SHARE, engine_length

        if share is None and cfg.device == "cuda":
            share = SERVER_SHARE if rollout == "vllm-server" else GPU_SHARE
        context = getattr(student.config, "max_position_embeddings", None)
        vllm_length = train.get("vllm_max_model_len") or engine_length(context, budget)
    return dict(rollout=rollout, vllm_share=share, vllm_length=vllm_length, server_gpus=server_gpus, vllm_sleep=sleep)


def _server_gpus(cfg: PlanConfig, rollout: str) -> int:
    """The GPUs of --rollout vllm-server's server, of --gpus (0 for the other engines)."""
    if rollout == "vllm-server":
        if cfg.server_gpus is None:
            raise PlanError("--rollout vllm-server: give --server-gpus N, the GPUs of the server (of --gpus)")
        if not 0 < cfg.server_gpus < cfg.gpus:
            raise PlanError(
                f"--server-gpus {cfg.server_gpus}: the server takes some of the --gpus {cfg.gpus} and leaves the "
                "trainers at least one; give 1 to --gpus - 1"
            )
        if cfg.device != "cuda":
            raise PlanError("--rollout vllm-server plans a server on GPUs of its own: give --device cuda")
        return cfg.server_gpus
    if cfg.server_gpus is not None:
        raise PlanError("--server-gpus only acts with --rollout vllm-server")
    return 0


def _stage1_settings(cfg: PlanConfig, study, stage1: str, teacher: ModelShape, student: ModelShape) -> dict:
    """Run's fields of Stage I (padd seed or padd decompose, `stage1`), from the flags, the study's
    seed: or decompose: section and padd's defaults."""
    from padd.router_adapter import num_experts

    seeded = stage1 == "seed"
    section = (study.seed if seeded else study.decompose) if study else {}
    stage_cls = SeedConfig if seeded else DecomposeConfig
    return dict(
        stage1=stage1,
        stage1_bytes=_stage1_bytes(section, stage1, teacher, student),
        stage1_tokens=_pick(cfg.stage1_tokens, section, "tokens", _default(stage_cls, "tokens")),
        stage1_seq_len=section.get("seq_len", _default(stage_cls, "seq_len")),
        stage1_batch_size=section.get("batch_size", _default(stage_cls, "batch_size")),
        stage1_extra_tokens=_stage1_extra_tokens(section, stage1),
        kmeans_iters=section.get("kmeans_iters", _default(stage_cls, "kmeans_iters")),
        proj_dim=section.get("proj_dim", _default(stage_cls, "proj_dim")),
        experts=num_experts(student.config),
    )


def _stage1_extra_tokens(section: dict, stage1: str) -> int:
    """Tokens padd seed reads beyond its statistics' (held-out and CKA); 0 for padd decompose."""
    if stage1 != "seed":
        return 0
    cka = (section.get("cka_tokens") or CKA_TOKENS) if section.get("layer_map", "cka") == "cka" else 0
    return section.get("heldout_tokens", _default(SeedConfig, "heldout_tokens")) + cka


def _stage1_bytes(section: dict, stage1: str, teacher: ModelShape, student: ModelShape) -> tuple[int, int]:
    """Bytes per weight of Stage I's (teacher, student)."""
    # Stage I loads both models in --dtype; auto keeps each checkpoint's (padd decompose builds its
    # student in the teacher's)
    dtype = {"float32": 4, "bfloat16": 2, "float16": 2}.get(section.get("dtype", "auto"))
    teacher_bytes = dtype or _checkpoint_bytes(teacher.config)
    return teacher_bytes, dtype or (_checkpoint_bytes(student.config) if stage1 == "seed" else teacher_bytes)


def _warmup_settings(cfg: PlanConfig, warm: dict, stage1: str) -> dict:
    """Run's fields of padd warmup, from the flags, the study's warmup: section and padd's defaults."""
    return dict(
        warmup_tokens=_pick(cfg.warmup_tokens, warm, "tokens", _default(WarmupConfig, "tokens")),
        warmup_seq_len=_pick(cfg.warmup_seq_len, warm, "seq_len", _default(WarmupConfig, "seq_len")),
        warmup_batch_size=_pick(cfg.warmup_batch_size, warm, "batch_size", _default(WarmupConfig, "batch_size")),
        warmup_epochs=_pick(cfg.warmup_epochs, warm, "epochs", _default(WarmupConfig, "epochs")),
        warmup_precision=_pick(cfg.precision, warm, "precision", _default(WarmupConfig, "precision")),
        warmup_parallel=_pick(cfg.parallel, warm, "parallel", _default(WarmupConfig, "parallel")),
        warmup_micro_batch=_pick(cfg.warmup_micro_batch_size, warm, "micro_batch_size", None),
        warmup_checkpointing=bool(_pick(cfg.activation_checkpointing, warm, "activation_checkpointing", False)),
        warmup_offload=bool(_pick(cfg.offload, warm, "offload", False)),
        warmup_router_init=warm.get("router_init") or ("keep" if stage1 == "seed" else "uniform"),
        router_tokens=warm.get("router_tokens", _default(WarmupConfig, "router_tokens")),
    )


def _check_prompts_split(run: Run, gpus: int) -> None:
    """Refuse (PlanError), as padd train does, prompts per rollout batch that do not split over its
    trainer GPUs; returns nothing."""
    if not run.splits_over(gpus):
        where = f"the {run.trainers(gpus)} trainer GPUs" if run.server_gpus else f"{gpus} GPUs"
        raise PlanError(
            f"--prompts-per-step {run.prompts_per_step} does not split over {where}: padd train gives every "
            "rank whole groups; give a multiple of the GPUs"
        )


def check_memory_options(run: Run, gpus: int) -> None:
    """Refuse, as padd warmup and padd train do before any model loads, the memory options they
    would refuse: padd.config.MemoryOptions.check_memory_options on each command's batch per rank and
    processes, and Phase B's mini-batches of equal size."""
    trainers = run.trainers(gpus)
    per_rank = run.prompts_per_step // trainers * run.group_size
    check_equal_mini_batches(per_rank, run.updates_per_batch, run.micro_batch, error=PlanError)
    mini = per_rank // run.updates_per_batch
    commands = (
        (run.micro_batch, run.offload, run.parallel, mini, "each rank's mini-batch of completions", trainers),
        (run.warmup_micro_batch, run.warmup_offload, run.warmup_parallel, run.warmup_batch_size, "--batch-size", gpus),
    )
    for micro, offload, parallel, batch, what, processes in commands:
        options = MemoryOptions(micro_batch_size=micro, offload=offload)
        options.parallel = parallel  # what check_memory_options reads of the command's own config
        options.check_memory_options(batch, what, processes)


def _checkpoint_bytes(config) -> int:
    """Bytes per weight of a checkpoint's own dtype (what Stage I's --dtype auto keeps)."""
    dtype = str(getattr(config, "dtype", None) or "float32")
    return 2 if ("bfloat16" in dtype or "float16" in dtype) else 4


def _method_option(study, method: str, name: str):
    """A method option as the study's rows train it: the study's methods: section, else the method's
    default (None where the method reads no such option)."""
    from padd.methods import METHODS

    options = (study.methods.get(method) or {}) if study else {}
    return options.get(name, dict(METHODS[method].options).get(name))
