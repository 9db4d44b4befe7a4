"""pr_grpo_loss at lam = 0 against TRL's GRPOTrainer loss on the same tensors (token GRPO and GSPO).

TRL's `_compute_loss` runs unchanged on a stand-in trainer whose log-prob function returns our
tensors; its "bnpo" aggregation is the mean over all unmasked tokens of the batch, as ours.
"""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")

from padd.phase_b.losses import pr_grpo_loss  # noqa: E402


class _Accelerator:
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


def trl_loss(logp, old_logp, advantages, mask, level, eps_low, eps_high):
    fake = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
        aux_loss_enabled=False,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level=level,
        beta=0.0,
        loss_type="bnpo",
        epsilon_low=eps_low,
        epsilon_high=eps_high,
        use_vllm=False,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        _entropy_bonus_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        accelerator=_Accelerator(),
        args=SimpleNamespace(delta=None, use_bias_correction_kl=False),
    )
    inputs = {
        "prompt_ids": torch.zeros(logp.shape[0], 1, dtype=torch.long),
        "prompt_mask": torch.ones(logp.shape[0], 1, dtype=torch.long),
        "completion_ids": torch.zeros(logp.shape, dtype=torch.long),
        "completion_mask": mask.long(),
        "advantages": advantages,
        "old_per_token_logps": old_logp,
    }
    return trl_grpo.GRPOTrainer._compute_loss(fake, None, inputs)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_trl_grpo_and_gspo(level, seed):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(5, 9, generator=g) * 2).requires_grad_()
    old_logp = logp.detach() + 0.25 * torch.randn(5, 9, generator=g)
    advantages = torch.randn(5, generator=g)
    mask = (torch.rand(5, 9, generator=g) > 0.3).float()
    mask[:, 0] = 1
    ours, _ = pr_grpo_loss(logp, old_logp, advantages, mask, eps_low=0.2, eps_high=0.28, level=level)
    theirs = trl_loss(logp, old_logp, advantages, mask, level, 0.2, 0.28)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6, abs=1e-7)
    g_ours = torch.autograd.grad(ours, logp)[0]
    g_theirs = torch.autograd.grad(theirs, logp)[0]
    assert torch.allclose(g_ours, g_theirs, atol=1e-7)
