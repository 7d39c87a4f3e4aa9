"""Figures (matplotlib). Every function takes an optional ``ax`` and returns the Axes it drew
on; ``save_*`` helpers draw on a fresh figure and write it to a file (no pyplot state)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from .estimate import Bottleneck, Overlap
from .planner import Plan

_COLORS = {"compute": "#4c72b0", "hbm": "#8c8c8c"}
_COMM_COLORS = ("#dd8452", "#c44e52", "#937860", "#da8bc3", "#ccb974", "#64b5cd", "#8172b3")


def breakdown(
    plans: Sequence[Plan], ax: Axes | None = None, *, overlap: Overlap = Overlap.FULL
) -> Axes:
    """Stacked horizontal bars per strategy: compute, HBM, then each collective's time; the
    bottleneck term is hatched and the estimated time (under ``overlap``) marked."""
    if ax is None:
        ax = Figure(figsize=(9, 1.2 + 0.55 * len(plans))).add_subplot()
    labels: list[str] = []
    comm_keys: dict[str, str] = {}
    for row, plan in enumerate(plans):
        cost = plan.cost
        left = 0.0
        segments: list[tuple[str, float, str]] = [
            ("compute", cost.compute_s, _COLORS["compute"]),
            ("HBM", cost.hbm_s, _COLORS["hbm"]),
        ]
        for step in plan.collectives:
            if step.cost is None:
                continue
            key = f"{step.cost.kind.value} {'+'.join(step.cost.axes)}"
            color = comm_keys.setdefault(key, _COMM_COLORS[len(comm_keys) % len(_COMM_COLORS)])
            segments.append((key, step.cost.time_s, color))
        for name, seconds, color in segments:
            hatched = (
                (name == "compute" and cost.bottleneck is Bottleneck.COMPUTE)
                or (name == "HBM" and cost.bottleneck is Bottleneck.HBM)
                or (name not in ("compute", "HBM") and cost.bottleneck is Bottleneck.COMM)
            )
            ax.barh(
                row,
                seconds * 1e3,
                left=left * 1e3,
                color=color,
                edgecolor="black" if hatched else "none",
                hatch="//" if hatched else None,
                label=name,
            )
            left += seconds
        ax.plot(cost.time_s(overlap) * 1e3, row, marker="|", color="black", markersize=18)
        labels.append(plan.strategy)
    ax.set_yticks(range(len(plans)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("time per chip (ms); | = estimate with " + overlap.value + " overlap")
    ax.set_title("Strategy breakdown (hatched: bottleneck)")
    handles, names = ax.get_legend_handles_labels()
    unique: dict[str, Any] = {}
    for handle, name in zip(handles, names, strict=True):
        unique.setdefault(name, handle)
    ax.legend(unique.values(), unique.keys(), fontsize=7, loc="lower right")
    return ax


def save_breakdown(
    plans: Sequence[Plan], path: str | Path, *, overlap: Overlap = Overlap.FULL
) -> Path:
    ax = breakdown(plans, overlap=overlap)
    figure = ax.get_figure()
    if not isinstance(figure, Figure):  # pragma: no cover - a sub-figure
        raise TypeError("breakdown drew on a sub-figure")
    figure.tight_layout()
    out = Path(path)
    figure.savefig(out, dpi=120)
    return out
