"""The latency-throughput trade of serving (inference.md, "Theoretical estimates"; the
ESTI paper's Pareto frontier): one strategy's step time against tokens/s per chip as the
batch grows (``latency_throughput``), and the step's parts against the batch
(``step_breakdown``): the weights' HBM reads stay, the KV cache's and the FLOPs grow.

Marked on both: where the weight matmuls turn from memory- to compute-bound (the critical
batch, a star, interpolated on the curve) and the largest batch that fits in HBM (a
diamond); batches that do not fit are drawn hollow. Each line has a ``gid``
(``serve:curve``, ``serve:no-fit``, ``serve:critical``, ``serve:max-batch``,
``serve:part:weights`` ...) so the plotted numbers can be read back.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes

from ..program.serve_plan import CurvePoint, ServeCurve
from ..units import format_count, format_seconds
from ._figure import OUTSIDE, PALETTE, STAR, log_ticks, new_axes, save_figure, subplots

#: The largest-batch-that-fits marker.
_DIAMOND: dict[str, Any] = {
    "marker": "D", "ms": 9, "mec": "black", "mew": 0.8, "zorder": 6, "ls": "",
}  # fmt: skip


def _interpolate(points: list[CurvePoint], batch: float) -> tuple[float, float] | None:
    """(step time, tokens/s/chip) at ``batch`` on the curve, log-linear between points."""
    for a, b in itertools.pairwise(points):
        if a.batch <= batch <= b.batch:
            f = math.log(batch / a.batch) / math.log(b.batch / a.batch) if b.batch > a.batch else 0
            step = a.step_time_s * (b.step_time_s / a.step_time_s) ** f
            ra, rb = a.tokens_per_s_per_chip, b.tokens_per_s_per_chip
            return step, ra * (rb / ra) ** f
    return None


def _critical_sequences(curve: ServeCurve) -> float | None:
    """The batch (sequences) where the weight matmuls' FLOPs catch up with their weights'
    HBM reads: the book's critical batch (``C/W_hbm``·bytes per weight/2)."""
    if curve.critical_batch_weights_only is None:
        return None
    return curve.critical_batch_weights_only / curve.tokens_per_sequence


def latency_throughput(curve: ServeCurve, ax: Axes | None = None) -> Axes:
    """Step time (latency per token of each sequence) on x, tokens/s per chip on y, one
    point per batch, labelled with it."""
    ax = ax if ax is not None else new_axes(7.5, 4.8)
    points = list(curve.points)
    fit = [p for p in points if p.fits]
    ax.plot(
        [p.step_time_s for p in points],
        [p.tokens_per_s_per_chip for p in points],
        color=PALETTE[0],
        lw=1.2,
        alpha=0.5,
        gid="serve:line",
    )
    ax.plot(
        [p.step_time_s for p in fit],
        [p.tokens_per_s_per_chip for p in fit],
        "o",
        color=PALETTE[0],
        ms=5,
        label=f"{curve.strategy}: batches that fit",
        gid="serve:curve",
    )
    over = [p for p in points if not p.fits]
    if over:
        ax.plot(
            [p.step_time_s for p in over],
            [p.tokens_per_s_per_chip for p in over],
            "o",
            mfc="none",
            color="#8c8c8c",
            ms=5,
            label="do not fit in HBM",
            gid="serve:no-fit",
        )
    for p in points:
        ax.annotate(
            format_count(p.batch),
            (p.step_time_s, p.tokens_per_s_per_chip),
            textcoords="offset points",
            xytext=(4, -10),
            fontsize=7,
            color="#555555",
        )
    critical = _critical_sequences(curve)
    if critical is not None:
        at = _interpolate(points, critical)
        if at is not None:
            ax.plot(
                [at[0]],
                [at[1]],
                color="#ffd92f",
                label=f"weight matmuls compute-bound above batch {critical:,.0f}",
                gid="serve:critical",
                **STAR,
            )
    if curve.max_batch_point is not None:
        p = curve.max_batch_point
        ax.plot(
            [p.step_time_s],
            [p.tokens_per_s_per_chip],
            color="#d62728",
            label=f"largest batch that fits: {curve.max_batch:,}",
            gid="serve:max-batch",
            **_DIAMOND,
        )
    ax.set_xscale("log")
    log_ticks(ax, "x", format_seconds)
    ax.set_xlabel("step time (latency per generated token)")
    ax.set_ylabel("tokens/s per chip")
    ax.set_title(curve.label, fontsize=9)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(loc="lower right", fontsize=8, framealpha=0.9)
    return ax


_PARTS = (
    ("weights", "weights' HBM reads", "weight_hbm_s", "#8c8c8c"),
    ("kv", "KV cache HBM reads", "kv_hbm_s", "#dd8452"),
    ("compute", "weight matmuls' compute", "weight_compute_s", "#4c72b0"),
    ("comm", "communication", "comm_s", "#c44e52"),
    ("step", "step (overlapped)", "step_time_s", "black"),
)


def step_breakdown(curve: ServeCurve, ax: Axes | None = None) -> Axes:
    """The step's parts per chip against the batch (log-log): where the compute line
    crosses the weights' is the critical batch; past the largest batch that fits, grey."""
    ax = ax if ax is not None else new_axes(7.5, 4.8)
    points = list(curve.points)
    batches = [p.batch for p in points]
    for key, label, attr, color in _PARTS:
        ax.plot(
            batches,
            [getattr(p, attr) for p in points],
            color=color,
            lw=2.0 if key == "step" else 1.3,
            ls="-" if key in ("step", "compute") else "--",
            label=label,
            gid=f"serve:part:{key}",
        )
    critical = _critical_sequences(curve)
    if critical is not None:
        ax.axvline(critical, color="#b8860b", lw=1, ls=":", gid="serve:critical-line")
        ax.annotate(
            f"weight matmuls\ncompute-bound\nabove {critical:,.0f}",
            (critical, 0.02),
            xycoords=("data", "axes fraction"),
            fontsize=7,
            color="#b8860b",
            xytext=(3, 0),
            textcoords="offset points",
        )
    if curve.max_batch:
        right = max(*batches, curve.max_batch) * 2
        ax.axvspan(curve.max_batch, right, color="#dddddd", alpha=0.5, lw=0, gid="serve:no-fit")
        ax.annotate(
            f"fits up to {curve.max_batch:,}",
            (curve.max_batch, 0.95),
            xycoords=("data", "axes fraction"),
            fontsize=7,
            color="#d62728",
            xytext=(-3, 0),
            textcoords="offset points",
            ha="right",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(min(batches) / 1.3, max(batches) * 1.3)
    ax.set_xlabel("batch (sequences)")
    ax.set_ylabel("seconds per step, per chip")
    log_ticks(ax, "y", format_seconds)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(**OUTSIDE)
    return ax


def serving_figure(curve: ServeCurve) -> tuple[Axes, Axes]:
    """Both panels on one figure: the trade on the left, the step's parts on the right."""
    _, (left, right) = subplots(2, ncols=2, panel_size=(6.4, 4.6))
    latency_throughput(curve, ax=left)
    step_breakdown(curve, ax=right)
    return left, right


def save_latency_throughput(curve: ServeCurve, path: str | Path, *, force: bool = False) -> Path:
    left, _ = serving_figure(curve)
    return save_figure(left, path, force=force)
