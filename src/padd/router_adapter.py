"""What padd needs to know about the router of every common transformers MoE architecture: a table
keyed by `config.model_type`, and two pure functions on router logits.

In transformers every MoE router returns (router_logits [T, E], weights [T, K], indices [T, K]);
the architectures differ in how logits become a selection and its weights. `route` reproduces the
stock router exactly from its logits, optionally with a selection-only bias added to the scores the
top-K is taken over (stage IV) or with fixed indices (routing replay); `log_scores` gives the log
normalised router probabilities per-token Γ compares (docs/method.md §4 III).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from padd.errors import UserError


@dataclass(frozen=True)
class RouterKind:
    """How one architecture routes.

    module:      attribute of a decoder layer's `mlp` that holds the router ("gate" or "router")
    scoring:     "softmax" (over all experts, then top-K), "sigmoid" (independent scores, then top-K)
                 or "softmax_topk" (top-K on the logits, then a softmax over the K selected)
    renormalise: the K selected weights are divided by their sum: True, False, or "config" (the
                 config's `norm_topk_prob`)
    scaled:      the weights are multiplied by `routed_scaling_factor`
    groups:      group-limited selection: None, "max" (DeepSeek-V2: a group's best score, when
                 `topk_method` is group_limited_greedy) or "top2" (DeepSeek-V3: the sum of a group's
                 two best biased scores)
    native_bias: the router holds a selection-only bias (`e_score_correction_bias`)
    moe_layers:  which decoder layers are MoE: "all", "first_k_dense" (`first_k_dense_replace`) or
                 "sparse_step" (`mlp_only_layers`, `decoder_sparse_step`)
    """

    module: str
    scoring: str
    renormalise: bool | str
    scaled: bool
    groups: str | None
    native_bias: bool
    moe_layers: str


ROUTERS: dict[str, RouterKind] = {
    "qwen3_moe": RouterKind("gate", "softmax", "config", False, None, False, "sparse_step"),
    "qwen2_moe": RouterKind("gate", "softmax", "config", False, None, False, "sparse_step"),
    "mixtral": RouterKind("gate", "softmax", True, False, None, False, "all"),
    "olmoe": RouterKind("gate", "softmax", "config", False, None, False, "all"),
    "deepseek_v2": RouterKind("gate", "softmax", False, True, "max", False, "first_k_dense"),
    "deepseek_v3": RouterKind("gate", "sigmoid", "config", True, "top2", True, "first_k_dense"),
    "glm4_moe": RouterKind("gate", "sigmoid", "config", True, "top2", True, "first_k_dense"),
    "gpt_oss": RouterKind("router", "softmax_topk", False, False, None, False, "all"),
}


def router_kind(config) -> RouterKind:
    """The RouterKind of a model config, or a clear error listing the supported model types."""
    kind = ROUTERS.get(getattr(config, "model_type", None))
    if kind is None:
        raise UserError(
            f"model_type {getattr(config, 'model_type', None)!r} is not a supported MoE student; padd supports "
            f"{', '.join(sorted(ROUTERS))}"
        )
    return kind


def moe_layer_indices(config) -> list[int]:
    """Decoder-layer indices of the MoE layers of a config, in order."""
    kind, n = router_kind(config), config.num_hidden_layers
    if kind.moe_layers == "first_k_dense":
        return list(range(getattr(config, "first_k_dense_replace", 0) or 0, n))
    if kind.moe_layers == "sparse_step":
        step, dense = getattr(config, "decoder_sparse_step", 1) or 1, set(getattr(config, "mlp_only_layers", []) or [])
        return [i for i in range(n) if i not in dense and (i + 1) % step == 0]
    return list(range(n))


def top_k(config) -> int:
    return config.num_experts_per_tok


def num_experts(config) -> int:
    for name in ("n_routed_experts", "num_local_experts", "num_experts"):
        if getattr(config, name, None):
            return getattr(config, name)
    raise UserError(f"{config.model_type}: the config names no expert count")


def selection_scores(config, logits: torch.Tensor) -> torch.Tensor:
    """[T, E] the scores the router's top-K is taken over (before any selection bias): softmax
    probabilities, sigmoid scores, or the raw logits of a softmax-over-the-top-K router."""
    kind = router_kind(config)
    if kind.scoring == "softmax_topk":
        return logits.float()
    return torch.softmax(logits.float(), dim=-1) if kind.scoring == "softmax" else logits.float().sigmoid()


def route(
    config,
    logits: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    indices: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The stock router's (weights [T, K], indices [T, K]) from its logits [T, E].

    bias: [E] added to the scores the selection is taken over, never to the weights (stage IV's
    selection-only bias; where the architecture has a native one, pass it here).
    indices: [T, K] a fixed selection (routing replay); the weights are those the router gives it.
    """
    kind, k, n_experts = router_kind(config), top_k(config), num_experts(config)
    logits = logits.float()
    scores = selection_scores(config, logits)
    if kind.scoring == "softmax_topk":
        choice = scores if bias is None else scores + bias.float()
        if indices is None:
            indices = torch.topk(choice, k, dim=-1)[1]
        weights = torch.softmax(logits.gather(-1, indices), dim=-1)
        return weights, indices
    choice = scores if bias is None else scores + bias.float()
    if indices is None:
        if kind.groups is not None and _grouped(config, kind):
            choice = _group_mask(config, kind, choice, n_experts)
        indices = torch.topk(choice, k, dim=-1, sorted=False)[1]
    weights = scores.gather(-1, indices)
    if kind.renormalise is True or (kind.renormalise == "config" and getattr(config, "norm_topk_prob", False)):
        weights = weights / (weights.sum(-1, keepdim=True) + (1e-20 if kind.scoring == "sigmoid" else 0.0))
    if kind.scaled:
        weights = weights * config.routed_scaling_factor
    return weights, indices


def _grouped(config, kind: RouterKind) -> bool:
    if kind.groups == "max":
        return getattr(config, "topk_method", "greedy") == "group_limited_greedy"
    return (getattr(config, "n_group", 1) or 1) >= 1


def _group_mask(config, kind: RouterKind, choice: torch.Tensor, n_experts: int) -> torch.Tensor:
    """`choice` [T, E] with the experts outside each token's best `topk_group` groups masked out."""
    n_group = config.n_group
    grouped = choice.view(-1, n_group, n_experts // n_group)
    group_scores = grouped.max(-1).values if kind.groups == "max" else grouped.topk(2, dim=-1)[0].sum(-1)
    keep = torch.zeros_like(group_scores).scatter_(1, torch.topk(group_scores, config.topk_group, dim=-1)[1], 1)
    mask = keep.unsqueeze(-1).expand(-1, n_group, n_experts // n_group).reshape(-1, n_experts).bool()
    # DeepSeek-V2 zeroes the masked softmax scores, DeepSeek-V3 sets them to -inf: the same selection
    return choice.masked_fill(~mask, 0.0 if kind.groups == "max" else float("-inf"))


def log_scores(config, logits: torch.Tensor) -> torch.Tensor:
    """log p(e | h) [T, E] of the router's normalised probabilities over all experts: log softmax of
    the logits for softmax routers, log σ(z) / Σ σ(z) for sigmoid ones (what per-token Γ compares)."""
    if router_kind(config).scoring == "sigmoid":
        log_sig = torch.nn.functional.logsigmoid(logits.float())
        return log_sig - torch.logsumexp(log_sig, dim=-1, keepdim=True)
    return torch.log_softmax(logits.float(), dim=-1)


def routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The router module of every MoE layer of a transformers MoE model, in layer order."""
    kind = router_kind(model.config)
    return [getattr(model.model.layers[i].mlp, kind.module) for i in moe_layer_indices(model.config)]
