"""Analytic per-token forward FLOPs and parameter counts from a model config.

Dense (Llama, Qwen2, Mistral, Qwen3) configs and the MoE architectures of padd.router_adapter,
DeepSeek's multi-head latent attention included (gpt-oss' sinks and biases are left out of
its counts). FLOPs count matrix products only (2 per
multiply-add), as `torch.utils.flop_counter.FlopCounterMode` does; attention scores are counted over
all `context_len` keys, as dense attention kernels compute them. For MoE layers only the router, the
K active experts and the shared experts count.
"""

from __future__ import annotations

from padd import router_adapter


def _attn_dims(cfg) -> tuple[int, int, int, int]:
    h = cfg.hidden_size
    n_heads, n_kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or h // n_heads
    return h, n_heads, n_kv, head_dim


def _attention(cfg) -> tuple[int, int, int]:
    """(projection multiply-adds per token, score multiply-adds per token and key, parameters) of one
    attention block, its norms excluded. Latent attention (DeepSeek-V2/V3: `kv_lora_rank`) projects
    keys and values through a rank-`kv_lora_rank` latent, as transformers computes it (not absorbed)."""
    h, n_heads, n_kv, hd = _attn_dims(cfg)
    if getattr(cfg, "kv_lora_rank", None):
        qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        q_rank = getattr(cfg, "q_lora_rank", None)
        q = h * q_rank + q_rank * n_heads * qk if q_rank else h * n_heads * qk
        kv = h * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank * n_heads * (
            cfg.qk_nope_head_dim + cfg.v_head_dim
        )
        proj = q + kv + n_heads * cfg.v_head_dim * h
        latent_norms = cfg.kv_lora_rank + (q_rank or 0)
        return proj, n_heads * (qk + cfg.v_head_dim), proj + latent_norms
    proj = h * (n_heads * hd + 2 * n_kv * hd) + n_heads * hd * h
    params = proj
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "model_type", "") in ("qwen2", "qwen2_moe"):
        params += n_heads * hd + 2 * n_kv * hd
    if getattr(cfg, "use_qk_norm", False) or getattr(cfg, "model_type", "") in ("qwen3", "qwen3_moe"):
        params += 2 * hd  # per-head q and k norms
    if getattr(cfg, "model_type", "") == "olmoe":
        params += n_heads * hd + n_kv * hd  # q and k norms over all heads
    return proj, 2 * n_heads * hd, params


def _moe_layers(cfg) -> set[int]:
    """The MoE layers of a supported MoE architecture (padd.router_adapter); none for a dense model."""
    if getattr(cfg, "model_type", None) not in router_adapter.ROUTERS:
        return set()
    return set(router_adapter.moe_layer_indices(cfg))


def _mlp_macs(cfg, layer: int, active: bool) -> int:
    """Multiply-adds (per token) or parameters (active=False, all experts) of one layer's FFN."""
    h = cfg.hidden_size
    if layer not in _moe_layers(cfg):
        return 3 * h * cfg.intermediate_size
    width = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size  # one routed expert
    n_experts, k = router_adapter.num_experts(cfg), router_adapter.top_k(cfg)
    # always-on experts: DeepSeek / GLM-4 MoE count them in routed-expert widths, Qwen2-MoE gives one
    # width and gates it with a [1, H] projection
    shared = (getattr(cfg, "n_shared_experts", 0) or 0) * width
    shared_gate = 0
    if getattr(cfg, "shared_expert_intermediate_size", None):
        shared, shared_gate = cfg.shared_expert_intermediate_size, h
    routed = k if active else n_experts
    return h * n_experts + routed * 3 * h * width + 3 * h * shared + shared_gate


def forward_flops_per_token(cfg, context_len: int) -> float:
    """Forward FLOPs per token of a sequence of `context_len` tokens (embedding lookups and norms excluded)."""
    proj, scores_per_key, _ = _attention(cfg)
    attention = proj + scores_per_key * context_len  # QK^T and AV over every key
    layers = sum(attention + _mlp_macs(cfg, i, active=True) for i in range(cfg.num_hidden_layers))
    return 2.0 * (layers + cfg.hidden_size * cfg.vocab_size)


def ffn_flops_per_token(cfg) -> float:
    """The part of `forward_flops_per_token` in the FFNs: dense MLPs, or routers + active experts."""
    return 2.0 * sum(_mlp_macs(cfg, i, active=True) for i in range(cfg.num_hidden_layers))


def routed_expert_flops_per_token(cfg) -> float:
    """The part of `forward_flops_per_token` in the K routed experts of the MoE layers."""
    h = cfg.hidden_size
    width = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
    return 2.0 * len(_moe_layers(cfg)) * router_adapter.top_k(cfg) * 3 * h * width


def param_counts(cfg) -> tuple[int, int]:
    """(total, active-per-token) parameter counts; inactive routed experts are the only difference."""
    h = cfg.hidden_size
    attn = _attention(cfg)[2] + 2 * h  # with the layer's two norms
    embed = cfg.vocab_size * h * (1 if getattr(cfg, "tie_word_embeddings", False) else 2) + h
    total = embed + sum(attn + _mlp_macs(cfg, i, active=False) for i in range(cfg.num_hidden_layers))
    active = embed + sum(attn + _mlp_macs(cfg, i, active=True) for i in range(cfg.num_hidden_layers))
    return total, active
