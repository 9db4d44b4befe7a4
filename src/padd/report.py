"""`report.md` and its plots, read only from a study run's own files (see padd.study for the layout).

Every number in the report comes from eval/*.json, analysis/*.json, train/*/metrics.jsonl and
cells.json; rows or columns whose files are missing are left out, never filled in. Claims are
judged by a paired bootstrap over the same test problems (and seeds): "supported" when the 95%
interval of the difference lies on the claimed side of zero, "refuted" when it lies on the other
side, "not separated" when it spans zero.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from padd import plots
from padd.methods import ABLATIONS, ROW_LABELS, TABLE_ROWS
from padd.metrics import paired_bootstrap

STAGE_ROWS = ("padd", "no-pr", "no-balance", "no-bias", "grpo", "online-kd")  # the "stages act" table


@dataclass
class RunFiles:
    """What a study run directory holds, parsed."""

    manifest: dict
    cells: dict
    evals: dict[str, dict]  # eval name (teacher, base, padd-s0, ...) -> padd eval report
    analysis: dict[str, dict]  # cluster-uniform, random-uniform, padd-s0, ... -> padd.analysis result
    metrics: dict[str, list[dict]]  # train run name -> metrics.jsonl rows

    @classmethod
    def read(cls, run: Path) -> RunFiles:
        def jsons(folder: str) -> dict[str, dict]:
            return {p.name[: -len(".json")]: json.loads(p.read_text()) for p in sorted((run / folder).glob("*.json"))}

        metrics = {}
        for path in sorted((run / "train").glob("*/metrics.jsonl")):
            metrics[path.parent.name] = [json.loads(line) for line in path.read_text().splitlines() if line]
        cells = json.loads((run / "cells.json").read_text()) if (run / "cells.json").exists() else {}
        return cls(json.loads((run / "study.json").read_text()), cells, jsons("eval"), jsons("analysis"), metrics)

    def names(self, row: str) -> list[str]:
        """The runs of one row: the row itself (teacher, base) or one per seed."""
        if row in self.evals or row in self.metrics:
            return [row]
        return [f"{row}-s{s}" for s in self.manifest["seeds"] if f"{row}-s{s}" in self.evals]

    def scores(self, row: str, bench: str) -> list[float]:
        return [100 * self.evals[n]["benchmarks"][bench]["pass@1"] for n in self.names(row) if n in self.evals]

    def average(self, row: str, benches: list[str]) -> list[float]:
        per_run = [[100 * self.evals[n]["benchmarks"][b]["pass@1"] for b in benches] for n in self.names(row)]
        return [sum(v) / len(v) for v in per_run]

    def correctness(self, row: str, benches: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """([runs, P] greedy 0/1 verdicts, [P] benchmark index, [P] problem ids) over `benches`."""
        runs, ids, groups = [], None, []
        for name in self.names(row):
            verdicts, these = [], []
            for g, bench in enumerate(benches):
                rows = self.evals[name]["benchmarks"][bench]["rows"]
                verdicts += [float(r["greedy_correct"]) for r in rows]
                these += [r["source"] for r in rows]
                if ids is None:
                    groups += [g] * len(rows)
            if ids is not None and these != ids:
                raise ValueError(f"{name} was evaluated on other problems than the rows it is compared with")
            ids = these
            runs.append(verdicts)
        return torch.tensor(runs), torch.tensor(groups), ids or []

    def label(self, row: str) -> str:
        if row in self.manifest.get("row_labels", {}):  # rows that mean another thing in this study
            return self.manifest["row_labels"][row]
        if row == "other-start":
            other = next(s for s in ("uniform", "distill") if s != self.manifest.get("router_start", "distill"))
            return f"PADD from the {other} router start"
        if row in ROW_LABELS:
            return ROW_LABELS[row]
        if "@" in row:  # a swept value: padd@lam=100
            method, setting = row.split("@", 1)
            return f"{ROW_LABELS.get(method, method)} ({setting.replace('=', ' = ')})"
        return row


def _benches(spec: str) -> list[str]:
    return [b.strip() for b in spec.split(",") if b.strip()]


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(values: list[float], bold: bool = False, digits: int = 1) -> str:
    mean, std = _mean_std(values)
    text = f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if len(values) > 1 else "")
    return f"**{text}**" if bold else text


def score_table(run: RunFiles, rows: list[str], benches: list[str], *, average: bool, flops: bool) -> list[list[str]]:
    """Markdown rows [header, separator, *rows]: mean ± std over seeds, the best mean per column in bold."""
    rows = [r for r in rows if run.names(r)]
    columns = [(b.split(":")[-1], lambda r, b=b: run.scores(r, b)) for b in benches]
    if average:
        columns.append(("Avg.", lambda r: run.average(r, benches)))
    best = {name: max(statistics.fmean(get(r)) for r in rows) for name, get in columns}
    header = ["Model", *(name for name, _ in columns)]
    teacher_flops = run.evals["teacher"]["flops_per_token@1024"] if "teacher" in run.evals else None
    if flops and teacher_flops:
        header.append("FLOPs @1024 (× teacher)")
    out = [header, ["---"] * len(header)]
    for r in rows:
        cells = [run.label(r)]
        for name, get in columns:
            values = get(r)
            cells.append(_fmt(values, bold=abs(statistics.fmean(values) - best[name]) < 1e-9))
        if flops and teacher_flops:
            cells.append(f"{run.evals[run.names(r)[0]]['flops_per_token@1024'] / teacher_flops:.2f}")
        out.append(cells)
    return out


def _md(table: list[list[str]]) -> str:
    return "\n".join("| " + " | ".join(row) + " |" for row in table)


def _series(run: RunFiles, row: str, key: str, per: str, reduce=None) -> np.ndarray | None:
    """[seeds, n] of a metric per optimizer step (per="step") or per rollout batch (per="batch");
    `reduce` turns a per-layer list into one number (e.g. the mean over layers)."""
    runs = [run.metrics[n] for n in run.names(row) if n in run.metrics]
    if not runs or any(key not in r for rows in runs for r in rows):
        return None
    series = []
    for rows in runs:
        values = [(reduce(r[key]) if reduce else r[key], r["batch"]) for r in rows]
        if per == "batch":
            seen: dict[int, float] = {}
            for v, b in values:
                seen.setdefault(b, v)
            series.append([seen[b] for b in sorted(seen)])
        else:
            series.append([v for v, _ in values])
    n = min(len(s) for s in series)
    return np.array([s[:n] for s in series], dtype=float)


def _off_policy(run: RunFiles, row: str, key: str) -> list[float]:
    """`key` on the updates where the router had moved since Γ's anchor (Γ > 0) and, for III's
    damping, some token had a negative advantage; over all seeds."""
    return [
        r[key]
        for n in run.names(row)
        for r in run.metrics.get(n, [])
        if key in r and r.get("gamma_token_mean", 0.0) > 0 and r.get("pr_negative_frac", 1.0) > 0
    ]


def _verdict(diff: float, lo: float, hi: float) -> str:
    if lo > 0:
        return "**supported**"
    if hi < 0:
        return "**refuted**"
    return "**not separated**"


def compare(run: RunFiles, a: str, b: str, benches: list[str]) -> tuple[float, float, float] | None:
    """Pass@1 difference a − b in points on the same problems, with its 95% paired-bootstrap interval."""
    if not (run.names(a) and run.names(b)):
        return None
    (xa, groups, _), (xb, _, _) = run.correctness(a, benches), run.correctness(b, benches)
    diff, lo, hi = paired_bootstrap(xa, xb, groups)
    return 100 * diff, 100 * lo, 100 * hi


def _interval(d: tuple[float, float, float]) -> str:
    return f"{d[0]:+.1f} points (95% CI [{d[1]:+.1f}, {d[2]:+.1f}])"


def _per_seed_means(run: RunFiles, row: str, key: str) -> list[float]:
    return [statistics.fmean(r[key] for r in run.metrics[n]) for n in run.names(row) if n in run.metrics]


def claims(run: RunFiles, benches: list[str], broad: list[str]) -> list[str]:
    """The paper's claims this run can test, each with its verdict and the numbers behind it."""
    out = []

    def avg(row: str) -> str:
        return _fmt(run.average(row, benches))

    if d := compare(run, "padd", "teacher", benches):
        out.append(
            f"- *The MoE student reasons as well as or better than its dense teacher:* {_verdict(*d)}: "
            f"PADD {avg('padd')} vs teacher {avg('teacher')}; PADD − teacher {_interval(d)}."
        )
    for baseline in (m for m in TABLE_ROWS if m not in ("padd", "base")):
        if d := compare(run, "padd", baseline, benches):
            out.append(
                f"- *PADD beats {run.label(baseline)} on the same initialisation and budget:* {_verdict(*d)}: "
                f"{avg('padd')} vs {avg(baseline)}; difference {_interval(d)}."
            )
    if d := compare(run, "padd", "base", benches):
        what = "the pretrained student" if _pretrained(run) else "the Stage I student"
        out.append(f"- *PADD improves on {what} (Base):* {_verdict(*d)}: difference {_interval(d)}.")
    costs = {}  # ablation -> PADD − ablation, for the paper's reading of their order
    for abl in ABLATIONS:
        if abl == "other-start":
            if d := compare(run, "padd", abl, benches):
                start = run.manifest.get("router_start", "distill")
                out.append(
                    f"- *The {start} router start the rows use beats the other one ({run.label(abl)}):* "
                    f"{_verdict(*d)}: {avg('padd')} vs {avg(abl)}; difference {_interval(d)}."
                )
        elif d := compare(run, "padd", abl, benches):
            costs[abl] = d
            out.append(
                f"- *{run.label(abl)} loses accuracy against full PADD:* {_verdict(*d)}: "
                f"{avg(abl)} vs {avg('padd')}; PADD − ablation {_interval(d)}."
            )
    out += _ablation_order_claims(run, benches, costs)
    out += _alignment_claims(run)
    g_padd, g_grpo = _per_seed_means(run, "padd", "gamma_step"), _per_seed_means(run, "grpo", "gamma_step")
    if g_padd and g_grpo and statistics.fmean(g_grpo) > 0:
        lower = 100 * (1 - statistics.fmean(g_padd) / statistics.fmean(g_grpo))
        pairs = list(zip(g_padd, g_grpo, strict=False))
        if lower >= 10 and all(p < g for p, g in pairs):
            word = "**supported**"
        elif all(p > g for p, g in pairs):
            word = "**refuted**"
        else:
            word = "**not separated**"
        out.append(
            f"- *PR-GRPO lowers the router shift Γ_step against vanilla GRPO (paper: 47% lower):* {word}: "
            f"mean Γ_step {_fmt(g_padd, digits=4)} vs {_fmt(g_grpo, digits=4)} over seeds "
            f"({abs(lower):.0f}% {'lower' if lower > 0 else 'higher'}; supported needs ≥ 10% lower in every seed)."
        )
    if "teacher" in run.evals and run.names("padd"):
        ratio = run.evals[run.names("padd")[0]]["flops_per_token@1024"] / run.evals["teacher"]["flops_per_token@1024"]
        out.append(
            f"- *The student runs at a fraction of the teacher's compute (paper: 0.47×):* {ratio:.2f}× here, in "
            "forward FLOPs per token at 1024 tokens of context (`padd plan` gives it at a run's own length)."
        )
    if broad and (d := compare(run, "padd", "base", broad)):
        word = "**refuted** (a significant drop)" if d[2] < 0 else "**supported** (no significant drop)"
        out.append(
            f"- *Math-only Phase B does not erode broad skills:* {word}: PADD − Base on {', '.join(broad)} "
            f"{_interval(d)}."
        )
    if broad and (d := compare(run, "grpo", "base", broad)):
        # [0, 0] when both sides solve the same problems: no drop in any resample
        word = "**supported**" if d[2] < 0 else "**refuted** (no drop)" if d[1] >= 0 else "**not separated**"
        out.append(
            f"- *Vanilla GRPO erodes them where PADD does not (paper: −2.9 on the Qwen pair's non-math "
            f"average):* {word}: vanilla GRPO − Base on {', '.join(broad)} {_interval(d)}."
        )
    return out


