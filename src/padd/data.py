"""Problem/answer sets: local JSONL/JSON/parquet files, `datasets` datasets, or the miniature world.

The common layouts are recognised without configuration:
- `problem` + `answer` (MATH-500; `solution` may ride along),
- `question` + `answer` ending in `#### value` (GSM8K),
- `question`/`problem` + `gt_answer`/`gt`/`final_answer` (public math evaluation suites),
- only a `solution`: its last \\boxed{} is the answer.
Malformed rows are reported (file, line, reason) and skipped, never silently; a source with no
usable row is an error.
"""

from __future__ import annotations

import json
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path

from padd.errors import UserError
from padd.grading import last_boxed
from padd.world.tasks import parse_world_spec, world_rows

log = logging.getLogger(__name__)

PROBLEM_FIELDS = ("problem", "question", "query", "prompt", "input")
ANSWER_FIELDS = ("answer", "gt_answer", "gt", "final_answer", "target", "output")
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


class DataError(UserError):
    """A data source is unreadable or has no usable row."""


@dataclass(frozen=True)
class Problem:
    """One verifiable task. `source` names where it came from (file:line, dataset[index], world id)."""

    problem: str
    answer: str
    source: str
    skill: str | None = None
    solution: str | None = None


def _gold_text(value) -> str:
    """A gold as text: a list (OlympiadBench's `final_answer`) joined with ", ", LaTeX `$` delimiters
    dropped (`['$69$,$84$']` -> `69,84`), an integral float (AMC's `27.0`) as an integer."""
    if isinstance(value, list):
        return ", ".join(t for t in (_gold_text(v) for v in value) if t)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return re.sub(r"(?<!\\)\$", "", str(value)).strip()


def _answer_of(row: dict, answer_field: str | None) -> str | None:
    fields = [answer_field] if answer_field else [f for f in ANSWER_FIELDS if f in row]
    for f in fields:
        value = row.get(f)
        if value is None or _gold_text(value) == "":
            continue
        text = _gold_text(value)
        if "####" in text:  # GSM8K: the rationale, then "#### 1,234"
            return text.rsplit("####", 1)[1].strip().replace(",", "")
        return (last_boxed(text) or text).strip()
    solution = row.get("solution")
    return last_boxed(str(solution)) if solution else None


def row_to_problem(
    row: dict, source: str, problem_field: str | None = None, answer_field: str | None = None
) -> tuple[Problem | None, str | None]:
    """(Problem, None) for a usable row, (None, reason) otherwise."""
    if not isinstance(row, dict):
        return None, f"not an object but {type(row).__name__}"
    pfield = problem_field or next((f for f in PROBLEM_FIELDS if f in row), None)
    if pfield is None or pfield not in row:
        return None, f"no problem field (looked for {problem_field or ', '.join(PROBLEM_FIELDS)})"
    problem = row[pfield]
    if not isinstance(problem, str) or not problem.strip():
        return None, f"empty or non-text {pfield!r}"
    answer = _answer_of(row, answer_field)
    if not answer:
        wanted = answer_field or ", ".join(ANSWER_FIELDS)
        return None, f"no answer (looked for {wanted}, or a \\boxed{{}} in solution)"
    skill = row.get("skill") or row.get("type") or row.get("subject")
    return Problem(problem.strip(), answer, source, skill, row.get("solution")), None


def _rows_of_file(path: Path):
    """(line-or-index label, row or parse error) pairs of one local file."""
    if path.suffix == ".jsonl":
        with path.open() as fh:
            for i, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    yield f"{path}:{i}", json.loads(line)
                except json.JSONDecodeError as err:
                    yield f"{path}:{i}", err
    elif path.suffix == ".json":
        data = json.loads(path.read_text())
        rows = data if isinstance(data, list) else data.get("data") or data.get("rows") or [data]
        for i, row in enumerate(rows):
            yield f"{path}[{i}]", row
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path}[{i}]", row
    else:
        raise DataError(f"{path}: unsupported file type; use .jsonl, .json or .parquet")


def load_problems(spec: str, **kwargs) -> list[Problem]:
    """The usable problems of a SPEC (`load_problem_set`'s, without the count of skipped rows)."""
    return load_problem_set(spec, **kwargs)[0]


