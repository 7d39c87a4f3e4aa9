"""What every figure shares: figures without pyplot, saving, log-axis ticks, the palettes,
and how plans are named on a plot."""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from ..files import FIGURE_FORMATS, check_output_path, write_atomic
from ..plans import Plan, Ranking
from ..report import collectives_summary
from ..units import format_count, format_seconds

#: What the drawing functions accept as strategies: one plan, a ranking (all of its
#: strategies, best first) or a sequence of plans.
Plans = Plan | Ranking | Sequence[Plan]

COLORS = {"compute": "#4c72b0", "HBM": "#8c8c8c"}
COMM_COLORS = ("#dd8452", "#c44e52", "#937860", "#da8bc3", "#ccb974", "#64b5cd", "#8172b3")
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b")
LINK_COLORS = ("#d62728", "#ff7f0e", "#9467bd", "#17becf", "#8c564b", "#e377c2", "#bcbd22")
#: A legend to the right of the Axes.
OUTSIDE: dict[str, Any] = {
    "loc": "upper left",
    "bbox_to_anchor": (1.01, 1.0),
    "fontsize": 8,
    "frameon": False,
}
#: The crossover marker.
STAR: dict[str, Any] = {"marker": "*", "ms": 15, "mec": "black", "mew": 0.8, "zorder": 6, "ls": ""}


# -- figures without pyplot --------------------------------------------------------------------


class InlineFigure(Figure):
    """A ``Figure`` that Jupyter renders inline (``_repr_png_``), without pyplot."""

    def _repr_png_(self) -> bytes:
        return figure_png(self)


def new_axes(width: float = 8.0, height: float = 5.0) -> Axes:
    """One Axes on a fresh ``InlineFigure`` with constrained layout."""
    return InlineFigure(figsize=(width, height), layout="constrained").add_subplot()


def subplots(
    num: int,
    *,
    ncols: int = 2,
    panel_size: tuple[float, float] = (5.6, 4.0),
    sharex: bool = False,
    sharey: bool = False,
) -> tuple[InlineFigure, list[Axes]]:
    """A fresh ``InlineFigure`` with ``num`` Axes in rows of ``ncols`` (chips side by side);
    unused cells of the last row are removed."""
    ncols = max(1, min(ncols, num))
    nrows = math.ceil(num / ncols)
    size = (panel_size[0] * ncols, panel_size[1] * nrows)
    figure = InlineFigure(figsize=size, layout="constrained")
    grid = figure.subplots(nrows, ncols, sharex=sharex, sharey=sharey, squeeze=False)
    axes = [grid[r][c] for r in range(nrows) for c in range(ncols)]
    for extra in axes[num:]:
        extra.remove()
    return figure, axes[:num]


def figure_of(obj: Axes | Figure) -> Figure:
    """The top-level ``Figure`` of an Axes (or of a sub-figure, or the figure itself)."""
    figure: Any = obj
    while figure is not None and not isinstance(figure, Figure):
        figure = figure.get_figure()
    if figure is None:  # pragma: no cover - an Axes on no figure
        raise TypeError("this Axes is not on a figure")
    return figure


def figure_png(obj: Axes | Figure, *, dpi: int = 100) -> bytes:
    """The figure as PNG bytes (deterministic: PNG metadata has no timestamp)."""
    buffer = io.BytesIO()
    figure_of(obj).savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()


def save_figure(
    obj: Axes | Figure, path: str | Path, *, dpi: int = 120, force: bool = False
) -> Path:
    """Write the figure holding ``obj`` to ``path`` and return it. The format comes from the
    suffix and must be one of ``files.FIGURE_FORMATS`` (png, pdf, svg); the directory must
    exist; an existing file is replaced only with ``force``; the write is atomic, and the
    layout is tight, so no legend outside the Axes is clipped."""
    out = check_output_path(path, force=force, formats=FIGURE_FORMATS)
    figure = figure_of(obj)
    suffix = out.suffix.lower().lstrip(".")

    def write(temporary: Path) -> None:
        figure.savefig(temporary, dpi=dpi, bbox_inches="tight", format=suffix)

    return write_atomic(out, write)


