"""Every method of docs/method.md §4 as one setting of the same update: which terms are on, and their weights."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from padd.config import ConfigError, TrainConfig
from padd.losses import adaptive_kd_loss, distill_kl_loss, pr_grpo_loss, rspo_gmpo_loss
from padd.methods import ABLATION_SWITCHES, METHOD_ONLY_OPTIONS, METHODS, OFF_AT_ZERO, options_of


@dataclass(frozen=True)
class Objective:
    """What one update optimises: the policy term (III or a baseline's), KD (II), the bias rule (IV).

    policy and kd: the method's terms (padd.methods.Method); kd is None when its weight is 0.
    """

    policy: str | None
    eps_low: float
    eps_high: float
    lam: float
    shift_norm: str
    rspo_floor: float | None
    rspo_base: str | None
    kd: str | None
    kd_coef: float
    tau: float
    t_min: float
    eta: float
    balance_reward_coef: float
    adv_ema: float


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def resolve(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with its method's defaults filled in (padd.methods), after refusing every option the
    method, its ablation switches or its rollout backend would leave without effect."""
    switches = {name: getattr(cfg, name) for name in ABLATION_SWITCHES}
    if cfg.method != "padd" and (on := [s for s, v in switches.items() if v]):
        raise ConfigError(f"{', '.join(map(_flag, on))}: an ablation of padd; --method {cfg.method} has no such stage")
    used = options_of(cfg.method, switches)
    given_unused = [n for n in METHOD_ONLY_OPTIONS if getattr(cfg, n) is not None and n not in used]
    if given_unused:
        why = f"--method {cfg.method}" + "".join(f" {_flag(s)}" for s, v in switches.items() if v)
        raise ConfigError(
            f"{why} does not use {', '.join(map(_flag, given_unused))}; drop it "
            f"(it reads: {', '.join(map(_flag, used)) or 'none of the method options'})"
        )
    # a dependent at its default (the method's, else padd train's) changes nothing and is let through
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)} | dict(used)
    for option, dependents in OFF_AT_ZERO.items():
        if getattr(cfg, option) == 0:
            given = [d for d in dependents if getattr(cfg, d) not in (None, defaults[d])]
            if given:
                raise ConfigError(
                    f"{_flag(option)} 0 turns its stage off, so {', '.join(map(_flag, given))} would have no "
                    "effect; drop it (or keep the stage on)"
                )
    vllm_options = ("vllm_gpu_memory", "vllm_max_model_len")
    if cfg.rollout != "vllm" and (vllm := [n for n in vllm_options if getattr(cfg, n) is not None]):
        server = (
            "; a vLLM server sizes itself: pass --gpu-memory-utilization / --max-model-len to `vllm serve`"
            if cfg.rollout == "vllm-server"
            else ""
        )
        beside = "only act with --rollout vllm (the engine beside the trainer)"
        raise ConfigError(f"{', '.join(map(_flag, vllm))} {beside}{server}")
    if cfg.rollout != "vllm-server" and cfg.vllm_server_url is not None:
        raise ConfigError("--vllm-server-url only acts with --rollout vllm-server; add it, or drop the URL")
    if cfg.rollout == "vllm-server":
        if not cfg.vllm_server_url:
            raise ConfigError(
                "--rollout vllm-server needs --vllm-server-url http://HOST:PORT of a running vLLM server "
                "(docs/vllm-server.md says how to start it)"
            )
        if not cfg.vllm_server_url.startswith(("http://", "https://")):
            raise ConfigError(f"--vllm-server-url {cfg.vllm_server_url}: give an http:// or https:// address")
        if cfg.routing_replay:
            raise ConfigError(
                "--routing-replay needs the engine's expert selections, which a vLLM server's completions do not "
                "return: use --rollout vllm, or drop it"
            )
    filled = {name: default for name, default in used.items() if getattr(cfg, name) is None}
    if cfg.rollout == "vllm" and cfg.device == "cpu" and cfg.routing_replay:
        raise ConfigError(
            "--routing-replay needs vLLM's routed-expert return, which only its Model Runner V2 gives (Triton, "
            "a GPU): run it with --device cuda, or drop it on a CPU"
        )
    if cfg.vllm_sleep and (cfg.rollout != "vllm" or cfg.device != "cuda"):
        raise ConfigError(
            "--vllm-sleep puts the colocated engine of --rollout vllm to sleep, which vLLM can do on a GPU "
            "only (its CuMemAllocator): give --rollout vllm --device cuda, or drop it"
        )
    if cfg.rollout == "vllm" and cfg.device == "cpu" and cfg.vllm_gpu_memory is not None:
        raise ConfigError(
            "--vllm-gpu-memory only acts on a GPU; on a CPU, VLLM_CPU_KVCACHE_SPACE (GiB) sizes the engine"
        )
    cfg = dataclasses.replace(cfg, **filled)
    # With one update per rollout batch the rollout-time router is the current one: Γ would be 0 on
    # every token and stage III (or RSPO's weight) would never act.
    reads_shift = (cfg.method == "padd" and not cfg.no_pr and cfg.lam) or cfg.method == "rspo"
    if reads_shift and cfg.updates_per_batch == 1 and cfg.gamma_anchor == "rollout":
        raise ConfigError(
            f"--method {cfg.method} with --updates-per-batch 1 measures Γ against the rollout-time router, "
            "which is the current one: Γ = 0 and the router-shift term never acts; use --updates-per-batch 2 "
            "or more, or --gamma-anchor previous"
        )
    return cfg


