"""`padd plan`: parameter counts of the paper's models, FLOPs of latent attention, memory against
measured peaks and against the tensors autograd keeps, the memory options and a vLLM server as padd
runs them, the fit verdict and its first change, the paper pairs' presets, and the command on every
preset."""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from helpers import padd
from padd import flops
from padd.config import ConfigError, MemoryOptions, PlanConfig, load_config
from padd.plan.memory import offloaded_bytes, saved_bytes_per_token, weight_copies
from padd.plan.models import PlanError, load_model_config, measure_model
from padd.plan.report import changes, make_plan, mfu_for_gpu_hours, run_plan
from padd.plan.settings import GIB, resolve_plan
from padd.plan.timing import warmup_end_seconds

ROOT = Path(__file__).resolve().parent.parent


def shape_of(name: str):
    config, source = load_model_config(name)
    return measure_model(config, name, source)


@pytest.mark.parametrize(
    ("name", "total", "active", "active_without_input_embedding"),
    [
        # Qwen's model card: 30.5B total, 3.3B activated (embeddings counted)
        ("Qwen3-30B-A3B", 30.5e9, 3.3e9, False),
        # DeepSeek-V2's paper: 15.7B total, 2.4B activated; DeepSeek counts the output head and not
        # the input embedding (with it the count is 2.66B, without the head too 2.24B)
        ("DeepSeek-V2-Lite", 15.7e9, 2.4e9, True),
    ],
)
def test_paper_students_have_their_published_parameter_counts(name, total, active, active_without_input_embedding):
    """Built on the meta device from padd's bundled copies of their configs, no weights."""
    shape = shape_of(name)
    assert shape.total == pytest.approx(total, rel=0.02)
    embedding = shape.config.vocab_size * shape.config.hidden_size
    counted = shape.active - (embedding if active_without_input_embedding else 0)
    if name == "DeepSeek-V2-Lite":
        # 2.451B, published as 2.4B: truncated, 2.1% above it (no counting convention is within 2%)
        assert math.floor(counted / 1e8) == 24 and counted == pytest.approx(active, rel=0.025)
    else:
        assert counted == pytest.approx(active, rel=0.02)
    # padd.flops' analytic counts (latent attention included) agree with the built model exactly
    assert flops.param_counts(shape.config) == (shape.total, shape.active)


@pytest.mark.parametrize(("name", "total"), [("Qwen2.5-Math-7B", 7.62e9), ("deepseek-math-7b-instruct", 6.91e9)])
def test_paper_teachers_have_their_published_sizes(name, total):
    shape = shape_of(name)
    assert shape.total == pytest.approx(total, rel=0.005) and shape.active == shape.total and not shape.moe


