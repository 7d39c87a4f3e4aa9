"""HLO text as printed: types, instructions, computations and the module's call graph.

The one parser under every reader of this package. :class:`_Module` splits a module's text
into computations of :class:`_Instr` (name, result :class:`_Type`, opcode, operands and
their inline types, the attributes after the operands), indexes each value's users, and
counts how many times each computation runs per step (while-loop trip counts multiply down
the call graph). :func:`_module` caches the parse, so parsing, reclassifying, deduping and
counting FLOPs over one text read it once. Also the bracket matching and top-level comma
splitting that attribute values need.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass

from sharding_roofline.errors import ValidationError

#: HLO op names of the collectives we read (without ``-start``/``-done``). The first five
#: are the values of :class:`sharding_roofline.collectives.Collective`.
COLLECTIVE_KINDS: tuple[str, ...] = (
    "all-gather",
    "all-reduce",
    "reduce-scatter",
    "all-to-all",
    "collective-permute",
    "ragged-all-to-all",
    "collective-broadcast",
)

#: (dtype, shape) of one array, as printed: ``("f32", (128, 1024))``.
Leaf = tuple[str, tuple[int, ...]]


# --------------------------------------------------------------------------------------
# Types and instructions


@dataclass(frozen=True, slots=True)
class _Type:
    """An HLO type: an array (``dtype`` set) or a tuple of types (``dtype`` None)."""

    dtype: str | None
    dims: tuple[int, ...] = ()
    parts: tuple[_Type, ...] = ()

    def leaves(self) -> Iterator[_Type]:
        if self.dtype is not None:
            yield self
        else:
            for part in self.parts:
                yield from part.leaves()

    @property
    def elements(self) -> int:
        return sum(math.prod(leaf.dims) for leaf in self.leaves())

    @property
    def leaf(self) -> Leaf:
        assert self.dtype is not None  # only called on arrays
        return (self.dtype, self.dims)


@dataclass(frozen=True, slots=True)
class _Instr:
    name: str
    computation: str
    type: _Type
    opcode: str
    operands: tuple[str, ...]
    operand_types: tuple[_Type | None, ...]
    attrs: str
    is_root: bool
    param_index: int | None = None  # ``parameter(k)``: k


#: Bytes per element of each HLO element type (sub-byte types round up to one byte, as
#: XLA stores them unpacked unless a layout packs them; ``token`` has no storage).
HLO_DTYPE_BYTES: dict[str, int] = {
    "pred": 1,
    "s2": 1,
    "s4": 1,
    "s8": 1,
    "s16": 2,
    "s32": 4,
    "s64": 8,
    "u2": 1,
    "u4": 1,
    "u8": 1,
    "u16": 2,
    "u32": 4,
    "u64": 8,
    "f4e2m1fn": 1,
    "f8e3m4": 1,
    "f8e4m3": 1,
    "f8e4m3fn": 1,
    "f8e4m3fnuz": 1,
    "f8e4m3b11fnuz": 1,
    "f8e5m2": 1,
    "f8e5m2fnuz": 1,
    "f8e8m0fnu": 1,
    "bf16": 2,
    "f16": 2,
    "f32": 4,
    "f64": 8,
    "c64": 8,
    "c128": 16,
    "token": 0,
}


def _itemsize(dtype: str) -> int:
    """Bytes per element of an HLO element type (``bf16`` -> 2); unknown types raise."""
    try:
        return HLO_DTYPE_BYTES[dtype]
    except KeyError:
        raise ValidationError(
            f"unknown HLO element type {dtype!r}; expected one of {', '.join(HLO_DTYPE_BYTES)}"
        ) from None


def _type_bytes(typ: _Type) -> int:
    """Bytes of every leaf of a type, as printed."""
    return sum(math.prod(leaf.dims) * _itemsize(leaf.dtype or "token") for leaf in typ.leaves())


def _format_type(typ: _Type) -> str:
    """``bf16[8,1024]`` or ``(f32[2], s32[])``, without layouts."""
    if typ.dtype is not None:
        return f"{typ.dtype}[{','.join(str(d) for d in typ.dims)}]"
    return "(" + ", ".join(_format_type(part) for part in typ.parts) + ")"


_OPENERS = {"(": ")", "[": "]", "{": "}"}
_LEAF_RE = re.compile(r"([a-z][a-z0-9]*)\[([^\]]*)\]")
_OPCODE_RE = re.compile(r"\s*([A-Za-z][\w\-]*)\(")
_INSTR_HEAD_RE = re.compile(r"^\s*(ROOT\s+)?(?:%([\w.\-]+)\s*=\s*|([\w.\-]+)\s+=\s+)")
_COMP_HEADER_RE = re.compile(r"^\s*(ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*)?\{\s*$")
_COMMENT_RE = re.compile(r"/\*.*?\*/")
_CALL_ATTR_RE = re.compile(
    r"\b(calls|body|condition|to_apply|true_computation|false_computation|"
    r"branch_computations|called_computations)=(\{[^{}]*\}|%?[\w.\-]+)"
)
_TRIP_COUNT_RE = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')
_LOOKS_INTERESTING_RE = re.compile(
    r"\b(?:" + "|".join(re.escape(kind) for kind in COLLECTIVE_KINDS) + r"|dot)(?:-start)?\("
)
_NO_OPERAND_OPS = frozenset({"constant", "parameter", "iota", "rng-get-and-update-state"})


def _close(text: str, start: int) -> int:
    """Index just past the bracket that closes ``text[start]`` (one of ``([{``)."""
    stack = [_OPENERS[text[start]]]
    i = start + 1
    while i < len(text):
        ch = text[i]
        if ch == '"':
            i += 1
            while i < len(text) and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
        elif ch in _OPENERS:
            stack.append(_OPENERS[ch])
        elif ch in ")]}":
            if ch != stack.pop():
                break
            if not stack:
                return i + 1
        i += 1
    raise ValidationError(f"unbalanced brackets in HLO text: {text[start : start + 80]!r}")


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets or quotes."""
    parts: list[str] = []
    depth, start, i = 0, 0, 0
    while i < len(text):
        ch = text[i]
        if ch == '"':
            i = text.find('"', i + 1)
            if i < 0:
                break
        elif ch in _OPENERS:
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
        i += 1
    parts.append(text[start:])
    return [part.strip() for part in parts if part.strip()]


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.replace(" ", "").split(",") if x)


def _parse_type_at(text: str, i: int) -> tuple[_Type, int]:
    """Read one HLO type starting at ``text[i]``; layouts (with tiling) are skipped."""
    while i < len(text) and text[i].isspace():
        i += 1
    if i < len(text) and text[i] == "(":
        parts: list[_Type] = []
        i += 1
        while True:
            while i < len(text) and text[i] in " ,":
                i += 1
            if i >= len(text):
                raise ValidationError(f"unterminated tuple type in HLO text: {text[:80]!r}")
            if text[i] == ")":
                return _Type(None, (), tuple(parts)), i + 1
            part, i = _parse_type_at(text, i)
            parts.append(part)
    match = _LEAF_RE.match(text, i)
    if match is None:
        raise ValidationError(f"cannot read an HLO type at {text[i : i + 60]!r}")
    dims: list[int] = []
    for dim in match.group(2).split(","):
        digits = re.sub(r"[^0-9]", "", dim)  # `<=8` (bounded dynamic) reads as its bound
        if dim.strip():
            if not digits:
                raise ValidationError(f"cannot read dimension {dim!r} of {match.group(0)!r}")
            dims.append(int(digits))
    i = match.end()
    if i < len(text) and text[i] == "{":
        i = _close(text, i)
    return _Type(match.group(1), tuple(dims)), i


def _parse_type(text: str) -> _Type:
    return _parse_type_at(text, 0)[0]


def _parse_instr(text: str, computation: str) -> _Instr:
    head = _INSTR_HEAD_RE.match(text)
    if head is None:
        raise ValidationError(f"not an HLO instruction: {text[:80]!r}")
    name = head.group(2) or head.group(3)
    typ, i = _parse_type_at(text, head.end())
    opcode_match = _OPCODE_RE.match(text, i)
    if opcode_match is None:
        raise ValidationError(f"cannot read the opcode of HLO instruction {text[:80]!r}")
    opcode = opcode_match.group(1)
    open_at = opcode_match.end() - 1
    close_at = _close(text, open_at)
    operands: list[str] = []
    operand_types: list[_Type | None] = []
    param_index: int | None = None
    if opcode == "parameter":
        inner = text[open_at + 1 : close_at - 1].strip()
        param_index = int(inner) if inner.isdigit() else None
    elif opcode not in _NO_OPERAND_OPS:
        for piece in _split_top_level(text[open_at + 1 : close_at - 1]):
            type_text, _, operand = piece.rpartition(" ")
            operands.append(operand.lstrip("%"))
            operand_types.append(_parse_type(type_text) if type_text.strip() else None)
    return _Instr(
        name=name,
        computation=computation,
        type=typ,
        opcode=opcode,
        operands=tuple(operands),
        operand_types=tuple(operand_types),
        attrs=text[close_at:],
        is_root=head.group(1) is not None,
        param_index=param_index,
    )


class _Module:
    """The parsed module: computations, instructions, users and execution counts."""

    __slots__ = ("_counts", "_instrs", "_users", "computations", "entry", "num_devices")

    def __init__(self, text: str) -> None:
        self.computations: dict[str, list[_Instr]] = {}
        self.entry: str | None = None
        self.num_devices = _module_num_devices(text)
        current: str | None = None
        pending: list[str] = []

        def flush() -> None:
            if current is None or not pending:
                return
            line = " ".join(pending)
            pending.clear()
            try:
                self.computations[current].append(_parse_instr(line, current))
            except ValidationError as exc:
                if _LOOKS_INTERESTING_RE.search(line):
                    raise ValidationError(
                        f"cannot read this HLO instruction in computation {current!r}: "
                        f"{line[:200]!r} ({exc})"
                    ) from exc

        for raw in _COMMENT_RE.sub("", text).splitlines():
            if current is None:
                header = _COMP_HEADER_RE.match(raw)
                if header is not None and not raw.lstrip().startswith("HloModule"):
                    current = header.group(2)
                    self.computations[current] = []
                    if header.group(1):
                        self.entry = current
                continue
            if raw.strip() == "}":
                flush()
                current = None
            elif _INSTR_HEAD_RE.match(raw):
                flush()
                pending.append(raw.strip())
            elif pending:
                pending.append(raw.strip())  # a pretty-printed instruction over several lines
        flush()

        self._instrs: dict[tuple[str, str], _Instr] = {}
        self._users: dict[tuple[str, str], list[_Instr]] = {}
        for comp, instrs in self.computations.items():
            for instr in instrs:
                self._instrs[(comp, instr.name)] = instr
                for operand in dict.fromkeys(instr.operands):
                    self._users.setdefault((comp, operand), []).append(instr)
        self._counts: dict[str, int] | None = None

    def instr(self, computation: str, name: str) -> _Instr | None:
        return self._instrs.get((computation, name))

    def root(self, computation: str) -> _Instr | None:
        """The ``ROOT`` instruction of a computation (its last one if none is marked)."""
        instrs = self.computations.get(computation, [])
        return next((i for i in instrs if i.is_root), instrs[-1] if instrs else None)

    def parameter(self, computation: str, index: int) -> _Instr | None:
        """The ``parameter(index)`` instruction of a computation."""
        return next(
            (
                i
                for i in self.computations.get(computation, [])
                if i.opcode == "parameter" and i.param_index == index
            ),
            None,
        )

    def callees(self, instr: _Instr) -> tuple[tuple[str, str], ...]:
        """``(attribute, computation)`` for each computation ``instr`` calls, in printed order
        (``calls``, ``body``, ``condition``, ``to_apply``, ``branch_computations``, ...)."""
        if "=" not in instr.attrs:
            return ()
        return tuple(
            (attr, callee)
            for attr, value in _CALL_ATTR_RE.findall(instr.attrs)
            for callee in re.findall(r"%?([\w.\-]+)", value)
            if callee in self.computations
        )

    def users(self, computation: str, name: str) -> list[_Instr]:
        return self._users.get((computation, name), [])

    def operand_type(self, instr: _Instr, index: int) -> _Type:
        inline = instr.operand_types[index] if index < len(instr.operand_types) else None
        if inline is not None:
            return inline
        if index < len(instr.operands):
            definition = self.instr(instr.computation, instr.operands[index])
            if definition is not None:
                return definition.type
        raise ValidationError(
            f"cannot find the type of operand {index} of {instr.opcode} {instr.name!r} in "
            f"computation {instr.computation!r}: it is neither printed inline nor defined in "
            "that computation. Pass the whole compiled module text (compiled.as_text())."
        )

    def execution_counts(self) -> dict[str, int]:
        """Times each computation runs per execution of the entry computation.

        A while body runs ``known_trip_count`` times per run of its caller (once if the trip
        count is not printed), its condition once more; every other call runs once. Calls
        multiply down the call graph and add over call sites. A computation nobody calls
        (the entry, or a hand-written fragment) runs once.
        """
        if self._counts is not None:
            return self._counts
        sites: dict[str, list[tuple[str, int]]] = {}
        for comp, instrs in self.computations.items():
            for instr in instrs:
                trip = _TRIP_COUNT_RE.search(instr.attrs) if instr.opcode == "while" else None
                for attr, value in _CALL_ATTR_RE.findall(instr.attrs):
                    factor = 1
                    if trip is not None and attr == "body":
                        factor = int(trip.group(1))
                    elif trip is not None and attr == "condition":
                        factor = int(trip.group(1)) + 1
                    for callee in re.findall(r"%?([\w.\-]+)", value):
                        sites.setdefault(callee, []).append((comp, factor))
        counts: dict[str, int] = {}

        def count(comp: str, visiting: frozenset[str]) -> int:
            if comp in counts:
                return counts[comp]
            if comp in visiting:
                raise ValidationError(f"the HLO call graph has a cycle through {comp!r}")
            callers = sites.get(comp, [])
            total = 1
            if comp != self.entry and callers:
                total = sum(count(caller, visiting | {comp}) * f for caller, f in callers)
            counts[comp] = total
            return total

        for comp in self.computations:
            count(comp, frozenset())
        self._counts = counts
        return counts

    def async_computations(self) -> frozenset[str]:
        """Computations run asynchronously: called by an ``*-start`` op, or named so."""
        found = {comp for comp in self.computations if "async" in comp}
        for instrs in self.computations.values():
            for instr in instrs:
                if instr.opcode.endswith("-start"):
                    for _, value in _CALL_ATTR_RE.findall(instr.attrs):
                        found.update(re.findall(r"%?([\w.\-]+)", value))
        return frozenset(found)


@functools.lru_cache(maxsize=16)
def _module(text: str) -> _Module:
    return _Module(text)


def _module_num_devices(text: str) -> int | None:
    header = next((line for line in text.splitlines() if line.startswith("HloModule")), "")
    partitions = re.search(r"\bnum_partitions=(\d+)", header)
    replicas = re.search(r"\breplica_count=(\d+)", header)
    num_partitions = int(partitions.group(1)) if partitions else 1
    num_replicas = int(replicas.group(1)) if replicas else 1
    if partitions is None and replicas is None:
        return None
    return num_partitions * num_replicas
