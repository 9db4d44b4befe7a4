"""Every Phase B method and every ablation of the study, in one registry: the loss terms a method
trains with, the options it reads and their defaults, and how the study's table and plots show it.
Adding a method or an ablation touches this file only (and the loss, if its RL term is new).

Options shared by every method (sampling, optimiser, load balancing η, logging) are plain fields of
`TrainConfig`. The options below belong to some methods only; in `TrainConfig` they default to None
and take the method's value from here. Giving an option to a method that does not read it is an
error: `padd train --method grpo --kd-coef 0.3` would otherwise train without KD and say nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from padd.errors import UserError


@dataclass(frozen=True)
class Method:
    """One `padd train --method`: its loss terms, the options it reads (with their defaults) and its
    row in the study.

    policy: the RL term: "grpo" (token ratio; PR-GRPO when lam > 0), "gspo" (sequence ratio),
    "rspo" (RSPO's router-shift weight on `rspo_base`'s ratio) or None (no RL term).
    kd: the distillation term: "adaptive" (II: T = max(τΦ(A), T_min)), "fixed" (temperature 1) or None.
    """

    label: str
    policy: str | None
    kd: str | None
    options: dict[str, object]
    colour: str | None = None


# The values of the world presets' methods were chosen on the world's validation split (docs/study.md,
# "How the defaults were chosen"); a preset may override them per method.
METHODS: dict[str, Method] = {
    "grpo": Method("Vanilla GRPO", "grpo", None, {"eps_low": 0.2, "eps_high": 0.2}, "tab:red"),
    # GSPO's sequence-level ratio is length-normalised, so its clip range is ~3 orders narrower
    # (arXiv 2507.18071, §5.1: 3e-4 left, 4e-4 right).
    "gspo": Method("GSPO", "gspo", None, {"eps_low": 3e-4, "eps_high": 4e-4}, "tab:orange"),
    # RSPO (arXiv 2510.23027): GMPO's geometric-mean ratio with token-level clipping in log space
    # (GMPO's range (e^-0.4, e^0.4)), and the router-shift weight max(exp(-shift), floor).
    "rspo": Method(
        "RSPO", "rspo", None, {"eps_low": 0.4, "eps_high": 0.4, "rspo_floor": 0.8, "rspo_base": "gmpo"}, "tab:purple"
    ),
    # on-policy distillation at temperature 1, no RL term
    "online-kd": Method("Online KD", None, "fixed", {"kd_coef": 1.0}, "tab:green"),
    # PR-GRPO (III) + adaptive KD (II) + reward-augmented balance (IV)
    "padd": Method(
        "PADD",
        "grpo",
        "adaptive",
        {
            "eps_low": 0.2,
            "eps_high": 0.2,
            "lam": 1000.0,
            "shift_norm": "none",
            "kd_coef": 1.0,
            "tau": 1.0,
            "t_min": 0.05,
            "balance_reward_coef": 0.1,
            "adv_ema": 0.9,
        },
        "tab:blue",
    ),
}

# The study's Table 1 rows, in order: Base (the warmed-up student, no Phase B), then every method.
TABLE_ROWS: tuple[str, ...] = ("base", "grpo", "gspo", "rspo", "online-kd", "padd")

# Options a zero value of another leaves without effect: a weight of 0 turns its stage off, so
# giving both is refused as an unused option is (use the ablation switch to turn a stage off).
OFF_AT_ZERO: dict[str, tuple[str, ...]] = {
    "kd_coef": ("tau", "t_min"),  # II off: no KD temperature to shape
    "lam": ("shift_norm",),  # III off: Γ's scale is never read
    "eta": ("balance_reward_coef", "adv_ema", "balance_rule", "bias_clip"),  # IV off: the bias never moves
}

# PADD's ablation switches (padd train flags) and the options each one leaves without effect.
ABLATION_SWITCHES: dict[str, tuple[str, ...]] = {
    "no_kd": ("kd_coef", "tau", "t_min"),
    "no_pr": ("lam", "shift_norm"),
    "no_reward_balance": ("balance_reward_coef", "adv_ema"),
}


@dataclass(frozen=True)
class Ablation:
    """A PADD row beside the main one: its Stage I init, router start (None: the preset's; "other":
    the one the preset does not use), padd train switches and settings shared with every method."""

    label: str
    init: str = "cluster"
    start: str | None = None
    switches: dict = field(default_factory=dict)
    shared: dict = field(default_factory=dict)
    colour: str | None = None


ABLATIONS: dict[str, Ablation] = {
    "no-stage1": Ablation("PADD −I (random upcycling)", init="random"),
    "no-kd": Ablation("PADD −II (no adaptive KD)", switches={"no_kd": True}),
    "no-pr": Ablation("PADD −III (no path damping)", switches={"no_pr": True}, colour="tab:olive"),
    "no-balance": Ablation(
        "PADD −IV (plain load balance, γ = 0)", switches={"no_reward_balance": True}, colour="tab:cyan"
    ),
    "no-bias": Ablation(
        "PADD −IV, no bias update (η = γ = 0)",
        switches={"no_reward_balance": True},
        shared={"eta": 0.0},
        colour="tab:gray",
    ),
    "no-kd-pr-balance": Ablation("PADD −II–IV", switches={"no_kd": True, "no_pr": True, "no_reward_balance": True}),
    "other-start": Ablation("PADD from the other router start", start="other"),
}

# Every row name the study's report and plots show, with its label and colour.
ROW_LABELS: dict[str, str] = {
    "teacher": "Teacher (dense)",
    "base": "Base (Stage I + warm-up)",
    **{name: m.label for name, m in METHODS.items()},
    **{name: a.label for name, a in ABLATIONS.items()},
}
ROW_COLOURS: dict[str, str] = {
    name: entry.colour for name, entry in (METHODS | ABLATIONS).items() if entry.colour is not None
}

METHOD_ONLY_OPTIONS: tuple[str, ...] = tuple(sorted({k for m in METHODS.values() for k in m.options}))


def options_of(method: str, switches: dict[str, bool] | None = None) -> dict[str, object]:
    """The options `method` reads (with their defaults), minus those its ablation switches turn off."""
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    options = dict(METHODS[method].options)
    for switch, dropped in ABLATION_SWITCHES.items():
        if (switches or {}).get(switch):
            for name in dropped:
                options.pop(name, None)
    return options


def default_help(option: str) -> str:
    """' (default: 0.2 for padd, grpo; 3e-4 for gspo)': the per-method defaults of one option, for --help."""
    by_value: dict[str, list[str]] = {}
    for name, method in METHODS.items():
        if option in method.options:
            value = method.options[option]
            by_value.setdefault(f"{value:g}" if isinstance(value, float) else str(value), []).append(name)
    return " (default: " + "; ".join(f"{v} for {', '.join(ms)}" for v, ms in by_value.items()) + ")"
