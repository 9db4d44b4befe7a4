"""Phase B losses and updates (docs/method.md §4) as pure functions on tensors.

Shapes: B completions, T completion tokens (right-padded, `mask` 1 on real tokens), V vocabulary,
L MoE layers, E experts, K experts per token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# rows of the KD loss computed at once (under activation checkpointing): a few [chunk, V] tensors
KD_CHUNK_TOKENS = 1024


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """Path advantages A_i = (r_i - mean_group r) / (std_group r + eps).

    Args:
        rewards: [B] with the G completions of each prompt consecutive (B divisible by G).

    Returns:
        [B] advantages; 0 for every member of a group whose rewards are all equal. The std is the
        sample std (correction 1), as TRL's GRPOTrainer computes it.
    """
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be [B] with B divisible by group_size={group_size}, got {tuple(rewards.shape)}")
    grouped = rewards.float().view(-1, group_size)
    std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(grouped[:, :1])
    return ((grouped - grouped.mean(dim=1, keepdim=True)) / (std + eps)).view(-1)


def token_logps(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[target] per position: [B, T, V], [B, T] -> [B, T].

    The policy's log-probabilities at the temperature the rollouts were sampled with, as TRL computes
    them: at T != 1, log softmax of the raw logits is not the distribution the tokens were drawn from.
    """
    scaled = logits.float() / temperature if temperature != 1.0 else logits.float()
    return torch.log_softmax(scaled, dim=-1).gather(-1, targets[..., None]).squeeze(-1)


