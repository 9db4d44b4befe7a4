"""The paper's two pairs (configs/study-*-to-*.yaml): each preset, as it is, runs seed -> warm-up ->
2 Phase B steps on random-weight models of the pair's architecture types at miniature sizes; only
the budgets shrink (tokens, steps, lengths) and what one process cannot run is overridden (BUDGET),
every other setting is the preset's."""

from pathlib import Path

import pytest

from helpers import save_moe_student
from padd.config import SeedConfig, TrainConfig, WarmupConfig
from padd.phase_b.loop import run_train
from padd.stage1.seed import run_seed
from padd.stage1.warmup import run_warmup
from padd.study import load_study
from padd.tiny import arithmetic_corpus, make_tiny_teacher

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# preset -> (teacher family, student model_type, the student's MoE features kept at miniature size)
PAIRS = {
    # Qwen3-30B-A3B: 128 experts top-8 (16:1), no shared expert, normalised top-K softmax weights
    "study-qwen2.5-math-7b-to-qwen3-30b-a3b.yaml": (
        "qwen2",
        "qwen3_moe",
        dict(num_experts=16, num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[]),
    ),
    # DeepSeek-V2-Lite: 64 experts top-6, 2 shared experts, the first layer dense, greedy softmax
    # routing without top-K normalisation, multi-head latent attention without a query LoRA
    "study-deepseek-math-7b-to-deepseek-v2-lite.yaml": (
        "llama",
        "deepseek_v2",
        dict(
            n_routed_experts=16,
            num_experts_per_tok=3,
            n_shared_experts=2,
            first_k_dense_replace=1,
            topk_method="greedy",
            n_group=1,
            topk_group=1,
            norm_topk_prob=False,
            routed_scaling_factor=1.0,
        ),
    ),
}
# The presets' memory options and rollout engine are those of 8 GPUs (docs/plan.md); in one process
# FSDP2's CPU offload is refused (it needs 2+ processes), a micro-batch of 8 does not divide the
# miniature mini-batch of 2 completions (1 does: two micro-batches per update), and the vLLM server
# is not here, so generate samples (no server address). Activation checkpointing runs as the presets
# set it.
ONE_PROCESS = {
    "warmup": dict(offload=False),
    "train": dict(offload=False, micro_batch_size=1, rollout="transformers", vllm_server_url=None),
}
BUDGET = {
    "seed": dict(tokens=1024, heldout_tokens=512, cka_tokens=256, seq_len=32, batch_size=4),
    "warmup": dict(tokens=512, seq_len=32, batch_size=4, **ONE_PROCESS["warmup"]),
    "train": dict(
        steps=2,
        prompts_per_step=2,
        group_size=2,
        max_new_tokens=6,
        world_per_skill=10,
        save_every=1,
        **ONE_PROCESS["train"],
    ),
}


@pytest.mark.parametrize("preset", sorted(PAIRS))
def test_the_paper_pair_preset_runs_at_miniature_size(preset, tmp_path):
    family, model_type, moe = PAIRS[preset]
    study = load_study(str(CONFIGS / preset))
    assert Path(study.student).name and study.seed and not study.decompose  # a pretrained student, seeded
    teacher = make_tiny_teacher(tmp_path / "teacher", family, texts=arithmetic_corpus(300), num_layers=3)
    student = save_moe_student(tmp_path / "student", model_type, teacher, num_hidden_layers=4, **moe)
    run_seed(
        SeedConfig(
            teacher=str(teacher),
            student=str(student),
            corpus="world",
            out=str(tmp_path / "seeded"),
            progress=False,
            **{**study.seed, **BUDGET["seed"]},
        )
    )
    run_warmup(
        WarmupConfig(
            teacher=str(teacher),
            student=str(tmp_path / "seeded"),
            corpus="world",
            out=str(tmp_path / "warm"),
            progress=False,
            **{**study.warmup, **BUDGET["warmup"]},
        )
    )
    # outside torchrun the preset's FSDP setting falls back to one process, as it does for a user
    run_train(
        TrainConfig(
            teacher=str(teacher),
            student=str(tmp_path / "warm"),
            data="world:add",
            out=str(tmp_path / "run"),
            method="padd",
            progress=False,
            **{**study.train, **study.methods["padd"], **BUDGET["train"]},
        )
    )
    assert (tmp_path / "run" / "student" / "config.json").exists()
