"""Stage IV state: the per-expert advantage EMA and the update of every router's selection bias."""

from __future__ import annotations

from collections.abc import Callable

import torch

from padd.losses import update_advantage_ema, update_routing_bias
from padd.metrics import load_stats
from padd.routing import expert_load, selection_biases


class BiasBalancer:
    """Applies docs/method.md §4 IV after each optimizer step: b ← clip(b - η(f - f̄) + γ·m) per MoE layer.

    f is each expert's load relative to the uniform share (balanced: 1), so η acts at the same
    strength whatever the number of experts. `reward_coef = 0` (γ) is plain (loss-free) load balancing;
    `eta = reward_coef = 0` leaves the bias alone; `rule="sign"` is DeepSeek-V3's -η·sign(f - f̄).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        eta: float,
        reward_coef: float,
        clip: float,
        ema_decay: float = 0.9,
        rule: str = "proportional",
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        """`reduce` sums the load statistics over data-parallel ranks, so every rank applies one bias."""
        self.biases = selection_biases(model)  # the routers' own, or padd's where they have none
        self.reduce = reduce
        self.eta, self.reward_coef, self.clip, self.ema_decay, self.rule = eta, reward_coef, clip, ema_decay, rule
        n_experts = self.biases[0].numel() if self.biases else 0
        self.adv_ema = torch.zeros(len(self.biases), n_experts)

    @classmethod
    def of(cls, model: torch.nn.Module, objective, cfg, reduce=None) -> BiasBalancer:
        """The balancer of a run: η, γ and the EMA decay from its Objective, the rule and the bound
        from its TrainConfig."""
        return cls(
            model,
            eta=objective.eta,
            reward_coef=objective.balance_reward_coef,
            clip=cfg.bias_clip,
            ema_decay=objective.adv_ema,
            rule=cfg.balance_rule,
            reduce=reduce,
        )

    @torch.no_grad()
    def step(self, topk: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> dict:
        """Update the biases from one mini-batch's routing; returns the load and bias statistics.

        Args:
            topk: [L, n, C, K] experts selected for each completion token of the n completions.
            advantages: [n] the advantage of each completion.
            mask: [n, C] 1 on completion tokens (only they are counted).
        """
        token_mask = mask.reshape(-1)
        token_adv = advantages[:, None].expand_as(mask).reshape(-1)
        topk = topk.reshape(topk.shape[0], -1, topk.shape[-1])  # [L, n·C, K]
        n_experts = self.adv_ema.shape[1]
        counts = expert_load(topk, n_experts, weights=token_mask.float())  # [L, E]
        adv_sum = expert_load(topk, n_experts, weights=(token_adv * token_mask).float())
        if self.reduce is not None:
            both = self.reduce(torch.stack([counts, adv_sum]))
            counts, adv_sum = both[0], both[1]
        load = counts / counts.sum(-1, keepdim=True).clamp_min(1.0) * n_experts  # [L, E], balanced = 1
        self.adv_ema = update_advantage_ema(self.adv_ema, adv_sum.cpu(), counts.cpu(), self.ema_decay)
        biases = []
        for layer, bias in enumerate(self.biases):
            new = update_routing_bias(
                bias,
                load[layer].to(bias.device),
                self.adv_ema[layer].to(bias.device),
                eta=self.eta,
                reward_coef=self.reward_coef,
                clip=self.clip,
                rule=self.rule,
            )
            bias.copy_(new)
            biases.append(new)
        stacked = torch.stack(biases) if biases else torch.zeros(1, 1)  # [L, E]
        spread = stacked.max(-1).values - stacked.min(-1).values  # [L]
        balance = load_stats(load.cpu())
        return {
            "bias_min": float(stacked.min()),
            "bias_max": float(stacked.max()),
            "bias_spread": spread.tolist(),
            "bias_spread_mean": float(spread.mean()),
            "load_cv": balance["cv"].tolist(),
            "load_max_mean": balance["max_mean"].tolist(),
        }

    def state_dict(self) -> dict:
        return {"adv_ema": self.adv_ema.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.adv_ema = state["adv_ema"].clone()
