"""Answer grading: extract the final answer, decide equivalence with `math-verify`, under a time limit.

Beyond math-verify: answers in scientific notation (`4e33`, `1.3e-7`) are read as `4 \\times 10^{33}`
in both the gold and the prediction, and a gold that is not an integer matches any number within a
relative tolerance of REL_TOL (science benchmarks round); integers stay exact. Words compare as
text with or without `\\text{}`, case aside. A gold that math-verify can only read in part (an
expression of which it keeps a bare number) is compared as text, never as that number.
"""

from __future__ import annotations

import math
import re
import threading

_ANSWER_IS = re.compile(r"(?:final answer|the answer)\s*(?:is\s*:?|:)\s*\$?([^\n$]+?)\$?\s*(?:\.\s*)?$", re.IGNORECASE)
# Minerva's few-shot format: "The final answer is $27$. I hope it is correct."
_ANSWER_IN_DOLLARS = re.compile(r"(?:final answer|the answer)\s*(?:is\s*:?|:)\s*\$([^$]+)\$", re.IGNORECASE)
_HASHES = re.compile(r"####\s*([^\n]+)")  # GSM8K's "#### 72"
_BOXED_BARE = re.compile(r"\\boxed\s+([^\s${}\\]+)")  # "\boxed 5"
_WORD = re.compile(r"^[A-Za-z][A-Za-z0-9]+$")
_TEXT_WRAPPER = re.compile(r"^\\(?:text|textbf|textit|mathrm|mbox)\s*\{(.*)\}$")
_SCIENTIFIC = re.compile(r"(?<![\w.])(\d+(?:\.\d*)?|\.\d+)[eE]([+-]?\d+)(?![\w.])")
_TRAILING_POINT = re.compile(r"(\d)\.(?![\d])")  # "-1./3" -> "-1/3"
# units in a text wrapper first, then bare commands (\\frac, \\pi, ...)
_COMMANDS = re.compile(r"\\(?:text|mathrm|mbox|textrm)\s*\{[^}]*\}|\\[A-Za-z]+")
# One pathological expression must not hang an evaluation: math-verify's own limits (signal based).
TIMEOUT_S = 5
# Relative tolerance of a non-integer numeric gold (Qwen2.5-Math's evaluation uses the same).
REL_TOL = 1e-4


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
    """The final answer of a completion: the last \\boxed{} (or `\\boxed 5`), else Minerva's
    "The final answer is $X$.", GSM8K's "#### X", or a "The answer is X" sentence."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    for pattern in (_BOXED_BARE, _ANSWER_IN_DOLLARS, _HASHES):
        found = pattern.findall(text)
        if found:
            return found[-1].strip().rstrip(".").strip()
    for line in reversed(text.strip().splitlines()):
        m = _ANSWER_IS.search(line.strip())
        if m:
            return m.group(1).strip().rstrip(".")
    return None


def _normalise(s: str) -> str:
    return re.sub(r"\s+", "", s).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").rstrip(".")


def _unwrap_text(s: str) -> str:
    """`\\text{Evelyn}` -> `Evelyn`: a whole answer in a text wrapper is its words."""
    m = _TEXT_WRAPPER.match(s.strip())
    return m.group(1).strip() if m else s.strip()


def _for_parsing(s: str) -> str:
    """Scientific notation as LaTeX powers of ten, a trailing decimal point dropped."""
    return _TRAILING_POINT.sub(r"\1", _SCIENTIFIC.sub(r"\1 \\times 10^{\2}", s))


def _number(parsed) -> float | None:
    """The value of a math-verify parse that is a plain real number, else None."""
    import sympy

    expr = parsed[0] if parsed else None
    if not isinstance(expr, sympy.Basic) or not expr.is_number:
        return None
    try:
        value = complex(expr)
    except (TypeError, ValueError):
        return None
    return value.real if value.imag == 0 and math.isfinite(value.real) else None


def _is_integer_text(s: str) -> bool:
    return re.fullmatch(r"-?\d+", s.replace(",", "").replace("{,}", "").strip()) is not None


def _letters_beyond_commands(s: str) -> bool:
    """Whether a gold names variables (letters outside LaTeX commands and \\text{} units; e and i,
    the constants, aside): then math-verify reading it as a bare number has read a fragment."""
    return re.search(r"[A-DF-HJ-Za-df-hj-z]", _COMMANDS.sub("", s)) is not None


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
    answer, gold_answer = _unwrap_text(answer), _unwrap_text(last_boxed(gold) or gold.strip())
    if _normalise(answer) == _normalise(gold_answer):
        return True
    if _WORD.match(_normalise(gold_answer)) or _WORD.match(_normalise(answer)):
        # Plain words are text, not algebra: math-verify would read "abc" and "cba" as a*b*c == c*b*a.
        return _normalise(answer).lower() == _normalise(gold_answer).lower()
    limit = timeout_s if threading.current_thread() is threading.main_thread() else None
    configs = [LatexExtractionConfig(), ExprExtractionConfig()]
    try:
        gold_parsed = parse(f"\\boxed{{{_for_parsing(gold_answer)}}}", extraction_config=configs, parsing_timeout=limit)
        pred_parsed = parse(f"\\boxed{{{_for_parsing(answer)}}}", extraction_config=configs, parsing_timeout=limit)
        if not gold_parsed or not pred_parsed:
            return False
        gold_value = _number(gold_parsed)
        if gold_value is not None and _letters_beyond_commands(gold_answer):
            return False  # an expression read as a bare number: only the exact text above matches it
        if verify(gold_parsed, pred_parsed, timeout_seconds=limit):
            return True
        pred_value = _number(pred_parsed)
        if gold_value is None or pred_value is None or _is_integer_text(gold_answer):
            return False
        return math.isclose(gold_value, pred_value, rel_tol=REL_TOL)
    except Exception:  # a parser or sympy failure on odd input is a wrong answer, not a crashed eval
        return False
