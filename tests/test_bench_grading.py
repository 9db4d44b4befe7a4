"""The field's benchmark layouts load to their intended gold, and the grader accepts the common
correct forms of each without accepting what it should not (each case failed before the fix)."""

import json

import pytest

from padd.data import load_problems
from padd.grading import extract_answer, grade


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_olympiadbench_list_golds_are_joined_without_dollars(tmp_path):
    rows = [  # the Qwen2.5-Math evaluation layout of OlympiadBench: a list of LaTeX strings with $
        {"id": 1, "question": "Find f(n).", "final_answer": ["$\\frac{1}{2 n+2}$"], "solution": ["..."]},
        {"id": 2, "question": "Find both.", "final_answer": ["$69$,$84$"], "solution": ["..."]},
        {"id": 3, "question": "Which?", "final_answer": ["1,3"], "solution": ["..."]},
        {"id": 4, "question": "Two?", "final_answer": ["$6m$", "$2$"], "solution": ["..."]},
    ]
    golds = [p.answer for p in load_problems(str(_write(tmp_path / "olympiadbench.jsonl", rows)))]
    assert golds == ["\\frac{1}{2 n+2}", "69,84", "1,3", "6m, 2"]
    assert grade("\\boxed{\\frac{1}{2n+2}}", golds[0]) and grade("\\boxed{69, 84}", golds[1])
    assert grade("\\boxed{1,3}", golds[2]) and not grade("\\boxed{1,4}", golds[2])


def test_amc_integral_float_golds_read_as_integers(tmp_path):
    rows = [{"question": "How many?", "answer": 27.0}, {"question": "Ratio?", "answer": 0.5}]
    golds = [p.answer for p in load_problems(str(_write(tmp_path / "amc23.jsonl", rows)))]
    assert golds == ["27", "0.5"]


def test_minerva_gold_is_the_solutions_last_box(tmp_path):
    rows = [{"problem": "Mass?", "solution": "First \\boxed{2} is wrong; it is \\boxed{4e33}.", "type": "x"}]
    (problem,) = load_problems(str(_write(tmp_path / "minerva_math.jsonl", rows)))
    assert problem.answer == "4e33"


@pytest.mark.parametrize(
    ("prediction", "gold", "expected"),
    [
        # scientific notation, both ways, with a relative tolerance of 1e-4
        ("\\boxed{4 \\times 10^{33}}", "4e33", True),
        ("\\boxed{4\\cdot 10^{33}}", "4e33", True),
        ("\\boxed{4e33}", "4 \\times 10^{33}", True),
        ("\\boxed{1.3 \\times 10^{-7}}", "1.3e-7", True),
        ("\\boxed{1.30001 \\times 10^{-7}}", "1.3e-7", True),
        ("\\boxed{1.4 \\times 10^{-7}}", "1.3e-7", False),
        ("\\boxed{5 \\times 10^{33}}", "4e33", False),
        ("\\boxed{-0.33333}", "-1./3", True),
        ("\\boxed{10001}", "10000", False),  # integers are exact: no tolerance
        ("\\boxed{-\\frac{1}{3}}", "-1./3", True),
        # words in \text{} against bare words; word order still matters
        ("\\boxed{Evelyn}", "\\text{Evelyn}", True),
        ("\\boxed{\\text{east}}", "east", True),
        ("\\boxed{\\text{ellipse}}", "\\text{Ellipse}", True),
        ("\\boxed{cba}", "\\text{abc}", False),
        # an expression gold does not collapse to a bare number
        ("\\boxed{2}", "\\hbar \\omega(v+1 / 2)-\\frac{E_{0}^{2} e^{2}}{2 m \\omega^{2}}", False),
        ("\\boxed{2}", "2 m", False),
        # what already worked still works
        ("\\boxed{6m}", "6m", True),
        ("\\boxed{8 \\%}", "8\\%", True),
        ("\\boxed{1,000}", "1000", True),
        ("\\boxed{2\\frac{1}{2}}", "\\frac{5}{2}", True),
        ("\\boxed{30^\\circ}", "30", True),
        ("\\boxed{84, 69}", "69,84", True),  # OlympiadBench's multiple answers: unordered
        ("\\boxed{(1, 3)}", "(3, 1)", False),  # a tuple stays ordered
        ("\\boxed{5}", "5 \\text{ cm}", True),  # units in a text wrapper are not variables
        ("\\boxed{5}", "5\\mbox{ inches}", True),
        ("\\boxed{3}", "x = 3", True),
    ],
)
def test_grade_science_notation_words_and_expressions(prediction, gold, expected):
    assert grade(prediction, gold) is expected


