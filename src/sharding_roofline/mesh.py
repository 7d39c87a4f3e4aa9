"""A logical mesh of named axes laid over a physical topology.

Mesh axes map onto the topology's dimensions in order, major to minor, exactly as a
row-major reshape of the chips would: the last mesh axis is the innermost. An axis may take
several physical dimensions (``data=16`` over a 4x4 torus) or a factor of one (``tp=4``
inside an 8-GPU node, ``x=2`` taking every fourth chip of a ring of 8).

For every set of axes a collective may run over, ``DeviceMesh.group`` works out which links
that group of chips uses, tier by tier: on a torus, the ring segments it spans (size,
stride between its chips, whether they close a ring); on a switched tier, how many units of
the level below it spans and how many of its chips sit in each. The cost functions in
``collectives.py`` need nothing else.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .errors import TopologyError, UnknownNameError
from .hardware import HardwareSpec
from .limits import MAX_MESH_AXES, check_count, parse_count, shown
from .topology import Tier, Topology, default_shape, format_shape

#: Spellings a PartitionSpec entry reads as "replicated" (compared in lower case): a mesh
#: axis with one of these names could never be used in a spec, so none may name one.
REPLICATED_NAMES = frozenset({"none", "", "_", "-"})

#: The largest size of one mesh axis (a physical topology bounds the product anyway).
MAX_AXIS_SIZE = 2**20


def check_axis_name(name: object, where: str) -> str:
    """``name`` if it can name a mesh axis: an identifier that no PartitionSpec reads as
    replicated (``None``, ``none``, ``_``)."""
    if not isinstance(name, str) or not _AXIS.match(name):
        raise TopologyError(
            f"{where}: {name!r} cannot name a mesh axis; use an identifier like x or data"
        )
    if name.lower() in REPLICATED_NAMES:
        raise TopologyError(
            f"{where}: {name!r} cannot name a mesh axis, because a PartitionSpec reads it as "
            "'replicated' (so a split over it would be silently dropped); use another name, "
            "e.g. x or data"
        )
    return name


@dataclass(frozen=True, slots=True, kw_only=True)
class MeshAxis:
    name: str
    size: int

    def __post_init__(self) -> None:
        check_axis_name(self.name, "mesh")
        check_count(
            self.size, what=f"mesh axis {self.name!r} size", most=MAX_AXIS_SIZE, error=TopologyError
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class AxisFactor:
    """One mesh axis's share of one physical dimension: ``count`` chips, ``stride`` apart."""

    dim: int
    count: int
    stride: int


@dataclass(frozen=True, slots=True, kw_only=True)
class RingSegment:
    """A group's chips along one torus dimension: ``size`` chips spaced ``stride`` links apart.
    ``wraps`` when they close a ring (the dimension wraps and the group spans all of it)."""

    size: int
    stride: int
    wraps: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class TierSpan:
    """What a group of chips uses of one link tier."""

    tier: Tier
    segments: tuple[RingSegment, ...] = ()  # torus tiers
    num_children: int = 1  # switched tiers: units of the level below that the group spans
    chips_per_child: int = 1  # switched tiers: the group's chips inside each of those units


@dataclass(frozen=True, slots=True, kw_only=True)
class AxisGroup:
    """The chips a collective over ``axes`` runs among, and the links they use."""

    axes: tuple[str, ...]
    size: int
    spans: tuple[TierSpan, ...]


_AXIS = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SIZE = re.compile(r"^[0-9]+$")


