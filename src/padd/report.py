"""`report.md` and its plots, read only from a study run's own files (see padd.study for the layout).

Every number in the report comes from eval/*.json, analysis/*.json, train/*/metrics.jsonl and
cells.json; rows or columns whose files are missing are left out, never filled in.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from padd import plots
from padd.study import ABLATIONS, METHODS, ROW_LABELS


@dataclass
class RunFiles:
    """What a study run directory holds, parsed."""

    manifest: dict
    cells: dict
    evals: dict[str, dict]  # eval name (teacher, base, padd-s0, ...) -> padd eval report
    analysis: dict[str, dict]  # cluster, random, padd-s0, ... -> padd.analysis result
    metrics: dict[str, list[dict]]  # train run name -> metrics.jsonl rows

    @classmethod
    def read(cls, run: Path) -> RunFiles:
        def jsons(folder: str) -> dict[str, dict]:
            return {p.stem: json.loads(p.read_text()) for p in sorted((run / folder).glob("*.json"))}

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


def _benches(spec: str) -> list[str]:
    return [b.strip() for b in spec.split(",") if b.strip()]


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(values: list[float], bold: bool = False) -> str:
    mean, std = _mean_std(values)
    text = f"{mean:.1f}" + (f" ± {std:.1f}" if len(values) > 1 else "")
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
        header.append("FLOPs (× teacher)")
    out = [header, ["---"] * len(header)]
    for r in rows:
        cells = [ROW_LABELS.get(r, r)]
        for name, get in columns:
            values = get(r)
            cells.append(_fmt(values, bold=abs(statistics.fmean(values) - best[name]) < 1e-9))
        if flops and teacher_flops:
            cells.append(f"{run.evals[run.names(r)[0]]['flops_per_token@1024'] / teacher_flops:.2f}")
        out.append(cells)
    return out


def _md(table: list[list[str]]) -> str:
    return "\n".join("| " + " | ".join(row) + " |" for row in table)


def _series(run: RunFiles, row: str, key: str, per: str) -> np.ndarray | None:
    """[seeds, n] of a metric per optimizer step (per="step") or per rollout batch (per="batch")."""
    runs = [run.metrics[n] for n in run.names(row) if n in run.metrics]
    if not runs:
        return None
    series = []
    for rows in runs:
        if per == "batch":
            seen: dict[int, float] = {}
            for r in rows:
                seen.setdefault(r["batch"], r[key])
            series.append([seen[b] for b in sorted(seen)])
        else:
            series.append([r[key] for r in rows])
    n = min(len(s) for s in series)
    return np.array([s[:n] for s in series], dtype=float)


def claims(run: RunFiles, benches: list[str], broad: list[str]) -> list[str]:
    """The paper's claims this run can test, each with its verdict and the numbers behind it."""
    out = []

    def avg(row: str) -> tuple[float, float] | None:
        return _mean_std(run.average(row, benches)) if run.names(row) else None

    one_seed = len(run.manifest["seeds"]) < 2

    def verdict(margin: float, noise: float, tie_ok: bool = False) -> str:
        """margin > 0 favours the claim; noise is the larger std over seeds of the two sides."""
        if margin > noise:
            return "**supported**" + (" (one seed: no noise estimate)" if one_seed else "")
        if margin > 0 or (tie_ok and margin == 0):
            return "**not separated from noise** (the claimed direction, by ≤ 1 std over seeds)"
        if margin == 0:
            return "**not supported** (tied)"
        return "**not supported**" + (" (within noise)" if -margin <= noise else "")

    padd, teacher = avg("padd"), avg("teacher")
    if padd and teacher:
        diff = padd[0] - teacher[0]
        out.append(
            f"- *The MoE student reasons as well as or better than its dense teacher:* "
            f"{verdict(diff, padd[1], tie_ok=True)}: PADD {padd[0]:.1f} vs teacher {teacher[0]:.1f} average Pass@1."
        )
    baselines = [m for m in METHODS if m != "padd" and avg(m)]
    if padd and baselines:
        best = max(baselines, key=lambda m: avg(m)[0])
        diff = padd[0] - avg(best)[0]
        noise = max(padd[1], avg(best)[1])
        out.append(
            f"- *PADD beats every baseline on the same initialisation and budget:* {verdict(diff, noise)}: "
            f"PADD {padd[0]:.1f} vs the best baseline ({ROW_LABELS[best]}) {avg(best)[0]:.1f}."
        )
    if "cluster" in run.analysis and "random" in run.analysis:
        c, r = run.analysis["cluster"], run.analysis["random"]
        ok = c["nmi"] > r["nmi"] and c["esi"] > r["esi"]
        out.append(
            f"- *Stage I aligns experts with the teacher's modules (higher NMI and ESI than random upcycling):* "
            f"{'**supported**' if ok else '**not supported**'}: NMI {c['nmi']:.3f} vs {r['nmi']:.3f}, "
            f"ESI {c['esi']:.3f} vs {r['esi']:.3f}."
        )
    g_padd, g_grpo = _series(run, "padd", "gamma_step", "step"), _series(run, "grpo", "gamma_step", "step")
    if g_padd is not None and g_grpo is not None:
        a, b = float(g_padd.mean()), float(g_grpo.mean())
        lower = 100 * (1 - a / b) if b else 0.0
        # A reduction of a few percent is within step-to-step variation; the paper reports 47%.
        word = "**supported**" if lower >= 10 else ("**marginal** (under 10%)" if lower > 0 else "**not supported**")
        out.append(
            f"- *PR-GRPO lowers the router shift Γ against vanilla GRPO (paper: 47% lower):* {word}: "
            f"mean Γ_step {a:.3g} vs {b:.3g} ({abs(lower):.0f}% {'lower' if lower > 0 else 'higher'})."
        )
    if "teacher" in run.evals and run.names("padd"):
        ratio = run.evals[run.names("padd")[0]]["flops_per_token@1024"] / run.evals["teacher"]["flops_per_token@1024"]
        out.append(f"- *The student runs at a fraction of the teacher's compute (paper: 0.47×):* {ratio:.2f}× here.")
    for abl in ABLATIONS:
        if padd and avg(abl):
            diff = padd[0] - avg(abl)[0]
            out.append(
                f"- *{ROW_LABELS[abl]} loses accuracy against full PADD:* "
                f"{verdict(diff, max(padd[1], avg(abl)[1]))}: {avg(abl)[0]:.1f} vs {padd[0]:.1f}."
            )
    if broad and run.names("padd") and run.names("base"):
        p = statistics.fmean(v for b in broad for v in run.scores("padd", b))
        base = statistics.fmean(v for b in broad for v in run.scores("base", b))
        kept = "**supported**" if p >= base - 1.0 else "**not supported**"
        out.append(
            f"- *Math-only Phase B does not erode broad skills:* {kept}: PADD {p:.1f} vs Base {base:.1f} "
            f"on {', '.join(broad)} (supported when PADD is within 1 point of Base or above)."
        )
    return out


