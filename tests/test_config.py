import argparse

import pytest

from padd.config import ConfigError, DecomposeConfig, SeedConfig, add_config_arguments, load_config
from padd.study import load_study


def parse(argv):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, DecomposeConfig)
    return load_config(DecomposeConfig, parser.parse_args(argv))


BASE = ["--teacher", "t", "--corpus", "c", "--out", "o"]


def test_flags_override_yaml_which_overrides_defaults(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("experts: 8\ntop-k: 2\ntokens: 100\nexpert_size: 64\n")
    cfg = parse([*BASE, "--config", str(yaml_file), "--tokens", "200", "--no-progress"])
    assert (cfg.experts, cfg.top_k, cfg.tokens, cfg.expert_size, cfg.progress) == (8, 2, 200, 64, False)
    assert cfg.seed == 0 and cfg.init == "cluster"


def test_missing_unknown_and_bad_choices(tmp_path):
    with pytest.raises(ConfigError, match="--experts"):
        parse(BASE + ["--top-k", "1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("experts: 4\ntop_k: 1\nnot_an_option: 3\n")
    with pytest.raises(ConfigError, match="not_an_option"):
        parse([*BASE, "--config", str(bad)])
    bad.write_text("experts: 4\ntop_k: 1\ninit: nope\n")
    with pytest.raises(ConfigError, match="--init must be one of"):
        parse([*BASE, "--config", str(bad)])


def test_every_field_has_help():
    import dataclasses

    assert all(f.metadata.get("help") for f in dataclasses.fields(DecomposeConfig))


def test_built_in_study_presets_load_and_reject_unknown_keys(tmp_path):
    for name in ("tiny", "mini"):
        study = load_study(name)
        assert study.teacher == name and study.train["steps"] > 0
    pretrained = load_study("tiny-pretrained")  # the paper's setting: a pretrained student, seeded
    assert (pretrained.teacher, pretrained.student) == ("tiny-lm", "tiny-moe") and not pretrained.decompose
    SeedConfig(teacher="t", student="s", corpus="c", out="o", **pretrained.seed)
    # a pretrained study has no decompose section, and a decomposed one no seed section
    bad = tmp_path / "mixed.yaml"
    bad.write_text("teacher: tiny\nstudent: tiny-moe\ndecompose: {experts: 8, top_k: 2}\n")
    with pytest.raises(ConfigError, match="drop the decompose"):
        load_study(str(bad))
    bad.write_text("teacher: tiny\nstudent: tiny-moe\nexactness_check: false\n")
    with pytest.raises(ConfigError, match="exactness_check"):
        load_study(str(bad))
    bad.write_text("teacher: tiny\nseed: {tokens: 64}\ndecompose: {experts: 8, top_k: 2}\n")
    with pytest.raises(ConfigError, match="need a pretrained MoE student"):
        load_study(str(bad))
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher: tiny\ntrain: {stepz: 3}\n")
    with pytest.raises(ConfigError, match="train cannot set \\['stepz'\\]"):
        load_study(str(bad))
    bad.write_text("teachr: tiny\n")
    with pytest.raises(ConfigError, match="unknown study keys"):
        load_study(str(bad))
    bad.write_text("teacher: tiny\ndecompose: {out: x}\n")
    with pytest.raises(ConfigError, match="decompose cannot set"):
        load_study(str(bad))
    # a method's own options go under methods: METHOD, and only options that method reads
    bad.write_text("teacher: tiny\ntrain: {kd_coef: 0.3}\n")
    with pytest.raises(ConfigError, match="method options go under methods"):
        load_study(str(bad))
    bad.write_text("teacher: tiny\nmethods: {grpo: {kd_coef: 0.3}}\n")
    with pytest.raises(ConfigError, match="grpo does not use \\['kd_coef'\\]"):
        load_study(str(bad))
    bad.write_text("teacher: tiny\nmethods: {ppo: {}}\n")
    with pytest.raises(ConfigError, match="unknown method 'ppo'"):
        load_study(str(bad))


def test_sweep_specs():
    from padd.study import parse_sweep

    study = load_study("tiny")
    assert parse_sweep("padd:lam=0,30,3e2", study) == ("padd", "lam", [0.0, 30.0, 300.0])
    assert parse_sweep("padd:kd-coef=0.3", study) == ("padd", "kd_coef", [0.3])
    assert parse_sweep("grpo:lr=1e-4", study)[1] == "lr"  # an option every method shares
    for spec, message in [("padd-lam=1", "METHOD:OPTION"), ("grpo:lam=1", "does not use"), ("ppo:lr=1", "unknown")]:
        with pytest.raises(ConfigError, match=message):
            parse_sweep(spec, study)


def test_shipped_presets_load():
    """Every preset in configs/ is named after its command and loads into that command's config."""
    from pathlib import Path

    from padd.cli import COMMANDS

    presets = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml"))
    assert presets
    required = {"teacher": "t", "student": "s", "corpus": "c", "data": "d", "out": "o"}
    for preset in presets:
        if preset.stem.startswith("study-"):
            study = load_study(str(preset))
            if study.student is None:  # a decomposed student has its shape in the preset
                assert study.decompose["experts"] >= study.decompose["top_k"] >= 1
            else:  # a pretrained one is seeded: its settings make a valid padd seed config
                SeedConfig(teacher="t", student="s", corpus="c", out="o", **study.seed)
            continue
        cls = COMMANDS[preset.stem.split("-")[0]][0]
        names = {f.name for f in __import__("dataclasses").fields(cls)}
        given = {k: v for k, v in required.items() if k in names} | {"device": "cpu"}  # GPU presets load on CPU
        cfg = load_config(cls, {"config": preset, **given})
        if cls is DecomposeConfig:
            assert cfg.experts >= cfg.top_k >= 1


def test_config_tiny_is_the_commands_section_of_the_tiny_study_preset():
    """`--config tiny` reads the command's section of the built-in study preset (their one home), with
    the preset's corpus / problem set; a flag still wins, and a command without a section is refused."""
    from importlib import resources

    import yaml

    from padd.config import TrainConfig, WarmupConfig, WorldConfig

    preset = yaml.safe_load(resources.files("padd.presets").joinpath("study-tiny.yaml").read_text())
    decompose = load_config(DecomposeConfig, {"config": "tiny", "teacher": "t", "out": "o"})
    assert (decompose.experts, decompose.top_k) == (preset["decompose"]["experts"], preset["decompose"]["top_k"])
    assert decompose.corpus == preset["corpus"]
    warmup = load_config(WarmupConfig, {"config": "tiny", "student": "s", "teacher": "t", "out": "o"})
    assert warmup.router_init == preset["warmup"]["router_init"]
    train = load_config(TrainConfig, {"config": "tiny", "student": "s", "teacher": "t", "out": "o", "steps": 3})
    assert (train.data, train.steps, train.lr) == (preset["data"], 3, preset["train"]["lr"])
    with pytest.raises(ConfigError, match="no section"):
        load_config(WorldConfig, {"config": "tiny", "out": "o"})


def test_renamed_options_fail_naming_the_new_ones(tmp_path, capsys):
    """`gamma` (IV's reward coefficient) and `world_size` (problems per skill) were renamed so that each
    name means one thing; the old flag or YAML key fails and names the new one."""
    from padd.cli import main
    from padd.config import TrainConfig

    base = ["train", "--student", "s", "--teacher", "t", "--data", "world:add", "--out", str(tmp_path / "r")]
    with pytest.raises(SystemExit):
        main([*base, "--gamma", "0.1"])
    assert "--gamma was renamed --balance-reward-coef" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--world-size", "10"])
    assert "--world-size was renamed --world-per-skill" in capsys.readouterr().err
    old = tmp_path / "old.yaml"
    old.write_text("gamma: 0.1\n")
    with pytest.raises(ConfigError, match="--gamma is now --balance-reward-coef"):
        load_config(TrainConfig, {"config": old, "student": "s", "teacher": "t", "data": "d", "out": "o"})
    preset = tmp_path / "study.yaml"
    preset.write_text("eval: {world_size: 3}\n")
    with pytest.raises(ConfigError, match="--world-size is now --world-per-skill"):
        load_study(str(preset))


def test_config_study_file_is_the_commands_section_with_its_models():
    """`--config STUDY.yaml` for one command takes that command's section of a study file, with the
    study's corpus, problem set and teacher (and padd seed's pretrained student): the commands of
    the docs' GPU recipe read the paper pair's preset so."""
    from pathlib import Path

    import yaml

    from padd.config import SeedConfig, TrainConfig, WarmupConfig

    path = Path(__file__).parent.parent / "configs" / "study-qwen2.5-math-7b-to-qwen3-30b-a3b.yaml"
    study = yaml.safe_load(path.read_text())
    seed = load_config(SeedConfig, {"config": path, "out": "o"})
    assert (seed.teacher, seed.student, seed.corpus) == (study["teacher"], study["student"], study["corpus"])
    assert seed.tokens == study["seed"]["tokens"]
    warmup = load_config(WarmupConfig, {"config": path, "student": "runs/seeded", "out": "o"})
    assert (warmup.teacher, warmup.student) == (study["teacher"], "runs/seeded")
    for key, value in study["warmup"].items():
        assert getattr(warmup, key) == value, key
    train = load_config(TrainConfig, {"config": path, "student": "runs/warm", "out": "o", "steps": 1})
    assert (train.data, train.steps, train.teacher) == (study["data"], 1, study["teacher"])
    for key, value in study["train"].items():
        if key != "steps":
            assert getattr(train, key) == value, key


def test_a_study_file_whose_teacher_is_a_preset_name_gives_no_teacher_path(tmp_path):
    """A study copied from the built-in tiny one names its teacher by `padd teacher` preset, which
    padd reproduce trains: `--config STUDY` for one command must not take it for a checkpoint path."""
    from padd.config import TrainConfig

    study = tmp_path / "study.yaml"
    study.write_text("teacher: tiny\ndata: world\ntrain: {steps: 3}\n")
    with pytest.raises(ConfigError, match="missing --teacher"):
        load_config(TrainConfig, {"config": study, "student": "s", "out": "o"})
    train = load_config(TrainConfig, {"config": study, "student": "s", "teacher": "runs/t", "out": "o"})
    assert (train.teacher, train.steps, train.data) == ("runs/t", 3, "world")