def pr_grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    token_gamma: torch.Tensor | None = None,
    lam: float = 0.0,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    level: str = "token",
    rspo_floor: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PR-GRPO clipped surrogate (docs/method.md §4 III); lam = 0 is vanilla GRPO, level="sequence" is GSPO.

    ρ = π_θ/π_old per token; on completions with A < 0, ρ' = ρ·exp(-lam·Γ) with the factor detached.
    Loss = -min(ρ'A, clip(ρ', 1-eps_low, 1+eps_high)A), averaged over all unmasked tokens of the batch.

    Args:
        logp: [B, T] log π_θ of the sampled tokens (with grad).
        old_logp: [B, T] log π_old at rollout time.
        advantages: [B].
        mask: [B, T] 1 on completion tokens.
        token_gamma: [B, T] per-token Γ (see `token_gamma`); needed when lam != 0.
        level: "token" (GRPO) or "sequence" (GSPO: the ratio is exp of the masked mean log-ratio).
        rspo_floor: RSPO's router-shift weight on GRPO's token ratio instead of PR-GRPO's damping:
            ρ' = ρ·max(exp(-Γ), floor) on every token (lam is then unused); `rspo_gmpo_loss` is the
            RSPO paper's own method.

    Returns:
        (loss, stats): stats has `clip_frac`, `ratio_mean` and, with lam != 0, `pr_damping_mean`,
        `pr_damping_median` and `pr_clipped_negative_frac` (the share clipped to zero gradient) of the
        factor exp(-lam·Γ) over the A < 0 completion tokens (1.0 if
        none), and `pr_negative_frac`, their share of the completion tokens.
    """
    if level not in ("token", "sequence"):
        raise ValueError(f"level must be 'token' or 'sequence', got {level!r}")
    mask = mask.to(logp.dtype)
    log_ratio = logp - old_logp.detach()  # [B, T]
    adv = advantages.to(logp.dtype)[:, None]  # [B, 1]
    if (lam or rspo_floor is not None) and token_gamma is None:
        raise ValueError("lam != 0 or rspo_floor needs token_gamma")
    damping = None
    if rspo_floor is not None:
        log_ratio = log_ratio - token_gamma.detach().to(logp.dtype).clamp_max(-math.log(rspo_floor))
    elif lam:
        negative = (adv < 0).to(logp.dtype).expand_as(logp)  # [B, T]
        log_ratio = log_ratio - lam * token_gamma.detach().to(logp.dtype) * negative
        damping = torch.exp(-lam * token_gamma.detach().float())[(negative * mask).bool()]
    if level == "sequence":
        log_ratio = ((log_ratio * mask).sum(1) / mask.sum(1).clamp_min(1.0))[:, None].expand_as(logp)
    ratio = log_ratio.exp()
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    per_token = -torch.minimum(ratio * adv, clipped * adv)  # [B, T]
    n_tokens = mask.sum().clamp_min(1.0)
    loss = (per_token * mask).sum() / n_tokens
    with torch.no_grad():
        is_clipped = ((ratio < 1.0 - eps_low) & (adv < 0)) | ((ratio > 1.0 + eps_high) & (adv > 0))
        stats = {
            "clip_frac": float((is_clipped.to(mask.dtype) * mask).sum() / n_tokens),
            "ratio_mean": float((ratio * mask).sum() / n_tokens),
        }
        if damping is not None:  # 1.0 when no token has A < 0 (pr_negative_frac = 0): nothing was damped
            stats["pr_damping_mean"] = float(damping.mean()) if damping.numel() else 1.0
            stats["pr_damping_median"] = float(damping.median()) if damping.numel() else 1.0
            stats["pr_negative_frac"] = float(damping.numel() / n_tokens)
            # A < 0 tokens whose damped ratio fell below 1 - eps_low: clipped, so no gradient at all
            # (strong damping removes a token rather than weakening it)
            below = is_clipped[(negative * mask).bool()]
            stats["pr_clipped_negative_frac"] = float(below.float().mean()) if below.numel() else 0.0
    return loss, stats


def rspo_gmpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    token_gamma: torch.Tensor,
    *,
    floor: float = 0.8,
    eps_low: float = 0.4,
    eps_high: float = 0.4,
) -> tuple[torch.Tensor, dict[str, float]]:
    """RSPO, the main method of arXiv 2510.23027 ("GMPO + RS"): GMPO's geometric-mean sequence ratio
    with token-level clipping, each token's ratio first rescaled by the router-shift weight.

    Per token, w̃ = ρ·sg[max(exp(-Γ), floor)] (RSPO: "applies stop-gradient and a lower-bound floor,
    and softly rescales importance ratios prior to clipping and aggregation"). Then GMPO (arXiv
    2507.20673; its reference code, callsys/GMPO): with Δ = log w̃, clip in log space one-sidedly by
    the sign of the advantage, Δ' = sgn(A)·min(sgn(A)·Δ, sgn(A)·clamp(Δ, -eps_low, eps_high)); the
    sequence ratio is the geometric mean S_i = exp(mean_t Δ'), and J = mean_i S_i·A_i. The loss is -J.
    GMPO clips at (e^-0.4, e^0.4). RSPO's text fixes the floor's role, not its value: 0.8 is padd's
    default (`--rspo-floor`), which bounds the weight's effect to 20%, inside GMPO's clip range.
    Checked against the paper's abstract (arXiv 2510.23027v2) and its ACL ARR version (OpenReview
    ccsSKsiKGy: "a per-token router-shift ratio on the old activated experts", "RSPO (GMPO+RS)");
    Γ is the mean over layers of the mean |Δ log-score| over the old top-K experts (`padd.routing`).
    The full text's numbered equations were not available where this was written.

    Args:
        logp, old_logp: [B, T] log π_θ (with grad) and log π_old of the sampled tokens.
        advantages: [B]; mask: [B, T] 1 on completion tokens; token_gamma: [B, T] per-token Γ.

    Returns:
        (loss, stats): the mean over the B sequences; stats `clip_frac` (clipped tokens among the
        unmasked ones), `ratio_mean` (mean S_i) and `rs_weight_mean` (mean router-shift weight).
    """
    mask = mask.to(logp.dtype)
    weight = torch.exp(-token_gamma.detach().float()).clamp_min(floor).to(logp.dtype)  # [B, T]
    delta = logp - old_logp.detach() + weight.log()  # [B, T] log w̃
    sign = torch.sign(advantages.to(logp.dtype))[:, None]  # [B, 1]
    clamped = delta.clamp(-eps_low, eps_high)
    delta_clipped = sign * torch.minimum(sign * delta, sign * clamped)  # [B, T]
    lengths = mask.sum(1).clamp_min(1.0)  # [B]
    seq_ratio = torch.exp((delta_clipped * mask).sum(1) / lengths)  # [B]
    loss = -(seq_ratio * advantages.to(logp.dtype)).mean()
    with torch.no_grad():
        n_tokens = mask.sum().clamp_min(1.0)
        stats = {
            # clipped: the one-sided clip changed the token's Δ (a Δ beyond the range on the side the
            # advantage does not push towards passes unclipped)
            "clip_frac": float(((delta_clipped != delta).to(mask.dtype) * mask).sum() / n_tokens),
            "ratio_mean": float(seq_ratio.mean()),
            "rs_weight_mean": float((weight * mask).sum() / n_tokens),
        }
    return loss, stats


def _kd_chunk(student: torch.Tensor, teacher: torch.Tensor, temp: torch.Tensor) -> torch.Tensor:
    """T² · KL(softmax(teacher/T) ‖ softmax(student/T)) per row: [N, V], [N, V], [N] -> [N]."""
    t = temp[:, None]
    log_p_teacher = F.log_softmax(teacher.float() / t, dim=-1)
    log_p_student = F.log_softmax(student.float() / t, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)
    return temp**2 * kl


def _kd_rows(student: torch.Tensor, teacher: torch.Tensor, temp: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """Sum over rows of T²·KL(softmax(teacher/T) ‖ softmax(student/T)): [N, V], [N, V], [N] -> [].

    Chunks of `chunk_tokens` rows under activation checkpointing keep peak memory at a few
    [chunk, V] tensors even with a 150k vocabulary.
    """
    total = student.new_zeros((), dtype=torch.float32)
    for i in range(0, student.shape[0], chunk_tokens):
        args = (student[i : i + chunk_tokens], teacher[i : i + chunk_tokens], temp[i : i + chunk_tokens])
        per_row = checkpoint(_kd_chunk, *args, use_reentrant=False) if student.requires_grad else _kd_chunk(*args)
        total = total + per_row.sum()
    return total


def distill_kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_tokens: int = KD_CHUNK_TOKENS,
) -> torch.Tensor:
    """T²·KL(softmax(teacher/T) ‖ softmax(student/T)) averaged over unmasked tokens (the warm-up loss).

    Args:
        student_logits, teacher_logits: [B, T, V]; mask: [B, T].
    """
    keep = mask.bool()
    rows = student_logits[keep]
    if rows.shape[0] == 0:
        return student_logits.sum() * 0.0
    temp = torch.full((rows.shape[0],), float(temperature), device=rows.device)
    return _kd_rows(rows, teacher_logits[keep].detach(), temp, chunk_tokens) / rows.shape[0]


def adaptive_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    tau: float = 1.0,
    t_min: float = 0.05,
    chunk_tokens: int = KD_CHUNK_TOKENS,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Adaptive KD (docs/method.md §4 II): per completion T_i = max(tau·Φ(A_i), t_min); per token
    T_i²·KL(softmax(z_teacher/T_i) ‖ softmax(z_student/T_i)); mean over unmasked tokens.

    Args:
        student_logits, teacher_logits: [B, T, V] (teacher without grad).
        advantages: [B]; mask: [B, T].
    """
    temps = (tau * 0.5 * (1.0 + torch.erf(advantages.float() / math.sqrt(2.0)))).clamp_min(t_min)  # [B]
    keep = mask.bool()
    rows = student_logits[keep]
    if rows.shape[0] == 0:
        return student_logits.sum() * 0.0, {"kd_temp_mean": float(temps.mean()), "kd_kl": 0.0}
    row_temp = temps[:, None].expand(mask.shape)[keep]
    loss = _kd_rows(rows, teacher_logits[keep].detach(), row_temp, chunk_tokens) / rows.shape[0]
    return loss, {"kd_temp_mean": float(temps.mean()), "kd_kl": float(loss.detach())}


