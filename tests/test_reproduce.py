"""`padd reproduce` on a micro study: every cell runs, the report is filled from the run's files, a
rerun skips finished cells, and bad settings fail clearly."""

import json
import re

import pytest

from helpers import padd

MICRO = """
teacher: {teacher}
corpus: world
data: world:add
benches: world:add,world:sub
broad: world:reverse
analysis_tokens: 256
decompose: {{experts: 4, top_k: 2, tokens: 512, seq_len: 64}}
warmup: {{tokens: 512, seq_len: 64, batch_size: 4, lr: 1.0e-3, router_tokens: 256}}
train: {{steps: 2, prompts_per_step: 2, group_size: 2, max_new_tokens: 6, world_per_skill: 10, save_every: 1}}
eval: {{world_per_skill: 3, max_new_tokens: 6, batch_size: 8}}
"""


@pytest.fixture(scope="module")
def study_run(tmp_path_factory, llama_teacher):
    root = tmp_path_factory.mktemp("study")
    preset = root / "micro.yaml"
    preset.write_text(MICRO.format(teacher=llama_teacher))
    run = root / "run"
    flags = dict(
        preset=preset,
        out=run,
        seeds=2,
        methods="base,grpo,padd",
        ablations="no-stage1,no-kd,other-start",
        sweep="padd:lam=0",
    )
    assert padd("reproduce", progress=False, **flags) == 0
    return run, flags


def _cell_value(report: str, row_label: str, column: int) -> str:
    line = next(x for x in report.splitlines() if x.startswith(f"| {row_label} |"))
    return [c.strip() for c in line.strip("|").split("|")][column]


def test_every_cell_ran_and_the_tables_come_from_the_run_files(study_run):
    run, _ = study_run
    cells = json.loads((run / "cells.json").read_text())
    for name in ("stage1-cluster", "stage1-random", "warmup-cluster", "warmup-random", "eval/teacher", "eval/base"):
        assert name in cells
    for name in (
        "warmup-cluster-distill",
        "warmup-random-distill",
        "analysis/cluster-distill",
        "analysis/random-uniform",
    ):
        assert name in cells
    for row in ("grpo", "padd", "no-stage1", "no-kd", "other-start", "padd@lam=0.0"):
        for seed in (0, 1):
            assert f"train/{row}-s{seed}" in cells and f"eval/{row}-s{seed}" in cells
            assert (run / "train" / f"{row}-s{seed}" / "student" / "config.json").exists()
    assert cells["stage1-cluster"]["result"]["max_logit_gap_all_experts"] < 1e-4

    report = (run / "report.md").read_text()
    sections = ("Table 1", "Ablations", "Sweep: padd", "Broad skills", "Do the stages act?", "Expert specialisation")
    for section in (*sections, "Routing stability", "claims"):
        assert section in report
    for plot in ("gamma", "rewards", "load", "load_cv", "nmi_esi", "pass_vs_flops"):
        assert (run / "plots" / f"{plot}.png").stat().st_size > 1000
        assert f"plots/{plot}.png" in report

    # Table 1's PADD cell on world:add is the mean ± std of the two seeds' eval files
    scores = [
        100 * json.loads((run / "eval" / f"padd-s{s}.json").read_text())["benchmarks"]["world:add"]["pass@1"]
        for s in (0, 1)
    ]
    mean, std = sum(scores) / 2, abs(scores[0] - scores[1]) / 2**0.5
    assert _cell_value(report, "PADD", 1).strip("*") == f"{mean:.1f} ± {std:.1f}"
    teacher = json.loads((run / "eval" / "teacher.json").read_text())
    math_avg = sum(100 * teacher["benchmarks"][b]["pass@1"] for b in ("world:add", "world:sub")) / 2
    assert _cell_value(report, "Teacher (dense)", 3).strip("*") == f"{math_avg:.1f}"
    # FLOPs relative to the teacher, from the eval files
    padd_flops = json.loads((run / "eval" / "padd-s0.json").read_text())["flops_per_token@1024"]
    assert _cell_value(report, "PADD", 4) == f"{padd_flops / teacher['flops_per_token@1024']:.2f}"
    # NMI of the cluster-init student, from its analysis file
    nmi = json.loads((run / "analysis" / "cluster-uniform.json").read_text())["nmi"]
    assert re.search(rf"\| cluster-uniform \| {nmi:.3f} \|", report)
    # the other-start row trains from the other (distill) start, every other row from the preset's (uniform)
    configs = {
        row: json.loads((run / "train" / f"{row}-s0" / "train_config.json").read_text())
        for row in ("padd", "other-start")
    }
    assert configs["padd"]["student"].endswith("warmup-cluster") and configs["other-start"]["student"].endswith(
        "warmup-cluster-distill"
    )
    # verdicts come with a paired-bootstrap interval
    assert re.search(r"PADD beats Vanilla GRPO .*\*\*(supported|refuted|not separated)\*\*.*95% CI \[", report)
    # Γ_step of PADD (last step and mean over steps and seeds), from its metrics
    gammas = [
        [json.loads(x)["gamma_step"] for x in (run / "train" / f"padd-s{s}" / "metrics.jsonl").read_text().splitlines()]
        for s in (0, 1)
    ]
    routing = report.split("## Routing stability")[1]
    row = next(x for x in routing.splitlines() if x.startswith("| PADD |"))
    last, mean = (gammas[0][-1] + gammas[1][-1]) / 2, sum(map(sum, gammas)) / sum(map(len, gammas))
    assert mean > 0 and row.startswith(f"| PADD | {last:.3g} | {mean:.3g} |")


