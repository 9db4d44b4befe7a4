"""Bad input gets one line saying what to do, before any model loads; a bug keeps its traceback."""

import pytest

from padd.cli import main

REQUIRED = {
    "decompose": ["--corpus", "world", "--out", "{out}", "--experts", "2", "--top-k", "1"],
    "seed": ["--corpus", "world", "--out", "{out}"],
    "warmup": ["--corpus", "world", "--out", "{out}"],
    "train": ["--data", "world:add", "--out", "{out}"],
    "eval": ["--out", "{out}/e.json"],
    "reproduce": ["--preset", "tiny", "--out", "{out}"],
}


def _run(command: str, paths: dict[str, str], tmp_path, capsys) -> tuple[int, str]:
    args = [command] + [a.format(out=tmp_path / "out") for a in REQUIRED[command]]
    for flag, value in paths.items():
        args += [flag, str(value)]
    code = main(args)
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.fixture()
def no_model(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "notes.txt").write_text("no checkpoint here")
    return folder


# command -> (its model flags, with the kind each must be)
CASES = {
    "decompose": {"--teacher": "dense"},
    "seed": {"--student": "moe", "--teacher": "dense"},
    "warmup": {"--student": "moe", "--teacher": "dense"},
    "train": {"--student": "moe", "--teacher": "dense"},
    "eval": {"--model": "any"},
    "reproduce": {"--teacher": "dense"},
}


@pytest.mark.parametrize("command", CASES)
def test_model_paths_are_checked_first(command, tmp_path, capsys, no_model, llama_teacher, llama_student):
    """For each model flag: a missing path, a folder without a model, and the wrong kind of model
    (dense where an MoE is expected and the reverse) each fail with one line naming the flag."""
    right = {"dense": llama_teacher, "moe": llama_student, "any": llama_teacher}
    wrong = {"dense": llama_student, "moe": llama_teacher}
    for flag, kind in CASES[command].items():
        others = {f: right[k] for f, k in CASES[command].items() if f != flag}
        for bad, expected in (
            (tmp_path / "missing", "no such folder"),
            (no_model, "no config.json"),
            *([(wrong[kind], "dense model" if kind == "moe" else "Mixture-of-Experts")] if kind in wrong else []),
        ):
            code, err = _run(command, {flag: bad, **others}, tmp_path, capsys)
            assert code == 2, (command, flag, bad, err)
            assert err.count("\n") == 0 and f"{flag} {bad}" in err and expected in err, err
            assert not (tmp_path / "out").exists()  # nothing written


def test_missing_data_paths_are_checked_first(tmp_path, capsys, llama_teacher, llama_student):
    code = main(
        ["train", "--student", str(llama_student), "--teacher", str(llama_teacher)]
        + ["--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")]
    )
    assert code == 2 and "--data" in capsys.readouterr().err
    code = main(
        ["decompose", "--teacher", str(llama_teacher), "--corpus", "./missing-corpus"]
        + ["--out", str(tmp_path / "o"), "--experts", "2", "--top-k", "1"]
    )
    assert code == 2 and "--corpus ./missing-corpus: no such file or folder" in capsys.readouterr().err


def test_hub_and_world_names_pass_the_path_checks():
    from padd.checks import check_data_path, check_model_dir

    check_model_dir("Qwen/Qwen2.5-Math-7B", "--teacher", "dense")  # resolved by transformers, not here
    check_data_path("world:add+sub,openai/gsm8k,gsm8k:main", "--data")


def test_a_bug_keeps_its_traceback(monkeypatch, tmp_path, llama_teacher):
    """Only UserError is turned into one line; any other exception (a ValueError included) propagates."""
    import padd.cli as cli

    def broken(cfg):
        raise ValueError("an internal invariant broke")

    monkeypatch.setitem(cli.COMMANDS, "eval", (cli.COMMANDS["eval"][0], broken, "eval"))
    with pytest.raises(ValueError, match="internal invariant"):
        main(["eval", "--model", str(llama_teacher), "--out", str(tmp_path / "e.json")])


def test_eval_refuses_to_replace_its_out_file_without_overwrite(tmp_path, capsys, llama_teacher):
    """`padd eval --out FILE` keeps an existing FILE, as every other command keeps its --out, unless
    --overwrite is passed; the refusal comes before the model loads."""
    out = tmp_path / "e.json"
    out.write_text("earlier scores")
    args = ["eval", "--model", str(llama_teacher), "--out", str(out), "--bench", "world:add", "--no-progress"]
    args += ["--world-per-skill", "1", "--max-new-tokens", "2"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"--out {out}" in err and "--overwrite" in err, err
    assert out.read_text() == "earlier scores"
    assert main([*args, "--overwrite"]) == 0
    assert out.read_text() != "earlier scores"
