"""Every method of SPEC §4 as one setting of the same update: which terms are on, and their weights."""

from __future__ import annotations

from dataclasses import dataclass

from padd.config import TrainConfig


@dataclass(frozen=True)
class Objective:
    """What one update optimises: the policy term (III or a baseline's), KD (II), the bias rule (IV)."""

    policy: bool
    level: str
    lam: float
    rspo_floor: float | None
    kd_coef: float
    eta: float
    gamma: float


def objective_of(cfg: TrainConfig) -> Objective:
    """The method's objective, then the ablation switches on top."""
    base = dict(policy=True, level="token", lam=0.0, rspo_floor=None, kd_coef=0.0, eta=cfg.eta, gamma=0.0)
    if cfg.method == "padd":
        base.update(lam=cfg.lam, kd_coef=cfg.kd_coef, gamma=cfg.gamma)
    elif cfg.method == "gspo":
        base.update(level="sequence")
    elif cfg.method == "rspo":
        base.update(rspo_floor=cfg.rspo_floor)
    elif cfg.method == "online-kd":
        base.update(policy=False, kd_coef=1.0)
    elif cfg.method != "grpo":
        raise ValueError(f"unknown method {cfg.method!r}")
    if cfg.no_kd:
        base["kd_coef"] = 0.0
    if cfg.no_pr:
        base["lam"] = 0.0
    if cfg.no_reward_balance:
        base["gamma"] = 0.0
    if not base["policy"] and not base["kd_coef"]:
        raise ValueError("online-kd without KD trains nothing: drop --no-kd")
    return Objective(**base)