def test_rerun_skips_finished_cells_and_redoes_a_lost_one(study_run, capsys):
    run, flags = study_run
    cells_file = run / "cells.json"
    cells = json.loads(cells_file.read_text())
    del cells["eval/padd-s1"]  # as if the run was killed while evaluating it
    (run / "eval" / "padd-s1.json").unlink()
    cells_file.write_text(json.dumps(cells))
    before = (run / "eval" / "grpo-s0.json").stat().st_mtime_ns
    assert padd("reproduce", progress=False, **flags) == 0
    out = capsys.readouterr().out
    assert "✓ train/padd-s1 (done" in out and "✓ eval/grpo-s0 (done" in out
    assert (run / "eval" / "padd-s1.json").exists()
    assert (run / "eval" / "grpo-s0.json").stat().st_mtime_ns == before


def test_bad_settings_fail_clearly(tmp_path, study_run, capsys):
    run, flags = study_run
    assert padd("reproduce", **{**flags, "methods": "base,ppo"}) == 2
    assert "unknown ['ppo']" in capsys.readouterr().err
    other = tmp_path / "other.yaml"
    other.write_text(MICRO.format(teacher=tmp_path / "missing"))
    assert padd("reproduce", preset=other, out=tmp_path / "r") == 2
    assert "does not exist" in capsys.readouterr().err
    changed = tmp_path / "changed.yaml"
    changed.write_text(flags["preset"].read_text().replace("steps: 2", "steps: 3"))
    assert padd("reproduce", **{**flags, "preset": changed}) == 2
    assert "other settings" in capsys.readouterr().err


