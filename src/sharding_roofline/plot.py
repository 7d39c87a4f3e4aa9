"""Figures (matplotlib): rooflines, crossover sweeps, strategy breakdowns, collective sweeps.

Every drawing function takes an optional ``ax`` and returns the Axes it drew on. Without one
it makes a fresh ``InlineFigure``: a plain ``matplotlib.figure.Figure`` (no pyplot state)
that Jupyter shows inline when it is a cell's value (``roofline(...).figure``). ``save_*``
helpers draw on a fresh figure and write a PNG. Each line carries a ``gid``
(``"roof:compute"``, ``"sweep:0:comm"``, ...), so tests and users can read the plotted numbers
back from the Axes.

Roofline units. The HBM roof is the chip's: ``FLOPs/s = min(C, I·W_hbm)``, ``I`` in FLOPs per
byte of HBM traffic, so its ridge is the critical intensity ``C/W_hbm`` (240 on v5e). A link
roof is the same line with ``W`` the link's rate in the book's collective units: bytes of the
whole array ``V`` that an AllGather over that axis moves per second. For a wrapped TPU axis
that is the book's bidirectional ``W_ici``, so the ridge is the book's ``C/W_ici`` (2550 on
v5p). A strategy is drawn twice at its attained FLOPs/s (``FLOPs / time``): filled at its
FLOPs per HBM byte, hollow at its FLOPs per byte of collective traffic, counted as
AllGather-equivalent bytes of each link (an AllReduce counts ``2V``). A communication-bound
strategy whose collectives share one link therefore sits on that link's roof.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from .collectives import Collective, CollectiveCost, collective_cost, rate
from .crossover import comm_and_compute_s, crossover, default_dimension
from .dtypes import dtype_bytes
from .einsum import Einsum
from .errors import PlanError, SpecError
from .estimate import Bottleneck, Overlap
from .hardware import ChipSpec, HardwareKind, HardwareSpec
from .mesh import DeviceMesh
from .planner import Plan, Ranking, plan
from .presets import load_preset
from .report import collectives_summary
from .units import format_count, format_rate, format_seconds

_COLORS = {"compute": "#4c72b0", "HBM": "#8c8c8c"}
_COMM_COLORS = ("#dd8452", "#c44e52", "#937860", "#da8bc3", "#ccb974", "#64b5cd", "#8172b3")
_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b")
_LINK_COLORS = ("#d62728", "#ff7f0e", "#9467bd", "#17becf", "#8c564b", "#e377c2", "#bcbd22")
_ARRAY = {"lhs": "A", "rhs": "B", "out": "C"}
_LINK_NAMES = {"dcn": "DCN", "infiniband": "InfiniBand"}
_OUTSIDE: dict[str, Any] = {
    "loc": "upper left",
    "bbox_to_anchor": (1.01, 1.0),
    "fontsize": 8,
    "frameon": False,
}
_STAR: dict[str, Any] = {"marker": "*", "ms": 15, "mec": "black", "mew": 0.8, "zorder": 6, "ls": ""}

Plans = Plan | Ranking | Sequence[Plan]


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


def save_figure(obj: Axes | Figure, path: str | Path, *, dpi: int = 120) -> Path:
    """Write the figure holding ``obj`` to ``path`` (format from the suffix); returns it."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure_of(obj).savefig(out, dpi=dpi, bbox_inches="tight")
    return out


# -- axes formatting ---------------------------------------------------------------------------


def _log_ticks(ax: Axes, which: str, label: Any) -> None:
    """Human tick labels on a log axis; 1-2-5 ticks when it spans under three decades."""
    axis = ax.yaxis if which == "y" else ax.xaxis
    lo, hi = ax.get_ylim() if which == "y" else ax.get_xlim()
    if lo > 0 and hi / lo < 1e3:
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: label(v)))
    axis.set_minor_formatter(NullFormatter())


def _count(value: float) -> str:
    return format_count(value, 3).replace(" ", "") if value >= 1 else f"{value:g}"


def _seconds(value: float) -> str:
    return format_seconds(value, 3)


