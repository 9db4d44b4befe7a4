"""The report's verdicts on the paper's ablation reading and on broad skills, from eval files built
here with known per-problem verdicts (no training): each verdict follows its numbers."""

from padd.report import RunFiles, claims

N = 40  # problems per benchmark


def _eval(correct: dict[str, int]) -> dict:
    """A padd eval report with the first `correct[bench]` of N problems right on each benchmark."""
    return {
        "flops_per_token@1024": 1.0,
        "benchmarks": {
            b: {
                "pass@1": k / N,
                "rows": [{"source": f"{b}/{i}", "greedy_correct": i < k} for i in range(N)],
            }
            for b, k in correct.items()
        },
    }


def _run(math: dict[str, int], reverse: dict[str, int]) -> RunFiles:
    evals = {}
    for row, k in math.items():
        name = row if row in ("teacher", "base") else f"{row}-s0"
        evals[name] = _eval({"world:add": k, "world:reverse": reverse.get(row, N)})
    return RunFiles({"seeds": [0]}, {}, evals, {}, {})


def _lines(run: RunFiles, start: str) -> list[str]:
    return [x for x in claims(run, ["world:add"], ["world:reverse"]) if x.startswith(start)]


def test_stage1_is_the_largest_ablation_and_matches_removing_ii_to_iv():
    run = _run(
        {"teacher": 38, "base": 10, "grpo": 20, "padd": 36, "no-stage1": 12, "no-kd": 30, "no-kd-pr-balance": 13},
        {"base": N, "grpo": 10, "padd": N},
    )
    (largest,) = _lines(run, "- *Stage I is the largest contributor")
    assert "**supported**" in largest and largest.index("−I") < largest.index("−II (")
    (same,) = _lines(run, "- *Removing II–IV together")
    assert "**not separated** (consistent with ≈)" in same
    (erodes,) = _lines(run, "- *Vanilla GRPO erodes them")
    assert "**supported**" in erodes and "-75.0 points" in erodes


def test_an_ablation_below_stage1s_refutes_the_order():
    run = _run(
        {"teacher": 38, "base": 10, "grpo": 20, "padd": 36, "no-stage1": 30, "no-kd": 8, "no-kd-pr-balance": 9},
        {"base": N, "grpo": N - 2, "padd": N},
    )
    (largest,) = _lines(run, "- *Stage I is the largest contributor")
    assert "**refuted** (PADD −II (no adaptive KD), PADD −II–IV significantly lower)" in largest
    (same,) = _lines(run, "- *Removing II–IV together")
    assert "**refuted**" in same
    (erodes,) = _lines(run, "- *Vanilla GRPO erodes them")
    assert "**not separated**" in erodes  # 2 of 40 problems lost


def test_no_drop_at_all_refutes_the_erosion():
    run = _run({"teacher": 38, "base": 10, "grpo": 20, "padd": 36}, {"base": N, "grpo": N, "padd": N})
    (erodes,) = _lines(run, "- *Vanilla GRPO erodes them")
    assert "**refuted** (no drop)" in erodes and "[+0.0, +0.0]" in erodes