def _ablation_order_claims(run: RunFiles, benches: list[str], costs: dict[str, tuple]) -> list[str]:
    """The paper's reading of its ablations: removing Stage I costs the most, about as much as removing
    II–IV together. `costs`: ablation -> PADD − ablation (`compare`), for every ablation the run has."""
    if "no-stage1" not in costs or len(costs) < 2:
        return []
    largest = max(costs, key=lambda a: costs[a][0])
    # refuted when some other ablation scores significantly below −I; supported when −I costs the most
    # and its cost is significant
    below = [a for a in costs if a != "no-stage1" and compare(run, "no-stage1", a, benches)[1] > 0]
    if below:
        word = f"**refuted** ({', '.join(run.label(a) for a in below)} significantly lower)"
    elif largest == "no-stage1" and costs["no-stage1"][1] > 0:
        word = "**supported**"
    else:
        word = "**not separated**"
    listed = ", ".join(f"{run.label(a)} {costs[a][0]:+.1f}" for a in sorted(costs, key=lambda a: -costs[a][0]))
    out = [
        f"- *Stage I is the largest contributor (paper: −10.4 points without it):* {word}: "
        f"PADD − ablation, largest first: {listed}."
    ]
    if d := compare(run, "no-stage1", "no-kd-pr-balance", benches):
        word = "**refuted**" if d[1] > 0 or d[2] < 0 else "**not separated** (consistent with ≈)"
        out.append(
            f"- *Removing II–IV together costs about what removing Stage I does (paper: both 10.4 points):* {word}: "
            f"{run.label('no-stage1')} − {run.label('no-kd-pr-balance')} {_interval(d)}."
        )
    return out


