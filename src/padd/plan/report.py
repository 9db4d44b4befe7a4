"""The plan: memory and time together, whether it fits and the first setting to change, printed as
tables and written as JSON."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

from padd.config import PlanConfig
from padd.plan.memory import MEMORY_PHASES, dtype_bytes, host_memory, offloaded_bytes, phase_memory, server_memory
from padd.plan.models import ModelShape, student_to_teacher
from padd.plan.settings import GIB, Hardware, Run, resolve_plan
from padd.plan.timing import phase_seconds, vllm_kv_tokens

TIME_PHASES = ("stage1", "warmup", "generation", "teacher", "student", "update")
TITLES = {
    "load": "load",
    "stage1": "Stage I",
    "warmup": "warm-up",
    "warmup_end": "warm-up end",
    "generation": "generate",
    "teacher": "teacher",
    "student": "student",
    "backward": "backward",
    "step": "step",
    "update": "update",
    "push": "push",
}
MEMORY_CAPTION = (
    "load: the student (float32) and teacher on each device, under FSDP2 each rank's shard. warm-up end: the "
    "whole student gathered tensor by tensor into rank 0's CPU memory (FSDP2). Phase B per rollout batch, on a "
    "trainer: generate, teacher (its forward, KD only), student (π_old, Γ and the update's forward), backward, "
    "step (AdamW, then the weights to vLLM: to a server under FSDP2 tensor by tensor into rank 0's CPU memory)"
)
# the memory table's phases of each command, which its memory options change
WARMUP_PHASES = ("warmup", "warmup_end")
TRAIN_PHASES = ("generation", "teacher", "student", "backward", "step")


@dataclass
class Plan:
    teacher: ModelShape
    student: ModelShape
    run: Run
    hardware: Hardware
    memory: dict[str, dict[str, float]]  # phase -> component -> bytes per device
    host: dict[str, dict[str, float]]  # phase -> component -> bytes of the machine's CPU memory (GPU runs)
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
    def host_peaks(self) -> dict[str, float]:
        return {phase: sum(parts.values()) for phase, parts in self.host.items()}

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
    host = host_memory(student, run, hw)
    seconds, step_flops, notes = phase_seconds(teacher, student, run, hw)
    plan = Plan(teacher, student, run, hw, memory, host, seconds, step_flops, notes)
    if host and max(plan.host_peaks.values()) > hw.host_memory_gib * GIB:
        phase = max(plan.host_peaks, key=plan.host_peaks.get)
        notes.append(
            f"the {TITLES[phase]} holds {plan.host_peaks[phase] / GIB:.0f} GiB of CPU memory, more than the "
            f"machine's {hw.host_memory_gib:.0f} GiB"
        )
    if run.rollout.startswith("vllm") and hw.device == "cuda" and vllm_kv_tokens(student, run, hw) < run.vllm_length:
        where = f"{run.server_gpus} × " if run.rollout == "vllm-server" else ""
        plan.blocked = (
            f"the vLLM share ({run.vllm_share:g} of {where}{hw.memory_gib:g} GiB) cannot hold the student's "
            f"{dtype_bytes(run.precision) * student.total / GIB:.1f} GiB of weights and the KV cache of one "
            f"{run.vllm_length}-token sequence: the engine cannot start"
        )
        notes.append(plan.blocked)
    return plan


GPU_COUNTS = (2, 4, 8, 16, 32, 64, 128)


def changes(plan: Plan) -> list[str]:
    """What makes a plan that does not fit fit (empty when it fits): the first of padd's settings
    that does, in the order that changes the run least: --parallel fsdp; another vLLM share; a
    colocated engine asleep while the trainer steps (--vllm-sleep); the memory options of padd
    warmup and padd train (the same update in less memory: of the sets of --micro-batch-size,
    --activation-checkpointing and --offload that fit, the fastest); smaller mini-batches
    (--updates-per-batch, another schedule); more GPUs."""
    if plan.fits:
        return []
    change = _first_change(plan)
    if change:
        return [change]
    return [f"nothing padd can change: {_what_never_fits(plan)}"]


def _fits(plan: Plan, run: Run, hw: Hardware) -> bool:
    return make_plan(plan.teacher, plan.student, run, hw).fits


def _first_change(plan: Plan) -> str | None:
    run, hw = plan.run, plan.hardware
    sharded = replace(run, parallel="fsdp", warmup_parallel="fsdp")
    ddp = [name for name, mode in (("train", run.parallel), ("warmup", run.warmup_parallel)) if mode == "ddp"]
    if hw.gpus > 1 and ddp and _fits(plan, sharded, hw):
        where = " and ".join(f"padd {name}" for name in ddp)
        return f"--parallel fsdp for {where}: shard the weights, gradients and AdamW state over the GPUs"
    if run.rollout.startswith("vllm") and hw.device == "cuda":
        # a larger share where the engine cannot start, else a smaller one (beside the trainer)
        shares = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95) if plan.blocked else (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)
        for share in shares:
            if (share > run.vllm_share if plan.blocked else share < run.vllm_share) and _fits(
                plan, replace(run, vllm_share=share), hw
            ):
                return f"--vllm-gpu-memory {share}: a {'larger' if plan.blocked else 'smaller'} engine share"
        if run.rollout == "vllm" and not run.vllm_sleep and _fits(plan, replace(run, vllm_sleep=True), hw):
            return "--vllm-sleep: the engine releases its memory while the trainer steps"
        if run.rollout == "vllm" and _fits(plan, replace(run, rollout="transformers", vllm_share=None), hw):
            return "--rollout transformers: no engine beside the trainer (generate is slower)"
    for trial in (run, sharded) if ddp and hw.gpus > 1 else (run,):
        found = _memory_options(plan, trial, hw)
        if found:
            sharding = (
                f"--parallel fsdp for {' and '.join(f'padd {name}' for name in ddp)}; " if trial is sharded else ""
            )
            return f"{sharding}{found}: the same update in less memory"
    for updates in (2, 4, 8, 16):
        if updates <= run.updates_per_batch:
            continue
        trial = replace(run, updates_per_batch=updates)
        found = "" if _fits(plan, trial, hw) else _memory_options(plan, trial, hw)
        if found is not None:
            return (
                f"--updates-per-batch {updates}{' with ' + found if found else ''}: smaller mini-batches (more "
                "optimizer steps per rollout batch, a change to the method's schedule)"
            )
    for gpus in (g for g in GPU_COUNTS if g > hw.gpus and sharded.splits_over(g)):
        more = replace(hw, gpus=gpus)
        found = "" if _fits(plan, sharded, more) else _memory_options(plan, sharded, more)
        if found is not None:
            return f"{gpus} GPUs, with --parallel fsdp{' and ' + found if found else ''}"
    return None


def _memory_options(plan: Plan, run: Run, hw: Hardware) -> str | None:
    """The memory options of padd warmup and padd train that make `run` fit on `hw`, as their flags
    (each command's fastest set among those that fit its phases, a command whose phases fit already
    left as it is); None when no set does."""
    chosen, said = run, []
    for command, phases in (("warmup", WARMUP_PHASES), ("train", TRAIN_PHASES)):
        if _phases_fit(make_plan(plan.teacher, plan.student, chosen, hw), phases):
            continue
        best = None
        for trial, flags in _option_sets(chosen, hw, command):
            trial_plan = make_plan(plan.teacher, plan.student, trial, hw)
            if not _phases_fit(trial_plan, phases):
                continue
            seconds = sum(v for k, v in trial_plan.seconds.items() if (k == "warmup") == (command == "warmup"))
            key = (0.0 if math.isnan(seconds) else seconds, len(flags))
            if best is None or key < best[0]:
                best = (key, trial, flags)
        if best is None:
            return None
        chosen = best[1]
        said.append(f"padd {command} {' '.join(best[2])}")
    if chosen == run or not _fits(plan, chosen, hw):
        return None
    return "; ".join(said)


def _phases_fit(plan: Plan, phases: tuple[str, ...]) -> bool:
    if plan.blocked is not None and phases == TRAIN_PHASES:
        return False
    return all(plan.peaks[p] <= plan.hardware.usable_gib * GIB for p in phases)


def _option_sets(run: Run, hw: Hardware, command: str):
    """Every set of a command's memory options padd accepts for `run`: (the run with them, their flags).
    Micro-batches divide the command's batch per rank; offload is FSDP2's, on 2+ processes."""
    if command == "warmup":
        batch, parallel, processes = run.warmup_batch_size, run.warmup_parallel, hw.gpus
    else:
        per_rank = run.prompts_per_step // run.trainers(hw.gpus) * run.group_size
        batch, parallel, processes = per_rank // run.updates_per_batch, run.parallel, run.trainers(hw.gpus)
        if per_rank % run.updates_per_batch:
            return
    offloads = (False, True) if parallel == "fsdp" and processes > 1 else (False,)
    for micro in (d for d in range(batch, 0, -1) if batch % d == 0):
        for checkpointing in (False, True):
            for offload in offloads:
                flags = [f"--micro-batch-size {micro}"] if micro < batch else []
                flags += ["--activation-checkpointing"] if checkpointing else []
                flags += ["--offload"] if offload else []
                if command == "warmup":
                    options = dict(
                        warmup_micro_batch=micro if micro < batch else None,
                        warmup_checkpointing=checkpointing,
                        warmup_offload=offload,
                    )
                else:
                    options = dict(
                        micro_batch=micro if micro < batch else None, checkpointing=checkpointing, offload=offload
                    )
                yield replace(run, **options), flags


def _what_never_fits(plan: Plan) -> str:
    """Which phases exceed the memory with every memory option on, on these GPUs."""
    run, hw = plan.run, plan.hardware
    fsdp = hw.gpus > 1
    trial = replace(
        run,
        parallel="fsdp" if fsdp else run.parallel,
        warmup_parallel="fsdp" if fsdp else run.warmup_parallel,
        micro_batch=1,
        warmup_micro_batch=1,
        checkpointing=True,
        warmup_checkpointing=True,
        offload=fsdp,
        warmup_offload=fsdp,
    )
    least = make_plan(plan.teacher, plan.student, trial, hw)
    over = [p for p in MEMORY_PHASES if least.peaks[p] > hw.usable_gib * GIB]
    if not over:
        return "more memory per GPU"
    worst = max(over, key=lambda p: least.peaks[p])
    names = [TITLES[p] for p in over]
    phases = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
    parts = least.memory[worst]
    largest = max(parts, key=parts.get)
    return (
        f"with every memory option on, the {phases} still need{'s' if len(names) == 1 else ''} "
        f"{'up to ' if len(names) > 1 else ''}{(least.peaks[worst] + hw.reserve_gib * GIB) / GIB:.1f} GiB per "
        f"device ({TITLES[worst]}'s largest part: {largest}, {parts[largest] / GIB:.1f} GiB)"
    )


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
    console.print(_models_table(plan))
    console.print(_memory_table(plan))
    for line in _memory_lines(plan):
        console.print(line)
    console.print(_time_table(plan))
    for line in _whole_run_lines(plan) + _verdict_lines(plan, suggested):
        console.print(line)
    if target_gpu_hours is not None:
        console.print(_gpu_hours_line(plan, target_gpu_hours))


def _models_table(plan: Plan) -> Table:
    """The table of the teacher and the student: config, parameters (total, active), FLOPs per token."""
    models = Table(title="Models (parameters counted on a meta-device build)")
    for col in ("", "config", "total", "active", "GFLOPs / token"):
        models.add_column(col, justify="left" if col in ("", "config") else "right")
    for role, m in (("teacher", plan.teacher), ("student", plan.student)):
        models.add_row(
            role, m.source, _count(m.total), _count(m.active), f"{m.flops_per_token(plan.run.sequence) / 1e9:.3g}"
        )
    ratio = student_to_teacher(plan.student, plan.teacher, plan.run.sequence)
    models.add_row(
        "student / teacher",
        f"at {plan.run.sequence} tokens of context",
        f"{ratio['total']:.2f}×",
        f"{ratio['active']:.2f}×",
        f"{ratio['flops_per_token']:.2f}× (FFN only {ratio['ffn_flops_per_token']:.2f}×)",
    )
    return models


def _memory_table(plan: Plan) -> Table:
    """The table of memory per device: a row per component, a column per phase (MEMORY_PHASES), then
    the reserve and each phase's peak."""
    hw = plan.hardware
    unit, scale = ("GiB", GIB) if plan.peak >= 4 * GIB else ("MiB", 2**20)
    where = f"{hw.gpus} × {hw.memory_gib:g} GiB GPUs" if hw.device == "cuda" else f"CPU, {hw.memory_gib:.0f} GiB"
    memory = Table(title=f"Memory per {'GPU' if hw.device == 'cuda' else 'process'} ({unit}), {where}")
    memory.caption = MEMORY_CAPTION
    memory.add_column("component")
    for phase in MEMORY_PHASES:
        memory.add_column(TITLES[phase], justify="right")
    # components every phase holds none of (the GPU's share of offloaded state) are left out
    components = list(dict.fromkeys(c for parts in plan.memory.values() for c, v in parts.items() if v))
    for name in components:
        memory.add_row(name, *(_amount(plan.memory[p].get(name, 0.0), scale) for p in MEMORY_PHASES))
    reserve = hw.reserve_gib * GIB
    memory.add_row("reserve" if hw.device == "cuda" else "runtime", *([_amount(reserve, scale)] * len(MEMORY_PHASES)))
    peaks = [_amount(plan.peaks[p] + reserve, scale) for p in MEMORY_PHASES]
    memory.add_row("[bold]peak[/bold]", *(f"[bold]{peak}[/bold]" for peak in peaks))
    return memory


