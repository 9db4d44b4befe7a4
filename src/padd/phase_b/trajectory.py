"""What one rollout batch carries into its updates: the sampled sequences, their rewards and
advantages, and the rollout-time policy and routing the updates are measured against.

A `Trajectory` is built once per rollout batch (`Trainer.collect`) and cut into the M mini-batches
the optimizer steps on (`minibatches`), every per-sequence tensor sliced together, so an update
never indexes five tensors in lockstep.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from padd.generation.rollout import Rollout


def completion_positions(rollout: Rollout) -> slice:
    """Positions of the [N, P + C] sequence whose logits predict the C completion tokens: P-1 ... P+C-2.
    The routing at these positions is what produced each completion token's probability."""
    n_prompt, n_comp = rollout.prompt_ids.shape[1], rollout.completion_ids.shape[1]
    return slice(n_prompt - 1, n_prompt + n_comp - 1)


def forward_completion(model, rollout: Rollout, device) -> torch.Tensor:
    """Raw logits [N, C, V] predicting each completion token (positions from the attention mask)."""
    mask = rollout.attention_mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    # the LM head only on the last C + 1 positions (P-1 ... P+C-1), as prompt positions predict nothing
    # trained on: with a 150k vocabulary the [N, P + C, V] logits would be most of the forward's memory
    n_completion = rollout.completion_ids.shape[1]
    logits = model(
        input_ids=rollout.input_ids.to(device),
        attention_mask=mask,
        position_ids=positions,
        use_cache=False,
        logits_to_keep=n_completion + 1,
    ).logits
    return logits[:, :-1]


@dataclass
class Trajectory:
    """N = prompts × G sampled completions and what the updates compare them with.

    rollout:        the sequences (prompt [N, P], completion [N, C], masks, texts, engine routing)
    rewards:        [N] verifier scores
    advantages:     [N] group-normalised rewards (A_i)
    old_logps:      [N, C] log π_old of each completion token, at the sampling temperature; None with
                    one update per batch, where the update's own forward gives it
    old_topk:       [L, N, C, K] experts the rollout-time student selected for each completion token;
                    None where old_logps is
    rollout_router: the router weights that made the rollouts (one [E, H] per MoE layer), Γ's anchor
                    for every mini-batch of the batch; None when Γ is measured against the router
                    before each optimizer step instead (--gamma-anchor previous)
    """

    rollout: Rollout
    rewards: torch.Tensor
    advantages: torch.Tensor
    old_logps: torch.Tensor | None
    old_topk: torch.Tensor | None
    rollout_router: list[torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.rollout.texts)

    @property
    def completion_mask(self) -> torch.Tensor:
        """[N, C] 1.0 on completion tokens up to and including the first EOS."""
        return self.rollout.completion_mask.float()

    def select(self, index: torch.Tensor) -> Trajectory:
        """The sequences `index` ([n] long) of this batch, every per-sequence tensor sliced alike."""
        return Trajectory(
            rollout=self.rollout.select(index),
            rewards=self.rewards[index],
            advantages=self.advantages[index],
            old_logps=None if self.old_logps is None else self.old_logps[index],
            old_topk=None if self.old_topk is None else self.old_topk[:, index],
            rollout_router=self.rollout_router,
        )

    def minibatches(self, count: int) -> Iterator[Trajectory]:
        """`count` disjoint mini-batches in a random order drawn from torch's global generator (seeded
        per rollout batch by the loop, so a resumed run cuts them alike)."""
        for chunk in torch.randperm(len(self)).chunk(count):
            yield self.select(chunk)

    def metrics(self, dist, engine_differ: int = 0, engine_counted: int = 0) -> dict[str, float]:
        """The batch's metrics over all ranks (`dist`: padd.distributed.Dist): mean reward, accuracy,
        completion tokens, and where this trajectory holds π_old, its `policy_checks`."""
        totals = dist.sum_dict(
            {
                "reward": float(self.rewards.sum()),
                "correct": float((self.rewards > 0).sum()),
                "completions": len(self),
                "tokens": float(self.rollout.completion_mask.sum()),
            }
        )
        metrics = {
            "reward_mean": totals["reward"] / totals["completions"],
            "accuracy": totals["correct"] / totals["completions"],
            "completion_tokens": int(totals["tokens"]),
        }
        if self.old_logps is not None:
            metrics |= self.policy_checks(dist, engine_differ, engine_counted, self.old_logps)
        return metrics

    def policy_checks(self, dist, engine_differ: int, engine_counted: int, old_logps: torch.Tensor) -> dict[str, float]:
        """Checks of π_old over all ranks: with the engine's routing, the share of token-layer
        selections where the trainer's own router disagrees with it (of `engine_counted`); with the
        sampler's log-probabilities, the largest |π_old − sampler| (π_old [N, C] must be the
        distribution the sampler drew from)."""
        rollout = self.rollout
        counts = dist.sum_dict({"differ": engine_differ, "counted": engine_counted})
        checks = {}
        if counts["counted"] > 0:
            checks["routing_mismatch"] = counts["differ"] / counts["counted"]
        if rollout.sampler_logps is not None:
            gap = (old_logps.cpu() - rollout.sampler_logps)[rollout.completion_mask.bool()].abs()
            gap = dist.all_reduce_max(torch.tensor([float(gap.max()) if gap.numel() else 0.0]))
            checks["sampler_logp_gap"] = float(gap[0])
        return checks
