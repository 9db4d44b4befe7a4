"""Every Phase B method and the options it reads: one table, so that each default lives in one place.

Options shared by every method (sampling, optimiser, load balancing η, logging) are plain fields of
`TrainConfig`. The options below belong to some methods only; in `TrainConfig` they default to None
and take the method's value from here. Giving an option to a method that does not read it is an
error: `padd train --method grpo --kd-coef 0.3` would otherwise train without KD and say nothing.
"""

from __future__ import annotations

# The values of the world presets' methods were chosen on the world's validation split (README,
# "How the defaults were chosen"); a preset may override them per method.
METHOD_OPTIONS: dict[str, dict[str, object]] = {
    # PR-GRPO (III) + adaptive KD (II) + reward-augmented balance (IV)
    "padd": {
        "eps_low": 0.2,
        "eps_high": 0.2,
        "lam": 1000.0,
        "shift_norm": "none",
        "kd_coef": 1.0,
        "tau": 1.0,
        "t_min": 0.05,
        "gamma": 0.1,
        "adv_ema": 0.9,
    },
    "grpo": {"eps_low": 0.2, "eps_high": 0.2},
    # GSPO's sequence-level ratio is length-normalised, so its clip range is ~3 orders narrower
    # (arXiv 2507.18071, §5.1: 3e-4 left, 4e-4 right).
    "gspo": {"eps_low": 3e-4, "eps_high": 4e-4},
    # RSPO (arXiv 2510.23027): GMPO's geometric-mean ratio with token-level clipping in log space
    # (GMPO's range (e^-0.4, e^0.4)), and the router-shift weight max(exp(-shift), floor).
    "rspo": {"eps_low": 0.4, "eps_high": 0.4, "rspo_floor": 0.8, "rspo_base": "gmpo"},
    # on-policy distillation at temperature 1, no RL term
    "online-kd": {"kd_coef": 1.0},
}

# Options a zero value of another leaves without effect: a weight of 0 turns its stage off, so
# giving both is refused as an unused option is (use the ablation switch to turn a stage off).
OFF_AT_ZERO: dict[str, tuple[str, ...]] = {
    "kd_coef": ("tau", "t_min"),  # II off: no KD temperature to shape
    "lam": ("shift_norm",),  # III off: Γ's scale is never read
    "eta": ("gamma", "adv_ema", "balance_rule", "bias_clip"),  # IV off: the bias never moves
}

# PADD's ablation switches and the options each one leaves without effect.
ABLATION_SWITCHES: dict[str, tuple[str, ...]] = {
    "no_kd": ("kd_coef", "tau", "t_min"),
    "no_pr": ("lam", "shift_norm"),
    "no_reward_balance": ("gamma", "adv_ema"),
}

METHOD_ONLY_OPTIONS: tuple[str, ...] = tuple(sorted({k for opts in METHOD_OPTIONS.values() for k in opts}))


def options_of(method: str, switches: dict[str, bool] | None = None) -> dict[str, object]:
    """The options `method` reads (with their defaults), minus those its ablation switches turn off."""
    if method not in METHOD_OPTIONS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHOD_OPTIONS)}")
    options = dict(METHOD_OPTIONS[method])
    for switch, dropped in ABLATION_SWITCHES.items():
        if (switches or {}).get(switch):
            for name in dropped:
                options.pop(name, None)
    return options


def default_help(option: str) -> str:
    """' (default: 0.2 for padd, grpo; 3e-4 for gspo)': the per-method defaults of one option, for --help."""
    by_value: dict[str, list[str]] = {}
    for method, opts in METHOD_OPTIONS.items():
        if option in opts:
            by_value.setdefault(
                f"{opts[option]:g}" if isinstance(opts[option], float) else str(opts[option]), []
            ).append(method)
    return " (default: " + "; ".join(f"{v} for {', '.join(ms)}" for v, ms in by_value.items()) + ")"
