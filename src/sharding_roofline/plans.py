"""A plan and its parts: the steps (collectives and free slices) around a local einsum, its
cost per chip, and a ranking of plans. The planner (``planner.py``) makes them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .collectives import Collective, CollectiveCost
from .einsum import Einsum
from .errors import PlanError, SpecError
from .estimate import Cost, Overlap
from .mesh import DeviceMesh
from .sharding import ShardedOperation, ShardingSpec, subscript, unreduced_suffix

ROLES = ("lhs", "rhs", "out")


@dataclass(frozen=True, slots=True, kw_only=True)
class Step:
    """One step on one array (``operand``: a role of a single einsum, or a tensor's name): a
    collective, or (``kind is None``) a free local slice."""

    operand: str
    kind: Collective | None
    axes: tuple[str, ...]
    before: ShardingSpec
    after: ShardingSpec
    unreduced_before: tuple[str, ...] = ()
    unreduced_after: tuple[str, ...] = ()
    cost: CollectiveCost | None = None
    name: str = ""  # the printed name of the array (default: ``operand``)

    @property
    def label(self) -> str:
        return self.name or self.operand

    def notation(self, letters: str) -> str:
        """``AllGather_y rhs[D_y, F] -> rhs[D, F]`` (the book's notation)."""
        name = self.label
        label = self.kind.book_name if self.kind else "DynamicSlice"
        before = self.before.notation(name, letters) + unreduced_suffix(self.unreduced_before)
        after = self.after.notation(name, letters) + unreduced_suffix(self.unreduced_after)
        return f"{label}_{subscript(self.axes)} {before} -> {after}"


@dataclass(frozen=True, slots=True, kw_only=True, repr=False)
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
        """The stored operands and produced output, by name:
        ``lhs[B_x, D] · rhs[D, F_y] -> out[B_x, F_y]``."""
        spec = self.einsum.spec
        lhs, rhs, out = self.einsum.names
        return (
            f"{self.lhs.notation(lhs, spec.lhs)} · {self.rhs.notation(rhs, spec.rhs)} -> "
            f"{self.out.notation(out, spec.out)}"
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

    def __repr__(self) -> str:
        from .report import collectives_summary  # noqa: PLC0415 (report imports plans)
        from .units import format_seconds  # noqa: PLC0415

        cost = self.cost
        return (
            f"Plan({self.strategy!r}, at the op {str(self.operation)!r}, "
            f"{collectives_summary(self)}, time {format_seconds(cost.lower_bound_s)}"
            f"..{format_seconds(cost.upper_bound_s)}, bottleneck {cost.describe_bottleneck()})"
        )

    def to_dict(self) -> dict[str, object]:
        """One flat row: what ``Ranking.to_dicts`` and ``table`` show."""
        from .crossover import crossover  # noqa: PLC0415
        from .report import collectives_summary  # noqa: PLC0415

        cost = self.cost
        cross = crossover(self)
        return {
            "strategy": self.strategy,
            "at_op": str(self.operation),
            "collectives": collectives_summary(self),
            "time_s": cost.lower_bound_s,
            "upper_bound_s": cost.upper_bound_s,
            "compute_s": cost.compute_s,
            "hbm_s": cost.hbm_s,
            "comm_s": cost.comm_s,
            "bottleneck": cost.describe_bottleneck(),
            "peak_memory_bytes": self.peak_memory_bytes,
            "crossover_dimension": cross.dimension,
            "crossover_size": cross.size,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class Rejected:
    """A candidate the planner did not keep, and why."""

    strategy: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True, repr=False)
class Ranking:
    """The result of a search: the best strategies first, and what was left out.

    In a notebook it shows as a table; ``table()`` is the same as text, ``to_dicts()`` one
    flat dict per strategy, ``to_pandas()`` a DataFrame (if pandas is installed)."""

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

    def __repr__(self) -> str:
        best = self.strategies[0].strategy if self.strategies else "none"
        return (
            f"Ranking({self.einsum} on {self.mesh}: {len(self.strategies)} shown of "
            f"{self.num_valid} valid, {self.num_rejected} rejected; best {best!r})"
        )

    def to_dicts(self) -> list[dict[str, object]]:
        return [plan.to_dict() for plan in self.strategies]

    def _rows(self) -> tuple[list[str], list[list[str]]]:
        from .crossover import crossover  # noqa: PLC0415
        from .report import crossover_text  # noqa: PLC0415 (report imports plans)
        from .units import format_seconds  # noqa: PLC0415

        header = ["#", "strategy", "at the op", "collectives", "time", "comm", "bottleneck"]
        header.append("crossover")
        rows = []
        for rank, (plan, row) in enumerate(zip(self.strategies, self.to_dicts(), strict=True), 1):
            rows.append(
                [
                    str(rank),
                    str(row["strategy"]),
                    str(row["at_op"]),
                    str(row["collectives"]),
                    format_seconds(plan.cost.time_s(self.overlap)),
                    format_seconds(plan.cost.comm_s),
                    str(row["bottleneck"]),
                    crossover_text(crossover(plan)),
                ]
            )
        return header, rows

    def table(self) -> str:
        """The ranked strategies as a text table."""
        from .report import table  # noqa: PLC0415

        header, rows = self._rows()
        return table(rows, header)

    def _repr_html_(self) -> str:
        import html  # noqa: PLC0415

        header, rows = self._rows()
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows
        )
        caption = html.escape(f"{self.einsum} on {self.mesh}")
        return f"<table><caption>{caption}</caption><tr>{head}</tr>{body}</table>"

    def to_pandas(self) -> Any:
        """The ranked strategies as a ``pandas.DataFrame`` (pandas is optional)."""
        try:
            import pandas  # noqa: PLC0415
        except ImportError:
            raise PlanError(
                "to_pandas needs pandas, which is not installed; pip install pandas, or use "
                "to_dicts()"
            ) from None
        return pandas.DataFrame(self.to_dicts())

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