def _memory_lines(plan: Plan) -> list[str]:
    """The lines under the memory table: a vLLM server's GPUs, each command's --offload shards in CPU
    memory, and the machine's CPU memory where rank 0 holds the whole float32 student."""
    run, hw = plan.run, plan.hardware
    lines = []
    if run.rollout == "vllm-server":
        server = server_memory(plan.student, run, hw)
        lines.append(
            f"vLLM server on {run.server_gpus} of the {hw.gpus} GPUs ({run.vllm_share:g} of each): "
            f"{server['weights'] / GIB:.1f} GiB of the student's weights per GPU, "
            f"{vllm_kv_tokens(plan.student, run, hw):,.0f} tokens of KV cache; the trainers on the other "
            f"{run.trainers(hw.gpus)}"
        )
    for command, warmup in (("padd warmup", True), ("padd train", False)):
        processes = hw.gpus if warmup else run.trainers(hw.gpus)
        if run.offloaded(hw.gpus, warmup=warmup) and hw.device == "cuda":
            per = offloaded_bytes(plan.student, plan.student.experts if warmup else plan.student.total, processes)
            lines.append(
                f"{command} --offload: {per / GIB:.1f} GiB of shards per process in CPU memory, "
                f"{per * processes / GIB:.0f} GiB over its {processes}"
            )
    rank0 = {p: parts["whole student (rank 0)"] for p, parts in plan.host.items() if "whole student (rank 0)" in parts}
    if rank0:
        where = ", ".join(
            f"{TITLES[p]} {plan.host_peaks[p] / GIB:.0f} GiB ({rank0[p] / GIB:.1f} of them rank 0's whole float32 "
            "student)"
            for p in rank0
        )
        lines.append(f"CPU memory of the machine ({hw.host_memory_gib:.0f} GiB): {where}")
    return lines


