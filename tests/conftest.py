"""Shared fixtures: tiny real-architecture teachers (built once per session) and a small corpus."""

from __future__ import annotations

import pytest
import torch

from helpers import padd
from padd.tiny import arithmetic_corpus, make_tiny_teacher


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def corpus_lines() -> list[str]:
    return arithmetic_corpus(1500, seed=1)


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory, corpus_lines):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(corpus_lines) + "\n")
    return path


@pytest.fixture(scope="session")
def llama_teacher(tmp_path_factory, corpus_lines):
    return make_tiny_teacher(tmp_path_factory.mktemp("llama") / "teacher", "llama", texts=corpus_lines)


@pytest.fixture(scope="session")
def qwen2_teacher(tmp_path_factory, corpus_lines):
    """Qwen2 with non-zero qkv biases, so the biases' copy is tested."""
    return make_tiny_teacher(tmp_path_factory.mktemp("qwen2") / "teacher", "qwen2", texts=corpus_lines, bias_std=0.2)


@pytest.fixture(scope="session")
def llama_student(tmp_path_factory, llama_teacher, corpus_file):
    """The Llama teacher decomposed by `padd decompose` (E = 4, top-2); read-only for the tests."""
    out = tmp_path_factory.mktemp("student") / "student"
    flags = dict(teacher=llama_teacher, corpus=corpus_file, experts=4, top_k=2, tokens=512, seq_len=64)
    assert padd("decompose", out=out, progress=False, **flags) == 0
    return out


@pytest.fixture(scope="session")
def routed_student(tmp_path_factory, llama_student, llama_teacher, corpus_file):
    """The decomposed student with the uniform router start (tiny random weights): no exact ties,
    so a router update changes its normalised scores (from an all-zero router, AdamW's first step
    can move every row alike and leave them uniform)."""
    out = tmp_path_factory.mktemp("routed") / "student"
    flags = dict(student=llama_student, teacher=llama_teacher, corpus=corpus_file, epochs=0, tokens=256, seq_len=64)
    assert padd("warmup", out=out, progress=False, **flags) == 0
    return out


@pytest.fixture
def varied_rewards(monkeypatch):
    """The tiny test models never answer a world problem right, so every advantage would be 0; a
    verifier that accepts completions of even length gives the groups mixed rewards (the real
    grader is tested on its own in test_world_data_grade)."""
    import padd.phase_b.loop as loop

    monkeypatch.setattr(loop, "grade", lambda text, answer: len(text) % 2 == 0)