def _pretrained(run: RunFiles) -> bool:
    return run.manifest.get("inits", {}).get("cluster") == "seeded"


def _seeding_claims(run: RunFiles) -> list[str]:
    """With a pretrained student: what padd seed changed (its own held-out measurements) and the
    seeded against the unseeded warm-up before Phase B."""
    seeded = run.cells.get("stage1-seeded", {}).get("result")
    if not seeded:
        return []
    loss = seeded["lm_loss"]
    out = [
        f"- *Seeding recovers the teacher's modules in the pretrained student without overwriting it:* on held-out "
        f"tokens NMI {seeded['nmi']['before']:.3f} → {seeded['nmi']['after']:.3f}, ESI {seeded['esi']['before']:.3f} → "
        f"{seeded['esi']['after']:.3f}, top-K agreement with the pretrained routers "
        f"{seeded['topk_agreement_with_pretrained']:.3f}, LM loss {loss['before']:.4f} → {loss['after']:.4f} "
        f"({100 * loss['relative_rise']:+.2f}%), greedy next token unchanged at "
        f"{seeded.get('next_token_agreement', float('nan')):.3f} of positions (experts untouched)."
    ]
    start = run.manifest.get("router_start", "keep")
    c, r = run.analysis.get(f"seeded-{start}"), run.analysis.get(f"unseeded-{start}")
    if c and r:
        out.append(
            f"- *After the same warm-up, before Phase B:* NMI {c['nmi']:.3f} vs {r['nmi']:.3f}, ESI {c['esi']:.3f} vs "
            f"{r['esi']:.3f} (seeded vs unseeded; one measurement each)."
        )
    return out


