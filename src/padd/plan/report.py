"""The plan: memory and time together, whether it fits and the first setting to change, printed as
tables and written as JSON."""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

from padd.config import PlanConfig
from padd.plan.memory import MEMORY_PHASES, dtype_bytes, phase_memory
from padd.plan.models import ModelShape
from padd.plan.settings import GIB, Hardware, Run, resolve_plan
from padd.plan.timing import phase_seconds, vllm_kv_tokens

TIME_PHASES = ("stage1", "warmup", "generation", "teacher", "student", "update")
TITLES = {
    "load": "load",
    "stage1": "Stage I",
    "warmup": "warm-up",
    "generation": "generate",
    "teacher": "teacher",
    "student": "student",
    "backward": "backward",
    "step": "step",
    "update": "update",
}
MEMORY_CAPTION = (
    "load: the whole student (float32) and teacher on each device before sharding. Phase B per rollout "
    "batch: generate, teacher (its forward, KD only), student (π_old and the update's forward), backward, "
    "step (AdamW, then the weights to vLLM)"
)


@dataclass
class Plan:
    teacher: ModelShape
    student: ModelShape
    run: Run
    hardware: Hardware
    memory: dict[str, dict[str, float]]  # phase -> component -> bytes per device
    seconds: dict[str, float]  # phase -> wall seconds of the whole run
    step_flops: dict[str, float]  # Phase B phase -> FLOPs per rollout batch, all GPUs
    notes: list[str]
    blocked: str | None = None  # why the run cannot start whatever the memory (a vLLM share too small)

    @property
    def peaks(self) -> dict[str, float]:
        return {phase: sum(parts.values()) for phase, parts in self.memory.items()}

    @property
    def peak(self) -> float:
        return max(self.peaks.values())

    @property
    def fits(self) -> bool:
        return self.blocked is None and self.peak <= self.hardware.usable_gib * GIB

    @property
    def gpu_hours(self) -> float:
        """Stage I runs on one device, everything else on all of them."""
        hw = self.hardware
        rest = sum(v for k, v in self.seconds.items() if k != "stage1")
        return (self.seconds["stage1"] + rest * hw.gpus) / 3600


def make_plan(teacher: ModelShape, student: ModelShape, run: Run, hw: Hardware) -> Plan:
    memory = phase_memory(teacher, student, run, hw)
    seconds, step_flops, notes = phase_seconds(teacher, student, run, hw)
    plan = Plan(teacher, student, run, hw, memory, seconds, step_flops, notes)
    if run.rollout == "vllm" and hw.device == "cuda" and vllm_kv_tokens(student, run, hw) < run.vllm_length:
        plan.blocked = (
            f"the vLLM share ({run.vllm_share:g} of {hw.memory_gib:g} GiB) cannot hold the student's "
            f"{dtype_bytes(run.precision) * student.total / GIB:.1f} GiB of weights and the KV cache of one "
            f"{run.vllm_length}-token sequence: the engine cannot start"
        )
        notes.append(plan.blocked)
    return plan


GPU_COUNTS = (2, 4, 8, 16, 32, 64, 128)


def changes(plan: Plan) -> list[str]:
    """What makes a plan that does not fit fit (empty when it fits): the first of padd's own settings
    that does, on as few GPUs as it can (sharding, another vLLM share, smaller mini-batches, then
    more GPUs), and what padd train does not offer yet (micro-batches, activation checkpointing,
    AdamW state in CPU memory, sharded loading) where that needs fewer GPUs."""
    if plan.fits:
        return []
    own, own_gpus = _own_setting(plan)
    later, later_gpus = _not_offered_yet(plan)
    out = [own] if own else []
    if later and (own is None or later_gpus < own_gpus):
        out.append(f"{'or, ' if own else ''}with what padd train does not offer yet: {later}")
    return out or ["nothing padd can change: more memory per GPU"]


def _fits(plan: Plan, run: Run, hw: Hardware) -> bool:
    return make_plan(plan.teacher, plan.student, run, hw).fits


def _own_setting(plan: Plan) -> tuple[str | None, int]:
    """(the first padd setting that makes the plan fit, the GPUs it needs)."""
    run, hw = plan.run, plan.hardware
    sharded = replace(run, parallel="fsdp", warmup_parallel="fsdp")
    ddp = [name for name, mode in (("train", run.parallel), ("warmup", run.warmup_parallel)) if mode == "ddp"]
    if hw.gpus > 1 and ddp and _fits(plan, sharded, hw):
        where = " and ".join(f"padd {name}" for name in ddp)
        return f"--parallel fsdp for {where}: shard the weights, gradients and AdamW state over the GPUs", hw.gpus
    if run.rollout == "vllm" and hw.device == "cuda":
        # a larger share where the engine cannot start, else a smaller one
        shares = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9) if plan.blocked else (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)
        for share in shares:
            if (share > run.vllm_share if plan.blocked else share < run.vllm_share) and _fits(
                plan, replace(run, vllm_share=share), hw
            ):
                return f"--vllm-gpu-memory {share}: a {'larger' if plan.blocked else 'smaller'} engine share", hw.gpus
        if _fits(plan, replace(run, rollout="transformers", vllm_share=None), hw):
            return "--rollout transformers: no engine beside the trainer (generate is slower)", hw.gpus
    for updates in (2, 4, 8, 16):
        if updates > run.updates_per_batch and _fits(plan, replace(run, updates_per_batch=updates), hw):
            return (
                f"--updates-per-batch {updates}: smaller mini-batches (more optimizer steps per rollout batch, "
                "a change to the method's schedule)",
                hw.gpus,
            )
    for gpus in (g for g in GPU_COUNTS if g > hw.gpus and run.splits_over(g)):
        if _fits(plan, sharded, replace(hw, gpus=gpus)):
            return f"{gpus} GPUs, with --parallel fsdp", gpus
    return None, 0


