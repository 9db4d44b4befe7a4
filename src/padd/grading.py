"""Answer grading: extract the final answer, decide equivalence with `math-verify`, under a time limit."""

from __future__ import annotations

import re
import threading

_ANSWER_IS = re.compile(r"(?:final answer|the answer)\s*(?:is\s*:?|:)\s*\$?([^\n$]+?)\$?\s*(?:\.\s*)?$", re.IGNORECASE)
_WORD = re.compile(r"^[A-Za-z][A-Za-z0-9]+$")
# One pathological expression must not hang an evaluation: math-verify's own limits (signal based).
TIMEOUT_S = 5


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}) with balanced braces, or None."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None


def extract_answer(text: str) -> str | None:
    """The final answer of a completion: the last \\boxed{}, else an "The answer is X" sentence."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    for line in reversed(text.strip().splitlines()):
        m = _ANSWER_IS.search(line.strip())
        if m:
            return m.group(1).strip().rstrip(".")
    return None


def _normalise(s: str) -> str:
    return re.sub(r"\s+", "", s).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").rstrip(".")


def grade(prediction: str, gold: str, *, timeout_s: int = TIMEOUT_S) -> bool:
    """True when the completion's final answer is equivalent to `gold` (a bare answer or a \\boxed{} text).

    Exact string matches short-circuit; everything else goes through math-verify (fractions vs
    decimals, \\dfrac, units and text around numbers, intervals, tuples, ...). Outside the main
    thread math-verify's signal-based time limit is unavailable and parsing runs without it.
    """
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    answer = extract_answer(prediction)
    if answer is None:
        return False
    gold_answer = last_boxed(gold) or gold.strip()
    if _normalise(answer) == _normalise(gold_answer):
        return True
    if _WORD.match(_normalise(gold_answer)) or _WORD.match(_normalise(answer)):
        # Plain words are text, not algebra: math-verify would read "abc" and "cba" as a*b*c == c*b*a.
        return False
    limit = timeout_s if threading.current_thread() is threading.main_thread() else None
    configs = [LatexExtractionConfig(), ExprExtractionConfig()]
    try:
        gold_parsed = parse(f"\\boxed{{{gold_answer}}}", extraction_config=configs, parsing_timeout=limit)
        pred_parsed = parse(f"\\boxed{{{answer}}}", extraction_config=configs, parsing_timeout=limit)
        if not gold_parsed or not pred_parsed:
            return False
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=limit))
    except Exception:  # a parser or sympy failure on odd input is a wrong answer, not a crashed eval
        return False
