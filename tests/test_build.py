"""docs/method.md §2 invariants: exact decompression, unbiased start, exact sizes, standard checkpoint."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from padd.routing import UniformRandomRouting
from padd.stage1.build import LayerPlan, TeacherError, build_student, validate_teacher
from padd.stage1.partition import plan_layer
from padd.tiny import make_tiny_teacher


def random_plans(d_ff, n_layers, n_experts, seed=0, shared=0, expert_size=None, init="random"):
    g = torch.Generator().manual_seed(seed)
    feats = torch.rand(d_ff, 8, generator=g)
    size = expert_size or (d_ff - shared) // n_experts
    return [
        plan_layer(
            feats,
            torch.rand(d_ff, generator=g),
            d_ff=d_ff,
            n_experts=n_experts,
            expert_size=size,
            shared=shared,
            init=init,
            seed=seed + i,
        )
        for i in range(n_layers)
    ]


def all_experts(student):
    """The same student with top-k = E (every expert selected, unit weights)."""
    for layer in student.model.layers:
        if hasattr(layer.mlp, "gate"):
            layer.mlp.gate.top_k = layer.mlp.gate.num_experts
    return student


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def logit_gap(a, b, vocab):
    ids = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return float((a(ids).logits - b(ids).logits).abs().max())


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "qwen3"])
def test_exact_decompression_all_experts(tmp_path, family, corpus_lines):
    teacher = load(make_tiny_teacher(tmp_path / "t", family, texts=corpus_lines[:200], bias_std=0.2))
    student = build_student(teacher, random_plans(128, 2, 4), top_k=4)
    assert logit_gap(teacher, student, teacher.config.vocab_size) <= 1e-4


def test_saved_student_is_a_standard_checkpoint(tmp_path, qwen2_teacher):
    teacher = load(qwen2_teacher)
    assert teacher.model.layers[0].self_attn.q_proj.bias.abs().sum() > 0
    student = build_student(teacher, random_plans(128, 2, 8), top_k=8)
    student.save_pretrained(tmp_path / "s")
    cfg = AutoConfig.from_pretrained(tmp_path / "s")
    assert cfg.model_type == "glm4_moe" and cfg.first_k_dense_replace == 0 and cfg.use_qk_norm is False
    assert cfg.rope_parameters["partial_rotary_factor"] == 1.0
    reloaded = load(tmp_path / "s")  # no trust_remote_code anywhere
    assert type(reloaded).__name__ == "Glm4MoeForCausalLM"
    assert logit_gap(teacher, reloaded, cfg.vocab_size) <= 1e-4


@pytest.mark.parametrize(
    "kwargs", [{"shared": 32}, {"expert_size": 40}, {"shared": 16, "expert_size": 48}, {"init": "copy"}]
)
def test_exactness_survives_shared_growth_and_copy(llama_teacher, kwargs):
    teacher = load(llama_teacher)
    init = kwargs.pop("init", "cluster")
    plans = random_plans(128, 2, 4, init=init, **kwargs)
    sizes = {len(e) for p in plans for e in p.experts}
    assert len(sizes) == 1
    student = all_experts(build_student(teacher, plans, top_k=1))
    assert logit_gap(teacher, student, teacher.config.vocab_size) <= 1e-4


def test_leading_dense_layers(llama_teacher):
    teacher = load(llama_teacher)
    plans = [None] + random_plans(128, 1, 4)
    student = all_experts(build_student(teacher, plans, top_k=2))
    assert student.config.first_k_dense_replace == 1
    assert not hasattr(student.model.layers[0].mlp, "gate")
    assert logit_gap(teacher, student, teacher.config.vocab_size) <= 1e-4


def test_unbiased_start_under_uniform_random_routing(qwen2_teacher):
    """E[student FFN] = teacher FFN when K < E experts are drawn uniformly at random (one layer)."""
    teacher = load(qwen2_teacher)
    student = build_student(teacher, random_plans(128, 2, 8, seed=2), top_k=2)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(6, teacher.config.hidden_size, generator=g)
    draws = 4000
    with torch.no_grad(), UniformRandomRouting(student, g).draw(draws * h.shape[0]).rows():
        target = teacher.model.layers[0].mlp(h)
        out = student.model.layers[0].mlp(h.repeat(draws, 1)).view(draws, *h.shape)
    mean, sem = out.mean(0), out.std(0) / draws**0.5
    z = ((mean - target) / sem.clamp_min(1e-8)).abs()
    assert float(z.max()) < 5.0  # ~0.3% of 384 entries exceed 3 sigma by chance; none 5 sigma
    # and the routing really is random: a single draw is far from the mean
    assert float((out[0] - target).abs().max()) > 10 * float(sem.max())


def test_validate_rejects_non_gated_and_moe_teachers():
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2MoeConfig,
        Qwen2MoeForCausalLM,
    )

    with pytest.raises(TeacherError, match="model.layers"):
        validate_teacher(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)))
    moe = Qwen2MoeForCausalLM(
        Qwen2MoeConfig(
            num_hidden_layers=1,
            hidden_size=16,
            num_attention_heads=2,
            num_key_value_heads=1,
            num_experts=4,
            vocab_size=50,
            intermediate_size=32,
            moe_intermediate_size=8,
            shared_expert_intermediate_size=8,
            decoder_sparse_step=1,
        )
    )
    with pytest.raises(TeacherError, match="Mixture-of-Experts"):
        validate_teacher(moe)
    biased = LlamaForCausalLM(
        LlamaConfig(
            num_hidden_layers=1,
            hidden_size=16,
            num_attention_heads=2,
            intermediate_size=32,
            vocab_size=50,
            mlp_bias=True,
        )
    )
    with pytest.raises(TeacherError, match="biases"):
        validate_teacher(biased)


def test_layer_plans_must_agree(llama_teacher):
    teacher = load(llama_teacher)
    with pytest.raises(ValueError, match="experts of"):
        build_student(teacher, [LayerPlan([[0, 1], [2, 3]]), LayerPlan([[0, 1, 2], [3, 4, 5]])], top_k=1)
    with pytest.raises(ValueError, match="dense layers must come first"):
        build_student(teacher, [LayerPlan([[0, 1], [2, 3]]), None], top_k=1)
