"""Collectives and their cost on each kind of link.

Notation (the scaling book's): ``V`` is the bytes of the whole array *within one collective
group* (the gathered result of an AllGather, the unreduced input of a ReduceScatter or
AllReduce, the sum of every chip's buffer for an AllToAll); ``W_uni`` a link's bandwidth in
one direction; ``W_bidi = 2 W_uni``. Every function returns a bandwidth term and a latency
term separately; how they combine depends on the link family (``Combine``):

* TPU (ICI torus, DCN between slices): the larger of the two, the book's
  ``max(T_min·hops, V/W)``, except a point-to-point permute, where the book adds them.
* GPU (NVLink, InfiniBand): the sum, as NCCL's own cost model has it (``src/graph/tuning.cc``,
  ``ncclTopoTuneModel`` and ``ncclTopoGetAlgoTime``: ``time = latency + bytes / bandwidth``).
  A ring collective's latency is NCCL's base latency (``baseLatencies[RING][SIMPLE]``, 8.4 µs)
  plus one per-step latency for every ring step, and NCCL counts the steps over *all* ranks
  of the group: ``2(N-1)`` for an AllReduce, ``N-1`` for an AllGather or ReduceScatter, of
  which the ones that cross a node boundary (``N_nodes - 1``, twice for an AllReduce) cost the
  network's per-step latency (``hwLatencies[NET][RING][SIMPLE]``, 14 µs) and the others
  NVLink's (3.4 µs). A hierarchical group counts a step at the outermost tier it crosses.

One pure function per collective and link kind:

* torus (TPU ICI): ``torus_all_gather``, ``torus_all_to_all``, ``torus_permute``;
* switched (NVLink domain, InfiniBand fat-tree level, DCN): ``switch_all_gather``,
  ``switch_all_to_all``, ``switch_permute``;
* ``nccl_ring_latency_s``: the latency of a ring collective over a hierarchical GPU group.

ReduceScatter costs what AllGather costs (its transpose) and AllReduce twice that
(ReduceScatter then AllGather), on every link (on GPUs the base latency is paid once). A
group that spans several tiers (GPUs of several nodes; TPU slices over DCN) runs a
hierarchical collective whose tiers overlap: the slowest tier's bandwidth term bounds it
(gpus.md, "cross-node collectives"); the latencies add.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass

from .dtypes import canonical_dtype, dtype_bytes
from .errors import SpecError
from .hardware import HardwareKind, LinkKind
from .limits import MAX_ARRAY_ELEMENTS, check_count, shown
from .mesh import AxisGroup, DeviceMesh, RingSegment, TierSpan


class Collective(enum.Enum):
    """The collectives a sharded einsum can need. Values are XLA's HLO op names, so the
    estimator and the HLO reader speak the same words."""

    ALL_GATHER = "all-gather"
    REDUCE_SCATTER = "reduce-scatter"
    ALL_REDUCE = "all-reduce"
    ALL_TO_ALL = "all-to-all"
    COLLECTIVE_PERMUTE = "collective-permute"

    @property
    def book_name(self) -> str:
        """The scaling book's spelling: ``AllGather``, ``ReduceScatter``, ..."""
        return _BOOK_NAMES[self]


_BOOK_NAMES = {
    Collective.ALL_GATHER: "AllGather",
    Collective.REDUCE_SCATTER: "ReduceScatter",
    Collective.ALL_REDUCE: "AllReduce",
    Collective.ALL_TO_ALL: "AllToAll",
    Collective.COLLECTIVE_PERMUTE: "CollectivePermute",
}


def parse_collective(name: Collective | str) -> Collective:
    """``"all-gather"``, ``"AllGather"`` or ``"all_gather"`` -> ``Collective.ALL_GATHER``."""
    if isinstance(name, Collective):
        return name
    if not isinstance(name, str):
        raise SpecError(
            f"a collective is a Collective or a name like 'all-gather', got {name!r}; expected "
            f"one of {', '.join(k.value for k in Collective)}"
        )
    key = name.strip().lower().replace("_", "-")
    for kind in Collective:
        if key in (kind.value, kind.book_name.lower()):
            return kind
    raise SpecError(
        f"unknown collective {name!r}; expected one of {', '.join(k.value for k in Collective)}"
    )


