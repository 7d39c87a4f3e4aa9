"""When does chip-to-chip communication take over? The crossover of one strategy.

For a fixed plan, scale one letter's size ``n`` (the batch, by default). Compute time
grows in proportion to ``n``; each collective's bandwidth term grows with ``n`` if its
array has that letter and stays put otherwise, and its latency term never moves. The
crossover is the ``n`` at which communication time equals compute time.

``comm(n) = Σ max(latency_i, bandwidth_i(n))`` is convex and ``compute(n)`` linear, so when
compute grows faster than communication there is exactly one crossover and the strategy is
communication-bound below it (the book's ``B > C/W`` rules: ``B > 2550`` for an all-gather of
the weights on v5p); when communication grows at least as fast, there is none.
"""

from __future__ import annotations

from dataclasses import dataclass

from .collectives import combine_terms_s
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


def comm_and_compute_s(plan: Plan, dimension: str, size: float) -> tuple[float, float]:
    """(communication, compute) seconds of ``plan`` with ``dimension`` resized to ``size``."""
    scale = size / plan.einsum.size(dimension)
    compute = plan.cost.compute_s * scale
    comm = 0.0
    for step in plan.collectives:
        cost = step.cost
        if cost is None or cost.group_size == 1:
            continue
        letters = plan.einsum.spec.operand(step.operand)
        bandwidth = cost.bandwidth_s * (scale if dimension in letters else 1.0)
        comm += combine_terms_s(cost.kind, bandwidth, cost.latency_s)
    return comm, compute


def comm_regime(plan: Plan, dimension: str, size: float) -> str:
    """Whether the collectives are latency- or bandwidth-bound with ``dimension`` at ``size``."""
    scale = size / plan.einsum.size(dimension)
    latency = bandwidth = 0
    for step in plan.collectives:
        cost = step.cost
        if cost is None or cost.group_size == 1:
            continue
        letters = plan.einsum.spec.operand(step.operand)
        bw = cost.bandwidth_s * (scale if dimension in letters else 1.0)
        if cost.latency_s > bw:
            latency += 1
        else:
            bandwidth += 1
    if latency and bandwidth:
        return "mixed"
    return "latency" if latency else "bandwidth"


def crossover(plan: Plan, dimension: str | None = None) -> Crossover:
    """Solve ``comm(n) = compute(n)`` for the plan's strategy (bisection, exact to 1e-9)."""
    letter = dimension or default_dimension(plan)
    current = plan.einsum.size(letter)  # raises a clear error for an unknown letter
    comm_now, _ = comm_and_compute_s(plan, letter, current)
    if comm_now == 0:
        return Crossover(
            dimension=letter,
            size=None,
            comm_bound_below=None,
            current_size=current,
            note="this strategy needs no communication",
        )
    # growth rates per unit of n, where bandwidth terms dominate
    big = current * 1e12
    comm_big, compute_big = comm_and_compute_s(plan, letter, big)
    if comm_big >= compute_big:
        ratio = comm_big / compute_big if compute_big else float("inf")
        return Crossover(
            dimension=letter,
            size=None,
            comm_bound_below=None,
            current_size=current,
            note=(
                f"communication grows with {letter.upper()} at least as fast as compute "
                f"(comm/compute -> {ratio:.3g}), so no {letter.upper()} makes it compute-bound"
            ),
        )
    lo, hi = 0.0, big
    for _ in range(400):
        mid = (lo + hi) / 2
        comm, compute = comm_and_compute_s(plan, letter, mid)
        if comm > compute:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-9 * hi:
            break
    size = (lo + hi) / 2
    where = "below" if current < size else "above"
    state = "communication-bound" if current < size else "compute-bound"
    regime = comm_regime(plan, letter, size)
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
            f"communication-bound for {letter.upper()} < {size:.6g}, compute-bound above{why}; "
            f"at {letter.upper()} = {current} it is {state} ({where} the crossover)"
        ),
        regime=regime,
    )
