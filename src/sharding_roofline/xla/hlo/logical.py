"""The element types a real chip would use for a CPU-compiled module: undoing the upcast.

XLA's CPU backend cannot run most bf16 ops, so ``float-normalization-bf16`` rewrites each
one to f32 with converts around it, and ``all-reduce-promotion`` widens bf16 all-reduces
(jax_notes.md section 3.4): in ``compiled.as_text()`` every bf16 dot and collective prints
as f32, and bf16 values cross fusion boundaries as f32 (``wrapped_convert`` fusions, dot
fusions with f32 results). A TPU or GPU would keep them bf16. Costing the printed types
would double the bytes and put bf16 matmuls at the f32 rate.

:class:`LogicalTypes` gives every value of a module its *logical* element type, leaf by
leaf. With ``cpu_upcast=False`` (a TPU or GPU dump) that is the printed type. With
``cpu_upcast=True`` a value printed as a wide float (f32, or f16 for a collective of f8) is
taken to be narrow ``N`` (bf16, f16, f8) when either rule holds:

1. **Forward: it is narrow data widened.** A ``convert`` from ``N``; a fusion whose root is
   such a convert, or ``convert(convert(x, N))`` (the rounding pair the normaliser leaves
   after an upcast op); an elementwise or data-movement op (copy, transpose, slice,
   collectives, ...) all of whose float operands are narrow ``N`` (constants do not count);
   tuple plumbing (``tuple``, ``get-tuple-element``, ``while``, loop parameters) keeps the
   type of what it carries.
2. **Backward: every use rounds it to N.** Each user is a ``convert`` to ``N``, a fusion
   whose parameter is converted to ``N`` before anything else reads it (through bitcasts,
   reshapes, transposes and slices), or an elementwise or data-movement op whose own result
   is narrow by this rule. This is how a bf16 dot's f32 result (rounded by its consumer) and
   a promoted all-reduce are recognised, and why a dot with ``preferred_element_type=f32``
   whose result is used as f32 stays f32.

A dot or convolution runs at the rate of its operands' logical type (the wider of the two).
Collectives can take their type from a reference module instead (``collective_hints``: the
module dumped right after ``spmd-partitioning``, which has the logical types; matched by
``channel_id`` and shape), which settles the one case the rules cannot see: an f32
reduction whose result the program later rounds to bf16 on purpose.

A top-level ``convert``, or a fusion of only converts, bitcasts and reshapes, whose input and
output have the same logical type is a CPU-only artifact: :meth:`LogicalTypes.is_elided`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from ._text import _Instr, _itemsize, _Module, _Type

__all__ = ["FLOAT_DTYPES", "LogicalTypes", "looks_like_cpu_compile"]

#: HLO float element types, narrowest first within each width.
FLOAT_DTYPES = frozenset(
    {
        "f4e2m1fn",
        "f8e3m4",
        "f8e4m3",
        "f8e4m3fn",
        "f8e4m3fnuz",
        "f8e4m3b11fnuz",
        "f8e5m2",
        "f8e5m2fnuz",
        "f8e8m0fnu",
        "bf16",
        "f16",
        "f32",
        "f64",
    }
)
#: The types the CPU backend widens narrow floats to (bf16 -> f32; f8 -> f16 collectives).
_WIDE = frozenset({"f32", "f16"})

#: Ops that move or combine values elementwise without changing what a value is: on a chip
#: they run in the type of their operands.
_PRESERVING = frozenset(
    {
        "abs",
        "add",
        "all-gather",
        "all-reduce",
        "all-to-all",
        "atan2",
        "bitcast",
        "broadcast",
        "cbrt",
        "ceil",
        "clamp",
        "collective-permute",
        "concatenate",
        "copy",
        "cosine",
        "divide",
        "dynamic-slice",
        "dynamic-update-slice",
        "erf",
        "exponential",
        "exponential-minus-one",
        "floor",
        "gather",
        "log",
        "log-plus-one",
        "logistic",
        "maximum",
        "minimum",
        "multiply",
        "negate",
        "pad",
        "power",
        "reduce",
        "reduce-precision",
        "reduce-scatter",
        "reduce-window",
        "remainder",
        "reshape",
        "reverse",
        "round-nearest-afz",
        "round-nearest-even",
        "rsqrt",
        "scatter",
        "select",
        "sign",
        "sine",
        "slice",
        "sort",
        "sqrt",
        "subtract",
        "tan",
        "tanh",
        "transpose",
    }
)
#: Ops a value passes through unchanged on its way to a convert (backward rule, in bodies).
_THROUGH = frozenset({"bitcast", "reshape", "transpose", "copy", "slice", "dynamic-slice"})
#: Bodies made only of these are pure dtype conversions (CPU artifacts when types agree).
_CONVERT_ONLY = frozenset({"parameter", "convert", "bitcast", "reshape", "tuple"})
_CONSTANT_LIKE = frozenset({"constant", "iota"})
_INDEX_RE = re.compile(r"\bindex=(\d+)")

#: Markers of a CPU compile in module text: YNNPACK dot fusions, promoted reducers, the CPU
#: backend's parallel-task config.
_CPU_MARKERS = ("__ynn_fusion", "_promoted", "outer_dimension_partitions")
_NARROW_CONVERT_RE = re.compile(r"%([\w.\-]+) = bf16\[[^\]]*\]\S* convert\(")


def looks_like_cpu_compile(text: str) -> bool:
    """Whether a module's text shows the CPU backend's passes (so its bf16 printed as f32):
    one of the CPU's markers, or the rounding pair ``convert(convert(x, bf16), f32)`` that
    float normalisation leaves behind."""
    if any(marker in text for marker in _CPU_MARKERS):
        return True
    names = _NARROW_CONVERT_RE.findall(text)
    return any(
        "f32[" in text and re.search(rf"f32\[[^\]]*\]\S* convert\(%{re.escape(n)}\)", text)
        for n in names[:50]
    )


def _narrower(narrow: str, wide: str) -> bool:
    return (
        narrow in FLOAT_DTYPES
        and wide in _WIDE
        and narrow != wide
        and _itemsize(narrow) < _itemsize(wide)
    )


def _leaf_count(typ: _Type) -> int:
    return 1 if typ.dtype is not None else sum(_leaf_count(p) for p in typ.parts)


def _printed(typ: _Type) -> tuple[str, ...]:
    return tuple(leaf.dtype or "token" for leaf in typ.leaves())


Hints = Mapping[int, tuple[tuple[str, tuple[int, ...], str], ...]]


class LogicalTypes:
    """Logical element types of a module's values (see the module docstring for the rules).

    ``control`` names the computations whose instructions are top-level ops (the entry,
    loop bodies and conditions, conditional branches, called computations); values inside
    fusion bodies are typed per fusion through :meth:`body_dtypes`.
    """

    def __init__(
        self,
        module: _Module,
        control: tuple[str, ...],
        *,
        cpu_upcast: bool,
        collective_hints: Hints | None = None,
        param_sources: Mapping[str, tuple[tuple[str, str], ...]] | None = None,
    ) -> None:
        self._m = module
        self.cpu_upcast = cpu_upcast
        self._control = control
        self._hints = collective_hints or {}
        # computation -> the call site operands its parameter(s) come from: (comp, name)
        self._param_sources = dict(param_sources or {})
        self._leaves: dict[tuple[str, str], tuple[str, ...]] = {}
        self._bodies: dict[tuple[str, tuple[str, ...]], dict[str, str]] = {}
        self._rounds: dict[tuple[str, int], str | None] = {}
        self._rounded: dict[tuple[str, str], tuple[str, ...]] = {}  # narrowed by rule 2
        if cpu_upcast:
            self._infer()

    # -- queries ---------------------------------------------------------------------------

    def leaf_dtypes(self, computation: str, name: str) -> tuple[str, ...]:
        """Logical element type of each leaf of a top-level value (printed if unknown)."""
        key = (computation, name)
        got = self._leaves.get(key)
        if got is not None:
            return got
        instr = self._m.instr(computation, name)
        got = _printed(instr.type) if instr is not None else ()
        if not self.cpu_upcast:
            self._leaves[key] = got  # nothing to infer: remember the printed types
        return got

    def operand_dtypes(self, instr: _Instr, index: int) -> tuple[str, ...]:
        """Logical leaf types of operand ``index`` of a top-level instruction."""
        name = instr.operands[index]
        if self._m.instr(instr.computation, name) is not None:
            return self.leaf_dtypes(instr.computation, name)
        return _printed(self._m.operand_type(instr, index))

    def body_dtypes(self, fusion: _Instr, body: str) -> dict[str, str]:
        """Logical type of each array value in the body of ``fusion`` (a fused or called
        computation), given the logical types of the fusion's operands."""
        operand_types = tuple(
            self.operand_dtypes(fusion, k)[0] if self.operand_dtypes(fusion, k) else "token"
            for k in range(len(fusion.operands))
        )
        return self._body(body, operand_types)

    def is_elided(self, instr: _Instr) -> bool:
        """A top-level dtype conversion that only exists because the CPU widened a type: a
        ``convert`` or a fusion of only converts/bitcasts/reshapes whose input and output
        have the same logical type."""
        if not self.cpu_upcast or not instr.operands:
            return False
        if instr.opcode == "fusion":
            bodies = [c for a, c in self._m.callees(instr) if a == "calls"]
            if len(bodies) != 1 or any(
                i.opcode not in _CONVERT_ONLY for i in self._m.computations[bodies[0]]
            ):
                return False
        elif instr.opcode != "convert":
            return False
        out = self.leaf_dtypes(instr.computation, instr.name)
        ins = [d for k in range(len(instr.operands)) for d in self.operand_dtypes(instr, k)]
        return bool(ins) and set(out) == set(ins) and len(set(out)) == 1

    def collective_hint(
        self, channel_id: int | None, kind: str, dims: tuple[int, ...]
    ) -> str | None:
        """The logical type a reference module gives a collective leaf (by channel and shape)."""
        if channel_id is None:
            return None
        for hint_kind, hint_dims, dtype in self._hints.get(channel_id, ()):
            if hint_dims == dims and (hint_kind == kind or {hint_kind, kind} <= _REDUCING):
                return dtype
        return None

    # -- inference -------------------------------------------------------------------------

    def _infer(self) -> None:
        # Forward over the control computations in call order, then backward rounding
        # (sticky), then forward again so what follows a newly narrowed value sees it, until
        # the backward rule narrows nothing new.
        for _ in range(4):
            for comp in self._control:
                for instr in self._m.computations.get(comp, []):
                    key = (comp, instr.name)
                    self._leaves[key] = self._rounded.get(key) or self._forward(instr)
            changed = False
            for comp in self._control:
                for instr in self._m.computations.get(comp, []):
                    current = self.leaf_dtypes(comp, instr.name)
                    if len(current) != 1 or current[0] not in _WIDE:
                        continue
                    narrow = self._rounded_by_uses(instr, depth=0)
                    if narrow is not None and _narrower(narrow, current[0]):
                        self._rounded[(comp, instr.name)] = (narrow,)
                        changed = True
            if not changed:
                break

    def _source_dtypes(self, comp: str, name: str) -> tuple[str, ...]:
        got = self._leaves.get((comp, name))
        if got is not None:
            return got
        instr = self._m.instr(comp, name)
        return _printed(instr.type) if instr is not None else ()

    def _param_dtypes(self, instr: _Instr) -> tuple[str, ...]:
        sources = self._param_sources.get(instr.computation)
        index = instr.param_index or 0
        if sources and index < len(sources):
            comp, name = sources[index]
            got = self._source_dtypes(comp, name)
            if len(got) == _leaf_count(instr.type):
                return got
        return _printed(instr.type)

    def _forward(self, instr: _Instr) -> tuple[str, ...]:
        printed = _printed(instr.type)
        op = instr.opcode
        comp = instr.computation
        if op == "parameter":
            return self._param_dtypes(instr)
        hinted = self._hinted(instr)
        if hinted is not None:
            return hinted
        if op == "get-tuple-element":
            src = self._source_dtypes(comp, instr.operands[0])
            operand = self._m.instr(comp, instr.operands[0])
            index = _INDEX_RE.search(instr.attrs)
            if operand is None or index is None or operand.type.dtype is not None:
                return printed
            k = int(index.group(1))
            start = sum(_leaf_count(p) for p in operand.type.parts[:k])
            got = src[start : start + len(printed)]
            return got if len(got) == len(printed) else printed
        if op == "tuple":
            got = tuple(d for name in instr.operands for d in self._source_dtypes(comp, name))
            return got if len(got) == len(printed) else printed
        if op in ("while", "opt-barrier"):
            got = self._source_dtypes(comp, instr.operands[0]) if instr.operands else ()
            return got if len(got) == len(printed) else printed
        if op in ("fusion", "call"):
            bodies = [c for a, c in self._m.callees(instr) if a in ("calls", "to_apply")]
            if len(bodies) != 1:
                return printed
            body = self.body_dtypes(instr, bodies[0])
            root = self._m.root(bodies[0])
            if root is None:
                return printed
            if root.opcode == "tuple":
                got = tuple(body.get(name, "") for name in root.operands)
            else:
                got = (body.get(root.name, ""),)
            if len(got) != len(printed) or "" in got:
                return printed
            return tuple(g if _narrower(g, p) else p for g, p in zip(got, printed, strict=True))
        if instr.type.dtype is None:
            # a tuple-shaped collective (combined all-reduce, CPU all-to-all): leaf k is
            # operand k's data
            if op.removesuffix("-start") in _PRESERVING and len(instr.operands) == len(printed):
                ins = [self._source_dtypes(comp, name) for name in instr.operands]
                return tuple(
                    i[0] if len(i) == 1 and _narrower(i[0], p) else p
                    for i, p in zip(ins, printed, strict=True)
                )
            return printed
        if printed[0] not in _WIDE:
            return printed
        if op == "convert":
            src = self._source_dtypes(comp, instr.operands[0])
            if len(src) == 1 and _narrower(src[0], printed[0]):
                return src
            return printed
        if op in _PRESERVING:
            narrow = self._common_narrow(instr, printed[0], self._source_dtypes)
            if narrow is not None:
                return (narrow,)
        return printed

    def _hinted(self, instr: _Instr) -> tuple[str, ...] | None:
        """A collective's leaf types from the reference module, when it has all of them."""
        kind = instr.opcode.removesuffix("-start")
        if not self._hints or kind not in _COLLECTIVES:
            return None
        channel = _CHANNEL_RE.search(instr.attrs)
        if channel is None:
            return None
        leaves = [leaf for leaf in instr.type.leaves() if leaf.dtype != "token"]
        if instr.opcode.endswith("-start"):
            return None  # async forms: the rules handle them (never on CPU)
        got = [self.collective_hint(int(channel.group(1)), kind, leaf.dims) for leaf in leaves]
        if any(g is None for g in got) or len(got) != len(_printed(instr.type)):
            return None
        return tuple(g for g in got if g is not None)

    def _common_narrow(
        self, instr: _Instr, wide: str, lookup: Callable[[str, str], tuple[str, ...]]
    ) -> str | None:
        """The one narrow type all of ``instr``'s float operands have, ignoring constants."""
        found: set[str] = set()
        for name in instr.operands:
            operand = self._m.instr(instr.computation, name)
            if operand is not None and _is_constant_like(self._m, operand):
                continue
            dtypes = lookup(instr.computation, name)
            floats = [d for d in dtypes if d in FLOAT_DTYPES]
            found.update(floats)
        if len(found) == 1:
            (narrow,) = found
            return narrow if _narrower(narrow, wide) else None
        return None

    def _rounded_by_uses(self, instr: _Instr, depth: int) -> str | None:
        """The narrow type every use of a top-level value rounds it to, or None."""
        users = self._m.users(instr.computation, instr.name)
        if not users or instr.is_root or depth > 3:
            return None
        found: set[str] = set()
        for user in users:
            narrow: str | None = None
            if user.opcode == "convert" and user.type.dtype in FLOAT_DTYPES:
                narrow = user.type.dtype if user.type.dtype not in _WIDE else None
            elif user.opcode == "fusion":
                bodies = [c for a, c in self._m.callees(user) if a == "calls"]
                if len(bodies) == 1:
                    indices = [k for k, n in enumerate(user.operands) if n == instr.name]
                    got = {self._param_rounds(bodies[0], k) for k in indices}
                    narrow = got.pop() if len(got) == 1 else None
            elif user.opcode in _PRESERVING and user.type.dtype is not None:
                current = self.leaf_dtypes(user.computation, user.name)
                if len(current) == 1 and current[0] not in _WIDE:
                    narrow = current[0]
                else:
                    narrow = self._rounded_by_uses(user, depth + 1)
            if narrow is None:
                return None
            found.add(narrow)
        return found.pop() if len(found) == 1 else None

    def _param_rounds(self, body: str, index: int) -> str | None:
        """The narrow type a fused body converts parameter ``index`` to before any other
        use (through bitcasts, reshapes, transposes, copies and slices), or None."""
        key = (body, index)
        if key not in self._rounds:
            param = self._m.parameter(body, index)
            self._rounds[key] = None if param is None else self._body_rounds(param, 0)
        return self._rounds[key]

    def _body_rounds(self, value: _Instr, depth: int) -> str | None:
        users = self._m.users(value.computation, value.name)
        if not users or value.is_root or depth > 4:
            return None
        found: set[str] = set()
        for user in users:
            if user.opcode == "convert" and user.type.dtype in FLOAT_DTYPES:
                if user.type.dtype in _WIDE:
                    return None
                found.add(user.type.dtype)
            elif user.opcode in _THROUGH and user.operands and user.operands[0] == value.name:
                got = self._body_rounds(user, depth + 1)
                if got is None:
                    return None
                found.add(got)
            else:
                return None
        return found.pop() if len(found) == 1 else None

    def _body(self, body: str, operand_types: tuple[str, ...]) -> dict[str, str]:
        key = (body, operand_types)
        cached = self._bodies.get(key)
        if cached is not None:
            return cached
        out: dict[str, str] = {}
        self._bodies[key] = out  # a recursive call sees a partial map, never loops
        for instr in self._m.computations.get(body, []):
            if instr.type.dtype is None:
                continue
            printed = instr.type.dtype
            if not self.cpu_upcast:
                out[instr.name] = printed
                continue
            if instr.opcode == "parameter":
                index = instr.param_index or 0
                given = operand_types[index] if index < len(operand_types) else printed
                out[instr.name] = given if _narrower(given, printed) else printed
                continue
            if printed not in _WIDE:
                out[instr.name] = printed
                continue
            if instr.opcode == "convert":
                src = out.get(instr.operands[0], printed)
                out[instr.name] = src if _narrower(src, printed) else printed
                continue
            if instr.opcode in _PRESERVING:
                narrow = self._common_narrow(instr, printed, _lookup_in(out))
                out[instr.name] = narrow if narrow is not None else printed
                continue
            out[instr.name] = printed
        return out


def _lookup_in(types: dict[str, str]) -> Callable[[str, str], tuple[str, ...]]:
    def lookup(_computation: str, name: str) -> tuple[str, ...]:
        return (types[name],) if name in types else ()

    return lookup


_REDUCING = frozenset({"all-reduce", "reduce-scatter"})
_COLLECTIVES = frozenset(
    {"all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute"}
)
_CHANNEL_RE = re.compile(r"\bchannel_id=(\d+)")


def _is_constant_like(module: _Module, instr: _Instr) -> bool:
    """A constant, an iota, or a broadcast of one: it takes the type of what it meets."""
    if instr.opcode in _CONSTANT_LIKE:
        return True
    if instr.opcode == "broadcast" and instr.operands:
        source = module.instr(instr.computation, instr.operands[0])
        return source is not None and source.opcode in _CONSTANT_LIKE
    return False
