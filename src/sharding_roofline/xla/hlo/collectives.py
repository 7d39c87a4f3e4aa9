"""The collectives of a compiled module: :class:`HloCollective` and the reading pipeline.

:func:`parse_collectives` finds every collective op in every computation;
:func:`reclassify_reduce_scatters` turns the CPU backend's all-reduce + dynamic-slice into
reduce-scatters; :func:`dedupe_and_weight` counts async copies once and weights each op by
the while loops around it. :func:`read_collectives` runs all three.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

from sharding_roofline.errors import ValidationError

from ._text import (
    _CALL_ATTR_RE,
    COLLECTIVE_KINDS,
    Leaf,
    _Instr,
    _ints,
    _Module,
    _module,
    _Type,
)
from .groups import Groups, _take_replica_groups, parse_replica_groups

__all__ = [
    "HloCollective",
    "dedupe_and_weight",
    "op_name",
    "parse_collectives",
    "read_collectives",
    "reclassify_reduce_scatters",
    "split_combined",
]

_COLLECTIVE_OP_RE = re.compile(
    r"^(" + "|".join(re.escape(kind) for kind in COLLECTIVE_KINDS) + r")(-start|-done)?$"
)


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
    #: which result leaves of the printed op these are (``None``: all, in order); set when
    #: a combined op is split, so each leaf can be traced to the op it was combined from
    leaf_indices: tuple[int, ...] | None = None

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
        elif user.opcode == "fusion" and hops < _MAX_PASS_THROUGH_HOPS:
            # a fusion whose body slices the value to 1/g (a scan writing this device's
            # slice of a stacked gradient: dynamic-slice, then dynamic-update-slice)
            sliced = _sliced_in_fusion(module, user, value, elements, group_size, hops)
            if sliced is None:
                return None
            found = found or sliced
        else:
            return None
    return found


def _sliced_in_fusion(  # noqa: PLR0917 (as _slice_of, and the fusion)
    module: _Module, fusion: _Instr, value: _Instr, elements: int, group_size: int, hops: int
) -> _Type | None:
    """The 1/group_size slice the fused body makes of ``value`` (its one operand slot)."""
    slots = [k for k, name in enumerate(fusion.operands) if name.lstrip("%") == value.name]
    if len(slots) != 1:
        return None
    params = [i for i in _called(module, fusion) if i.param_index == slots[0]]
    if len(params) != 1:
        return None
    return _slice_of(module, params[0], elements, group_size, hops + 1)


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
        indices = coll.leaf_indices or tuple(range(len(coll.result_types)))
        kept_at = tuple(i for i, s in zip(indices, sliced, strict=True) if s is None)
        scattered_at = tuple(i for i, s in zip(indices, sliced, strict=True) if s is not None)
        scattered = tuple(
            (leaf, s) for leaf, s in zip(coll.result_types, sliced, strict=True) if s is not None
        )
        if not scattered:
            out.append(coll)
            continue
        if kept:
            out.append(replace(coll, result_types=kept, leaf_indices=kept_at))
        dims = {d for leaf, s in scattered for d in _scatter_dims(leaf[1], s.dims)}
        out.append(
            replace(
                coll,
                kind="reduce-scatter",
                result_types=tuple((leaf[0], s.dims) for leaf, s in scattered),
                dimensions=tuple(sorted(dims)),
                leaf_indices=scattered_at,
            )
        )
    return tuple(out)


# --------------------------------------------------------------------------------------
# Dedupe and weight


def dedupe_and_weight(colls: Sequence[HloCollective], text: str) -> tuple[HloCollective, ...]:
    """Count each collective once per execution, times the loops around it.

    Async collectives can be printed in several fused computations (a TPU start and done
    half each hold a copy): async ops of one kind, one ``channel_id`` and one result type in
    different computations are one op (the first kept; ``is_async`` if any copy is); within
    one computation, or synchronous, they stay distinct ops (a shard_map program prints
    ``channel_id=1`` on every collective, in a scan's body as in its entry). ``count``
    becomes the number of times the op's computation runs per step: the product of
    ``known_trip_count`` over the while loops
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
        copy = (
            first.computation != coll.computation
            and (first.is_async or coll.is_async)
            and (first.result_types, first.groups, first.pairs)
            == (coll.result_types, coll.groups, coll.pairs)
        )
        if not copy:
            # two ops in one computation are two ops, whatever their channel ids (a shard_map
            # program prints channel_id=1 on all of them), and so are synchronous ops in two
            # (a scan's body and the entry of a shard_map program): copies are the halves of
            # one async op, of one type, in different computations
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
# Combined ops and their origin

#: Kinds whose tuple form is several ops combined into one (XLA's combiner passes); a tuple
#: all-to-all is one op, with one operand per peer (its leaves add up).
_COMBINABLE = frozenset({"all-reduce", "reduce-scatter", "all-gather", "collective-permute"})


def split_combined(colls: Sequence[HloCollective]) -> tuple[HloCollective, ...]:
    """One op per result leaf of a combined (tuple) collective: the CPU's all-reduce and
    all-gather combiners batch independent collectives into one op (a scheduling choice that
    saves latency, not another algorithm), so a program's collectives are compared leaf by
    leaf. Tuple all-to-alls stay whole (their leaves are the pieces for each peer)."""
    out: list[HloCollective] = []
    for coll in colls:
        if coll.kind not in _COMBINABLE or len(coll.result_types) <= 1:
            out.append(coll)
            continue
        indices = coll.leaf_indices or tuple(range(len(coll.result_types)))
        out.extend(
            replace(coll, result_types=(leaf,), leaf_indices=(i,))
            for leaf, i in zip(coll.result_types, indices, strict=True)
        )
    return tuple(out)


_OP_NAME_RE = re.compile(r'\bop_name="((?:[^"\\]|\\.)*)"')


def op_name(text: str, coll: HloCollective) -> str:
    """The ``metadata={op_name=...}`` JAX gave the op (its named scopes and primitive, e.g.
    ``jit(train)/jvp(gate)/sharding_constraint``); empty when none is printed."""
    instr = _module(text).instr(coll.computation, coll.name)
    if instr is None:
        return ""
    match = _OP_NAME_RE.search(instr.attrs)
    return match.group(1) if match else ""
