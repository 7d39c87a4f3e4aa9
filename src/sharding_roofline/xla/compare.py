"""Predicted vs observed: compare a plan with what XLA compiles for it.

:func:`validate_plan` compiles the plan's two programs (``run.py``): the ``jit`` program,
where XLA's SPMD partitioner chooses the collectives for the plan's layouts, and the
``shard_map`` program, which issues exactly the plan's steps. It reads both compiled
programs' collectives (``hlo``) and gives one verdict:

``match``
    XLA's ``jit`` program runs the same multiset of (kind, mesh axes, elements in and out per
    chip) as the plan predicts.
``xla-differs``
    XLA chose another algorithm, and the plan's own ``shard_map`` program compiles to exactly
    the predicted collectives (and, when executed, computes the right numbers): both are
    valid. Both lists are reported with their times on the plan's target hardware.
``mismatch``
    The plan's own ``shard_map`` program does not hold exactly the predicted collectives,
    does different matmul FLOPs than the plan says, or computes wrong numbers: a planner bug.

Element counts come from the compiled text and are exact; dtypes come from the plan (the CPU
backend prints bf16 collectives as f32: jax_notes.md §3.4). Reductions act on the einsum's
result, so they take the accumulation dtype; data movement takes the dtype of the operand its
shape fits (the input dtype when that is ambiguous).
"""

from __future__ import annotations

import enum
import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sharding_roofline.collectives import Collective, bytes_sent_per_chip, collective_cost
from sharding_roofline.dtypes import dtype_bytes
from sharding_roofline.mesh import DeviceMesh
from sharding_roofline.plans import Plan
from sharding_roofline.report import collective_dict

from .hlo import (
    HloCollective,
    dot_flops,
    groups_to_axes,
    pairs_to_axes,
    read_collectives,
)
from .run import CompiledPlan, Execution, compile_plan, compile_unguided, execute_plan

__all__ = [
    "CollectiveRecord",
    "FlopsCheck",
    "Validation",
    "Verdict",
    "agreement",
    "difference_lines",
    "hlo_records",
    "judge",
    "multiset",
    "observed_collectives",
    "plan_key",
    "predicted_collectives",
    "total_time_s",
    "validate_plan",
]

_REDUCTIONS = frozenset({"all-reduce", "reduce-scatter"})


class Verdict(enum.Enum):
    MATCH = "match"
    XLA_DIFFERS = "xla-differs"
    MISMATCH = "mismatch"


@dataclass(frozen=True, slots=True, kw_only=True)
class CollectiveRecord:
    """One collective, predicted or observed, in the estimate JSON's vocabulary.

    ``axes`` is ``None`` when XLA's device groups are not whole mesh axes (a sub-axis);
    ``operand`` is ``None`` when the array it moves cannot be told from its shape. ``time_s``
    is the cost on the plan's target hardware (``None`` when it cannot be costed: sub-axis
    groups, kinds the cost model lacks). ``count`` is how often it runs per step (loops).
    """

    kind: str
    axes: tuple[str, ...] | None
    operand: str | None
    group_size: int
    dtype: str
    elements_in_per_chip: int
    elements_out_per_chip: int
    bytes_sent_per_chip: float
    time_s: float | None
    count: int = 1
    detail: dict[str, Any] | None = None  # the estimate JSON's remaining fields, if costed

    @property
    def key(self) -> tuple[str, tuple[str, ...] | None, int, int]:
        """What ``match`` compares: kind, axes, elements in and out per chip."""
        return (self.kind, self.axes, self.elements_in_per_chip, self.elements_out_per_chip)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.detail or {})
        out.update(
            {
                "operand": self.operand,
                "kind": self.kind,
                "axes": None if self.axes is None else list(self.axes),
                "group_size": self.group_size,
                "dtype": self.dtype,
                "elements_in_per_chip": self.elements_in_per_chip,
                "elements_out_per_chip": self.elements_out_per_chip,
                "bytes_sent_per_chip": self.bytes_sent_per_chip,
                "time_s": self.time_s,
                "count": self.count,
            }
        )
        return out

    def label(self) -> str:
        """``all-gather[y] 1024->4096`` (for messages and tables)."""
        axes = "?" if self.axes is None else "+".join(self.axes)
        times = f" x{self.count}" if self.count != 1 else ""
        return (
            f"{self.kind}[{axes}] {self.elements_in_per_chip}->{self.elements_out_per_chip}{times}"
        )


