"""Compiled HLO text -> the collectives XLA really emitted, and the dot FLOPs.

Pure text processing: this module never imports JAX, so its tests read captured fixtures.
The input is ``compiled.as_text()``, the per-device program after SPMD partitioning.
What it relies on (jax_notes.md section 3, seen with jax 0.10.2 on simulated CPU devices):

- Collectives can sit in any computation (fusions, while bodies), so every computation is
  scanned. An async ``-start`` op is counted once; its ``-done`` half is skipped.
- Replica groups print in five forms (:func:`parse_replica_groups`). The ids in them are
  *partition* ids, i.e. positions in the jitted mesh's device array in row-major order, not
  ``Device.id``: a mesh whose devices are permuted prints exactly the same groups.
- The CPU backend never prints ``reduce-scatter``: it prints an all-reduce whose result is
  dynamic-sliced to 1/g (:func:`reclassify_reduce_scatters`).
- The CPU all-to-all is a tuple with one operand per peer; combined all-reduces are tuples.
  A collective's per-device size is the sum over its result leaves.
- A collective inside a ``scan``/``fori_loop`` is printed once, in the while body; the trip
  count is in the while op's ``backend_config`` (``known_trip_count``).
- On CPU every bf16 collective and dot prints as f32: take element counts from here and the
  dtype from the plan.

Use :func:`read_collectives` (parse, reclassify, dedupe and weight) and :func:`dot_flops`.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

from sharding_roofline.errors import SpecError, ValidationError

__all__ = [
    "COLLECTIVE_KINDS",
    "HloCollective",
    "dedupe_and_weight",
    "dot_flops",
    "groups_to_axes",
    "pairs_to_axes",
    "parse_collectives",
    "parse_replica_groups",
    "read_collectives",
    "reclassify_reduce_scatters",
]

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
Groups = tuple[tuple[int, ...], ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class HloCollective:
    """One collective op of a compiled program, as this device sees it.

    ``result_types`` are the output leaves only (an async start's operand aliases and
    ``u32[]`` context scalars are dropped). ``groups`` are device groups in partition ids
    (``None`` when the op prints none, e.g. a permute); ``pairs`` are a permute's
    ``source_target_pairs``. ``count`` is how many times the op runs per step (the product of
    the trip counts of the while loops around it), set by :func:`dedupe_and_weight`.
    """

    kind: str
    is_async: bool
    result_types: tuple[Leaf, ...]
    groups: Groups | None
    pairs: tuple[tuple[int, int], ...] | None
    dimensions: tuple[int, ...]
    channel_id: int | None
    computation: str
    name: str
    count: int = 1

    def __post_init__(self) -> None:
        if self.kind not in COLLECTIVE_KINDS:
            raise ValidationError(
                f"HloCollective {self.name!r}: unknown kind {self.kind!r}; "
                f"expected one of {', '.join(COLLECTIVE_KINDS)}."
            )
        if self.count < 0:
            raise ValidationError(
                f"HloCollective {self.name!r}: count must be >= 0 (times executed), "
                f"got {self.count}."
            )

    @property
    def elements_out_per_device(self) -> int:
        """Elements of this device's result: the sum over the result leaves."""
        return sum(math.prod(shape) for _, shape in self.result_types)

    @property
    def group_size(self) -> int:
        """Devices per group: the first group's size, or the devices a permute touches."""
        if self.groups:
            return len(self.groups[0])
        if self.pairs is not None:
            return len({device for pair in self.pairs for device in pair})
        raise ValidationError(
            f"{self.kind} {self.name!r} in computation {self.computation!r} has no replica "
            "groups (the module text did not say how many devices it runs on, so "
            "replica_groups={} could not be expanded); pass the whole compiled module text."
        )


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
_COLLECTIVE_OP_RE = re.compile(
    r"^(" + "|".join(re.escape(kind) for kind in COLLECTIVE_KINDS) + r")(-start|-done)?$"
)
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
    if opcode not in _NO_OPERAND_OPS:
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


# --------------------------------------------------------------------------------------
# Replica groups