def _not_offered_yet(plan: Plan) -> tuple[str | None, int]:
    """(the fewest of the features padd train does not offer yet that make the plan fit, on the fewest
    GPUs; the GPUs it needs). The features: gradient accumulation over micro-batches (the π_old
    forward in micro-batches too), activation checkpointing, AdamW state in CPU memory, and loading
    and gathering weights through CPU memory (each GPU holds its shard only)."""
    run, hw = plan.run, plan.hardware
    names = {
        "checkpointing": "activation checkpointing",
        "offload_optimizer": "AdamW state in CPU memory",
        "sharded_load": "loading and gathering weights through CPU memory",
    }
    subsets = sorted(itertools.product((False, True), repeat=len(names)), key=sum)
    for gpus in [hw.gpus, *(g for g in GPU_COUNTS if g > hw.gpus and run.splits_over(g))]:
        on = "" if gpus == hw.gpus else f"{gpus} GPUs with --parallel fsdp, "
        trial = run if gpus == hw.gpus else replace(run, parallel="fsdp", warmup_parallel="fsdp")
        mini = trial.sequences_per_forward(gpus)[1]
        for subset in subsets:
            features = dict(zip(names, subset, strict=True))
            for micro in [mini, *(m for m in (16, 8, 4, 2, 1) if m < mini)]:
                if not _fits(plan, replace(trial, micro_batch=micro, **features), replace(hw, gpus=gpus)):
                    continue
                parts = [f"gradient accumulation over micro-batches of {micro}"] if micro < mini else []
                parts += [names[k] for k, on_ in features.items() if on_]
                if not parts:  # more GPUs alone: one of padd's own settings, found there
                    continue
                return on + ", ".join(parts), gpus
    return None, 0


def mfu_for_gpu_hours(plan: Plan, target: float) -> float | None:
    """The lowest MFU at which the whole run takes at most `target` GPU-hours; None when even MFU 1
    takes longer (the memory-bound parts alone), or when the device's TFLOP/s are not known. The
    compute-bound time scales as 1/MFU; decoding and the optimizer step do not."""

    def hours(mfu: float) -> float:
        hw = replace(plan.hardware, mfu=mfu)
        return make_plan(plan.teacher, plan.student, plan.run, hw).gpu_hours

    low, high = 1e-4, 1.0
    if math.isnan(hours(high)) or hours(high) > target:
        return None
    if hours(low) <= target:
        return low
    for _ in range(60):
        mid = math.sqrt(low * high)
        low, high = (mid, high) if hours(mid) > target else (low, mid)
    return high


