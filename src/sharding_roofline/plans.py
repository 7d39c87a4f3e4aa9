"""A plan and its parts: the steps (collectives and free slices) around a local einsum, its
cost per chip, and a ranking of plans. The planner (``planner.py``) makes them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .collectives import Collective, CollectiveCost
from .einsum import Einsum
from .errors import PlanError, SpecError
from .estimate import Cost, Overlap
from .mesh import DeviceMesh
from .sharding import ShardedOperation, ShardingSpec, subscript, unreduced_suffix

ROLES = ("lhs", "rhs", "out")
NAMES = {"lhs": "A", "rhs": "B", "out": "C"}


@dataclass(frozen=True, slots=True, kw_only=True)
class Step:
    """One step on one array: a collective, or (``kind is None``) a free local slice."""

    operand: str
    kind: Collective | None
    axes: tuple[str, ...]
    before: ShardingSpec
    after: ShardingSpec
    unreduced_before: tuple[str, ...] = ()
    unreduced_after: tuple[str, ...] = ()
    cost: CollectiveCost | None = None

    def notation(self, letters: str) -> str:
        """``AllGather_y B[D_y, F] -> B[D, F]`` (the book's notation; a program's tensor is
        written under its own name: ``AllGather_x w_in[D_x, F_y] -> w_in[D, F_y]``)."""
        name = NAMES.get(self.operand, self.operand)
        label = self.kind.book_name if self.kind else "DynamicSlice"
        before = self.before.notation(name, letters) + unreduced_suffix(self.unreduced_before)
        after = self.after.notation(name, letters) + unreduced_suffix(self.unreduced_after)
        return f"{label}_{subscript(self.axes)} {before} -> {after}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """A strategy with its collectives and its cost per chip."""

    einsum: Einsum
    mesh: DeviceMesh
    lhs: ShardingSpec  # as stored
    rhs: ShardingSpec  # as stored
    out: ShardingSpec  # as produced
    assignment: tuple[tuple[str, tuple[str, ...]], ...]  # σ: letter -> axes
    operation: ShardedOperation  # the local einsum at the op
    steps: tuple[Step, ...]
    cost: Cost
    peak_memory_bytes: int

    @property
    def collectives(self) -> tuple[Step, ...]:
        return tuple(step for step in self.steps if step.kind is not None)

    @property
    def strategy(self) -> str:
        """The stored operands and produced output: ``A[B_x, D] · B[D, F_y] -> C[B_x, F_y]``."""
        spec = self.einsum.spec
        return (
            f"{self.lhs.notation('A', spec.lhs)} · {self.rhs.notation('B', spec.rhs)} -> "
            f"{self.out.notation('C', spec.out)}"
        )

    def describe(self) -> str:
        """The strategy, then each step in order with the local einsum among them."""
        spec = self.einsum.spec
        lines = [self.strategy]
        for step in self.steps:
            if step.operand == "out":
                break
            lines.append("  " + step.notation(spec.operand(step.operand)))
        lines.append(f"  local: {self.operation}")
        lines.extend("  " + step.notation(spec.out) for step in self.steps if step.operand == "out")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.strategy


@dataclass(frozen=True, slots=True, kw_only=True)
class Rejected:
    """A candidate the planner did not keep, and why."""

    strategy: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Ranking:
    """The result of a search: the best strategies first, and what was left out."""

    einsum: Einsum
    mesh: DeviceMesh
    overlap: Overlap
    strategies: tuple[Plan, ...]
    num_candidates: int
    num_valid: int
    num_rejected: int
    rejected: tuple[Rejected, ...] = ()

    @property
    def best(self) -> Plan:
        return self.strategies[0]

    def find(self, **assignment: str | Sequence[str]) -> Plan:
        """The best-ranked strategy that splits each named letter over exactly the given
        axes: ``ranking.find(b="", d="x", f="")`` is the book's "slice, multiply, all-reduce"
        when A[B, D] · B[D_x, F] -> C[B, F]. ``""`` or ``()`` means unsplit, ``"x+y"`` two
        axes (major first). Search with ``top=None`` to find any candidate."""
        wanted = {
            letter: tuple(a for a in axes.split("+") if a) if isinstance(axes, str) else tuple(axes)
            for letter, axes in assignment.items()
        }
        letters = self.einsum.spec.letters
        unknown = [letter for letter in wanted if letter not in letters]
        if unknown:
            raise SpecError(
                f"find: {unknown[0]!r} is not a letter of {self.einsum.spec.equation!r} "
                f"(letters: {', '.join(letters)})"
            )
        for plan in self.strategies:
            sigma = dict(plan.assignment)
            if all(sigma[letter] == axes for letter, axes in wanted.items()):
                return plan
        described = ", ".join(f"{c}={'+'.join(a) or '-'}" for c, a in wanted.items())
        raise PlanError(
            f"no ranked strategy splits {described}; it may be rejected or ranked below the "
            f"top {len(self.strategies)} (search with top=None, explain=True to see why)"
        )
