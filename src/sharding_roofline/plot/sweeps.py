"""Crossovers: per-chip compute, communication and HBM time as one einsum letter grows
(``crossover_sweep``, ``crossover_panels``) or as the mesh grows (``mesh_sweep``)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter

from ..crossover import Crossover, comm_and_compute_s, crossover, default_dimension
from ..dtypes import dtype_bytes
from ..errors import SpecError
from ..plans import Plan
from ._figure import (
    OUTSIDE,
    PALETTE,
    STAR,
    InlineFigure,
    Plans,
    as_plans,
    count_text,
    geomspace,
    log_ticks,
    new_axes,
    plan_label,
    save_figure,
    seconds_text,
    subplots,
)

#: The vertical distance between crossover labels, in axes fractions (8 pt text fits).
LABEL_STEP = 0.065

# what a crossover's regime adds to its marker's label: a crossover set by per-hop latency
# does not move with bandwidth, unlike the book's C/W rules
_REGIME_TEXT = {"latency": " (latency-bound)", "mixed": " (partly latency-bound)"}


@dataclass(frozen=True, slots=True, kw_only=True)
class SweepTimes:
    """Per-chip seconds of one strategy as one letter's global size varies."""

    dimension: str
    sizes: tuple[float, ...]
    compute_s: tuple[float, ...]
    hbm_s: tuple[float, ...]
    comm_s: tuple[float, ...]


def sweep_times(plan: Plan, dimension: str | None, sizes: Sequence[float]) -> SweepTimes:
    """``plan``'s compute, HBM and communication seconds with ``dimension`` (default: the
    batch) resized to each of ``sizes``, its shardings kept: compute and the HBM bytes of the
    local operands holding the letter scale with it; communication as
    ``crossover.comm_and_compute_s`` (bandwidth terms scale, latency terms stay)."""
    letter = dimension or default_dimension(plan)
    current = plan.einsum.size(letter)
    op, einsum = plan.operation, plan.einsum
    axis_size = {axis.name: axis.size for axis in plan.mesh.axes}
    local: list[tuple[str, float]] = []
    for role, sharding, letters in (
        ("lhs", op.lhs, op.lhs_letters),
        ("rhs", op.rhs, op.rhs_letters),
        ("out", op.out, op.out_letters),
    ):
        itemsize = dtype_bytes(einsum.accum_dtype if role == "out" else einsum.dtype)
        local.append(
            (letters, itemsize * math.prod(sharding.local_shape(einsum.shape(role), axis_size)))
        )
    compute, hbm, comm = [], [], []
    for size in sizes:
        comm_s, compute_s = comm_and_compute_s(plan, letter, size)
        moved = sum(b * (size / current if letter in ls else 1.0) for ls, b in local)
        compute.append(compute_s)
        comm.append(comm_s)
        hbm.append(moved / plan.mesh.hardware.chip.hbm_bytes_per_s)
    return SweepTimes(
        dimension=letter,
        sizes=tuple(float(s) for s in sizes),
        compute_s=tuple(compute),
        hbm_s=tuple(hbm),
        comm_s=tuple(comm),
    )


def _default_sizes(plans: Sequence[Plan], letter: str) -> list[float]:
    """Decades around the crossovers (or, with none, around the current sizes)."""
    centers = [c.size for c in (crossover(p, letter) for p in plans) if c.size is not None]
    centers = centers or [float(p.einsum.size(letter)) for p in plans]
    lo = 10 ** math.floor(math.log10(min(centers) / 30))
    hi = 10 ** math.ceil(math.log10(max(centers) * 30))
    return geomspace(max(lo, 1.0), hi, 241)


def crossover_text(found: Crossover) -> str:
    """The marker's label: ``B = 10,200``, with ``(latency-bound)`` when per-hop latency,
    not bandwidth, sets the crossover (``Crossover.regime``)."""
    if found.size is None:
        return f"{found.dimension.upper()}: no crossover"
    size = f"{found.size:,.0f}" if found.size >= 100 else f"{found.size:.3g}"
    return f"{found.dimension.upper()} = {size}{_REGIME_TEXT.get(found.regime or '', '')}"


