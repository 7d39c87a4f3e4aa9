"""The roofline of one chip weighed against the network: ``Cost``.

Per chip, a sharded einsum spends ``compute_s = FLOPs / peak FLOPs/s`` on its local matmul,
``hbm_s = bytes / HBM bytes/s`` moving that matmul's operands and result, and ``comm_s`` in
collectives. The scaling book bounds the step between perfect overlap (``max`` of the
three, the lower bound) and none (their sum, the upper bound), roofline.md. The overlap
policy is always a parameter (``Overlap``); ranking uses ``Overlap.FULL`` by default, as
the book does when it assumes collective matmuls hide communication.

``Cost`` has algebra: costs of several ops or collectives add (``+``), and keep their
breakdown; a cost scales (``cost * L`` for L layers or a loop's trip count). Each op's own
roofline is ``local_s = max(compute_s, hbm_s)`` (compute and HBM traffic overlap inside a
kernel); a sum of ops adds their ``local_s``, so a program's lower bound is
``max(Σ local_s, Σ comm_s)`` and its upper bound ``Σ compute_s + Σ hbm_s + Σ comm_s``.
``peak_memory_bytes`` (a transient peak per chip) combines by ``max`` and does not scale.
``+`` composes ops that may overlap (one pass of a program); ``a.then(b)`` composes passes
that cannot (a step's backward pass cannot hide its communication behind the forward
pass's compute): their lower bounds add.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from .hardware import ChipSpec


class Overlap(enum.Enum):
    """How compute, HBM traffic and communication combine into one time."""

    FULL = "full"  # perfect overlap: the slowest of the three (the lower bound)
    NONE = "none"  # no overlap: their sum (the upper bound)


class Bottleneck(enum.Enum):
    COMPUTE = "compute"
    HBM = "hbm"
    COMM = "comm"


@dataclass(frozen=True, slots=True)
class CommTerm:
    """Communication time spent over one axis group, on the link that bounds it.
    ``resources`` are the physical dimensions (``mesh.link_resources``) whose links it uses;
    collectives on disjoint resources can run at the same time."""

    axes: tuple[str, ...]
    link: str
    time_s: float
    bytes_sent_per_chip: float
    resources: tuple[int, ...] = ()

    def __mul__(self, factor: float) -> CommTerm:
        return CommTerm(
            self.axes,
            self.link,
            self.time_s * factor,
            self.bytes_sent_per_chip * factor,
            self.resources,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Cost:
    """Per-chip time of a sharded op (or a sum of them), with its breakdown.

    ``flops`` are matmul FLOPs (timed at the chip's peak); ``vector_flops`` those of
    memory-bound ops (reported, timed by their HBM bytes). ``local_s`` defaults to
    ``max(compute_s, hbm_s)`` for one op and adds under ``+``."""

    flops: float = 0.0
    hbm_bytes: float = 0.0
    compute_s: float = 0.0
    hbm_s: float = 0.0
    comm: tuple[CommTerm, ...] = ()
    local_s: float = -1.0
    vector_flops: float = 0.0
    peak_memory_bytes: float = 0.0
    #: an explicit lower bound, set by ``then`` (passes that cannot overlap); -1: none
    lower_s: float = -1.0

    def __post_init__(self) -> None:
        if self.local_s < 0:
            object.__setattr__(self, "local_s", max(self.compute_s, self.hbm_s))

    @classmethod
    def zero(cls) -> Cost:
        return cls()

    def __add__(self, other: Cost) -> Cost:
        return Cost(
            flops=self.flops + other.flops,
            hbm_bytes=self.hbm_bytes + other.hbm_bytes,
            compute_s=self.compute_s + other.compute_s,
            hbm_s=self.hbm_s + other.hbm_s,
            comm=self.comm + other.comm,
            local_s=self.local_s + other.local_s,
            vector_flops=self.vector_flops + other.vector_flops,
            peak_memory_bytes=max(self.peak_memory_bytes, other.peak_memory_bytes),
        )

    def then(self, other: Cost) -> Cost:
        """``self`` followed by ``other`` with no overlap between them: everything adds, and
        so do the lower bounds (each pass overlaps only within itself)."""
        both = self + other
        return Cost(
            flops=both.flops,
            hbm_bytes=both.hbm_bytes,
            compute_s=both.compute_s,
            hbm_s=both.hbm_s,
            comm=both.comm,
            local_s=both.local_s,
            vector_flops=both.vector_flops,
            peak_memory_bytes=both.peak_memory_bytes,
            lower_s=self.lower_bound_s + other.lower_bound_s,
        )

    def __mul__(self, factor: float) -> Cost:
        """``factor`` repetitions (layers, a loop's trip count): every time, FLOP and byte
        scales; the transient memory peak does not."""
        return Cost(
            flops=self.flops * factor,
            hbm_bytes=self.hbm_bytes * factor,
            compute_s=self.compute_s * factor,
            hbm_s=self.hbm_s * factor,
            comm=tuple(term * factor for term in self.comm),
            local_s=self.local_s * factor,
            vector_flops=self.vector_flops * factor,
            peak_memory_bytes=self.peak_memory_bytes,
            lower_s=self.lower_s * factor if self.lower_s >= 0 else -1.0,
        )

    __rmul__ = __mul__

    @property
    def comm_s(self) -> float:
        """Every collective, one after another (the no-overlap figure)."""
        return sum((term.time_s for term in self.comm), 0.0)

    @property
    def comm_lower_s(self) -> float:
        """Collectives overlapped as far as the links allow: those on the same links run one
        after another, those on disjoint links at the same time (the book's FSDP+TP
        analysis: ``T_comms = max(T_FSDP, T_TP)``). The busiest link's total."""
        if not self.comm:
            return 0.0
        busy: dict[object, float] = {}
        for term in self.comm:
            for resource in term.resources or term.axes or ("",):
                busy[resource] = busy.get(resource, 0.0) + term.time_s
        return max(busy.values())

    @property
    def comm_bytes_sent_per_chip(self) -> float:
        return sum((term.bytes_sent_per_chip for term in self.comm), 0.0)

    @property
    def lower_bound_s(self) -> float:
        """Perfect overlap: the chip's own time (each op's slower of compute and HBM) or the
        busiest link's communication (``comm_lower_s``), whichever is longer; for passes
        composed by ``then``, the sum of their lower bounds."""
        if self.lower_s >= 0:
            return self.lower_s
        return max(self.local_s, self.comm_lower_s)

    @property
    def upper_bound_s(self) -> float:
        """No overlap at all: compute + HBM + communication."""
        return self.compute_s + self.hbm_s + self.comm_s

    def time_s(self, overlap: Overlap = Overlap.FULL) -> float:
        return self.lower_bound_s if overlap is Overlap.FULL else self.upper_bound_s

    def comm_s_by_axes(self) -> dict[str, float]:
        """Communication seconds per axis group (``"y"``, ``"x+y"``), in first-use order."""
        out: dict[str, float] = {}
        for term in self.comm:
            key = "+".join(term.axes)
            out[key] = out.get(key, 0.0) + term.time_s
        return out

    def comm_s_by_link(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for term in self.comm:
            out[term.link] = out.get(term.link, 0.0) + term.time_s
        return out

    @property
    def bottleneck(self) -> Bottleneck:
        """Communication when it outlasts the chip's own time; else the larger of compute and
        HBM (ties go to compute, then HBM)."""
        if self.comm_lower_s > self.local_s:
            return Bottleneck.COMM
        return Bottleneck.COMPUTE if self.compute_s >= self.hbm_s else Bottleneck.HBM

    @property
    def bottleneck_link(self) -> tuple[tuple[str, ...], str] | None:
        """When communication is the bottleneck: the axis group and link that take longest."""
        if self.bottleneck is not Bottleneck.COMM or not self.comm:
            return None
        totals: dict[tuple[tuple[str, ...], str], float] = {}
        for term in self.comm:
            key = (term.axes, term.link)
            totals[key] = totals.get(key, 0.0) + term.time_s
        return max(totals, key=lambda key: totals[key])

    def describe_bottleneck(self) -> str:
        """``compute``, ``HBM`` or ``communication over y (ici)``."""
        if self.bottleneck is Bottleneck.COMPUTE:
            return "compute"
        if self.bottleneck is Bottleneck.HBM:
            return "HBM bandwidth"
        link = self.bottleneck_link
        if link is None:
            return "communication"
        return f"communication over {'+'.join(link[0])} ({link[1]})"

    @property
    def arithmetic_intensity_flops_per_byte(self) -> float:
        return self.flops / self.hbm_bytes if self.hbm_bytes else float("inf")


def local_cost(*, chip: ChipSpec, dtype: str, flops: float, hbm_bytes: float) -> Cost:
    """The single-chip roofline of a local matmul: ``FLOPs / C`` and ``bytes / W_hbm``."""
    return Cost(
        flops=flops,
        hbm_bytes=hbm_bytes,
        compute_s=flops / chip.peak_flops_per_s_for(dtype),
        hbm_s=hbm_bytes / chip.hbm_bytes_per_s,
    )


def total(costs: Iterable[Cost]) -> Cost:
    out = Cost.zero()
    for cost in costs:
        out = out + cost
    return out