def write_report(run_dir: Path, console: Console | None = None) -> Path:
    """Write run_dir/report.md and run_dir/plots/*.png from the run's files; print Table 1."""
    console = console or Console()
    run_dir = Path(run_dir)
    run = RunFiles.read(run_dir)
    study = run.manifest["study"]
    benches, broad = _benches(study["benches"]), _benches(study["broad"])
    main_rows = ["teacher", *run.manifest["methods"]]
    ablation_rows = ["padd", *run.manifest["ablations"]] if run.manifest["ablations"] else []
    plot_dir = run_dir / "plots"
    plot_dir.mkdir(exist_ok=True)
    seeds = len(run.manifest["seeds"])

    lines = [
        "# PADD study report",
        "",
        f"Preset: teacher `{study['teacher']}`, Phase B data `{study['data']}`, "
        f"{seeds} seed(s) per trained row, greedy Pass@1 (%) as mean ± std over seeds. "
        f"Every number below is read from this run's files.",
        "",
        "## Table 1: main results",
        "",
        _md(score_table(run, main_rows, benches, average=True, flops=True)),
    ]
    if ablation_rows:
        lines += ["", "## Ablations", "", _md(score_table(run, ablation_rows, benches, average=True, flops=False))]
    if broad:
        all_rows = [*main_rows, *run.manifest["ablations"]]
        lines += ["", "## Broad skills (not trained on in Phase B)", ""]
        lines.append(_md(score_table(run, all_rows, broad, average=len(broad) > 1, flops=False)))

    spec_rows = {k: v for k, v in run.analysis.items()}
    if spec_rows:
        lines += [
            "",
            "## Expert specialisation",
            "",
            "NMI and ESI between each token's teacher co-activation cluster (Stage I's K-Means partition) and "
            "the student's top-1 expert, on held-out tokens, mean over MoE layers. `cluster` and `random` are "
            "the warmed-up students before Phase B (PADD's Stage I vs random upcycling).",
            "",
            "| Model | NMI | ESI | load CV (mean over layers) |",
            "| --- | --- | --- | --- |",
        ]
        for name, a in spec_rows.items():
            lines.append(f"| {name} | {a['nmi']:.3f} | {a['esi']:.3f} | {statistics.fmean(a['load_cv']):.3f} |")
        plots.specialisation_bars({n: (a["nmi"], a["esi"]) for n, a in spec_rows.items()}, plot_dir / "nmi_esi.png")
        lines += ["", "![NMI and ESI](plots/nmi_esi.png)"]
        heat = {n: np.array(a["load"]) for n, a in spec_rows.items() if n in ("cluster", "grpo-s0", "padd-s0")}
        if heat:
            names = {"cluster": "Base", "grpo-s0": "Vanilla GRPO (seed 0)", "padd-s0": "PADD (seed 0)"}
            plots.load_heatmaps(heat, names, plot_dir / "load.png")
            lines += ["", "![expert load per layer](plots/load.png)"]

    trained = [r for r in [*run.manifest["methods"], *run.manifest["ablations"]] if r != "base"]
    gamma_rows = {r: s for r in ("padd", "grpo") if (s := _series(run, r, "gamma_step", "step")) is not None}
    if gamma_rows:
        lines += ["", "## Routing stability", "", "| Method | Γ_step at the last step | Γ_step mean | Γ_step p90 |"]
        lines.append("| --- | --- | --- | --- |")
        for r, s in gamma_rows.items():
            lines.append(f"| {ROW_LABELS[r]} | {s[:, -1].mean():.3g} | {s.mean():.3g} | {np.quantile(s, 0.9):.3g} |")
        plots.gamma_curves(gamma_rows, ROW_LABELS, plot_dir / "gamma.png")
        lines += ["", "![router shift](plots/gamma.png)"]
    rewards = {r: s for r in trained if (s := _series(run, r, "reward_mean", "batch")) is not None}
    if rewards:
        plots.reward_curves(rewards, ROW_LABELS, plot_dir / "rewards.png")
        lines += ["", "## Phase B reward", "", "![reward curves](plots/rewards.png)"]
    if "teacher" in run.evals:
        teacher_flops = run.evals["teacher"]["flops_per_token@1024"]
        points = {
            ROW_LABELS.get(r, r): (
                run.evals[run.names(r)[0]]["flops_per_token@1024"] / teacher_flops,
                statistics.fmean(run.average(r, benches)),
            )
            for r in [*main_rows, *run.manifest["ablations"]]
            if run.names(r)
        }
        plots.pass_vs_flops(points, plot_dir / "pass_vs_flops.png")
        lines += ["", "## Accuracy against compute", "", "![Pass@1 vs FLOPs](plots/pass_vs_flops.png)"]

    lines += ["", "## What this run says about the paper's claims", "", *claims(run, benches, broad)]
    stages: dict[str, float] = {}
    for cell in run.cells.values():
        stages[cell["stage"]] = stages.get(cell["stage"], 0.0) + cell["seconds"]
    lines += ["", "## Wall-clock per stage", "", "| Stage | seconds |", "| --- | --- |"]
    lines += [f"| {stage} | {sec:.0f} |" for stage, sec in stages.items()]
    lines.append(f"| total | {sum(stages.values()):.0f} |")
    report = run_dir / "report.md"
    report.write_text("\n".join(lines) + "\n")
    print_table(run, main_rows + [r for r in run.manifest["ablations"]], benches + broad, console)
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
            ROW_LABELS.get(r, r),
            *(f"{statistics.fmean(run.scores(r, b)):.1f}" for b in benches),
            f"{flops / teacher_flops:.2f}" if teacher_flops else "",
        )
    console.print(table)