def plan_key(plan: Plan) -> str:
    """A plan's identity within one request: its stored layouts and output, and the local
    op (several strategies can share the first three and differ in the layouts at the op):
    ``A[B_x, D] · B[D_y, F] -> C[B_x, F] @ A[B_x, D] · B[D, F] -> C[B_x, F]``."""
    return f"{plan.strategy} @ {plan.operation}"


def predicted_collectives(plan: Plan) -> tuple[CollectiveRecord, ...]:
    """The plan's collectives, as records (steps over a size-1 group are already dropped)."""
    spec = plan.einsum.spec
    out: list[CollectiveRecord] = []
    for step in plan.collectives:
        cost = step.cost
        if cost is None or step.kind is None:  # pragma: no cover - collectives carry a cost
            continue
        detail = collective_dict(
            cost, operand=step.operand, notation=step.notation(spec.operand(step.operand))
        )
        out.append(
            CollectiveRecord(
                kind=step.kind.value,
                axes=cost.axes,
                operand=step.operand,
                group_size=cost.group_size,
                dtype=cost.dtype,
                elements_in_per_chip=cost.elements_in_per_chip,
                elements_out_per_chip=cost.elements_out_per_chip,
                bytes_sent_per_chip=cost.bytes_sent_per_chip,
                time_s=cost.time_s,
                detail=detail,
            )
        )
    return tuple(out)


_KINDS = {kind.value: kind for kind in Collective}  # HLO op name -> our collective


def _fits(global_shape: tuple[int, ...], leaf: tuple[int, ...]) -> bool:
    return len(leaf) == len(global_shape) and all(
        n > 0 and size % n == 0 for size, n in zip(global_shape, leaf, strict=True)
    )


def _operand_of(
    plan: Plan, coll: HloCollective, key: tuple[Any, ...], predicted: Sequence[CollectiveRecord]
) -> tuple[str | None, str]:
    """Which array an observed collective works on, and the dtype a real chip would use."""
    einsum = plan.einsum
    dtypes = {"lhs": einsum.dtype, "rhs": einsum.dtype, "out": einsum.accum_dtype}
    if coll.kind in _REDUCTIONS:
        return "out", einsum.accum_dtype  # partial sums of the einsum's result
    for record in predicted:
        if record.key == key:
            return record.operand, record.dtype
    roles: list[str] = []
    if len(coll.result_types) == 1:
        leaf = coll.result_types[0][1]
        roles = [role for role in ("lhs", "rhs", "out") if _fits(einsum.shape(role), leaf)]
    if len(roles) == 1:
        return roles[0], dtypes[roles[0]]
    if roles and len({dtypes[r] for r in roles}) == 1:
        return None, dtypes[roles[0]]
    return None, einsum.dtype


def hlo_records(
    mesh: DeviceMesh,
    colls: Iterable[HloCollective],
    describe: Callable[[HloCollective, tuple[Any, ...]], tuple[str | None, str]],
) -> tuple[CollectiveRecord, ...]:
    """Compiled collectives as records, costed on ``mesh``'s target hardware. ``describe``
    names the array each one moves and the dtype a real chip would use, given the op and its
    key (kind, axes, elements in and out per chip). Ops whose groups are single devices move
    nothing and are dropped (the planner drops size-1 groups too)."""
    out: list[CollectiveRecord] = []
    for coll in colls:
        if coll.groups is not None:
            axes = groups_to_axes(coll.groups, mesh.shape, mesh.axis_names)
        elif coll.pairs is not None:
            axes = pairs_to_axes(coll.pairs, mesh.shape, mesh.axis_names)
        else:
            axes = None
        group = coll.group_size
        if axes == () or group <= 1:
            continue
        elements_out = coll.elements_out_per_device
        if coll.kind == "all-gather":
            elements_in = elements_out // group
        elif coll.kind == "reduce-scatter":
            elements_in = elements_out * group
        else:
            elements_in = elements_out
        key = (coll.kind, axes, elements_in, elements_out)
        operand, dtype = describe(coll, key)
        detail: dict[str, Any] | None = None
        time_s: float | None = None
        if coll.kind in _KINDS:
            kind = _KINDS[coll.kind]
            sent = bytes_sent_per_chip(kind, elements_in, group, dtype_bytes(dtype))
            if axes is not None:
                cost = collective_cost(
                    mesh, kind, axes, elements_in_per_chip=elements_in, dtype=dtype
                )
                detail = collective_dict(cost, operand=operand)
                sent, time_s = cost.bytes_sent_per_chip, cost.time_s
        else:  # ragged-all-to-all, collective-broadcast: not in the cost model
            sent = float(elements_in * dtype_bytes(dtype))
        out.append(
            CollectiveRecord(
                kind=coll.kind,
                axes=axes,
                operand=operand,
                group_size=group,
                dtype=dtype,
                elements_in_per_chip=elements_in,
                elements_out_per_chip=elements_out,
                bytes_sent_per_chip=sent,
                time_s=time_s,
                count=coll.count,
                detail=detail,
            )
        )
    return tuple(out)


