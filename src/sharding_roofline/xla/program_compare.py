"""A program plan checked against XLA: collectives per op, dot FLOPs, numerics.

:func:`validate_program` compiles a :class:`~sharding_roofline.program.evaluate.ProgramPlan`'s
two programs (``programs.py``) and judges it with the single einsum's verdicts
(``compare.py``):

``match``
    XLA's ``jit`` program (the layer as plain JAX, forward and ``jax.vjp`` backward, the
    plan's layouts pinned) runs the same multiset of collectives (kind, mesh axes, elements
    in and out per chip, count) as the plan predicts.
``xla-differs``
    XLA chose other collectives, and the plan's own ``shard_map`` program compiles to exactly
    the predicted ones (and, when executed, computes the reference's numbers): both are
    valid; both lists are reported with their times on the plan's target hardware.
``mismatch``
    The plan's own program does not hold exactly the predicted collectives, does other
    matmul FLOPs than the plan says, cannot be replayed (the plan reads a tensor in a layout
    no op left it in), or computes wrong numbers: a planner bug.

Collectives are compared leaf by leaf: XLA's CPU combiners batch independent all-reduces and
all-gathers into one tuple op (``hlo.split_combined``). Each observed collective is
attributed to the plan's op it belongs to through the ``op_name`` metadata JAX writes
(``programs.forward_function`` runs every op under a named scope; a backward op is named
after the forward op it differentiates), so :attr:`ProgramValidation.per_op` says *where* XLA
and the plan part ways. Element counts come from the compiled text (exact); dtypes from the
plan (the CPU backend prints bf16 collectives as f32, jax_notes.md §3.4).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sharding_roofline.plans import Plan
from sharding_roofline.program.evaluate import Placement, ProgramPlan, evaluate, letter_map
from sharding_roofline.program.graph import Phase
from sharding_roofline.program.layers import einsum_program
from sharding_roofline.report import collective_dict
from sharding_roofline.sharding import subscript, unreduced_suffix

from .compare import (
    CollectiveRecord,
    FlopsCheck,
    Verdict,
    difference_lines,
    hlo_records,
    judge,
    multiset,
    total_time_s,
)
from .hlo import HloCollective, dot_flops, op_name, read_collectives, split_combined
from .programs import CompiledProgram, ProgramExecution, compile_program_plan, execute_program_plan

__all__ = [
    "OpAgreement",
    "ProgramValidation",
    "observed_program_collectives",
    "one_op_program",
    "predicted_program_collectives",
    "program_agreement",
    "validate_program",
]

_PASS = {
    Phase.FORWARD: "forward",
    Phase.RECOMPUTE: "backward",
    Phase.BACKWARD: "backward",
    Phase.OPTIMIZER: "optimizer",
}

#: ``(forward op, pass)``: where a collective belongs (``("", "")`` when unknown)
Origin = tuple[str, str]


def _origin_of_op(plan: ProgramPlan, name: str) -> Origin:
    op = plan.op(name).op
    return (op.of or op.name if op.phase is not Phase.FORWARD else op.name, _PASS[op.phase])


def _notation(plan: ProgramPlan, step: Any) -> str:
    letters = plan.program.tensor(step.operand).letters
    label = step.kind.book_name if step.kind else "DynamicSlice"
    before = step.before.notation(step.operand, letters) + unreduced_suffix(step.unreduced_before)
    after = step.after.notation(step.operand, letters) + unreduced_suffix(step.unreduced_after)
    return f"{label}_{subscript(step.axes)} {before} -> {after}"


def predicted_program_collectives(
    plan: ProgramPlan,
) -> tuple[tuple[CollectiveRecord, ...], tuple[Origin, ...]]:
    """The plan's collectives as records, with the op each belongs to."""
    records: list[CollectiveRecord] = []
    origins: list[Origin] = []
    for op_plan in plan.ops:
        origin = _origin_of_op(plan, op_plan.op.name)
        for step in op_plan.collectives:
            cost = step.cost
            assert cost is not None  # collectives carry a cost
            assert step.kind is not None
            detail = collective_dict(cost, operand=step.operand, notation=_notation(plan, step))
            detail["op"] = op_plan.op.name
            records.append(
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
            origins.append(origin)
    return tuple(records), tuple(origins)


# -- attributing XLA's collectives -------------------------------------------------------------


def _split_top(text: str, sep: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _members(name: str) -> list[str]:
    """A combined op's ``op_name`` (``prefix/(a/...:b/...)``) -> one path per member."""
    for segment_start, segment in _segments_with_offsets(name):
        if segment.startswith("(") and segment.endswith(")"):
            prefix = name[:segment_start]
            return [prefix + member for member in _split_top(segment[1:-1], ":")]
    return [name]


def _segments_with_offsets(name: str) -> list[tuple[int, str]]:
    out, offset = [], 0
    for segment in _split_top(name, "/"):
        out.append((offset, segment))
        offset += len(segment) + 1
    return out


_WRAPPER_RE = re.compile(r"^[\w.\-]+\((.*)\)$")


def _origin_of_path(path: str, known: dict[str, str]) -> Origin:
    """``jit(train)/transpose(jvp(jvp()))/checkpoint/rematted_computation/gate/...`` ->
    ``("gate", "backward")``; ``known`` maps op names to the pass they run in."""
    backward = "transpose(" in path
    for _, segment in _segments_with_offsets(path):
        name = segment
        while name not in known:
            inner = _WRAPPER_RE.match(name)
            if inner is None:
                break
            name = inner.group(1)
        if name in known:
            pass_name = known[name]
            if pass_name == "forward" and backward:
                pass_name = "backward"
            return (name, pass_name)
    return ("", "")


def _attributed(
    plan: ProgramPlan, text: str
) -> tuple[tuple[HloCollective, ...], tuple[Origin, ...]]:
    """The compiled collectives leaf by leaf, each with the op it came from."""
    known = {op.name: _PASS[op.phase] for op in plan.program.ops if op.phase is Phase.FORWARD}
    known.update({op.name: "optimizer" for op in plan.program.ops if op.phase is Phase.OPTIMIZER})
    colls: list[HloCollective] = []
    origins: list[Origin] = []
    for coll in read_collectives(text):
        members = _members(op_name(text, coll))
        for leaf in split_combined([coll]):
            (index,) = leaf.leaf_indices or (0,)
            path = members[index] if index < len(members) else members[0]
            colls.append(leaf)
            origins.append(_origin_of_path(path, known))
    return tuple(colls), tuple(origins)


def observed_program_collectives(
    plan: ProgramPlan, text: str, predicted: Sequence[CollectiveRecord] = ()
) -> tuple[tuple[CollectiveRecord, ...], tuple[Origin, ...]]:
    """A compiled program's collectives as records costed on the plan's hardware, with the
    op each came from. The array each moves is named when a predicted collective has the
    same key; the dtype is then that collective's, else the program's activation dtype."""
    colls, origins = _attributed(plan, text)
    by_key = {record.key: record for record in predicted}
    default = plan.program.tensor(plan.program.ops[0].output).dtype

    def describe(coll: HloCollective, key: tuple[Any, ...]) -> tuple[str | None, str]:
        record = by_key.get(key)
        return (record.operand, record.dtype) if record is not None else (None, default)

    kept: list[CollectiveRecord] = []
    kept_origins: list[Origin] = []
    for coll, origin in zip(colls, origins, strict=True):
        records = hlo_records(plan.mesh, [coll], describe)
        kept.extend(records)
        kept_origins.extend([origin] * len(records))
    return tuple(kept), tuple(kept_origins)


# -- the result ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class OpAgreement:
    """One forward op and pass: the plan's collectives there and XLA's."""

    op: str  # the forward (or optimizer) op; "" for XLA collectives of unknown origin
    pass_name: str
    predicted: tuple[CollectiveRecord, ...]
    observed: tuple[CollectiveRecord, ...]

    @property
    def agrees(self) -> bool:
        return multiset(self.predicted) == multiset(self.observed)

    def as_dict(self) -> dict[str, Any]:
        return {
            "op": self.op,
            "pass": self.pass_name,
            "agrees": self.agrees,
            "predicted": [r.label() for r in self.predicted],
            "observed": [r.label() for r in self.observed],
        }


def _reconciled(
    predicted: Sequence[CollectiveRecord],
    predicted_origins: Sequence[Origin],
    observed: Sequence[CollectiveRecord],
    observed_origins: Sequence[Origin],
) -> list[Origin]:
    """Observed origins, with a collective XLA issued once for several readers moved to the
    reader the plan charges it to: the plan gathers ``x`` at ``q_proj`` and lets ``k_proj``
    and ``v_proj`` reuse it, while XLA's CSE keeps the copy made for ``v_proj``. An extra
    collective of one op moves to another op of the same pass that lacks one with the same
    key (kind, axes, elements); what stays unmatched is a real difference."""
    origins = list(observed_origins)
    missing: Counter[tuple[Origin, tuple[Any, ...]]] = Counter()
    for record, origin in zip(predicted, predicted_origins, strict=True):
        missing[(origin, record.key)] += record.count
    extra: list[int] = []
    for i, (record, origin) in enumerate(zip(observed, origins, strict=True)):
        if missing[(origin, record.key)] > 0:
            missing[(origin, record.key)] -= record.count
        else:
            extra.append(i)
    for i in extra:
        record, origin = observed[i], origins[i]
        for (other, key), n in missing.items():
            if n > 0 and key == record.key and origin[1] in (other[1], "") and other != origin:
                missing[(other, key)] -= record.count
                origins[i] = other
                break
    return origins


def _per_op(
    plan: ProgramPlan,
    predicted: Sequence[CollectiveRecord],
    predicted_origins: Sequence[Origin],
    observed: Sequence[CollectiveRecord],
    observed_origins: Sequence[Origin],
) -> tuple[OpAgreement, ...]:
    order: dict[Origin, None] = {}
    for op_plan in plan.ops:
        order.setdefault(_origin_of_op(plan, op_plan.op.name))
    for origin in observed_origins:
        order.setdefault(origin)
    observed_origins = _reconciled(predicted, predicted_origins, observed, observed_origins)
    out = []
    for origin in order:
        want = tuple(r for r, o in zip(predicted, predicted_origins, strict=True) if o == origin)
        got = tuple(r for r, o in zip(observed, observed_origins, strict=True) if o == origin)
        if want or got:
            out.append(OpAgreement(op=origin[0], pass_name=origin[1], predicted=want, observed=got))
    return tuple(out)


@dataclass(frozen=True, slots=True, kw_only=True)
class ProgramValidation:
    """A program plan checked against XLA: the verdict, both collective lists (whole and per
    op), dot FLOPs per chip, numerics."""

    plan: ProgramPlan
    verdict: Verdict
    predicted: tuple[CollectiveRecord, ...]
    observed: tuple[CollectiveRecord, ...]  # XLA's jit program
    shard_map: tuple[CollectiveRecord, ...] | None  # the plan's own program (None: skipped)
    per_op: tuple[OpAgreement, ...]
    flops: FlopsCheck
    numerics: ProgramExecution | None
    warnings: tuple[str, ...]
    reasons: tuple[str, ...]
    compile_s: float

    @property
    def ok(self) -> bool:
        return self.verdict is not Verdict.MISMATCH

    @property
    def jit_flops_agree(self) -> bool:
        """XLA's own program does the plan's matmul FLOPs per chip."""
        return abs(self.flops.jit - self.flops.plan) <= 1e-9 * max(self.flops.plan, 1.0)

    @property
    def difference(self) -> str:
        """What XLA's jit program lacks (``-``) and adds (``+``) against the plan, by kind and
        axes, with the op it belongs to: ``-all-reduce[y]@down/forward``; empty on a match."""
        parts: list[str] = []
        for agreement in self.per_op:
            want = multiset(agreement.predicted)
            got = multiset(agreement.observed)
            where = f"@{agreement.op or '?'}/{agreement.pass_name or '?'}"
            for sign, diff in (("-", want - got), ("+", got - want)):
                for (kind, axes, _, _), n in sorted(diff.items(), key=lambda kv: str(kv[0])):
                    axes_text = "?" if axes is None else "+".join(axes)
                    parts.extend([f"{sign}{kind}[{axes_text}]{where}"] * n)
        return " ".join(parts)

    @property
    def kinds_difference(self) -> str:
        """The whole-program difference by kind and axes only (stable across sizes and
        independent of attribution): ``-all-reduce[y] +reduce-scatter[y]``."""
        want: Counter[tuple[str, str]] = Counter()
        got: Counter[tuple[str, str]] = Counter()
        for records, into in ((self.predicted, want), (self.observed, got)):
            for r in records:
                into[(r.kind, "?" if r.axes is None else "+".join(r.axes))] += r.count
        parts: list[str] = []
        for sign, diff in (("-", want - got), ("+", got - want)):
            for (kind, axes), n in sorted(diff.items()):
                parts.extend([f"{sign}{kind}[{axes}]"] * n)
        return " ".join(parts)

    @property
    def plan_time_s(self) -> float:
        return sum(r.time_s or 0.0 for r in self.predicted)

    @property
    def xla_time_s(self) -> float | None:
        return total_time_s(self.observed)

    def as_dict(self) -> dict[str, Any]:
        plan = self.plan
        out: dict[str, Any] = {
            "verdict": self.verdict.value,
            "program": plan.program.name,
            "strategy": plan.name,
            "dims": dict(plan.program.dims),
            "hardware": plan.mesh.hardware.name,
            "mesh": {axis.name: axis.size for axis in plan.mesh.axes},
            "num_ops": len(plan.ops),
            "predicted": [r.as_dict() for r in self.predicted],
            "observed": [r.as_dict() for r in self.observed],
            "shard_map": None if self.shard_map is None else [r.as_dict() for r in self.shard_map],
            "per_op": [a.as_dict() for a in self.per_op],
            "difference": self.difference,
            "plan_time_s": self.plan_time_s,
            "xla_time_s": self.xla_time_s,
            "flops": {**self.flops.as_dict(), "jit_agrees": self.jit_flops_agree},
            "numerics": None if self.numerics is None else self.numerics.as_dict(),
            "warnings": list(self.warnings),
            "reasons": list(self.reasons),
            "compile_s": self.compile_s,
        }
        return out


def validate_program(
    plan: ProgramPlan, *, execute: bool = False, prove: bool = True, dtype: str = "float32"
) -> ProgramValidation:
    """Compile ``plan``'s programs on simulated CPU devices and judge the plan.

    ``execute`` also runs the reference and both programs on random data in ``dtype``
    (float32 by default: tight tolerances; the layouts do not depend on it). ``prove=False``
    skips compiling the plan's own shard_map program when XLA's jit program already matches
    (a sweep's shortcut); it is compiled whenever the verdict depends on it.
    """
    predicted, predicted_origins = predicted_program_collectives(plan)
    compiled: CompiledProgram = compile_program_plan(plan, with_shard_map=prove or execute)
    observed, observed_origins = observed_program_collectives(plan, compiled.jit_text, predicted)
    want = multiset(predicted)
    jit_agrees = multiset(observed) == want
    if compiled.shard_map_text is None and compiled.replay_error is None and not jit_agrees:
        compiled = compile_program_plan(plan, with_shard_map=True)
    reasons: list[str] = []
    proof: tuple[CollectiveRecord, ...] | None = None
    if compiled.replay_error is not None:
        reasons.append(f"the plan's shard_map program cannot be built: {compiled.replay_error}")
    if compiled.shard_map_text is not None:
        proof, _ = observed_program_collectives(plan, compiled.shard_map_text, predicted)
        reasons += difference_lines(want, multiset(proof), "the plan's shard_map program")
    per_run = plan.cost.flops / plan.layers  # a repeated plan (a stack): one repetition
    flops = FlopsCheck(
        plan=per_run,
        shard_map=None if compiled.shard_map_text is None else dot_flops(compiled.shard_map_text),
        shard_map_written=compiled.shard_map_written_flops,
        jit=dot_flops(compiled.jit_text),
    )
    if not flops.ok:
        reasons.append(
            f"the plan's shard_map program does {flops.shard_map} matmul FLOPs per chip "
            f"({flops.shard_map_written} as written), the plan says {per_run:g}"
        )
    numerics = None
    notes: list[str] = []
    if execute and compiled.replay_error is None:
        numerics = execute_program_plan(plan, dtype=dtype)
        for name, rel, layout_ok, into in (
            (
                "the plan's shard_map program",
                numerics.shard_map_max_rel_error,
                numerics.shard_map_layout_ok,
                reasons,
            ),
            ("XLA's jit program", numerics.jit_max_rel_error, numerics.jit_layout_ok, notes),
        ):
            if rel > numerics.tolerance:
                into.append(
                    f"{name} computes wrong numbers: max relative error {rel:.3g} > "
                    f"tolerance {numerics.tolerance:g}"
                )
            if not layout_ok:
                into.append(f"{name} does not leave its results in the plan's layouts")
    verdict = judge(reasons, want, observed)
    return ProgramValidation(
        plan=plan,
        verdict=verdict,
        predicted=predicted,
        observed=observed,
        shard_map=proof,
        per_op=_per_op(plan, predicted, predicted_origins, observed, observed_origins),
        flops=flops,
        numerics=numerics,
        warnings=compiled.warnings,
        reasons=tuple(reasons + notes),
        compile_s=compiled.compile_s,
    )


def one_op_program(plan: Plan) -> ProgramPlan:
    """A single-einsum plan as a one-op program plan (``layers.einsum_program``: tensors
    ``lhs``, ``rhs``, ``out``), stored and produced where the plan has them and split as its
    assignment σ, evaluated by the program evaluator. Its validation
    (:func:`validate_program`) checks the same claims as ``compare.validate_plan`` through the
    program code paths (``tests/xla/test_xla_programs.py`` compares the two)."""
    placement = Placement(
        name=plan.strategy,
        stages=(("op", letter_map(dict(plan.assignment))),),
        homes=(("lhs", plan.lhs.dims), ("rhs", plan.rhs.dims), ("out", plan.out.dims)),
    )
    return evaluate(einsum_program(plan.einsum), plan.mesh, placement)


def program_agreement(validations: Sequence[ProgramValidation]) -> dict[str, int]:
    """How many validations got each verdict (every verdict listed, zeros included)."""
    counts = Counter(v.verdict.value for v in validations)
    return {verdict.value: counts.get(verdict.value, 0) for verdict in Verdict}
