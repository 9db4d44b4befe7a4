"""Phase B losses against direct, slow references written here, and their limits."""

import math

import pytest
import torch

from padd.losses import (
    adaptive_kd_loss,
    distill_kl_loss,
    group_advantages,
    pr_grpo_loss,
    rspo_gmpo_loss,
    token_gamma,
    token_logps,
    update_advantage_ema,
    update_routing_bias,
)


def random_batch(b=6, t=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(b, t, generator=g) * 3).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(b, t, generator=g)
    adv = torch.randn(b, generator=g)
    mask = (torch.rand(b, t, generator=g) > 0.25).float()
    mask[:, 0] = 1
    shift = torch.rand(b, t, generator=g)
    return logp, old, adv, mask, shift


def reference_pr_grpo(logp, old, adv, mask, shift, lam, eps_low, eps_high, level):
    logp = logp.detach()
    total, count = 0.0, 0.0
    for i in range(logp.shape[0]):
        log_ratios = []
        for t in range(logp.shape[1]):
            lr = float(logp[i, t] - old[i, t])
            if adv[i] < 0:
                lr -= lam * float(shift[i, t])
            log_ratios.append(lr)
        if level == "sequence":
            seq = sum(lr * float(mask[i, t]) for t, lr in enumerate(log_ratios)) / float(mask[i].sum())
            log_ratios = [seq] * len(log_ratios)
        for t, lr in enumerate(log_ratios):
            if mask[i, t]:
                r = math.exp(lr)
                a = float(adv[i])
                total += -min(r * a, min(max(r, 1 - eps_low), 1 + eps_high) * a)
                count += 1
    return total / count


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("lam", [0.0, 0.7])
def test_pr_grpo_matches_reference(level, lam):
    logp, old, adv, mask, shift = random_batch()
    loss, stats = pr_grpo_loss(
        logp, old, adv, mask, token_gamma=shift, lam=lam, eps_low=0.2, eps_high=0.28, level=level
    )
    assert loss.item() == pytest.approx(reference_pr_grpo(logp, old, adv, mask, shift, lam, 0.2, 0.28, level), rel=1e-5)
    assert 0.0 <= stats["clip_frac"] <= 1.0


def test_lam_zero_is_vanilla_grpo_exactly():
    logp, old, adv, mask, shift = random_batch(seed=3)
    a, _ = pr_grpo_loss(logp, old, adv, mask, token_gamma=shift, lam=0.0)
    b, _ = pr_grpo_loss(logp, old, adv, mask)
    ga = torch.autograd.grad(a, logp)[0]
    gb = torch.autograd.grad(b, logp)[0]
    assert torch.equal(a, b) and torch.equal(ga, gb)


def test_damping_touches_only_negative_advantage_paths_and_carries_no_gradient():
    logp, old, adv, mask, shift = random_batch(seed=4)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0])
    shift = shift.requires_grad_()
    damped, _ = pr_grpo_loss(logp, old, adv, mask, token_gamma=shift, lam=2.0, eps_low=10, eps_high=10)
    plain, _ = pr_grpo_loss(logp, old, adv, mask, eps_low=10, eps_high=10)
    g_damped = torch.autograd.grad(damped, logp, retain_graph=True)[0]
    g_plain = torch.autograd.grad(plain, logp)[0]
    pos = adv > 0
    assert torch.allclose(g_damped[pos], g_plain[pos])
    assert not torch.allclose(g_damped[~pos], g_plain[~pos])
    assert torch.autograd.grad(damped, shift, allow_unused=True)[0] is None


def test_rspo_weight_is_floored_and_on_every_token():
    logp, old, adv, mask, shift = random_batch(seed=6)
    shift = shift * 3
    loss, _ = pr_grpo_loss(logp, old, adv, mask, token_gamma=shift, rspo_floor=0.5, eps_low=10, eps_high=10)
    weight = torch.clamp(torch.exp(-shift), min=0.5)
    ratio = (logp.detach() - old).exp() * weight
    expected = (-(ratio * adv[:, None]) * mask).sum() / mask.sum()
    assert loss.item() == pytest.approx(float(expected), rel=1e-5)