def token_gamma(
    router_logp_now: torch.Tensor,
    router_logp_old: torch.Tensor,
    topk_old: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """Per-token router shift Γ (RSPO's definition, docs/method.md §4 III), without gradient.

    For each MoE layer l: the mean over the rollout-time top-K experts e of
    |log p_now,l(e|h) - log p_old,l(e|h)|, p the normalised router score; then the mean over layers.

    Args:
        router_logp_now: [L, B, T, E] log normalised router scores from the current forward.
        router_logp_old: [L, B, T, E] the same at rollout time.
        topk_old: [L, B, T, K] the experts selected at rollout time.
        mask: [B, T].

    Returns:
        [B, T] Γ, zero on masked positions.
    """
    with torch.no_grad():
        delta = (router_logp_now.float() - router_logp_old.float()).abs()
        per_layer = delta.gather(-1, topk_old.long()).mean(-1)  # [L, B, T]
        return per_layer.mean(0) * mask.to(per_layer.dtype)


def update_routing_bias(
    bias: torch.Tensor,
    load: torch.Tensor,
    adv_ema: torch.Tensor,
    *,
    eta: float,
    reward_coef: float,
    clip: float,
    rule: str = "proportional",
) -> torch.Tensor:
    """Reward-augmented load balance (docs/method.md §4 IV): b ← clip(b - η(f - f̄) + γ·m, ±clip).

    Overloaded experts are pushed down, experts on high-advantage paths pulled up. `rule="sign"`
    is DeepSeek-V3's update, -η·sign(f - f̄), in place of the proportional load term.

    Args:
        bias: [..., E] e_score_correction_bias per layer.
        load: [..., E] f_e, each expert's load relative to the uniform share (its share of the routed
            (token, slot) pairs times E), so a balanced layer has f_e = f̄ = 1.
        adv_ema: [..., E] m_e, EMA of the mean advantage of the tokens routed to e.

    Returns:
        the new bias (a new tensor, same shape and dtype).
    """
    if rule not in ("proportional", "sign"):
        raise ValueError(f"rule must be 'proportional' or 'sign', got {rule!r}")
    f = load.to(torch.float32)
    excess = f - f.mean(-1, keepdim=True)
    if rule == "sign":
        excess = torch.sign(excess)
    new = bias.float() - eta * excess + reward_coef * adv_ema.float()
    return new.clamp(-clip, clip).to(bias.dtype)


def update_advantage_ema(
    adv_ema: torch.Tensor, adv_sum: torch.Tensor, counts: torch.Tensor, decay: float = 0.9
) -> torch.Tensor:
    """m_e ← decay·m_e + (1-decay)·(mean advantage of the tokens routed to e); experts that received
    no token this step keep their value.

    Args:
        adv_ema, adv_sum, counts: [..., E]; adv_sum is the summed advantage over routed (token, slot) pairs.
    """
    mean = adv_sum.float() / counts.float().clamp_min(1.0)
    updated = decay * adv_ema.float() + (1.0 - decay) * mean
    return torch.where(counts > 0, updated, adv_ema.float()).to(adv_ema.dtype)