def bench_plan():
    spec = importlib.util.spec_from_file_location("bench_plan", ROOT / "benchmarks" / "bench_plan.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("shape", "options"), [("tiny", ("plain", "memory")), ("mini", ("plain",))])
def test_cpu_memory_plan_is_within_a_quarter_of_the_logged_peaks(tmp_path, shape, options):
    """benchmarks/bench_plan.py on the world presets' shapes and Phase B settings, as the presets train
    (and on the tiny shape with micro-batches of 4 and activation checkpointing): every phase's
    predicted peak against the peak `padd train` logged for it."""
    results = bench_plan().compare(shape, tmp_path, steps=2, options=options)
    for options, result in results.items():
        for phase, (predicted, measured) in result.items():
            assert predicted == pytest.approx(measured, rel=0.25), (options, phase, predicted, measured)
    # the Python runtime is most of these small runs' memory: what the update adds over the generate
    # phase (activations, logits and their gradients) is checked on its own, free of it
    result = results["plain"]
    grows = {kind: result["update"][i] - result["generation"][i] for i, kind in enumerate(("predicted", "measured"))}
    assert grows["predicted"] == pytest.approx(grows["measured"], rel=0.3), grows


@pytest.mark.slow
def test_cpu_memory_plan_of_fsdp2_offload_is_within_a_quarter_of_rank_0s_logged_peaks(tmp_path):
    """The same on the tiny shape under FSDP2 on 2 gloo processes with --offload, micro-batches and
    activation checkpointing on: rank 0's logged peaks against the plan of 2 processes."""
    results = bench_plan().compare("tiny", tmp_path, steps=2, options=("offload",))
    for phase, (predicted, measured) in results["offload"].items():
        assert predicted == pytest.approx(measured, rel=0.25), (phase, predicted, measured)


def _saved_per_token(cfg, precision: str, checkpointing: bool) -> tuple[float, float]:
    """(bytes per token, bytes independent of the tokens) autograd keeps from a training forward of
    `cfg` on this CPU, as padd trains (float32 routers, experts in the autocast dtype): from forwards
    of two lengths."""
    import torch
    from transformers import AutoModelForCausalLM

    from padd.memory import enable_activation_checkpointing
    from padd.precision import experts_in_autocast_dtype, routers_in_fp32

    def kept(length: int) -> int:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg)
        routers_in_fp32(model)
        experts_in_autocast_dtype(model)
        if checkpointing:
            enable_activation_checkpointing(model)
        model.train()
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        storages = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in weights:
                storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        ids = torch.randint(0, cfg.vocab_size, (2, length))
        autocast = torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16")
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
            model.model(input_ids=ids)  # the layers and the final norm; the head's logits are counted apart
        return sum(storages.values())

    short, long = kept(128), kept(256)
    per_token = (long - short) / (2 * 128)
    return per_token, short - per_token * 2 * 128


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("model_type", ["qwen3_moe", "glm4_moe"])
def test_saved_activations_and_weight_copies_are_what_autograd_keeps(model_type, precision):
    """Per token within 10% of the tensors a training forward saves; under bf16 autocast's bfloat16
    copy of every matmul weight (2 B each), kept for the backward; under activation checkpointing
    only each layer's input and the final norm."""
    from transformers import Glm4MoeConfig, Qwen3MoeConfig

    common = dict(
        hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts_per_tok=4, vocab_size=128,
    )  # fmt: skip
    if model_type == "qwen3_moe":
        cfg = Qwen3MoeConfig(num_experts=8, **common)
    else:
        cfg = Glm4MoeConfig(
            n_routed_experts=8, n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1, **common
        )
    shape = measure_model(cfg, model_type, "test")
    per_token, fixed = _saved_per_token(cfg, precision, checkpointing=False)
    assert saved_bytes_per_token(cfg, precision)[0] == pytest.approx(per_token, rel=0.1)
    bf16 = precision == "bf16"
    assert weight_copies(shape, precision, checkpointing=False) == (2 * shape.matmul if bf16 else 0)
    # the forward measured runs no output head
    assert fixed == pytest.approx(2 * (shape.matmul - shape.head) if bf16 else 0, rel=0.02, abs=2**16)
    per_token, _ = _saved_per_token(cfg, precision, checkpointing=True)
    assert per_token == pytest.approx(4 * cfg.hidden_size * cfg.num_hidden_layers + 8 * cfg.hidden_size, rel=0.1)


def plan_of(**flags):
    return make_plan(*resolve_plan(load_config(PlanConfig, flags)))


QWEN = str(ROOT / "configs" / "study-qwen2.5-math-7b-to-qwen3-30b-a3b.yaml")
DEEPSEEK = str(ROOT / "configs" / "study-deepseek-math-7b-to-deepseek-v2-lite.yaml")
PAPER_GPU_HOURS = 24  # the paper's PADD on 8 × H100 for the Qwen student