_ACCEPTED_FORMS = (
    "{{0,1,2,3},{4,5,6,7}} (explicit groups), {} (one group of all devices; needs "
    "num_devices), [2,4]<=[8] (iota), [4,2]<=[2,4]T(1,0) (transposed iota), or "
    "mesh['axis_0'=2,'axis_1'=4] {'axis_1'} (mesh axes, optionally with "
    "device_ids=([2,4]T(1,0)) after the mesh and sub-axes such as {'axis_0':(1)2})"
)
_IOTA_RE = re.compile(r"^\[([\d,\s]+)\]\s*<=\s*\[([\d,\s]+)\]\s*(?:T\(([\d,\s]+)\))?$")
_MESH_RE = re.compile(r"^mesh\[([^\]]*)\]\s*(?:,\s*device_ids=\((.*)\))?\s*\{([^{}]*)\}$")
_MESH_AXIS_RE = re.compile(r"^'?([^'=]+?)'?\s*=\s*(\d+)$")
_AXIS_REF_RE = re.compile(r"^'?([^':]+?)'?\s*(?::\((\d+)\)(\d+))?$")


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.replace(" ", "").split(",") if x)


def _transposed(values: Sequence[int], dims: Sequence[int], perm: Sequence[int]) -> list[int]:
    """``values`` viewed as an array of shape ``dims``, transposed by ``perm``, flattened."""
    strides = [math.prod(dims[k + 1 :]) for k in range(len(dims))]
    out_dims = [dims[p] for p in perm]
    return [
        values[sum(index[k] * strides[perm[k]] for k in range(len(perm)))]
        for index in itertools.product(*(range(d) for d in out_dims))
    ]


def _bad_groups(attr: str, why: str) -> ValidationError:
    return ValidationError(
        f"cannot read replica_groups {attr!r}: {why}. Accepted forms: {_ACCEPTED_FORMS}."
    )


def _check_perm(attr: str, perm: Sequence[int], ndims: int) -> None:
    if sorted(perm) != list(range(ndims)):
        raise _bad_groups(attr, f"T{tuple(perm)} is not a permutation of {ndims} dimensions")


def parse_replica_groups(attr: str, num_devices: int | None = None) -> Groups:
    """Expand any printed ``replica_groups=`` value into explicit device groups.

    - ``{{0,1,2,3},{4,5,6,7}}``: the groups as listed; ``{}``: one group of all
      ``num_devices`` devices.
    - ``[G,S]<=[d0,d1,...]T(p...)``: ``arange(prod d).reshape(d).transpose(p)`` reshaped to
      ``G`` rows of ``S``; each row is a group (XLA's ``IotaReplicaGroupList``).
    - ``mesh['a'=2,'b'=4], device_ids=(...) {'b'}``: the device array (iota, or
      ``device_ids``, itself ``[d..]T(p..)`` or a comma list) reshaped to the mesh; a group
      varies the listed axes (in the listed order) with the other axes fixed. A sub-axis
      ``'a':(pre)size`` splits axis ``a`` into ``[pre, size, rest]`` and varies ``size``
      (XLA's ``MeshAxesReplicaGroupList``, replica_group.cc / mesh_and_axis.cc).
    """
    text = attr.strip()
    if text.startswith("replica_groups="):
        text = text.removeprefix("replica_groups=").strip()
    if re.fullmatch(r"\{\s*\}", text):
        if num_devices is None or num_devices < 1:
            raise _bad_groups(attr, "{} means one group of all devices; pass num_devices")
        return (tuple(range(num_devices)),)
    if text.startswith("{"):
        return _parse_explicit_groups(attr, text)
    iota = _IOTA_RE.match(text)
    if iota is not None:
        group_shape, dims = _ints(iota.group(1)), _ints(iota.group(2))
        perm = _ints(iota.group(3)) if iota.group(3) else tuple(range(len(dims)))
        _check_perm(attr, perm, len(dims))
        if len(group_shape) != 2 or math.prod(group_shape) != math.prod(dims):
            raise _bad_groups(
                attr,
                f"the group shape {list(group_shape)} must be [num_groups, group_size] holding "
                f"the {math.prod(dims)} devices of the iota {list(dims)}",
            )
        flat = _transposed(range(math.prod(dims)), dims, perm)
        size = group_shape[1]
        return tuple(tuple(flat[k : k + size]) for k in range(0, len(flat), size))
    mesh = _MESH_RE.match(text)
    if mesh is not None:
        return _parse_mesh_groups(attr, mesh.group(1), mesh.group(2), mesh.group(3))
    raise _bad_groups(attr, "this is none of the printed forms")


