"""Collectives on their own: time against array size, latency term against bandwidth term."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.lines import Line2D

from ..collectives import Collective, CollectiveCost, collective_cost
from ..dtypes import dtype_bytes
from ..mesh import DeviceMesh
from ._figure import (
    OUTSIDE,
    PALETTE,
    count_text,
    geomspace,
    log_ticks,
    new_axes,
    save_figure,
    seconds_text,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class CollectiveCase:
    """One line of ``collective_sweep``: ``kind`` over ``axes`` of ``mesh``."""

    label: str
    mesh: DeviceMesh
    axes: tuple[str, ...]
    kind: Collective = Collective.ALL_GATHER


def collective_curve(
    case: CollectiveCase, array_bytes: Sequence[float], dtype: str = "bfloat16"
) -> list[CollectiveCost]:
    """``collective_cost`` of ``case`` at each array size ``V`` (the book's: the gathered
    array, the unreduced one, or every chip's buffer for an AllToAll), rounded to whole
    elements per chip (to a multiple of the group for a ReduceScatter)."""
    itemsize = dtype_bytes(dtype)
    size = case.mesh.group(case.axes).size
    out: list[CollectiveCost] = []
    for volume in array_bytes:
        if case.kind in (Collective.ALL_GATHER, Collective.ALL_TO_ALL):
            elements = max(1, round(volume / itemsize / size))
        elif case.kind is Collective.REDUCE_SCATTER:
            elements = max(size, round(volume / itemsize / size) * size)
        else:
            elements = max(1, round(volume / itemsize))
        cost = collective_cost(
            case.mesh, case.kind, case.axes, elements_in_per_chip=elements, dtype=dtype
        )
        out.append(cost)
    return out


def collective_sweep(
    cases: Sequence[CollectiveCase],
    *,
    array_bytes: Sequence[float] | None = None,
    dtype: str = "bfloat16",
    terms: bool = True,
    title: str | None = None,
    ax: Axes | None = None,
) -> Axes:
    """Collective time against array size ``V`` (log-log), one solid line per case, and with
    ``terms`` its latency term (dotted) and bandwidth term (thin dashed), with a dot where
    they meet: latency-bound to its left, bandwidth-bound to its right."""
    volumes = list(array_bytes) if array_bytes is not None else geomspace(1e3, 1e10, 141)
    if ax is None:
        ax = new_axes(10.0, 5.2)
    ax.set(xscale="log", yscale="log")
    for index, case in enumerate(cases):
        color = PALETTE[index % len(PALETTE)]
        costs = collective_curve(case, volumes, dtype)
        xs = [c.group_bytes for c in costs]
        total = [c.time_s for c in costs]
        ax.plot(
            xs, total, "-", lw=2.2, color=color, gid=f"collective:{index}:total", label=case.label
        )
        if not terms:
            continue
        latency = [c.latency_s for c in costs]
        ax.plot(xs, latency, ":", lw=1.2, color=color, gid=f"collective:{index}:latency")
        bandwidth = [c.bandwidth_s for c in costs]
        ax.plot(
            xs, bandwidth, "--", lw=1.0, color=color, alpha=0.8, gid=f"collective:{index}:bandwidth"
        )
        big = costs[-1]
        if big.bandwidth_s > 0 and big.latency_s > 0:
            knee = big.latency_s * big.group_bytes / big.bandwidth_s
            ax.plot(
                [knee],
                [big.latency_s],
                "o",
                ms=7,
                color=color,
                mec="black",
                zorder=6,
                gid=f"collective:{index}:knee",
            )
    ax.set_xlim(min(volumes), max(volumes))
    ax.set_xlabel("array size V (bytes of the gathered, or unreduced, array)")
    ax.set_ylabel("collective time")
    log_ticks(ax, "x", lambda v: count_text(v) + "B")
    log_ticks(ax, "y", seconds_text)
    ax.grid(True, which="major", alpha=0.3)
    kinds = " / ".join(sorted({case.kind.book_name for case in cases}))
    ax.set_title(title or f"{kinds} time against array size ({dtype})", fontsize=10)
    handles: list[Any] = list(ax.get_legend_handles_labels()[0])
    if terms:
        handles += [
            Line2D(
                [], [], color="black", ls=":", lw=1.2, label="latency term (hops × hop latency)"
            ),
            Line2D([], [], color="black", ls="--", lw=1.0, label="bandwidth term (V / W)"),
            Line2D(
                [], [], ls="", marker="o", color="white", mec="black", label="latency = bandwidth"
            ),
        ]
    ax.legend(handles=handles, **OUTSIDE)
    return ax


def save_collective_sweep(
    path: str | Path, cases: Sequence[CollectiveCase], *, force: bool = False, **kw: Any
) -> Path:
    """``collective_sweep(cases, **kw)`` written to ``path`` (``save_figure``'s rules)."""
    return save_figure(collective_sweep(cases, **kw), path, force=force)