def _default(value, default):
    """`value` unless it is None (a given 0 stays 0)."""
    return default if value is None else value


def objective_of(cfg: TrainConfig) -> Objective:
    """The objective of a config (resolved here if it was not already)."""
    cfg = resolve(cfg)
    method = METHODS[cfg.method]
    if method.policy is None and not cfg.kd_coef:
        raise ConfigError(f"--method {cfg.method} with --kd-coef 0 trains nothing")
    kd = method.kd if cfg.kd_coef else None  # None under --no-kd or --kd-coef 0
    return Objective(
        policy=method.policy,
        eps_low=_default(cfg.eps_low, 0.0),
        eps_high=_default(cfg.eps_high, 0.0),
        lam=_default(cfg.lam, 0.0),
        shift_norm=_default(cfg.shift_norm, "none"),
        rspo_floor=cfg.rspo_floor,
        rspo_base=cfg.rspo_base,
        kd=kd,
        kd_coef=_default(cfg.kd_coef, 0.0),
        tau=_default(cfg.tau, 1.0),
        t_min=_default(cfg.t_min, 0.0),
        eta=cfg.eta,
        balance_reward_coef=_default(cfg.balance_reward_coef, 0.0),
        adv_ema=_default(cfg.adv_ema, 0.9),
    )


class ShiftScale:
    """Γ as stage III's damping reads it: as measured (`shift_norm="none"`), or divided by its running
    mean (`"running-mean"`), so that λ means the same at every learning rate and model size.

    The mean is over the completion tokens of all ranks, and only mini-batches whose router has moved
    since the anchor update it (Γ is exactly 0 on the first, on-policy one)."""

    def __init__(self, shift_norm: str):
        self.shift_norm = shift_norm
        self.value: float | None = None  # the running mean of Γ, once a mini-batch has measured one

    @property
    def reads_batch_mean(self) -> bool:
        """Whether the damping depends on the whole mini-batch's Γ (the running mean), so that a
        mini-batch run in micro-batches must measure Γ on all of them before any loss."""
        return self.shift_norm == "running-mean"

    def observe(self, token_gamma: torch.Tensor, mask: torch.Tensor, sum_dict) -> None:
        """Update the running mean with one mini-batch's [n, C] Γ and mask (all ranks' tokens;
        `sum_dict` sums a dict over ranks); nothing to keep under shift_norm="none"."""
        if not self.reads_batch_mean:
            return
        sums = sum_dict({"gamma": float((token_gamma * mask).sum()), "tokens": float(mask.sum())})
        mean = sums["gamma"] / max(sums["tokens"], 1.0)
        if mean > 0:
            self.value = mean if self.value is None else 0.9 * self.value + 0.1 * mean

    def apply(self, token_gamma: torch.Tensor) -> torch.Tensor:
        """[n, C] Γ as the damping reads it, after `observe` saw the whole mini-batch."""
        if not self.reads_batch_mean:
            return token_gamma
        return token_gamma / self.value if self.value else token_gamma

    def __call__(self, token_gamma: torch.Tensor, mask: torch.Tensor, sum_dict) -> torch.Tensor:
        """[n, C] Γ for the damping, from one whole mini-batch's [n, C] Γ and mask."""
        self.observe(token_gamma, mask, sum_dict)
        return self.apply(token_gamma)


