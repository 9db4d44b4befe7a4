"""pr_grpo_loss at lam = 0 against TRL's GRPOTrainer loss on the same tensors (token GRPO and GSPO).

TRL's `_compute_loss` runs unchanged on a stand-in trainer whose log-prob function returns our
tensors; its "bnpo" aggregation is the mean over all unmasked tokens of the batch, as ours.
"""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")

from padd.losses import pr_grpo_loss  # noqa: E402


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


def test_policy_logps_match_trl_at_a_sampling_temperature(llama_student):
    """π_θ at the sampling temperature: our forward over a rollout, log softmax(logits / 0.8), against
    TRL's own per-token log-probabilities (GRPOTrainer with temperature 0.8, its fused LM head) for
    the same MoE student and tokens."""
    from contextlib import nullcontext

    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from padd.generation.rollout import Rollout
    from padd.losses import token_logps
    from padd.phase_b.loop import forward_completion

    model = AutoModelForCausalLM.from_pretrained(llama_student).eval()
    g = torch.Generator().manual_seed(0)
    prompt, completion = torch.randint(3, 60, (3, 5), generator=g), torch.randint(3, 60, (3, 4), generator=g)
    rollout = Rollout(prompt, torch.ones_like(prompt), completion, torch.ones_like(completion), ["", "", ""])
    with torch.no_grad():
        ours = token_logps(forward_completion(model, rollout, "cpu"), completion, 0.8)
        add_fused_lm_head(model, temperature=0.8)
        fake = SimpleNamespace(accelerator=SimpleNamespace(autocast=nullcontext, is_main_process=True))
        theirs, _, _ = trl_grpo.GRPOTrainer._get_per_token_logps_and_entropies(
            fake, model, rollout.input_ids, rollout.attention_mask, logits_to_keep=completion.shape[1]
        )
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert not torch.allclose(ours, token_logps(forward_completion(model, rollout, "cpu"), completion), atol=1e-3)


def test_forward_completion_runs_the_lm_head_on_the_completion_positions_only(llama_student):
    """The logits of positions P-1 … P+C-2 with the LM head on the last C + 1 positions only equal
    those of a whole-sequence forward, left-padded prompts included."""
    from transformers import AutoModelForCausalLM

    from padd.generation.rollout import Rollout
    from padd.phase_b.trajectory import completion_positions, forward_completion

    model = AutoModelForCausalLM.from_pretrained(llama_student).eval()
    g = torch.Generator().manual_seed(1)
    prompt, completion = torch.randint(3, 60, (2, 6), generator=g), torch.randint(3, 60, (2, 5), generator=g)
    prompt_mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    rollout = Rollout(prompt, prompt_mask, completion, torch.ones_like(completion), ["", ""])
    mask = rollout.attention_mask
    with torch.no_grad():
        whole = model(
            input_ids=rollout.input_ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0)
        ).logits
        kept = forward_completion(model, rollout, "cpu")
    assert kept.shape == (2, 5, whole.shape[-1])
    torch.testing.assert_close(kept, whole[:, completion_positions(rollout)], rtol=1e-5, atol=1e-5)