def test_two_processes_share_one_folder_without_losing_rows_or_cells(tmp_path, study_run):
    """Disjoint rows run by two `padd reproduce` processes into one --out (one per core): the second
    invocation's manifest keeps the first one's rows and sweep, and a cell one process finished is
    neither redone nor dropped by the other, even if that one read cells.json before it finished."""
    import shutil

    from padd.config import ReproduceConfig
    from padd.study import StudyRun

    run, flags = study_run
    shared = tmp_path / "run"
    shutil.copytree(run, shared)
    second_rows = {k: v for k, v in flags.items() if k != "sweep"} | {"methods": "base", "ablations": "no-kd"}
    assert padd("reproduce", progress=False, **{**second_rows, "out": shared}) == 0
    manifest = json.loads((shared / "study.json").read_text())
    assert manifest["methods"] == ["base", "grpo", "padd"]
    assert manifest["ablations"] == ["no-stage1", "no-kd", "other-start"]
    assert manifest["sweep"]["option"] == "lam" and manifest["sweep_rows"] == ["padd@lam=0.0"]
    report = (shared / "report.md").read_text()
    assert "| Vanilla GRPO |" in report and "other values of `lam`" in report

    def make(methods):
        cfg = ReproduceConfig(preset=str(flags["preset"]), out=str(shared), seeds=2, methods=methods, ablations="none")
        return StudyRun(cfg)

    first, second = make("grpo"), make("padd")  # both have read cells.json
    first.ledger.cell("analysis/only-first", "analysis", lambda: None)

    def must_not_run():
        raise AssertionError("a cell the other process finished ran again")

    second.ledger.cell("analysis/only-first", "analysis", must_not_run)
    second.ledger.cell("eval/only-second", "eval", lambda: None)
    cells = json.loads((shared / "cells.json").read_text())
    assert {"analysis/only-first", "eval/only-second", "train/grpo-s1"} <= set(cells)


def test_without_the_init_comparison_only_the_students_the_rows_use_are_warmed_up(tmp_path, study_run):
    """--no-compare-inits (the demo) skips random upcycling and the other router start unless a row
    trains from them (PADD −I, other-start)."""
    from padd.config import ReproduceConfig
    from padd.study import StudyRun

    _, flags = study_run

    def starts(**kw):
        cfg = ReproduceConfig(preset=str(flags["preset"]), out=str(tmp_path / "r"), seeds=1, **kw)
        run = StudyRun(cfg)
        return run.grid.warm_starts(), run.grid.start, run.grid.other_start

    both, start, other = starts(methods="base,grpo,padd", ablations="none")
    assert both == {"cluster": [start, other], "random": [start, other]}
    only, *_ = starts(methods="base,grpo,padd", ablations="none", compare_inits=False)
    assert only == {"cluster": [start]}
    needed, *_ = starts(methods="padd", ablations="no-stage1,other-start", compare_inits=False)
    assert needed == {"cluster": [start, other], "random": [start]}


def test_jobs_spread_the_rows_over_processes_and_the_report_is_the_same(tmp_path, study_run):
    """--jobs 2 redoes the rows in two worker processes; every row's cells come back and the report
    lists the same rows (the shared cells are not redone)."""
    import shutil

    run, flags = study_run
    again = tmp_path / "run"
    shutil.copytree(run, again)
    cells = json.loads((again / "cells.json").read_text())
    rows = {k: v for k, v in cells.items() if k.startswith(("train/grpo", "eval/grpo", "eval/base", "analysis/grpo"))}
    kept = {k: v for k, v in cells.items() if k not in rows}
    (again / "cells.json").write_text(json.dumps(kept))
    for name in rows:
        target = again / name if name.startswith("train/") else again / f"{name}.json"
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    assert padd("reproduce", progress=False, **{**flags, "out": again, "jobs": 2}) == 0
    after = json.loads((again / "cells.json").read_text())
    assert set(rows) <= set(after)
    assert {k: after[k] for k in kept} == kept  # shared and untouched cells were not redone
    table = lambda p: [x for x in (p / "report.md").read_text().splitlines() if x.startswith("| ")][:12]  # noqa: E731
    assert [x.split("|")[1] for x in table(again)] == [x.split("|")[1] for x in table(run)]
    assert padd("reproduce", **{**flags, "out": again, "jobs": 0}) == 2


