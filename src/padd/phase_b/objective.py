"""Every method of SPEC §4 as one setting of the same update: which terms are on, and their weights."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from padd.config import ConfigError, TrainConfig
from padd.methods import ABLATION_SWITCHES, METHOD_ONLY_OPTIONS, OFF_AT_ZERO, options_of


@dataclass(frozen=True)
class Objective:
    """What one update optimises: the policy term (III or a baseline's), KD (II), the bias rule (IV).

    policy: "grpo" (token ratio; PR-GRPO when lam > 0), "gspo" (sequence ratio), "rspo" (RSPO's
    router-shift weight on `rspo_base`'s ratio) or None (no RL term: online KD).
    kd: "adaptive" (II: T = max(τΦ(A), T_min)), "fixed" (temperature 1) or None.
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
    gamma: float
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
    if cfg.rollout != "vllm" and (vllm := [n for n in ("vllm_gpu_memory", "vllm_max_model_len") if getattr(cfg, n)]):
        raise ConfigError(f"{', '.join(map(_flag, vllm))} only act with --rollout vllm")
    filled = {name: default for name, default in used.items() if getattr(cfg, name) is None}
    if cfg.rollout == "vllm" and cfg.vllm_gpu_memory is None:
        filled["vllm_gpu_memory"] = 0.3
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
    m = cfg.method
    kd = None
    if m == "online-kd":
        if not cfg.kd_coef:
            raise ConfigError("--method online-kd with --kd-coef 0 trains nothing")
        kd = "fixed"
    elif m == "padd" and cfg.kd_coef:  # None under --no-kd
        kd = "adaptive"
    return Objective(
        policy={"padd": "grpo", "grpo": "grpo", "gspo": "gspo", "rspo": "rspo", "online-kd": None}[m],
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
        gamma=_default(cfg.gamma, 0.0),
        adv_ema=_default(cfg.adv_ema, 0.9),
    )
