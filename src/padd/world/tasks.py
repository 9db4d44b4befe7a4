"""The miniature world (docs/method.md §6): seeded synthetic tasks with step-by-step solutions ending in \\boxed{}.

Five math skills of rising difficulty and one non-math skill for the broad-skill check. A task's
split is a hash of its problem text, so train and test never share a problem, whatever the seed
or the sizes asked for. Rows use the MATH-500 layout (`problem`, `solution`, `answer`) that
`padd.data` reads, plus `skill`.

Three splits, fixed by a hash of the problem text: `test` (the benchmarks), `val` (where settings
are chosen) and `train` (the teacher's data and Phase B's prompts), disjoint whatever the seed or
sizes asked for.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path

from padd.errors import UserError

TEST_SHARE = 0.1  # share of the problem space that belongs to the test split
VAL_SHARE = 0.05  # share that belongs to the validation split (carved out of what was train)
SPLITS = ("train", "val", "test")


def _digits_add(a: int, b: int) -> list[str]:
    steps, carry = [], 0
    while a or b:
        da, db = a % 10, b % 10
        s = da + db + carry
        steps.append(f"{da}+{db}" + (f"+{carry}" if carry else "") + f"={s}")
        carry, a, b = s // 10, a // 10, b // 10
    if carry:
        steps.append(f"carry {carry}")
    return steps


def addition(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(10, 999), rng.randint(10, 999)
    steps = _digits_add(a, b)
    return f"What is {a} + {b}?", f"Add digit by digit: {', '.join(steps)}. So {a} + {b} = {a + b}.", str(a + b)


def subtraction(rng: random.Random) -> tuple[str, str, str]:
    a, b = sorted((rng.randint(10, 999), rng.randint(10, 999)), reverse=True)
    steps, borrow, x, y = [], 0, a, b
    while x or y:
        dx, dy = x % 10 - borrow, y % 10
        borrow = 1 if dx < dy else 0
        steps.append(f"{dx + 10 * borrow}-{dy}={dx + 10 * borrow - dy}" + (" borrow" if borrow else ""))
        x, y = x // 10, y // 10
    return f"What is {a} - {b}?", f"Subtract digit by digit: {', '.join(steps)}. So {a} - {b} = {a - b}.", str(a - b)


def multiplication(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(12, 999), rng.randint(2, 12)
    parts = [int(d) * 10**i for i, d in enumerate(reversed(str(a))) if d != "0"][::-1]
    products = [p * b for p in parts]
    sol = (
        f"Split {a} = {' + '.join(map(str, parts))}: "
        + ", ".join(f"{p}*{b}={q}" for p, q in zip(parts, products, strict=True))
        + f". Add: {' + '.join(map(str, products))} = {a * b}."
    )
    return f"What is {a} * {b}?", sol, str(a * b)


def expression(rng: random.Random) -> tuple[str, str, str]:
    a, b, c, d = (rng.randint(2, 20) for _ in range(4))
    op = rng.choice(["+", "-"])
    bc = b * c
    first = a + bc if op == "+" else a - bc
    value = first + d
    sol = f"Multiply first: {b}*{c}={bc}. Then {a}{op}{bc}={first}. Then {first}+{d}={value}."
    return f"Evaluate {a} {op} {b} * {c} + {d}.", sol, str(value)


_NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fay", "Gus", "Hana"]
_ITEMS = ["apples", "books", "coins", "marbles", "pens", "stamps"]


def word_problem(rng: random.Random) -> tuple[str, str, str]:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    boxes, per_box = rng.randint(2, 9), rng.randint(3, 12)
    total = boxes * per_box
    given = rng.randint(1, min(10, total))
    if rng.random() < 0.5:
        bought = rng.randint(1, 20)
        value = total - given + bought
        problem = (
            f"{name} has {boxes} boxes with {per_box} {item} each, gives away {given}, then buys {bought} more. "
            f"How many {item} does {name} have?"
        )
        sol = f"{boxes}*{per_box}={total}. {total}-{given}={total - given}. {total - given}+{bought}={value}."
    else:
        value = total - given
        problem = f"{name} has {boxes} boxes with {per_box} {item} each and gives away {given}. How many are left?"
        sol = f"{boxes}*{per_box}={total}. {total}-{given}={value}."
    return problem, sol, str(value)


def reverse_word(rng: random.Random) -> tuple[str, str, str]:
    # Letters are spaced so each is its own token: the skill is reversing, not spelling BPE merges.
    word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 7)))
    spaced, rev = " ".join(word), " ".join(reversed(word))
    return f"Reverse the letters {spaced}.", f"From the end: {rev}.", rev


# Rising difficulty; `reverse` is the non-math broad skill.
SKILLS: dict[str, Callable[[random.Random], tuple[str, str, str]]] = {
    "add": addition,
    "sub": subtraction,
    "mul": multiplication,
    "expr": expression,
    "word": word_problem,
    "reverse": reverse_word,
}
MATH_SKILLS = ("add", "sub", "mul", "expr", "word")
BROAD_SKILLS = ("reverse",)


def split_of(problem: str) -> str:
    """The split a problem belongs to (train, val or test), fixed by its text alone."""
    h = int.from_bytes(hashlib.sha256(problem.encode()).digest()[:8], "big") % 1000
    if h < TEST_SHARE * 1000:
        return "test"
    return "val" if h < (TEST_SHARE + VAL_SHARE) * 1000 else "train"


def iter_tasks(skill: str, split: str, seed: int = 0, *, max_tries: int | None = None) -> Iterator[dict]:
    """Distinct tasks of `skill` in `split`, lazily, in a fixed order for (skill, split, seed); stops
    after `max_tries` draws (a split of a small skill holds only so many problems)."""
    if skill not in SKILLS:
        raise UserError(f"unknown skill {skill!r}; the world has {', '.join(SKILLS)}")
    if split not in SPLITS:
        raise UserError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    rng = random.Random(f"{skill}/{split}/{seed}")
    seen, tries = set(), 0
    while max_tries is None or tries < max_tries:
        tries += 1
        problem, steps, answer = SKILLS[skill](rng)
        if problem in seen or split_of(problem) != split:
            continue
        seen.add(problem)
        yield {
            "problem": problem,
            "solution": f"{steps} The answer is \\boxed{{{answer}}}.",
            "answer": answer,
            "skill": skill,
            "id": f"{skill}-{split}-{len(seen) - 1}",
        }


def make_problems(skill: str, split: str, n: int, seed: int = 0, *, allow_fewer: bool = False) -> list[dict]:
    """`n` distinct tasks of `skill` in `split`, deterministic in (skill, split, n, seed).

    With allow_fewer, a skill whose problem space is smaller than n gives what it has.
    """
    # the val split holds 5% of the space: ~20 draws per row
    rows = list(itertools.islice(iter_tasks(skill, split, seed, max_tries=100 * n + 1000), n))
    if len(rows) < n and not allow_fewer:
        raise UserError(f"skill {skill!r} has fewer than {n} distinct {split} problems")
    return rows


def parse_world_spec(spec: str) -> list[str] | None:
    """`world` -> every skill, `world:SKILL[+SKILL]` -> those; None when `spec` is not a world name."""
    if spec == "world":
        return list(SKILLS)
    if spec.startswith("world:"):
        skills = spec.split(":", 1)[1].split("+")
        unknown = [s for s in skills if s not in SKILLS]
        if unknown:
            raise UserError(f"unknown world skill {unknown[0]!r}; the world has {', '.join(SKILLS)}")
        return skills
    return None


def world_rows(spec: str, split: str, n_per_skill: int, seed: int = 0) -> list[dict]:
    """The rows of a world SPEC (`world`, `world:SKILL`), skills interleaved in order."""
    skills = parse_world_spec(spec)
    if skills is None:
        raise UserError(f"{spec!r} is not a world name (world or world:SKILL)")
    return [row for skill in skills for row in make_problems(skill, split, n_per_skill, seed)]


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def export_world(
    out: str | Path, spec: str = "world", train_per_skill: int = 2000, test_per_skill: int = 200, seed: int = 0
) -> dict[str, int]:
    """Write train.jsonl, test.jsonl and test/SKILL.jsonl under `out`; returns rows written per file."""
    skills = parse_world_spec(spec)
    if skills is None:
        raise UserError(f"{spec!r} is not a world name (world or world:SKILL)")
    out = Path(out)
    counts = {}
    train = [r for s in skills for r in make_problems(s, "train", train_per_skill, seed, allow_fewer=True)]
    counts["train.jsonl"] = len(write_jsonl(train, out / "train.jsonl").read_text().splitlines())
    test_all = []
    for s in skills:
        rows = make_problems(s, "test", test_per_skill, seed, allow_fewer=True)
        write_jsonl(rows, out / "test" / f"{s}.jsonl")
        counts[f"test/{s}.jsonl"] = len(rows)
        test_all += rows
    write_jsonl(test_all, out / "test.jsonl")
    counts["test.jsonl"] = len(test_all)
    return counts
