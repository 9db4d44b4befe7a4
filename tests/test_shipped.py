"""The models padd ships (the demo's teacher, the tiny-paper study's student): their weights match
their records, each loads like any checkpoint, and a fresh `padd eval` of each gives the scores its
record holds."""

from __future__ import annotations

import json
import shutil

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

import padd.shipped as shipped
from padd.cli import main
from padd.errors import UserError
from padd.teacher import PRESETS
from padd.world.tasks import SKILLS


@pytest.mark.parametrize("name", list(shipped.SHIPPED))
def test_shipped_model_matches_its_record_and_evaluates_to_its_scores(tmp_path, name):
    folder = shipped.shipped_model(name)  # raises if the weights' hash differs from the record's
    record = json.loads((folder / shipped.RECORD).read_text())
    assert record["command"] == shipped.SHIPPED[name].command and len(record["commit"]) == 40
    model = AutoModelForCausalLM.from_pretrained(folder)
    preset = PRESETS[shipped.SHIPPED[name].preset]
    assert model.config.hidden_size == preset.hidden_size
    assert getattr(model.config, "num_experts", 0) == preset.experts
    assert len(AutoTokenizer.from_pretrained(folder)) == model.config.vocab_size
    if teacher := shipped.SHIPPED[name].tokenizer_of:  # a student shares its teacher's tokenizer
        ours, theirs = (
            json.loads((f / "tokenizer.json").read_text())["model"] for f in (folder, shipped.model_dir(teacher))
        )
        assert (ours["vocab"], ours["merges"]) == (theirs["vocab"], theirs["merges"])
    scores = shipped.recorded_eval(folder, scratch=tmp_path / "eval.json")
    assert set(scores) == set(SKILLS)
    # greedy decoding in float32 at this thread count: the same completions, so the same scores
    assert scores == record["eval"]["pass@1"]


def test_a_changed_weights_file_is_refused(tmp_path, monkeypatch):
    copy = tmp_path / "teacher-tiny"
    shutil.copytree(shipped.model_dir("tiny"), copy)
    with open(copy / shipped.WEIGHTS, "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    monkeypatch.setattr(shipped, "model_dir", lambda name: copy)
    with pytest.raises(UserError, match="does not match its record"):
        shipped.shipped_model("tiny")


def test_demo_teacher_seed_needs_train_teacher(tmp_path, capsys):
    assert main(["demo", "--teacher-seed", "1", "--out", str(tmp_path / "demo")]) != 0
    assert "--train-teacher" in capsys.readouterr().err


def test_a_study_or_plan_names_a_shipped_model(tmp_path, capsys):
    assert shipped.resolve("shipped:tiny") == str(shipped.shipped_model("tiny"))
    assert shipped.resolve("runs/teacher") == "runs/teacher"  # a folder is left as it is
    out = tmp_path / "study"
    assert main(["reproduce", "--preset", "tiny-paper", "--student", "shipped:nope", "--out", str(out)]) != 0
    assert "no shipped model 'nope'" in capsys.readouterr().err
    assert main(["plan", "--config", "tiny", "--student", "shipped:tiny-paper-moe"]) == 0