def observed_collectives(
    plan: Plan, text: str, predicted: Sequence[CollectiveRecord] = ()
) -> tuple[CollectiveRecord, ...]:
    """The collectives of a compiled program (``compiled.as_text()``) as records, costed on
    the plan's target hardware. Ops whose groups are single devices move nothing and are
    dropped (the planner drops size-1 groups too)."""
    return hlo_records(
        plan.mesh,
        read_collectives(text),
        lambda coll, key: _operand_of(plan, coll, key, predicted),
    )


def multiset(records: Iterable[CollectiveRecord]) -> Counter[tuple[Any, ...]]:
    counts: Counter[tuple[Any, ...]] = Counter()
    for record in records:
        counts[record.key] += record.count
    return counts


def judge(
    reasons: list[str],
    want: Counter[tuple[Any, ...]],
    observed: Sequence[CollectiveRecord],
    what: str = "XLA's jit program",
) -> Verdict:
    """The verdict rule every validator applies: ``mismatch`` when the plan's own program
    gave ``reasons`` against it; else ``match`` when XLA's ``observed`` collectives are the
    plan's ``want``; else ``xla-differs``, with what XLA lacks and adds appended to
    ``reasons``."""
    got = multiset(observed)
    if reasons:
        return Verdict.MISMATCH
    if got == want:
        return Verdict.MATCH
    reasons += difference_lines(want, got, what)
    return Verdict.XLA_DIFFERS


def difference_lines(
    want: Counter[tuple[Any, ...]], got: Counter[tuple[Any, ...]], what: str
) -> list[str]:
    def text(key: tuple[Any, ...], n: int) -> str:
        kind, axes, elements_in, elements_out = key
        axes_text = "?" if axes is None else "+".join(axes)
        times = f" x{n}" if n != 1 else ""
        return f"{kind}[{axes_text}] {elements_in}->{elements_out}{times}"

    missing = want - got
    extra = got - want
    lines = []
    if missing:
        lines.append(f"{what} lacks " + ", ".join(text(k, n) for k, n in missing.items()))
    if extra:
        lines.append(f"{what} adds " + ", ".join(text(k, n) for k, n in extra.items()))
    return lines


def total_time_s(records: Sequence[CollectiveRecord]) -> float | None:
    """Seconds of all records on the target hardware; ``None`` if one cannot be costed."""
    total = 0.0
    for record in records:
        if record.time_s is None:
            return None
        total += record.time_s * record.count
    return total


@dataclass(frozen=True, slots=True, kw_only=True)
class FlopsCheck:
    """Per-chip matmul FLOPs: the plan's, and ``dot_flops`` of each compiled program."""

    plan: float
    shard_map: int | None  # compiled; None when the shard_map program was not compiled
    shard_map_written: int | None  # the same program before XLA's optimisations
    jit: int

    @property
    def ok(self) -> bool:
        """The plan's own program does the FLOPs the plan says (unchecked counts as ok).

        XLA's algebraic simplifier turns a dot whose local contracting size is 1 into an
        elementwise multiply, which ``dot_flops`` does not count; then the program as written
        (its HLO before optimisation) must do the plan's FLOPs, and the compiled one fewer."""
        if self.shard_map is None:
            return True
        if math.isclose(self.shard_map, self.plan):
            return True
        return (
            self.shard_map < self.plan
            and self.shard_map_written is not None
            and math.isclose(self.shard_map_written, self.plan)
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "plan": self.plan,
            "shard_map": self.shard_map,
            "shard_map_as_written": self.shard_map_written,
            "jit": self.jit,
            "ok": self.ok,
        }


#: Two collective times within this relative difference are "the same".
SAME_REL = 1e-3