def _parse_explicit_groups(attr: str, text: str) -> Groups:
    inner = text[1:-1].strip() if text.endswith("}") else None
    if inner is None or re.sub(r"\{[\d,\s]*\}|[,\s]", "", inner):
        raise _bad_groups(attr, "an explicit list must be braces of integer lists")
    groups = tuple(_ints(group) for group in re.findall(r"\{([\d,\s]*)\}", inner))
    if not groups or any(not group for group in groups):
        raise _bad_groups(attr, "a group is empty")
    return groups


def _parse_mesh_groups(attr: str, axes_text: str, ids_text: str | None, refs: str) -> Groups:
    names: list[str] = []
    sizes: list[int] = []
    for item in _split_top_level(axes_text):
        axis = _MESH_AXIS_RE.match(item)
        if axis is None:
            raise _bad_groups(attr, f"mesh axis {item!r} is not 'name'=size")
        names.append(axis.group(1))
        sizes.append(int(axis.group(2)))
    if not names:
        raise _bad_groups(attr, "the mesh has no axes")
    num = math.prod(sizes)
    devices: Sequence[int] = range(num)
    if ids_text is not None:
        ids = ids_text.strip()
        iota = re.fullmatch(r"\[([\d,\s]+)\]\s*(?:T\(([\d,\s]+)\))?", ids)
        if iota is not None:
            dims = _ints(iota.group(1))
            perm = _ints(iota.group(2)) if iota.group(2) else tuple(range(len(dims)))
            _check_perm(attr, perm, len(dims))
            devices = _transposed(range(math.prod(dims)), dims, perm)
        elif re.fullmatch(r"[\d,\s]+", ids):
            devices = list(_ints(ids))
        else:
            raise _bad_groups(attr, f"device_ids=({ids}) is neither [dims]T(perm) nor a list")
        if len(devices) != num:
            raise _bad_groups(attr, f"device_ids has {len(devices)} devices, the mesh {num}")

    # Which axis refs sit on each mesh dimension: full axes or (pre_size, size) sub-axes.
    by_dim: dict[int, list[tuple[int, int] | None]] = {}
    order: list[tuple[int, tuple[int, int] | None]] = []
    for item in _split_top_level(refs):
        ref = _AXIS_REF_RE.match(item)
        if ref is None or ref.group(1) not in names:
            raise _bad_groups(attr, f"axis {item!r} is not one of the mesh axes {names}")
        dim = names.index(ref.group(1))
        sub = (int(ref.group(2)), int(ref.group(3))) if ref.group(2) else None
        if sub is not None and (sub[0] < 1 or sizes[dim] % (sub[0] * sub[1]) != 0):
            raise _bad_groups(attr, f"sub-axis {item!r} does not divide axis size {sizes[dim]}")
        by_dim.setdefault(dim, []).append(sub)
        order.append((dim, sub))

    # Split each mesh dimension into the pieces its refs name (XLA's ComputeReindexedAxes).
    reindexed: list[int] = []
    piece_of: dict[tuple[int, tuple[int, int] | None], int] = {}
    for dim, size in enumerate(sizes):
        subs = by_dim.get(dim)
        if not subs:
            reindexed.append(size)
            continue
        if None in subs:
            if len(subs) > 1:
                raise _bad_groups(attr, f"axis {names[dim]!r} is listed twice or in parts")
            piece_of[(dim, None)] = len(reindexed)
            reindexed.append(size)
            continue
        covered = 1
        for pre, sub_size in sorted(s for s in subs if s is not None):
            if pre % covered != 0:
                raise _bad_groups(attr, f"sub-axes of {names[dim]!r} overlap")
            if pre != covered:
                reindexed.append(pre // covered)
            piece_of[(dim, (pre, sub_size))] = len(reindexed)
            reindexed.append(sub_size)
            covered = pre * sub_size
        if covered != size:
            reindexed.append(size // covered)

    grouped = [piece_of[key] for key in order]
    if len(set(grouped)) != len(grouped):
        raise _bad_groups(attr, "an axis is listed twice")
    # Fixed pieces first, then the grouped ones: each run of `size` is one group.
    order_perm = [k for k in range(len(reindexed)) if k not in grouped] + grouped
    flat = _transposed(devices, reindexed, order_perm)
    size = math.prod(reindexed[k] for k in grouped)
    return tuple(tuple(flat[k : k + size]) for k in range(0, len(flat), size))


def _take_replica_groups(attrs: str) -> str | None:
    """The printed value of ``replica_groups=`` in an instruction's attributes, if any."""
    at = attrs.find("replica_groups=")
    if at < 0:
        return None
    i = at + len("replica_groups=")
    if attrs.startswith("mesh[", i):
        end = attrs.index("]", i) + 1
        ids = re.compile(r",\s*device_ids=").match(attrs, end)
        if ids is not None:
            end = _close(attrs, ids.end())
        brace = re.compile(r"\s*\{").match(attrs, end)
        if brace is None:
            return attrs[i:end]
        return attrs[i : _close(attrs, brace.end() - 1)]
    if attrs.startswith("{", i):
        return attrs[i : _close(attrs, i)]
    iota = re.compile(r"\[[\d,]*\]<=\[[\d,]*\](?:T\([\d,]*\))?").match(attrs, i)
    if iota is not None:
        return iota.group(0)
    end = attrs.find(",", i)
    return attrs[i : end if end >= 0 else len(attrs)]


# --------------------------------------------------------------------------------------
# Parsing collectives


def _output_leaves(instr: _Instr, kind: str, is_start: bool) -> tuple[Leaf, ...]:
    typ = instr.type
    if is_start and typ.dtype is None:
        # Async starts return (operand aliases..., outputs..., u32[] context scalars...).
        parts = [p for p in typ.parts if not (p.dtype in ("u32", "s32") and p.dims == ())]
        aliased = kind in ("all-gather", "collective-permute", "collective-broadcast", "all-to-all")
        if aliased and len(parts) >= 2 and len(parts) % 2 == 0:
            parts = parts[len(parts) // 2 :]
        typ = _Type(None, (), tuple(parts))
    return tuple(leaf.leaf for leaf in typ.leaves() if leaf.dtype != "token")


def parse_collectives(text: str) -> tuple[HloCollective, ...]:
    """Every collective op in every computation of a compiled module's text, in text order.

    ``-start`` forms count once (``is_async=True``); ``-done`` ops are skipped. Raw: no
    reduce-scatter reclassification, no dedupe, ``count=1`` (see :func:`read_collectives`).
    """
    module = _module(text)
    async_comps = module.async_computations()
    found: list[HloCollective] = []
    for comp, instrs in module.computations.items():
        for instr in instrs:
            op = _COLLECTIVE_OP_RE.match(instr.opcode)
            if op is None or op.group(2) == "-done":
                continue
            kind, is_start = op.group(1), op.group(2) == "-start"
            groups_text = _take_replica_groups(instr.attrs)
            groups: Groups | None = None
            if groups_text is not None:
                if re.fullmatch(r"\{\s*\}", groups_text) and module.num_devices is None:
                    groups = None
                else:
                    groups = parse_replica_groups(groups_text, module.num_devices)
            elif kind != "collective-permute" and module.num_devices is not None:
                groups = (tuple(range(module.num_devices)),)  # none printed: all devices
            pairs_match = re.search(
                r"\bsource_target_pairs=\{((?:\s*\{[^{}]*\},?)*)\s*\}", instr.attrs
            )
            pairs = None
            if pairs_match is not None:
                pairs = tuple(
                    (int(a), int(b))
                    for a, b in re.findall(r"\{\s*(\d+)\s*,\s*(\d+)\s*\}", pairs_match.group(1))
                )
            dims_match = re.search(r"\bdimensions=\{([\d,\s]*)\}", instr.attrs)
            channel = re.search(r"\bchannel_id=(\d+)", instr.attrs)
            found.append(
                HloCollective(
                    kind=kind,
                    is_async=is_start or comp in async_comps,
                    result_types=_output_leaves(instr, kind, is_start),
                    groups=groups,
                    pairs=pairs,
                    dimensions=_ints(dims_match.group(1)) if dims_match else (),
                    channel_id=int(channel.group(1)) if channel else None,
                    computation=comp,
                    name=instr.name,
                )
            )
    return tuple(found)


# --------------------------------------------------------------------------------------
# Reduce-scatter reclassification

#: Ops that only change dtype or layout: an all-reduce's result may pass through these on
#: its way to the dynamic-slice that makes it a reduce-scatter.
_PASS_THROUGH_OPS = frozenset({"convert", "bitcast", "copy", "reshape", "bitcast-convert"})
_MAX_PASS_THROUGH_HOPS = 4


def _called(module: _Module, instr: _Instr) -> list[_Instr]:
    """The instructions of the computations a fusion calls."""
    names = [
        n for _, v in _CALL_ATTR_RE.findall(instr.attrs) for n in re.findall(r"%?([\w.\-]+)", v)
    ]
    return [i for name in names for i in module.computations.get(name, [])]


def _is_dynamic_slice(module: _Module, instr: _Instr) -> bool:
    if instr.opcode == "dynamic-slice":
        return True
    if instr.opcode != "fusion":
        return False
    return "dynamic-slice" in instr.name or any(
        i.opcode == "dynamic-slice" and i.type.elements == instr.type.elements
        for i in _called(module, instr)
    )


def _is_pass_through(module: _Module, instr: _Instr) -> bool:
    if instr.opcode in _PASS_THROUGH_OPS:
        return True
    body = _called(module, instr) if instr.opcode == "fusion" else []
    return bool(body) and all(
        i.opcode in _PASS_THROUGH_OPS or i.opcode == "parameter" for i in body
    )


def _slice_of(
    module: _Module, value: _Instr, elements: int, group_size: int, hops: int
) -> _Type | None:
    """The 1/group_size slice that every use of ``value`` ends in, or None if one does not."""
    users = module.users(value.computation, value.name)
    if not users:
        return None
    found: _Type | None = None
    for user in users:
        if user.type.dtype is None:
            return None
        if _is_dynamic_slice(module, user):
            if user.type.elements * group_size != elements:
                return None
            found = found or user.type
        elif (
            hops < _MAX_PASS_THROUGH_HOPS
            and user.type.elements == elements
            and _is_pass_through(module, user)
        ):
            sliced = _slice_of(module, user, elements, group_size, hops + 1)
            if sliced is None:
                return None
            found = found or sliced
        else:
            return None
    return found


def _leaf_values(module: _Module, instr: _Instr, num_leaves: int) -> list[_Instr | None]:
    """The instruction that holds each result leaf of a (maybe async, maybe tuple) op."""
    value = instr
    if instr.opcode.endswith("-start"):
        done = [
            u for u in module.users(instr.computation, instr.name) if u.opcode.endswith("-done")
        ]
        if len(done) != 1:
            return [None] * num_leaves
        value = done[0]
    if value.type.dtype is not None:
        return [value]
    leaves: list[_Instr | None] = [None] * num_leaves
    for user in module.users(value.computation, value.name):
        index = re.search(r"\bindex=(\d+)", user.attrs)
        if user.opcode != "get-tuple-element" or index is None:
            return [None] * num_leaves  # the whole tuple is used: nothing is sliced
        k = int(index.group(1))
        if k < num_leaves:
            if leaves[k] is not None:
                return [None] * num_leaves  # keep it simple: one reader per leaf
            leaves[k] = user
    return leaves


def _scatter_dims(full: tuple[int, ...], part: tuple[int, ...]) -> tuple[int, ...]:
    if len(full) != len(part):
        return ()
    return tuple(k for k, (a, b) in enumerate(zip(full, part, strict=True)) if a != b)


def reclassify_reduce_scatters(
    colls: Sequence[HloCollective], text: str
) -> tuple[HloCollective, ...]:
    """Rewrite all-reduces whose result is only ever dynamic-sliced to 1/g as reduce-scatters.

    The CPU backend prints a reduce-scatter as ``all-reduce`` followed by a ``dynamic-slice``
    (or a fusion named ``*dynamic-slice*``) of this device's 1/g, possibly through converts,
    bitcasts and copies (also as fusions of only those). TPU wraps the same pair in a
    ``kCustom`` fusion calling ``%all-reduce-scatter.N``, whose body this finds the same way
    (or, failing that, by the body's root being 1/g of the all-reduce).

    The new op keeps the all-reduce's dtype (what was reduced) with the sliced shape, and
    ``dimensions`` are the dims the slice cut. A combined (tuple) all-reduce whose leaves are
    sliced only in part becomes two ops with one channel: an all-reduce of the unsliced
    leaves and a reduce-scatter of the sliced ones. A leaf any of whose uses reads the whole
    result stays an all-reduce.
    """
    module = _module(text)
    out: list[HloCollective] = []
    for coll in colls:
        instr = module.instr(coll.computation, coll.name)
        if coll.kind != "all-reduce" or coll.groups is None or instr is None:
            out.append(coll)
            continue
        g = coll.group_size
        if g <= 1:
            out.append(coll)
            continue
        sliced: list[_Type | None] = []
        for leaf, value in zip(
            coll.result_types, _leaf_values(module, instr, len(coll.result_types)), strict=True
        ):
            elements = math.prod(leaf[1])
            sliced.append(None if value is None else _slice_of(module, value, elements, g, 0))
        if all(s is None for s in sliced) and "all-reduce-scatter" in coll.computation:
            root = next((i for i in module.computations[coll.computation] if i.is_root), None)
            if (
                root is not None
                and root.type.dtype is not None
                and len(coll.result_types) == 1
                and root.type.elements * g == coll.elements_out_per_device
            ):
                sliced = [root.type]
        kept = tuple(leaf for leaf, s in zip(coll.result_types, sliced, strict=True) if s is None)
        scattered = tuple(
            (leaf, s) for leaf, s in zip(coll.result_types, sliced, strict=True) if s is not None
        )
        if not scattered:
            out.append(coll)
            continue
        if kept:
            out.append(replace(coll, result_types=kept))
        dims = {d for leaf, s in scattered for d in _scatter_dims(leaf[1], s.dims)}
        out.append(
            replace(
                coll,
                kind="reduce-scatter",
                result_types=tuple((leaf[0], s.dims) for leaf, s in scattered),
                dimensions=tuple(sorted(dims)),
            )
        )
    return tuple(out)


# --------------------------------------------------------------------------------------
# Dedupe and weight


def dedupe_and_weight(colls: Sequence[HloCollective], text: str) -> tuple[HloCollective, ...]:
    """Count each collective once per execution, times the loops around it.

    Async collectives can be printed in several fused computations (a TPU start and done
    half each hold a copy): ops of one kind with one ``channel_id`` in different
    computations are one op (the first kept; ``is_async`` if any copy is); within one
    computation they stay distinct ops. ``count`` becomes the number of times the op's
    computation runs per step: the product of ``known_trip_count`` over the while loops
    around it (nested loops multiply; a loop without a printed trip count counts once).
    """
    counts = _module(text).execution_counts()
    out: list[HloCollective] = []
    seen: dict[tuple[str, int], int] = {}
    for coll in colls:
        weighted = replace(coll, count=counts.get(coll.computation, 1))
        if coll.channel_id is None:
            out.append(weighted)
            continue
        key = (coll.kind, coll.channel_id)
        if key not in seen:
            seen[key] = len(out)
            out.append(weighted)
            continue
        first = out[seen[key]]
        if first.computation == coll.computation:
            # two ops in one computation are two ops, whatever their channel ids (a shard_map
            # program prints channel_id=1 on all of them); copies live in different ones
            out.append(weighted)
            continue
        out[seen[key]] = replace(
            first,
            count=max(first.count, weighted.count),
            is_async=first.is_async or coll.is_async,
        )
    return tuple(out)


def read_collectives(text: str) -> tuple[HloCollective, ...]:
    """The collectives a compiled program runs per step: parse, reclassify, dedupe, weight."""
    return dedupe_and_weight(reclassify_reduce_scatters(parse_collectives(text), text), text)


# --------------------------------------------------------------------------------------
# Device groups -> mesh axes


def _mesh_positions(
    mesh_shape: Sequence[int], axis_names: Sequence[str], device_ids: Sequence[int] | None
) -> dict[int, tuple[int, ...]]:
    """Device id -> its coordinates on the mesh (row-major, or in ``device_ids`` order)."""
    if len(mesh_shape) != len(axis_names):
        raise SpecError(
            f"mesh_shape {tuple(mesh_shape)} and axis_names {tuple(axis_names)} must have the "
            "same length: one size per named axis."
        )
    if any(size < 1 for size in mesh_shape):
        raise SpecError(f"mesh_shape {tuple(mesh_shape)}: every axis size must be >= 1.")
    num = math.prod(mesh_shape)
    ids = list(device_ids) if device_ids is not None else list(range(num))
    if len(ids) != num or len(set(ids)) != num:
        raise SpecError(
            f"device_ids must list each of the mesh's {num} devices once (mesh_shape "
            f"{tuple(mesh_shape)}), got {len(ids)} ids ({len(set(ids))} distinct)."
        )
    coords = itertools.product(*(range(size) for size in mesh_shape))
    return dict(zip(ids, coords, strict=True))


def groups_to_axes(
    groups: Sequence[Sequence[int]],
    mesh_shape: tuple[int, ...],
    axis_names: tuple[str, ...],
    device_ids: tuple[int, ...] | None = None,
) -> tuple[str, ...] | None:
    """The mesh axes a collective's groups run over, in mesh order.

    Devices are numbered row-major over ``mesh_shape`` (HLO partition ids), or laid out in
    ``device_ids`` order. Returns the smallest set of axes whose groups (vary those axes, fix
    the others) are exactly ``groups`` as sets; ``()`` for singleton groups; ``None`` when no
    set of whole axes gives these groups (a sub-axis, a partial or foreign device set).
    """
    position = _mesh_positions(mesh_shape, axis_names, device_ids)
    wanted = {frozenset(group) for group in groups}
    if sum(len(group) for group in groups) != sum(len(group) for group in wanted):
        return None  # a repeated device or group
    if any(device not in position for group in wanted for device in group):
        return None
    for r in range(len(mesh_shape) + 1):
        for axes in itertools.combinations(range(len(mesh_shape)), r):
            by_rest: dict[tuple[int, ...], set[int]] = {}
            for device, coord in position.items():
                rest = tuple(c for k, c in enumerate(coord) if k not in axes)
                by_rest.setdefault(rest, set()).add(device)
            if {frozenset(g) for g in by_rest.values()} == wanted:
                return tuple(axis_names[k] for k in axes)
    return None


def pairs_to_axes(
    pairs: Sequence[tuple[int, int]],
    mesh_shape: tuple[int, ...],
    axis_names: tuple[str, ...],
    device_ids: tuple[int, ...] | None = None,
) -> tuple[str, ...] | None:
    """The mesh axes along which a collective-permute moves data, in mesh order.

    An axis counts when the source's and target's coordinates on it differ in any pair;
    ``()`` when every pair is a self-copy; ``None`` when a device is not on the mesh.
    """
    position = _mesh_positions(mesh_shape, axis_names, device_ids)
    moved: set[int] = set()
    for source, target in pairs:
        if source not in position or target not in position:
            return None
        moved.update(
            k
            for k, (a, b) in enumerate(zip(position[source], position[target], strict=True))
            if a != b
        )
    return tuple(axis_names[k] for k in sorted(moved))


# --------------------------------------------------------------------------------------
# FLOPs


def dot_flops(text: str) -> int:
    """Exact per-device matmul FLOPs: ``2 * prod(result) * prod(contracting dims)``.

    Summed over every ``dot`` in every computation (fused ones included, e.g. the CPU's
    ``ynn_fusion`` bodies), each weighted by how many times its computation runs (while-loop
    trip counts). Operand shapes come from inline operand types or the operand's definition.
    Convolutions and library custom-calls (cuBLAS) are not counted.
    """
    module = _module(text)
    counts = module.execution_counts()
    total = 0
    for comp, instrs in module.computations.items():
        for instr in instrs:
            if instr.opcode != "dot":
                continue
            lhs = module.operand_type(instr, 0)
            contracting = re.search(r"\blhs_contracting_dims=\{([\d,\s]*)\}", instr.attrs)
            dims = _ints(contracting.group(1)) if contracting else ()
            if lhs.dtype is None or any(d >= len(lhs.dims) for d in dims):
                raise ValidationError(
                    f"dot {instr.name!r} in computation {comp!r}: lhs_contracting_dims {dims} "
                    f"do not fit its lhs type {lhs}."
                )
            k = math.prod(lhs.dims[d] for d in dims)
            total += 2 * instr.type.elements * k * counts.get(comp, 1)
    return total
