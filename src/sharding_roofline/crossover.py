"""When does chip-to-chip communication take over? The crossover of one strategy.

For a fixed plan, scale one letter's size ``n`` (the batch, by default). Compute time
grows in proportion to ``n``; each collective's bandwidth term grows with ``n`` if its
array has that letter and stays put otherwise, and its latency term never moves. The
crossover is the ``n`` at which communication time equals compute time.

Each collective's time is ``combine_terms_s`` of its two terms: ``max(latency_i,
bandwidth_i(n))`` on TPU links (the book's), ``latency_i + bandwidth_i(n)`` on GPU links
(NCCL's); collectives on disjoint links overlap (the busiest link counts). Either way
``comm(n)`` is convex and ``compute(n)`` linear, so when compute grows faster than
communication there is exactly one crossover and the strategy is communication-bound below
it (the book's ``B > C/W`` rules: ``B > 2550`` for an all-gather of the weights on v5p);
when communication grows at least as fast, there is none.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from .collectives import Collective, Combine, combine_terms_s
from .dtypes import dtype_bytes
from .plans import Plan


@dataclass(frozen=True, slots=True, kw_only=True)
class Crossover:
    """The size of ``dimension`` at which communication time equals compute time."""

    dimension: str
    size: float | None  # None: no crossover (see ``note``)
    comm_bound_below: bool | None
    current_size: int
    note: str
    regime: str | None = None  # at the crossover: "bandwidth", "latency" or "mixed"

    def as_dict(self) -> dict[str, object]:
        return {
            "dimension": self.dimension,
            "size": self.size,
            "comm_bound_below": self.comm_bound_below,
            "current_size": self.current_size,
            "note": self.note,
            "regime": self.regime,
        }


def default_dimension(plan: Plan) -> str:
    """The batch: the first letter of the lhs that the output keeps and the rhs lacks
    (``b`` in ``bd,df->bf``), else the lhs's first letter."""
    spec = plan.einsum.spec
    for letter in spec.lhs:
        if letter in spec.out and letter not in spec.rhs:
            return letter
    return spec.lhs[0]


class ScaledTerm(NamedTuple):
    """One collective of a strategy, as a crossover sees it: its two time terms now, and
    whether its bandwidth term grows with the scaled letter (its array has that letter)."""

    kind: Collective
    bandwidth_s: float
    latency_s: float
    scales: bool
    #: the physical dimensions whose links it uses (``DeviceMesh.link_resources``)
    resources: tuple[int, ...] = ()
    #: how its two terms make one time (``combine_terms_s``: max on TPU links, NCCL's sum)
    combine: Combine | None = None


def plan_terms(plan: Plan, dimension: str) -> list[ScaledTerm]:
    """The collectives of a single-einsum plan as ``ScaledTerm``s for ``dimension``."""
    out: list[ScaledTerm] = []
    for step in plan.collectives:
        cost = step.cost
        if cost is None or cost.group_size == 1:
            continue
        letters = plan.einsum.spec.operand(step.operand)
        out.append(
            ScaledTerm(
                cost.kind,
                cost.bandwidth_s,
                cost.latency_s,
                dimension in letters,
                plan.mesh.link_resources(cost.axes),
                cost.combine,
            )
        )
    return out


def terms_comm_s(terms: Sequence[ScaledTerm], scale: float) -> float:
    """Communication seconds with the scaled letter ``scale`` times its size now, overlapped
    as ``Cost.comm_lower_s`` overlaps them: collectives on disjoint links at the same time,
    those on the same links one after another (the busiest link's total)."""
    busy: dict[object, float] = {}
    for t in terms:
        seconds = combine_terms_s(
            t.kind, t.bandwidth_s * (scale if t.scales else 1.0), t.latency_s, t.combine
        )
        for resource in t.resources or (t.kind,):
            busy[resource] = busy.get(resource, 0.0) + seconds
    return max(busy.values(), default=0.0)