@dataclass(frozen=True, slots=True, kw_only=True)
class Unguided:
    """XLA's program with only the stored input layouts and the output layout given (nothing
    pinned at the op): what XLA chooses by itself, costed with the same model as the plan.

    ``verdict``: ``match`` (the same collectives as the plan), else by time on the target
    hardware ``plan-cheaper``, ``same`` (within 0.1%) or ``xla-cheaper`` (a planner defect
    to fix or explain), or ``uncosted`` when one of XLA's collectives has no cost (replica
    groups that are not whole mesh axes)."""

    observed: tuple[CollectiveRecord, ...]
    plan_time_s: float
    xla_time_s: float | None
    verdict: str
    warnings: tuple[str, ...] = ()

    @classmethod
    def judge(
        cls,
        predicted: tuple[CollectiveRecord, ...],
        observed: tuple[CollectiveRecord, ...],
        warnings: tuple[str, ...] = (),
    ) -> Unguided:
        plan_s = sum(r.time_s or 0.0 for r in predicted)
        xla_s = total_time_s(observed)
        if multiset(observed) == multiset(predicted):
            verdict = "match"
        elif xla_s is None:
            verdict = "uncosted"
        elif math.isclose(plan_s, xla_s, rel_tol=SAME_REL, abs_tol=1e-12):
            verdict = "same"
        else:
            verdict = "plan-cheaper" if plan_s < xla_s else "xla-cheaper"
        return cls(
            observed=observed, plan_time_s=plan_s, xla_time_s=xla_s, verdict=verdict,
            warnings=warnings,
        )  # fmt: skip

    def as_dict(self) -> dict[str, Any]:
        return {
            "observed": [r.as_dict() for r in self.observed],
            "xla_time_s": self.xla_time_s,
            "plan_time_s": self.plan_time_s,
            "verdict": self.verdict,
        }


def unguided(plan: Plan, predicted: tuple[CollectiveRecord, ...] | None = None) -> Unguided:
    """Compile XLA's unguided program for ``plan``'s stored and output layouts and judge the
    plan against it (one compile per request, cached: every strategy of a ranking shares it)."""
    predicted = predicted if predicted is not None else predicted_collectives(plan)
    text, warnings = compile_unguided(plan)
    return Unguided.judge(predicted, observed_collectives(plan, text, predicted), warnings)


@dataclass(frozen=True, slots=True, kw_only=True)
class Validation:
    """A plan checked against XLA: the verdict, both collective lists, FLOPs, numerics."""

    plan: Plan
    verdict: Verdict
    predicted: tuple[CollectiveRecord, ...]
    observed: tuple[CollectiveRecord, ...]  # XLA's jit program
    shard_map: tuple[CollectiveRecord, ...] | None  # the plan's own program (None: skipped)
    flops: FlopsCheck
    numerics: Execution | None
    warnings: tuple[str, ...]
    reasons: tuple[str, ...]
    compile_s: float
    #: XLA's own choice from the stored layouts (``validate_plan(..., unguided=True)``)
    unguided: Unguided | None = None

    @property
    def ok(self) -> bool:
        return self.verdict is not Verdict.MISMATCH

    @property
    def difference(self) -> str:
        """What XLA's jit program lacks (``-``) and adds (``+``) against the plan, by kind and
        axes (element counts left out): ``-reduce-scatter[x] +all-reduce[x]``; empty on a
        match. Stable across sizes, so reports can key on it."""
        want = multiset(self.predicted)
        got = multiset(self.observed)
        parts: list[str] = []
        for sign, diff in (("-", want - got), ("+", got - want)):
            for (kind, axes, _, _), n in sorted(diff.items(), key=lambda kv: str(kv[0])):
                axes_text = "?" if axes is None else "+".join(axes)
                parts.extend([f"{sign}{kind}[{axes_text}]"] * n)
        return " ".join(parts)

    @property
    def plan_time_s(self) -> float:
        """The predicted collectives' time on the target hardware (= ``plan.cost.comm_s``)."""
        return sum(r.time_s or 0.0 for r in self.predicted)

    @property
    def xla_time_s(self) -> float | None:
        """XLA's collectives' time on the same hardware (``None``: one cannot be costed)."""
        return total_time_s(self.observed)

    def as_dict(self) -> dict[str, Any]:
        plan = self.plan
        out: dict[str, Any] = {
            "verdict": self.verdict.value,
            "strategy": plan.strategy,
            "einsum": plan.einsum.spec.equation,
            "dims": dict(plan.einsum.dims),
            "dtype": plan.einsum.dtype,
            "accum_dtype": plan.einsum.accum_dtype,
            "hardware": plan.mesh.hardware.name,
            "mesh": {axis.name: axis.size for axis in plan.mesh.axes},
            "lhs": plan.lhs.text(),
            "rhs": plan.rhs.text(),
            "out": plan.out.text(),
            "at_op": {"lhs": plan.operation.lhs.text(), "rhs": plan.operation.rhs.text()},
            "predicted": [r.as_dict() for r in self.predicted],
            "observed": [r.as_dict() for r in self.observed],
            "shard_map": None if self.shard_map is None else [r.as_dict() for r in self.shard_map],
            "plan_time_s": self.plan_time_s,
            "xla_time_s": self.xla_time_s,
            "flops": self.flops.as_dict(),
            "warnings": list(self.warnings),
            "reasons": list(self.reasons),
            "compile_s": self.compile_s,
        }
        if self.unguided is not None:
            out["unguided"] = self.unguided.as_dict()
        if self.numerics is not None:
            n = self.numerics
            out["numerics"] = {
                "max_abs_error": n.max_abs_error,
                "max_rel_error": n.max_rel_error,
                "tolerance": n.tolerance,
                "jit_max_abs_error": n.jit_max_abs_error,
                "shard_map_max_abs_error": n.shard_map_max_abs_error,
                "out_sharding_ok": n.jit_sharding_ok and n.shard_map_sharding_ok,
                "jit_ok": n.jit_ok,
                "shard_map_ok": n.shard_map_ok,
                "ok": n.ok,
            }
        return out