def test_equal_rewards_give_zero_advantage_and_zero_policy_gradient():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    adv = group_advantages(rewards, 3)
    assert adv[:3].abs().max() == 0
    logp, old, _, mask, _ = random_batch(b=3)
    loss, _ = pr_grpo_loss(logp, old, adv[:3], mask)
    assert torch.autograd.grad(loss, logp)[0].abs().max() == 0


def test_group_advantages_reference():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0])
    adv = group_advantages(rewards, 4, eps=1e-6)
    for g in range(2):
        r = rewards[4 * g : 4 * g + 4]
        mean, std = r.mean(), r.std()  # sample std, as TRL
        assert torch.allclose(adv[4 * g : 4 * g + 4], (r - mean) / (std + 1e-6))
    with pytest.raises(ValueError):
        group_advantages(torch.ones(5), 2)


def reference_kd(student, teacher, adv, mask, tau, t_min):
    total, count = 0.0, 0
    for i in range(student.shape[0]):
        phi = 0.5 * (1 + math.erf(float(adv[i]) / math.sqrt(2)))
        temp = max(tau * phi, t_min)
        for t in range(student.shape[1]):
            if mask[i, t]:
                p = torch.softmax(teacher[i, t].detach().double() / temp, -1)
                q = torch.softmax(student[i, t].detach().double() / temp, -1)
                total += temp**2 * float((p * (p.log() - q.log())).sum())
                count += 1
    return total / count


@pytest.mark.parametrize("chunk", [1, 5, 1024])
def test_adaptive_kd_matches_reference_for_any_chunking(chunk):
    g = torch.Generator().manual_seed(1)
    student = torch.randn(4, 5, 11, generator=g, requires_grad=True)
    teacher = torch.randn(4, 5, 11, generator=g)
    adv = torch.tensor([-2.0, -0.1, 0.0, 1.5])
    mask = torch.ones(4, 5)
    mask[1, 3:] = 0
    loss, stats = adaptive_kd_loss(student, teacher, adv, mask, tau=1.5, t_min=0.2, chunk_tokens=chunk)
    assert loss.item() == pytest.approx(reference_kd(student, teacher, adv, mask, 1.5, 0.2), rel=1e-5)
    loss.backward()
    assert student.grad[1, 3:].abs().max() == 0 and student.grad[0].abs().max() > 0


def test_distill_kl_is_adaptive_kd_at_a_fixed_temperature():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(2, 4, 9, generator=g), torch.randn(2, 4, 9, generator=g)
    mask = torch.ones(2, 4)
    # A = +inf gives Φ = 1, so T = tau for every completion.
    adaptive, _ = adaptive_kd_loss(s, t, torch.full((2,), float("inf")), mask, tau=1.0)
    assert float(distill_kl_loss(s, t, mask)) == pytest.approx(float(adaptive), rel=1e-6)
    assert float(distill_kl_loss(s, t, mask, temperature=2.0)) == pytest.approx(
        reference_kd(s, t, torch.full((2,), float("inf")), mask, 2.0, 0.05), rel=1e-5
    )


def test_zero_advantage_means_temperature_tau_over_two():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(2, 3, 7, generator=g), torch.randn(2, 3, 7, generator=g)
    _, stats = adaptive_kd_loss(s, t, torch.zeros(2), torch.ones(2, 3), tau=0.8)
    assert stats["kd_temp_mean"] == pytest.approx(0.4)
    same, _ = adaptive_kd_loss(t, t, torch.zeros(2), torch.ones(2, 3))
    assert float(same) == pytest.approx(0.0, abs=1e-6)


def test_token_gamma_reference():
    g = torch.Generator().manual_seed(5)
    L, B, T, E, K = 3, 2, 4, 6, 2
    now = torch.log_softmax(torch.randn(L, B, T, E, generator=g), -1)
    old = torch.log_softmax(torch.randn(L, B, T, E, generator=g), -1)
    topk = torch.rand(L, B, T, E, generator=g).topk(K, -1).indices
    mask = torch.ones(B, T)
    mask[1, 2:] = 0
    gamma = token_gamma(now, old, topk, mask)
    for b in range(B):
        for t in range(T):
            per_layer = [
                sum(abs(float(now[layer, b, t, e] - old[layer, b, t, e])) for e in topk[layer, b, t]) / K
                for layer in range(L)
            ]
            expected = sum(per_layer) / L
            assert float(gamma[b, t]) == pytest.approx(expected * float(mask[b, t]), rel=1e-5)
    assert float(token_gamma(old, old, topk, mask).abs().max()) == 0.0


