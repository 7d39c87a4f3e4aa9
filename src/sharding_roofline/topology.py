"""The physical interconnect of a slice or cluster: dimensions of chips and the link tiers
that join them.

A ``Topology`` is a list of physical dimensions, major to minor, each belonging to one link
*tier*. Chips are numbered row-major over the dimensions, so the last dimension is the
innermost (neighbours on a torus axis, GPUs of one NVLink node).

* TPU slice ``4x4x8`` on v5p: three torus dimensions of the ``ici`` tier, each wrapping
  around or not by the chip's rule; with ``num_slices=2`` a ``dcn`` dimension of 2 in front.
* GPU cluster ``128x8`` on h100 (128 nodes of 8 GPUs): the node count is split over the
  fat tree's levels (32 nodes per leaf group, then 4 groups under the spine), giving the
  dimensions ``spine=4, leaf=32, nvlink=8``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .errors import TopologyError
from .hardware import HardwareKind, HardwareSpec, IciSpec, LinkKind, NvlinkSpec, ScaleOutLevel
from .limits import check_count, parse_count, shown


@dataclass(frozen=True, slots=True, kw_only=True)
class Tier:
    """A class of links. On a torus tier, bandwidth is per link and latency per hop; on a
    switched tier (NVLink, InfiniBand, DCN), bandwidth is per chip and latency per step."""

    name: str
    link: LinkKind
    is_torus: bool
    bytes_per_s_per_direction: float
    latency_s: float
    source: str

    @classmethod
    def switched(cls, level: ScaleOutLevel) -> Tier:
        """The tier of one scale-out level (InfiniBand leaf or spine, DCN)."""
        return cls(
            name=level.name,
            link=level.link,
            is_torus=False,
            bytes_per_s_per_direction=level.bytes_per_s_per_chip_per_direction,
            latency_s=level.latency_s,
            source=level.source,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class PhysicalDim:
    """One dimension of chips. ``wraps`` only means something on a torus tier."""

    name: str
    size: int
    tier: int
    wraps: bool = False


_SHAPE = re.compile(r"^\s*[0-9]+(\s*[xX*]\s*[0-9]+)*\s*$")

#: The largest size of one physical dimension, and the most dimensions a shape may list.
MAX_DIM_CHIPS = 2**20
MAX_DIMS = 8


def parse_shape(text: str) -> tuple[int, ...]:
    """``"4x4x8" -> (4, 4, 8)`` (ASCII digits); a clear error for anything else."""
    if not isinstance(text, str) or not _SHAPE.match(text):
        raise TopologyError(
            f"topology {shown(text)} is not a shape; write sizes joined by 'x', e.g. 4x4x8 for "
            "a TPU slice or 32x8 for 32 GPU nodes of 8"
        )
    parts = re.split(r"[xX*]", text.replace(" ", ""))
    if len(parts) > MAX_DIMS:
        raise TopologyError(f"topology {text!r} lists {len(parts)} sizes; give at most {MAX_DIMS}")
    if any(not part.strip("0") for part in parts):
        raise TopologyError(f"topology {text!r} has a dimension of size 0; sizes must be >= 1")
    return tuple(
        parse_count(part, what=f"topology {text!r}: size", most=MAX_DIM_CHIPS, error=TopologyError)
        for part in parts
    )


def check_shape(shape: object) -> tuple[int, ...]:
    """A shape given in code (a tuple of sizes): each a whole number in 1..MAX_DIM_CHIPS."""
    if not isinstance(shape, (tuple, list)) or not 1 <= len(shape) <= MAX_DIMS:
        raise TopologyError(
            f"a topology shape is a tuple of 1 to {MAX_DIMS} sizes or text like '4x4x8', got "
            f"{shown(shape)}"
        )
    return tuple(
        check_count(size, what="topology size", most=MAX_DIM_CHIPS, error=TopologyError)
        for size in shape
    )


def format_shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(size) for size in shape)


@dataclass(frozen=True, slots=True, kw_only=True)
class Topology:
    """Physical dimensions (major to minor) over link tiers, for one piece of hardware."""

    hardware: HardwareSpec
    dims: tuple[PhysicalDim, ...]
    tiers: tuple[Tier, ...]
    shape_text: str

    @property
    def num_devices(self) -> int:
        return math.prod(dim.size for dim in self.dims)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(dim.size for dim in self.dims)

    @property
    def num_slices(self) -> int:
        """TPU slices joined over DCN (the leading ``slice`` dimension), else 1."""
        first = self.dims[0]
        return first.size if first.name == "slice" else 1

    def describe(self) -> str:
        """``4x4 torus (ici: no wraparound)`` or ``16 nodes x 8 GPUs (nvlink, leaf)``."""
        parts = []
        for dim in self.dims:
            tier = self.tiers[dim.tier]
            wrap = " wrap" if tier.is_torus and dim.wraps else ""
            parts.append(f"{dim.name}={dim.size} [{tier.name}{wrap}]")
        return ", ".join(parts)

    @classmethod
    def build(
        cls, hardware: HardwareSpec, shape: tuple[int, ...] | str, *, num_slices: int = 1
    ) -> Topology:
        """The topology of ``shape`` on ``hardware`` (a TPU slice shape, or NODESxGPUS)."""
        if not isinstance(hardware, HardwareSpec):
            raise TopologyError(f"Topology.build needs a HardwareSpec, got {shown(hardware)}")
        dims = parse_shape(shape) if isinstance(shape, str) else check_shape(shape)
        text = shape if isinstance(shape, str) else format_shape(dims)
        check_count(num_slices, what="num_slices", most=2**16, error=TopologyError)
        if hardware.kind is HardwareKind.TPU:
            return _tpu_topology(hardware, dims, text, num_slices)
        if num_slices != 1:
            raise TopologyError(
                f"{hardware.name} is a GPU preset: give the cluster as --topology NODESxGPUS "
                f"instead of {num_slices} slices"
            )
        return _gpu_topology(hardware, dims, text)


def default_shape(hardware: HardwareSpec, mesh_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The topology assumed when none is given: the mesh shape itself for a TPU slice; for
    GPUs the mesh shape when it is already NODESxGPUS, else the devices filled into whole
    NVLink domains (``16 GPUs -> 2x8`` on 8-GPU nodes)."""
    if hardware.kind is HardwareKind.TPU:
        return mesh_shape
    per_domain = _nvlink(hardware).gpus_per_domain
    if len(mesh_shape) == 2 and mesh_shape[1] <= per_domain:
        return mesh_shape
    total = math.prod(mesh_shape)
    if total <= per_domain:
        return (1, total)
    if total % per_domain:
        raise TopologyError(
            f"a mesh of {total} GPUs does not fill whole {per_domain}-GPU NVLink domains on "
            f"{hardware.name}; pass --topology NODESxGPUS explicitly (e.g. "
            f"{math.ceil(total / per_domain)}x{per_domain} with a mesh of that many devices)"
        )
    return (total // per_domain, per_domain)


def default_mesh_text(topology: Topology) -> str:
    """The mesh a bare ``--topology`` means: one axis per physical dimension of a TPU slice
    (``x=16,y=16,z=8``, plus ``slice=N`` first over DCN), ``node=N,gpu=G`` for GPUs."""
    if topology.hardware.kind is HardwareKind.GPU:
        gpus = topology.dims[-1].size
        return f"node={topology.num_devices // gpus},gpu={gpus}"
    return ",".join(f"{d.name.removeprefix('ici_')}={d.size}" for d in topology.dims)


def _nvlink(hardware: HardwareSpec) -> NvlinkSpec:
    if hardware.nvlink is None:  # HardwareSpec checks this on load; a hand-built spec may not
        raise TopologyError(f"{hardware.name} is a GPU preset without an [nvlink] table")
    return hardware.nvlink


def _check_slice(hardware: HardwareSpec, ici: IciSpec, shape: tuple[int, ...], text: str) -> None:
    """Raise unless ``shape`` is a slice this chip's pods are cut into.

    Without a cube rule (``max_cubes == 0``) any shape that fits inside the pod's
    ``max_shape`` (sizes compared largest to largest) is a slice. With one (TPU7x), a slice
    inside one cube is any shape of at most ``cube_edge`` chips per axis; a larger one is
    whole cubes: every axis a multiple of ``cube_edge``, at most ``max_cubes`` cubes.
    """
    if not ici.max_cubes:
        padded_max = sorted(ici.max_shape)[-len(shape) :]
        if any(size > most for size, most in zip(sorted(shape), padded_max, strict=True)):
            raise TopologyError(
                f"topology {text} does not fit in one {hardware.name} pod of "
                f"{format_shape(ici.max_shape)}; use a smaller slice, or several slices over "
                "DCN with --num-slices"
            )
        return
    edge = ici.cube_edge
    full = (1,) * (ici.num_torus_dims - len(shape)) + shape
    if max(full) <= edge:
        return  # inside one cube
    cube = "x".join([str(edge)] * ici.num_torus_dims)
    ragged = [size for size in full if size % edge]
    if ragged:
        rounded = format_shape(tuple(-(-size // edge) * edge for size in full))
        raise TopologyError(
            f"topology {text} is not a {hardware.name} slice: a slice larger than one {cube} "
            f"cube is built of whole cubes, so every axis must be a multiple of {edge} "
            f"(got {ragged[0]}); use e.g. {rounded}, or a slice inside one cube (at most "
            f"{edge} chips per axis)"
        )
    cubes = math.prod(full) // edge**ici.num_torus_dims
    if cubes > ici.max_cubes:
        chips = ici.max_cubes * edge**ici.num_torus_dims
        raise TopologyError(
            f"topology {text} has {cubes} cubes of {cube} chips, more than the {ici.max_cubes} "
            f"({chips} chips) of one {hardware.name} pod; use at most {ici.max_cubes} cubes, "
            "or several slices over DCN with --num-slices"
        )


def _tpu_topology(
    hardware: HardwareSpec, shape: tuple[int, ...], text: str, num_slices: int
) -> Topology:
    ici = hardware.ici
    if ici is None:  # HardwareSpec checks this on load; a hand-built spec may not
        raise TopologyError(f"{hardware.name} is a TPU preset without an [ici] table")
    if len(shape) > ici.num_torus_dims:
        raise TopologyError(
            f"topology {text} has {len(shape)} dimensions but {hardware.name} is a "
            f"{ici.num_torus_dims}D torus; give at most {ici.num_torus_dims} sizes "
            f"(e.g. {format_shape(ici.max_shape)} is a full pod)"
        )
    _check_slice(hardware, ici, shape, text)
    tiers = [
        Tier(
            name="ici",
            link=LinkKind.ICI,
            is_torus=True,
            bytes_per_s_per_direction=ici.link_bytes_per_s_per_direction,
            latency_s=ici.hop_latency_s,
            source=ici.source,
        )
    ]
    wraps = ici.wraps(shape)
    names = "xyz" if len(shape) <= 3 else [f"d{i}" for i in range(len(shape))]
    dims = [
        PhysicalDim(name=f"ici_{names[i]}", size=size, tier=0, wraps=wraps[i])
        for i, size in enumerate(shape)
    ]
    if num_slices > 1:
        dcn = [level for level in hardware.scale_out if level.link is LinkKind.DCN]
        if not dcn:
            raise TopologyError(
                f"{hardware.name} describes no DCN ([[scale_out]] with link = 'dcn'), so it "
                "cannot join several slices; add one to a copy of the preset"
            )
        level = dcn[0]
        if level.children and num_slices > level.children:
            raise TopologyError(
                f"{num_slices} slices exceed the {level.children} that {hardware.name}'s DCN "
                "level joins"
            )
        tiers.append(Tier.switched(level))
        dims.insert(0, PhysicalDim(name="slice", size=num_slices, tier=1))
        text = f"{num_slices} slices of {text}"
    return Topology(hardware=hardware, dims=tuple(dims), tiers=tuple(tiers), shape_text=text)


def _gpu_topology(hardware: HardwareSpec, shape: tuple[int, ...], text: str) -> Topology:
    nvlink = _nvlink(hardware)
    if len(shape) == 1:
        shape = (1, shape[0])
    if len(shape) != 2:
        raise TopologyError(
            f"GPU topology {text} must be NODESxGPUS (e.g. 32x8 for 32 nodes of 8 GPUs), "
            f"not {len(shape)} sizes"
        )
    nodes, gpus = shape
    if gpus > nvlink.gpus_per_domain:
        raise TopologyError(
            f"topology {text} puts {gpus} GPUs in one node but an {hardware.name} NVLink "
            f"domain holds {nvlink.gpus_per_domain}; write it as "
            f"{nodes * math.ceil(gpus / nvlink.gpus_per_domain)}x{nvlink.gpus_per_domain}"
        )
    tiers = [
        Tier(
            name="nvlink",
            link=LinkKind.NVLINK,
            is_torus=False,
            bytes_per_s_per_direction=nvlink.bytes_per_s_per_gpu_per_direction,
            latency_s=nvlink.latency_s,
            source=nvlink.source,
        )
    ]
    dims = [PhysicalDim(name="gpu", size=gpus, tier=0)]
    remaining = nodes
    for level in hardware.scale_out:
        if remaining == 1:
            break
        tiers.append(Tier.switched(level))
        tier = len(tiers) - 1
        unit = "node" if tier == 1 else f"{hardware.scale_out[tier - 2].name} group"
        if level.children == 0 or remaining <= level.children:
            dims.insert(0, PhysicalDim(name=level.name, size=remaining, tier=tier))
            remaining = 1
            break
        if remaining % level.children:
            raise TopologyError(
                f"topology {text}: {remaining} {unit}s do not fill whole {level.name} groups of "
                f"{level.children} on {hardware.name}; use at most {level.children} or a "
                f"multiple of {level.children}"
            )
        dims.insert(0, PhysicalDim(name=level.name, size=level.children, tier=tier))
        remaining //= level.children
    if remaining > 1:
        capacity = math.prod(level.children for level in hardware.scale_out) or 1
        raise TopologyError(
            f"topology {text} has more nodes than {hardware.name}'s fabric joins "
            f"({capacity} nodes); use fewer nodes, or copy the preset and raise the outermost "
            "[[scale_out]] level's children"
        )
    return Topology(hardware=hardware, dims=tuple(dims), tiers=tuple(tiers), shape_text=text)