def test_step_and_warmup_overrides_reach_the_study(tmp_path, study_run):
    """--steps and --warmup-tokens (the demo's smaller budget) replace the preset's values; without
    them the preset's stand."""
    from padd.config import DemoConfig, ReproduceConfig
    from padd.study import StudyRun

    _, flags = study_run
    base = dict(preset=str(flags["preset"]), seeds=1)
    preset = StudyRun(ReproduceConfig(**base, out=str(tmp_path / "preset"))).study
    assert (preset.train["steps"], preset.warmup["tokens"]) == (2, 512)
    demo = DemoConfig()
    changed = StudyRun(
        ReproduceConfig(**base, out=str(tmp_path / "demo"), steps=demo.steps, warmup_tokens=demo.warmup_tokens)
    ).study
    assert (changed.train["steps"], changed.warmup["tokens"]) == (demo.steps, demo.warmup_tokens)


def test_a_study_without_the_students_shape_is_refused(tmp_path):
    """The student's shape (experts, top-K) has no hidden default in the study: a preset must set it."""
    from padd.config import ConfigError
    from padd.study import load_study

    preset = tmp_path / "shapeless.yaml"
    preset.write_text("decompose: {experts: 8}\n")
    with pytest.raises(ConfigError, match="decompose must set top_k"):
        load_study(str(preset))


PRETRAINED = """
teacher: {teacher}
student: {student}
corpus: world
data: world:add
benches: world:add
broad: world:reverse
analysis_tokens: 256
seed: {{tokens: 1024, heldout_tokens: 512, cka_tokens: 256, seq_len: 32, fit_steps: 50}}
warmup: {{tokens: 512, seq_len: 64, batch_size: 4, lr: 1.0e-3, router_tokens: 256}}
train: {{steps: 2, prompts_per_step: 2, group_size: 2, max_new_tokens: 6, world_per_skill: 10, save_every: 1}}
eval: {{world_per_skill: 3, max_new_tokens: 6, batch_size: 8}}
"""


def test_a_study_with_a_pretrained_student_seeds_it_and_compares_against_it(tmp_path, llama_teacher):
    """The paper's setting: Stage I is padd seed, every trained row starts from the seeded warm-up,
    Base is the pretrained student as it is, PADD −I is PADD from the unseeded warm-up, and the
    report names the rows for what they are and carries seeding's before/after measurements."""
    from helpers import save_moe_student

    student = save_moe_student(tmp_path / "pretrained", "qwen3_moe", llama_teacher)
    preset = tmp_path / "pretrained.yaml"
    preset.write_text(PRETRAINED.format(teacher=llama_teacher, student=student))
    run = tmp_path / "run"
    flags = dict(preset=preset, out=run, seeds=1, methods="base,padd", progress=False)
    assert padd("reproduce", ablations="no-stage1", **flags) == 0
    cells = json.loads((run / "cells.json").read_text())
    for name in ("stage1-seeded", "warmup-seeded", "warmup-unseeded", "analysis/seeded-keep", "analysis/unseeded-keep"):
        assert name in cells, name
    assert not any(name.startswith(("stage1-cluster", "stage1-random", "stage1-unseeded")) for name in cells)
    assert cells["stage1-seeded"]["result"]["lm_loss"]["before"] > 0
    for row in ("padd", "no-stage1"):
        config = json.loads((run / "train" / f"{row}-s0" / "train_config.json").read_text())
        start = "warmup-unseeded" if row == "no-stage1" else "warmup-seeded"
        assert config["student"] == str(run / start), row
    from padd.config import ReproduceConfig
    from padd.study import StudyRun

    every = StudyRun(ReproduceConfig(preset=str(preset), out=str(tmp_path / "all"), ablations="all")).grid.ablations
    assert "no-stage1" in every and "other-start" not in every  # all: every ablation that applies
    base = json.loads((run / "eval" / "base.json").read_text())
    assert base["model"] == str(student)
    report = (run / "report.md").read_text()
    assert "| Base (pretrained MoE student) |" in report and "| PADD −I (no seeding) |" in report
    assert "Seeding recovers the teacher's modules" in report
    # a dense study has no pretrained student to replace; other-start has no meaning here
    assert padd("reproduce", student=student, preset=flags["preset"].with_name("none.yaml"), out=tmp_path / "x") == 2
    assert padd("reproduce", **{**flags, "out": tmp_path / "y"}, ablations="other-start") == 2