# -- axes formatting ---------------------------------------------------------------------------


def log_ticks(ax: Axes, which: str, label: Callable[[float], str]) -> None:
    """Human tick labels on a log axis; 1-2-5 ticks when it spans under three decades."""
    axis = ax.yaxis if which == "y" else ax.xaxis
    lo, hi = ax.get_ylim() if which == "y" else ax.get_xlim()
    if lo > 0 and hi / lo < 1e3:
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: label(v)))
    axis.set_minor_formatter(NullFormatter())


def count_text(value: float) -> str:
    """``16.4k``, ``2.5M``; plain below 1."""
    return format_count(value, 3).replace(" ", "") if value >= 1 else f"{value:g}"


def seconds_text(value: float) -> str:
    return format_seconds(value, 3)


def geomspace(lo: float, hi: float, num: int) -> list[float]:
    """``num`` points from ``lo`` to ``hi``, evenly spaced on a log scale."""
    step = (math.log(hi) - math.log(lo)) / (num - 1)
    return [math.exp(math.log(lo) + i * step) for i in range(num)]


# -- plans as drawn ----------------------------------------------------------------------------


def as_plans(plans: Plans) -> list[Plan]:
    if isinstance(plans, Plan):
        return [plans]
    if isinstance(plans, Ranking):
        return list(plans.strategies)
    return list(plans)


def plan_label(plan: Plan) -> str:
    """``A[B_x, D] · B[D_x, F] -> C[B_x, F]: AG_x(B)``: the stored layouts and the
    collectives (two plans of the same layouts can move different arrays)."""
    return f"{plan.strategy}: {collectives_summary(plan)}"


def strategy_labels(items: Sequence[Plan]) -> list[str]:
    """Strategy notation, with the collectives where two plans share the notation."""
    strategies = [p.strategy for p in items]
    if len(set(strategies)) == len(strategies):
        return strategies
    return [plan_label(p) for p in items]


# -- many strategies on one figure ------------------------------------------------------------


def _sig(value: float) -> float:
    """``value`` to 12 significant digits, so equal costs from different sums compare equal."""
    return float(f"{value:.12g}")


def symmetry_key(plan: Plan) -> tuple[object, ...]:
    """What two strategies share when they are the same up to a symmetry of the mesh (axes of
    equal size and link swapped): the same compute, HBM and communication times, and the same
    collectives (kind, array moved, bytes, time), whatever the axes are called."""
    cost = plan.cost
    steps = sorted(
        (
            step.cost.kind.value,
            step.operand,
            _sig(step.cost.bytes_sent_per_chip),
            _sig(step.cost.time_s),
        )
        for step in plan.collectives
        if step.cost is not None
    )
    return (_sig(cost.compute_s), _sig(cost.hbm_s), _sig(cost.comm_s), tuple(steps))


def merge_symmetric(items: Sequence[Plan]) -> list[tuple[Plan, int]]:
    """Each distinct strategy once, best first, with how many strategies it stands for
    (``symmetry_key``): a figure of 300 strategies becomes one of a few dozen."""
    groups: dict[tuple[object, ...], list[Plan]] = {}
    for item in items:
        groups.setdefault(symmetry_key(item), []).append(item)
    return [(group[0], len(group)) for group in groups.values()]


def problem_text(plan: Plan) -> str:
    """``bd,df->bf (b=8192,d=8192,f=32768) bf16 on tpu-v5e x=4,y=4``: which problem a figure
    shows, for its title."""
    einsum, mesh = plan.einsum, plan.mesh
    return (
        f"{einsum.spec.equation} ({einsum.dims_text}) {einsum.dtype} on {mesh.hardware.name} "
        f"{mesh.spec_text}"
    )


def symmetric_suffix(count: int) -> str:
    """`` (x4 by symmetry)`` for a merged row of 4 strategies; empty for one."""
    return f" (x{count} by symmetry)" if count > 1 else ""
