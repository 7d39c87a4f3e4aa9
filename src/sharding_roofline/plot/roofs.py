"""The roofline: attainable FLOPs/s against arithmetic intensity, with the HBM roof, a roof
per link, and strategies placed on them (units in the package docstring)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes

from ..collectives import Collective, rate
from ..errors import SpecError
from ..estimate import Overlap
from ..hardware import ChipSpec, HardwareKind, HardwareSpec, IciSpec, Wraparound
from ..mesh import DeviceMesh
from ..plans import Plan
from ..presets import load_preset
from ..units import format_rate
from ._figure import (
    LINK_COLORS,
    OUTSIDE,
    PALETTE,
    Plans,
    as_plans,
    count_text,
    log_ticks,
    merge_symmetric,
    new_axes,
    problem_text,
    save_figure,
    strategy_labels,
    symmetric_suffix,
)

_LINK_NAMES = {"dcn": "DCN", "infiniband": "InfiniBand"}


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


def group_text(mesh: DeviceMesh, axes: Sequence[str]) -> str:
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


def _wraps_when(ici: IciSpec) -> str:
    """When a slice of this chip has wraparound (tpus.md), for a bare-hardware roof label."""
    if ici.wraparound is Wraparound.FULL_CUBES:
        edge = ici.cube_edge
        return f" (whole {edge}x{edge}x{edge} cubes)"
    if ici.wraparound is Wraparound.FULL_AXIS:
        return f" (full {max(ici.max_shape)}-chip axis)"
    return ""


def link_roofs(
    source: HardwareSpec | DeviceMesh, dtype: str = "bfloat16", *, groups: Sequence[Any] = ()
) -> tuple[Roof, ...]:
    """Communication roofs, fastest first; roofs of equal bandwidth are merged into one.

    On a mesh: one per mesh axis of size > 1 and one per axis group in ``groups`` (for
    collectives over several axes), at ``group_bytes_per_s``. On bare hardware, its nominal
    links in the book's units: TPU ICI on an axis with wraparound (``2·W_uni``; on v5p only
    in slices of whole 4x4x4 cubes) and without (``W_uni``), DCN per chip; GPU NVLink per GPU
    and each scale-out level per node (GPUs per node × the per-GPU rate: 400 GB/s on H100,
    ridge ``C/W ≈ 2472``).
    """
    found: list[tuple[str, str, float]] = []
    if isinstance(source, DeviceMesh):
        chip = source.hardware.chip
        wanted: list[tuple[str, ...]] = [(a.name,) for a in source.axes if a.size > 1]
        wanted += [source.ordered(group) for group in groups]
        for axes in dict.fromkeys(wanted):
            if source.group(axes).size > 1:
                link = rate(source, Collective.ALL_GATHER, axes).link
                found.append((group_text(source, axes), link, group_bytes_per_s(source, axes)))
    else:
        chip = source.chip
        if source.ici is not None:
            ici = source.ici
            wrapped = f"ICI axis with wraparound{_wraps_when(ici)}"
            found.append((wrapped, "ici", ici.link_bytes_per_s_bidirectional))
            found.append(("ICI axis without wraparound", "ici", ici.link_bytes_per_s_per_direction))
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
    """The roofline coordinates of ``plan`` (units in the package docstring)."""
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
    top: int | None = 10,
    merge: bool = True,
    title: str | None = None,
    ax: Axes | None = None,
) -> Axes:
    """Attainable FLOPs/s per chip against arithmetic intensity (log-log).

    Draws the flat compute roof at the peak for ``dtype``, the HBM slope (ridge at the
    critical intensity) and, with ``links``, a dashed roof per link (``link_roofs`` of
    ``mesh``, else the hardware's nominal links). Each plan is a numbered pair of points
    (filled: FLOPs per HBM byte; hollow: FLOPs per byte of collective traffic) at its
    attained FLOPs/s under ``overlap``. ``hardware`` defaults to the mesh's, the mesh to the
    first plan's, ``dtype`` to the first plan's. ``legend_inside`` puts the legend in the
    empty lower right (for panels) instead of to the right of the Axes. With many plans,
    ``merge`` draws strategies that are the same by symmetry once and ``top`` keeps the
    best ones (numbered 1..top in the legend); the title names the problem.
    """
    everything = as_plans(plans)
    rows = merge_symmetric(everything) if merge and labels is None else [(p, 1) for p in everything]
    rows = rows if top is None else rows[:top]
    items = [item for item, _ in rows]
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
    names = list(labels) if labels is not None else strategy_labels(items)
    names = [name + symmetric_suffix(count) for name, (_, count) in zip(names, rows, strict=False)]
    names = names[: len(items)]

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
    _draw_roofs(ax, hbm, roofs=roofs, peak=peak, dtype=dtype, lo=lo, hi=hi)
    for index, (point, name) in enumerate(zip(points, names, strict=True)):
        _draw_point(ax, point, name, index)
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
    log_ticks(ax, "x", count_text)
    log_ticks(ax, "y", lambda v: format_rate(v, "FLOP", 3))
    ax.grid(True, which="major", alpha=0.3)
    where = ""
    if mesh is not None:
        where = f" on {mesh.spec_text} ({mesh.topology.shape_text})"
        where = where if mesh.num_devices > 1 else " (one chip)"
    head = f"Roofline of {chip.name}{where}"
    if title is not None:
        head = title
    elif items:
        shown = f"; best {len(items)} of {len(everything)}" if len(items) < len(everything) else ""
        head += f"\n{problem_text(items[0])}{shown}"
    ax.set_title(head, fontsize=10)
    # the lower right of a roofline is empty: room for the legend in a panel
    ax.legend(**({"loc": "lower right", "fontsize": 7} if legend_inside else OUTSIDE))
    return ax


def _draw_roofs(
    ax: Axes,
    hbm: Roof,
    *,
    roofs: Sequence[Roof],
    peak: float,
    dtype: str,
    lo: float,
    hi: float,
) -> None:
    """The compute roof, the HBM roof and a dashed roof per link, each with its ridge."""
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
        color = LINK_COLORS[index % len(LINK_COLORS)]
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


def _draw_point(ax: Axes, point: StrategyPoint, name: str, index: int) -> None:
    """One strategy: filled at its HBM intensity, hollow at its collective intensity, the rank
    written inside each marker; colours match the legend."""
    color = PALETTE[index % len(PALETTE)]
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
            [x_comm], [y], color=color, mfc="white", mew=2, gid=f"strategy:{index}:comm", **marker
        )
        _rank(ax, x_comm, y, index, color)
        ax.plot([x_hbm, x_comm], [y, y], ":", color=color, lw=1, zorder=4)


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


def save_roofline(
    path: str | Path, hardware: Any = None, *, force: bool = False, **kwargs: Any
) -> Path:
    """``roofline(hardware, **kwargs)`` written to ``path`` (``save_figure``'s rules)."""
    return save_figure(roofline(hardware, **kwargs), path, force=force)