def _plans(plans: Plans) -> list[Plan]:
    if isinstance(plans, Plan):
        return [plans]
    if isinstance(plans, Ranking):
        return list(plans.strategies)
    return list(plans)


def plan_label(plan: Plan) -> str:
    """``A[B_x, D] · B[D_x, F] -> C[B_x, F]: AG_x(B)``: the stored layouts and the
    collectives (two plans of the same layouts can move different arrays)."""
    return f"{plan.strategy}: {collectives_summary(plan)}"


def pick(plans: Plans, collectives: str) -> Plan:
    """The first plan whose collectives read ``collectives`` (``report.collectives_summary``:
    ``"AG_x(B)"``, ``"RS_x(C)"``, ``"none"``), e.g. the book's all-gather-the-weights
    strategy out of ``plan(einsum, mesh, lhs=..., rhs=..., out=..., top=None)``."""
    items = _plans(plans)
    for item in items:
        if collectives_summary(item) == collectives:
            return item
    found = sorted({collectives_summary(item) for item in items})
    raise PlanError(
        f"none of these {len(items)} plans moves {collectives!r}; they move {found}. Spell the "
        "collectives as report.collectives_summary does (e.g. 'AG_x(B)'), and rank every "
        "strategy with plan(..., top=None)"
    )


# -- roofline ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Roof:
    """A bandwidth roof: attainable FLOPs/s ``= min(peak, intensity × bytes_per_s)``."""

    label: str
    kind: str  # "hbm", or the link tier: "ici", "nvlink", "leaf", "dcn", ...
    bytes_per_s: float
    peak_flops_per_s: float

    @property
    def ridge_flops_per_byte(self) -> float:
        """Where the slope meets the compute roof: ``C / W``."""
        return self.peak_flops_per_s / self.bytes_per_s

    def attainable_flops_per_s(self, intensity_flops_per_byte: float) -> float:
        return min(self.peak_flops_per_s, intensity_flops_per_byte * self.bytes_per_s)


def hbm_roof(chip: ChipSpec, dtype: str = "bfloat16") -> Roof:
    """The chip's own roof; its ridge is ``chip.critical_intensity_flops_per_byte(dtype)``."""
    return Roof(
        label=f"HBM {format_rate(chip.hbm_bytes_per_s, digits=3)}",
        kind="hbm",
        bytes_per_s=chip.hbm_bytes_per_s,
        peak_flops_per_s=chip.peak_flops_per_s_for(dtype),
    )


def group_bytes_per_s(mesh: DeviceMesh, axes: Sequence[str]) -> float:
    """A collective's rate over ``axes`` in the book's units: bytes of the whole array ``V``
    an AllGather moves per second (bandwidth term). A wrapped TPU axis gives ``W_ici``
    (bidirectional); a line of ``X`` chips ``W_uni·X/(X-1)``; an 8-GPU node ``450 GB/s·8/7``."""
    seconds_per_byte = rate(mesh, Collective.ALL_GATHER, mesh.ordered(axes)).s_per_byte
    return 1.0 / seconds_per_byte if seconds_per_byte else math.inf


def _group_text(mesh: DeviceMesh, axes: Sequence[str]) -> str:
    """``x (ici ring of 4)``, ``node+gpu (nvlink across 8, leaf across 4, 8 chips each)``."""
    group = mesh.group(axes)
    parts: list[str] = []
    for span in group.spans:
        if span.tier.is_torus:
            rings = [f"{'ring' if seg.wraps else 'line'} of {seg.size}" for seg in span.segments]
            parts.append(f"{span.tier.name} {' × '.join(rings)}")
        else:
            per = f", {span.chips_per_child} chips each" if span.chips_per_child > 1 else ""
            parts.append(f"{span.tier.name} across {span.num_children}{per}")
    return f"{'+'.join(group.axes)} ({', '.join(parts)})"


