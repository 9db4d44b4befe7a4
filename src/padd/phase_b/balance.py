"""Stage IV state: the per-expert advantage EMA and the update of every router's selection bias."""

from __future__ import annotations

from collections.abc import Callable

import torch

from padd.phase_b.losses import update_advantage_ema, update_routing_bias
from padd.routing import expert_load, moe_gates


class BiasBalancer:
    """Applies SPEC §4 IV after each optimizer step: b ← clip(b - η(f - f̄) + γ·m) per MoE layer.

    `gamma = 0` is plain (loss-free) load balancing; `eta = gamma = 0` leaves the bias alone.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        eta: float,
        gamma: float,
        clip: float,
        ema_decay: float = 0.9,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        """`reduce` sums the load statistics over data-parallel ranks, so every rank applies one bias."""
        self.gates = moe_gates(model)
        self.reduce = reduce
        self.eta, self.gamma, self.clip, self.ema_decay = eta, gamma, clip, ema_decay
        n_experts = self.gates[0].num_experts if self.gates else 0
        self.adv_ema = torch.zeros(len(self.gates), n_experts)

    @torch.no_grad()
    def step(self, topk: torch.Tensor, token_adv: torch.Tensor, token_mask: torch.Tensor) -> dict[str, float]:
        """Update the biases from one mini-batch's routing.

        Args:
            topk: [L, N, K] experts selected for the N tokens of the mini-batch.
            token_adv: [N] the advantage of each token's completion.
            token_mask: [N] 1 on completion tokens (only they are counted).
        """
        n_experts = self.adv_ema.shape[1]
        counts = expert_load(topk, n_experts, weights=token_mask.float())  # [L, E]
        adv_sum = expert_load(topk, n_experts, weights=(token_adv * token_mask).float())
        if self.reduce is not None:
            both = self.reduce(torch.stack([counts, adv_sum]))
            counts, adv_sum = both[0], both[1]
        load = counts / counts.sum(-1, keepdim=True).clamp_min(1.0)
        self.adv_ema = update_advantage_ema(self.adv_ema, adv_sum.cpu(), counts.cpu(), self.ema_decay)
        biases = []
        for layer, gate in enumerate(self.gates):
            new = update_routing_bias(
                gate.e_score_correction_bias,
                load[layer].to(gate.e_score_correction_bias.device),
                self.adv_ema[layer].to(gate.e_score_correction_bias.device),
                eta=self.eta,
                gamma=self.gamma,
                clip=self.clip,
            )
            gate.e_score_correction_bias.copy_(new)
            biases.append(new)
        stacked = torch.stack(biases) if biases else torch.zeros(1)
        return {"bias_min": float(stacked.min()), "bias_max": float(stacked.max()), "load": load.cpu()}

    def state_dict(self) -> dict:
        return {"adv_ema": self.adv_ema.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.adv_ema = state["adv_ema"].clone()
