"""The report's figures as PNG bytes (matplotlib, Agg backend, no pyplot global state).

Each function takes the report's JSON figure data, so the HTML and `--json` show the same numbers.
"""

from __future__ import annotations

import io
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: never open a window or need a display

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 100
ACCEPTED, PLANNED = "#2b6cb0", "#c0c4cc"


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#666")
    ax.set_axis_off()


def _bars(
    labels: list[str], counts: list[int], height: float, color: str, share: bool, xlabel: str, empty: str
) -> bytes:
    """Horizontal bars, first label on top, each annotated with its count (and its share of the top)."""
    fig = Figure(figsize=(8, height), layout="constrained")
    ax = fig.add_subplot()
    if not counts or not max(counts):
        _empty(ax, empty)
        return _png(fig)
    y = np.arange(len(labels))[::-1]
    ax.barh(y, counts, color=color)
    ax.set_yticks(y, labels)
    top = max(counts)
    for yi, c in zip(y, counts):
        ax.text(c + top * 0.01, yi, f"{c:,} ({c / top:.1%})" if share else f"{c:,}", va="center", fontsize=8)
    ax.set_xlim(0, top * (1.22 if share else 1.15))
    ax.set_xlabel(xlabel)
    return _png(fig)


def funnel(stages: list[str], counts: list[int]) -> bytes:
    """Samples left after each stage, candidates first."""
    return _bars(stages, counts, 3.2, ACCEPTED, True, "samples left", "no committed shards yet")


def rejections(reasons: list[str], counts: list[int]) -> bytes:
    """Rejected candidates by the first check they failed."""
    return _bars(reasons, counts, 2.8, "#c05621", False, "rejected candidates", "no rejections")


def au_occurrence(aus: list[str], observed: list[float], planned: list[float]) -> bytes:
    """Occurrence rate of each AU in the accepted labels next to the plan's target rate."""
    fig = Figure(figsize=(9, 3.2), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(aus))
    ax.bar(x - 0.2, planned, 0.4, label="planned (targets)", color=PLANNED)
    ax.bar(x + 0.2, observed, 0.4, label="accepted labels", color=ACCEPTED)
    ax.set_xticks(x, aus)
    ax.set_ylabel("occurrence rate")
    ax.set_ylim(0, max([*observed, *planned, 0.05]) * 1.15)
    ax.legend(loc="upper right", fontsize=8)
    return _png(fig)


def au_intensity(aus: list[str], hist: list[list[int]], planned: list[list[int]]) -> bytes:
    """Per-AU histograms of label intensity (rounded to 0..5) against the plan's target intensities."""
    cols = 6
    rows = -(-len(aus) // cols)
    fig = Figure(figsize=(12, 2.1 * rows + 0.4), layout="constrained")
    axes = fig.subplots(rows, cols, sharex=True, squeeze=False)
    levels = np.arange(len(hist[0]) if hist else 6)
    for i, ax in enumerate(axes.ravel()):
        if i >= len(aus):
            ax.set_axis_off()
            continue
        h, p = np.asarray(hist[i], float), np.asarray(planned[i], float)
        h, p = h / max(h.sum(), 1), p / max(p.sum(), 1)
        ax.bar(levels - 0.2, p, 0.4, color=PLANNED, label="planned")
        ax.bar(levels + 0.2, h, 0.4, color=ACCEPTED, label="labels")
        ax.set_title(aus[i], fontsize=9)
        ax.set_xticks(levels)
        ax.tick_params(labelsize=7)
    axes[0, 0].legend(fontsize=7)
    fig.supxlabel("intensity (share of accepted samples)", fontsize=9)
    return _png(fig)


def cooccurrence(aus: list[str], matrix: list[list[float]]) -> bytes:
    """P(column AU occurs | row AU occurs) over the accepted labels; the diagonal is each AU's rate."""
    m = np.asarray(matrix, float)
    fig = Figure(figsize=(6.4, 5.4), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(m, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(aus)), aus, rotation=90, fontsize=8)
    ax.set_yticks(range(len(aus)), aus, fontsize=8)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=6, color="w" if m[i, j] < 0.6 else "k")
    ax.set_xlabel("AU occurring ...")
    ax.set_ylabel("... given this AU occurs")
    fig.colorbar(im, ax=ax, shrink=0.8, label="conditional rate (diagonal: AU rate)")
    return _png(fig)