def test_the_deepseek_pair_fits_8_gpus_with_the_memory_options_and_a_vllm_server():
    plan = plan_of(study=DEEPSEEK)
    run = plan.run
    # the preset's warmup: and train: sections: padd train's and padd warmup's memory options, and
    # the rollouts on a server on 4 of the 8 GPUs (its share of them in the plan: section)
    assert (run.micro_batch, run.checkpointing, run.offload) == (8, True, True)
    assert (run.warmup_checkpointing, run.warmup_offload) == (True, False)
    assert (run.rollout, run.server_gpus, run.trainers(plan.hardware.gpus)) == ("vllm-server", 4, 4)
    assert plan.fits and changes(plan) == []
    # loaded shard by shard, never whole: padd warmup's load (the larger: its student not offloaded) holds
    # an eighth of the bf16 teacher and of the float32 student, and one tensor
    load = plan.memory["load"]
    assert load["teacher"] == 2 * plan.teacher.total / 8 and load["student weights"] == 4 * plan.student.total / 8
    assert load["tensor read"] == 4 * max(plan.student.largest_tensor, plan.teacher.largest_tensor)
    # the warm-up's end gathers the whole student into rank 0's CPU memory: a GPU holds its shards
    # (not offloaded in this warm-up) and the tensor being gathered
    student = plan.student
    assert plan.memory["warmup_end"] == {
        "student weights": 4 * student.total / 8,
        "tensor gathered": 4 * student.largest_tensor,
    }
    assert plan.host["warmup_end"] == {"offloaded shards": 0.0, "whole student (rank 0)": 4 * student.total}
    # offloaded: no weights, gradients or AdamW state on the GPUs, no foreach temporaries
    assert not plan.memory["backward"]["AdamW state"] and "AdamW temps" not in plan.memory["step"]
    # the largest phase is now the warm-up's own, no longer the push
    assert max(plan.peaks, key=plan.peaks.get) == "warmup"
    # the same order as the paper's 24 GPU-hours (its DeepSeek budget is not given): 2-10 times it
    assert 2 * PAPER_GPU_HOURS < plan.gpu_hours < 10 * PAPER_GPU_HOURS


def test_the_qwen_pair_fits_8_gpus_now_that_no_gpu_holds_the_whole_float32_student():
    """The warm-up's end keeps the whole float32 student (114 GiB) in rank 0's CPU memory, and the
    push to the vLLM server gathers it tensor by tensor into rank 0's CPU memory: every phase fits,
    the largest being Stage I's 76 GiB on one GPU."""
    plan = plan_of(study=QWEN)
    run, student = plan.run, plan.student
    assert (run.warmup_checkpointing, run.warmup_offload) == (True, True)
    assert (run.micro_batch, run.checkpointing, run.offload, run.rollout) == (8, True, True, "vllm-server")
    assert plan.fits and changes(plan) == []
    assert max(plan.peaks, key=plan.peaks.get) == "stage1"
    assert (plan.peak + plan.hardware.reserve_gib * GIB) / GIB == pytest.approx(76.2, abs=0.05)
    whole, tensor = 4 * student.total, 4 * student.largest_tensor
    # on a GPU: no shards (offloaded) and the one tensor being gathered, at the warm-up's end and the push
    assert plan.memory["warmup_end"] == {"tensor gathered": tensor} and tensor < 2 * GIB < whole
    assert plan.memory["step"]["tensor gathered"] == tensor and "weights for vLLM" not in plan.memory["step"]
    # in the machine's CPU memory: rank 0's whole copy beside the offloaded shards
    assert plan.host["warmup_end"] == {"offloaded shards": whole, "whole student (rank 0)": whole}
    assert plan.host["push"] == {"offloaded shards": 16 * student.total, "whole student (rank 0)": whole}
    assert plan.host_peaks["push"] == max(plan.host_peaks.values()) < plan.hardware.host_memory_gib * GIB
    # in the same order as the paper's 24 GPU-hours
    assert 2 * PAPER_GPU_HOURS < plan.gpu_hours < 10 * PAPER_GPU_HOURS


def test_a_colocated_engine_still_gathers_the_whole_student_on_every_rank():
    """Only the push to a server goes tensor by tensor to rank 0's host; the sync to a colocated
    engine (and so its GPU memory) is unchanged."""
    plan = plan_of(study=DEEPSEEK, rollout="vllm", server_gpus=None)
    assert plan.memory["step"]["weights for vLLM"] == 4 * plan.student.total
    assert "push" not in plan.host_peaks or not plan.host["push"]


