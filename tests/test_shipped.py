"""The tiny teacher padd ships for the demo: its weights match their record, it loads like any
checkpoint, and a fresh `padd eval` of it gives the scores its record holds."""

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


def test_shipped_teacher_matches_its_record_and_evaluates_to_its_scores(tmp_path):
    folder = shipped.shipped_model("tiny")  # raises if the weights' hash differs from the record's
    record = json.loads((folder / shipped.RECORD).read_text())
    assert record["command"].startswith("padd teacher --preset tiny") and len(record["commit"]) == 40
    model = AutoModelForCausalLM.from_pretrained(folder)
    preset = PRESETS["tiny"]
    assert (model.config.model_type, model.config.hidden_size) == ("qwen2", preset.hidden_size)
    assert len(AutoTokenizer.from_pretrained(folder)) == model.config.vocab_size
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
