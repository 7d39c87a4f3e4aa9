"""The roofline of one chip weighed against the network: ``Cost``.

Per chip, a sharded einsum spends ``compute_s = FLOPs / peak FLOPs/s`` on its local matmul,
``hbm_s = bytes / HBM bytes/s`` moving that matmul's operands and result, and ``comm_s`` in
collectives. The scaling book bounds the step between perfect overlap (``max`` of the
three, the lower bound) and none (their sum, the upper bound), roofline.md. The overlap
policy is always a parameter (``Overlap``); ranking uses ``Overlap.FULL`` by default, as
the book does when it assumes collective matmuls hide communication.

``Cost`` has algebra: costs of several ops or collectives add, and keep their breakdown.
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
    """Communication time spent over one axis group, on the link that bounds it."""

    axes: tuple[str, ...]
    link: str
    time_s: float
    bytes_sent_per_chip: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Cost:
    """Per-chip time of a sharded op (or a sum of them), with its breakdown."""

    flops: float = 0.0
    hbm_bytes: float = 0.0
    compute_s: float = 0.0
    hbm_s: float = 0.0
    comm: tuple[CommTerm, ...] = ()

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
        )

    @property
    def comm_s(self) -> float:
        """Collectives run one after another (they share the links)."""
        return sum((term.time_s for term in self.comm), 0.0)

    @property
    def comm_bytes_sent_per_chip(self) -> float:
        return sum((term.bytes_sent_per_chip for term in self.comm), 0.0)

    @property
    def local_s(self) -> float:
        """The chip's own roofline: compute and HBM traffic overlap inside a kernel."""
        return max(self.compute_s, self.hbm_s)

    @property
    def lower_bound_s(self) -> float:
        """Perfect overlap: the slowest of compute, HBM and communication."""
        return max(self.compute_s, self.hbm_s, self.comm_s)

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
        """The largest of the three terms (ties go to compute, then HBM)."""
        largest = max(self.compute_s, self.hbm_s, self.comm_s)
        if self.compute_s == largest:
            return Bottleneck.COMPUTE
        if self.hbm_s == largest:
            return Bottleneck.HBM
        return Bottleneck.COMM

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
