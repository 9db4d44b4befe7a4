"""pass@k, and `padd teacher` followed by `padd eval` end to end (a few training steps)."""

import json
import math

import pytest

from helpers import padd
from padd.cli import main
from padd.eval import pass_at_k


@pytest.mark.parametrize(("n", "c", "k"), [(10, 3, 1), (10, 3, 5), (8, 0, 4), (8, 8, 2), (5, 2, 5)])
def test_pass_at_k_closed_form(n, c, k):
    # 1 - C(n-c, k)/C(n, k) == 1 - prod_{i=n-c+1}^{n} (1 - k/i)  (Chen et al., 2021)
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    assert pass_at_k(n, c, k) == pytest.approx(1.0 - product)
    assert pass_at_k(n, c, 1) == pytest.approx(c / n)


def test_pass_at_k_rejects_bad_counts():
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_teacher_then_eval_end_to_end(tmp_path):
    teacher = tmp_path / "teacher"
    assert (
        padd(
            "teacher",
            preset="tiny",
            out=teacher,
            steps=3,
            batch_size=8,
            train_per_skill=50,
            eval_per_skill=2,
            progress=False,
        )
        == 0
    )
    record = json.loads((teacher / "padd_teacher.json").read_text())
    assert record["steps"] == 3 and record["batch_size"] == 8
    assert set(record["pass@1"]) == {"add", "sub", "mul", "expr", "word", "reverse"}
    out = tmp_path / "eval.json"
    assert (
        padd(
            "eval",
            model=teacher,
            bench="world:add,world:reverse",
            world_per_skill=3,
            samples=2,
            max_new_tokens=8,
            out=out,
            progress=False,
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert set(report["benchmarks"]) == {"world:add", "world:reverse"}
    add = report["benchmarks"]["world:add"]
    assert add["n"] == 3 and {"pass@1", "avg@2", "pass@2"} <= set(add)
    row = add["rows"][0]
    assert len(row["samples"]) == 2 and len(row["samples_correct"]) == 2 and isinstance(row["greedy_correct"], bool)
    assert report["flops_per_token@1024"] > 0 and not math.isnan(report["average"]["pass@1"])

    # The same evaluation serves an MoE student decomposed from that teacher on the world corpus.
    student = tmp_path / "student"
    assert (
        padd(
            "decompose",
            teacher=teacher,
            corpus="world",
            experts=8,
            top_k=2,
            out=student,
            tokens=512,
            seq_len=64,
            progress=False,
        )
        == 0
    )
    assert (
        padd(
            "eval",
            model=student,
            bench="world:mul",
            world_per_skill=2,
            max_new_tokens=8,
            out=tmp_path / "student.json",
            progress=False,
        )
        == 0
    )
    student_report = json.loads((tmp_path / "student.json").read_text())
    assert student_report["flops_per_token@1024"] < report["flops_per_token@1024"]


def test_eval_reports_bad_bench(tmp_path, llama_teacher, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no problem here"}\n')
    code = main(
        ["eval", "--model", str(llama_teacher), "--bench", str(bad), "--out", str(tmp_path / "e.json"), "--no-progress"]
    )
    assert code == 2 and "no usable row" in capsys.readouterr().err


def test_teacher_refuses_fewer_examples_than_one_batch(tmp_path, capsys):
    out = tmp_path / "t"
    code = padd("teacher", preset="tiny", out=out, steps=1, train_per_skill=2, eval_per_skill=0, progress=False)
    assert code != 0 and "raise --train-per-skill" in capsys.readouterr().err


def test_length_sorted_micro_batches_leave_the_whole_batch_gradient():
    """The teacher runs each batch as length-sorted micro-batches, each padded to its own longest
    example: the gradient and loss must be those of one backward over the whole padded batch."""
    import random

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from padd.teacher import _batch, accumulate_batch_gradient

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=40,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    )
    rng = random.Random(0)
    examples = []
    for _ in range(7):  # lengths from 5 to 30 tokens, prompts of 2 to 8
        n = rng.randint(5, 30)
        examples.append(([rng.randint(1, 39) for _ in range(n)], rng.randint(2, min(8, n - 1))))

    input_ids, labels, mask = _batch(examples, 0)
    whole = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
    whole.backward()
    reference = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss = accumulate_batch_gradient(model, examples, 0, "cpu", micro_batches=3)
    assert loss == pytest.approx(whole.item(), rel=1e-5)
    for p, ref in zip(model.parameters(), reference, strict=True):
        torch.testing.assert_close(p.grad, ref, rtol=1e-4, atol=1e-6)


def test_the_moe_preset_trains_a_pretrained_student_with_the_teachers_tokenizer(tmp_path, llama_teacher):
    """`padd teacher --preset tiny-moe`: a Qwen3-MoE model of the paper's proportions against the tiny
    teacher (more than 2x its parameters, about 0.47x its active FFN FLOPs), trained on less math,
    with the given tokenizer; saved without the pretraining's auxiliary-loss switch."""
    from transformers import AutoConfig, AutoTokenizer

    from padd.flops import param_counts
    from padd.teacher import PRESETS, build_model
    from padd.world.tasks import MATH_SKILLS

    out = tmp_path / "student"
    flags = dict(preset="tiny-moe", out=out, steps=2, batch_size=4, train_per_skill=40, eval_per_skill=0)
    assert padd("teacher", tokenizer=llama_teacher, progress=False, **flags) == 0
    config = AutoConfig.from_pretrained(out)
    assert config.model_type == "qwen3_moe" and config.output_router_logits is False
    assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(llama_teacher).get_vocab()
    record = json.loads((out / "padd_teacher.json").read_text())
    assert record["train_per_skill"]["reverse"] == 40 and all(record["train_per_skill"][s] == 40 for s in MATH_SKILLS)

    # the preset's shape against the tiny teacher's, at full vocabulary
    tokenizer = AutoTokenizer.from_pretrained(llama_teacher)
    teacher, student = (
        build_model(PRESETS["tiny"], tokenizer).config,
        build_model(PRESETS["tiny-moe"], tokenizer).config,
    )
    (t_total, _), (s_total, _) = param_counts(teacher), param_counts(student)
    assert s_total > 2 * t_total
    p = PRESETS["tiny-moe"]
    active_ffn = p.num_layers * 3 * p.hidden_size * p.moe_intermediate_size * p.top_k
    teacher_ffn = PRESETS["tiny"].num_layers * 3 * PRESETS["tiny"].hidden_size * PRESETS["tiny"].intermediate_size
    assert 0.42 < active_ffn / teacher_ffn < 0.52
    assert PRESETS["tiny-moe"].math_per_skill < PRESETS["tiny"].train_per_skill
