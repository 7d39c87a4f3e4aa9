"""A walked program (:mod:`.hlo.walk`) costed on a target mesh: per-op times and totals.

Pure: no JAX here, so ``estimate-hlo`` costs a saved dump without starting it. For each
top-level op, per execution:

* ``compute_s = flops / peak`` at the logical type its matmuls run in
  (``chip.peak_flops_per_s_for``; a type the chip lists no rate for, e.g. float32 on a TPU,
  runs at the bfloat16 rate, which is what XLA's default matmul precision does there, and
  the result says so in ``assumptions``);
* ``hbm_s = hbm_bytes / chip.hbm_bytes_per_s``;
* ``comm_s``: the sum of its collectives, each costed by
  :func:`sharding_roofline.collectives.collective_cost` over the mesh axes its replica
  groups span (:func:`~.hlo.groups_to_axes`, partition ids laid over the mesh row-major),
  at its logical type. Groups that are not whole mesh axes (a sub-axis) are listed in
  ``uncosted`` with the bytes each chip would send, and add no time;
* ``time_s = max(compute_s, hbm_s, comm_s)``: the op's own roofline, and ``bound`` names the
  largest term.

Totals over ops (each times its ``count``): ``compute``, ``hbm`` and ``comm`` sum each term;
``per_op`` sums the per-op rooflines (ops run one after another, each limited by its slowest
resource); ``lower_bound = max(compute, hbm, comm)`` (everything overlaps perfectly) and
``upper_bound = compute + hbm + comm`` (nothing overlaps), as :class:`~sharding_roofline.
estimate.Cost` defines them; ``lower_bound <= per_op <= upper_bound``. A conditional
contributes its cheapest branch to ``lower_bound`` and its dearest to everything else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from sharding_roofline.collectives import Collective, CollectiveCost, collective_cost
from sharding_roofline.collectives import bytes_sent_per_chip as ring_bytes_sent
from sharding_roofline.errors import TopologyError, UnknownNameError
from sharding_roofline.estimate import Bottleneck
from sharding_roofline.mesh import DeviceMesh
from sharding_roofline.report import collective_dict, mesh_dict, table
from sharding_roofline.units import format_bytes, format_count, format_seconds

from .hlo.groups import groups_to_axes, pairs_to_axes
from .hlo.walk import Branch, HloOp, HloWalk, WalkCollective, fold_branches, walk_hlo

__all__ = [
    "CollectiveEstimate",
    "OpEstimate",
    "ProgramEstimate",
    "UncostedItem",
    "cost_walk",
    "estimate_hlo",
    "format_program",
    "numpy_dtype",
]

#: HLO element type -> numpy/JAX name, for the chip's peak-rate table.
_NUMPY_NAMES = {
    "bf16": "bfloat16",
    "f16": "float16",
    "f32": "float32",
    "f64": "float64",
    "f8e4m3fn": "float8_e4m3fn",
    "f8e5m2": "float8_e5m2",
    "f4e2m1fn": "float4_e2m1fn",
    "s8": "int8",
    "u8": "int8",
    "s32": "int32",
}
#: A canonical dtype of each width, for link costs (which depend only on bytes).
_BY_WIDTH = {1: "int8", 2: "bfloat16", 4: "float32", 8: "float64"}


def numpy_dtype(hlo_dtype: str) -> str:
    """``"bf16" -> "bfloat16"``; unknown types keep their HLO name."""
    return _NUMPY_NAMES.get(hlo_dtype, hlo_dtype)


@dataclass(frozen=True, slots=True, kw_only=True)
class CollectiveEstimate:
    """One collective of one op on the target: its cost per execution (``None`` if it could
    not be costed, with ``reason``), run ``count`` times per step."""

    op: str
    count: int
    walked: WalkCollective
    axes: tuple[str, ...] | None
    cost: CollectiveCost | None
    reason: str = ""
    branch: Branch = ()

    @property
    def time_s(self) -> float:
        return self.cost.time_s if self.cost is not None else 0.0

    def as_dict(self) -> dict[str, Any]:
        coll = self.walked.collective
        if self.cost is not None:
            base = collective_dict(self.cost)
        else:
            group = _group_size(coll)
            out = self.walked.elements_out_per_device
            elements_in = {"all-gather": out // max(group, 1), "reduce-scatter": out * group}
            base = {
                "kind": coll.kind,
                "axes": None,
                "group_size": group,
                "dtype": numpy_dtype(self.walked.dtype),
                "elements_in_per_chip": elements_in.get(coll.kind, out),
                "elements_out_per_chip": out,
                "bytes_sent_per_chip": None,
                "time_s": None,
            }
        return {
            "op": self.op,
            **base,
            "hlo_dtype": self.walked.dtype,
            "count": self.count,
            "total_time_s": self.time_s * self.count,
            "costed": self.cost is not None,
            **({"reason": self.reason} if self.reason else {}),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class OpEstimate:
    """One top-level op on the target, per execution."""

    op: HloOp
    compute_s: float
    hbm_s: float
    comm_s: float
    collectives: tuple[CollectiveEstimate, ...] = ()

    @property
    def time_s(self) -> float:
        """The op's own roofline: the slowest of its three terms."""
        return max(self.compute_s, self.hbm_s, self.comm_s)

    @property
    def bound(self) -> Bottleneck:
        if self.compute_s >= max(self.hbm_s, self.comm_s) and self.compute_s > 0:
            return Bottleneck.COMPUTE
        if self.hbm_s >= self.comm_s:
            return Bottleneck.HBM
        return Bottleneck.COMM

    @property
    def total_time_s(self) -> float:
        return self.time_s * self.op.count

    def as_dict(self) -> dict[str, Any]:
        op = self.op
        return {
            "name": op.name,
            "kind": op.kind,
            "opcode": op.opcode,
            "computation": op.computation,
            "count": op.count,
            "flops": op.flops,
            "flops_dtype": numpy_dtype(op.flops_dtype) if op.flops_dtype else None,
            "hbm_bytes": op.hbm_bytes,
            "time_s": self.time_s,
            "bound": self.bound.value,
            "compute_s": self.compute_s,
            "hbm_s": self.hbm_s,
            "comm_s": self.comm_s,
            "total_time_s": self.total_time_s,
            "operands": list(op.operands),
            "result": op.result,
            "branch": [{"conditional": name, "index": k} for name, k in op.branch],
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class UncostedItem:
    name: str
    opcode: str
    computation: str
    count: int
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "opcode": self.opcode,
            "computation": self.computation,
            "count": self.count,
            "reason": self.reason,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class ProgramEstimate:
    """A compiled program's time per step on ``mesh``, per chip, with its op table."""

    mesh: DeviceMesh
    walk: HloWalk
    ops: tuple[OpEstimate, ...]
    collectives: tuple[CollectiveEstimate, ...]
    uncosted: tuple[UncostedItem, ...]
    assumptions: tuple[str, ...] = ()
    #: what the program is (a function's qualified name, a file path)
    source: str = ""
    #: ``compiled.memory_analysis()`` / ``cost_analysis()`` of the CPU compile, when we
    #: compiled it (``estimate_jitted``): bytes per device, as XLA reports them
    compiler_memory: dict[str, int] | None = None
    compiler_cost: dict[str, float] | None = None
    #: the compiled module's text (not in the JSON)
    hlo_text: str = field(default="", repr=False, compare=False)

    def _fold(self, value: Any, pick: Any = max) -> float:
        by_name = {id(e.op): e for e in self.ops}
        walk = HloWalk(
            ops=tuple(e.op for e in self.ops),
            uncosted=(),
            elided=(),
            conditionals=self.walk.conditionals,
            num_instructions=0,
            num_devices=None,
            cpu_upcast=self.walk.cpu_upcast,
        )
        return fold_branches(walk, lambda op: value(by_name[id(op)]) * op.count, pick)

    @property
    def flops_per_chip(self) -> float:
        return self._fold(lambda e: e.op.flops)

    @property
    def hbm_bytes_per_chip(self) -> float:
        return self._fold(lambda e: e.op.hbm_bytes)

    @property
    def comm_bytes_sent_per_chip(self) -> float:
        return self._fold(
            lambda e: sum(c.cost.bytes_sent_per_chip for c in e.collectives if c.cost is not None)
        )

    @property
    def compute_s(self) -> float:
        return self._fold(lambda e: e.compute_s)

    @property
    def hbm_s(self) -> float:
        return self._fold(lambda e: e.hbm_s)

    @property
    def comm_s(self) -> float:
        return self._fold(lambda e: e.comm_s)

    @property
    def per_op_s(self) -> float:
        """Per-op rooflines summed: ops run in sequence, each bound by its slowest term."""
        return self._fold(lambda e: e.time_s)

    @property
    def lower_bound_s(self) -> float:
        """Perfect overlap of the totals (cheapest branch of every conditional)."""
        return max(
            self._fold(lambda e: e.compute_s, min),
            self._fold(lambda e: e.hbm_s, min),
            self._fold(lambda e: e.comm_s, min),
        )

    @property
    def upper_bound_s(self) -> float:
        """No overlap at all: compute + HBM + communication (dearest branches)."""
        return self._fold(lambda e: e.compute_s + e.hbm_s + e.comm_s)

    @property
    def bottleneck(self) -> Bottleneck:
        """The largest of the three totals (ties go to compute, then HBM), as ``Cost``."""
        largest = max(self.compute_s, self.hbm_s, self.comm_s)
        if self.compute_s == largest:
            return Bottleneck.COMPUTE
        if self.hbm_s == largest:
            return Bottleneck.HBM
        return Bottleneck.COMM

    def time_by_bound_s(self) -> dict[str, float]:
        """How much of ``per_op`` each bound accounts for (dearest branches)."""
        return {
            b.value: self._fold(lambda e, b=b: e.time_s if e.bound is b else 0.0)
            for b in Bottleneck
        }

    def as_dict(self) -> dict[str, Any]:
        """The ``estimate-fn`` / ``estimate-hlo`` JSON object (shared/cli_contract.md)."""
        return {
            **mesh_dict(self.mesh),
            "totals": {
                "flops_per_chip": self.flops_per_chip,
                "hbm_bytes_per_chip": self.hbm_bytes_per_chip,
                "comm_bytes_sent_per_chip": self.comm_bytes_sent_per_chip,
                "time_s": {
                    "compute": self.compute_s,
                    "hbm": self.hbm_s,
                    "comm": self.comm_s,
                    "lower_bound": self.lower_bound_s,
                    "upper_bound": self.upper_bound_s,
                    "per_op": self.per_op_s,
                },
                "time_by_bound_s": self.time_by_bound_s(),
                "bottleneck": self.bottleneck.value,
            },
            "ops": [e.as_dict() for e in self.ops],
            "collectives": [c.as_dict() for c in self.collectives],
            "uncosted": [u.as_dict() for u in self.uncosted],
            "elided": [
                {"name": op.name, "computation": op.computation, "count": op.count}
                for op in self.walk.elided
            ],
            "assumptions": list(self.assumptions),
            "num_instructions": self.walk.num_instructions,
            "cpu_upcast_undone": self.walk.cpu_upcast,
            "source": self.source,
            "memory_per_chip_bytes": self.memory_dict(),
            "compiler_cost_analysis": self.compiler_cost,
        }

    def memory_dict(self) -> dict[str, Any]:
        """Our peak memory per chip (logical types, and as compiled) beside XLA's."""
        walk = self.walk
        capacity = self.mesh.hardware.chip.hbm_capacity_bytes
        ours = walk.memory.as_dict() if walk.memory is not None else None
        return {
            "ours": ours,
            "ours_as_compiled": (
                walk.memory_as_printed.as_dict() if walk.memory_as_printed is not None else None
            ),
            "compiler": self.compiler_memory,
            "hbm_capacity_bytes": capacity,
            "fits": None if ours is None else ours["peak_bytes"] <= capacity,
        }


# --------------------------------------------------------------------------------------


def _group_size(coll: Any) -> int:
    try:
        return int(coll.group_size)
    except Exception:  # a permute without pairs: unknown
        return 0


def _peak(mesh: DeviceMesh, hlo_dtype: str, assumptions: set[str]) -> float:
    chip = mesh.hardware.chip
    name = numpy_dtype(hlo_dtype)
    try:
        return chip.peak_flops_per_s_for(name)
    except UnknownNameError:
        pass
    fallback = (
        "bfloat16"
        if "bfloat16" in chip.peak_flops_per_s
        else max(chip.peak_flops_per_s, key=lambda k: chip.peak_flops_per_s[k])
    )
    assumptions.add(
        f"{name} matmuls run at the {fallback} peak: {chip.name} lists no {name} rate (XLA's "
        "default matmul precision on TPUs is one bfloat16 pass)"
    )
    return chip.peak_flops_per_s[fallback]


def _elements_in(kind: Collective, elements_out: int, group: int) -> int:
    if kind is Collective.ALL_GATHER:
        return elements_out // max(group, 1)
    if kind is Collective.REDUCE_SCATTER:
        return elements_out * group
    return elements_out


def _cost_collective(mesh: DeviceMesh, op: HloOp, walked: WalkCollective) -> CollectiveEstimate:
    coll = walked.collective
    itemsize_dtype = _BY_WIDTH.get(_hlo_itemsize(walked.dtype), "float32")
    dtype = _NUMPY_NAMES.get(walked.dtype, itemsize_dtype)
    if dtype not in ("bfloat16", "float16", "float32", "float64", "int8", "int32"):
        dtype = itemsize_dtype  # link costs depend only on the bytes

    def made(
        axes: tuple[str, ...] | None, cost: CollectiveCost | None, reason: str = ""
    ) -> CollectiveEstimate:
        return CollectiveEstimate(
            op=op.name,
            count=op.count,
            walked=walked,
            branch=op.branch,
            axes=axes,
            cost=cost,
            reason=reason,
        )

    try:
        kind = Collective(coll.kind)
    except ValueError:
        return made(
            None,
            None,
            f"{coll.kind} is not modelled by the link model (no cost function)",
        )
    if kind is Collective.COLLECTIVE_PERMUTE:
        axes = pairs_to_axes(coll.pairs or (), mesh.shape, mesh.axis_names)
        group = 0
    else:
        if coll.groups is None:
            return made(
                None,
                None,
                "no replica groups could be read (pass the whole module text)",
            )
        axes = groups_to_axes(coll.groups, mesh.shape, mesh.axis_names)
        group = len(coll.groups[0])
    if axes is None:
        sent = ring_bytes_sent(
            kind,
            _elements_in(kind, walked.elements_out_per_device, group),
            group,
            _hlo_itemsize(walked.dtype),
        )
        shown = coll.groups[:2] if coll.groups else coll.pairs
        return made(
            None,
            None,
            (
                f"its device groups (e.g. {shown}) are not whole axes of mesh "
                f"({mesh.spec_text}), so the link model cannot place them (a sub-axis); "
                f"each chip sends {sent:.0f} bytes in a ring of {group}"
            ),
        )
    if not axes:
        cost = collective_cost(mesh, kind, mesh.axis_names[:1], elements_in_per_chip=0, dtype=dtype)
        return made((), cost)
    group = math.prod(mesh.axis_size(a) for a in axes)
    elements = _elements_in(kind, walked.elements_out_per_device, group)
    cost = collective_cost(mesh, kind, axes, elements_in_per_chip=elements, dtype=dtype)
    return made(axes, cost)


def _hlo_itemsize(dtype: str) -> int:
    from .hlo._text import _itemsize  # noqa: PLC0415 (the package's private helper)

    return _itemsize(dtype)


def estimate_hlo(
    text: str,
    mesh: DeviceMesh,
    *,
    cpu_upcast: bool | None = None,
    collective_hints: Any = None,
    source: str = "",
) -> ProgramEstimate:
    """Walk a compiled module's text and cost it on ``mesh`` (``estimate-hlo``)."""
    walk = walk_hlo(text, cpu_upcast=cpu_upcast, collective_hints=collective_hints)
    return replace(cost_walk(walk, mesh), source=source, hlo_text=text)


def cost_walk(walk: HloWalk, mesh: DeviceMesh) -> ProgramEstimate:
    """Cost every op of a walked program on ``mesh`` (see the module docstring)."""
    if walk.num_devices is not None and walk.num_devices != mesh.num_devices:
        raise TopologyError(
            f"the program runs on {walk.num_devices} devices (num_partitions x replica_count "
            f"in its HloModule line) but mesh ({mesh.spec_text}) has {mesh.num_devices}; give "
            f"a --mesh whose axis sizes multiply to {walk.num_devices}"
        )
    chip = mesh.hardware.chip
    assumptions: set[str] = set()
    ops: list[OpEstimate] = []
    collectives: list[CollectiveEstimate] = []
    uncosted = [
        UncostedItem(
            name=u.name,
            opcode=u.opcode,
            computation=u.computation,
            count=u.count,
            reason=u.reason,
        )
        for u in walk.uncosted
    ]
    for op in walk.ops:
        compute_s = (
            op.flops / _peak(mesh, op.flops_dtype or "bf16", assumptions) if op.flops else 0.0
        )
        colls = tuple(_cost_collective(mesh, op, c) for c in op.collectives)
        for c in colls:
            if c.cost is None:
                uncosted.append(
                    UncostedItem(
                        name=op.name,
                        opcode=c.walked.kind,
                        computation=op.computation,
                        count=op.count,
                        reason=c.reason,
                    )
                )
        collectives.extend(colls)
        ops.append(
            OpEstimate(
                op=op,
                compute_s=compute_s,
                hbm_s=op.hbm_bytes / chip.hbm_bytes_per_s,
                comm_s=sum(c.time_s for c in colls),
                collectives=colls,
            )
        )
    if walk.cpu_upcast:
        assumptions.add(
            "the program was compiled for CPU: values it widened from bf16 to f32 are costed "
            "as bf16 (docs/estimate_fn.md, 'Dtypes'); the CPU's pure dtype conversions are "
            "elided"
        )
    return ProgramEstimate(
        mesh=mesh,
        walk=walk,
        ops=tuple(ops),
        collectives=tuple(collectives),
        uncosted=tuple(uncosted),
        assumptions=tuple(sorted(assumptions)),
    )


# --------------------------------------------------------------------------------------
# Text


def format_program(estimate: ProgramEstimate, *, top: int | None = 25) -> str:
    """The human report: totals, the op table (dearest first), collectives, uncosted."""
    e = estimate
    lines = [
        f"{e.mesh}",
        f"per chip: {format_count(e.flops_per_chip)}FLOPs, {format_bytes(e.hbm_bytes_per_chip)} "
        f"HBM traffic, {format_bytes(e.comm_bytes_sent_per_chip)} sent over links "
        f"({e.walk.num_instructions} HLO instructions)",
        f"time: compute {format_seconds(e.compute_s)}, HBM {format_seconds(e.hbm_s)}, "
        f"comm {format_seconds(e.comm_s)}; per-op roofline {format_seconds(e.per_op_s)} "
        f"(bounds {format_seconds(e.lower_bound_s)} .. {format_seconds(e.upper_bound_s)}); "
        f"bottleneck: {e.bottleneck.value}",
        "",
    ]
    ranked = sorted(e.ops, key=lambda o: o.total_time_s, reverse=True)
    shown = ranked if top is None else ranked[:top]
    rows = [
        [
            o.op.name,
            o.op.kind,
            str(o.op.count),
            format_count(o.op.flops) if o.op.flops else "-",
            format_bytes(o.op.hbm_bytes),
            format_seconds(o.compute_s) if o.compute_s else "-",
            format_seconds(o.hbm_s),
            format_seconds(o.comm_s) if o.comm_s else "-",
            format_seconds(o.total_time_s),
            o.bound.value,
            o.op.result,
        ]
        for o in shown
    ]
    header = [
        "op",
        "kind",
        "count",
        "FLOPs",
        "HBM",
        "compute",
        "hbm",
        "comm",
        "total",
        "bound",
        "result",
    ]
    lines.append(table(rows, header))
    if top is not None and len(ranked) > top:
        lines.append(f"... {len(ranked) - top} more ops (--top N, or --json for all)")
    if e.collectives:
        lines += ["", "collectives (per execution):"]
        crow = [
            [
                c.op,
                c.walked.kind,
                "+".join(c.axes) if c.axes else ("-" if c.axes == () else "?"),
                str(c.count),
                numpy_dtype(c.walked.dtype),
                format_bytes(c.cost.bytes_sent_per_chip) if c.cost else "?",
                format_seconds(c.time_s) if c.cost else "uncosted",
            ]
            for c in e.collectives
        ]
        lines.append(table(crow, ["op", "kind", "axes", "count", "dtype", "sent/chip", "time"]))
    if e.uncosted:
        lines += ["", "not costed (listed, never counted as zero silently):"]
        lines += [f"  {u.name} ({u.opcode}, x{u.count}): {u.reason}" for u in e.uncosted]
    memory = e.memory_dict()
    ours, compiled, xla = memory["ours"], memory["ours_as_compiled"], memory["compiler"]
    if ours is not None:
        lines += ["", "memory per chip (arguments + outputs + peak temporaries):"]
        mrow = [
            [
                "ours, on the target",
                *(
                    format_bytes(ours[k])
                    for k in ("argument_bytes", "output_bytes", "temp_peak_bytes", "peak_bytes")
                ),
            ]
        ]
        if compiled is not None and e.walk.cpu_upcast:
            mrow.append(
                [
                    "ours, as compiled (CPU types)",
                    *(
                        format_bytes(compiled[k])
                        for k in ("argument_bytes", "output_bytes", "temp_peak_bytes", "peak_bytes")
                    ),
                ]
            )
        if xla is not None:
            mrow.append(
                [
                    "XLA memory_analysis() (CPU)",
                    format_bytes(xla["argument_size_in_bytes"]),
                    format_bytes(xla["output_size_in_bytes"]),
                    format_bytes(xla["temp_size_in_bytes"]),
                    format_bytes(xla["footprint_bytes"]),
                ]
            )
        lines.append(table(mrow, ["", "arguments", "outputs", "temp", "peak"]))
        fits = "fits in" if memory["fits"] else "does NOT fit in"
        lines.append(f"  {fits} {format_bytes(memory['hbm_capacity_bytes'])} of HBM")
    if e.assumptions:
        lines += ["", "assumptions:"] + [f"  {a}" for a in e.assumptions]
    return "\n".join(lines)