@pytest.mark.parametrize(
    ("completion", "answer"),
    [
        ("... so 3*9 = 27. The final answer is $27$. I hope it is correct.", "27"),
        ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"),
        ("so the result is \\boxed 5", "5"),
        ("so the result is \\boxed 5.", "5"),
        ("The final answer is $\\frac{1}{2}$. I hope it is correct.", "\\frac{1}{2}"),
    ],
)
def test_answers_without_braces_are_extracted(completion, answer):
    assert extract_answer(completion) == answer
    assert grade(completion, answer)


def test_eval_with_a_bench_dir_records_templates_skips_truncation_and_answers(tmp_path, llama_teacher, capsys):
    """`padd eval --bench-dir DIR --bench NAME,...`: the usual file names resolve; the eval JSON records
    the prompt template and its text, per benchmark the rows, skipped rows and truncated prompts, k
    and the temperature, and per row the extracted answer beside the gold. A prompt longer than the
    context fails with what to do, or is cut from the left with --truncate-prompts."""
    from helpers import padd

    bench = tmp_path / "data"
    (bench / "amc23").mkdir(parents=True)
    _write(bench / "amc23" / "test.jsonl", [{"question": "What is 1 + 1?", "answer": 2.0}, {"question": "x"}])
    long = "What is " + " + ".join(["1"] * 400) + "?"  # over 512 positions in the tiny tokenizer
    _write(bench / "aime24.jsonl", [{"problem": long, "answer": "400"}, {"problem": "What is 2 + 2?", "answer": 4}])
    out = tmp_path / "e.json"
    flags = dict(model=llama_teacher, bench_dir=bench, out=out, max_new_tokens=4, progress=False)
    assert padd("eval", bench="amc23,aime24", **flags) == 2
    assert "--truncate-prompts" in capsys.readouterr().err
    assert (
        padd("eval", bench="amc23,aime24", truncate_prompts=True, samples=2, prompt_template="qwen-math", **flags) == 0
    )
    report = json.loads(out.read_text())
    assert report["prompt_template"] == "qwen-math" and "<|im_start|>system" in report["prompt_template_text"]
    amc, aime = report["benchmarks"]["amc23"], report["benchmarks"]["aime24"]
    assert (amc["n"], amc["skipped"], amc["truncated_prompts"]) == (1, 1, 0)
    assert (aime["n"], aime["skipped"], aime["truncated_prompts"]) == (2, 0, 1)
    assert (amc["k"], amc["temperature"]) == (2, 0.6) and "avg@2" in amc and "pass@2" in amc
    row = amc["rows"][0]
    assert row["answer"] == "2" and "extracted" in row
    assert padd("eval", bench="gsm8k", **flags) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the previous run's loading bars
    assert last.startswith("padd eval: error: --bench gsm8k") and "gsm8k/test.jsonl" in last


def test_padd_accepts_every_correct_variant_of_every_fixture_gold_and_no_wrong_one():
    """benchmarks/bench_grader.py's table (docs/evaluation.md, "Grader agreement") on the layout fixtures."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_grader.py"
    spec = importlib.util.spec_from_file_location("bench_grader", path)
    bench_grader = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_grader)
    rows = bench_grader.agreement()
    assert {r["bench"] for r in rows} == set(bench_grader.BENCHES)
    for r in rows:
        assert r["padd_correct"] == r["correct"] and r["padd_wrong"] == 0, r
    minerva = next(r for r in rows if r["bench"] == "minerva_math")
    assert minerva["mv_correct"] < minerva["correct"]  # what plain math-verify misses there


def test_the_layout_fixtures_evaluate_from_a_bench_dir(tmp_path, llama_teacher):
    from pathlib import Path

    from helpers import padd

    fixtures = Path(__file__).resolve().parent / "fixtures" / "benchmarks"
    out = tmp_path / "e.json"
    names = "aime24,amc23,math500,minerva_math,olympiadbench"
    assert padd("eval", model=llama_teacher, bench_dir=fixtures, bench=names, out=out, max_new_tokens=2) == 0
    report = json.loads(out.read_text())
    assert list(report["benchmarks"]) == names.split(",")
    golds = {b: [r["answer"] for r in v["rows"]] for b, v in report["benchmarks"].items()}
    assert golds["amc23"] == ["27", "0.5"] and golds["olympiadbench"][1] == "69,84"
    assert golds["minerva_math"][0] == "4e33"
