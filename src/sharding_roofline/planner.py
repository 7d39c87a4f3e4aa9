"""Which collectives a sharded einsum needs, and the ranking of every strategy.

A *strategy* assigns mesh axes to the einsum's letters, each axis to at most one letter
(``σ``, e.g. ``b:x, f:y``). It fixes the layout of both operands at the op, so the local
einsum is valid by construction: a letter shared by the operands is split the same way in
both, and no mesh axis splits two different letters (the book's invalid case 4). Axes on
summed letters leave the local result unreduced (``{U_y}``).

Around that local einsum the planner adds the cheapest exact sequence of collectives:

* before it, each operand goes from its stored layout to its layout at the op
  (all-gather, all-to-all, or a free dynamic slice of a replicated dimension);
* after it, the unreduced axes are reduced, by reduce-scatter onto a dimension the output
  wants split by that axis, else by all-reduce, and the result is resharded to the
  requested output.

The book's four cases fall out: case 1 needs nothing; case 2 (``A[I, J_x]·B[J, K]``) is
either an all-gather of A, or a free slice of B, a partial matmul and an all-reduce, and
the cheaper wins; case 3 reduces; case 4 gathers one input. ``estimate`` fixes the stored
operand layouts and the output and picks the best strategy; ``search`` also chooses the
free layouts and ranks every candidate. Invalid candidates are never errors inside the
search: they become ``Rejected(strategy, reason)``, which ``plan --explain`` prints.

Each resharding step is exact about layout: an all-gather removes the minor-most axes of a
dimension, a slice or reduce-scatter appends minor-most axes, and an all-to-all moves the
minor-most axes of one dimension to the end of another, so a ``shard_map`` program can issue
exactly these steps (the validator does).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from .collectives import (
    Collective,
    CollectiveRate,
    bytes_sent_per_chip,
    collective_cost,
    group_bytes,
    rate,
)
from .dtypes import dtype_bytes
from .einsum import Einsum
from .errors import PlanError, SpecError
from .estimate import CommTerm, Cost, Overlap, local_cost
from .mesh import DeviceMesh
from .plans import ROLES, Plan, Ranking, Rejected, Step
from .reshard import Dims, RawStep, reshard_path
from .sharding import ShardedOperation, ShardingSpec
from .units import format_bytes

# -- the search --------------------------------------------------------------------------------


@dataclass(slots=True)
class _Path:
    steps: tuple[RawStep, ...]
    time_s: float
    bytes_sent: float
    #: seconds per physical dimension whose links the path's collectives use
    busy: tuple[tuple[int, float], ...] = ()


_EMPTY = _Path((), 0.0, 0.0)


def _comm_lower_s(*paths: _Path) -> float:
    """The busiest link's seconds over the paths (``Cost.comm_lower_s`` of the plan)."""
    busy: dict[int, float] = {}
    for path in paths:
        for resource, seconds in path.busy:
            busy[resource] = busy.get(resource, 0.0) + seconds
    return max(busy.values()) if busy else 0.0