def test_bias_update_pushes_overloaded_expert_down_and_balances_load():
    bias = torch.zeros(4)
    load = torch.tensor([0.7, 0.1, 0.1, 0.1]) * 4  # relative to the uniform share
    new = update_routing_bias(bias, load, torch.zeros(4), eta=0.1, reward_coef=0.0, clip=1.0)
    assert new[0] < 0 and (new[1:] > 0).all() and float(new.sum()) == pytest.approx(0.0, abs=1e-7)
    rewarded = update_routing_bias(
        bias, torch.ones(4), torch.tensor([0.0, 1.0, 0.0, -1.0]), eta=0.1, reward_coef=0.5, clip=0.3
    )
    assert rewarded.tolist() == pytest.approx([0.0, 0.3, 0.0, -0.3])  # clipped at 0.3


def test_bias_loop_balances_a_skewed_router():
    """Iterating the update on a router whose scores favour one expert evens the top-1 load."""
    g = torch.Generator().manual_seed(0)
    scores = torch.sigmoid(torch.randn(2000, 4, generator=g) + torch.tensor([1.5, 0.0, 0.0, -0.5]))
    bias = torch.zeros(4)
    for _ in range(300):
        load = torch.bincount((scores + bias).argmax(-1), minlength=4).float() / 2000 * 4
        bias = update_routing_bias(bias, load, torch.zeros(4), eta=0.0125, reward_coef=0.0, clip=2.0)
    assert load.max() / load.mean() < 1.1


def test_advantage_ema_keeps_unrouted_experts():
    ema = torch.tensor([0.5, -0.5, 0.0])
    new = update_advantage_ema(ema, torch.tensor([2.0, 0.0, -3.0]), torch.tensor([2, 0, 3]), decay=0.5)
    assert new.tolist() == pytest.approx([0.75, -0.5, -0.5])


def test_bias_rules_on_relative_loads():
    """Loads are relative to the uniform share: a balanced layer leaves the bias alone, and the sign
    rule (DeepSeek-V3) moves each expert by exactly η."""
    bias = torch.tensor([0.1, -0.1, 0.0, 0.0])
    same = update_routing_bias(bias, torch.ones(4), torch.zeros(4), eta=0.5, reward_coef=0.0, clip=1.0)
    assert torch.equal(same, bias)
    load = torch.tensor([2.0, 1.5, 0.5, 0.0])
    sign = update_routing_bias(torch.zeros(4), load, torch.zeros(4), eta=0.01, reward_coef=0.0, clip=1.0, rule="sign")
    assert sign.tolist() == pytest.approx([-0.01, -0.01, 0.01, 0.01])
    prop = update_routing_bias(torch.zeros(4), load, torch.zeros(4), eta=0.01, reward_coef=0.0, clip=1.0)
    assert prop.tolist() == pytest.approx([-0.01, -0.005, 0.005, 0.01])
    with pytest.raises(ValueError, match="rule"):
        update_routing_bias(bias, load, bias, eta=0.1, reward_coef=0.0, clip=1.0, rule="aux-loss")


def test_token_logps_at_the_sampling_temperature():
    g = torch.Generator().manual_seed(7)
    logits, targets = torch.randn(3, 4, 11, generator=g), torch.randint(0, 11, (3, 4), generator=g)
    at = token_logps(logits, targets, temperature=0.8)
    expected = torch.log_softmax(logits / 0.8, -1).gather(-1, targets[..., None]).squeeze(-1)
    assert torch.allclose(at, expected, atol=1e-6)
    assert not torch.allclose(at, token_logps(logits, targets), atol=1e-3)


