"""Comparing the named strategies, and searching layouts across a program's stages.

``compare`` evaluates the book's named strategies (``strategies.named_strategies``, or the
ones given) and ranks them; a strategy that cannot run (a size the axes do not divide) or
does not fit in HBM keeps its reason.

``search`` looks for the best placement over every stage's own layout. A program's stages
(a block's attention, its MLP, and the norms and residual adds between them) are tied
together only through the *boundary layout* ``L`` of the activations between them: given
``L``, each matmul stage's cost depends on its own letter map ``σ_S`` (each mesh axis to one
of the stage's letters, or none) and on which of its batch axes also shard its parameters
(FSDP), and on nothing else. The batch is split over the same axes everywhere (the
data-parallel axes, those of ``L``). So the search is exact over that structure:

1. enumerate ``L`` (each axis on the batch letter, the sequence letter or neither);
2. for each matmul stage, enumerate ``σ_S`` (the other axes to the stage's other letters)
   and the FSDP axes, evaluate the stage's ops
   (forward, backward, optimizer) with the one evaluator, and keep its Pareto front in
   (time, persistent memory), where a stage's time is the sum over passes of its
   ``max(local, comm)``;
3. combine the fronts with the boundary ops' cost, keep the best combinations that fit in
   HBM, and evaluate each in full (the final numbers come from the same evaluator as every
   plan's, with communication overlapping compute across stages within a pass).

Axes that are physically interchangeable (same size and the same links, like the three
axes of a v5p cube) and play the same part in ``L`` are enumerated once, in one order.
The named strategies are points of this space, so the best found is never worse than the
best of them; ``Ranking.beats`` says by how much.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from ..errors import PlanError
from ..estimate import Cost, Overlap
from ..mesh import DeviceMesh
from ..plans import Rejected
from .autodiff import OptimizerSpec
from .evaluate import Evaluation, Placement, ProgramPlan
from .graph import Op, Phase, Program
from .strategies import Strategy, _stage_letters, build_placement, named_strategies, place


@dataclass(frozen=True, slots=True, kw_only=True)
class ProgramRanking:
    """Strategies for one program on one mesh, best first, and what could not run."""

    program: Program
    mesh: DeviceMesh
    overlap: Overlap
    strategies: tuple[ProgramPlan, ...]
    rejected: tuple[Rejected, ...] = ()
    #: the named strategies, evaluated (for ``search``: what the best is compared with)
    named: tuple[ProgramPlan, ...] = ()
    num_candidates: int = 0
    seconds: float = 0.0

    @property
    def best(self) -> ProgramPlan:
        return self.strategies[0]

    def find(self, name: str) -> ProgramPlan:
        """The plan of strategy ``name`` (``"fsdp=x,tp=y"``), from the ranking or the named."""
        wanted = Strategy.parse(name).name
        for plan in (*self.strategies, *self.named):
            if plan.name == wanted:
                return plan
        raise PlanError(
            f"no ranked strategy is named {wanted!r}; ranked: "
            f"{', '.join(p.name for p in self.strategies)}"
        )

    @property
    def best_named(self) -> ProgramPlan | None:
        return min(self.named, key=_rank_key) if self.named else None

    @property
    def beats(self) -> float | None:
        """How much faster the best plan is than the best named strategy (0.25 = 25%)."""
        named = self.best_named
        if named is None or not self.strategies:
            return None
        return named.time_s / self.best.time_s - 1


def _rank_key(plan: ProgramPlan) -> tuple[object, ...]:
    return (not plan.fits, plan.time_s, plan.cost.upper_bound_s, plan.memory.peak, plan.name)


def compare(
    program: Program,
    mesh: DeviceMesh,
    strategies: Iterable[Strategy | str] | None = None,
    *,
    optimizer: OptimizerSpec | None = None,
    overlap: Overlap = Overlap.FULL,
    idle_axes: bool = True,
    layers: int = 1,
) -> ProgramRanking:
    """Evaluate each strategy (the named ones by default) and rank them: fitting first,
    then by time. Strategies that cannot run are ``rejected`` with the reason. With
    ``layers``, each plan is that many copies of the program (``ProgramPlan.repeat``): its
    time and persistent memory scale, and ``fits`` is judged for the whole stack."""
    start = time.perf_counter()
    evaluation = Evaluation(program, mesh, optimizer or OptimizerSpec(), overlap)
    plans: list[ProgramPlan] = []
    rejected: list[Rejected] = []
    given = list(strategies) if strategies is not None else named_strategies(mesh)
    for item in given:
        strategy = Strategy.parse(item)
        result = evaluation(place(program, mesh, strategy, idle_axes=idle_axes))
        if isinstance(result, Rejected):
            rejected.append(result)
            continue
        if layers != 1:
            result = result.repeat(layers)
        plans.append(result)
        if not result.fits:
            rejected.append(
                Rejected(
                    strategy=result.name,
                    reason=result.memory.overflow(mesh.hardware.chip.hbm_capacity_bytes),
                )
            )
    plans.sort(key=_rank_key)
    return ProgramRanking(
        program=program,
        mesh=mesh,
        overlap=overlap,
        strategies=tuple(plans),
        rejected=tuple(rejected),
        named=tuple(plans),
        num_candidates=len(given),
        seconds=time.perf_counter() - start,
    )


# -- the layout search ---------------------------------------------------------------------


def _signature(mesh: DeviceMesh, axis: str) -> tuple[object, ...]:
    """What an axis is physically: its size and the links a collective over it uses."""
    group = mesh.group((axis,))
    spans = tuple(
        (
            span.tier.name,
            tuple((seg.size, seg.stride, seg.wraps) for seg in span.segments),
            span.num_children,
            span.chips_per_child,
        )
        for span in group.spans
    )
    return (group.size, spans)


def _assignments(
    axes: Sequence[str],
    classes: Mapping[str, object],
    choices: Sequence[str | None],
) -> Iterator[dict[str, str | None]]:
    """Each axis to one of ``choices``, once per orbit of interchangeable axes (axes with
    the same class take their choices in non-decreasing order)."""
    groups: dict[object, list[str]] = {}
    for axis in axes:
        groups.setdefault(classes[axis], []).append(axis)
    members = list(groups.values())
    index = {c: i for i, c in enumerate(choices)}
    per_group = [
        list(itertools.combinations_with_replacement(choices, len(group))) for group in members
    ]
    for combo in itertools.product(*per_group):
        out: dict[str, str | None] = {}
        for group, picks in zip(members, combo, strict=True):
            ordered = sorted(picks, key=lambda c: index[c])
            for axis, pick in zip(group, ordered, strict=True):
                out[axis] = pick
        yield out


def _letter_map(assignment: dict[str, str | None], order: Sequence[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for axis in order:
        letter = assignment.get(axis)
        if letter is not None:
            out.setdefault(letter, []).append(axis)
    return out


def _fsdp_choices(batch: Sequence[str], classes: Mapping[str, object]) -> Iterator[tuple[str, ...]]:
    """Which batch axes also shard the parameters (FSDP): every subset, once per orbit of
    interchangeable axes (how many of each class, the first ones)."""
    groups: dict[object, list[str]] = {}
    for axis in batch:
        groups.setdefault(classes[axis], []).append(axis)
    members = list(groups.values())
    for counts in itertools.product(*(range(len(g) + 1) for g in members)):
        chosen = {a for group, n in zip(members, counts, strict=True) for a in group[:n]}
        yield tuple(a for a in batch if a in chosen)


@dataclass(frozen=True, slots=True)
class _Point:
    time_s: float
    memory: float
    sigma: dict[str, list[str]]
    fsdp: tuple[str, ...]
    passes: dict[str, Cost]


def _stage_time(passes: dict[str, Cost]) -> float:
    return sum(cost.lower_bound_s for cost in passes.values())


def _pareto(points: list[_Point], keep: int) -> list[_Point]:
    """The points no other point beats in both time and memory (at most ``keep``, fastest
    first)."""
    front: list[_Point] = []
    for point in sorted(points, key=lambda p: (p.time_s, p.memory)):
        if not front or point.memory < front[-1].memory:
            front.append(point)
    return front[:keep]


#: Letters the search does not split: the head dimension (contracted by QK^T and the O
#: projection, so splitting it all-reduces the scores).
_NEVER = frozenset("h")


def search(
    program: Program,
    mesh: DeviceMesh,
    *,
    top: int = 5,
    optimizer: OptimizerSpec | None = None,
    overlap: Overlap = Overlap.FULL,
    idle_axes: bool = True,
    zero: int = 0,
    front: int = 12,
    layers: int = 1,
) -> ProgramRanking:
    """The best placements over every stage's own layout (see the module docstring);
    ``layers`` copies of the program per step, as in ``compare``."""
    mesh.check_searchable()
    start = time.perf_counter()
    spec = optimizer or OptimizerSpec()
    evaluation = Evaluation(program, mesh, spec, overlap)
    capacity = mesh.hardware.chip.hbm_capacity_bytes
    roles = program.roles
    sizes = program.sizes
    axes = [a.name for a in mesh.axes if a.size > 1]
    axis_size = {a.name: a.size for a in mesh.axes}
    signature = {a: _signature(mesh, a) for a in axes}
    boundary_letters: list[str | None] = [roles.batch]
    if roles.sequence != roles.batch:
        boundary_letters.append(roles.sequence)
    boundary_letters.append(None)
    matmul_stages = [s for s, kind in program.stages if kind == "matmul"]
    io_stages = {s for s, kind in program.stages if kind == "boundary"}
    param_stage = {}
    for param in program.params:
        consumer = next(
            (op for op, _ in program.consumers(param.name) if op.phase is Phase.FORWARD), None
        )
        if consumer is not None:
            param_stage[param.name] = consumer.stage
    stage_ops: dict[str, list[Op]] = {s: [] for s in matmul_stages}
    io_ops: list[Op] = []
    for op in program.ops:
        if op.phase is Phase.OPTIMIZER:
            owner = param_stage.get(op.of, "")
            if owner in stage_ops:
                stage_ops[owner].append(op)
            else:
                io_ops.append(op)
        elif op.stage in stage_ops:
            stage_ops[op.stage].append(op)
        else:
            io_ops.append(op)
    candidates = 0
    indivisible = 0
    combos: list[tuple[float, int, dict[str, list[str]], tuple[_Point, ...]]] = []
    counter = itertools.count()
    for boundary_assignment in _assignments(axes, signature, boundary_letters):
        boundary = _letter_map(boundary_assignment, axes)
        if any(sizes[c] % math.prod(axis_size[a] for a in group) for c, group in boundary.items()):
            indivisible += 1
            continue
        classes = {a: (signature[a], boundary_assignment[a]) for a in axes}
        base = build_placement(
            program,
            mesh,
            name="search",
            stages=dict.fromkeys(io_stages, boundary),
            boundary=boundary,
            idle_axes=idle_axes,
        )
        io = evaluation.evaluator(base).run_ops(io_ops)
        if isinstance(io, Rejected):
            indivisible += 1
            continue
        _, io_passes, _, io_memory = io
        fronts: list[list[_Point]] = []
        data = boundary.get(roles.batch, [])
        free = [a for a in axes if a not in data]
        for stage in matmul_stages:
            letters = [
                c for c in _stage_letters(program, stage) if c not in _NEVER and c != roles.batch
            ]
            points: list[_Point] = []
            for assignment in _assignments(free, classes, [*letters, None]):
                sigma = _letter_map(assignment, axes)
                if data and roles.batch in _stage_letters(program, stage):
                    sigma = {roles.batch: list(data), **sigma}
                if any(
                    sizes[c] % math.prod(axis_size[a] for a in group) for c, group in sigma.items()
                ):
                    indivisible += 1
                    continue
                for fsdp in _fsdp_choices(sigma.get(roles.batch, []), classes):
                    candidates += 1
                    dp = tuple(a for a in sigma.get(roles.batch, []) if a not in fsdp)
                    placement = build_placement(
                        program,
                        mesh,
                        name="search",
                        stages={stage: sigma, **dict.fromkeys(io_stages, boundary)},
                        boundary=boundary,
                        fsdp=fsdp,
                        dp=dp,
                        zero=zero,
                        idle_axes=idle_axes,
                    )
                    result = evaluation.evaluator(placement).run_ops(stage_ops[stage])
                    if isinstance(result, Rejected):
                        indivisible += 1
                        continue
                    _, passes, _, memory = result
                    points.append(
                        _Point(_stage_time(passes), memory.persistent, sigma, fsdp, passes)
                    )
            if not points:
                fronts = []
                break
            fronts.append(_pareto(points, front))
        if len(fronts) != len(matmul_stages):
            continue
        for picks in itertools.product(*fronts):
            persistent = layers * (io_memory.persistent + sum(p.memory for p in picks))
            if persistent > capacity:
                continue
            combined: dict[str, Cost] = dict(io_passes)
            for pick in picks:
                for name, cost in pick.passes.items():
                    combined[name] = combined.get(name, Cost.zero()) + cost
            total = sum(cost.lower_bound_s for cost in combined.values())
            combos.append((total, next(counter), boundary, picks))
    best = heapq.nsmallest(max(top * 4, 8), combos, key=lambda c: (c[0], c[1]))
    plans: dict[str, ProgramPlan] = {}
    rejected: list[Rejected] = []
    for _, _, boundary, picks in best:
        strategy = _strategy(
            program, mesh, boundary=boundary, stages=matmul_stages, picks=picks, zero=zero
        )
        plan = evaluation(place(program, mesh, strategy, idle_axes=idle_axes))
        if isinstance(plan, Rejected):  # pragma: no cover - evaluated stage by stage above
            rejected.append(plan)
            continue
        if layers != 1:
            plan = plan.repeat(layers)
        if not plan.fits:
            rejected.append(Rejected(strategy=plan.name, reason=plan.memory.overflow(capacity)))
            continue
        plans.setdefault(plan.name, plan)
    named = compare(
        program, mesh, optimizer=spec, overlap=overlap, idle_axes=idle_axes, layers=layers
    )
    ranked = sorted(plans.values(), key=_rank_key)
    for plan in named.strategies:  # a named strategy that ties is shown by its name
        for i, found in enumerate(ranked):
            if _same_layout(found.placement, plan.placement):
                ranked[i] = plan
    ranked = sorted({p.name: p for p in ranked}.values(), key=_rank_key)[:top]
    if not ranked:
        reasons = "; ".join(r.reason for r in [*rejected, *named.rejected][:2])
        raise PlanError(
            f"no placement of {program.name} fits on {mesh}"
            + (f": {reasons}" if reasons else "")
            + ". Use more chips, a remat policy, ZeRO (--zero) or a smaller batch"
        )
    return ProgramRanking(
        program=program,
        mesh=mesh,
        overlap=overlap,
        strategies=tuple(ranked),
        rejected=tuple(rejected) + named.rejected,
        named=named.strategies,
        num_candidates=candidates + indivisible,
        seconds=time.perf_counter() - start,
    )


def _same_layout(a: Placement, b: Placement) -> bool:
    return (
        {s: m for s, m in a.stages if m} == {s: m for s, m in b.stages if m}
        and a.storage == b.storage
        and a.homes == b.homes
    )


def _strategy(
    program: Program,
    mesh: DeviceMesh,
    *,
    boundary: dict[str, list[str]],
    stages: list[str],
    picks: Sequence[_Point],
    zero: int,
) -> Strategy:
    """The search's placement as a strategy the user can pass back: every stage's letters
    pinned, the FSDP axes named."""
    pins: list[tuple[str, str, tuple[str, ...]]] = []
    io = [s for s, kind in program.stages if kind == "boundary"]
    io_stage = io[0] if io else ""
    if io_stage:
        pins += [(io_stage, c, tuple(a)) for c, a in boundary.items()]
    fsdp: list[str] = []
    dp: list[str] = []
    for stage, pick in zip(stages, picks, strict=True):
        pins += [(stage, c, tuple(a)) for c, a in pick.sigma.items()]
        for axis in pick.fsdp:
            if axis not in fsdp:
                fsdp.append(axis)
        batch = pick.sigma.get(program.roles.batch, [])
        dp += [a for a in batch if a not in pick.fsdp and a not in dp]
    dp = [a for a in dp if a not in fsdp]
    order = mesh.axis_names
    strategy = Strategy(
        dp=tuple(a for a in order if a in dp),
        fsdp=tuple(a for a in order if a in fsdp),
        zero=zero if dp else 0,
        pins=tuple(pins),
    )
    return _simplest(program, mesh, strategy)


def _simplest(program: Program, mesh: DeviceMesh, strategy: Strategy) -> Strategy:
    """Drop pins the named parts already imply (so a search result that is a named
    strategy reads as one)."""
    target = place(program, mesh, strategy)
    bare = Strategy(dp=strategy.dp, fsdp=strategy.fsdp, zero=strategy.zero)
    minimal = list(strategy.pins)
    for pin in strategy.pins:
        without = [p for p in minimal if p != pin]
        trial = Strategy(dp=bare.dp, fsdp=bare.fsdp, zero=bare.zero, pins=tuple(without))
        if _same_layout(place(program, mesh, trial), target):
            minimal = without
    return Strategy(dp=bare.dp, fsdp=bare.fsdp, zero=bare.zero, pins=tuple(minimal))