def parse_mesh_axes(text: str) -> tuple[MeshAxis, ...]:
    """``"x=4,y=4" -> (MeshAxis(x, 4), MeshAxis(y, 4))``."""
    if not isinstance(text, str):
        raise TopologyError(f"a mesh is text like 'x=4,y=4', got {shown(text)}")
    axes: list[MeshAxis] = []
    for part in text.split(","):
        name, eq, size = part.partition("=")
        name, size = name.strip(), size.strip()
        if not eq or not _AXIS.match(name) or not _SIZE.match(size):
            raise TopologyError(
                f"mesh {text!r}: {part.strip()!r} is not NAME=SIZE; write named axes like "
                "x=4,y=4 or data=8,model=4 (names are identifiers, sizes positive integers)"
            )
        check_axis_name(name, f"mesh {text!r}")
        if any(axis.name == name for axis in axes):
            raise TopologyError(f"mesh {text!r}: axis {name!r} is named twice")
        count = parse_count(
            size, what=f"mesh {text!r}: size of {name!r}", most=MAX_AXIS_SIZE, error=TopologyError
        )
        axes.append(MeshAxis(name=name, size=count))
    return tuple(axes)


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceMesh:
    """Named logical axes over a ``Topology``."""

    topology: Topology
    axes: tuple[MeshAxis, ...]
    _factors: tuple[tuple[AxisFactor, ...], ...] = field(
        init=False, repr=False, compare=False, default=()
    )
    _groups: dict[frozenset[str], AxisGroup] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )
    # Per-mesh memo for derived quantities of later stages (collective rates per axis
    # group), so the planner's hot path looks them up instead of recomputing them.
    memo: dict[Any, Any] = field(init=False, repr=False, compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.topology, Topology):
            raise TopologyError(f"DeviceMesh needs a Topology, got {shown(self.topology)}")
        if not isinstance(self.axes, tuple) or not all(
            isinstance(axis, MeshAxis) for axis in self.axes
        ):
            raise TopologyError(
                f"DeviceMesh axes must be a tuple of MeshAxis, got {shown(self.axes)}; use "
                "DeviceMesh.create(hardware, 'x=4,y=4')"
            )
        if not self.axes:
            raise TopologyError("a mesh needs at least one axis, e.g. x=8")
        names = [axis.name for axis in self.axes]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise TopologyError(f"mesh {self.spec_text}: axis {repeated[0]!r} is named twice")
        total = math.prod(axis.size for axis in self.axes)
        if total != self.topology.num_devices:
            raise TopologyError(
                f"mesh {self.spec_text} has {total} devices but topology "
                f"{self.topology.shape_text} has {self.topology.num_devices}; make the axis "
                "sizes multiply to the topology's chip count, or pass a matching --topology"
            )
        object.__setattr__(self, "_factors", self._factorize())

    @classmethod
    def create(
        cls,
        hardware: HardwareSpec,
        mesh: str | Iterable[tuple[str, int]],
        topology: str | tuple[int, ...] | None = None,
        *,
        num_slices: int = 1,
    ) -> DeviceMesh:
        """``DeviceMesh.create(load_preset("tpu-v5e"), "x=4,y=4", "4x4")``. Without a
        topology, the mesh shape is the slice shape (TPU) or NODESxGPUS (GPU)."""
        if not isinstance(hardware, HardwareSpec):
            raise TopologyError(
                f"DeviceMesh.create needs a HardwareSpec (load_preset('tpu-v5e')), got "
                f"{shown(hardware)}"
            )
        if isinstance(mesh, str):
            axes = parse_mesh_axes(mesh)
        elif isinstance(mesh, Iterable):
            pairs = list(mesh)
            if not all(isinstance(pair, tuple) and len(pair) == 2 for pair in pairs):
                raise TopologyError(
                    f"mesh axes must be (name, size) pairs or text like 'x=4,y=4', got "
                    f"{shown(pairs)}"
                )
            axes = tuple(MeshAxis(name=name, size=size) for name, size in pairs)
        else:
            raise TopologyError(f"a mesh is text like 'x=4,y=4', got {shown(mesh)}")
        if topology is None:
            shape = tuple(axis.size for axis in axes)
            if num_slices > 1:
                total = math.prod(shape)
                if total % num_slices:
                    raise TopologyError(
                        f"a mesh of {total} devices does not split into {num_slices} slices"
                    )
                shape = (total // num_slices,)
            topology = default_shape(hardware, shape)
        topo = Topology.build(hardware, topology, num_slices=num_slices)
        return cls(topology=topo, axes=axes)

    def check_searchable(self) -> None:
        """Refuse a mesh with more axes than a search over every assignment can take: the
        einsum planner and the layer search try (letters + 1) ** axes assignments (8 axes:
        minutes and gigabytes). Evaluating a given strategy has no such limit."""
        active = [axis.name for axis in self.axes if axis.size > 1]
        if len(active) > MAX_MESH_AXES:
            raise TopologyError(
                f"mesh {self.spec_text} has {len(active)} axes of size > 1, more than the "
                f"{MAX_MESH_AXES} we plan over: the planner tries every assignment of axes to "
                "letters, (letters + 1) ** axes of them (8 axes: minutes and gigabytes). Merge "
                "axes that shard together into one (x=2,y=2 -> x=4), or drop size-1 axes"
            )

    # -- basic facts ------------------------------------------------------------------------

    @property
    def hardware(self) -> HardwareSpec:
        return self.topology.hardware

    @property
    def axis_names(self) -> tuple[str, ...]:
        return tuple(axis.name for axis in self.axes)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(axis.size for axis in self.axes)

    @property
    def num_devices(self) -> int:
        return self.topology.num_devices

    @property
    def spec_text(self) -> str:
        return ",".join(f"{axis.name}={axis.size}" for axis in self.axes)

    def __str__(self) -> str:
        return f"mesh ({self.spec_text}) on {self.hardware.name} {self.topology.shape_text}"

    def axis_size(self, name: str) -> int:
        for axis in self.axes:
            if axis.name == name:
                return axis.size
        raise self.unknown_axis(name)

    def unknown_axis(self, name: str) -> UnknownNameError:
        return UnknownNameError(
            f"unknown mesh axis {name!r}; the mesh ({self.spec_text}) has axes "
            f"{', '.join(self.axis_names)}"
        )

    def factors(self, name: str) -> tuple[AxisFactor, ...]:
        """The physical dimensions (and factors of them) that axis ``name`` spans."""
        for axis, factors in zip(self.axes, self._factors, strict=True):
            if axis.name == name:
                return factors
        raise self.unknown_axis(name)

    def ordered(self, axes: Iterable[str]) -> tuple[str, ...]:
        """``axes`` in mesh order (major to minor), checked to exist."""
        if isinstance(axes, str) or not all(isinstance(a, str) for a in axes):
            raise TopologyError(
                f"mesh axes must be given as a sequence of names like ('x', 'y'), got {shown(axes)}"
            )
        wanted = set(axes)
        for name in wanted:
            if name not in self.axis_names:
                raise self.unknown_axis(name)
        return tuple(name for name in self.axis_names if name in wanted)

    def link_resources(self, axes: Iterable[str]) -> tuple[int, ...]:
        """The physical dimensions a collective over ``axes`` uses the links of (two
        collectives that share none can run at the same time)."""
        key = ("resources", frozenset(axes))
        cached = self.memo.get(key)
        if cached is None:
            cached = tuple(sorted({f.dim for a in key[1] for f in self.factors(a)}))
            self.memo[key] = cached
        return cached

    def describe_axis(self, name: str) -> str:
        """``y=4 over ici_y (ring of 4)`` / ``x=4 over leaf (4 nodes)``."""
        group = self.group((name,))
        parts = []
        for span in group.spans:
            if span.tier.is_torus:
                for seg in span.segments:
                    shape = "ring" if seg.wraps else "line"
                    stride = f", every {seg.stride}th chip" if seg.stride > 1 else ""
                    parts.append(f"{span.tier.name} {shape} of {seg.size}{stride}")
            else:
                per = f", {span.chips_per_child} chips each" if span.chips_per_child > 1 else ""
                parts.append(f"{span.tier.name} across {span.num_children}{per}")
        return f"{name}={self.axis_size(name)}: " + "; ".join(parts or ["one chip"])

    # -- mapping axes onto the topology -----------------------------------------------------

    def _factorize(self) -> tuple[tuple[AxisFactor, ...], ...]:
        dims = self.topology.dims
        remaining = [dim.size for dim in dims]
        stride = [1] * len(dims)
        current = len(dims) - 1
        out: list[tuple[AxisFactor, ...]] = []
        for axis in reversed(self.axes):
            need = axis.size
            factors: list[AxisFactor] = []
            while need > 1:
                while remaining[current] == 1:
                    current -= 1
                have = remaining[current]
                take = min(have, need)
                if have % take or need % take:
                    raise TopologyError(
                        f"mesh axis {axis.name}={axis.size} does not tile topology "
                        f"{self.topology.shape_text}: it meets physical dimension "
                        f"{dims[current].name} with {have} chips left, and {take} divides "
                        "only one of them. Choose axis sizes that split the topology's "
                        f"dimensions evenly (topology {format_shape(self.topology.shape)}, "
                        "mesh axes mapped major to minor)"
                    )
                factors.append(AxisFactor(dim=current, count=take, stride=stride[current]))
                remaining[current] //= take
                stride[current] *= take
                need //= take
            out.append(tuple(factors))
        return tuple(reversed(out))

    def group(self, axes: Iterable[str]) -> AxisGroup:
        """The chips and links of a collective over ``axes`` (cached per mesh)."""
        key = frozenset(axes)
        cached = self._groups.get(key)
        if cached is not None:
            return cached
        names = self.ordered(key)
        by_dim: dict[int, list[AxisFactor]] = {}
        for name in names:
            for factor in self.factors(name):
                by_dim.setdefault(factor.dim, []).append(factor)
        dims = self.topology.dims
        tiers = self.topology.tiers
        spans: list[TierSpan] = []
        chips_below = 1  # the group's chips inside one unit of the tier below
        for index, tier in enumerate(tiers):
            tier_dims = [d for d in sorted(by_dim) if dims[d].tier == index]
            if not tier_dims:
                continue
            count = math.prod(f.count for d in tier_dims for f in by_dim[d])
            if tier.is_torus:
                segments = tuple(
                    _segment(by_dim[d], dims[d].size, dims[d].wraps) for d in tier_dims
                )
                spans.append(TierSpan(tier=tier, segments=segments))
            else:
                spans.append(TierSpan(tier=tier, num_children=count, chips_per_child=chips_below))
            chips_below *= count
        result = AxisGroup(
            axes=names, size=math.prod(self.axis_size(n) for n in names), spans=tuple(spans)
        )
        self._groups[key] = result
        return result


def _segment(factors: list[AxisFactor], dim_size: int, dim_wraps: bool) -> RingSegment:
    """Merge one group's factors on one torus dimension into a ring segment.

    Factors whose strides chain (each is the one below times its count) are contiguous
    digits of the coordinate and merge exactly. A gap (three axes on one dimension, the
    middle one left out) is approximated as a line of the same chip count at the smallest
    stride.
    """
    ordered = sorted(factors, key=lambda f: f.stride)
    size = math.prod(f.count for f in ordered)
    stride = ordered[0].stride
    contiguous = all(
        later.stride == earlier.stride * earlier.count
        for earlier, later in itertools.pairwise(ordered)
    )
    wraps = dim_wraps and contiguous and size * stride == dim_size
    return RingSegment(size=size, stride=stride, wraps=wraps)