def _time_table(plan: Plan) -> Table:
    """The table of time: a row per phase (TIME_PHASES) with its FLOPs per rollout batch, its time per
    batch and over the whole run, and its share of the run."""
    hw = plan.hardware
    time = Table(title=f"Time at MFU {hw.mfu:g}" + (f" of {hw.tflops:g} TFLOP/s" if hw.tflops else ""))
    for col in ("phase", "FLOP / batch", "per batch", "whole run", "share"):
        time.add_column(col, justify="left" if col == "phase" else "right")
    total = sum(plan.seconds.values())
    for phase in TIME_PHASES:
        per_batch = plan.seconds[phase] / plan.run.steps if phase in plan.step_flops else math.nan
        work = _flop(plan.step_flops[phase]) if phase in plan.step_flops else "-"
        share = "-" if math.isnan(total) or not total else f"{plan.seconds[phase] / total:.0%}"
        time.add_row(TITLES[phase], work, _duration(per_batch), _duration(plan.seconds[phase]), share)
    return time


def _whole_run_lines(plan: Plan) -> list[str]:
    """The lines on the whole run's time and GPU-hours, or on what the estimate needs when the
    device's rates are not known."""
    run, hw = plan.run, plan.hardware
    total = sum(plan.seconds.values())
    if math.isnan(total):
        return ["time: give --gpu-tflops and --bandwidth of this device to estimate it"]
    return [
        f"whole run: {_duration(plan.seconds['stage1'])} of Stage I on one device, then "
        f"{_duration(total - plan.seconds['stage1'])} on {hw.gpus}: [bold]{plan.gpu_hours:.1f} GPU-hours[/bold]",
        f"  ({run.steps} rollout batches of {run.prompts_per_step} × {run.group_size} completions, "
        f"{run.prompt_tokens} + {run.completion_tokens} tokens each)",
    ]


