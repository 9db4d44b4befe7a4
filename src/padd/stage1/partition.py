"""Neuron partitions (docs/method.md §3 steps 3-4, 7): which teacher neurons each expert holds.

`cluster` is PADD's co-activation clustering; `random` (random equal split, the "no Stage I"
baseline) and `copy` (every expert the whole FFN, copy upcycling) go through the same code path.
"""

from __future__ import annotations

import torch

from padd.errors import UserError
from padd.stage1.build import LayerPlan
from padd.stage1.cluster import balanced_kmeans, kmeans_objective

INITS = ("cluster", "random", "copy")
# transformers' grouped_mm expert kernel (and vLLM's fused MoE) need each expert's rows 16-byte
# aligned: a multiple of 8 neurons in bf16.
ALIGN = 8


def check_sizes(d_ff: int, n_experts: int, top_k: int, shared: int, expert_size: int | None, init: str) -> int:
    """Validate the expert geometry against d_ff; return the expert size. Raises ValueError saying what to change."""
    if init not in INITS:
        raise UserError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
    if n_experts < 1:
        raise UserError(f"--experts must be at least 1, got {n_experts}")
    if not 1 <= top_k <= n_experts:
        raise UserError(f"--top-k must be between 1 and --experts ({n_experts}), got {top_k}")
    if not 0 <= shared < d_ff:
        raise UserError(f"--shared-neurons must be in [0, d_ff={d_ff}), got {shared}")
    routed = d_ff - shared
    if init == "copy":
        if expert_size not in (None, routed):
            raise UserError(f"--init copy makes every expert the whole FFN ({routed} neurons); drop --expert-size")
        return _aligned(routed, "the routed neurons (d_ff minus --shared-neurons)")
    good = [e for e in range(2, min(routed, 513)) if routed % e == 0 and (routed // e) % ALIGN == 0]
    if routed % n_experts:
        raise UserError(
            f"--experts {n_experts} does not divide the {routed} routed neurons (d_ff={d_ff} minus {shared} shared); "
            f"choose one of {good[:12]} or change --shared-neurons"
        )
    base = routed // n_experts
    if expert_size is None:
        if base % ALIGN:
            raise UserError(
                f"{routed} routed neurons / {n_experts} experts = {base} neurons per expert, not a multiple of "
                f"{ALIGN}; the grouped expert kernels need 16-byte aligned rows. Choose --experts among {good[:12]}, "
                f"or change --shared-neurons / --expert-size"
            )
        return base
    if not base <= expert_size <= routed:
        raise UserError(f"--expert-size must be between {base} (an equal split) and {routed}, got {expert_size}")
    return _aligned(expert_size, "--expert-size")


def _aligned(size: int, what: str) -> int:
    if size % ALIGN:
        raise UserError(
            f"{what} = {size} is not a multiple of {ALIGN}: the grouped expert kernels need 16-byte "
            f"aligned rows (bf16); adjust it"
        )
    return size


def plan_layer(
    features: torch.Tensor | None,
    active_frac: torch.Tensor | None,
    *,
    d_ff: int,
    n_experts: int,
    expert_size: int,
    shared: int,
    init: str,
    seed: int,
    kmeans_iters: int = 50,
) -> LayerPlan:
    """Partition one FFN's d_ff neurons into experts.

    Args:
        features: [d_ff, p] normalised co-activation features (needed for `cluster`).
        active_frac: [d_ff] universality of each neuron (needed when shared > 0).
    """
    if shared:
        order = torch.argsort(active_frac.cpu(), descending=True, stable=True)
        shared_idx, routed = order[:shared].sort().values, order[shared:].sort().values
    else:
        shared_idx, routed = torch.empty(0, dtype=torch.long), torch.arange(d_ff)
    n_routed = routed.numel()
    if init == "copy":
        return LayerPlan(experts=[routed.tolist()] * n_experts, shared=shared_idx.tolist())
    gen = torch.Generator().manual_seed(seed)
    objective = None
    if init == "cluster":
        x = features[routed.to(features.device)]
        labels = balanced_kmeans(x, n_experts, seed=seed, max_iter=kmeans_iters)
        objective = kmeans_objective(x, labels, n_experts)
        labels = labels.cpu()
    else:
        labels = torch.randperm(n_routed, generator=gen) % n_experts
    members = [routed[labels == e] for e in range(n_experts)]
    if expert_size > n_routed // n_experts:
        members = _grow(members, routed, features, expert_size, gen, init)
    return LayerPlan(
        experts=[m.sort().values.tolist() for m in members], shared=shared_idx.tolist(), objective=objective
    )


def _grow(members, routed, features, size, gen, init):
    """Capacity growth: each cluster adds its nearest outside neurons (random ones for `random`)."""
    grown = []
    for m in members:
        outside = routed[~torch.isin(routed, m)]
        extra = size - m.numel()
        if init == "cluster":
            centroid = features[m.to(features.device)].mean(0)
            dist = (features[outside.to(features.device)] - centroid).pow(2).sum(1).cpu()
            pick = outside[torch.argsort(dist, stable=True)[:extra]]
        else:
            pick = outside[torch.randperm(outside.numel(), generator=gen)[:extra]]
        grown.append(torch.cat([m, pick]))
    return grown