def test_a_sleeping_colocated_engine_holds_its_memory_only_while_it_samples():
    """--vllm-sleep: the engine's share is in the generate phase alone; the trainer's forwards,
    backward and step run without it, and the weight sync adds the engine's woken weights."""
    awake = plan_of(study=DEEPSEEK, rollout="vllm", server_gpus=None)
    asleep = plan_of(study=DEEPSEEK, rollout="vllm", server_gpus=None, vllm_sleep=True)
    engine = awake.memory["generation"]["vLLM engine"]
    assert asleep.memory["generation"]["vLLM engine"] == engine > 0
    for phase in ("student", "teacher", "backward"):
        assert "vLLM engine" in awake.memory[phase] and "vLLM engine" not in asleep.memory[phase]
        assert asleep.peaks[phase] == pytest.approx(awake.peaks[phase] - engine)
    woken = asleep.memory["step"]["vLLM weights (awake)"]
    assert woken == 2 * asleep.student.total  # bf16, without the KV cache
    assert asleep.peaks["step"] == pytest.approx(awake.peaks["step"] - engine + woken)


def test_the_router_start_after_an_fsdp2_warmup_runs_on_rank_0s_cpu():
    """After the whole student is gathered into rank 0's CPU memory (over the interconnect, then rank
    0's GPU-to-CPU link), the kept start's fit report is a forward over router_tokens tokens there, at
    the host's modest rate: small beside the warm-up."""
    plan = plan_of(study=QWEN)
    run, hw, student = plan.run, plan.hardware, plan.student
    assert (run.warmup_router_init, run.router_tokens) == ("keep", 4096)
    forward = student.flops_per_token(run.warmup_seq_len) * 4096 / (hw.host_tflops * 1e12)
    whole = 4 * student.total
    gather = (
        whole * 7 / 8 / (hw.link_gbs * 1e9) + whole / (hw.host_link_gbs * 1e9) + whole / 8 / (hw.host_link_gbs * 1e9)
    )
    at_mfu = lambda work: work / (hw.tflops * 1e12 * hw.mfu)  # noqa: E731
    assert warmup_end_seconds(student, run, hw, at_mfu) == pytest.approx(gather + forward)
    assert 10 < forward < 60 and gather + forward < plan.seconds["warmup"] / 4
    # unsharded, the start's forward runs on the device at the MFU
    ddp = replace(run, warmup_parallel="ddp", warmup_offload=False)
    assert warmup_end_seconds(student, ddp, hw, at_mfu) == pytest.approx(
        forward * hw.host_tflops * 1e12 / (hw.tflops * 1e12 * hw.mfu)
    )


