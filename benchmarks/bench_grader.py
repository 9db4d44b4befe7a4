"""padd's grader against plain math-verify on the field's benchmark layouts.

For every gold of the hand-written rows in tests/fixtures/benchmarks/ (one file per benchmark, each
in that benchmark's published evaluation layout), completions a model could write are generated:
correct ones (boxed, Minerva's "The final answer is $X$.", GSM8K's "#### X", scientific notation
written out, words without \\text{}) and wrong ones (the number moved, the word reversed, an
expression gold answered with a bare number). Each is graded by `padd.grade` and by plain
math-verify (`verify(parse("\\boxed{gold}"), parse(completion))`), and the table counts how often
each accepts the correct and the wrong ones.

    python benchmarks/bench_grader.py
"""

from __future__ import annotations

import re
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "benchmarks"
BENCHES = ("math500", "gsm8k", "aime24", "amc23", "minerva_math", "olympiadbench")


def variants(gold: str) -> tuple[list[str], list[str]]:
    """(correct completions, wrong completions) for one gold."""
    correct = [f"So the answer is \\boxed{{{gold}}}.", f"The final answer is ${gold}$. I hope it is correct."]
    wrong = []
    plain = gold.replace("{,}", "")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+", plain):  # a thousands separator, not a list
        plain = plain.replace(",", "")
    if re.fullmatch(r"-?\d+", plain):
        correct += [f"#### {plain}", f"so the result is \\boxed {plain}"]
        wrong += [f"\\boxed{{{int(plain) + 1}}}", f"#### {int(plain) + 1}"]
    elif re.fullmatch(r"-?\d*\.\d+", gold):
        correct += [f"\\boxed{{{gold}0}}"]
        wrong += [f"\\boxed{{{float(gold) * 1.1:g}}}"]
    if m := re.fullmatch(r"(-?[\d.]+)e(-?\d+)", gold):
        mantissa, exponent = m.groups()
        correct += [
            f"\\boxed{{{mantissa} \\times 10^{{{exponent}}}}}",
            f"\\boxed{{{mantissa}\\cdot 10^{{{exponent}}}}}",
        ]
        wrong += [f"\\boxed{{{float(mantissa) + 1:g} \\times 10^{{{exponent}}}}}"]
    if m := re.fullmatch(r"(-?)(\d+)\./(\d+)", gold):
        sign, num, den = m.groups()
        correct += [f"\\boxed{{{sign}\\frac{{{num}}}{{{den}}}}}", f"\\boxed{{{sign}{int(num) / int(den):.5f}}}"]
        wrong += [f"\\boxed{{{sign}\\frac{{{num}}}{{{int(den) + 1}}}}}"]
    if m := re.fullmatch(r"\\text\{(\w+)\}", gold):
        word = m.group(1)
        correct += [f"\\boxed{{{word}}}", f"\\boxed{{{word.capitalize()}}}"]
        wrong += [f"\\boxed{{{word[::-1]}}}"]
    if re.search(r"[a-zA-Z]", re.sub(r"\\[a-zA-Z]+", "", gold)) and not gold.startswith("\\text"):
        wrong += ["\\boxed{2}", "\\boxed{0}"]  # an expression gold must not collapse to a number
    if re.fullmatch(r"\d+,\d+", gold):
        a, b = gold.split(",")
        correct += [f"\\boxed{{{a}, {b}}}"]
        wrong += [f"\\boxed{{{a}, {int(b) + 1}}}"]
    if gold.startswith("[") and gold.endswith(")"):
        wrong += [f"\\boxed{{{gold[:-1]}]}}"]
    return correct, wrong


def plain_math_verify(completion: str, gold: str) -> bool:
    from math_verify import parse, verify

    try:
        return bool(verify(parse(f"\\boxed{{{gold}}}"), parse(completion)))
    except Exception:
        return False


def agreement(fixtures: Path = FIXTURES) -> list[dict]:
    """Per benchmark: golds, correct / wrong variants, and how many of each padd and math-verify accept."""
    from padd.data import load_problems
    from padd.grading import grade

    table = []
    for name in BENCHES:
        golds = [p.answer for p in load_problems(str(fixtures / name / "test.jsonl"))]
        row = {"bench": name, "golds": len(golds), "correct": 0, "wrong": 0}
        row |= {"padd_correct": 0, "mv_correct": 0, "padd_wrong": 0, "mv_wrong": 0, "agree": 0, "total": 0}
        for gold in golds:
            correct, wrong = variants(gold)
            for kind, completions in (("correct", correct), ("wrong", wrong)):
                for completion in completions:
                    ours, theirs = grade(completion, gold), plain_math_verify(completion, gold)
                    row[kind] += 1
                    row[f"padd_{kind}"] += ours
                    row[f"mv_{kind}"] += theirs
                    row["agree"] += ours == theirs
                    row["total"] += 1
        table.append(row)
    return table


def main() -> None:
    rows = agreement()
    print(
        "| benchmark | golds | correct variants: padd / math-verify accept "
        "| wrong variants: padd / math-verify accept | verdicts agree |"
    )
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['bench']} | {r['golds']} | {r['padd_correct']} / {r['mv_correct']} of {r['correct']} | "
            f"{r['padd_wrong']} / {r['mv_wrong']} of {r['wrong']} | {r['agree']} of {r['total']} |"
        )


if __name__ == "__main__":
    main()