@dataclass(slots=True)
class _Context:
    """Per-request caches for the hot path: sizes, collective rates, paths."""

    einsum: Einsum
    mesh: DeviceMesh
    overlap: Overlap
    fixed: dict[str, Dims]
    idle_axes: bool = True
    axis_size: dict[str, int] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    letters: dict[str, str] = field(default_factory=dict)
    itemsize: dict[str, float] = field(default_factory=dict)
    peak_flops_per_s: float = 0.0
    hbm_bytes_per_s: float = 0.0
    hbm_capacity_bytes: float = 0.0
    mesh_order: tuple[str, ...] = ()
    axis_items: tuple[tuple[str, int], ...] = ()
    num_devices: int = 1
    _elems: dict[tuple[str, Dims], int] = field(default_factory=dict)
    _divisible: dict[tuple[str, Dims], bool] = field(default_factory=dict)
    _pieces: dict[tuple[str, ...], int] = field(default_factory=dict)
    _rates: dict[tuple[Collective, tuple[str, ...]], CollectiveRate] = field(default_factory=dict)
    _paths: dict[tuple[str, Dims, Dims, tuple[str, ...]], _Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        spec = self.einsum.spec
        self.axis_size = {axis.name: axis.size for axis in self.mesh.axes}
        self.sizes = dict(self.einsum.dims)
        self.letters = {"lhs": spec.lhs, "rhs": spec.rhs, "out": spec.out}
        self.itemsize = {
            "lhs": dtype_bytes(self.einsum.dtype),
            "rhs": dtype_bytes(self.einsum.dtype),
            "out": dtype_bytes(self.einsum.accum_dtype),
        }
        chip = self.mesh.hardware.chip
        self.peak_flops_per_s = chip.peak_flops_per_s_for(self.einsum.dtype)
        self.hbm_bytes_per_s = chip.hbm_bytes_per_s
        self.hbm_capacity_bytes = chip.hbm_capacity_bytes
        self.mesh_order = self.mesh.axis_names
        self.axis_items = tuple(self.axis_size.items())
        self.num_devices = self.mesh.num_devices

    def pieces(self, axes: tuple[str, ...]) -> int:
        """How many pieces ``axes`` cut a dimension into (the product of their sizes)."""
        value = self._pieces.get(axes)
        if value is None:
            value = math.prod(self.axis_size[a] for a in axes)
            self._pieces[axes] = value
        return value

    def elements(self, role: str, dims: Dims) -> int:
        key = (role, dims)
        value = self._elems.get(key)
        if value is None:
            value = 1
            for letter, axes in zip(self.letters[role], dims, strict=True):
                value *= self.sizes[letter] // self.pieces(axes)
            self._elems[key] = value
        return value

    def divisible(self, role: str, dims: Dims) -> bool:
        key = (role, dims)
        value = self._divisible.get(key)
        if value is None:
            value = all(
                self.sizes[letter] % self.pieces(axes) == 0
                for letter, axes in zip(self.letters[role], dims, strict=True)
            )
            self._divisible[key] = value
        return value

    def path(self, role: str, src: Dims, dst: Dims, unreduced: tuple[str, ...] = ()) -> _Path:
        """The cheaper of the plain resharding and the one that also gathers over idle
        replicated axes (memoised)."""
        key = (role, src, dst, unreduced)
        cached = self._paths.get(key)
        if cached is not None:
            return cached
        if src == dst and not unreduced:
            self._paths[key] = _EMPTY
            return _EMPTY
        plain = self._cost_path(role, reshard_path(src, dst, unreduced, self.mesh_order))
        if not self.idle_axes or not any(step[0] is Collective.ALL_GATHER for step in plain.steps):
            self._paths[key] = plain  # idle axes only ever join an all-gather
            return plain
        # Only divisibility by products of axis sizes matters to the path, so key the cache by
        # gcd(size, number of devices): a sweep over sizes then reuses the cached paths.
        shape = tuple(math.gcd(self.sizes[c], self.num_devices) for c in self.letters[role])
        spread = reshard_path(src, dst, unreduced, self.mesh_order, (shape, self.axis_items))
        best = plain
        if spread != plain.steps:
            wide = self._cost_path(role, spread)
            if (wide.time_s, wide.bytes_sent) < (plain.time_s, plain.bytes_sent):
                best = wide
        self._paths[key] = best
        return best

    def _cost_path(self, role: str, steps: tuple[RawStep, ...]) -> _Path:
        # a step over axes of size 1 moves nothing (and must not count as a resharded copy)
        steps = tuple(step for step in steps if self.pieces(step[1]) > 1)
        time_s = 0.0
        sent = 0.0
        busy: dict[int, float] = {}
        itemsize = self.itemsize[role]
        for kind, axes, before, _after, _ub, _ua in steps:
            if kind is None:
                continue
            if not self.divisible(role, before):
                time_s = math.inf  # an intermediate layout the sizes cannot take
                break
            r = self._rates.get((kind, axes))
            if r is None:
                r = self._rates[(kind, axes)] = rate(self.mesh, kind, axes)
            if r.group_size == 1:
                continue
            elements = self.elements(role, before)
            seconds = r.time_s(group_bytes(kind, elements, r.group_size, itemsize))
            time_s += seconds
            sent += bytes_sent_per_chip(kind, elements, r.group_size, itemsize)
            for resource in self.mesh.link_resources(axes):
                busy[resource] = busy.get(resource, 0.0) + seconds
        return _Path(steps, time_s, sent, tuple(busy.items()))


class _Candidate(NamedTuple):
    """A strategy in the hot path: σ and the output it produces, with its numbers (a
    NamedTuple: the search makes one per candidate)."""

    key: tuple[Any, ...]
    sigma: tuple[tuple[str, ...], ...]
    out: Dims
    memory_bytes: float


def _outside(allowed: tuple[str, ...], *paths: _Path) -> tuple[str, ...]:
    """The axes of the paths' collectives that ``allowed`` does not list."""
    bad: dict[str, None] = {}
    for path in paths:
        for kind, axes, *_ in path.steps:
            if kind is not None:
                for axis in axes:
                    if axis not in allowed:
                        bad.setdefault(axis)
    return tuple(bad)


def _allowed_axes(axes: Iterable[str] | str, mesh: DeviceMesh) -> tuple[str, ...]:
    names = [a.strip() for a in (axes.split(",") if isinstance(axes, str) else axes)]
    names = [a for a in names if a and a != "None"]
    return mesh.ordered(names)


def parse_at_op(
    at_op: Mapping[str, Any] | str | None, einsum: Einsum, mesh: DeviceMesh
) -> dict[str, tuple[str, ...]]:
    """``"b=x,d=None,f=y+z"`` (or a mapping) -> ``{"b": ("x",), "d": (), "f": ("y", "z")}``,
    checked against the einsum's letters, the mesh's axes and divisibility."""
    if at_op is None:
        return {}
    items: list[tuple[str, str]] = []
    if isinstance(at_op, str):
        for part in at_op.split(","):
            letter, eq, value = part.partition("=")
            if not eq:
                raise SpecError(
                    f"--at-op {at_op!r}: {part.strip()!r} is not LETTER=AXES; write e.g. "
                    "b=x,d=None,f=y (None: not split at the op)"
                )
            items.append((letter.strip().lower(), value.strip()))
    else:
        for letter, value in at_op.items():
            text = value if isinstance(value, str) else "+".join(value)
            items.append((letter, text))
    letters = einsum.spec.letters
    pins: dict[str, tuple[str, ...]] = {}
    used: dict[str, str] = {}
    for letter, value in items:
        if letter not in letters:
            raise SpecError(
                f"--at-op: {letter!r} is not a letter of {einsum.spec.equation!r} (letters: "
                f"{', '.join(letters)})"
            )
        if letter in pins:
            raise SpecError(f"--at-op: letter {letter!r} is given twice")
        group = tuple(a.strip() for a in value.replace("(", "").replace(")", "").split("+"))
        group = tuple(a for a in group if a and a not in ("None", "none", "-"))
        for axis in group:
            mesh.axis_size(axis)  # a clear error for an unknown axis
            if axis in used:
                raise SpecError(
                    f"--at-op: mesh axis {axis!r} splits both {used[axis]!r} and {letter!r}; a "
                    "mesh axis splits at most one letter at the op"
                )
            used[axis] = letter
        pieces = math.prod(mesh.axis_size(a) for a in group)
        if einsum.size(letter) % pieces:
            raise SpecError(
                f"--at-op: {letter.upper()} (size {einsum.size(letter)}) does not divide over "
                f"{'+'.join(group)} ({pieces} pieces); pad it or split it over fewer axes"
            )
        pins[letter] = group
    return pins


def _sigma_dims(sigma: Mapping[str, tuple[str, ...]], letters: str) -> Dims:
    return tuple(sigma[c] for c in letters)


class Planner:
    """Plans one einsum on one mesh. ``estimate`` (every layout fixed) and ``search``."""

    def __init__(
        self,
        einsum: Einsum,
        mesh: DeviceMesh,
        *,
        lhs: Any = None,
        rhs: Any = None,
        out: Any = None,
        overlap: Overlap = Overlap.FULL,
        check_memory: bool = True,
        at_op: Mapping[str, Any] | str | None = None,
        idle_axes: bool = True,
        axes: Iterable[str] | str | None = None,
    ) -> None:
        """``at_op`` pins letters' layouts at the op (``"b=x,d=None,f=y"``: the strategy
        σ itself, for the book's textbook comparisons); ``idle_axes=False`` forbids widening
        gathers over idle replicated axes; ``axes`` lists the only mesh axes collectives may
        run over (``"x"``: everything else is rejected, with the reason)."""
        self.einsum = einsum
        mesh.check_searchable()
        self.mesh = mesh
        self.overlap = overlap
        self.check_memory = check_memory
        self.pins = parse_at_op(at_op, einsum, mesh)
        self.allowed = None if axes is None else _allowed_axes(axes, mesh)
        spec = einsum.spec
        axis_size = {axis.name: axis.size for axis in mesh.axes}
        fixed: dict[str, Dims] = {}
        for role, given in (("lhs", lhs), ("rhs", rhs), ("out", out)):
            if given is None:
                continue
            letters = spec.operand(role)
            # A PartitionSpec object shorter than the array is padded with None, as JAX does;
            # a typed string must give every dimension (a short one is usually a mistake).
            pad = None if isinstance(given, str) else len(letters)
            sharding = ShardingSpec.parse(given, rank=pad)
            if sharding.rank != len(letters):
                raise SpecError(
                    f"--{role} {sharding.text()!r} has {sharding.rank} entries but the {role} "
                    f"{letters!r} of {spec.equation!r} has {len(letters)} dimensions; give one "
                    "entry per dimension (None for a replicated one)"
                )
            sharding.check(
                shape=einsum.shape(role),
                axis_size=axis_size,
                what=einsum.name(role),
                letters=letters,
            )
            fixed[role] = sharding.dims
        self.fixed = fixed
        self.ctx = _Context(
            einsum=einsum, mesh=mesh, overlap=overlap, fixed=fixed, idle_axes=idle_axes
        )
        self.letters = spec.letters
        self.summed = set(spec.summed)

    # -- enumeration ----------------------------------------------------------------------

    def assignments(self) -> Iterator[dict[str, tuple[str, ...]]]:
        """Every σ: each mesh axis of size > 1 to one letter or to none. Within a letter,
        axes go in mesh order, unless a fixed layout splits that letter over exactly the same
        axes in another order (then that order, so no resharding is needed). Pinned letters
        (``at_op``) keep their axes, which no other letter takes."""
        axes = [axis.name for axis in self.mesh.axes if axis.size > 1]
        choices: tuple[str | None, ...] = (*self.letters, None)
        preferred: dict[str, dict[frozenset[str], tuple[str, ...]]] = {}
        for role, dims in self.fixed.items():
            for letter, group in zip(self.einsum.spec.operand(role), dims, strict=True):
                if group:
                    preferred.setdefault(letter, {}).setdefault(frozenset(group), group)
        pinned_axes = {a for group in self.pins.values() for a in group}
        free = [a for a in axes if a not in pinned_axes]
        free_choices = tuple(c for c in choices if c not in self.pins)
        for free_targets in itertools.product(free_choices, repeat=len(free)):
            chosen = dict(zip(free, free_targets, strict=True))
            sigma: dict[str, list[str]] = {letter: [] for letter in self.letters}
            for axis in axes:
                target = chosen.get(axis)
                if target is not None:
                    sigma[target].append(axis)
            for letter, group in self.pins.items():
                sigma[letter] = list(group)
            if not preferred:
                yield {letter: tuple(group) for letter, group in sigma.items()}
                continue
            yield {
                letter: preferred.get(letter, {}).get(frozenset(group), tuple(group))
                for letter, group in sigma.items()
            }

    def _out_variants(
        self, sigma: Mapping[str, tuple[str, ...]], unreduced: tuple[str, ...]
    ) -> Iterator[Dims]:
        """The outputs a free ``out`` may take: σ's output layout, with each unreduced axis
        either all-reduced away or reduce-scattered onto one output letter."""
        spec = self.einsum.spec
        base = _sigma_dims(sigma, spec.out)
        if not unreduced:
            yield base
            return
        targets = (None, *range(len(spec.out)))
        for choice in itertools.product(targets, repeat=len(unreduced)):
            dims = [list(d) for d in base]
            for axis, target in zip(unreduced, choice, strict=True):
                if target is not None:
                    dims[target].append(axis)
            yield tuple(tuple(d) for d in dims)

    # -- evaluation -------------------------------------------------------------------------

    def _evaluate(
        self, sigma: Mapping[str, tuple[str, ...]], out: Dims | None
    ) -> Iterator[_Candidate | Rejected]:
        ctx = self.ctx
        spec = self.einsum.spec
        lhs_op = _sigma_dims(sigma, spec.lhs)
        rhs_op = _sigma_dims(sigma, spec.rhs)
        local = _sigma_dims(sigma, spec.out)
        unreduced = tuple(axis for axis in ctx.mesh_order for c in self.summed if axis in sigma[c])
        local_sizes: dict[str, int] = {}
        for letter, axes in sigma.items():
            pieces = ctx.pieces(axes)
            if ctx.sizes[letter] % pieces:
                yield Rejected(
                    strategy=self._sigma_text(sigma),
                    reason=(
                        f"{letter.upper()} (size {ctx.sizes[letter]}) does not divide over "
                        f"{'+'.join(axes)} ({pieces} pieces)"
                    ),
                )
                return
            local_sizes[letter] = ctx.sizes[letter] // pieces
        flops = spec.flops(local_sizes)
        stored_lhs = self.fixed.get("lhs", lhs_op)
        stored_rhs = self.fixed.get("rhs", rhs_op)
        pre_l = ctx.path("lhs", stored_lhs, lhs_op) if stored_lhs != lhs_op else _EMPTY
        pre_r = ctx.path("rhs", stored_rhs, rhs_op) if stored_rhs != rhs_op else _EMPTY
        lhs_bytes = ctx.elements("lhs", lhs_op) * ctx.itemsize["lhs"]
        rhs_bytes = ctx.elements("rhs", rhs_op) * ctx.itemsize["rhs"]
        local_bytes = ctx.elements("out", local) * ctx.itemsize["out"]
        compute_s = flops / ctx.peak_flops_per_s
        hbm_s = (lhs_bytes + rhs_bytes + local_bytes) / ctx.hbm_bytes_per_s
        memory = (
            ctx.elements("lhs", stored_lhs) * ctx.itemsize["lhs"]
            + ctx.elements("rhs", stored_rhs) * ctx.itemsize["rhs"]
            + (lhs_bytes if pre_l.steps else 0)
            + (rhs_bytes if pre_r.steps else 0)
            + local_bytes
        )
        sig = tuple(sigma[c] for c in self.letters)
        outs = [out] if out is not None else list(self._out_variants(sigma, unreduced))
        for target in outs:
            if out is None and not ctx.divisible("out", target):
                continue
            post = (
                _EMPTY
                if target == local and not unreduced
                else ctx.path("out", local, target, unreduced)
            )
            comm_s = pre_l.time_s + pre_r.time_s + post.time_s
            if self.allowed is not None:
                outside = _outside(self.allowed, pre_l, pre_r, post)
                if outside:
                    yield Rejected(
                        strategy=self._sigma_text(sigma),
                        reason=(
                            f"needs a collective over {'+'.join(outside)}, and --axes allows "
                            f"only {'+'.join(self.allowed) or 'none'}"
                        ),
                    )
                    continue
            if math.isinf(comm_s):
                yield Rejected(
                    strategy=self._sigma_text(sigma),
                    reason="an intermediate layout of the resharding does not divide the sizes",
                )
                continue
            total_memory = memory + (
                ctx.elements("out", target) * ctx.itemsize["out"] if post.steps else 0
            )
            lower = max(compute_s, hbm_s, _comm_lower_s(pre_l, pre_r, post))
            upper = compute_s + hbm_s + comm_s
            first, second = (lower, upper) if self.overlap is Overlap.FULL else (upper, lower)
            sent = pre_l.bytes_sent + pre_r.bytes_sent + post.bytes_sent
            key = (first, second, sent, stored_lhs, stored_rhs, target, lhs_op, rhs_op)
            yield _Candidate(key, sig, target, total_memory)

    def _sigma_text(self, sigma: Mapping[str, tuple[str, ...]]) -> str:
        spec = self.einsum.spec
        return str(
            ShardedOperation(
                lhs=ShardingSpec(_sigma_dims(sigma, spec.lhs)),
                rhs=ShardingSpec(_sigma_dims(sigma, spec.rhs)),
                out=ShardingSpec(_sigma_dims(sigma, spec.out)),
                lhs_letters=spec.lhs,
                rhs_letters=spec.rhs,
                out_letters=spec.out,
                names=self.einsum.names,
            )
        )

    def candidates(self, *, keep_rejected: bool = False) -> Iterator[_Candidate | Rejected]:
        """Every evaluated candidate, streamed; memory-rejected ones become ``Rejected``."""
        out = self.fixed.get("out")
        capacity = self.ctx.hbm_capacity_bytes
        for sigma in self.assignments():
            for item in self._evaluate(sigma, out):
                if isinstance(item, Rejected):
                    if keep_rejected:
                        yield item
                    else:
                        yield _REJECTED
                    continue
                if self.check_memory and item.memory_bytes > capacity:
                    if keep_rejected:
                        yield Rejected(
                            strategy=self._candidate_text(item),
                            reason=(
                                f"needs {format_bytes(item.memory_bytes)} per chip, more than "
                                f"the {format_bytes(capacity)} of HBM on "
                                f"{self.mesh.hardware.chip.name}"
                            ),
                        )
                    else:
                        yield _REJECTED
                    continue
                yield item

    def _candidate_text(self, item: _Candidate) -> str:
        spec = self.einsum.spec
        sigma = dict(zip(self.letters, item.sigma, strict=True))
        lhs = ShardingSpec(self.fixed.get("lhs", _sigma_dims(sigma, spec.lhs)))
        rhs = ShardingSpec(self.fixed.get("rhs", _sigma_dims(sigma, spec.rhs)))
        return (
            f"{lhs.notation(self.einsum.names[0], spec.lhs)} · "
            f"{rhs.notation(self.einsum.names[1], spec.rhs)} -> "
            f"{ShardingSpec(item.out).notation(self.einsum.names[2], spec.out)}"
        )

    # -- public entry points ---------------------------------------------------------------

    def search(self, top: int | None = 10, *, explain: bool = False) -> Ranking:
        """Rank every strategy (deterministically; ties broken by layout), keeping ``top``.

        With layouts fixed, several strategies can share the same stored operands and output
        and differ in the layouts at the op (gather A, or slice B and reduce): each is listed,
        since each is an algorithm the user may choose. Candidates stream through a bounded
        heap, so a sweep's memory does not grow with the number of strategies."""
        counts = {"candidates": 0, "valid": 0, "rejected": 0}
        rejected: list[Rejected] = []

        def stream() -> Iterator[_Candidate]:
            for item in self.candidates(keep_rejected=explain):
                counts["candidates"] += 1
                if isinstance(item, Rejected):
                    counts["rejected"] += 1
                    if explain and item is not _REJECTED:
                        rejected.append(item)
                    continue
                counts["valid"] += 1
                yield item

        if top is None:
            chosen = sorted(stream(), key=lambda c: c.key)
        else:
            chosen = heapq.nsmallest(top, stream(), key=lambda c: c.key)
        if not chosen:
            reasons = "; ".join(sorted({r.reason for r in rejected})[:3]) if rejected else ""
            raise PlanError(
                f"no valid strategy for {self.einsum} on {self.mesh}"
                + (f": {reasons}" if reasons else "")
                + ". Try other layouts, a larger mesh axis for big operands (HBM), or sizes "
                "divisible by the mesh axes (run plan --explain for every reason)"
            )
        return Ranking(
            einsum=self.einsum,
            mesh=self.mesh,
            overlap=self.overlap,
            strategies=tuple(self.build(c) for c in chosen),
            num_candidates=counts["candidates"],
            num_valid=counts["valid"],
            num_rejected=counts["rejected"],
            rejected=tuple(rejected),
        )

    def estimate(self, *, alternatives: int = 5) -> Ranking:
        """Every layout fixed: the best strategy σ, and the runner-up alternatives."""
        missing = [role for role in ROLES if role not in self.fixed]
        if missing:
            raise SpecError(
                f"estimate needs --lhs, --rhs and --out; missing {', '.join(missing)} "
                "(use plan to search over the ones you leave out)"
            )
        return self.search(top=1 + alternatives)

    # -- materialising a plan ----------------------------------------------------------------

    def build(self, candidate: _Candidate) -> Plan:
        """The full ``Plan`` of a hot-path candidate (same numbers, with every object)."""
        ctx = self.ctx
        spec = self.einsum.spec
        sigma = dict(zip(self.letters, candidate.sigma, strict=True))
        lhs_op = _sigma_dims(sigma, spec.lhs)
        rhs_op = _sigma_dims(sigma, spec.rhs)
        local = _sigma_dims(sigma, spec.out)
        unreduced = tuple(axis for axis in ctx.mesh_order for c in self.summed if axis in sigma[c])
        stored_lhs = self.fixed.get("lhs", lhs_op)
        stored_rhs = self.fixed.get("rhs", rhs_op)
        steps: list[Step] = []
        for role, src, dst, u in (
            ("lhs", stored_lhs, lhs_op, ()),
            ("rhs", stored_rhs, rhs_op, ()),
        ):
            steps.extend(self._steps(role, ctx.path(role, src, dst, u).steps))
        post = ctx.path("out", local, candidate.out, unreduced)
        steps.extend(self._steps("out", post.steps))
        flops = self.einsum.spec.flops(
            {c: ctx.sizes[c] // math.prod(ctx.axis_size[a] for a in sigma[c]) for c in self.letters}
        )
        hbm_bytes = sum(
            ctx.elements(role, dims) * ctx.itemsize[role]
            for role, dims in (("lhs", lhs_op), ("rhs", rhs_op), ("out", local))
        )
        cost = local_cost(
            chip=self.mesh.hardware.chip, dtype=self.einsum.dtype, flops=flops, hbm_bytes=hbm_bytes
        )
        terms = tuple(
            CommTerm(
                step.axes,
                step.cost.link,
                step.cost.time_s,
                step.cost.bytes_sent_per_chip,
                self.mesh.link_resources(step.axes),
            )
            for step in steps
            if step.cost is not None and step.cost.group_size > 1
        )
        cost = Cost(
            flops=cost.flops,
            hbm_bytes=cost.hbm_bytes,
            compute_s=cost.compute_s,
            hbm_s=cost.hbm_s,
            comm=terms,
        )
        operation = ShardedOperation(
            lhs=ShardingSpec(lhs_op),
            rhs=ShardingSpec(rhs_op),
            out=ShardingSpec(local),
            lhs_letters=spec.lhs,
            rhs_letters=spec.rhs,
            out_letters=spec.out,
            unreduced=unreduced,
            names=self.einsum.names,
        )
        return Plan(
            einsum=self.einsum,
            mesh=self.mesh,
            lhs=ShardingSpec(stored_lhs),
            rhs=ShardingSpec(stored_rhs),
            out=ShardingSpec(candidate.out),
            assignment=tuple((c, sigma[c]) for c in self.letters),
            operation=operation,
            steps=tuple(steps),
            cost=cost,
            peak_memory_bytes=math.ceil(candidate.memory_bytes),  # fp4 packs two per byte
        )

    def _steps(self, role: str, raw: tuple[RawStep, ...]) -> list[Step]:
        out: list[Step] = []
        dtype = self.einsum.accum_dtype if role == "out" else self.einsum.dtype
        for kind, axes, before, after, u_before, u_after in raw:
            cost = None
            if kind is not None:
                cost = collective_cost(
                    self.mesh,
                    kind,
                    axes,
                    elements_in_per_chip=self.ctx.elements(role, before),
                    dtype=dtype,
                )
                if cost.group_size == 1:
                    continue
            out.append(
                Step(
                    operand=role,
                    kind=kind,
                    axes=axes,
                    before=ShardingSpec(before),
                    after=ShardingSpec(after),
                    unreduced_before=u_before,
                    unreduced_after=u_after,
                    cost=cost,
                    name=self.einsum.name(role),
                )
            )
        return out


_REJECTED = Rejected(strategy="", reason="")


def plan(
    einsum: Einsum,
    mesh: DeviceMesh,
    *,
    lhs: Any = None,
    rhs: Any = None,
    out: Any = None,
    top: int | None = 10,
    overlap: Overlap = Overlap.FULL,
    explain: bool = False,
    check_memory: bool = True,
    at_op: Mapping[str, Any] | str | None = None,
    idle_axes: bool = True,
    axes: Iterable[str] | str | None = None,
) -> Ranking:
    """Rank every strategy for ``einsum`` on ``mesh``; fix any of ``lhs``/``rhs``/``out``
    (PartitionSpec strings like ``"x,None"`` or ``jax.sharding.PartitionSpec`` objects),
    pin letters at the op (``at_op="b=x,f=y"``), forbid the idle-axes widening or limit the
    collectives to some ``axes``."""
    planner = Planner(
        einsum,
        mesh,
        lhs=lhs,
        rhs=rhs,
        out=out,
        overlap=overlap,
        check_memory=check_memory,
        at_op=at_op,
        idle_axes=idle_axes,
        axes=axes,
    )
    return planner.search(top=top, explain=explain)


def estimate(
    einsum: Einsum,
    mesh: DeviceMesh,
    *,
    lhs: Any,
    rhs: Any,
    out: Any,
    overlap: Overlap = Overlap.FULL,
    check_memory: bool = False,
    at_op: Mapping[str, Any] | str | None = None,
    idle_axes: bool = True,
    axes: Iterable[str] | str | None = None,
) -> Plan:
    """The best plan for fixed stored operands and output (the alternatives: ``plan``);
    with every letter pinned by ``at_op``, exactly that strategy."""
    planner = Planner(
        einsum,
        mesh,
        lhs=lhs,
        rhs=rhs,
        out=out,
        overlap=overlap,
        check_memory=check_memory,
        at_op=at_op,
        idle_axes=idle_axes,
        axes=axes,
    )
    return planner.estimate().best
