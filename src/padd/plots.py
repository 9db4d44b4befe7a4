"""The study's figures (PNG, matplotlib, no display needed). Each takes plain data read by padd.report."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from padd.methods import ROW_COLOURS  # noqa: E402


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    if len(y) < window or window < 2:
        return y
    kernel = np.ones(window) / window
    head = np.array([y[: i + 1].mean() for i in range(window - 1)])
    return np.concatenate([head, np.convolve(y, kernel, mode="valid")])


def gamma_curves(curves: dict[str, np.ndarray], labels: dict[str, str], path: Path) -> None:
    """Γ_step over optimizer steps per method (mean over seeds), with the ECDF of all values inset.

    curves: row -> [seeds, steps] Γ_step.
    """
    fig, ax = plt.subplots(figsize=(7, 4.5))
    inset = ax.inset_axes([0.6, 0.62, 0.37, 0.33])
    top = 0.0
    for row, values in curves.items():
        mean = values.mean(0)
        steps = np.arange(1, len(mean) + 1)
        colour = ROW_COLOURS.get(row)
        ax.plot(steps, mean, label=labels.get(row, row), color=colour, lw=1.2)
        if values.shape[0] > 1:
            ax.fill_between(steps, values.min(0), values.max(0), color=colour, alpha=0.15, lw=0)
        flat = np.sort(values.ravel())
        inset.step(flat, np.arange(1, len(flat) + 1) / len(flat), color=colour, lw=1)
        top = max(top, float(values.max()))
    ax.set_ylim(0, 1.75 * top if top > 0 else 1.0)  # headroom so the inset covers no curve
    inset.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(3))
    inset.ticklabel_format(axis="x", style="sci", scilimits=(-2, 2))
    inset.xaxis.get_offset_text().set_fontsize(6)
    ax.set_ylabel(r"$\Gamma_{step} = \|W_{router}(t) - W_{router}(t-1)\|_2$")
    ax.set_title("router shift per step")
    ax.legend(loc="upper left", fontsize=8)
    inset.set_title("ECDF", fontsize=8)
    inset.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def reward_curves(curves: dict[str, np.ndarray], labels: dict[str, str], path: Path) -> None:
    """Mean reward per rollout batch per trained row (mean over seeds, moving average of 5)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for row, values in curves.items():
        mean = _smooth(values.mean(0), 5)
        style = "-" if row in ROW_COLOURS else "--"
        ax.plot(
            np.arange(1, len(mean) + 1), mean, style, label=labels.get(row, row), color=ROW_COLOURS.get(row), lw=1.2
        )
    ax.set_xlabel("rollout batch")
    ax.set_ylabel("mean reward (moving average of 5)")
    ax.set_title("Phase B reward")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def series_curves(curves: dict[str, np.ndarray], labels: dict[str, str], ylabel: str, path: Path) -> None:
    """One metric per optimizer step for several rows (mean over seeds, band over min-max, moving
    average of 5). curves: row -> [seeds, steps]."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for row, values in curves.items():
        steps = np.arange(1, values.shape[1] + 1)
        colour = ROW_COLOURS.get(row)
        ax.plot(steps, _smooth(values.mean(0), 5), label=labels.get(row, row), color=colour, lw=1.2)
        if values.shape[0] > 1:
            ax.fill_between(steps, values.min(0), values.max(0), color=colour, alpha=0.12, lw=0)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def load_heatmaps(loads: dict[str, np.ndarray], labels: dict[str, str], path: Path) -> None:
    """Per-layer expert load shares (rows: MoE layers, columns: experts) of each model."""
    n = len(loads)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 2.8), squeeze=False)
    vmax = max(float(v.max()) for v in loads.values())
    for ax, (row, load) in zip(axes[0], loads.items(), strict=True):
        image = ax.imshow(load, aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
        ax.set_title(labels.get(row, row), fontsize=8)
        ax.set_xlabel("expert")
    axes[0][0].set_ylabel("MoE layer")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="share of top-K slots")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def specialisation_bars(values: dict[str, tuple[float, float]], path: Path) -> None:
    """NMI and ESI per model: values = name -> (nmi, esi)."""
    names = list(values)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(names)), 3.5))
    ax.bar(x - 0.2, [values[n][0] for n in names], 0.4, label="NMI")
    ax.bar(x + 0.2, [values[n][1] for n in names], 0.4, label="ESI")
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    ax.set_title("alignment of experts with the teacher's co-activation clusters")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def pass_vs_flops(points: dict[str, tuple[float, float]], path: Path) -> None:
    """Average Pass@1 against per-token FLOPs relative to the teacher: points = label -> (flops ratio, pass@1)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (flops, score) in points.items():
        ax.scatter(flops, score, s=30)
        ax.annotate(label, (flops, score), fontsize=7, xytext=(4, 2), textcoords="offset points")
    ax.set_xlabel("forward FLOPs per token (× teacher)")
    ax.set_ylabel("average Pass@1 (%)")
    ax.set_title("accuracy against compute")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
