"""Walk a compiled module op by op: FLOPs, HBM bytes and collectives, with execution counts.

Pure text, like the rest of this package (no JAX). :func:`walk_hlo` visits every *top-level*
instruction: those of the entry computation and of the computations it runs as control
flow (while bodies and conditions, conditional branches, ``call`` targets, async wrapped
computations). A fusion is one top-level op; its body is read only for the matmuls and the
collectives inside and for which parts of its operands it reads. One rule per opcode
(:data:`RULES`; anything else is :func:`_generic`):

* ``dot``, ``convolution`` and fusions containing them: FLOPs ``2·prod(result)·prod(K)``
  per dot, ``2·(valid taps)·C_in/group`` per output element for a convolution (padding taps
  excluded, as XLA's cost analysis does);
* every costed top-level op: HBM bytes = the bytes of its operands and results at the
  logical element types (:mod:`.logical`). Slicing reads only the slice (``slice``,
  ``dynamic-slice``, ``gather``, and fusion parameters read only through them);
  ``dynamic-update-slice`` and ``scatter`` are in place (the update is read and written);
* collectives (also inside fusions and async wrappers): what :func:`read_collectives` reads
  (reduce-scatters reclassified, async copies counted once), with the logical type;
* ``while``: its body runs ``known_trip_count`` times, its condition once more (nested loops
  multiply; without a printed trip count the body counts once and the loop is listed in
  ``uncosted``); ``conditional``: every branch is walked under its own branch tag, and a
  cost takes the cheapest branch for the lower bound and the dearest for the upper;
  ``call`` and ``async-start``: the called computation runs once per call;
* free: parameters, constants, tuples, ``get-tuple-element``, ``bitcast``, ``-done`` halves
  of async pairs, partition/replica ids, tokens;
* a ``custom-call`` is costed for bytes; its FLOPs only for cuBLAS/cuBLASLt GEMMs (read from
  the ``dot_dimension_numbers`` in its backend config), otherwise it is listed in
  ``uncosted`` (so are sends/receives, infeed/outfeed, and collectives we cannot cost).

Counts are per execution of the entry computation (one step).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from sharding_roofline.errors import ValidationError

from ._text import (
    _format_type,
    _Instr,
    _ints,
    _itemsize,
    _Module,
    _module,
    _Type,
)
from .collectives import (
    HloCollective,
    dedupe_and_weight,
    parse_collectives,
    reclassify_reduce_scatters,
)
from .logical import FLOAT_DTYPES, Hints, LogicalTypes, looks_like_cpu_compile
from .memory import MemoryEstimate, peak_memory

__all__ = [
    "RULES",
    "ConditionalSite",
    "HloOp",
    "HloWalk",
    "Uncosted",
    "WalkCollective",
    "walk_hlo",
]

Branch = tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class WalkCollective:
    """One collective an op runs, as a real chip would: ``dtype`` is the logical element type
    of its result (``elements_out_per_device`` elements of it per device)."""

    collective: HloCollective
    dtype: str
    elements_out_per_device: int

    @property
    def kind(self) -> str:
        return self.collective.kind


@dataclass(frozen=True, slots=True, kw_only=True)
class HloOp:
    """One top-level op of a compiled program, per execution; ``count`` executions per step.

    ``flops`` are matmul FLOPs (dots and convolutions, also inside a fusion) running at the
    rate of ``flops_dtype``; ``hbm_bytes`` uses logical element types, ``printed_hbm_bytes``
    the printed ones (what XLA's own cost analysis of this module sees). ``branch`` tags an
    op inside conditional branches: ``((conditional name, branch index), ...)``.
    """

    name: str
    computation: str
    opcode: str
    kind: str
    count: int
    flops: int = 0
    flops_dtype: str | None = None
    hbm_bytes: int = 0
    printed_hbm_bytes: int = 0
    operands: tuple[str, ...] = ()
    result: str = ""
    collectives: tuple[WalkCollective, ...] = ()
    branch: Branch = ()

    def __post_init__(self) -> None:
        if self.count < 0 or self.flops < 0 or self.hbm_bytes < 0:
            raise ValidationError(
                f"HloOp {self.name!r}: count, flops and hbm_bytes must be >= 0, got "
                f"{self.count}, {self.flops}, {self.hbm_bytes}."
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class Uncosted:
    """Something in the program we could not (fully) cost, and why; never a silent zero."""

    name: str
    computation: str
    opcode: str
    count: int
    reason: str
    branch: Branch = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class ConditionalSite:
    """A ``conditional`` op: its branches' ops carry ``branch`` + ``((name, k),)``."""

    name: str
    computation: str
    count: int
    num_branches: int
    branch: Branch = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class HloWalk:
    """Everything :func:`walk_hlo` found, per device and per step."""

    ops: tuple[HloOp, ...]
    uncosted: tuple[Uncosted, ...]
    elided: tuple[HloOp, ...]
    conditionals: tuple[ConditionalSite, ...]
    num_instructions: int
    num_devices: int | None
    cpu_upcast: bool
    #: peak memory per device at the logical types (what a chip holds) and as printed (what
    #: the compile holds: comparable with ``compiled.memory_analysis()``)
    memory: MemoryEstimate | None = None
    memory_as_printed: MemoryEstimate | None = None

    @property
    def collectives(self) -> tuple[tuple[HloOp, WalkCollective], ...]:
        return tuple((op, c) for op in self.ops for c in op.collectives)

    def total_flops(self, *, branches: str = "max") -> int:
        """Matmul FLOPs per step; conditionals take their ``"max"`` or ``"min"`` branch."""
        return int(self._total(lambda op: op.flops * op.count, branches))

    def total_hbm_bytes(self, *, branches: str = "max", printed: bool = False) -> int:
        """HBM bytes per step (logical types, or as printed)."""
        if printed:
            return int(self._total(lambda op: op.printed_hbm_bytes * op.count, branches))
        return int(self._total(lambda op: op.hbm_bytes * op.count, branches))

    def _total(self, value: Callable[[HloOp], float], branches: str) -> float:
        pick = max if branches == "max" else min
        return fold_branches(self, value, pick)


def fold_branches(
    walk: HloWalk, value: Callable[[HloOp], float], pick: Callable[[list[float]], float]
) -> float:
    """Sum ``value`` over the ops, each conditional contributing ``pick`` of its branches."""
    by_branch: dict[Branch, float] = {}
    for op in walk.ops:
        by_branch[op.branch] = by_branch.get(op.branch, 0.0) + value(op)
    sites = {(site.branch, site.name): site for site in walk.conditionals}

    def level(prefix: Branch) -> float:
        out = by_branch.get(prefix, 0.0)
        for (where, name), site in sites.items():
            if where != prefix:
                continue
            out += pick([level((*prefix, (name, k))) for k in range(site.num_branches)])
        return out

    return level(())


# --------------------------------------------------------------------------------------
# The walk


_TRIP_RE = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')
_INDEX_RE = re.compile(r"\bindex=(\d+)")
_TARGET_RE = re.compile(r'custom_call_target="([^"]*)"')


@dataclass(slots=True)
class _Ctx:
    module: _Module
    logical: LogicalTypes
    colls: Mapping[tuple[str, str], tuple[HloCollective, ...]]
    ops: list[HloOp] = field(default_factory=list)
    uncosted: list[Uncosted] = field(default_factory=list)
    elided: list[HloOp] = field(default_factory=list)
    conditionals: list[ConditionalSite] = field(default_factory=list)
    seen_colls: set[tuple[str, str, str]] = field(default_factory=set)

    def note(self, instr: _Instr, count: int, branch: Branch, reason: str) -> None:
        self.uncosted.append(
            Uncosted(
                name=instr.name,
                computation=instr.computation,
                opcode=instr.opcode,
                count=count,
                reason=reason,
                branch=branch,
            )
        )


Rule = Callable[[_Ctx, _Instr, int, Branch], None]


def walk_hlo(
    text: str,
    *,
    cpu_upcast: bool | None = None,
    collective_hints: Hints | None = None,
    memory: bool = True,
) -> HloWalk:
    """Walk a compiled module (``compiled.as_text()`` or any XLA dump of one module).

    ``cpu_upcast``: undo the CPU backend's bf16 -> f32 widening (:mod:`.logical`); ``None``
    decides from the text (YNNPACK fusions, promoted reducers). ``collective_hints``: the
    logical types of collectives by channel id, from the module after SPMD partitioning
    (:func:`collective_hints_from`). ``memory``: also replay the schedule for the peak
    memory (:mod:`.memory`).
    """
    module = _module(text)
    if cpu_upcast is None:
        cpu_upcast = looks_like_cpu_compile(text)
    roots = _roots(module)
    control, sources = _control_structure(module, roots)
    logical = LogicalTypes(
        module,
        control,
        cpu_upcast=cpu_upcast,
        collective_hints=collective_hints,
        param_sources=sources,
    )
    ctx = _Ctx(module=module, logical=logical, colls=_collectives_by_instr(text))
    for root in roots:
        _walk(ctx, root, 1, ())
    on_chip = peak_memory(module, logical) if memory else None
    return HloWalk(
        ops=tuple(ctx.ops),
        uncosted=tuple(ctx.uncosted),
        elided=tuple(ctx.elided),
        conditionals=tuple(ctx.conditionals),
        num_instructions=sum(len(instrs) for instrs in module.computations.values()),
        num_devices=module.num_devices,
        cpu_upcast=cpu_upcast,
        memory=on_chip,
        memory_as_printed=(peak_memory(module) if cpu_upcast else on_chip) if memory else None,
    )


def collective_hints_from(text: str) -> Hints:
    """Logical collective types by channel id from a module with logical types (the one
    dumped after ``spmd-partitioning``): ``{channel: ((kind, dims, dtype), ...)}``."""
    out: dict[int, list[tuple[str, tuple[int, ...], str]]] = {}
    for coll in parse_collectives(text):
        if coll.channel_id is None:
            continue
        for dtype, dims in coll.result_types:
            out.setdefault(coll.channel_id, []).append((coll.kind, dims, dtype))
    return {k: tuple(v) for k, v in out.items()}


def _roots(module: _Module) -> tuple[str, ...]:
    if module.entry is not None:
        return (module.entry,)
    called = {
        callee
        for instrs in module.computations.values()
        for i in instrs
        for _, callee in module.callees(i)
    }
    return tuple(c for c in module.computations if c not in called)


_CONTROL_ATTRS = {
    "while": ("body", "condition"),
    "conditional": ("branch_computations", "true_computation", "false_computation"),
    "call": ("to_apply", "calls"),
    "async-start": ("calls",),
}


def _control_structure(
    module: _Module, roots: tuple[str, ...]
) -> tuple[tuple[str, ...], dict[str, tuple[tuple[str, str], ...]]]:
    """Control computations in call order, and where each one's parameters come from."""
    order: list[str] = []
    sources: dict[str, tuple[tuple[str, str], ...]] = {}
    stack = list(reversed(roots))
    seen: set[str] = set()
    while stack:
        comp = stack.pop()
        if comp in seen:
            continue
        seen.add(comp)
        order.append(comp)
        nested: list[str] = []
        for instr in module.computations.get(comp, []):
            attrs = _CONTROL_ATTRS.get(instr.opcode)
            if attrs is None:
                continue
            callees = [c for a, c in module.callees(instr) if a in attrs]
            for k, callee in enumerate(callees):
                if instr.opcode == "while":
                    src: tuple[tuple[str, str], ...] = ((comp, instr.operands[0]),)
                elif instr.opcode == "conditional":
                    src = ((comp, instr.operands[k + 1]),) if k + 1 < len(instr.operands) else ()
                else:
                    src = tuple((comp, o) for o in instr.operands)
                sources.setdefault(callee, src)
                nested.append(callee)
        stack.extend(reversed(nested))
    return tuple(order), sources


def _collectives_by_instr(text: str) -> dict[tuple[str, str], tuple[HloCollective, ...]]:
    """The collectives of the module (reduce-scatters reclassified, async copies once), by
    the (computation, instruction) that prints them."""
    raw = reclassify_reduce_scatters(parse_collectives(text), text)
    kept = {(c.computation, c.name, c.kind, c.result_types) for c in dedupe_and_weight(raw, text)}
    out: dict[tuple[str, str], list[HloCollective]] = {}
    for coll in raw:
        if (coll.computation, coll.name, coll.kind, coll.result_types) in kept:
            out.setdefault((coll.computation, coll.name), []).append(coll)
    return {k: tuple(v) for k, v in out.items()}


def _walk(ctx: _Ctx, comp: str, count: int, branch: Branch) -> None:
    for instr in ctx.module.computations.get(comp, []):
        RULES.get(instr.opcode, _generic)(ctx, instr, count, branch)


# --------------------------------------------------------------------------------------
# Bytes


def _leaf_bytes(typ: _Type, dtypes: tuple[str, ...]) -> int:
    if typ.dtype is not None:  # the common case: one array
        return math.prod(typ.dims) * _itemsize(dtypes[0] if len(dtypes) == 1 else typ.dtype)
    leaves = list(typ.leaves())
    if len(dtypes) != len(leaves):
        dtypes = tuple(leaf.dtype or "token" for leaf in leaves)
    return sum(math.prod(leaf.dims) * _itemsize(d) for leaf, d in zip(leaves, dtypes, strict=True))


def _printed_dtypes(typ: _Type) -> tuple[str, ...]:
    return tuple(leaf.dtype or "token" for leaf in typ.leaves())


class _Bytes:
    """Operand and result bytes of one top-level op, logical and printed."""

    __slots__ = ("logical", "printed")

    def __init__(self) -> None:
        self.logical = 0
        self.printed = 0

    def add(self, typ: _Type, dtypes: tuple[str, ...], fraction: float = 1.0) -> None:
        printed = _leaf_bytes(typ, _printed_dtypes(typ) if typ.dtype is None else ())
        logical = _leaf_bytes(typ, dtypes)
        if fraction != 1.0:
            printed, logical = round(printed * fraction), round(logical * fraction)
        self.logical += logical
        self.printed += printed


def _operand_bytes(
    ctx: _Ctx, instr: _Instr, acc: _Bytes, skip: frozenset[int] = frozenset()
) -> None:
    for k in range(len(instr.operands)):
        if k in skip:
            continue
        acc.add(ctx.module.operand_type(instr, k), ctx.logical.operand_dtypes(instr, k))


def _result_bytes(ctx: _Ctx, instr: _Instr, acc: _Bytes) -> None:
    acc.add(instr.type, ctx.logical.leaf_dtypes(instr.computation, instr.name))


@functools.lru_cache(maxsize=8192)
def _typed_text(typ: _Type, dtypes: tuple[str, ...]) -> str:
    """``bf16[8,1024]``: a type printed with its logical element types."""
    if typ.dtype is not None and len(dtypes) == 1:
        return _format_type(_Type(dtypes[0], typ.dims))
    leaves = list(typ.leaves())
    if len(leaves) == len(dtypes):
        return (
            "("
            + ", ".join(
                _format_type(_Type(d, leaf.dims)) for leaf, d in zip(leaves, dtypes, strict=True)
            )
            + ")"
        )
    return _format_type(typ)


def _describe(ctx: _Ctx, instr: _Instr) -> tuple[tuple[str, ...], str]:
    operands = tuple(
        _typed_text(ctx.module.operand_type(instr, k), ctx.logical.operand_dtypes(instr, k))
        for k in range(len(instr.operands))
    )
    result = _typed_text(instr.type, ctx.logical.leaf_dtypes(instr.computation, instr.name))
    return operands, result


def _record(
    ctx: _Ctx,
    instr: _Instr,
    count: int,
    branch: Branch,
    *,
    kind: str,
    acc: _Bytes,
    flops: int = 0,
    flops_dtype: str | None = None,
    collectives: tuple[WalkCollective, ...] = (),
) -> None:
    operands, result = _describe(ctx, instr)
    op = HloOp(
        name=instr.name,
        computation=instr.computation,
        opcode=instr.opcode,
        kind=kind,
        count=count,
        flops=flops,
        flops_dtype=flops_dtype,
        hbm_bytes=acc.logical,
        printed_hbm_bytes=acc.printed,
        operands=operands,
        result=result,
        collectives=collectives,
        branch=branch,
    )
    if kind != "elided" and ctx.logical.is_elided(instr):
        ctx.elided.append(op)
        return
    ctx.ops.append(op)


# --------------------------------------------------------------------------------------
# FLOPs


def _dot_flops(module: _Module, instr: _Instr) -> int:
    lhs = module.operand_type(instr, 0)
    contracting = re.search(r"\blhs_contracting_dims=\{([\d,\s]*)\}", instr.attrs)
    dims = _ints(contracting.group(1)) if contracting else ()
    if lhs.dtype is None or any(d >= len(lhs.dims) for d in dims):
        raise ValidationError(
            f"dot {instr.name!r} in computation {instr.computation!r}: lhs_contracting_dims "
            f"{dims} do not fit its lhs type {_format_type(lhs)}."
        )
    return 2 * instr.type.elements * math.prod(lhs.dims[d] for d in dims)


_WINDOW_RE = re.compile(r"\bwindow=\{([^}]*)\}")
_LABELS_RE = re.compile(r"\bdim_labels=([0-9a-z]+)_([0-9a-z]+)->([0-9a-z]+)")


def _window_field(window: str, key: str, ndims: int, default: int) -> list[int]:
    match = re.search(rf"\b{key}=([\dx_]+)", window)
    if match is None:
        return [default] * ndims
    return [int(v.split("_")[0]) for v in match.group(1).split("x")]


def _conv_flops(module: _Module, instr: _Instr) -> int:
    """``2 · (output batch·features) · (valid (position, tap) pairs) · C_in per group``."""
    labels = _LABELS_RE.search(instr.attrs)
    lhs, rhs = module.operand_type(instr, 0), module.operand_type(instr, 1)
    if labels is None or lhs.dtype is None or rhs.dtype is None or instr.type.dtype is None:
        raise ValidationError(
            f"convolution {instr.name!r} in computation {instr.computation!r}: cannot read "
            "its dim_labels or operand types."
        )
    lhs_l, rhs_l, out_l = labels.groups()
    spatial = sorted(c for c in rhs_l if c.isdigit())
    window_match = _WINDOW_RE.search(instr.attrs)
    window = window_match.group(1) if window_match else ""
    n = len(spatial)
    strides = _window_field(window, "stride", n, 1)
    lhs_dil = _window_field(window, "lhs_dilate", n, 1)
    rhs_dil = _window_field(window, "rhs_dilate", n, 1)
    pad_match = re.search(r"\bpad=([\d_x\-]+)", window)
    pads_lo = (
        [int(p.split("_")[0]) for p in pad_match.group(1).split("x")] if pad_match else [0] * n
    )
    taps = 1
    for d, label in enumerate(spatial):
        size_in = lhs.dims[lhs_l.index(label)]
        size_k = rhs.dims[rhs_l.index(label)]
        size_out = instr.type.dims[out_l.index(label)]
        dilated_in = (size_in - 1) * lhs_dil[d] + 1
        valid = 0
        for k in range(size_k):
            offset = k * rhs_dil[d] - pads_lo[d]
            # o in [0, size_out): 0 <= o*stride + offset < dilated_in, on a dilation point
            for o in range(size_out):
                p = o * strides[d] + offset
                if 0 <= p < dilated_in and p % lhs_dil[d] == 0:
                    valid += 1
        taps *= valid
    batch = instr.type.dims[out_l.index("b")]
    features = instr.type.dims[out_l.index("f")]
    c_in = rhs.dims[rhs_l.index("i")]
    return 2 * batch * features * taps * c_in


_GEMM_TARGETS = ("__cublas$gemm", "__cublas$lt$matmul", "__cublas$lt$matmul$f8")


def _gemm_flops(instr: _Instr, module: _Module) -> int | None:
    """FLOPs of a cuBLAS GEMM custom call, from the dot dimension numbers it prints."""
    match = re.search(r'"lhs_contracting_dimensions"\s*:\s*\[([^\]]*)\]', instr.attrs)
    if match is None or not instr.operands:
        return None
    dims = [int(d.strip().strip('"')) for d in match.group(1).split(",") if d.strip()]
    lhs = module.operand_type(instr, 0)
    result = instr.type if instr.type.dtype is not None else instr.type.parts[0]
    if lhs.dtype is None or any(d >= len(lhs.dims) for d in dims) or result.dtype is None:
        return None
    return 2 * result.elements * math.prod(lhs.dims[d] for d in dims)


def _wider(a: str | None, b: str | None) -> str | None:
    if a is None:
        return b
    if b is None:
        return a
    return a if _itemsize(a) >= _itemsize(b) else b


def _body_matmuls(
    ctx: _Ctx, body: str, logical: Mapping[str, str], depth: int = 0
) -> tuple[int, str | None, list[str]]:
    """Matmul FLOPs in a fused or called body (nested bodies included), the logical type
    they run at, and the custom calls inside that could not be costed."""
    module = ctx.module
    flops, dtype, unknown = 0, None, []
    for instr in module.computations.get(body, []):
        if instr.opcode in ("dot", "convolution"):
            flops += (
                _dot_flops(module, instr) if instr.opcode == "dot" else _conv_flops(module, instr)
            )
            ins = [
                logical.get(n) or module.operand_type(instr, k).dtype
                for k, n in enumerate(instr.operands[:2])
            ]
            for d in ins:
                dtype = _wider(dtype, d)
        elif instr.opcode == "custom-call":
            target = _TARGET_RE.search(instr.attrs)
            name = target.group(1) if target else "?"
            got = _gemm_flops(instr, module) if name in _GEMM_TARGETS else None
            if got is None:
                unknown.append(name)
            else:
                flops += got
        elif depth < 8:
            for attr, callee in module.callees(instr):
                if attr in ("calls", "to_apply") and instr.opcode in ("fusion", "call"):
                    f, d, u = _body_matmuls(ctx, callee, {}, depth + 1)
                    flops += f
                    dtype = _wider(dtype, d)
                    unknown.extend(u)
    return flops, dtype, unknown


def _body_collectives(ctx: _Ctx, body: str, depth: int = 0) -> list[HloCollective]:
    found: list[HloCollective] = []
    for instr in ctx.module.computations.get(body, []):
        found.extend(ctx.colls.get((body, instr.name), ()))
        if depth < 8:
            for _, callee in ctx.module.callees(instr):
                found.extend(_body_collectives(ctx, callee, depth + 1))
    return found


def _walk_collectives(
    ctx: _Ctx, instr: _Instr, colls: list[HloCollective] | tuple[HloCollective, ...]
) -> tuple[WalkCollective, ...]:
    """Attach logical types; each collective counts once however many sites print it."""
    out: list[WalkCollective] = []
    for coll in colls:
        key = (coll.computation, coll.name, coll.kind + repr(coll.result_types))
        if key in ctx.seen_colls and coll.computation != instr.computation:
            continue
        ctx.seen_colls.add(key)
        logical = _collective_dtypes(ctx, coll)
        by_dtype: dict[str, int] = {}
        for (_, dims), dtype in zip(coll.result_types, logical, strict=True):
            by_dtype[dtype] = by_dtype.get(dtype, 0) + math.prod(dims)
        for dtype, elements in by_dtype.items():
            out.append(
                WalkCollective(collective=coll, dtype=dtype, elements_out_per_device=elements)
            )
    return tuple(out)


def _collective_dtypes(ctx: _Ctx, coll: HloCollective) -> list[str]:
    """The logical type of each result leaf of a collective (leaves matched by shape)."""
    printed = [d for d, _ in coll.result_types]
    source = ctx.module.instr(coll.computation, coll.name)
    if source is None:
        return printed
    hinted = [
        ctx.logical.collective_hint(coll.channel_id, coll.kind, dims)
        for _, dims in coll.result_types
    ]
    all_leaves = list(source.type.leaves())
    dtypes = ctx.logical.leaf_dtypes(coll.computation, coll.name)
    if len(dtypes) != len(all_leaves):
        dtypes = _printed_dtypes(source.type)
    kept = [(leaf, d) for leaf, d in zip(all_leaves, dtypes, strict=True) if leaf.dtype != "token"]
    if source.opcode.endswith("-start") and len(kept) > len(coll.result_types):
        kept = kept[len(kept) - len(coll.result_types) :]  # outputs follow the operand aliases
    leaves = [leaf for leaf, _ in kept]
    dtypes = tuple(d for _, d in kept)
    out: list[str] = []
    used: set[int] = set()
    for k, (printed_dtype, dims) in enumerate(coll.result_types):
        hint = hinted[k]
        if hint is not None:
            out.append(hint)
            continue
        match = next(
            (j for j, leaf in enumerate(leaves) if j not in used and leaf.dims == dims), None
        )
        if match is None:  # a reduce-scatter's slice of the all-reduce it was printed as
            elements = math.prod(dims)
            group = len(coll.groups[0]) if coll.groups else 1
            match = next(
                (
                    j
                    for j, leaf in enumerate(leaves)
                    if j not in used and math.prod(leaf.dims) in (elements, elements * group)
                ),
                None,
            )
        if match is None:
            out.append(printed_dtype)
            continue
        used.add(match)
        out.append(dtypes[match] if match < len(dtypes) else printed_dtype)
    return out


# --------------------------------------------------------------------------------------
# Rules


def _free(ctx: _Ctx, instr: _Instr, count: int, branch: Branch) -> None:
    """No bytes, no FLOPs: parameters, constants, tuple plumbing, bitcasts, async halves."""


def _generic(ctx: _Ctx, instr: _Instr, count: int, branch: Branch) -> None:
    """Any other op: the bytes of its operands and its result."""
    acc = _Bytes()
    _operand_bytes(ctx, instr, acc)
    _result_bytes(ctx, instr, acc)
    _record(ctx, instr, count, branch, kind=_kind_of(instr.opcode), acc=acc)


_KINDS = {
    "copy": "copy",
    "copy-start": "copy",
    "transpose": "copy",
    "reduce": "reduce",
    "reduce-window": "reduce",
    "sort": "sort",
    "convert": "convert",
    "broadcast": "copy",
    "concatenate": "copy",
    "pad": "copy",
    "reverse": "copy",
    "reshape": "copy",
    "iota": "elementwise",
    "rng": "elementwise",
    "rng-bit-generator": "elementwise",
}


def _kind_of(opcode: str) -> str:
    return _KINDS.get(opcode, "elementwise")


def _matmul(ctx: _Ctx, instr: _Instr, count: int, branch: Branch) -> None:
    """``dot`` / ``convolution``: FLOPs and operand + result bytes."""
    module = ctx.module
    flops = _dot_flops(module, instr) if instr.opcode == "dot" else _conv_flops(module, instr)
    dtype: str | None = None
    for k in range(min(2, len(instr.operands))):
        got = ctx.logical.operand_dtypes(instr, k)
        dtype = _wider(dtype, got[0] if got else None)
    acc = _Bytes()
    _operand_bytes(ctx, instr, acc)
    _result_bytes(ctx, instr, acc)
    _record(ctx, instr, count, branch, kind=instr.opcode, acc=acc, flops=flops, flops_dtype=dtype)


def _slicing(ctx: _Ctx, instr: _Instr, count: int, branch: Branch) -> None:
    """``slice``, ``dynamic-slice``, ``gather``: read what is taken, write it."""
    acc = _Bytes()
    _result_bytes(ctx, instr, acc)
    _result_bytes(ctx, instr, acc)
    _operand_bytes(ctx, instr, acc, skip=frozenset({0}))  # start indices
    _record(ctx, instr, count, branch, kind="slice", acc=acc)


def _in_place(ctx: _Ctx, instr: _Instr, count: int, branch: Branch) -> None:
    """``dynamic-update-slice`` / ``scatter``: in place; the update is read and written."""
    acc = _Bytes()
    update = 1 if instr.opcode == "dynamic-update-slice" else 2
    for k in range(1, len(instr.operands)):
        acc.add(ctx.module.operand_type(instr, k), ctx.logical.operand_dtypes(instr, k))
    if update < len(instr.operands):
        acc.add(ctx.module.operand_type(instr, update), ctx.logical.operand_dtypes(instr, update))
    _record(ctx, instr, count, branch, kind="update-slice", acc=acc)


def _collective(ctx: _Ctx, instr: _Instr, count: int, branch: Branch) -> None:
    """A collective op (or its ``-start``): the link model costs it; operands and results
    are HBM traffic too."""
    colls = ctx.colls.get((instr.computation, instr.name), ())
    walked = _walk_collectives(ctx, instr, colls)
    acc = _Bytes()
    _operand_bytes(ctx, instr, acc)
    if walked:
        for wc in walked:
            itemsize = _itemsize(wc.dtype)
            printed_itemsize = _itemsize(wc.collective.result_types[0][0])
            acc.logical += wc.elements_out_per_device * itemsize
            acc.printed += wc.elements_out_per_device * printed_itemsize
    else:
        acc.add(instr.type, ctx.logical.leaf_dtypes(instr.computation, instr.name))
    _record(ctx, instr, count, branch, kind="collective", acc=acc, collectives=walked)
    if not colls:
        ctx.note(instr, count, branch, f"{instr.opcode}: not read as a collective")


def _fusion(ctx: _Ctx, instr: _Instr, count: int, branch: Branch) -> None:
    """A fusion: the matmuls and collectives in its body; the bytes at its boundary, where a
    parameter read only through slices costs the slices and an in-place update buffer
    costs only the update."""
    module = ctx.module
    bodies = [c for a, c in module.callees(instr) if a == "calls"]
    if not bodies:
        _generic(ctx, instr, count, branch)
        return
    body = bodies[0]
    logical_body = ctx.logical.body_dtypes(instr, body)
    flops, dtype, unknown = _body_matmuls(ctx, body, logical_body)
    colls = _body_collectives(ctx, body)
    walked = _walk_collectives(ctx, instr, colls)
    if (
        not walked
        and not flops
        and any(i.opcode.endswith("-done") for i in module.computations.get(body, []))
    ):
        return  # the done half of an async collective counted at its start (TPU fusions)
    if ctx.logical.cpu_upcast and _slices_a_reduce_scatter(ctx, instr, body):
        acc = _Bytes()
        _record(ctx, instr, count, branch, kind="elided", acc=acc)
        ctx.elided.append(ctx.ops.pop())
        return
    acc = _Bytes()
    in_place: set[int] = set()
    root = module.root(body)
    root_leaves = (
        [root]
        if root is not None and root.opcode != "tuple"
        else [module.instr(body, n) for n in (root.operands if root is not None else ())]
    )
    out_fraction: list[float] = []
    for leaf in root_leaves:
        fraction = 1.0
        if leaf is not None and leaf.opcode == "dynamic-update-slice" and leaf.operands:
            buffer = _through_bitcasts(module, body, leaf.operands[0])
            if buffer is not None and buffer.opcode == "parameter":
                in_place.add(buffer.param_index or 0)
                update = module.operand_type(leaf, 1)
                fraction = update.elements / max(1, leaf.type.elements)
        out_fraction.append(fraction)
    for k in range(len(instr.operands)):
        if k in in_place:
            continue
        param = module.parameter(body, k)
        fraction = _read_fraction(module, param) if param is not None else 1.0
        acc.add(module.operand_type(instr, k), ctx.logical.operand_dtypes(instr, k), fraction)
    dtypes = ctx.logical.leaf_dtypes(instr.computation, instr.name)
    leaves = list(instr.type.leaves())
    if len(out_fraction) == len(leaves) and len(dtypes) == len(leaves):
        for out_leaf, d, fraction in zip(leaves, dtypes, out_fraction, strict=True):
            acc.add(out_leaf, (d,), fraction)
    else:
        _result_bytes(ctx, instr, acc)
    kind = "fusion"
    if flops:
        kind = "convolution" if _has(module, body, "convolution") else "dot"
    elif walked:
        kind = "collective"
    _record(
        ctx,
        instr,
        count,
        branch,
        kind=kind,
        acc=acc,
        flops=flops,
        flops_dtype=dtype,
        collectives=walked,
    )
    for name in unknown:
        ctx.note(instr, count, branch, f"custom call {name!r} inside the fusion: FLOPs unknown")


_SLICE_BODY = frozenset(
    {"parameter", "constant", "convert", "bitcast", "reshape", "copy", "dynamic-slice", "slice"}
)


def _slices_a_reduce_scatter(ctx: _Ctx, instr: _Instr, body: str) -> bool:
    """The CPU prints a reduce-scatter as an all-reduce and a fusion that dynamic-slices this
    device's part (:func:`reclassify_reduce_scatters`); on a chip that slice is the
    reduce-scatter's own output, so the fusion is elided."""

    def source(name: str) -> str:
        value = ctx.module.instr(instr.computation, name)
        for _ in range(4):  # through the CPU's elided dtype conversions
            if value is None or not value.operands or not ctx.logical.is_elided(value):
                break
            value = ctx.module.instr(instr.computation, value.operands[0])
        return value.name if value is not None else name

    if not any(
        any(c.kind == "reduce-scatter" for c in ctx.colls.get((instr.computation, source(n)), ()))
        for n in instr.operands
    ):
        return False
    floats = [i for i in ctx.module.computations.get(body, []) if i.type.dtype in FLOAT_DTYPES]
    return bool(floats) and all(i.opcode in _SLICE_BODY for i in floats)


def _has(module: _Module, body: str, opcode: str) -> bool:
    return any(i.opcode == opcode for i in module.computations.get(body, []))


def _through_bitcasts(module: _Module, comp: str, name: str) -> _Instr | None:
    instr = module.instr(comp, name)
    while instr is not None and instr.opcode in ("bitcast", "reshape") and instr.operands:
        instr = module.instr(comp, instr.operands[0])
    return instr


_SLICERS = frozenset({"slice", "dynamic-slice", "gather"})


def _read_fraction(module: _Module, param: _Instr) -> float:
    """How much of a fused parameter the body reads: the slices it takes, if it only slices
    it (through bitcasts and reshapes), else all of it."""
    total = param.type.elements
    if total == 0 or param.type.dtype is None:
        return 1.0
    read = 0
    frontier = [param]
    while frontier:
        value = frontier.pop()
        for user in module.users(value.computation, value.name):
            if user.opcode in ("bitcast", "reshape") and user.type.elements == total:
                frontier.append(user)
            elif (
                user.opcode in _SLICERS
                and user.operands[0] == value.name
                and all(n != value.name for n in user.operands[1:])
            ):
                read += user.type.elements
            elif user.opcode == "dynamic-update-slice" and user.operands[0] == value.name:
                continue  # the in-place buffer (counted through the result)
            else:
                return 1.0
    return min(1.0, read / total)


def _while(ctx: _Ctx, instr: _Instr, count: int, branch: Branch) -> None:
    """The body runs ``known_trip_count`` times, the condition once more; no trip count:
    once, and the loop is listed as uncosted."""
    trip_match = _TRIP_RE.search(instr.attrs)
    trip = int(trip_match.group(1)) if trip_match else 1
    if trip_match is None:
        ctx.note(
            instr,
            count,
            branch,
            "while loop without a known_trip_count: its body is counted once per execution",
        )
    callees = dict(ctx.module.callees(instr))
    if "condition" in callees:
        _walk(ctx, callees["condition"], count * (trip + 1), branch)
    if "body" in callees:
        _walk(ctx, callees["body"], count * trip, branch)


def _conditional(ctx: _Ctx, instr: _Instr, count: int, branch: Branch) -> None:
    """Each branch under its own tag: costs take the cheapest or dearest branch."""
    branches = [
        c
        for a, c in ctx.module.callees(instr)
        if a in ("branch_computations", "true_computation", "false_computation")
    ]
    ctx.conditionals.append(
        ConditionalSite(
            name=instr.name,
            computation=instr.computation,
            count=count,
            num_branches=len(branches),
            branch=branch,
        )
    )
    for k, comp in enumerate(branches):
        _walk(ctx, comp, count, (*branch, (instr.name, k)))


def _call(ctx: _Ctx, instr: _Instr, count: int, branch: Branch) -> None:
    """``call`` / ``async-start``: the called computation's ops, once per call."""
    attrs = _CONTROL_ATTRS.get(instr.opcode, ("to_apply", "calls"))
    for attr, comp in ctx.module.callees(instr):
        if attr in attrs:
            _walk(ctx, comp, count, branch)


def _custom_call(ctx: _Ctx, instr: _Instr, count: int, branch: Branch) -> None:
    """Bytes always; FLOPs for cuBLAS GEMMs; anything else is listed as uncosted."""
    target_match = _TARGET_RE.search(instr.attrs)
    target = target_match.group(1) if target_match else "?"
    flops = _gemm_flops(instr, ctx.module) if target in _GEMM_TARGETS else None
    acc = _Bytes()
    _operand_bytes(ctx, instr, acc)
    _result_bytes(ctx, instr, acc)
    dtype = None
    if flops is not None:
        got = ctx.logical.operand_dtypes(instr, 0)
        dtype = got[0] if got else None
    _record(
        ctx,
        instr,
        count,
        branch,
        kind="custom-call",
        acc=acc,
        flops=flops or 0,
        flops_dtype=dtype,
    )
    if flops is None:
        ctx.note(
            instr,
            count,
            branch,
            f"custom call {target!r}: its FLOPs are unknown (operand and result bytes are counted)",
        )


def _unmodelled(ctx: _Ctx, instr: _Instr, count: int, branch: Branch) -> None:
    """Host and peer transfers: bytes counted, the transfer itself is not modelled."""
    _generic(ctx, instr, count, branch)
    ctx.note(instr, count, branch, f"{instr.opcode}: host/peer transfer time is not modelled")


_FREE_OPS = (
    "parameter",
    "constant",
    "tuple",
    "get-tuple-element",
    "bitcast",
    "after-all",
    "partition-id",
    "replica-id",
    "opt-barrier",
    "add-dependency",
    "domain",
    "async-update",
    "async-done",
    "all-gather-done",
    "all-reduce-done",
    "collective-permute-done",
    "copy-done",
    "send-done",
    "recv-done",
)

#: One rule per opcode; anything not listed is :func:`_generic` (operand + result bytes).
RULES: dict[str, Rule] = {
    **dict.fromkeys(_FREE_OPS, _free),
    "dot": _matmul,
    "convolution": _matmul,
    "fusion": _fusion,
    "while": _while,
    "conditional": _conditional,
    "call": _call,
    "async-start": _call,
    "custom-call": _custom_call,
    "slice": _slicing,
    "dynamic-slice": _slicing,
    "gather": _slicing,
    "dynamic-update-slice": _in_place,
    "scatter": _in_place,
    "send": _unmodelled,
    "recv": _unmodelled,
    "infeed": _unmodelled,
    "outfeed": _unmodelled,
    **{
        kind + suffix: _collective
        for kind in (
            "all-gather",
            "all-reduce",
            "reduce-scatter",
            "all-to-all",
            "collective-permute",
            "ragged-all-to-all",
            "collective-broadcast",
        )
        for suffix in ("", "-start")
    },
}

__all__ += ["FLOAT_DTYPES", "collective_hints_from", "fold_branches"]