def test_the_memory_options_lower_memory_as_modelled():
    """--micro-batch-size divides the activations and logits by the micro-batches, --activation-
    checkpointing keeps each layer's input and one layer's weight copies, --offload moves the float32
    state to CPU memory; each costs time (more gathers and copies, a recomputed forward, the copies
    and a CPU step)."""
    flags = dict(study=DEEPSEEK, rollout="transformers", server_gpus=None, activation_checkpointing=False)
    flags |= dict(offload=False, micro_batch_size=32)
    whole = plan_of(**flags)  # 8 trainers: each rank's mini-batch is 32 completions
    micro = plan_of(**flags | dict(micro_batch_size=4))
    for part in ("activations", "teacher logits"):
        assert micro.memory["backward"][part] == pytest.approx(whole.memory["backward"][part] / 8)
    assert micro.memory["backward"]["logits"] < whole.memory["backward"]["logits"] / 4  # all but the KD chunk
    assert micro.run.forwards(8)["train"] == 8 * whole.run.forwards(8)["train"] == 16
    # padd's Γ running mean (the preset's): a no-grad forward of each micro-batch measures Γ first
    assert micro.run.forwards(8)["gamma"] == 16 and whole.run.forwards(8)["gamma"] == 0
    assert micro.seconds["student"] > whole.seconds["student"]
    # FSDP2 gathers every layer for each micro-batch's forward and backward: hidden behind the compute
    # at 4 sequences, not at 1
    assert (
        micro.seconds["update"]
        == whole.seconds["update"]
        < plan_of(**flags | dict(micro_batch_size=1)).seconds["update"]
    )

    ckpt = plan_of(**flags | dict(activation_checkpointing=True))
    cfg, student = ckpt.student.config, ckpt.student
    tokens = 32 * ckpt.run.sequence
    layers = 4 * cfg.hidden_size * cfg.num_hidden_layers + 8 * cfg.hidden_size
    assert ckpt.memory["backward"]["activations"] == tokens * (layers + saved_bytes_per_token(cfg, "bf16")[1])
    assert ckpt.memory["backward"]["weight copies"] == 2 * (student.largest_layer_matmul + student.head)
    assert (
        whole.memory["backward"]["weight copies"] == 2 * student.matmul > 10 * ckpt.memory["backward"]["weight copies"]
    )
    assert ckpt.step_flops["update"] == pytest.approx(1.5 * whole.step_flops["update"])  # a forward recomputed

    off = plan_of(**flags | dict(offload=True))
    for part in ("student weights", "gradients", "AdamW state"):
        assert whole.memory["backward"][part] > 0 and off.memory["backward"][part] == 0
    assert "AdamW temps" in whole.memory["step"] and "AdamW temps" not in off.memory["step"]
    assert off.peaks["backward"] < whole.peaks["backward"] - 25 * GIB
    assert offloaded_bytes(student, student.total, 8) == (16 * student.total) / 8
    assert off.seconds["update"] > whole.seconds["update"]
    # the warm-up's own options
    warm = plan_of(**flags, warmup_micro_batch_size=2)
    assert warm.memory["warmup"]["activations"] == pytest.approx(whole.memory["warmup"]["activations"] / 4)


def test_the_first_change_names_padds_memory_flags():
    """The DeepSeek preset without its memory options does not fit; the fastest set that does is
    named as padd's own flags, per command."""
    plan = plan_of(study=DEEPSEEK, activation_checkpointing=False, offload=False, micro_batch_size=64)
    assert not plan.fits
    (change,) = changes(plan)
    assert change == (
        "padd warmup --activation-checkpointing; padd train --micro-batch-size 8 --activation-checkpointing "
        "--offload: the same update in less memory"
    )


def test_a_vllm_server_decodes_on_its_own_gpus_and_the_trainers_share_the_rest():
    flags = dict(study=DEEPSEEK)
    plan = plan_of(**flags)
    four = plan_of(**flags, rollout="transformers", server_gpus=None, gpus=4)  # the trainers alone
    # the trainers' memory is that of 4 GPUs training alone; the server's GPUs hold the engine
    assert plan.memory["backward"] == four.memory["backward"]
    # decoding on the server, not on the sharded student: no gather per token
    assert plan.seconds["generation"] < four.seconds["generation"] / 10
    # more server GPUs decode faster (tensor parallel), over the same trainers' share
    assert plan_of(**flags, gpus=12, server_gpus=8).seconds["generation"] < plan.seconds["generation"]
    # every GPU is paid for, the server's too
    rest = sum(v for k, v in plan.seconds.items() if k != "stage1")
    assert plan.gpu_hours == pytest.approx((plan.seconds["stage1"] + 8 * rest) / 3600)
    # a share that cannot hold the student's bf16 weights and one sequence: the server cannot start
    small = plan_of(**flags, vllm_gpu_memory=0.05)
    assert not small.fits and "cannot start" in small.blocked
    with pytest.raises(PlanError, match="does not split over the 3 trainer GPUs"):
        plan_of(**flags, server_gpus=5)