def crossover_sweep(
    plans: Plans,
    dimension: str | None = None,
    *,
    sizes: Sequence[float] | None = None,
    labels: Sequence[str] | None = None,
    hbm: bool = True,
    legend: bool = True,
    title: str | None = None,
    ax: Axes | None = None,
) -> Axes:
    """Per-chip compute (solid), communication (dashed) and HBM (dotted) time of each
    strategy against the global size of ``dimension`` (default: the batch), log-log, with a
    star where communication and compute meet (``crossover``), labelled with the size and,
    when latency sets it, ``(latency-bound)``; one strategy's communication-bound side is
    shaded. Each plan keeps its shardings; one letter grows."""
    items = as_plans(plans)
    if not items:
        raise SpecError("crossover_sweep needs at least one plan: pass a Plan, a Ranking or a list")
    letter = dimension or default_dimension(items[0])
    grid = list(sizes) if sizes is not None else _default_sizes(items, letter)
    names = list(labels) if labels is not None else [plan_label(p) for p in items]
    if ax is None:
        ax = new_axes(10.0, 5.2)
    ax.set(xscale="log", yscale="log")
    # compute time does not depend on the collectives: one black line if it is shared
    slopes = [p.cost.compute_s / p.einsum.size(letter) for p in items]
    shared = len(items) > 1 and all(math.isclose(a, slopes[0], rel_tol=1e-9) for a in slopes)
    marked: list[float] = []
    for index, (item, name) in enumerate(zip(items, names, strict=True)):
        color = PALETTE[index % len(PALETTE)]
        times = sweep_times(item, letter, grid)
        ax.plot([], [], color=color, lw=2, label=name)
        ax.plot(
            grid,
            times.compute_s,
            "-",
            color="black" if shared else color,
            lw=2,
            gid=f"sweep:{index}:compute",
        )
        if any(times.comm_s):
            comm = [t if t > 0 else math.nan for t in times.comm_s]
            ax.plot(grid, comm, "--", color=color, lw=2, gid=f"sweep:{index}:comm")
        if hbm:
            ax.plot(grid, times.hbm_s, ":", color=color, lw=1.3, gid=f"sweep:{index}:hbm")
        found = crossover(item, letter)
        if found.size is None:
            continue
        y = item.cost.compute_s * found.size / item.einsum.size(letter)
        ax.plot([found.size], [y], color=color, gid=f"crossover:{index}", **STAR)
        if not any(math.isclose(found.size, m, rel_tol=1e-3) for m in marked):
            # one row per label in the upper left, a thin line to its star: labels of
            # crossovers that lie close together never overlap
            ax.annotate(
                crossover_text(found),
                (found.size, y),
                fontsize=8,
                xytext=(0.015, 0.97 - LABEL_STEP * len(marked)),
                textcoords="axes fraction",
                ha="left",
                va="top",
                color=color,
                fontweight="bold",
                arrowprops={"arrowstyle": "-", "color": color, "lw": 0.7, "alpha": 0.6},
                gid=f"crossover:{index}:label",
            )
            marked.append(found.size)
        if len(items) == 1 and found.size > grid[0]:
            ax.axvspan(
                grid[0], found.size, color="#c44e52", alpha=0.07, lw=0, label="communication-bound"
            )
    ax.set_xlim(grid[0], grid[-1])
    ax.set_xlabel(f"global size of {letter.upper()} (einsum letter {letter!r})")
    ax.set_ylabel("time per chip")
    log_ticks(ax, "x", count_text)
    log_ticks(ax, "y", seconds_text)
    ax.grid(True, which="major", alpha=0.3)
    mesh = items[0].mesh
    einsum = items[0].einsum
    ax.set_title(
        title
        or f"Compute vs communication on {mesh.hardware.chip.name} "
        f"({mesh.spec_text}, {mesh.topology.shape_text})\n"
        f"{einsum.spec.equation} ({einsum.dims_text}) {einsum.dtype}, {letter.upper()} varied",
        fontsize=10,
    )
    if legend:
        ax.legend(handles=_sweep_handles(ax, hbm), **OUTSIDE)
    return ax


def _sweep_handles(ax: Axes, hbm: bool) -> list[Any]:
    handles: list[Any] = list(ax.get_legend_handles_labels()[0])
    handles.append(Line2D([], [], color="black", ls="-", lw=2, label="compute"))
    handles.append(Line2D([], [], color="black", ls="--", lw=2, label="communication"))
    if hbm:
        handles.append(Line2D([], [], color="black", ls=":", lw=1.3, label="HBM"))
    star: dict[str, Any] = {**STAR, "color": "white"}
    handles.append(Line2D([], [], label="communication = compute", **star))
    return handles