def terms_regime(terms: Sequence[ScaledTerm], scale: float) -> str:
    """Whether the collectives' time at ``scale`` is latency's or bandwidth's: ``latency``
    when latency makes at least 90% of it, ``bandwidth`` when at most 10%, else ``mixed``
    (weighted by time, so a tiny latency-bound gather beside large bandwidth-bound ones
    does not make the batch "latency-bound")."""
    total = latency = 0.0
    for t in terms:
        bandwidth_s = t.bandwidth_s * (scale if t.scales else 1.0)
        seconds = combine_terms_s(t.kind, bandwidth_s, t.latency_s, t.combine)
        summed = seconds > max(bandwidth_s, t.latency_s)  # the terms add (NCCL, a permute)
        total += seconds
        latency += t.latency_s if summed else (seconds if t.latency_s > bandwidth_s else 0.0)
    share = latency / total if total else 0.0
    if share >= 0.9:
        return "latency"
    return "bandwidth" if share <= 0.1 else "mixed"


def comm_and_compute_s(plan: Plan, dimension: str, size: float) -> tuple[float, float]:
    """(communication, compute) seconds of ``plan`` with ``dimension`` resized to ``size``."""
    scale = size / plan.einsum.size(dimension)
    return terms_comm_s(plan_terms(plan, dimension), scale), plan.cost.compute_s * scale


def comm_regime(plan: Plan, dimension: str, size: float) -> str:
    """Whether the collectives are latency- or bandwidth-bound with ``dimension`` at ``size``."""
    return terms_regime(plan_terms(plan, dimension), size / plan.einsum.size(dimension))


def crossover(plan: Plan, dimension: str | None = None) -> Crossover:
    """Solve ``comm(n) = compute(n)`` for the plan's strategy (bisection, exact to 1e-9)."""
    letter = dimension or default_dimension(plan)
    current = plan.einsum.size(letter)  # raises a clear error for an unknown letter
    return solve_crossover(plan_terms(plan, letter), plan.cost.compute_s, letter, current)


def solve_crossover(
    terms: Sequence[ScaledTerm], compute_s: float, letter: str, current: int
) -> Crossover:
    """The size of ``letter`` at which the collectives ``terms`` take as long as
    ``compute_s`` (which grows in proportion to the letter); ``current`` is its size now.

    A crossover below one element is no crossover: the strategy is compute-bound at every
    size it can have."""
    upper = letter.upper()
    if terms_comm_s(terms, 1.0) == 0:
        return Crossover(
            dimension=letter,
            size=None,
            comm_bound_below=None,
            current_size=current,
            note="this strategy needs no communication",
        )
    # growth rates per unit of n, where bandwidth terms dominate
    big = 1e12
    comm_big, compute_big = terms_comm_s(terms, big), compute_s * big
    if comm_big >= compute_big:
        ratio = comm_big / compute_big if compute_big else float("inf")
        return Crossover(
            dimension=letter,
            size=None,
            comm_bound_below=None,
            current_size=current,
            note=(
                f"communication grows with {upper} at least as fast as compute "
                f"(comm/compute -> {ratio:.3g}), so no {upper} makes it compute-bound"
            ),
        )
    lo, hi = 0.0, big
    for _ in range(400):
        mid = (lo + hi) / 2
        if terms_comm_s(terms, mid) > compute_s * mid:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-9 * hi:
            break
    scale = (lo + hi) / 2
    size = scale * current
    if size < 1:
        return Crossover(
            dimension=letter,
            size=None,
            comm_bound_below=False,
            current_size=current,
            note=(
                f"compute-bound at every {upper} >= 1: communication takes as long as "
                f"compute only below one element ({upper} = {size:.3g})"
            ),
        )
    where = "below" if current < size else "above"
    state = "communication-bound" if current < size else "compute-bound"
    regime = terms_regime(terms, scale)
    why = {
        "latency": " (there the collectives are latency-bound: per-hop latency, not bandwidth, "
        "sets this size)",
        "mixed": " (there some collectives are latency-bound)",
        "bandwidth": "",
    }[regime]
    return Crossover(
        dimension=letter,
        size=size,
        comm_bound_below=True,
        current_size=current,
        note=(
            f"communication-bound for {upper} < {_size_text(size)}, compute-bound above{why}; "
            f"at {upper} = {current} it is {state} ({where} the crossover)"
        ),
        regime=regime,
    )