def test_first_change_is_sharding_when_only_ddp_overflows():
    flags = dict(teacher="tiny", experts=8, top_k=4, gpus=4, parallel="ddp", prompts_per_step=8, reserve=0.0)
    ddp, fsdp = plan_of(**flags), plan_of(**{**flags, "parallel": "fsdp"})
    assert fsdp.peak < ddp.peak
    between = (fsdp.peak + ddp.peak) / 2 / GIB
    plan = plan_of(**flags, gpu_memory=f"{between}GiB")
    assert not plan.fits and changes(plan)[0].startswith("--parallel fsdp")
    assert changes(plan_of(**{**flags, "parallel": "fsdp"}, gpu_memory=str(between))) == []


def test_a_smaller_vllm_share_is_offered_before_more_gpus():
    """The engine's 0.95 share of a 16 GiB GPU leaves the trainer too little: the largest share that
    fits (0.9) is named, not more GPUs."""
    flags = dict(teacher="mini", experts=8, top_k=4, rollout="vllm", gpu_memory="16", reserve=0.0)
    plan = plan_of(**flags, vllm_gpu_memory=0.95)
    assert plan.memory["step"]["vLLM engine"] == pytest.approx(0.95 * 16 * GIB) and not plan.fits
    (change,) = changes(plan)
    assert change.startswith("--vllm-gpu-memory")
    assert change.startswith("--vllm-gpu-memory 0.9:") and plan_of(**flags, vllm_gpu_memory=0.9).fits


def test_mfu_for_gpu_hours_inverts_the_plan():
    plan = plan_of(teacher="mini", experts=8, top_k=4, steps=50, mfu=0.3, reserve=0.0)
    assert mfu_for_gpu_hours(plan, plan.gpu_hours) == pytest.approx(0.3, rel=1e-3)
    # a lower MFU costs more hours
    assert plan_of(teacher="mini", experts=8, top_k=4, steps=50, mfu=0.15, reserve=0.0).gpu_hours > plan.gpu_hours


def test_bf16_times_every_matmul_at_the_bf16_rate():
    """padd computes the routed experts in bf16 too (padd.precision.experts_in_autocast_dtype): one
    GPU's training phases are their FLOPs at the MFU of the bf16 peak."""
    flags = dict(student="Qwen3-30B-A3B", teacher="Qwen2.5-Math-7B", steps=10, precision="bf16")
    plan = plan_of(**flags)
    rate = 989e12 * 0.4
    for phase in ("teacher", "student"):
        assert plan.seconds[phase] == pytest.approx(10 * plan.step_flops[phase] / rate)
    assert not any("float32" in note for note in plan.notes)


@pytest.mark.parametrize("preset", ["tiny", "mini", "tiny-pretrained", "tiny-paper"])
def test_padd_plan_prints_the_tables_for_the_world_presets(tmp_path, preset, capsys):
    out = tmp_path / "plan.json"
    assert padd("plan", config=preset, reserve=0.4, out=out) == 0
    printed = capsys.readouterr().out
    for heading in ("Models", "Memory per process", "Time", "fits"):
        assert heading in printed
    plan = json.loads(out.read_text())
    assert plan["hardware"]["device"] == "cpu"
    phases = {"load", "stage1", "warmup", "warmup_end", "generation", "teacher", "student", "backward", "step"}
    assert set(plan["peak_gib"]) == phases
    assert plan["run"]["stage1"] == ("seed" if preset.startswith("tiny-p") else "decompose")
    assert "student / teacher" in printed


def test_the_tiny_paper_pair_is_in_the_papers_regime(tmp_path, capsys):
    """Its two shipped models, built from their configs on the meta device: at least 2x the teacher's
    parameters and 0.40-0.55x its FLOPs per token (the paper's student: 0.47x), as padd plan prints."""
    out = tmp_path / "plan.json"
    assert padd("plan", config="tiny-paper", out=out) == 0
    printed = capsys.readouterr().out
    ratio = json.loads(out.read_text())["student_to_teacher"]
    assert ratio["total"] >= 2 and ratio["active"] < 1
    assert 0.40 <= ratio["flops_per_token"] <= 0.55
    assert ratio["ffn_flops_per_token"] < ratio["flops_per_token"]  # attention is not decompressed
    assert f"{ratio['flops_per_token']:.2f}× (FFN only {ratio['ffn_flops_per_token']:.2f}×)" in printed


