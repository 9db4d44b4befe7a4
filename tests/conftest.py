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
