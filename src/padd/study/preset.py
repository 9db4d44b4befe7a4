"""A study preset: what `padd reproduce` decomposes, trains on and evaluates, with each stage's
settings, read from YAML (a built-in preset or a file) and checked before anything runs; and the
`--sweep METHOD:OPTION=V1,V2` rows on top of it."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from padd.config import (
    BUILTIN_PRESETS,
    ConfigError,
    DecomposeConfig,
    EvalConfig,
    PlanConfig,
    SeedConfig,
    TrainConfig,
    WarmupConfig,
    base_type,
    renamed_hint,
)
from padd.methods import METHOD_ONLY_OPTIONS, METHODS, options_of

ROUTER_STARTS = ("uniform", "distill")
# Stage I's init with and without it (the −I ablation's), by kind of student
INITS = {"cluster": "cluster", "random": "random"}
PRETRAINED_INITS = {"cluster": "seeded", "random": "unseeded"}
# the rows whose meaning changes with a pretrained student, and what they are then
PRETRAINED_LABELS = {"base": "Base (pretrained MoE student)", "no-stage1": "PADD −I (no seeding)"}

# Keys each stage section may not set: the study wires them.
_WIRED = {"teacher", "student", "corpus", "data", "out", "model", "bench", "init", "method", "seed", "resume"}
_SECTIONS = {
    "decompose": DecomposeConfig,
    "seed": SeedConfig,
    "warmup": WarmupConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "plan": PlanConfig,
}


@dataclass
class Study:
    """One study: what to decompose, train on and evaluate, with each stage's settings."""

    teacher: str = "tiny"  # a `padd teacher` preset name, or a checkpoint directory
    teacher_steps: int | None = None  # optimizer steps of a preset teacher (default: the preset's)
    # a pretrained MoE student (a `padd teacher` MoE preset trained here with the teacher's tokenizer,
    # or a checkpoint): Stage I seeds it (padd seed) instead of decomposing the teacher
    student: str | None = None
    corpus: str = "world"  # Stage I statistics and warm-up text
    data: str = "world:add+sub+mul+expr+word"  # Phase B problems (train split)
    benches: str = "world:add,world:sub,world:mul,world:expr,world:word"  # Table 1 columns
    broad: str = "world:reverse"  # the broad-skill table's columns
    analysis_corpus: str | None = None  # held-out text for NMI / ESI / loads (default: the corpus)
    analysis_split: str = "test"  # its split (the world's test split is disjoint from its train split)
    analysis_tokens: int = 4096  # tokens of it
    analysis_seq_len: int = 128  # tokens per window of it
    exactness_check: bool = True  # padd decompose's student (all experts on) against the teacher, float32, CPU
    decompose: dict = field(default_factory=dict)
    seed: dict = field(default_factory=dict)  # padd seed settings (a study with a pretrained student)
    warmup: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)  # padd train settings shared by every method
    methods: dict = field(default_factory=dict)  # method -> its own options (padd.methods), e.g. padd: {lam: 100}
    eval: dict = field(default_factory=dict)
    plan: dict = field(default_factory=dict)  # padd plan's settings of this study (hardware, prompt length)