@pytest.mark.parametrize("study", [QWEN, DEEPSEEK])
def test_padd_plan_reads_the_paper_pair_presets_without_weights(study, tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert padd("plan", config=study, match_gpu_hours=24, out=out) == 0
    printed = capsys.readouterr().out
    assert "padd's copy of" in printed and "GPU-hours" in printed and "vLLM server on 4 of the 8 GPUs" in printed
    assert "--offload: " in printed  # the offloaded state's CPU memory
    assert "CPU memory of the machine (2048 GiB): warm-up end" in printed  # rank 0's whole copy there
    written = json.loads(out.read_text())
    assert written["vllm_server"]["gpus"] == 4 and written["fits"]
    assert written["host_memory_gib"]["push"]["whole student (rank 0)"] > 50


def _memory_options_error(**options) -> str:
    """What padd train says of these memory options (padd.config.MemoryOptions.check_memory_options)."""
    batch, processes = options.pop("batch"), options.pop("processes")
    parallel = options.pop("parallel")
    given = MemoryOptions(**options)
    given.parallel = parallel
    with pytest.raises(ConfigError) as err:
        given.check_memory_options(batch, "each rank's mini-batch of completions", processes)
    return str(err.value)


@pytest.mark.parametrize(
    ("flags", "padd_train"),
    [
        (dict(offload=True, parallel="ddp", gpus=2), dict(offload=True, parallel="ddp", batch=16, processes=2)),
        (dict(offload=True, parallel="fsdp"), dict(offload=True, parallel="fsdp", batch=16, processes=1)),
        (dict(micro_batch_size=3), dict(micro_batch_size=3, parallel="ddp", batch=16, processes=1)),
    ],
    ids=["offload-without-fsdp", "offload-in-one-process", "micro-batch-not-dividing"],
)
def test_bad_memory_options_give_padd_trains_own_error(flags, padd_train, capsys):
    """padd train's check comes first (the flags set both commands' options): its words, exactly."""
    base = dict(teacher="tiny", experts=8, top_k=4, reserve=0.0, prompts_per_step=8, group_size=4)
    assert padd("plan", **base, **flags) == 2
    assert capsys.readouterr().err.strip().endswith(_memory_options_error(**padd_train))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (dict(teacher="no/such/model"), "no config.json there"),
        (dict(teacher="tiny", experts=7, top_k=2), "--experts 7 does not divide"),
        (dict(teacher="tiny", experts=8, top_k=4, gpu_memory="eighty"), "--gpu-memory 'eighty'"),
        (dict(teacher="tiny", experts=8, top_k=4, vllm_gpu_memory=0.3), "only acts with --rollout vllm"),
        (dict(teacher="tiny", experts=8, top_k=4, server_gpus=2), "only acts with --rollout vllm-server"),
        (dict(teacher="tiny", experts=8, top_k=4, vllm_sleep=True), "--vllm-sleep only acts with --rollout vllm"),
        (dict(teacher="tiny", experts=8, top_k=4, gpus=2, rollout="vllm-server"), "give --server-gpus N"),
        (dict(teacher="tiny", experts=8, top_k=4, gpus=2, rollout="vllm-server", server_gpus=2), "--server-gpus 2"),
        (dict(teacher="tiny", experts=8, top_k=4, micro_batch_size=2, updates_per_batch=3), "of equal size"),
        (dict(teacher="tiny"), "needs --experts and --top-k"),
        (dict(teacher="tiny", student="tiny"), "not an MoE student"),
        (dict(teacher="tiny", experts=8, top_k=4, completion_tokens=999), "exceeds the budget"),
        (dict(teacher="tiny", experts=8, top_k=4, gpus=0, device="cpu"), "--gpus 0: give at least 1"),
        (dict(teacher="tiny", experts=8, top_k=4, mfu=1.5), "--mfu 1.5"),
        (dict(config="no-such-study.yaml"), "no such file; give a study YAML"),
    ],
)
def test_bad_plan_input_says_what_to_do(flags, message, capsys):
    assert padd("plan", reserve=0.0, **flags) == 2
    assert message in capsys.readouterr().err


