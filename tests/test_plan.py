"""`padd plan`: parameter counts of the paper's models, FLOPs of latent attention, memory against
measured peaks, the fit verdict and its first change, and the command on every preset."""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from helpers import padd
from padd import flops
from padd.config import PlanConfig, load_config
from padd.plan.models import PlanError, load_model_config, measure_model
from padd.plan.report import changes, make_plan, mfu_for_gpu_hours, run_plan
from padd.plan.settings import GIB, resolve_plan

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


@pytest.mark.parametrize("shape", ["tiny", "mini"])
def test_cpu_memory_plan_is_within_a_quarter_of_the_logged_peaks(tmp_path, shape):
    """benchmarks/bench_plan.py on the world presets' shapes and Phase B settings: every phase's
    predicted peak against the peak `padd train` logged for it."""
    result = bench_plan().compare(shape, tmp_path, steps=2)
    for phase, (predicted, measured) in result.items():
        assert predicted == pytest.approx(measured, rel=0.25), (phase, predicted, measured)
    # the Python runtime is most of these small runs' memory: what the update adds over the generate
    # phase (activations, logits and their gradients) is checked on its own, free of it
    grows = {kind: result["update"][i] - result["generation"][i] for i, kind in enumerate(("predicted", "measured"))}
    assert grows["predicted"] == pytest.approx(grows["measured"], rel=0.3), grows


def plan_of(**flags):
    return make_plan(*resolve_plan(load_config(PlanConfig, flags)))


def test_the_paper_pair_does_not_fit_8_gpus_and_names_what_would():
    plan = plan_of(study=str(ROOT / "configs" / "study-qwen2.5-math-7b-to-qwen3-30b-a3b.yaml"))
    assert plan.hardware.gpus == 8 and plan.run.parallel == "fsdp" and not plan.fits
    # a 32-sequence mini-batch of 2304 tokens: every layer's activations and [n, C, 151936] logits
    assert plan.memory["backward"]["activations"] > 500 * GIB
    # no setting of padd's own fits it, on up to 128 GPUs; micro-batches, checkpointing and AdamW
    # state in CPU memory would, on these 8
    (suggested,) = changes(plan)
    assert "gradient accumulation" in suggested and "AdamW state in CPU memory" in suggested
    assert "GPUs" not in suggested
    # the student's float32 training state, sharded over 8 GPUs: 16 B per parameter / 8
    assert plan.memory["backward"]["AdamW state"] == pytest.approx(8 * plan.student.total / 8)
    # loading: the whole float32 student on every GPU before FSDP2 shards it, more than a GPU holds
    assert plan.memory["load"]["student weights"] == 4 * plan.student.total > 80 * GIB


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


def test_bf16_times_the_students_experts_at_the_float32_rate():
    flags = dict(student="Qwen3-30B-A3B", teacher="Qwen2.5-Math-7B", gpus=8, parallel="fsdp", steps=10)
    flags |= dict(prompts_per_step=64, group_size=8, max_new_tokens=2048)  # compute-bound, not link-bound
    bf16 = plan_of(**flags, precision="bf16")
    assert any("experts run in float32" in note for note in bf16.notes)
    faster = plan_of(**flags, precision="bf16", gpu_tflops_fp32=989.0)

    def training(plan):
        return plan.seconds["student"] + plan.seconds["update"]

    assert training(faster) < training(bf16)


@pytest.mark.parametrize("preset", ["tiny", "mini", "tiny-pretrained"])
def test_padd_plan_prints_the_tables_for_the_world_presets(tmp_path, preset, capsys):
    out = tmp_path / "plan.json"
    assert padd("plan", config=preset, reserve=0.4, out=out) == 0
    printed = capsys.readouterr().out
    for heading in ("Models", "Memory per process", "Time", "fits"):
        assert heading in printed
    plan = json.loads(out.read_text())
    assert plan["hardware"]["device"] == "cpu"
    assert set(plan["peak_gib"]) == {"load", "stage1", "warmup", "generation", "teacher", "student", "backward", "step"}
    assert plan["run"]["stage1"] == ("seed" if preset == "tiny-pretrained" else "decompose")


@pytest.mark.parametrize(
    "study", ["study-qwen2.5-math-7b-to-qwen3-30b-a3b.yaml", "study-deepseek-math-7b-to-deepseek-v2-lite.yaml"]
)
def test_padd_plan_reads_the_paper_pair_presets_without_weights(study, capsys):
    assert padd("plan", config=ROOT / "configs" / study, match_gpu_hours=24) == 0
    printed = capsys.readouterr().out
    assert "padd's copy of" in printed and "GPU-hours" in printed and "first setting to change" in printed


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (dict(teacher="no/such/model"), "no config.json there"),
        (dict(teacher="tiny", experts=7, top_k=2), "--experts 7 does not divide"),
        (dict(teacher="tiny", experts=8, top_k=4, gpu_memory="eighty"), "--gpu-memory 'eighty'"),
        (dict(teacher="tiny", experts=8, top_k=4, vllm_gpu_memory=0.3), "only acts with --rollout vllm"),
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


def test_checkpointing_what_if_keeps_less_for_the_backward():
    flags = dict(teacher="mini", experts=8, top_k=4, reserve=0.0)
    plan = plan_of(**flags)
    ckpt = make_plan(plan.teacher, plan.student, replace(plan.run, checkpointing=True), plan.hardware)
    assert ckpt.memory["backward"]["activations"] < plan.memory["backward"]["activations"] / 2


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