def crossover_panels(
    panels: Mapping[str, Plans],
    dimension: str | None = None,
    *,
    sizes: Sequence[float] | None = None,
    labels: Sequence[str] | None = None,
    hbm: bool = True,
    ncols: int = 2,
    sharey: bool = True,
) -> InlineFigure:
    """One ``crossover_sweep`` per entry (``{"TPU v5e": plans, "H100": plans, ...}``), side by
    side, over the same ``sizes`` and sharing the time axis, with one legend; ``labels``
    name the strategies in every panel (the same strategies on each chip)."""
    if sizes is None:  # one range for every panel, so the panels compare at a glance
        every = [item for plans in panels.values() for item in as_plans(plans)]
        sizes = _default_sizes(every, dimension or default_dimension(every[0]))
    figure, axes = subplots(len(panels), ncols=ncols, sharey=sharey)
    for ax, (title, plans) in zip(axes, panels.items(), strict=True):
        crossover_sweep(
            plans, dimension, sizes=sizes, labels=labels, hbm=hbm, legend=False, title=title, ax=ax
        )
    handles = _sweep_handles(axes[0], hbm)
    figure.legend(
        handles=handles,
        loc="outside lower center",
        ncols=min(4, len(handles)),
        fontsize=8,
        frameon=False,
    )
    return figure


def save_crossover_sweep(
    path: str | Path, plans: Plans, *, force: bool = False, **kwargs: Any
) -> Path:
    """``crossover_sweep(plans, **kwargs)`` written to ``path`` (``save_figure``'s rules)."""
    return save_figure(crossover_sweep(plans, **kwargs), path, force=force)


# -- crossover as the mesh grows ---------------------------------------------------------------


def log_crossing(
    xs: Sequence[float], below: Sequence[float], above: Sequence[float]
) -> tuple[float, float] | None:
    """Where the piecewise log-log-linear curve ``above`` first rises to meet ``below``:
    ``(x, y)``, or None. Points where either curve is 0 are skipped."""
    for i in range(len(xs) - 1):
        if min(below[i], below[i + 1], above[i], above[i + 1]) <= 0:
            continue
        f0 = math.log(above[i] / below[i])
        f1 = math.log(above[i + 1] / below[i + 1])
        if f0 < 0 <= f1:
            t = f0 / (f0 - f1)
            x = xs[i] * (xs[i + 1] / xs[i]) ** t
            return x, below[i] * (below[i + 1] / below[i]) ** t
    return None


def mesh_sweep(
    series: Mapping[str, Sequence[Plan]] | Sequence[Plan],
    *,
    hbm: bool = True,
    legend: bool = True,
    title: str | None = None,
    ax: Axes | None = None,
) -> Axes:
    """Per-chip compute (solid), communication (dashed) and HBM (dotted) time against the
    number of chips: one series of plans (one per mesh) per entry, with a star where
    communication first overtakes compute (on the log-log lines between the meshes)."""
    named = series if isinstance(series, Mapping) else {"": list(series)}
    if ax is None:
        ax = new_axes(10.0, 5.2)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    for index, (name, plans) in enumerate(named.items()):
        ordered = sorted(plans, key=lambda p: p.mesh.num_devices)
        xs = [float(p.mesh.num_devices) for p in ordered]
        compute = [p.cost.compute_s for p in ordered]
        comm = [p.cost.comm_s for p in ordered]
        color = PALETTE[index % len(PALETTE)]
        crossing = log_crossing(xs, compute, comm)
        label = name or ordered[0].strategy
        if crossing is not None:  # the number goes in the legend: lines cross in a crowd
            label += f": comm > compute from {crossing[0]:,.0f} chips"
            ax.plot([crossing[0]], [crossing[1]], color=color, gid=f"crossover:{index}", **STAR)
        ax.plot([], [], color=color, lw=2, label=label)
        style: dict[str, Any] = {"ms": 4, "color": color, "lw": 2}
        ax.plot(xs, compute, "-o", gid=f"mesh:{index}:compute", **style)
        comm_or_nan = [c if c > 0 else math.nan for c in comm]
        ax.plot(xs, comm_or_nan, "--o", gid=f"mesh:{index}:comm", **style)
        if hbm:
            hbm_s = [p.cost.hbm_s for p in ordered]
            ax.plot(xs, hbm_s, ":", color=color, lw=1.3, gid=f"mesh:{index}:hbm")
    ax.set_xlabel("chips in the mesh")
    ax.set_ylabel("time per chip")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    log_ticks(ax, "y", seconds_text)
    ax.grid(True, which="major", alpha=0.3)
    ax.set_title(title or "Compute vs communication as the mesh grows", fontsize=10)
    if legend:
        ax.legend(handles=_sweep_handles(ax, hbm), **OUTSIDE)
    return ax