def policy_loss(
    objective: Objective,
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    token_gamma: torch.Tensor,
    damping_gamma: torch.Tensor | None,
) -> tuple[torch.Tensor, dict[str, float], bool]:
    """The method's RL term on one mini-batch: (loss, stats, per_sequence).

    logp, old_logp, mask, token_gamma: [n, C]; advantages: [n]. `damping_gamma`: Γ as III's damping
    reads it (ShiftScale), None when λ = 0. per_sequence: the loss is a mean over completions
    (RSPO's GMPO aggregation) rather than over tokens.
    """
    clip = {"eps_low": objective.eps_low, "eps_high": objective.eps_high}
    if objective.policy == "rspo" and objective.rspo_base == "gmpo":
        loss, stats = rspo_gmpo_loss(logp, old_logp, advantages, mask, token_gamma, floor=objective.rspo_floor, **clip)
        return loss, stats, True
    if objective.policy == "rspo":
        loss, stats = pr_grpo_loss(
            logp, old_logp, advantages, mask, token_gamma=token_gamma, rspo_floor=objective.rspo_floor, **clip
        )
        return loss, stats, False
    level = "sequence" if objective.policy == "gspo" else "token"
    loss, stats = pr_grpo_loss(
        logp, old_logp, advantages, mask, token_gamma=damping_gamma, lam=objective.lam, level=level, **clip
    )
    return loss, stats, False


def kd_loss(
    objective: Objective, logits: torch.Tensor, teacher_logits: torch.Tensor, advantages: torch.Tensor, mask
) -> tuple[torch.Tensor, dict[str, float]]:
    """The method's weighted KD term (II's adaptive temperature, or Online KD's fixed temperature 1)
    on one mini-batch: logits, teacher_logits [n, C, V]; advantages [n]; mask [n, C]."""
    if objective.kd == "adaptive":
        kd, stats = adaptive_kd_loss(logits, teacher_logits, advantages, mask, tau=objective.tau, t_min=objective.t_min)
    else:  # online KD: on-policy distillation at temperature 1
        kd = distill_kl_loss(logits, teacher_logits, mask, temperature=1.0)
        stats = {"kd_temp_mean": 1.0, "kd_kl": float(kd.detach())}
    return objective.kd_coef * kd, stats


@dataclass(frozen=True)
class BatchTokens:
    """The denominators of one mini-batch's means: this rank's completion tokens and sequences, and
    all ranks' completion tokens. Every micro-batch of the mini-batch divides by these, not by its own."""

    local_tokens: torch.Tensor
    global_tokens: torch.Tensor
    local_sequences: int

    @classmethod
    def of(cls, mask: torch.Tensor, dist) -> BatchTokens:
        """From this rank's whole mini-batch mask [n, C] (a collective)."""
        local = mask.sum()
        return cls(local, dist.all_reduce_sum(local.detach().clone()).clamp_min(1.0), mask.shape[0])


def term_shares(per_sequence: bool, mask: torch.Tensor, batch: BatchTokens) -> dict[str, torch.Tensor]:
    """A micro-batch's ([n, C] `mask`) weight in its rank's mini-batch mean, per kind of term: its
    share of the completion tokens ("token") and, for a mean over completions, of the completions
    ("pg" when `per_sequence`). Both are 1 for the whole mini-batch."""
    tokens = mask.sum() / batch.local_tokens.clamp_min(1.0)
    sequences = torch.tensor(mask.shape[0] / batch.local_sequences, device=mask.device)
    return {"token": tokens, "pg": sequences if per_sequence else tokens, "completions": sequences}


# What a logged statistic is a mean over, when it is not the completion tokens: the A < 0 tokens
# (III's damping, a share of the pr_negative_frac tokens) or the completions (the KD temperature).
STAT_DENOMINATORS = {
    "pr_damping_mean": "negative",
    "pr_damping_median": "negative",
    "pr_clipped_negative_frac": "negative",
    "kd_temp_mean": "completions",
}


