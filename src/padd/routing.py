"""Hooks on the student's `mlp.gate` routers (transformers' Glm4MoeTopkRouter), never a forked model.

A router returns (router_logits [T, E], topk_weights [T, K], topk_indices [T, K]); PADD reads and,
for the warm-up, replaces that triple through forward hooks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def moe_gates(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The router module of every MoE layer, in layer order."""
    return [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]


@contextlib.contextmanager
def uniform_random_routing(model: torch.nn.Module, generator: torch.Generator | None = None) -> Iterator[None]:
    """Route every token to K experts drawn uniformly at random, with equal weights (SPEC §3.5).

    Weights are routed_scaling_factor / K — the zero-router weights — so that, with the student's
    gate scaling, the expected FFN output is the teacher's. The router still runs (its logits are
    returned unchanged) but decides nothing.
    """

    def hook(gate, inputs, output):
        logits, _, _ = output
        n_tokens = logits.shape[0]
        noise = torch.rand(n_tokens, gate.num_experts, generator=generator, device="cpu").to(logits.device)
        indices = noise.topk(gate.top_k, dim=-1).indices
        weights = torch.full(
            (n_tokens, gate.top_k), gate.routed_scaling_factor / gate.top_k, dtype=logits.dtype, device=logits.device
        )
        return logits, weights, indices

    handles = [g.register_forward_hook(hook) for g in moe_gates(model)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
