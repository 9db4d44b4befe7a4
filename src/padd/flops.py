"""Analytic per-token forward FLOPs and parameter counts from a model config.

Dense (Llama, Qwen2, Mistral, Qwen3) configs and the MoE architectures of padd.router_adapter with
standard attention (DeepSeek's latent attention and gpt-oss' sinks are counted as standard
attention). FLOPs count matrix products only (2 per
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
    h, n_heads, n_kv, hd = _attn_dims(cfg)
    proj = h * (n_heads * hd + 2 * n_kv * hd) + n_heads * hd * h
    scores = 2 * n_heads * hd * context_len  # QK^T and AV
    layers = sum(proj + scores + _mlp_macs(cfg, i, active=True) for i in range(cfg.num_hidden_layers))
    return 2.0 * (layers + h * cfg.vocab_size)


def param_counts(cfg) -> tuple[int, int]:
    """(total, active-per-token) parameter counts; inactive routed experts are the only difference."""
    h, n_heads, n_kv, hd = _attn_dims(cfg)
    attn = h * (n_heads * hd + 2 * n_kv * hd) + n_heads * hd * h + 2 * h
    qkv_bias = getattr(cfg, "attention_bias", False) or getattr(cfg, "model_type", "") == "qwen2"
    if qkv_bias:
        attn += n_heads * hd + 2 * n_kv * hd
    if getattr(cfg, "use_qk_norm", False) or getattr(cfg, "model_type", "") == "qwen3":
        attn += 2 * hd
    embed = cfg.vocab_size * h * (1 if getattr(cfg, "tie_word_embeddings", False) else 2) + h
    total = embed + sum(attn + _mlp_macs(cfg, i, active=False) for i in range(cfg.num_hidden_layers))
    active = embed + sum(attn + _mlp_macs(cfg, i, active=True) for i in range(cfg.num_hidden_layers))
    return total, active