def balance(emotions: list[str], panels: list[tuple[str, list[str], list[list[int]], list[list[int]]]]) -> bytes:
    """Emotion x group heatmaps: colour = accepted share / planned share (1 = as planned), text = count."""
    fig = Figure(figsize=(12, 4.2), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    im = None
    for ax, (title, groups, acc, plan) in zip(axes, panels):
        a, p = np.asarray(acc, float), np.asarray(plan, float)
        share_a = a / max(a.sum(), 1)
        share_p = p / max(p.sum(), 1)
        ratio = np.where(share_p > 0, share_a / np.where(share_p > 0, share_p, 1), np.nan)
        im = ax.imshow(ratio, cmap="RdBu_r", vmin=0.5, vmax=1.5, aspect="auto")
        ax.set_xticks(range(len(groups)), groups, fontsize=8)
        ax.set_yticks(range(len(emotions)), emotions, fontsize=8)
        ax.set_title(f"emotion x {title}", fontsize=10)
        for i in range(a.shape[0]):
            for j in range(a.shape[1]):
                ax.text(j, i, f"{int(a[i, j]):,}", ha="center", va="center", fontsize=7)
    if im is not None:
        fig.colorbar(im, ax=list(axes), shrink=0.8, label="accepted share / planned share")
    return _png(fig)


def throughput(nodes: dict[str, list[list[float]]]) -> bytes:
    """Accepted samples committed over time since the first shard started, one line per node."""
    fig = Figure(figsize=(9, 3.4), layout="constrained")
    ax = fig.add_subplot()
    if not nodes:
        _empty(ax, "no committed shards yet")
        return _png(fig)
    events = []
    for node, pts in sorted(nodes.items()):
        t = [0.0] + [p[0] for p in pts]
        n = [0] + [p[1] for p in pts]
        ax.step(t, n, where="post", label=f"{node}")
        events += [(p[0], b - a) for p, a, b in zip(pts, n[:-1], n[1:])]
    if len(nodes) > 1:
        events.sort()
        t_all = [0.0] + [e[0] for e in events]
        n_all = np.concatenate([[0], np.cumsum([e[1] for e in events])])
        ax.step(t_all, n_all, where="post", color="k", ls="--", lw=1, label="all nodes")
    ax.set_xlabel("seconds since the build's first committed shard started")
    ax.set_ylabel("accepted samples committed")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    return _png(fig)


def training_similarity(edges: list[float], counts: list[int], threshold: float | None) -> bytes:
    """Accepted samples by their highest identity similarity to MAUGen's training subjects, with the
    threshold the report counts above (a dashed line)."""
    fig = Figure(figsize=(9, 3.0), layout="constrained")
    ax = fig.add_subplot()
    e, c = np.asarray(edges, float), np.asarray(counts, float)
    if not c.sum():
        _empty(ax, "no measured samples yet")
        return _png(fig)
    ax.bar(e[:-1], c, width=np.diff(e), align="edge", color=ACCEPTED)
    lo, hi = e[:-1][c > 0].min(), e[1:][c > 0].max()
    if threshold is not None:
        ax.axvline(threshold, color="#c05621", ls="--", lw=1.2, label=f"threshold {threshold:.4f}")
        lo, hi = min(lo, threshold), max(hi, threshold)
        ax.legend(fontsize=8, loc="upper left")
    ax.set_xlim(lo - 0.05, hi + 0.05)
    ax.set_xlabel("highest cosine similarity to a training subject")
    ax.set_ylabel("accepted samples")
    return _png(fig)