def _duration(seconds: float) -> str:
    if math.isnan(seconds):
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def print_plan(plan: Plan, suggested: list[str], console: Console, target_gpu_hours: float | None = None) -> None:
    """The plan's three tables (models, memory per device, time), its verdict, the settings to change
    (`changes(plan)`) and its notes."""
    run, hw = plan.run, plan.hardware
    models = Table(title="Models (parameters counted on a meta-device build)")
    for col in ("", "config", "total", "active", "GFLOPs / token"):
        models.add_column(col, justify="left" if col in ("", "config") else "right")
    for role, m in (("teacher", plan.teacher), ("student", plan.student)):
        models.add_row(
            role, m.source, _count(m.total), _count(m.active), f"{m.flops_per_token(run.sequence) / 1e9:.3g}"
        )
    console.print(models)

    unit, scale = ("GiB", GIB) if plan.peak >= 4 * GIB else ("MiB", 2**20)
    where = f"{hw.gpus} × {hw.memory_gib:g} GiB GPUs" if hw.device == "cuda" else f"CPU, {hw.memory_gib:.0f} GiB"
    memory = Table(title=f"Memory per {'GPU' if hw.device == 'cuda' else 'process'} ({unit}), {where}")
    memory.caption = MEMORY_CAPTION
    memory.add_column("component")
    for phase in MEMORY_PHASES:
        memory.add_column(TITLES[phase], justify="right")
    components = list(dict.fromkeys(c for parts in plan.memory.values() for c in parts))
    for name in components:
        memory.add_row(name, *(_amount(plan.memory[p].get(name, 0.0), scale) for p in MEMORY_PHASES))
    reserve = hw.reserve_gib * GIB
    memory.add_row("reserve" if hw.device == "cuda" else "runtime", *([_amount(reserve, scale)] * len(MEMORY_PHASES)))
    peaks = [_amount(plan.peaks[p] + reserve, scale) for p in MEMORY_PHASES]
    memory.add_row("[bold]peak[/bold]", *(f"[bold]{peak}[/bold]" for peak in peaks))
    ckpt = make_plan(plan.teacher, plan.student, replace(run, checkpointing=True), hw)
    memory.add_row("with checkpointing", *(_amount(ckpt.peaks[p] + reserve, scale) for p in MEMORY_PHASES))
    console.print(memory)

    time = Table(title=f"Time at MFU {hw.mfu:g}" + (f" of {hw.tflops:g} TFLOP/s" if hw.tflops else ""))
    for col in ("phase", "FLOP / batch", "per batch", "whole run", "share"):
        time.add_column(col, justify="left" if col == "phase" else "right")
    total = sum(plan.seconds.values())
    for phase in TIME_PHASES:
        per_batch = plan.seconds[phase] / run.steps if phase in plan.step_flops else math.nan
        work = _flop(plan.step_flops[phase]) if phase in plan.step_flops else "-"
        share = "-" if math.isnan(total) or not total else f"{plan.seconds[phase] / total:.0%}"
        time.add_row(TITLES[phase], work, _duration(per_batch), _duration(plan.seconds[phase]), share)
    console.print(time)

    if math.isnan(total):
        console.print("time: give --gpu-tflops and --bandwidth of this device to estimate it")
    else:
        console.print(
            f"whole run: {_duration(plan.seconds['stage1'])} of Stage I on one device, then "
            f"{_duration(total - plan.seconds['stage1'])} on {hw.gpus}: [bold]{plan.gpu_hours:.1f} GPU-hours[/bold]"
        )
        console.print(
            f"  ({run.steps} rollout batches of {run.prompts_per_step} × {run.group_size} completions, "
            f"{run.prompt_tokens} + {run.completion_tokens} tokens each)"
        )
    verdict = "fits" if plan.fits else "does not fit"
    console.print(
        f"peak {(plan.peak + reserve) / GIB:.1f} of {hw.memory_gib:.4g} GiB per device: [bold]{verdict}[/bold]"
    )
    for i, change in enumerate(suggested):
        console.print(f"first setting to change: {change}" if i == 0 else f"  {change}")
    for note in plan.notes:
        console.print(f"note: {note}")
    if target_gpu_hours is not None:
        mfu = mfu_for_gpu_hours(plan, target_gpu_hours)
        if mfu is None:
            console.print(f"no MFU reaches {target_gpu_hours:g} GPU-hours: the memory-bound phases alone take longer")
        else:
            console.print(f"{target_gpu_hours:g} GPU-hours is this plan at an MFU of {mfu:.2f}")


def _flop(value: float) -> str:
    """8.26e15 -> '8.26 P'."""
    for scale, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M")):
        if value >= scale:
            return f"{value / scale:.3g} {prefix}"
    return f"{value:.3g}"


def _count(n: int) -> str:
    return f"{n / 1e9:.3g} B" if n >= 1e8 else f"{n / 1e6:.3g} M"


def _amount(value: float, scale: float) -> str:
    return "-" if not value else f"{value / scale:.1f}"


def plan_json(plan: Plan, suggested: list[str]) -> dict:
    """The plan as JSON: models, settings, hardware, memory (GiB), the settings to change
    (`changes(plan)`) and seconds per phase."""
    return {
        "teacher": {"source": plan.teacher.source, "total": plan.teacher.total, "active": plan.teacher.active},
        "student": {"source": plan.student.source, "total": plan.student.total, "active": plan.student.active},
        "run": asdict(plan.run),
        "hardware": asdict(plan.hardware),
        "memory_gib": {p: {k: v / GIB for k, v in parts.items()} for p, parts in plan.memory.items()},
        "peak_gib": {p: v / GIB + plan.hardware.reserve_gib for p, v in plan.peaks.items()},
        "fits": plan.fits,
        "changes": suggested,
        "seconds": plan.seconds,
        "step_flops": plan.step_flops,
        "gpu_hours": plan.gpu_hours,
        "notes": plan.notes,
    }


def run_plan(cfg: PlanConfig, console: Console | None = None) -> Plan:
    console = console or Console(width=max(110, Console().width))
    plan = make_plan(*resolve_plan(cfg))
    suggested = changes(plan)  # a search over many plans: once for the screen and the file
    print_plan(plan, suggested, console, cfg.match_gpu_hours)
    if cfg.out:
        from padd.io import atomic_write_json

        atomic_write_json(Path(cfg.out), plan_json(plan, suggested))
    return plan