def _alignment_claims(run: RunFiles) -> list[str]:
    """Stage I's NMI / ESI claim: at the paper's uniform router start (before Phase B, and after it
    for PADD against PADD −I), with the fitted start's numbers beside it; with a pretrained student,
    the seeding's."""
    out = _seeding_claims(run)
    c, r = run.analysis.get("cluster-uniform"), run.analysis.get("random-uniform")
    if c and r:
        out.append(
            f"- *Stage I aligns experts with the teacher's modules, warmed-up students at the uniform router "
            f"start (primary; paper: NMI 0.030 vs 0.013):* NMI {c['nmi']:.3f} vs {r['nmi']:.3f}, ESI {c['esi']:.3f} "
            f"vs {r['esi']:.3f} (Stage I vs random upcycling; one measurement each)."
        )
    padd = [run.analysis[n] for n in run.names("padd") if n in run.analysis]
    no_stage1 = [run.analysis[n] for n in run.names("no-stage1") if n in run.analysis]
    if padd and no_stage1:
        nmi_a, nmi_b = [a["nmi"] for a in padd], [a["nmi"] for a in no_stage1]
        esi_a, esi_b = [a["esi"] for a in padd], [a["esi"] for a in no_stage1]
        pairs = list(zip(nmi_a, nmi_b, strict=False)) + list(zip(esi_a, esi_b, strict=False))
        word = (
            "**supported**"
            if all(x > y for x, y in pairs)
            else ("**refuted**" if all(x < y for x, y in pairs) else "**not separated**")
        )
        out.append(
            f"- *After Phase B from the {run.manifest.get('router_start', 'uniform')} start, PADD against "
            f"{run.label('no-stage1')}:* {word}: "
            f"NMI {_fmt(nmi_a, digits=3)} vs {_fmt(nmi_b, digits=3)}, "
            f"ESI {_fmt(esi_a, digits=3)} vs {_fmt(esi_b, digits=3)} "
            "(supported needs both higher in every seed)."
        )
    c, r = run.analysis.get("cluster-distill"), run.analysis.get("random-distill")
    if c and r:
        out.append(
            f"- *Beside it, the fitted (distill) start:* NMI {c['nmi']:.3f} vs {r['nmi']:.3f}, ESI {c['esi']:.3f} vs "
            f"{r['esi']:.3f}; each router was fitted to its own partition's cluster masses, so this partly "
            "measures the fit."
        )
    return out


