"""The `padd` command line: one subcommand per job, each a typed config and a recipe call."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from padd.checks import check_paths
from padd.config import (
    DecomposeConfig,
    DemoConfig,
    EvalConfig,
    PlanConfig,
    ReproduceConfig,
    SeedConfig,
    TeacherConfig,
    TrainConfig,
    WarmupConfig,
    WorldConfig,
    add_config_arguments,
    load_config,
)
from padd.errors import UserError

# Each recipe imports its stage when it runs, so that `padd --help` loads no model code.


def _decompose(cfg: DecomposeConfig) -> None:
    from padd.stage1.decompose import decompose

    decompose(cfg)


def _demo(cfg: DemoConfig) -> None:
    from padd.demo import run_demo

    run_demo(cfg)


def _eval(cfg: EvalConfig) -> None:
    from padd.eval import run_eval

    run_eval(cfg)


def _plan(cfg: PlanConfig) -> None:
    from padd.plan.report import run_plan

    run_plan(cfg)


def _reproduce(cfg: ReproduceConfig) -> None:
    from padd.study import run_reproduce

    run_reproduce(cfg)


def _seed(cfg: SeedConfig) -> None:
    from padd.stage1.seed import run_seed

    run_seed(cfg)


def _teacher(cfg: TeacherConfig) -> None:
    from padd.teacher import train_teacher

    train_teacher(cfg)


def _warmup(cfg: WarmupConfig) -> None:
    from padd.stage1.warmup import run_warmup

    run_warmup(cfg)


def _train(cfg: TrainConfig) -> None:
    from padd.phase_b.loop import run_train

    run_train(cfg)


def _world(cfg: WorldConfig) -> None:
    from padd.world.tasks import export_world

    counts = export_world(cfg.out, cfg.skills, cfg.train_per_skill, cfg.test_per_skill, cfg.seed)
    for name, n in counts.items():
        print(f"{n:7d}  {cfg.out}/{name}")


# name -> (config class, recipe, one-line help)
COMMANDS: dict[str, tuple[type, Callable, str]] = {
    "demo": (DemoConfig, _demo, "the end-to-end study on the miniature world (reproduce tiny, main rows)"),
    "reproduce": (ReproduceConfig, _reproduce, "the paper's study: every method and ablation, with a report"),
    "decompose": (DecomposeConfig, _decompose, "Stage I: cluster a dense teacher's FFN neurons into a Glm4Moe student"),
    "seed": (SeedConfig, _seed, "Stage I for a pretrained MoE student: seed its routers from the teacher's clusters"),
    "world": (WorldConfig, _world, "write the miniature world's splits as JSONL"),
    "teacher": (
        TeacherConfig,
        _teacher,
        "train a small model on the world: a dense teacher or a pretrained MoE student",
    ),
    "warmup": (
        WarmupConfig,
        _warmup,
        "Stage I warm-up: experts behind a frozen router (uniform or seeded)",
    ),
    "train": (TrainConfig, _train, "Phase B: PADD (or a baseline) on verifiable problems"),
    "eval": (EvalConfig, _eval, "Pass@1 / avg@k / pass@k of a model on math benchmarks"),
    "plan": (PlanConfig, _plan, "memory per GPU and time of a study on given GPUs, from the models' configs alone"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="padd", description="Path-Aligned Decompression Distillation: dense teacher -> MoE student"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (cls, _, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=(cls.__doc__ or help_).strip())
        add_config_arguments(p, cls)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    options = dict(vars(args))
    command = options.pop("command")
    cls, recipe, _ = COMMANDS[command]
    try:
        cfg = load_config(cls, options)
        if command == "train":  # the method's options first: they need no file to be checked
            from padd.phase_b.objective import resolve

            resolve(cfg)
        check_paths(command, cfg)  # before any model code loads
        recipe(cfg)
    except UserError as err:  # bad input: one line with what to do; anything else is a bug and keeps its traceback
        print(f"padd {command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