def test_a_study_plan_section_is_checked(tmp_path):
    study = tmp_path / "study.yaml"
    study.write_text("teacher: tiny\ndecompose: {experts: 8, top_k: 4}\nplan: {gpus: 2, warp_speed: 9}\n")
    with pytest.raises(Exception, match="plan cannot set"):
        run_plan(PlanConfig(study=str(study), reserve=0.0))


def test_config_json_and_folder_load_alike(tmp_path, llama_teacher):
    config = json.loads((llama_teacher / "config.json").read_text())
    (tmp_path / "teacher.json").write_text(json.dumps(config))
    from_json, _ = load_model_config(str(tmp_path / "teacher.json"))
    from_folder, _ = load_model_config(str(llama_teacher))
    assert flops.param_counts(from_json) == flops.param_counts(from_folder)
    with pytest.raises(PlanError, match="model_type"):
        (tmp_path / "bad.json").write_text("{}")
        load_model_config(str(tmp_path / "bad.json"))


def test_activation_checkpointing_keeps_less_for_the_backward():
    flags = dict(teacher="mini", experts=8, top_k=4, reserve=0.0, device="cpu")
    plan, ckpt = plan_of(**flags), plan_of(**flags, activation_checkpointing=True)
    assert ckpt.memory["backward"]["activations"] < plan.memory["backward"]["activations"] / 2
    assert ckpt.run.checkpointing and ckpt.run.warmup_checkpointing  # both commands'
    assert ckpt.memory["warmup"]["activations"] < plan.memory["warmup"]["activations"] / 2


def test_a_vllm_share_that_cannot_hold_the_engine_does_not_fit_and_a_larger_one_is_offered():
    plan = plan_of(
        teacher="mini", experts=8, top_k=4, rollout="vllm", vllm_gpu_memory=0.01, gpu_memory="4", reserve=0.0
    )
    assert plan.peak < 4 * GIB and not plan.fits and "cannot start" in plan.blocked
    assert changes(plan)[0].startswith("--vllm-gpu-memory 0.4")


def test_the_warmup_batch_is_per_rank_and_gpu_counts_follow_padd_trains_rule():
    flags = dict(teacher="mini", experts=8, top_k=4, reserve=0.0, parallel="fsdp", prompts_per_step=8)
    one, four = plan_of(**flags), plan_of(**flags, gpus=4)
    # each rank trains batch_size windows per step: the warm-up's activations do not shrink with GPUs
    assert four.memory["warmup"]["activations"] == one.memory["warmup"]["activations"]
    # Phase B's rollout batch is split: a quarter of the sequences per GPU
    assert four.memory["backward"]["activations"] == pytest.approx(one.memory["backward"]["activations"] / 4)
    with pytest.raises(PlanError, match="does not split over 3 GPUs"):
        plan_of(**flags, gpus=3)


def test_the_vllm_engine_must_hold_its_whole_context_to_start():
    """padd's engine length is 2048 prompt tokens + the budget (within the model's context), longer
    than the rollout batch's own sequences; the share must hold its KV cache."""
    flags = dict(teacher="Qwen2.5-Math-7B", experts=64, top_k=8, gpus=8, parallel="fsdp", precision="bf16")
    plan = plan_of(**flags, rollout="vllm", max_new_tokens=2048, prompt_tokens=128)
    assert plan.run.vllm_length == 4096 > plan.run.sequence


def test_no_mfu_is_named_without_the_devices_flops():
    plan = plan_of(teacher="tiny", experts=8, top_k=4, device="cpu", reserve=0.0)
    assert math.isnan(plan.gpu_hours) and mfu_for_gpu_hours(plan, 1.0) is None
