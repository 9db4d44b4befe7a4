"""Two runs of the same warm-up and the same Phase B at 2 threads write bit-identical students.

At 2 threads the backward of advanced indexing (the experts' token gather, the embedding) is an
accumulating index_put_, whose parallel CPU kernel adds in whatever order its threads finish:
without padd.determinism the two warm-ups differed in every expert weight and the two Phase B runs
in 129 tensors. The shape is the tiny world preset's, large enough for that kernel to split.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import padd


@pytest.fixture(scope="module")
def world_pair(tmp_path_factory):
    """A random-weight teacher of the tiny world preset's shape and its decomposition (E = 8, top-4)."""
    from padd.corpus import iter_texts
    from padd.teacher import PRESETS, build_model
    from padd.tiny import build_tokenizer

    work = tmp_path_factory.mktemp("determinism")
    texts = iter_texts("world")
    tokenizer = build_tokenizer((next(texts) for _ in range(4000)), vocab_size=512)
    torch.manual_seed(0)
    build_model(PRESETS["tiny"], tokenizer).save_pretrained(work / "teacher")
    tokenizer.save_pretrained(work / "teacher")
    flags = dict(corpus="world", experts=8, top_k=4, tokens=1024, seq_len=64, progress=False)
    assert padd("decompose", teacher=work / "teacher", out=work / "student", **flags) == 0
    return work / "teacher", work / "student"


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _differing(a, b) -> list[str]:
    first, second = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert first.keys() == second.keys()
    return [k for k in first if not torch.equal(first[k], second[k])]


def test_warmup_and_phase_b_are_bit_reproducible_at_two_threads(tmp_path, world_pair, two_threads):
    teacher, student = world_pair
    for run in ("a", "b"):
        flags = dict(student=student, teacher=teacher, corpus="world", tokens=16384, progress=False)
        assert padd("warmup", out=tmp_path / f"warm-{run}", **flags) == 0
    assert _differing(tmp_path / "warm-a", tmp_path / "warm-b") == []
    for run in ("a", "b"):
        flags = dict(student=tmp_path / "warm-a", teacher=teacher, data="world", world_per_skill=20)
        flags.update(steps=2, prompts_per_step=4, group_size=4, max_new_tokens=48, save_every=0, progress=False)
        assert padd("train", out=tmp_path / f"train-{run}", **flags) == 0
    assert _differing(tmp_path / "train-a" / "student", tmp_path / "train-b" / "student") == []
    # every logged quantity but the clock's and the memory's
    logged = [_logged(tmp_path / f"train-{run}" / "metrics.jsonl") for run in ("a", "b")]
    assert logged[0] == logged[1]


def _logged(metrics) -> list[dict]:
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(("time_", "mem_", "tokens_per_s"))} for r in rows]


def test_deterministic_kernels_leave_new_tensors_unfilled():
    """PyTorch's deterministic mode would write NaN into every torch.empty: each parameter that
    accelerate's init_empty_weights creates before moving it to the meta device, so counting a 7B
    model's parameters after any training in the same process took 4.6 s instead of 0.15 s."""
    from padd.determinism import deterministic_kernels

    before = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    try:
        deterministic_kernels("cpu")
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.utils.deterministic.fill_uninitialized_memory is False
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.utils.deterministic.fill_uninitialized_memory = before[1]
