"""When does a strategy turn communication-bound? Solved from the plan, not restated.

* ``critical_batch``: hold the strategy and scale the batch. Matmul time grows in proportion;
  a collective's bandwidth term grows when its tensor has the batch letter (activations) and
  stays when it does not (weights and their gradients); latency terms stay. The batch where
  communication equals compute is the critical batch: the book's ``B/X > C/W`` (2550 tokens
  per chip for FSDP on one v5p axis, 850 over three), from the plan's own collectives.
* ``max_model_parallel``: hold the tokens per data shard and vary the tensor-parallel degree
  ``Y``. Matmul time per chip falls as ``1/Y``; a collective over the tp axes (activations)
  keeps its bandwidth term (a ring moves ``V/W`` whatever its size, the book's model), one
  over other axes of a tensor split by tp shrinks as ``1/Y``. Communication equals compute
  at ``Y* = (compute·Y - scaled comm·Y) / constant comm``: the book's ``Y < M_Y·F/2550``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ..crossover import Crossover, ScaledTerm, solve_crossover
from .evaluate import _PASS, ProgramPlan


def program_terms(
    plan: ProgramPlan, letter: str, pass_name: str, axes: Iterable[str] | None = None
) -> list[ScaledTerm]:
    """The collectives of one pass (over ``axes`` only, if given) as crossover terms."""
    only = None if axes is None else set(axes)
    out: list[ScaledTerm] = []
    for op in plan.ops:
        if _PASS[op.op.phase] != pass_name:
            continue
        for step in op.collectives:
            cost = step.cost
            if cost is None or cost.group_size == 1:
                continue
            if only is not None and not set(cost.axes) <= only:
                continue
            letters = plan.program.tensor(step.operand).letters
            out.append(
                ScaledTerm(
                    cost.kind,
                    cost.bandwidth_s * plan.layers,
                    cost.latency_s * plan.layers,
                    letter in letters,
                    plan.mesh.link_resources(cost.axes),
                    cost.combine,
                )
            )
    return out


@dataclass(frozen=True, slots=True, kw_only=True)
class CriticalBatch:
    """The batch above which every pass of the step is compute-bound (``None``: none)."""

    tokens: float | None
    tokens_per_chip: float | None
    crossover: Crossover
    pass_name: str = ""  # the pass that sets it

    @property
    def note(self) -> str:
        return self.crossover.note


def critical_batch(plan: ProgramPlan, *, axes: Iterable[str] | None = None) -> CriticalBatch:
    """Each pass overlaps its collectives only with its own compute (the book: DP's gradient
    all-reduces hide behind the backward pass, ``8BDF/X·C`` against ``8DF/W``), so each pass
    has its own crossover; the step is compute-bound above the largest. With ``axes``, only
    the collectives over those axes count (when does the data-parallel part turn
    communication-bound?). A pass without matmuls (the optimizer's) has no crossover."""
    program = plan.program
    letter = program.roles.batch
    current = program.size(letter)
    worst: tuple[Crossover, str] | None = None
    communicates = False
    for name, cost in plan.passes:
        terms = program_terms(plan, letter, name, axes)
        if not terms or cost.compute_s == 0:
            continue
        communicates = True
        cross = solve_crossover(terms, cost.compute_s, letter, current)
        if cross.size is None and cross.comm_bound_below is None:
            worst = (cross, name)  # never compute-bound: that decides it
            break
        if cross.size is None:
            continue
        if worst is None or (worst[0].size is not None and cross.size > worst[0].size):
            worst = (cross, name)
    if worst is None:
        none = Crossover(
            dimension=letter,
            size=None,
            comm_bound_below=None,
            current_size=current,
            note=(
                "its collectives never outlast the compute: compute-bound at every batch"
                if communicates
                else "this strategy needs no communication"
            ),
        )
        return CriticalBatch(tokens=None, tokens_per_chip=None, crossover=none)
    cross, name = worst
    if cross.size is None:
        return CriticalBatch(tokens=None, tokens_per_chip=None, crossover=cross, pass_name=name)
    tokens = program.tokens * cross.size / current
    per_chip = tokens / plan.mesh.num_devices
    state = "compute-bound" if program.tokens >= tokens else "communication-bound"
    note = (
        f"the {name} pass is communication-bound below {tokens:,.0f} tokens per step "
        f"({per_chip:,.0f} per chip), compute-bound above; at {program.tokens:,} tokens it is "
        f"{state}"
    )
    if cross.regime in ("latency", "mixed"):
        note += " (latency-bound collectives set this batch)"
    return CriticalBatch(
        tokens=tokens,
        tokens_per_chip=per_chip,
        crossover=Crossover(
            dimension=cross.dimension,
            size=cross.size,
            comm_bound_below=cross.comm_bound_below,
            current_size=cross.current_size,
            note=note,
            regime=cross.regime,
        ),
        pass_name=name,
    )


def tp_axes(plan: ProgramPlan) -> tuple[str, ...]:
    """The axes that split a hidden (tensor-parallel) letter at some matmul stage."""
    hidden = set(plan.program.roles.hidden)
    axes: dict[str, None] = {}
    for stage, mapping in plan.placement.stages:
        if plan.program.stage_kind(stage) != "matmul":
            continue
        for letter, group in mapping:
            if letter in hidden:
                for axis in group:
                    axes.setdefault(axis)
    return tuple(a for a in plan.mesh.axis_names if a in axes)


def max_model_parallel(plan: ProgramPlan) -> float | None:
    """The tensor-parallel degree ``Y*`` at which the collectives over the tp axes take as
    long as the matmuls, in the tightest pass (``None`` without tp axes, or without
    collectives over them).

    The tp collectives move activations: a ring moves ``V/W`` whatever its size, so their
    time does not change with ``Y``, while each chip's matmul time is ``T·Y_now/Y``: the
    book's ``T_math = 4BDF/(Y·C)`` against ``T_comms = 4BD/W``, so ``Y* = F·W/C`` per axis
    (``M_Y·F/2550`` on v5p). Compute-bound for ``Y < Y*``."""
    axes = tp_axes(plan)
    if not axes:
        return None
    degree = 1
    for axis in axes:
        degree *= plan.mesh.axis_size(axis)
    tp = set(axes)
    best: float | None = None
    for name, cost in plan.passes:
        comm = 0.0
        for op in plan.ops:
            if _PASS[op.op.phase] != name:
                continue
            for step in op.collectives:
                c = step.cost
                if c is not None and c.group_size > 1 and set(c.axes) <= tp:
                    comm += c.time_s * plan.layers
        if comm == 0:
            continue
        limit = cost.compute_s * degree / comm
        best = limit if best is None else min(best, limit)
    return best
