"""Replica groups: every printed form -> explicit device groups -> the mesh axes they span.

:func:`parse_replica_groups` expands the five forms XLA prints (explicit lists, ``{}``, iota,
transposed iota, mesh axes with sub-axes and ``device_ids``) into groups of partition ids.
:func:`groups_to_axes` and :func:`pairs_to_axes` name the mesh axes a collective's groups
(or a permute's source-target pairs) run over, for comparison with the plan.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence

from sharding_roofline.errors import SpecError, ValidationError

from ._text import _close, _ints, _split_top_level

__all__ = [
    "Groups",
    "groups_to_axes",
    "pairs_to_axes",
    "parse_replica_groups",
]

Groups = tuple[tuple[int, ...], ...]


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