def _verdict_lines(plan: Plan, suggested: list[str]) -> list[str]:
    """The lines of the verdict (the peak against the memory per device), the settings to change
    (`suggested`) and the plan's notes."""
    hw = plan.hardware
    verdict = "fits" if plan.fits else "does not fit"
    lines = [
        f"peak {(plan.peak + hw.reserve_gib * GIB) / GIB:.1f} of {hw.memory_gib:.4g} GiB per device: "
        f"[bold]{verdict}[/bold]"
    ]
    lines += [f"first setting to change: {change}" if i == 0 else f"  {change}" for i, change in enumerate(suggested)]
    lines += [f"note: {note}" for note in plan.notes]
    return lines


def _gpu_hours_line(plan: Plan, target_gpu_hours: float) -> str:
    """The line on the MFU at which the plan takes `target_gpu_hours` GPU-hours, or that none does."""
    mfu = mfu_for_gpu_hours(plan, target_gpu_hours)
    if mfu is None:
        return f"no MFU reaches {target_gpu_hours:g} GPU-hours: the memory-bound phases alone take longer"
    return f"{target_gpu_hours:g} GPU-hours is this plan at an MFU of {mfu:.2f}"


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
    """The plan as JSON: models, settings, hardware, memory (GiB), a vLLM server's GPUs, the settings
    to change (`changes(plan)`) and seconds per phase."""
    run, hw = plan.run, plan.hardware
    server = None
    if run.rollout == "vllm-server":
        parts = server_memory(plan.student, run, hw)
        server = {
            "gpus": run.server_gpus,
            "memory_gib": {k: v / GIB for k, v in parts.items()},
            "kv_tokens": vllm_kv_tokens(plan.student, run, hw),
        }
    return {
        "teacher": {"source": plan.teacher.source, "total": plan.teacher.total, "active": plan.teacher.active},
        "student": {"source": plan.student.source, "total": plan.student.total, "active": plan.student.active},
        "student_to_teacher": student_to_teacher(plan.student, plan.teacher, plan.run.sequence),
        "run": asdict(plan.run),
        "hardware": asdict(plan.hardware),
        "memory_gib": {p: {k: v / GIB for k, v in parts.items()} for p, parts in plan.memory.items()},
        "peak_gib": {p: v / GIB + plan.hardware.reserve_gib for p, v in plan.peaks.items()},
        "host_memory_gib": {p: {k: v / GIB for k, v in parts.items()} for p, parts in plan.host.items()},
        "vllm_server": server,
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