def _size_text(size: float) -> str:
    """A size for people: a whole number of elements when it is one (``2550``), else 4
    significant digits."""
    return f"{size:,.0f}" if size >= 100 else f"{size:.4g}"


def hbm_crossover(plan: Plan, dimension: str | None = None) -> Crossover:
    """The size of ``dimension`` at which one chip's local einsum turns compute-bound:
    matmul time ``FLOPs/C`` equals HBM time ``bytes/W_hbm``, counting both local operands
    and the local result exactly (roofline.md: ``B > C/W_hbm``, 240 on v5e, for ``B << D, F``).

    FLOPs grow in proportion to the letter; bytes are a constant (the operands without it)
    plus a part in proportion (those with it), so the solution is closed-form."""
    letter = dimension or default_dimension(plan)
    current = plan.einsum.size(letter)
    einsum = plan.einsum
    chip = plan.mesh.hardware.chip
    hbm = chip.hbm_bytes_per_s
    upper = letter.upper()
    compute_per_unit = plan.cost.compute_s / current  # seconds per element of the letter
    fixed = growing = 0.0
    local = {
        "lhs": plan.operation.lhs,
        "rhs": plan.operation.rhs,
        "out": plan.operation.out,
    }
    axis_size = {a.name: a.size for a in plan.mesh.axes}
    for role, spec in local.items():
        letters = einsum.spec.operand(role)
        itemsize = dtype_bytes(einsum.accum_dtype if role == "out" else einsum.dtype)
        shape = spec.local_shape(einsum.shape(role), axis_size)
        seconds = itemsize * math.prod(shape) / hbm
        if letter in letters:
            growing += seconds / current
        else:
            fixed += seconds
    if compute_per_unit <= growing:
        return Crossover(
            dimension=letter,
            size=None,
            comm_bound_below=None,
            current_size=current,
            note=(
                f"HBM traffic grows with {upper} at least as fast as compute (every operand has "
                f"{upper}), so no {upper} makes the local einsum compute-bound"
            ),
        )
    size = fixed / (compute_per_unit - growing)
    if size < 1:
        return Crossover(
            dimension=letter,
            size=None,
            comm_bound_below=False,
            current_size=current,
            note=f"the local einsum is compute-bound at every {upper} >= 1",
        )
    state = "HBM-bound" if current < size else "compute-bound"
    return Crossover(
        dimension=letter,
        size=size,
        comm_bound_below=True,
        current_size=current,
        note=(
            f"HBM-bound for {upper} < {_size_text(size)}, compute-bound above (one chip's "
            f"roofline, operands and result counted); at {upper} = {current} it is {state}"
        ),
        regime="hbm",
    )


def axis_limit(plan: Plan, axis: str) -> float | None:
    """The size of mesh ``axis`` at which the collectives over it take as long as the
    matmul, with everything else held: each chip's matmul shrinks as ``1/size`` (the axis
    splits a letter at the op), a ring's bandwidth term does not change (``V/W``, the
    book's model for a TP degree). ``None`` when no collective runs over the axis or it
    splits no letter."""
    size = plan.mesh.axis_size(axis)
    if not any(axis in axes for _, axes in plan.assignment):
        return None
    comm = sum(
        step.cost.time_s
        for step in plan.collectives
        if step.cost is not None and axis in step.cost.axes
    )
    if comm == 0:
        return None
    return plan.cost.compute_s * size / comm
