"""The strategy breakdown: one stacked bar per strategy (compute, HBM, each collective)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from ..estimate import Bottleneck, Overlap
from ..units import format_seconds
from ._figure import (
    COLORS,
    COMM_COLORS,
    OUTSIDE,
    Plans,
    as_plans,
    merge_symmetric,
    new_axes,
    problem_text,
    save_figure,
    strategy_labels,
    symmetric_suffix,
)


def _time_unit(seconds: float) -> tuple[float, str]:
    for factor, unit in ((1.0, "s"), (1e-3, "ms"), (1e-6, "us")):
        if seconds >= factor:
            return factor, unit
    return 1e-9, "ns"


def breakdown(
    plans: Plans,
    ax: Axes | None = None,
    *,
    overlap: Overlap = Overlap.FULL,
    top: int | None = 25,
    merge: bool = True,
    title: str | None = None,
) -> Axes:
    """Stacked horizontal bars per strategy, best first: compute, HBM, then each
    collective's time, so a bar is the no-overlap time (the upper bound). The bottleneck's
    segments are hatched and outlined; a black tick marks the estimate under ``overlap``,
    written after the bar with the bottleneck's name.

    With hundreds of strategies the figure stays readable: with ``merge``, strategies that
    are the same by symmetry (``symmetry_key``) are one row labelled ``(xN by symmetry)``,
    and only the ``top`` best rows are drawn (the title says how many there were). The
    title names the problem (einsum, sizes, dtype, hardware, mesh) unless ``title`` is
    given."""
    everything = as_plans(plans)
    rows = merge_symmetric(everything) if merge else [(p, 1) for p in everything]
    shown_rows = rows if top is None else rows[:top]
    items = [item for item, _ in shown_rows]
    counts = [count for _, count in shown_rows]
    if ax is None:
        ax = new_axes(11.0, 1.6 + 0.5 * len(items))
    longest = max((p.cost.upper_bound_s for p in items), default=1.0) or 1.0
    factor, unit = _time_unit(longest)
    comm_colors: dict[str, str] = {}
    for row, item in enumerate(items):
        cost = item.cost
        segments = [
            ("compute", cost.compute_s, COLORS["compute"], Bottleneck.COMPUTE),
            ("HBM", cost.hbm_s, COLORS["HBM"], Bottleneck.HBM),
        ]
        for step in item.collectives:
            if step.cost is not None:
                key = f"{step.cost.kind.book_name} over {'+'.join(step.cost.axes)}"
                color = COMM_COLORS[len(comm_colors) % len(COMM_COLORS)]
                color = comm_colors.setdefault(key, color)
                name = f"{key} ({step.label})"  # one bar segment per array moved
                segments.append((name, step.cost.time_s, color, Bottleneck.COMM))
        left = 0.0
        for name, seconds, color, term in segments:
            hatched = cost.bottleneck is term
            ax.barh(
                row,
                seconds / factor,
                left=left / factor,
                height=0.62,
                color=color,
                edgecolor="black" if hatched else "white",
                lw=1.0 if hatched else 0.5,
                hatch="///" if hatched else None,
                gid=f"bar:{row}:{name}",
            )
            left += seconds
        estimate_s = cost.time_s(overlap)
        ax.plot(
            [estimate_s / factor],
            [row],
            marker="|",
            color="black",
            ms=22,
            mew=2.2,
            gid=f"estimate:{row}",
        )
        ax.annotate(
            f"{format_seconds(estimate_s, 3)} ({cost.describe_bottleneck()})",
            (left / factor, row),
            xytext=(6, 0),
            textcoords="offset points",
            va="center",
            fontsize=8,
        )
    labels = [
        f"#{row + 1}  {name}{symmetric_suffix(count)}"
        for row, (name, count) in enumerate(zip(strategy_labels(items), counts, strict=True))
    ]
    ax.set_yticks(range(len(items)), labels, fontsize=8)
    ax.set_ylim(len(items) - 0.5, -0.5)
    ax.set_xlim(0, longest / factor * 1.5)
    ax.set_xlabel(f"time per chip ({unit}); bar = compute + HBM + collectives (no overlap)")
    what = f"{len(items)} of {len(rows)} distinct" if len(items) < len(rows) else f"{len(rows)}"
    merged = (
        f", {len(everything)} before merging symmetric ones" if len(rows) < len(everything) else ""
    )
    head = title or (problem_text(items[0]) if items else "no strategies")
    ax.set_title(
        f"{head}\n{what} strategies{merged} ({overlap.value}-overlap estimate at |)",
        fontsize=10,
    )
    colors = {**COLORS, **comm_colors}
    handles: list[Any] = [Patch(facecolor=c, label=n) for n, c in colors.items()]
    handles.append(Patch(facecolor="white", edgecolor="black", hatch="///", label="bottleneck"))
    estimate = f"estimate ({overlap.value} overlap)"
    handles.append(Line2D([], [], ls="", marker="|", ms=12, mew=2, color="black", label=estimate))
    ax.legend(handles=handles, **OUTSIDE)
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    return ax


def save_breakdown(
    plans: Plans,
    path: str | Path,
    *,
    overlap: Overlap = Overlap.FULL,
    force: bool = False,
    **kwargs: Any,
) -> Path:
    """``breakdown(plans)`` written to ``path`` (the CLI's ``--plot``; ``save_figure``'s rules)."""
    return save_figure(breakdown(plans, overlap=overlap, **kwargs), path, force=force)