def stage_table(run: RunFiles, rows: list[str]) -> list[str]:
    """Markdown: per trained row, the quantities that show stages III and IV act."""
    header = [
        "Row",
        "III damping, median (A<0, off-policy)",
        "Γ per token p50 / p90",
        "IV bias spread (end)",
        "top-K score gap (median)",
        "selections changed by the bias",
        "load CV (end, mean over layers)",
        "Γ_step mean",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        runs = [run.metrics[n] for n in run.names(row) if n in run.metrics]
        if not runs:
            continue
        last = [rows_[-1] for rows_ in runs]
        damping = _off_policy(run, row, "pr_damping_median")
        p50, p90 = _off_policy(run, row, "gamma_token_p50"), _off_policy(run, row, "gamma_token_p90")
        gaps = [r["router_gap_median"] for rows_ in runs for r in rows_ if "router_gap_median" in r]
        cells = [
            run.label(row),
            f"{statistics.median(damping):.2f}" if damping else "–",
            f"{statistics.median(p50):.2g} / {statistics.median(p90):.2g}" if p50 else "–",
            _fmt([r["bias_spread_mean"] for r in last], digits=3),
            f"{statistics.median(gaps):.3f}" if gaps else "–",
            _fmt([100 * r.get("bias_changed_frac", 0.0) for r in last]) + "%",
            _fmt([statistics.fmean(r["load_cv"]) for r in last], digits=3),
            f"{statistics.fmean(r['gamma_step'] for rows_ in runs for r in rows_):.4f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def sweep_lines(run: RunFiles, benches: list[str]) -> list[str]:
    """The swept option's table: accuracy and what each value did to the routing."""
    sweep = run.manifest.get("sweep")
    if not sweep:
        return []
    rows = [r for r in run.manifest["sweep_rows"] if run.names(r)]
    if not rows:
        return []
    lines = [
        "",
        f"## Sweep: {sweep['method']} at other values of `{sweep['option']}`",
        "",
        f"Split `{run.manifest.get('eval_split', 'test')}`; each row {len(run.manifest['seeds'])} seed(s).",
        "",
        "| Value | Avg. Pass@1 | reward, last 10 batches | III damping median (off-policy) | Γ_step mean "
        "| bias spread (end) | load CV (end) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    own = [(sweep["method"], f"{sweep['base']} (the method's own row)")] if "base" in sweep else []
    for row, value in [*own, *zip(run.manifest["sweep_rows"], sweep["values"], strict=True)]:
        if not run.names(row):
            continue
        runs = [run.metrics[n] for n in run.names(row) if n in run.metrics]
        rewards = _series(run, row, "reward_mean", "batch")
        damping = _off_policy(run, row, "pr_damping_median")
        cells = [
            str(value),
            _fmt(run.average(row, benches)),
            _fmt(list(rewards[:, -10:].mean(1)), digits=2) if rewards is not None else "–",
            f"{statistics.median(damping):.2f}" if damping else "–",
            f"{statistics.fmean(r['gamma_step'] for x in runs for r in x):.4f}",
            _fmt([x[-1]["bias_spread_mean"] for x in runs], digits=3),
            _fmt([statistics.fmean(x[-1]["load_cv"]) for x in runs], digits=3),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _preamble(run: RunFiles) -> list[str]:
    """The report's title and the paragraph naming the preset, the seeds and the split."""
    study = run.manifest["study"]
    seeds = len(run.manifest["seeds"])
    split = run.manifest.get("eval_split", "test")
    return [
        "# PADD study report",
        "",
        f"Preset: teacher `{study['teacher']}`, Phase B data `{study['data']}`, router start "
        f"`{run.manifest.get('router_start', 'uniform')}`, {seeds} seed(s) per trained row, greedy Pass@1 (%) on "
        f"the `{split}` split as mean ± std over seeds. Every number below is read from this run's files.",
    ]


def _score_sections(run: RunFiles, main_rows: list[str], benches: list[str], broad: list[str]) -> list[str]:
    """Markdown lines of the accuracy tables: Table 1, the ablations, the sweep and the broad skills
    (each only when the run has its rows)."""
    lines = ["", "## Table 1: main results", "", _md(score_table(run, main_rows, benches, average=True, flops=True))]
    if run.manifest["ablations"]:
        ablation_rows = ["padd", *run.manifest["ablations"]]
        lines += ["", "## Ablations", "", _md(score_table(run, ablation_rows, benches, average=True, flops=False))]
    lines += sweep_lines(run, benches)
    if broad:
        all_rows = [*main_rows, *run.manifest["ablations"], *run.manifest.get("sweep_rows", [])]
        lines += ["", "## Broad skills (not trained on in Phase B)", ""]
        lines.append(_md(score_table(run, all_rows, broad, average=len(broad) > 1, flops=False)))
    return lines


def _stage_section(run: RunFiles, trained: list[str], plot_dir: Path) -> list[str]:
    """Markdown lines of "Do the stages act?" with the load-CV plot (drawn into plot_dir); [] when no
    trained row has stage measurements."""
    stage_rows = [r for r in (*STAGE_ROWS, *run.manifest.get("sweep_rows", [])) if r in trained]
    if not stage_rows:
        return []
    lines = [
        "",
        "## Do the stages act?",
        "",
        "III: the median of exp(−λΓ) on negative-advantage tokens over the updates whose router had moved "
        "since the rollout (the first mini-batch of each batch is on-policy, Γ = 0). IV: the spread of the "
        "selection bias (max − min per layer, mean over layers) against the gap between the K-th and "
        "(K+1)-th router scores it must bridge, and the share of token-layer selections it changed.",
        "",
        *stage_table(run, stage_rows),
    ]
    cv = {r: s for r in stage_rows if (s := _series(run, r, "load_cv", "step", statistics.fmean)) is not None}
    if cv:
        plots.series_curves(
            cv, {r: run.label(r) for r in cv}, "load CV (mean over MoE layers)", plot_dir / "load_cv.png"
        )
        lines += ["", "![load CV per step](plots/load_cv.png)"]
    return lines


def _specialisation_intro(run: RunFiles) -> str:
    """The paragraph that says what NMI and ESI measure and which students before Phase B are listed."""
    if _pretrained(run):
        before_phase_b = (
            "`seeded-*` and `unseeded-*` are the pretrained student's warm-ups before Phase B, with and "
            "without padd seed; the clusters are those padd seed matched to the experts, each student layer "
            "against the teacher layer its layer map gives. "
        )
    elif any(n.startswith(("cluster-", "random-")) for n in run.analysis):
        before_phase_b = (
            "`cluster-*` and `random-*` are the warmed-up students before Phase B (Stage I vs random "
            "upcycling) at the uniform and the fitted (distill) router start; a fitted start was fitted to "
            "its own partition's cluster masses, so the primary comparison is at the uniform start. "
        )
    else:
        before_phase_b = "The warmed-up students before Phase B were not analysed (`--no-compare-inits`). "
    return (
        "NMI and ESI between each token's teacher co-activation cluster (Stage I's K-Means partition) and the "
        "student's top-1 expert, on held-out tokens, mean over MoE layers. "
        + before_phase_b
        + "Trained rows are listed by run."
    )


def _load_heatmap_lines(run: RunFiles, plot_dir: Path) -> list[str]:
    """Draw the expert-load heatmaps of the start of Phase B, vanilla GRPO and PADD (seed 0) into
    plot_dir; returns the markdown lines that show them ([] when none was analysed)."""
    start = run.manifest.get("router_start", "uniform")
    with_stage1 = run.manifest.get("inits", {}).get("cluster", "cluster")
    shown = {
        f"{with_stage1}-{start}": "Start of Phase B",
        "grpo-s0": "Vanilla GRPO (seed 0)",
        "padd-s0": "PADD (seed 0)",
    }
    heat = {n: np.array(a["load"]) for n, a in run.analysis.items() if n in shown}
    if not heat:
        return []
    plots.load_heatmaps(heat, shown, plot_dir / "load.png")
    return ["", "![expert load per layer](plots/load.png)"]


def _specialisation_section(run: RunFiles, plot_dir: Path) -> list[str]:
    """Markdown lines of "Expert specialisation": the NMI / ESI / load CV table of every analysed
    student and its plots (drawn into plot_dir); [] when nothing was analysed."""
    if not run.analysis:
        return []
    lines = [
        "",
        "## Expert specialisation",
        "",
        _specialisation_intro(run),
        "",
        "| Model | NMI | ESI | load CV (mean over layers) |",
        "| --- | --- | --- | --- |",
    ]
    for name, a in run.analysis.items():
        lines.append(f"| {name} | {a['nmi']:.3f} | {a['esi']:.3f} | {statistics.fmean(a['load_cv']):.3f} |")
    plots.specialisation_bars({n: (a["nmi"], a["esi"]) for n, a in run.analysis.items()}, plot_dir / "nmi_esi.png")
    lines += ["", "![NMI and ESI](plots/nmi_esi.png)"]
    return lines + _load_heatmap_lines(run, plot_dir)


def _routing_section(run: RunFiles, plot_dir: Path) -> list[str]:
    """Markdown lines of "Routing stability": Γ_step of PADD and vanilla GRPO, with its plot (drawn
    into plot_dir); [] when neither row logged it."""
    gamma_rows = {r: s for r in ("padd", "grpo") if (s := _series(run, r, "gamma_step", "step")) is not None}
    if not gamma_rows:
        return []
    lines = ["", "## Routing stability", "", "| Method | Γ_step at the last step | Γ_step mean | Γ_step p90 |"]
    lines.append("| --- | --- | --- | --- |")
    for r, s in gamma_rows.items():
        lines.append(f"| {run.label(r)} | {s[:, -1].mean():.3g} | {s.mean():.3g} | {np.quantile(s, 0.9):.3g} |")
    plots.gamma_curves(gamma_rows, {r: run.label(r) for r in gamma_rows}, plot_dir / "gamma.png")
    return lines + ["", "![router shift](plots/gamma.png)"]


def _reward_section(run: RunFiles, trained: list[str], plot_dir: Path) -> list[str]:
    """Markdown lines of "Phase B reward" with the reward curves of the trained rows (drawn into
    plot_dir); [] when none logged a reward."""
    rewards = {r: s for r in trained if (s := _series(run, r, "reward_mean", "batch")) is not None}
    if not rewards:
        return []
    plots.reward_curves(rewards, {r: run.label(r) for r in rewards}, plot_dir / "rewards.png")
    return ["", "## Phase B reward", "", "![reward curves](plots/rewards.png)"]


def _compute_section(run: RunFiles, main_rows: list[str], benches: list[str], plot_dir: Path) -> list[str]:
    """Markdown lines of "Accuracy against compute": average Pass@1 against FLOPs relative to the
    teacher (plotted into plot_dir); [] without the teacher's eval."""
    if "teacher" not in run.evals:
        return []
    teacher_flops = run.evals["teacher"]["flops_per_token@1024"]
    points = {
        run.label(r): (
            run.evals[run.names(r)[0]]["flops_per_token@1024"] / teacher_flops,
            statistics.fmean(run.average(r, benches)),
        )
        for r in [*main_rows, *run.manifest["ablations"]]
        if run.names(r)
    }
    plots.pass_vs_flops(points, plot_dir / "pass_vs_flops.png")
    return ["", "## Accuracy against compute", "", "![Pass@1 vs FLOPs](plots/pass_vs_flops.png)"]


def _claims_section(run: RunFiles, benches: list[str], broad: list[str]) -> list[str]:
    """Markdown lines of the paper's claims with how they are judged and each verdict."""
    return [
        "",
        "## What this run says about the paper's claims",
        "",
        "Differences in Pass@1 points with a 95% paired-bootstrap interval (the same problems for both sides, "
        "resampled within each benchmark, and the seeds): **supported** when the interval lies on the claimed "
        "side of zero, **refuted** when it lies on the other, **not separated** when it spans zero.",
        "",
        *claims(run, benches, broad),
    ]


def _wall_clock_section(run: RunFiles) -> list[str]:
    """Markdown lines of the seconds each stage took, summed over its cells, and the total."""
    stages: dict[str, float] = {}
    for cell in run.cells.values():
        stages[cell["stage"]] = stages.get(cell["stage"], 0.0) + cell["seconds"]
    lines = ["", "## Wall-clock per stage", "", "| Stage | seconds |", "| --- | --- |"]
    lines += [f"| {stage} | {sec:.0f} |" for stage, sec in stages.items()]
    lines.append(f"| total | {sum(stages.values()):.0f} |")
    return lines


def write_report(run_dir: Path, console: Console | None = None) -> Path:
    """Write run_dir/report.md and run_dir/plots/*.png from the run's files; print Table 1."""
    console = console or Console()
    run_dir = Path(run_dir)
    run = RunFiles.read(run_dir)
    study = run.manifest["study"]
    benches, broad = _benches(study["benches"]), _benches(study["broad"])
    main_rows = ["teacher", *run.manifest["methods"]]
    sweep_rows = run.manifest.get("sweep_rows", [])
    trained = [r for r in [*run.manifest["methods"], *run.manifest["ablations"], *sweep_rows] if r != "base"]
    plot_dir = run_dir / "plots"
    plot_dir.mkdir(exist_ok=True)
    # The sections run in the report's order, so the plots are drawn in that order as well.
    lines = [
        *_preamble(run),
        *_score_sections(run, main_rows, benches, broad),
        *_stage_section(run, trained, plot_dir),
        *_specialisation_section(run, plot_dir),
        *_routing_section(run, plot_dir),
        *_reward_section(run, trained, plot_dir),
        *_compute_section(run, main_rows, benches, plot_dir),
        *_claims_section(run, benches, broad),
        *_wall_clock_section(run),
    ]
    report = run_dir / "report.md"
    report.write_text("\n".join(lines) + "\n")
    print_table(run, [*main_rows, *run.manifest["ablations"], *sweep_rows], benches + broad, console)
    console.print(f"report: {report}")
    return report


def print_table(run: RunFiles, rows: list[str], benches: list[str], console: Console) -> None:
    """Table 1 (with the broad skills) on the terminal."""
    table = Table(title="greedy Pass@1 (%), mean over seeds")
    table.add_column("model")
    for b in benches:
        table.add_column(b.split(":")[-1], justify="right")
    table.add_column("FLOPs ×", justify="right")
    teacher_flops = run.evals.get("teacher", {}).get("flops_per_token@1024")
    for r in rows:
        if not run.names(r):
            continue
        flops = run.evals[run.names(r)[0]]["flops_per_token@1024"]
        table.add_row(
            run.label(r),
            *(f"{statistics.fmean(run.scores(r, b)):.1f}" for b in benches),
            f"{flops / teacher_flops:.2f}" if teacher_flops else "",
        )
    console.print(table)