def reference_rspo(logp, old, adv, mask, shift, floor, eps_low, eps_high):
    """RSPO = GMPO + router shift, written out per sequence (arXiv 2510.23027 on arXiv 2507.20673):
    w̃_t = ρ_t·max(e^{-Γ_t}, floor); per token, for A >= 0 keep min(w̃, clip(w̃)), for A < 0 max(w̃, clip(w̃))
    with clip to (e^{-eps_low}, e^{eps_high}); S = (Π_t kept_t)^{1/|o|}; J = mean_i S_i A_i."""
    total = 0.0
    for i in range(logp.shape[0]):
        a = float(adv[i])
        log_kept, n = 0.0, 0
        for t in range(logp.shape[1]):
            if not mask[i, t]:
                continue
            w = math.exp(float(logp[i, t] - old[i, t])) * max(math.exp(-float(shift[i, t])), floor)
            c = min(max(w, math.exp(-eps_low)), math.exp(eps_high))
            kept = min(w, c) if a > 0 else (max(w, c) if a < 0 else 1.0)
            log_kept += math.log(kept)
            n += 1
        total += math.exp(log_kept / n) * a
    return -total / logp.shape[0]


@pytest.mark.parametrize("seed", [0, 1])
def test_rspo_gmpo_matches_its_papers_formula(seed):
    logp, old, adv, mask, shift = random_batch(seed=seed)
    shift = shift * 0.6
    loss, stats = rspo_gmpo_loss(logp, old, adv, mask, shift, floor=0.8, eps_low=0.4, eps_high=0.4)
    assert loss.item() == pytest.approx(reference_rspo(logp.detach(), old, adv, mask, shift, 0.8, 0.4, 0.4), rel=1e-5)
    assert 0.8 <= stats["rs_weight_mean"] <= 1.0 and 0.0 <= stats["clip_frac"] <= 1.0
    # the weight carries no gradient, and a clipped token none either
    shift = shift.requires_grad_()
    loss, _ = rspo_gmpo_loss(logp, old, adv, mask, shift, floor=0.8)
    assert torch.autograd.grad(loss, shift, allow_unused=True)[0] is None


def test_rspo_weight_lowers_the_ratio_of_shifted_tokens_only_down_to_its_floor():
    logp, old, adv, mask, _ = random_batch(seed=9)
    old = logp.detach().clone()  # on-policy: every ratio 1
    none, _ = rspo_gmpo_loss(logp, old, adv, mask, torch.zeros_like(old), eps_low=10, eps_high=10)
    huge, stats = rspo_gmpo_loss(logp, old, adv, mask, torch.full_like(old, 50.0), floor=0.8, eps_low=10, eps_high=10)
    assert none.item() == pytest.approx(-float(adv.mean()), rel=1e-6)
    assert huge.item() == pytest.approx(-0.8 * float(adv.mean()), rel=1e-5) and stats[
        "rs_weight_mean"
    ] == pytest.approx(0.8)


def test_pr_damping_is_reported_on_negative_advantage_tokens():
    logp, old, adv, mask, shift = random_batch(seed=11)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0])
    _, stats = pr_grpo_loss(logp, old, adv, mask, token_gamma=shift, lam=3.0)
    negative = (adv < 0)[:, None].expand_as(mask) & mask.bool()
    damping = torch.exp(-3.0 * shift)[negative]
    assert stats["pr_damping_mean"] == pytest.approx(float(damping.mean()), rel=1e-6)
    assert stats["pr_damping_median"] == pytest.approx(float(damping.median()), rel=1e-6)
    assert "pr_damping_mean" not in pr_grpo_loss(logp, old, adv, mask)[1]
    # a damped ratio below 1 - eps on an A < 0 token is clipped: that token keeps no gradient
    damped_ratio = torch.exp(logp - old - 3.0 * shift).detach()[negative]
    assert stats["pr_clipped_negative_frac"] == pytest.approx(float((damped_ratio < 0.8).float().mean()), abs=1e-6)


def test_rspo_clip_frac_counts_only_what_the_one_sided_clip_changed():
    """A > 0: Δ = +0.6 is clipped to 0.4, Δ = -0.6 passes (GMPO clips only the side A pushes to)."""
    old = torch.zeros(1, 2)
    logp = torch.tensor([[0.6, -0.6]])
    _, stats = rspo_gmpo_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 2), torch.zeros(1, 2), floor=0.8)
    assert stats["clip_frac"] == 0.5
