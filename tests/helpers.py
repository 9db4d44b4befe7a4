"""Test helpers: call the `padd` CLI with keyword flags (padd("decompose", top_k=2) -> --top-k 2), and
tiny random MoE students of every architecture padd's router adapter supports."""

from pathlib import Path

import torch
import transformers

from padd.cli import main
from padd.router_adapter import routers


def padd(command: str, **flags) -> int:
    argv = [command]
    for name, value in flags.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False:
            argv.append("--no-" + name.replace("_", "-"))
        else:
            argv += [flag, str(value)]
    return main(argv)


MOE_COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)

# model_type -> (config class, its MoE settings): 8 experts, top-2 or more, small widths
MOE_CONFIGS = {
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[0],
        ),
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=16,
            norm_topk_prob=False,
        ),
    ),
    "mixtral": ("MixtralConfig", dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=16)),
    "olmoe": ("OlmoeConfig", dict(num_experts=8, num_experts_per_tok=3, intermediate_size=16, norm_topk_prob=False)),
    "deepseek_v2": (
        "DeepseekV2Config",
        dict(
            n_routed_experts=8,
            num_experts_per_tok=3,
            moe_intermediate_size=16,
            n_shared_experts=1,
            first_k_dense_replace=1,
            topk_method="group_limited_greedy",
            num_key_value_heads=4,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.5,
            q_lora_rank=None,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            intermediate_size=32,
        ),
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        dict(
            n_routed_experts=8,
            num_experts_per_tok=3,
            moe_intermediate_size=16,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            num_key_value_heads=4,
            q_lora_rank=None,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            intermediate_size=32,
        ),
    ),
    "glm4_moe": (
        "Glm4MoeConfig",
        dict(
            n_routed_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=2,
            topk_group=1,
            routed_scaling_factor=1.5,
            norm_topk_prob=True,
            intermediate_size=32,
        ),
    ),
    "gpt_oss": (
        "GptOssConfig",
        dict(
            num_local_experts=8,
            num_experts_per_tok=2,
            intermediate_size=16,
            head_dim=8,
            layer_types=["full_attention"] * 3,
        ),
    ),
}


def save_moe_student(out: Path, model_type: str, tokenizer_dir: Path, *, router_std: float = 0.5, **overrides) -> Path:
    """A tiny random `model_type` student with the tokenizer of `tokenizer_dir`, saved like a hub
    checkpoint. Its routers get real scores (std `router_std`; several classes start them at zero),
    so that it routes like a pretrained model rather than uniformly."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    name, moe = MOE_CONFIGS[model_type]
    vocab = transformers.AutoConfig.from_pretrained(tokenizer_dir).vocab_size
    special = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    config = getattr(transformers, name)(**{**MOE_COMMON, **moe, "vocab_size": vocab, **special, **overrides})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for gate in routers(model):
            gate.weight.normal_(0.0, router_std)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return Path(out)