def load_problem_set(
    spec: str,
    *,
    split: str = "test",
    problem_field: str | None = None,
    answer_field: str | None = None,
    limit: int | None = None,
    world_per_skill: int = 200,
    seed: int = 0,
) -> tuple[list[Problem], int]:
    """Load a problem set from a SPEC: `world`, `world:SKILL`, a local file or folder, or a `datasets` name;
    returns (the usable problems, how many rows were skipped as malformed).

    Args:
        split: the split of a `datasets` dataset or of the world (`train` / `val` / `test`); a local
            file is one split already, so only `train` and `test` (the command's default) accept it.
        world_per_skill: problems per skill when SPEC is a world name.
        limit: keep at most this many problems (after skipping malformed rows).
    """

    if parse_world_spec(spec) is not None:
        rows = world_rows(spec, split, world_per_skill, seed)
        labelled = [(f"world/{r['id']}", r) for r in rows]
    elif Path(spec).exists():
        if split not in ("train", "test"):
            raise DataError(
                f"{spec} is a local file, which has no {split!r} split: pass that split's own file instead "
                f"(--split {split} selects a split of the world and of `datasets` benchmarks)"
            )
        path = Path(spec)
        files = (
            [path]
            if path.is_file()
            else sorted(p for p in path.rglob("*") if p.suffix in (".jsonl", ".json", ".parquet"))
        )
        if not files:
            raise DataError(f"no .jsonl/.json/.parquet files under {path}")
        labelled = [pair for f in files for pair in _rows_of_file(f)]
    else:
        import datasets

        try:
            ds = datasets.load_dataset(spec, split=split)
        except Exception as err:
            raise DataError(
                f"cannot load {spec!r}: not a world name, a local path or a loadable dataset: {err}"
            ) from err
        labelled = [(f"{spec}[{i}]", row) for i, row in enumerate(ds)]
    problems, skipped = [], 0
    for where, row in labelled:
        if isinstance(row, Exception):
            log.warning("skipping %s: malformed JSON (%s)", where, row)
            skipped += 1
            continue
        prob, reason = row_to_problem(row, where, problem_field, answer_field)
        if prob is None:
            log.warning("skipping %s: %s", where, reason)
            skipped += 1
            continue
        problems.append(prob)
        if limit is not None and len(problems) >= limit:
            break
    if not problems:
        raise DataError(f"{spec}: no usable row ({skipped} skipped); check --problem-field / --answer-field")
    if skipped:
        log.warning("%s: skipped %d malformed row(s), kept %d", spec, skipped, len(problems))
    return problems, skipped


def batch_problems(problems: list, batch: int, size: int, seed: int, rank: int = 0, world: int = 1) -> list:
    """This rank's share of rollout batch `batch` (0-based) of `size` problems: a seeded pass over
    `problems`, reshuffled each epoch; every rank draws the same global batch and keeps its
    contiguous slice of size // world (whole groups), so a resumed run draws the same batches."""
    n = len(problems)
    epoch, offset = divmod(batch * size, n)
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    picked = [order[(offset + i) % n] for i in range(size)]
    share = size // world
    return [problems[i] for i in picked[rank * share : (rank + 1) * share]]


# The prompt formats evaluations are compared in. `qwen-math` is Qwen2.5-Math's chain-of-thought
# prompt (its evaluation's `qwen25-math-cot`); `plain` is padd's own, which the world's models learn.
PROMPT_TEMPLATES = {
    "qwen-math": (
        "<|im_start|>system\n" + INSTRUCTION + "<|im_end|>\n<|im_start|>user\n{problem}<|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
    "plain": "Problem: {problem}\n" + INSTRUCTION + "\nSolution:",
    "chat": "the tokenizer's chat template, user message: {problem}\n" + INSTRUCTION,
}


def build_prompt(tokenizer, problem: str, template: str = "auto") -> str:
    """The prompt text of one problem in a template of PROMPT_TEMPLATES; `auto` is the tokenizer's
    chat template when it has one, `plain` otherwise (or when `tokenizer` is None)."""
    if template == "auto":
        template = "chat" if tokenizer is not None and getattr(tokenizer, "chat_template", None) else "plain"
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise DataError("--prompt-template chat: this tokenizer has no chat template; use qwen-math or plain")
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": f"{problem}\n{INSTRUCTION}"}], tokenize=False, add_generation_prompt=True
        )
    if template not in PROMPT_TEMPLATES:
        raise DataError(f"unknown prompt template {template!r}; choose auto, {', '.join(PROMPT_TEMPLATES)}")
    return PROMPT_TEMPLATES[template].replace("{problem}", problem)  # the instruction holds literal braces


def template_of(tokenizer, template: str) -> str:
    """The template `auto` resolves to for this tokenizer (for the eval record)."""
    if template != "auto":
        return template
    return "chat" if tokenizer is not None and getattr(tokenizer, "chat_template", None) else "plain"


# `--bench-dir`: where the usual evaluation files of a benchmark name are looked for, in order
# (the Qwen2.5-Math evaluation's data/NAME/test.jsonl first)
BENCH_FILES = ("{name}/test.jsonl", "{name}.jsonl", "{name}/test.parquet", "{name}.parquet", "{name}/test.json")


def resolve_bench(name: str, bench_dir: str | None) -> str:
    """A benchmark SPEC: a world name, a path, a `datasets` name, or (with a bench dir) a name whose
    usual file is found there (`aime24` -> DIR/aime24/test.jsonl)."""
    if bench_dir is None or parse_world_spec(name) is not None or Path(name).exists():
        return name
    tried = [Path(bench_dir) / pattern.format(name=name) for pattern in BENCH_FILES]
    for path in tried:
        if path.is_file():
            return str(path)
    raise DataError(f"--bench {name}: none of {', '.join(map(str, tried))} exists; give the file's path instead")