def load_study(spec: str) -> Study:
    """The study of a built-in preset name (padd.config.BUILTIN_PRESETS) or a YAML file; unknown keys are errors."""
    if spec in BUILTIN_PRESETS:
        text = resources.files("padd.presets").joinpath(f"study-{spec}.yaml").read_text()
    elif Path(spec).is_file():
        text = Path(spec).read_text()
    else:
        raise ConfigError(f"--preset {spec!r}: not one of {', '.join(BUILTIN_PRESETS)} or an existing YAML file")
    raw = yaml.safe_load(text) or {}
    known = {f.name for f in dataclasses.fields(Study)}
    if unknown := set(raw) - known:
        raise ConfigError(f"{spec}: unknown study keys {sorted(unknown)}; known: {sorted(known)}")
    method_only = set(METHOD_ONLY_OPTIONS)
    for section, cls in _SECTIONS.items():
        allowed = {f.name for f in dataclasses.fields(cls)} - _WIRED - {"study"}
        if section == "train":  # method options belong under methods: METHOD; the rows set the switches
            allowed -= method_only | {"no_kd", "no_pr", "no_reward_balance"}
        if bad := set(raw.get(section) or {}) - allowed:
            hint = "; method options go under methods: METHOD:" if section == "train" and bad & method_only else ""
            hint += "".join(renamed_hint(k) for k in sorted(bad))
            raise ConfigError(f"{spec}: {section} cannot set {sorted(bad)}{hint}; it may set {sorted(allowed)}")
    for method, options in (raw.get("methods") or {}).items():
        if method not in METHODS:
            raise ConfigError(f"{spec}: methods: unknown method {method!r}; known: {', '.join(METHODS)}")
        if bad := set(options or {}) - set(METHODS[method].options):
            raise ConfigError(
                f"{spec}: methods: {method} does not use {sorted(bad)}"
                + "".join(renamed_hint(k) for k in sorted(bad))
                + f"; it reads {sorted(METHODS[method].options)}"
            )
    study = Study(**raw)
    if study.student is not None:
        if "exactness_check" in raw:
            raise ConfigError(f"{spec}: exactness_check tests padd decompose's student; a seeded student has none")
        if study.decompose:
            raise ConfigError(
                f"{spec}: a study with a pretrained student seeds it (seed:); drop the decompose: section"
            )
        if study.warmup.get("router_init", "keep") != "keep" or study.warmup.get("routing", "frozen") != "frozen":
            raise ConfigError(
                f"{spec}: with a pretrained student every row starts from the seeded router, kept (warmup "
                "router_init: keep, routing: frozen); compare other routers with padd warmup directly"
            )
        return study
    if study.seed:
        raise ConfigError(f"{spec}: seed: settings need a pretrained MoE student (student:); decompose: builds one")
    if missing := [k for k in ("experts", "top_k") if k not in study.decompose]:
        raise ConfigError(f"{spec}: decompose must set {' and '.join(missing)} (the student's shape has no default)")
    if study.warmup.get("router_init", "uniform") not in ROUTER_STARTS:
        raise ConfigError(f"{spec}: warmup router_init must be one of {', '.join(ROUTER_STARTS)} in a study")
    if study.warmup.get("routing", "uniform") != "uniform":
        raise ConfigError(
            f"{spec}: the warm-up of a decomposed student runs behind the uniform router (routing: uniform)"
        )
    return study


def parse_sweep(spec: str | None, study: Study) -> tuple[str, str, list] | None:
    """`METHOD:OPTION=V1,V2` -> (method, option, values), each value of the option's type; the option
    must be one the method reads or one every method shares."""
    if not spec:
        return None
    try:
        head, values = spec.split("=", 1)
        method, option = head.split(":", 1)
    except ValueError:
        raise ConfigError(f"--sweep {spec!r}: write METHOD:OPTION=V1,V2 (e.g. padd:lam=0,100,1000)") from None
    option = option.replace("-", "_")
    if method not in METHODS:
        raise ConfigError(f"--sweep: unknown method {method!r}; choose from {', '.join(METHODS)}")
    shared = {f.name for f in dataclasses.fields(TrainConfig)} - _WIRED - set(METHOD_ONLY_OPTIONS)
    if option not in options_of(method) and option not in shared:
        raise ConfigError(f"--sweep: {method} does not use {option!r}")
    kind, _ = base_type(typing.get_type_hints(TrainConfig)[option])
    try:
        parsed = [kind(v.strip()) for v in values.split(",") if v.strip()]
    except ValueError as err:
        raise ConfigError(f"--sweep {spec!r}: {option} takes {kind.__name__} values ({err})") from None
    if not parsed:
        raise ConfigError(f"--sweep {spec!r}: no values")
    return method, option, parsed


def sweep_row(method: str, option: str, value) -> str:
    """The row name of one swept value: padd@lam=100."""
    return f"{method}@{option}={value}"