def link_roofs(
    source: HardwareSpec | DeviceMesh, dtype: str = "bfloat16", *, groups: Sequence[Any] = ()
) -> tuple[Roof, ...]:
    """Communication roofs, fastest first; roofs of equal bandwidth are merged into one.

    On a mesh: one per mesh axis of size > 1 and one per axis group in ``groups`` (for
    collectives over several axes), at ``group_bytes_per_s``. On bare hardware, its nominal
    links in the book's units: TPU ICI on an axis with wraparound (``2·W_uni``) and without
    (``W_uni``), DCN per chip; GPU NVLink per GPU and each scale-out level per node (GPUs per
    node × the per-GPU rate: 400 GB/s on H100, ridge ``C/W ≈ 2472``).
    """
    found: list[tuple[str, str, float]] = []
    if isinstance(source, DeviceMesh):
        chip = source.hardware.chip
        wanted: list[tuple[str, ...]] = [(a.name,) for a in source.axes if a.size > 1]
        wanted += [source.ordered(group) for group in groups]
        for axes in dict.fromkeys(wanted):
            if source.group(axes).size > 1:
                link = rate(source, Collective.ALL_GATHER, axes).link
                found.append((_group_text(source, axes), link, group_bytes_per_s(source, axes)))
    else:
        chip = source.chip
        if source.ici is not None:
            bidi, uni = (
                source.ici.link_bytes_per_s_bidirectional,
                source.ici.link_bytes_per_s_per_direction,
            )
            found.append(("ICI axis with wraparound", "ici", bidi))
            found.append(("ICI axis without wraparound", "ici", uni))
        per_node = 1
        if source.nvlink is not None:
            per_node = source.nvlink.gpus_per_domain
            found.append(
                ("NVLink per GPU", "nvlink", source.nvlink.bytes_per_s_per_gpu_per_direction)
            )
        where = "per node" if source.kind is HardwareKind.GPU else "per chip"
        for level in source.scale_out:
            bandwidth = per_node * level.bytes_per_s_per_chip_per_direction
            link = _LINK_NAMES.get(level.link.value, level.link.value)
            name = link if level.name == level.link.value else f"{link} {level.name}"
            found.append((f"{name} {where}", level.name, bandwidth))
    peak = chip.peak_flops_per_s_for(dtype)
    merged: dict[float, tuple[str, str]] = {}
    for label, kind, bandwidth in sorted(found, key=lambda item: -item[2]):
        same = next((bw for bw in merged if math.isclose(bw, bandwidth, rel_tol=1e-9)), None)
        if same is None:
            merged[bandwidth] = (label, kind)
        else:
            merged[same] = (f"{merged[same][0]}; {label}", merged[same][1])
    return tuple(
        Roof(
            label=f"{label}: {format_rate(bw, digits=3)}",
            kind=kind,
            bytes_per_s=bw,
            peak_flops_per_s=peak,
        )
        for bw, (label, kind) in merged.items()
        if math.isfinite(bw)
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class StrategyPoint:
    """Where one strategy sits on the roofline (per chip)."""

    attained_flops_per_s: float  # FLOPs / estimated time
    hbm_intensity_flops_per_byte: float  # FLOPs per byte of HBM traffic
    comm_intensity_flops_per_byte: float | None  # FLOPs per AllGather-equivalent byte


def strategy_point(plan: Plan, overlap: Overlap = Overlap.FULL) -> StrategyPoint:
    """The roofline coordinates of ``plan`` (units in the module docstring)."""
    cost = plan.cost
    seconds = cost.time_s(overlap)
    moved = sum(
        step.cost.bandwidth_s * group_bytes_per_s(plan.mesh, step.cost.axes)
        for step in plan.collectives
        if step.cost is not None and step.cost.bandwidth_s > 0
    )
    return StrategyPoint(
        attained_flops_per_s=cost.flops / seconds if seconds else math.inf,
        hbm_intensity_flops_per_byte=cost.arithmetic_intensity_flops_per_byte,
        comm_intensity_flops_per_byte=cost.flops / moved if moved else None,
    )


def _hardware(source: HardwareSpec | ChipSpec | DeviceMesh | str) -> HardwareSpec | ChipSpec:
    if isinstance(source, str):
        return load_preset(source)
    if isinstance(source, DeviceMesh):
        return source.hardware
    return source


def roofline(
    hardware: HardwareSpec | ChipSpec | str | None = None,
    *,
    plans: Plans = (),
    mesh: DeviceMesh | None = None,
    dtype: str | None = None,
    labels: Sequence[str] | None = None,
    overlap: Overlap = Overlap.FULL,
    links: bool = True,
    intensity_range: tuple[float, float] | None = None,
    legend_inside: bool = False,
    ax: Axes | None = None,
) -> Axes:
    """Attainable FLOPs/s per chip against arithmetic intensity (log-log).

    Draws the flat compute roof at the peak for ``dtype``, the HBM slope (ridge at the
    critical intensity) and, with ``links``, a dashed roof per link (``link_roofs`` of
    ``mesh``, else the hardware's nominal links). Each plan is a numbered pair of points
    (filled: FLOPs per HBM byte; hollow: FLOPs per byte of collective traffic) at its
    attained FLOPs/s under ``overlap``. ``hardware`` defaults to the mesh's, the mesh to the
    first plan's, ``dtype`` to the first plan's. ``legend_inside`` puts the legend in the
    empty lower right (for panels) instead of to the right of the Axes.
    """
    items = _plans(plans)
    mesh = mesh or (items[0].mesh if items else None)
    source = hardware if hardware is not None else mesh
    if source is None:
        raise SpecError(
            "roofline has nothing to draw: pass hardware (a preset name, HardwareSpec or "
            "ChipSpec), a mesh, or plans"
        )
    spec = _hardware(source)
    chip = spec if isinstance(spec, ChipSpec) else spec.chip
    dtype = dtype or (items[0].einsum.dtype if items else "bfloat16")
    peak = chip.peak_flops_per_s_for(dtype)
    hbm = hbm_roof(chip, dtype)
    roofs: tuple[Roof, ...] = ()
    if links and mesh is not None:
        groups = [s.cost.axes for p in items for s in p.collectives if s.cost is not None]
        roofs = link_roofs(mesh, dtype, groups=groups)
    elif links and isinstance(spec, HardwareSpec):
        roofs = link_roofs(spec, dtype)
    points = [strategy_point(p, overlap) for p in items]
    names = list(labels) if labels is not None else _labels(items)

    xs = [hbm.ridge_flops_per_byte, *(r.ridge_flops_per_byte for r in roofs)]
    xs += [p.hbm_intensity_flops_per_byte for p in points]
    xs += [p.comm_intensity_flops_per_byte or 1.0 for p in points]
    finite = [x for x in xs if math.isfinite(x) and x > 0]
    lo, hi = intensity_range or (
        min(0.1, 10 ** math.floor(math.log10(min(finite) / 2))),
        10 ** math.ceil(math.log10(max(finite) * 4)),
    )
    if ax is None:
        ax = new_axes(11.0, 5.6)
    ax.set(xscale="log", yscale="log")
    ridge = hbm.ridge_flops_per_byte
    ax.plot(
        [lo, hi],
        [peak, peak],
        color="black",
        lw=2.2,
        gid="roof:compute",
        label=f"compute roof: {format_rate(peak, 'FLOP', 3)} ({dtype})",
    )
    ax.plot(
        [lo, ridge, hi],
        [lo * hbm.bytes_per_s, peak, peak],
        color="#555555",
        lw=2.2,
        gid="roof:hbm",
        label=f"{hbm.label}: ridge {ridge:,.0f} FLOPs/B",
    )
    ax.plot([ridge], [peak], "o", color="#555555", ms=5, gid="ridge:hbm")
    for index, roof in enumerate(roofs):
        x_ridge = roof.ridge_flops_per_byte
        color = _LINK_COLORS[index % len(_LINK_COLORS)]
        ax.plot(
            [lo, x_ridge],
            [lo * roof.bytes_per_s, peak],
            "--",
            lw=1.6,
            color=color,
            gid=f"roof:link:{index}",
            label=f"{roof.label}: ridge {x_ridge:,.0f} FLOPs/B",
        )
        ax.plot([x_ridge], [peak], "o", color=color, ms=5, gid=f"ridge:link:{index}")

    for index, (point, name) in enumerate(zip(points, names, strict=True)):
        # the rank is written inside each marker; colours match the legend
        color = _PALETTE[index % len(_PALETTE)]
        y, x_comm = point.attained_flops_per_s, point.comm_intensity_flops_per_byte
        x_hbm = point.hbm_intensity_flops_per_byte
        marker: dict[str, Any] = {"marker": "o", "ms": 14, "ls": "", "zorder": 5 + index / 100}
        ax.plot(
            [x_hbm],
            [y],
            color=color,
            mec="black",
            mew=0.6,
            gid=f"strategy:{index}:hbm",
            label=f"#{index + 1} {name}",
            **marker,
        )
        _rank(ax, x_hbm, y, index, "white")
        if x_comm is not None:
            ax.plot(
                [x_comm],
                [y],
                color=color,
                mfc="white",
                mew=2,
                gid=f"strategy:{index}:comm",
                **marker,
            )
            _rank(ax, x_comm, y, index, color)
            ax.plot([x_hbm, x_comm], [y, y], ":", color=color, lw=1, zorder=4)
    if points:
        ax.plot(
            [],
            [],
            "o",
            ms=9,
            color="gray",
            mec="black",
            mew=0.6,
            label="filled: FLOPs per HBM byte",
        )
        ax.plot(
            [],
            [],
            "o",
            ms=9,
            color="gray",
            mfc="white",
            mew=2,
            label="hollow: FLOPs per byte of collective traffic",
        )
    rates = [hbm.bytes_per_s, *(r.bytes_per_s for r in roofs)]
    bottom = min([lo * min(rates), *(p.attained_flops_per_s for p in points)])
    ax.set(xlim=(lo, hi), ylim=(bottom / 2, peak * 3))
    ax.set_xlabel("arithmetic intensity (FLOPs per byte moved over HBM, or over a link)")
    ax.set_ylabel("attainable FLOPs/s per chip")
    _log_ticks(ax, "x", _count)
    _log_ticks(ax, "y", lambda v: format_rate(v, "FLOP", 3))
    ax.grid(True, which="major", alpha=0.3)
    where = ""
    if mesh is not None:
        where = f" on {mesh.spec_text} ({mesh.topology.shape_text})"
        where = where if mesh.num_devices > 1 else " (one chip)"
    ax.set_title(f"Roofline of {chip.name}{where}", fontsize=10)
    # the lower right of a roofline is empty: room for the legend in a panel
    ax.legend(**({"loc": "lower right", "fontsize": 7} if legend_inside else _OUTSIDE))
    return ax


def _rank(ax: Axes, x: float, y: float, index: int, color: str) -> None:
    ax.annotate(
        str(index + 1),
        (x, y),
        ha="center",
        va="center",
        fontsize=7,
        color=color,
        fontweight="bold",
        zorder=6 + 0.01 * index,
    )


def _labels(items: Sequence[Plan]) -> list[str]:
    """Strategy notation, with the collectives where two plans share the notation."""
    strategies = [p.strategy for p in items]
    if len(set(strategies)) == len(strategies):
        return strategies
    return [plan_label(p) for p in items]


def save_roofline(path: str | Path, hardware: Any = None, **kwargs: Any) -> Path:
    """``roofline(hardware, **kwargs)`` written to ``path``."""
    return save_figure(roofline(hardware, **kwargs), path)


# -- crossover: compute against communication as one dimension grows ---------------------------


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


def _geomspace(lo: float, hi: float, num: int) -> list[float]:
    step = (math.log(hi) - math.log(lo)) / (num - 1)
    return [math.exp(math.log(lo) + i * step) for i in range(num)]


def _default_sizes(plans: Sequence[Plan], letter: str) -> list[float]:
    """Decades around the crossovers (or, with none, around the current sizes)."""
    centers = [c.size for c in (crossover(p, letter) for p in plans) if c.size is not None]
    centers = centers or [float(p.einsum.size(letter)) for p in plans]
    lo = 10 ** math.floor(math.log10(min(centers) / 30))
    hi = 10 ** math.ceil(math.log10(max(centers) * 30))
    return _geomspace(max(lo, 1.0), hi, 241)


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
    star where communication and compute meet (``crossover``); one strategy's
    communication-bound side is shaded. Each plan keeps its shardings; one letter grows."""
    items = _plans(plans)
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
        color = _PALETTE[index % len(_PALETTE)]
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
        ax.plot([found.size], [y], color=color, gid=f"crossover:{index}", **_STAR)
        if not any(math.isclose(found.size, m, rel_tol=1e-3) for m in marked):
            ax.annotate(
                f"{letter.upper()} = {found.size:,.0f}",
                (found.size, y),
                fontsize=8,
                xytext=(9, -14 - 11 * (len(marked) % 3)),
                textcoords="offset points",
                color=color,
                fontweight="bold",
            )
            marked.append(found.size)
        if len(items) == 1 and found.size > grid[0]:
            ax.axvspan(
                grid[0], found.size, color="#c44e52", alpha=0.07, lw=0, label="communication-bound"
            )
    ax.set_xlim(grid[0], grid[-1])
    ax.set_xlabel(f"global size of {letter.upper()} (einsum letter {letter!r})")
    ax.set_ylabel("time per chip")
    _log_ticks(ax, "x", _count)
    _log_ticks(ax, "y", _seconds)
    ax.grid(True, which="major", alpha=0.3)
    mesh = items[0].mesh
    ax.set_title(
        title
        or f"Compute vs communication on {mesh.hardware.chip.name} "
        f"({mesh.spec_text}, {mesh.topology.shape_text})",
        fontsize=10,
    )
    if legend:
        ax.legend(handles=_sweep_handles(ax, hbm), **_OUTSIDE)
    return ax


def _sweep_handles(ax: Axes, hbm: bool) -> list[Any]:
    handles: list[Any] = list(ax.get_legend_handles_labels()[0])
    handles.append(Line2D([], [], color="black", ls="-", lw=2, label="compute"))
    handles.append(Line2D([], [], color="black", ls="--", lw=2, label="communication"))
    if hbm:
        handles.append(Line2D([], [], color="black", ls=":", lw=1.3, label="HBM"))
    star: dict[str, Any] = {**_STAR, "color": "white"}
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
        every = [item for plans in panels.values() for item in _plans(plans)]
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


def save_crossover_sweep(path: str | Path, plans: Plans, **kwargs: Any) -> Path:
    """``crossover_sweep(plans, **kwargs)`` written to ``path``."""
    return save_figure(crossover_sweep(plans, **kwargs), path)


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
        color = _PALETTE[index % len(_PALETTE)]
        crossing = log_crossing(xs, compute, comm)
        label = name or ordered[0].strategy
        if crossing is not None:  # the number goes in the legend: lines cross in a crowd
            label += f": comm > compute from {crossing[0]:,.0f} chips"
            ax.plot([crossing[0]], [crossing[1]], color=color, gid=f"crossover:{index}", **_STAR)
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
    _log_ticks(ax, "y", _seconds)
    ax.grid(True, which="major", alpha=0.3)
    ax.set_title(title or "Compute vs communication as the mesh grows", fontsize=10)
    if legend:
        ax.legend(handles=_sweep_handles(ax, hbm), **_OUTSIDE)
    return ax


# -- collectives against message size ----------------------------------------------------------


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
    volumes = list(array_bytes) if array_bytes is not None else _geomspace(1e3, 1e10, 141)
    if ax is None:
        ax = new_axes(10.0, 5.2)
    ax.set(xscale="log", yscale="log")
    for index, case in enumerate(cases):
        color = _PALETTE[index % len(_PALETTE)]
        costs = collective_curve(case, volumes, dtype)
        xs = [c.group_bytes for c in costs]
        ax.plot(
            xs,
            [c.time_s for c in costs],
            "-",
            lw=2.2,
            color=color,
            gid=f"collective:{index}:total",
            label=case.label,
        )
        if not terms:
            continue
        ax.plot(
            xs,
            [c.latency_s for c in costs],
            ":",
            lw=1.2,
            color=color,
            gid=f"collective:{index}:latency",
        )
        ax.plot(
            xs,
            [c.bandwidth_s for c in costs],
            "--",
            lw=1.0,
            color=color,
            alpha=0.8,
            gid=f"collective:{index}:bandwidth",
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
    _log_ticks(ax, "x", lambda v: _count(v) + "B")
    _log_ticks(ax, "y", _seconds)
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
    ax.legend(handles=handles, **_OUTSIDE)
    return ax


def save_collective_sweep(path: str | Path, cases: Sequence[CollectiveCase], **kw: Any) -> Path:
    """``collective_sweep(cases, **kw)`` written to ``path``."""
    return save_figure(collective_sweep(cases, **kw), path)


# -- strategy breakdown ------------------------------------------------------------------------


def _time_unit(seconds: float) -> tuple[float, str]:
    for factor, unit in ((1.0, "s"), (1e-3, "ms"), (1e-6, "us")):
        if seconds >= factor:
            return factor, unit
    return 1e-9, "ns"


def breakdown(plans: Plans, ax: Axes | None = None, *, overlap: Overlap = Overlap.FULL) -> Axes:
    """Stacked horizontal bars per strategy, best first: compute, HBM, then each
    collective's time, so a bar is the no-overlap time (the upper bound). The bottleneck's
    segments are hatched and outlined; a black tick marks the estimate under ``overlap``,
    written after the bar with the bottleneck's name."""
    items = _plans(plans)
    if ax is None:
        ax = new_axes(11.0, 1.6 + 0.5 * len(items))
    longest = max((p.cost.upper_bound_s for p in items), default=1.0) or 1.0
    factor, unit = _time_unit(longest)
    comm_colors: dict[str, str] = {}
    for row, item in enumerate(items):
        cost = item.cost
        segments = [
            ("compute", cost.compute_s, _COLORS["compute"], Bottleneck.COMPUTE),
            ("HBM", cost.hbm_s, _COLORS["HBM"], Bottleneck.HBM),
        ]
        for step in item.collectives:
            if step.cost is not None:
                key = f"{step.cost.kind.book_name} over {'+'.join(step.cost.axes)}"
                color = _COMM_COLORS[len(comm_colors) % len(_COMM_COLORS)]
                color = comm_colors.setdefault(key, color)
                name = f"{key} ({_ARRAY[step.operand]})"  # one bar segment per array moved
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
    labels = [f"#{row + 1}  {name}" for row, name in enumerate(_labels(items))]
    ax.set_yticks(range(len(items)), labels, fontsize=8)
    ax.set_ylim(len(items) - 0.5, -0.5)
    ax.set_xlim(0, longest / factor * 1.5)
    ax.set_xlabel(f"time per chip ({unit}); bar = compute + HBM + collectives (no overlap)")
    ax.set_title(f"Strategy breakdown ({overlap.value}-overlap estimate at |)", fontsize=10)
    colors = {**_COLORS, **comm_colors}
    handles: list[Any] = [Patch(facecolor=c, label=n) for n, c in colors.items()]
    handles.append(Patch(facecolor="white", edgecolor="black", hatch="///", label="bottleneck"))
    handles.append(
        Line2D(
            [],
            [],
            ls="",
            marker="|",
            ms=12,
            mew=2,
            color="black",
            label=f"estimate ({overlap.value} overlap)",
        )
    )
    ax.legend(handles=handles, **_OUTSIDE)
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    return ax


def save_breakdown(plans: Plans, path: str | Path, *, overlap: Overlap = Overlap.FULL) -> Path:
    """``breakdown(plans)`` written to ``path`` (the CLI's ``--plot``)."""
    return save_figure(breakdown(plans, overlap=overlap), path)


# -- the demo's figures ------------------------------------------------------------------------

#: The chips of ``chip_comparison``: title -> (preset, topology of 8 chips).
COMPARED_CHIPS: dict[str, tuple[str, str]] = {
    "TPU v5e (2x4, no wraparound)": ("tpu-v5e", "2x4"),
    "TPU v5p (2x2x2, no wraparound)": ("tpu-v5p", "2x2x2"),
    "H100 (one 8-GPU node)": ("h100", "1x8"),
    "B200 (one 8-GPU node)": ("b200", "1x8"),
}


def chip_comparison(
    chips: Mapping[str, tuple[str, str]] = COMPARED_CHIPS, *, einsum: Einsum | None = None
) -> InlineFigure:
    """``crossover_panels`` over the batch of the book's FSDP strategy (batch and weights
    sharded over ``x``; the weights all-gathered: ``AG_x(B)``) of ``einsum`` (default
    ``bd,df->bf``, D=8192, F=32768) on 8 chips of each of ``chips``."""
    einsum = einsum or Einsum.create("bd,df->bf", "b=65536,d=8192,f=32768")
    panels: dict[str, Plans] = {}
    for title, (preset, topology) in chips.items():
        mesh = DeviceMesh.create(load_preset(preset), "x=8", topology)
        ranking = plan(einsum, mesh, lhs="x,None", rhs="x,None", out="x,None", top=None)
        panels[title] = [pick(ranking, "AG_x(B)")]
    return crossover_panels(panels, labels=["FSDP: AllGather the weights, AG_x(B)"])


def _distinct_talkers(plans: Sequence[Plan], most: int = 3) -> list[Plan]:
    """The best plans that communicate, one per distinct (collectives, times)."""
    seen: dict[tuple[Any, ...], Plan] = {}
    for item in plans:
        cost = item.cost
        if cost.comm_s > 0:
            key = (collectives_summary(item), cost.compute_s, cost.hbm_s, cost.comm_s)
            seen.setdefault(key, item)
    return list(seen.values())[:most]


def _telling(plans: Sequence[Plan]) -> str:
    """The batch if some plan crosses over along it, else the first letter that does."""
    letters = [default_dimension(plans[0])]
    letters += [c for c in plans[0].einsum.spec.letters if c != letters[0]]
    for letter in letters:
        if any(crossover(p, letter).size is not None for p in plans):
            return letter
    return letters[0]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "plan"


def save_demo_figures(
    rankings: Mapping[str, Ranking] | Sequence[Ranking], out_dir: str | Path
) -> list[Path]:
    """The figures of ``make run``: per ranking its breakdown, roofline (top 5) and the
    crossover of its best strategies that communicate; AllGather time over every mesh
    axis of the rankings; and ``chip_comparison``. Returns the PNG paths written."""
    out = Path(out_dir)
    if isinstance(rankings, Mapping):
        named = dict(rankings)
    else:
        named = {f"{r.mesh.hardware.name} {r.mesh.spec_text}": r for r in rankings}
    written: list[Path] = []
    cases: dict[tuple[str, float, float], CollectiveCase] = {}  # equal links: one line
    for name, ranking in named.items():
        slug = _slug(name)
        written.append(save_breakdown(ranking, out / f"{slug}_breakdown.png"))
        top = list(ranking.strategies[:5])
        written.append(save_roofline(out / f"{slug}_roofline.png", plans=top))
        talking = _distinct_talkers(ranking.strategies)
        if talking:
            path = out / f"{slug}_crossover.png"
            written.append(save_crossover_sweep(path, talking, dimension=_telling(talking)))
        mesh = ranking.mesh
        for axis in (a.name for a in mesh.axes if a.size > 1):
            link = rate(mesh, Collective.ALL_GATHER, (axis,))
            key = (mesh.hardware.name, link.s_per_byte, link.latency_s)
            text = _group_text(mesh, (axis,))
            if key in cases:
                old = cases[key]
                label = f"{old.label.partition(' (')[0]}, {text}"
                cases[key] = CollectiveCase(label=label, mesh=old.mesh, axes=old.axes)
            else:
                label = f"{mesh.hardware.chip.name}: {text}"
                cases[key] = CollectiveCase(label=label, mesh=mesh, axes=(axis,))
    if cases:
        written.append(save_collective_sweep(out / "collectives.png", list(cases.values())))
    written.append(save_figure(chip_comparison(), out / "chips_crossover.png"))
    return written