def validate_plan(
    plan: Plan, *, execute: bool = False, prove: bool = True, unguided: bool = False
) -> Validation:
    """Compile ``plan``'s programs on simulated CPU devices and judge the plan.

    ``execute`` also runs both programs on random data (small shapes: execution costs seconds
    at hundreds of devices). ``prove=False`` skips compiling the plan's own ``shard_map``
    program when XLA's ``jit`` program already matches the prediction (a sweep's shortcut:
    about 40% of the compile time); it is always compiled when the verdict depends on it.
    Wrong numbers from XLA's own ``jit`` program are reported in ``reasons`` and
    ``numerics`` but do not make the plan a mismatch. ``unguided`` also compiles XLA's
    program with nothing pinned at the op and judges the plan against it (``Unguided``).
    """
    predicted = predicted_collectives(plan)
    compiled: CompiledPlan = compile_plan(plan, with_shard_map=prove or execute)
    observed = observed_collectives(plan, compiled.jit_text, predicted)
    want = multiset(predicted)
    jit_agrees = multiset(observed) == want
    if compiled.shard_map_text is None and not jit_agrees:
        compiled = compile_plan(plan, with_shard_map=True)
    proof: tuple[CollectiveRecord, ...] | None = None
    reasons: list[str] = []
    if compiled.shard_map_text is not None:
        proof = observed_collectives(plan, compiled.shard_map_text, predicted)
        reasons += difference_lines(want, multiset(proof), "the plan's shard_map program")
    flops = FlopsCheck(
        plan=plan.cost.flops,
        shard_map=None if compiled.shard_map_text is None else dot_flops(compiled.shard_map_text),
        shard_map_written=compiled.shard_map_written_flops,
        jit=dot_flops(compiled.jit_text),
    )
    if not flops.ok:
        reasons.append(
            f"the plan's shard_map program does {flops.shard_map} matmul FLOPs per chip "
            f"({flops.shard_map_written} as written), the plan says {plan.cost.flops:g}"
        )
    numerics = execute_plan(plan) if execute else None
    notes: list[str] = []  # wrong results of XLA's own program: not the plan's fault
    if numerics is not None:
        for name, rel, abs_error, layout_ok, into in (
            (
                "the plan's shard_map program",
                numerics.shard_map_max_rel_error,
                numerics.shard_map_max_abs_error,
                numerics.shard_map_sharding_ok,
                reasons,
            ),
            (
                "XLA's jit program",
                numerics.jit_max_rel_error,
                numerics.jit_max_abs_error,
                numerics.jit_sharding_ok,
                notes,
            ),
        ):
            if rel > numerics.tolerance:
                into.append(
                    f"{name} computes wrong numbers: max error {abs_error:.3g} (relative "
                    f"{rel:.3g} > tolerance {numerics.tolerance:g})"
                )
            if not layout_ok:
                into.append(f"{name} does not leave the output laid out as {plan.out.text()}")
    verdict = judge(reasons, want, observed)
    return Validation(
        plan=plan,
        verdict=verdict,
        predicted=predicted,
        observed=observed,
        shard_map=proof,
        flops=flops,
        numerics=numerics,
        warnings=compiled.warnings,
        reasons=tuple(reasons + notes),
        compile_s=compiled.compile_s,
        unguided=_unguided(plan, predicted) if unguided else None,
    )


_unguided = unguided  # validate_plan's keyword shadows the function


def agreement(validations: Iterable[Validation]) -> dict[str, int]:
    """How many validations got each verdict (every verdict listed, zeros included)."""
    counts = Counter(v.verdict.value for v in validations)
    return {verdict.value: counts.get(verdict.value, 0) for verdict in Verdict}
