import pytest
import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM

from helpers import MOE_COMMON, MOE_CONFIGS
from padd.flops import forward_flops_per_token, param_counts
from padd.stage1.build import build_student
from padd.stage1.partition import plan_layer


def counted_flops_per_token(model, context):
    model.set_attn_implementation("eager")  # explicit matmuls; the counter does not see CPU SDPA
    ids = torch.randint(0, model.config.vocab_size, (1, context))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(ids, use_cache=False)
    return counter.get_total_flops() / context


def make_student(teacher, n_experts, top_k, shared=0, dense=0):
    d_ff = teacher.config.intermediate_size
    size = (d_ff - shared) // n_experts
    plans = [None] * dense + [
        plan_layer(
            None,
            torch.rand(d_ff),
            d_ff=d_ff,
            n_experts=n_experts,
            expert_size=size,
            shared=shared,
            init="random",
            seed=i,
        )
        for i in range(dense, teacher.config.num_hidden_layers)
    ]
    student = build_student(teacher, plans, top_k=top_k)
    student.set_experts_implementation("eager")  # per-expert matmuls the counter sees
    return student


@pytest.mark.parametrize("context", [16, 64])
def test_dense_flops_match_counter(llama_teacher, context):
    teacher = AutoModelForCausalLM.from_pretrained(llama_teacher).eval()
    assert forward_flops_per_token(teacher.config, context) == pytest.approx(
        counted_flops_per_token(teacher, context), rel=1e-6
    )


@pytest.mark.parametrize(("n_experts", "top_k", "shared", "dense"), [(4, 1, 0, 0), (8, 2, 64, 0), (4, 2, 0, 1)])
def test_moe_flops_match_counter_and_count_only_active_experts(qwen2_teacher, n_experts, top_k, shared, dense):
    teacher = AutoModelForCausalLM.from_pretrained(qwen2_teacher).eval()
    student = make_student(teacher, n_experts, top_k, shared, dense)
    analytic = forward_flops_per_token(student.config, 32)
    assert analytic == pytest.approx(counted_flops_per_token(student, 32), rel=1e-6)
    assert analytic < forward_flops_per_token(teacher.config, 32)


def test_param_counts(qwen2_teacher):
    teacher = AutoModelForCausalLM.from_pretrained(qwen2_teacher)
    assert param_counts(teacher.config)[0] == sum(p.numel() for p in teacher.parameters())
    student = make_student(teacher, 8, 2, shared=64)
    total, active = param_counts(student.config)
    assert total == sum(p.numel() for p in student.parameters())
    expert = 3 * student.config.hidden_size * student.config.moe_intermediate_size
    assert total - active == student.config.num_hidden_layers * (8 - 2) * expert


@pytest.mark.parametrize("model_type", ["deepseek_v2", "deepseek_v3"])
def test_latent_attention_flops_match_the_counter(model_type):
    name, moe = MOE_CONFIGS[model_type]
    config = getattr(transformers, name)(**{**MOE_COMMON, **moe})
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.set_attn_implementation("eager")
    model.set_experts_implementation("eager")
    ids = torch.randint(0, config.vocab_size, (1, 24))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(ids, use_cache=False)
    assert forward_flops_per_token(config, 24) == pytest.approx(counter.get_total_flops() / 24, rel=1e-6)


@pytest.mark.parametrize("model_type", sorted(set(MOE_CONFIGS) - {"gpt_oss"}))
def test_moe_param_counts_are_the_built_models(model_type):
    """Every MoE architecture padd trains (gpt-oss' attention sinks and biases are left out)."""
    name, moe = MOE_CONFIGS[model_type]
    config = getattr(transformers, name)(**{**MOE_COMMON, **moe})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert param_counts(config)[0] == sum(p.numel() for p in model.parameters())
