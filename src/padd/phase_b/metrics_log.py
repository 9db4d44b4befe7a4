"""Where a `padd train` run's metrics go: one JSON row per optimizer step in `metrics.jsonl` and the
same scalars in TensorBoard (per-layer lists as `name/layerN`), written by the main rank only; and
the end-of-run lines that say whether stages III and IV acted."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from padd.routing import BIAS_FILE

METRICS_FILE = "metrics.jsonl"
# row keys that index a row rather than measure something
_INDEX_KEYS = ("step", "batch", "minibatch")


class MetricsLog:
    """Appends metric rows to `out/metrics.jsonl` and TensorBoard. `resume_batch`: the rollout batch
    the run resumes after; rows logged past it belong to the lost part of the run and are dropped.
    On a rank other than the main one every call is a no-op."""

    def __init__(self, out: Path, *, main: bool, resume_batch: int | None = None):
        self.path = Path(out) / METRICS_FILE
        self.main = main
        if not main:
            return
        if resume_batch is None:
            self.path.write_text("")
        else:
            kept = [x for x in self.path.read_text().splitlines() if json.loads(x)["batch"] <= resume_batch]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.file = self.path.open("a")
        self.writer = SummaryWriter(str(Path(out) / "tensorboard"))

    def write(self, rows: list[dict]) -> None:
        if not self.main:
            return
        for row in rows:
            self.file.write(json.dumps(row) + "\n")
            for key, value in row.items():
                if isinstance(value, (int, float)) and key not in _INDEX_KEYS:
                    self.writer.add_scalar(key, value, row["step"])
                elif isinstance(value, list):  # one value per MoE layer
                    for layer, v in enumerate(value):
                        self.writer.add_scalar(f"{key}/layer{layer}", v, row["step"])
        self.file.flush()

    def close(self) -> None:
        if self.main:
            self.file.close()
            self.writer.close()


def stage_summary(rows: list[dict], objective, bias_file: bool = False) -> list[str]:
    """One line per stage that acts on the routing, from this session's metrics rows: III's damping
    on the updates where the router had moved (the first mini-batch of a batch is on-policy), and
    IV's bias against the score gaps it must bridge. A stage that stays inert is said to be.
    `bias_file`: the bias was written beside the student (a router without a native one), so say
    what a server that ignores the file would route differently."""
    lines = []
    damping = [
        r["pr_damping_median"]
        for r in rows
        if "pr_damping_median" in r and r.get("gamma_token_mean", 0) > 0 and r.get("pr_negative_frac", 0) > 0
    ]
    if damping:
        median = statistics.median(damping)
        note = " — inert: raise --lam or use --shift-norm running-mean" if median > 0.95 else ""
        lines.append(f"III: median damping exp(-λΓ) on A<0 tokens {median:.3f} over {len(damping)} updates{note}")
    if rows and "bias_spread_mean" in rows[-1] and (objective.eta or objective.balance_reward_coef):
        last = rows[-1]
        gaps = [r["router_gap_median"] for r in rows if "router_gap_median" in r]
        gap = statistics.median(gaps) if gaps else float("nan")
        lines.append(
            f"IV: bias spread {last['bias_spread_mean']:.3g} (median top-K score gap {gap:.3g}); "
            f"selections changed by the bias {100 * last.get('bias_changed_frac', 0.0):.1f}%"
        )
    if bias_file and rows:
        agreement = 100 * (1 - rows[-1].get("bias_changed_frac", 0.0))
        lines.append(
            f"routing bias written beside the student ({BIAS_FILE}): top-K agreement with and without it "
            f"{agreement:.1f}% on the last update; a server that ignores the file (vLLM) serves the stock routing"
        )
    return lines