class Bound(enum.Enum):
    """Which term of a collective's time is larger."""

    BANDWIDTH = "bandwidth"
    LATENCY = "latency"


class Combine(enum.Enum):
    """How a collective's latency and bandwidth terms make its time (per link family)."""

    MAX = "max"  # TPU ICI / DCN: the book's max(T_min·hops, V/W)
    SUM = "sum"  # GPU NVLink / InfiniBand (NCCL: latency + bytes/bandwidth), and permutes


#: The link kinds whose collectives NCCL runs (their terms add, ``Combine.SUM``).
NCCL_LINKS = frozenset({LinkKind.NVLINK, LinkKind.INFINIBAND})


@dataclass(frozen=True, slots=True)
class LinkTime:
    """A collective's two time terms on one tier of links, in seconds."""

    bandwidth_s: float
    latency_s: float


# -- torus (TPU ICI) --------------------------------------------------------------------------


def _ring_hops(seg: RingSegment) -> int:
    """Hops to the farthest chip: floor(X/2) on a ring, X-1 on a line; x stride."""
    return (seg.size // 2 if seg.wraps else seg.size - 1) * seg.stride


def torus_all_gather(
    *,
    group_bytes: float,
    segments: tuple[RingSegment, ...],
    link_bytes_per_s_per_direction: float,
    hop_latency_s: float,
) -> LinkTime:
    """AllGather (or ReduceScatter) over a torus sub-grid (sharding.md, "AllGather").

    On one dimension with ``X`` chips ``s`` links apart:

    * ring (the dimension wraps): ``floor(X/2)`` hops, each moving ``V/X`` both ways, so
      ``T = floor(X/2) · 2V/(X·W_bidi) · s``, which is the book's ``V/W_bidi`` for even X;
    * line (no wraparound): an end chip takes all ``X-1`` shards over its single link,
      ``T = (X-1)·V/(X·W_uni) · s`` (the book's v5e 4-chip example: 3·8.4e6/4.5e10 = 560 us).

    The stride ``s`` is there when the group takes every s-th chip of a dimension: ``s``
    interleaved groups then share each link, and each of their hops crosses ``s`` links.
    Several dimensions gather at once, each with its own links, so their bandwidths add
    (the book's ``V/(W_ici·N_axes)``). Latency: ``T_min`` per hop of the longest path,
    ``T_min·Σ hops``.
    """
    if not segments or group_bytes == 0:
        return LinkTime(0.0, 0.0)
    w_uni = link_bytes_per_s_per_direction
    rate = 0.0  # bytes of V per second, summed over dimensions
    for seg in segments:
        if seg.size == 1:
            continue
        if seg.wraps:
            seconds_per_byte = (seg.size // 2) * 2 / (seg.size * 2 * w_uni) * seg.stride
        else:
            seconds_per_byte = (seg.size - 1) / (seg.size * w_uni) * seg.stride
        rate += 1 / seconds_per_byte
    if rate == 0:
        return LinkTime(0.0, 0.0)
    hops = sum(_ring_hops(seg) for seg in segments)
    return LinkTime(group_bytes / rate, hops * hop_latency_s)


def torus_all_to_all(
    *,
    group_bytes: float,
    segments: tuple[RingSegment, ...],
    link_bytes_per_s_per_direction: float,
    hop_latency_s: float,
) -> LinkTime:
    """AllToAll over a torus sub-grid, by bisection (sharding.md, "AllToAll").

    Each half of the group sends the other half ``V/4`` bytes. The narrowest cut is
    perpendicular to the longest dimension and crosses ``N/X`` rows of links, two per row
    where the dimension wraps and one where it does not, each ``W_uni/s``. On a wrapped
    ``A×B×...`` torus this is the book's ``V·max(A,B,...)/(4·N·W_bidi)`` (``V/(4·W_bidi)``
    on a ring, a quarter of an AllGather); without wraparound it doubles. Latency: the
    farthest destination, as for an AllGather.
    """
    sizes = [seg for seg in segments if seg.size > 1]
    if not sizes or group_bytes == 0:
        return LinkTime(0.0, 0.0)
    num_chips = math.prod(seg.size for seg in sizes)
    w_uni = link_bytes_per_s_per_direction
    bisection = min(
        (num_chips / seg.size) * (2 if seg.wraps else 1) * w_uni / seg.stride for seg in sizes
    )
    hops = sum(_ring_hops(seg) for seg in sizes)
    return LinkTime(group_bytes / 4 / bisection, hops * hop_latency_s)


def torus_permute(
    *,
    chip_bytes: float,
    segments: tuple[RingSegment, ...],
    link_bytes_per_s_per_direction: float,
    hop_latency_s: float,
) -> LinkTime:
    """A ring shift (CollectivePermute): every chip sends its buffer to the next chip.

    Each message crosses one link (``s`` links at stride ``s``, shared by ``s`` interleaved
    groups): ``T = bytes·s/W_uni``. Without wraparound the last chip's message travels back
    along the line, ``X-1`` hops, on the otherwise idle reverse links. Point-to-point, so
    the book adds bandwidth and latency terms (sharding.md, point-to-point over a mesh).
    """
    sizes = [seg for seg in segments if seg.size > 1]
    if not sizes or chip_bytes == 0:
        return LinkTime(0.0, 0.0)
    stride = max(seg.stride for seg in sizes)
    hops = max((1 if seg.wraps else seg.size - 1) * seg.stride for seg in sizes)
    return LinkTime(chip_bytes * stride / link_bytes_per_s_per_direction, hops * hop_latency_s)


# -- switched tiers (NVLink, InfiniBand, DCN) -------------------------------------------------


def switch_all_gather(
    *,
    group_bytes: float,
    num_children: int,
    chips_per_child: int,
    chip_bytes_per_s_per_direction: float,
    step_latency_s: float,
) -> LinkTime:
    """AllGather (or ReduceScatter) over one switched level (gpus.md).

    A ring over the ``D`` units below this level: each unit takes in ``(D-1)/D`` of ``V``
    through its own links, which for this group are ``chips_per_child`` chips' worth:
    ``T = V·(D-1)/(D·W)`` with ``W = chips_per_child × per-chip bandwidth``. Inside an
    8-GPU node (``D=8``, one GPU per child, 450 GB/s) that is the book's
    ``V·7/(8·450e9)``; across 32 nodes of 8 GPUs each, ``V·31/(32·400e9)``. A group with
    fewer chips per unit gets that unit's proportional share of its egress, which is the
    book's rule that sharding over an inner axis does not help unless it spans nodes.
    Latency: ``D-1`` ring steps.
    """
    if num_children <= 1 or group_bytes == 0:
        return LinkTime(0.0, 0.0)
    rate = chips_per_child * chip_bytes_per_s_per_direction
    steps = num_children - 1
    return LinkTime(group_bytes * steps / (num_children * rate), steps * step_latency_s)


def switch_all_to_all(
    *,
    group_bytes: float,
    num_children: int,
    chips_per_child: int,
    chip_bytes_per_s_per_direction: float,
    step_latency_s: float,
) -> LinkTime:
    """AllToAll over one switched level (gpus.md, "AllToAlls").

    Every chip sends ``V/N²`` to each other chip (``N = D·chips_per_child``); through this
    level go the messages to the ``(D-1)·chips_per_child`` chips in other units, each chip
    on its own link: ``T = (D-1)·chips_per_child·V/(N²·W_chip)``. With one GPU per child that
    is the book's in-node ``V·(N-1)/(N²·W)``; across ``M`` full nodes it is the book's
    ``V·(M-1)/(M²·W_node)``. All messages go at once: one step of latency.
    """
    if num_children <= 1 or group_bytes == 0:
        return LinkTime(0.0, 0.0)
    num_chips = num_children * chips_per_child
    per_chip = (num_children - 1) * chips_per_child * group_bytes / num_chips**2
    return LinkTime(per_chip / chip_bytes_per_s_per_direction, step_latency_s)


def switch_permute(
    *,
    chip_bytes: float,
    num_children: int,
    chip_bytes_per_s_per_direction: float,
    step_latency_s: float,
) -> LinkTime:
    """A ring shift through one switched level: each chip sends its buffer over its own
    link, ``T = bytes/W_chip``, plus one step of latency (point-to-point: the terms add)."""
    if num_children <= 1 or chip_bytes == 0:
        return LinkTime(0.0, 0.0)
    return LinkTime(chip_bytes / chip_bytes_per_s_per_direction, step_latency_s)


# -- composing tiers: one collective over one axis group ---------------------------------------


def combine_terms_s(
    kind: Collective, bandwidth_s: float, latency_s: float, combine: Combine | None = None
) -> float:
    """A collective's time from its two terms: their sum on GPU links (``Combine.SUM``,
    NCCL's model) and for a point-to-point permute anywhere; otherwise (TPU, and the default
    when ``combine`` is not given) the larger of them, the book's ``max(T_min·hops, V/W)``.
    The one place where terms combine: rates, estimates and crossovers all call it."""
    if kind is Collective.COLLECTIVE_PERMUTE or combine is Combine.SUM:
        return bandwidth_s + latency_s
    return max(bandwidth_s, latency_s)


def nccl_ring_latency_s(
    kind: Collective, spans: tuple[TierSpan, ...], base_latency_s: float
) -> float:
    """NCCL's latency of a ring collective over a group laid over switched ``spans`` (inner
    tier first): ``base + Σ_t steps_t · latency_t``, NCCL v2.30 ``ncclTopoTuneModel``.

    The ring runs over all ``N`` ranks, ``N-1`` steps (AllGather, ReduceScatter) or
    ``2(N-1)`` (AllReduce). A step is charged at the outermost tier it crosses: with
    ``D_t`` units of the tier below joined at tier ``t``, and ``U_t`` units of tier ``t``
    above it, ``U_t·(D_t - 1)`` steps cross tier ``t`` (for one node of 8 GPUs: 7 NVLink
    steps; for 2 nodes of 8: 14 NVLink steps and 1 network step, which is NCCL's
    ``(nsteps - nInterSteps)·intraLat + nInterSteps·interLat``)."""
    steps = [(span.num_children - 1, span.tier.latency_s) for span in spans]
    outer = 1
    latency = 0.0
    for (below, step_s), span in zip(reversed(steps), reversed(spans), strict=True):
        latency += outer * below * step_s
        outer *= span.num_children
    factor = 2 if kind is Collective.ALL_REDUCE else 1
    return base_latency_s + factor * latency


@dataclass(frozen=True, slots=True)
class CollectiveRate:
    """One collective kind over one axis group, as a function of its bytes:
    ``bandwidth_s = s_per_byte × V`` (V as in the module docstring), plus a fixed latency.
    ``link`` names the tier whose bandwidth term is the largest."""

    kind: Collective
    s_per_byte: float
    latency_s: float
    link: str
    group_size: int
    combine: Combine = Combine.MAX

    def time_s(self, group_bytes: float) -> float:
        if group_bytes == 0 or self.group_size == 1:
            return 0.0
        return combine_terms_s(
            self.kind, self.s_per_byte * group_bytes, self.latency_s, self.combine
        )


def _span_time(kind: Collective, span: TierSpan, group_bytes: float, group_size: int) -> LinkTime:
    tier = span.tier
    if kind is Collective.ALL_TO_ALL:
        # Only messages between chips of the same unit of this tier cross its links.
        if tier.is_torus:
            chips_here = math.prod(seg.size for seg in span.segments)
        else:
            chips_here = span.num_children * span.chips_per_child
        group_bytes *= (chips_here / group_size) ** 2
    if tier.is_torus:
        if kind is Collective.COLLECTIVE_PERMUTE:
            return torus_permute(
                chip_bytes=group_bytes,
                segments=span.segments,
                link_bytes_per_s_per_direction=tier.bytes_per_s_per_direction,
                hop_latency_s=tier.latency_s,
            )
        ring = torus_all_to_all if kind is Collective.ALL_TO_ALL else torus_all_gather
        return ring(
            group_bytes=group_bytes,
            segments=span.segments,
            link_bytes_per_s_per_direction=tier.bytes_per_s_per_direction,
            hop_latency_s=tier.latency_s,
        )
    if kind is Collective.COLLECTIVE_PERMUTE:
        return switch_permute(
            chip_bytes=group_bytes,
            num_children=span.num_children,
            chip_bytes_per_s_per_direction=tier.bytes_per_s_per_direction,
            step_latency_s=tier.latency_s,
        )
    switched = switch_all_to_all if kind is Collective.ALL_TO_ALL else switch_all_gather
    return switched(
        group_bytes=group_bytes,
        num_children=span.num_children,
        chips_per_child=span.chips_per_child,
        chip_bytes_per_s_per_direction=tier.bytes_per_s_per_direction,
        step_latency_s=tier.latency_s,
    )


def group_rate(
    kind: Collective, group: AxisGroup, *, base_latency_s: float = 0.0
) -> CollectiveRate:
    """The rate of ``kind`` over ``group``: the slowest tier's bandwidth term (ReduceScatter
    as AllGather, AllReduce twice AllGather) and the latency of the link family.

    On TPU links the tiers' latencies add and the terms combine by max. On GPU links (every
    tier NVLink or InfiniBand) the terms add (NCCL), and a ring collective's latency is
    ``nccl_ring_latency_s`` with ``base_latency_s`` (NCCL's base latency); an AllToAll or a
    permute (NCCL send/receive) costs one step per tier it crosses and no base latency."""
    base: Collective
    if kind in (Collective.ALL_TO_ALL, Collective.COLLECTIVE_PERMUTE):
        base = kind
    else:
        base = Collective.ALL_GATHER
    times = [(_span_time(base, span, 1.0, group.size), span.tier.name) for span in group.spans]
    factor = 2.0 if kind is Collective.ALL_REDUCE else 1.0
    if not times:
        return CollectiveRate(kind, 0.0, 0.0, "", group.size)
    slowest = max(times, key=lambda item: item[0].bandwidth_s)
    nccl = all(span.tier.link in NCCL_LINKS for span in group.spans)
    if nccl and base is Collective.ALL_GATHER:
        latency = nccl_ring_latency_s(kind, group.spans, base_latency_s)
    else:
        latency = factor * sum(t.latency_s for t, _ in times)
    return CollectiveRate(
        kind=kind,
        s_per_byte=factor * slowest[0].bandwidth_s,
        latency_s=latency,
        link=slowest[1],
        group_size=group.size,
        combine=Combine.SUM if nccl else Combine.MAX,
    )


def ring_base_latency_s(mesh: DeviceMesh) -> float:
    """NCCL's base latency of a ring collective on ``mesh``'s GPUs (0 on a TPU)."""
    nvlink = mesh.hardware.nvlink
    if mesh.hardware.kind is HardwareKind.GPU and nvlink is not None:
        return nvlink.ring_base_latency_s
    return 0.0


def rate(
    mesh: DeviceMesh, kind: Collective, axes: tuple[str, ...] | frozenset[str]
) -> CollectiveRate:
    """``group_rate`` memoised on the mesh: the planner's hot path calls this."""
    key = (kind, frozenset(axes))
    cached = mesh.memo.get(key)
    if cached is None:
        cached = group_rate(kind, mesh.group(axes), base_latency_s=ring_base_latency_s(mesh))
        mesh.memo[key] = cached
    return cached


# -- the cost of one collective on one array ---------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class CollectiveCost:
    """One collective on one array: what moves and how long it takes."""

    kind: Collective
    axes: tuple[str, ...]
    group_size: int
    dtype: str
    elements_in_per_chip: int
    elements_out_per_chip: int
    bytes_sent_per_chip: float
    bandwidth_s: float
    latency_s: float
    time_s: float
    bound: Bound
    link: str
    combine: Combine = Combine.MAX  # how bandwidth_s and latency_s made time_s

    @property
    def group_bytes(self) -> float:
        """The book's ``V`` for this collective."""
        return group_bytes(
            self.kind, self.elements_in_per_chip, self.group_size, dtype_bytes(self.dtype)
        )


def group_bytes(
    kind: Collective, elements_in_per_chip: int, group_size: int, itemsize: float
) -> float:
    """The book's ``V``: the gathered array (AllGather), the unreduced array (ReduceScatter,
    AllReduce), every chip's buffer together (AllToAll), one chip's buffer (permute)."""
    per_chip = elements_in_per_chip * itemsize
    if kind in (Collective.ALL_GATHER, Collective.ALL_TO_ALL):
        return float(per_chip * group_size)
    return float(per_chip)


def bytes_sent_per_chip(
    kind: Collective, elements_in_per_chip: int, group_size: int, itemsize: float
) -> float:
    """Bytes each chip sends in the ring algorithms the costs assume (the same figures
    XLA's partitioner implies: AllGather (g-1)/g of the result, ReduceScatter (g-1)/g of the
    input, AllReduce twice that, AllToAll (g-1)/g of the buffer, permute the buffer)."""
    if group_size <= 1:
        return 0.0
    per_chip = elements_in_per_chip * itemsize
    fraction = (group_size - 1) / group_size
    if kind is Collective.ALL_GATHER:
        return fraction * per_chip * group_size
    if kind in (Collective.REDUCE_SCATTER, Collective.ALL_TO_ALL):
        return fraction * per_chip
    if kind is Collective.ALL_REDUCE:
        return 2 * fraction * per_chip
    return float(per_chip)


def elements_out_per_chip(kind: Collective, elements_in_per_chip: int, group_size: int) -> int:
    if kind is Collective.ALL_GATHER:
        return elements_in_per_chip * group_size
    if kind is Collective.REDUCE_SCATTER:
        return elements_in_per_chip // group_size
    return elements_in_per_chip


def collective_cost(
    mesh: DeviceMesh,
    kind: Collective | str,
    axes: tuple[str, ...] | list[str] | str,
    *,
    elements_in_per_chip: int,
    dtype: str,
) -> CollectiveCost:
    """The cost of ``kind`` over mesh ``axes`` on a buffer of ``elements_in_per_chip``.

    ``kind`` may be a ``Collective`` or its name (``"all-reduce"``); ``axes`` a sequence of
    mesh axis names or one name (``"x"``, ``"x,y"``)."""
    if not isinstance(mesh, DeviceMesh):
        raise SpecError(f"collective_cost needs a DeviceMesh, got {shown(mesh)}")
    kind = parse_collective(kind)
    if isinstance(axes, str):
        axes = [a.strip() for a in re.split(r"[,+]", axes) if a.strip()]
    check_count(
        elements_in_per_chip,
        what="elements_in_per_chip",
        most=MAX_ARRAY_ELEMENTS,
        least=0,
        error=SpecError,
    )
    dtype = canonical_dtype(dtype)
    ordered = mesh.ordered(axes)
    r = rate(mesh, kind, ordered)
    size = r.group_size
    if kind is Collective.REDUCE_SCATTER and elements_in_per_chip % size:
        raise SpecError(
            f"ReduceScatter over {'+'.join(ordered)} (group of {size}) cannot split "
            f"{elements_in_per_chip} elements per chip evenly; pad the scattered dimension to a "
            f"multiple of {size}"
        )
    itemsize = dtype_bytes(dtype)
    volume = group_bytes(kind, elements_in_per_chip, size, itemsize)
    bandwidth = r.s_per_byte * volume if size > 1 else 0.0
    latency = r.latency_s if size > 1 and volume > 0 else 0.0
    total = r.time_s(volume)
    return CollectiveCost(
        kind=kind,
        axes=ordered,
        group_size=size,
        dtype=dtype,
        elements_in_per_chip=elements_in_per_chip,
        elements_out_per_chip=elements_out_per_chip(kind, elements_in_per_chip, size),
        bytes_sent_per_chip=bytes_sent_per_chip(kind, elements_in_per_chip, size, itemsize),
        bandwidth_s=bandwidth,
        latency_s=latency,
        time_s=total,
        bound=Bound.LATENCY if latency > bandwidth else Bound.BANDWIDTH,
        link=r.link if size > 1 else "",
        combine=r.combine,
    )