def combine_stats(parts: list[tuple[dict[str, float], float, float]]) -> dict[str, float]:
    """A mini-batch's statistics from its micro-batches' (stats, token share, completion share):
    each the mean over its own denominator (STAT_DENOMINATORS; tokens otherwise), so a mean is the
    whole mini-batch's; a median becomes the weighted mean of the micro-batches' medians."""
    combined = {}
    for key in parts[0][0]:
        kind = STAT_DENOMINATORS.get(key, "tokens")
        weights = [
            tokens * (stats.get("pr_negative_frac", 0.0) if kind == "negative" else 1.0)
            if kind != "completions"
            else sequences
            for stats, tokens, sequences in parts
        ]
        total = sum(weights)
        if total == 0:  # e.g. no A < 0 token anywhere: every part reports the same neutral value
            combined[key] = parts[0][0][key]
            continue
        combined[key] = sum(stats[key] * w for (stats, _, _), w in zip(parts, weights, strict=True)) / total
    return combined


def rank_scaled_loss(
    terms: dict[str, torch.Tensor], per_sequence: bool, mask: torch.Tensor, dist, batch: BatchTokens | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the loss to backpropagate, this rank's completion tokens, all ranks' completion tokens).

    A token-mean term is rescaled by this micro-batch's share of all ranks' tokens, so that DDP's
    gradient average over ranks, summed over micro-batches, is the gradient of the mean over the
    global mini-batch. A mean over completions (`per_sequence` policy term) is rescaled by its share
    of this rank's completions only: every rank holds the same number of them.
    `dist`: padd.distributed.Dist; mask: [n, C]; `batch`: the whole mini-batch's (default: `mask` is it)."""
    batch = batch or BatchTokens.of(mask, dist)
    token_share = mask.sum() * dist.world / batch.global_tokens
    sequence_share = mask.shape[0] / batch.local_sequences
    scaled = sum(v * (sequence_share if (k == "pg" and per_sequence) else token_share) for k, v in terms.items())
    return scaled, batch.local_tokens, batch.global_tokens


def check_finite(terms: dict[str, torch.Tensor], dist, where: str) -> None:
    """Stop on a non-finite loss term, on every rank together (so none waits in a collective)."""
    bad = dist.all_reduce_sum(torch.tensor([float(not torch.isfinite(v)) for v in terms.values()]))
    for (name, value), flagged in zip(terms.items(), bad, strict=True):
        if flagged:
            raise FloatingPointError(f"loss term {name!r} is not finite (here: {value.item()}) at {where}")


@dataclass
class Loss:
    """One mini-batch's objective: the weighted terms ("pg", "kd"), their stats, and what to
    backpropagate (the terms rescaled for data parallelism, see `rank_scaled_loss`)."""

    terms: dict[str, torch.Tensor]
    stats: dict[str, float]
    backward: torch.Tensor
    local_tokens: torch.Tensor
    global_tokens: torch.Tensor
    per_sequence: bool = False  # the policy term is a mean over completions (RSPO's GMPO)

    @property
    def total(self) -> torch.Tensor:
        return sum(self.terms.values())


def objective_loss(
    objective: Objective,
    logits: torch.Tensor,
    logp: torch.Tensor,
    old_logps: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    token_gamma: torch.Tensor,
    damping_gamma: torch.Tensor | None,
    dist,
    batch: BatchTokens | None = None,
) -> Loss:
    """The method's loss on one mini-batch, or on one micro-batch of it: its RL term (III or a
    baseline's) plus its KD term (II), each a mean over the part given; `backward` is scaled by the
    part's share of `batch`, the whole mini-batch (default: the part is the mini-batch).

    logits, teacher_logits: [n, C, V] (teacher_logits None when the method has no KD); logp,
    old_logps, mask, token_gamma, damping_gamma: [n, C]; advantages: [n]; `dist`: padd.distributed.Dist.
    """
    terms: dict[str, torch.Tensor] = {}
    stats: dict[str, float] = {}
    per_sequence = False
    if objective.policy:
        terms["pg"], pg_stats, per_sequence = policy_loss(
            objective, logp, old_logps, advantages, mask, token_gamma, damping_gamma
        )
        stats.update(pg_stats)
    if objective.kd:
        terms["kd"], kd_stats = kd_loss(objective, logits, teacher_logits, advantages, mask)
        stats.update(kd_stats)
    backward, local_tokens, global_tokens = rank_scaled_loss(terms, per_sequence, mask, dist, batch)
    return Loss(terms, stats, backward, local_tokens, global_tokens, per_sequence)
