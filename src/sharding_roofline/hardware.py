"""Chips and links: pure data with validation. Every number is in base units and carries a
``source``; the numbers themselves live only in preset files (``presets/*.toml``).

Two interconnect families are modelled, after the scaling book's TPU and GPU chapters:

* ``IciSpec``: a TPU slice's inter-chip interconnect, a 2D or 3D torus whose axes wrap
  around only on certain slice shapes (tpus.md, "TPU networking").
* ``NvlinkSpec``: a GPU NVLink domain (8 GPUs per node, 72 in a GB200 NVL72) behind NVSwitches,
  where every GPU reaches every other at its full egress bandwidth (gpus.md, "Networking").

Above either, ``ScaleOutLevel``s describe the switched fabric that joins domains: InfiniBand
leaf and spine levels of a GPU fat tree, or the data-center network (DCN) between TPU slices.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from . import limits
from .dtypes import canonical_dtype
from .errors import ConfigError, UnknownNameError
from .limits import check_count, check_number


class FrozenMap(Mapping[str, float]):
    """An immutable, hashable ``str -> float`` mapping, so specs stay hashable."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, float] | None = None) -> None:
        self._items: tuple[tuple[str, float], ...] = tuple(sorted((items or {}).items()))

    def __getitem__(self, key: str) -> float:
        for name, value in self._items:
            if name == key:
                return value
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return (name for name, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(self._items)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, FrozenMap):
            return self._items == other._items
        if isinstance(other, Mapping):
            return dict(self._items) == dict(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"FrozenMap({dict(self._items)!r})"


def _sourced(owner: str, source: str) -> None:
    if not isinstance(source, str):
        raise ConfigError(f"{owner}: source must be text, got {source!r}")
    if not source.strip():
        raise ConfigError(f"{owner}: source is empty; say where the numbers come from")


class LinkKind(enum.Enum):
    """What physically carries bytes between two chips."""

    ICI = "ici"  # TPU inter-chip interconnect (torus links)
    NVLINK = "nvlink"  # GPU NVLink through NVSwitches, inside one NVLink domain
    INFINIBAND = "infiniband"  # GPU scale-out fabric (InfiniBand / RoCE fat tree)
    DCN = "dcn"  # data-center network between TPU slices (hosts' NICs)


class Wraparound(enum.Enum):
    """When a TPU slice's torus axes get their wraparound links (tpus.md)."""

    FULL_AXIS = "full-axis"  # v5e/v6e: an axis wraps only at the pod's full length (16)
    FULL_CUBES = "full-cubes"  # v4/v5p/TPU7x: all axes wrap iff the slice is whole cubes
    ALWAYS = "always"
    NEVER = "never"


def _bandwidth(owner: str, name: str, value: float) -> None:
    check_number(
        value,
        what=f"{owner}: {name}",
        bounds=limits.BANDWIDTH_BYTES_PER_S,
        unit="bytes/s",
        example="4.5e10 for 45 GB/s",
        error=ConfigError,
    )


def _rate(owner: str, name: str, value: float) -> None:
    check_number(
        value,
        what=f"{owner}: {name}",
        bounds=limits.FLOPS_PER_S,
        unit="FLOPs/s",
        example="1.97e14 for 197 TFLOP/s",
        error=ConfigError,
    )


def _latency(owner: str, name: str, value: float) -> None:
    check_number(
        value,
        what=f"{owner}: {name}",
        bounds=limits.LATENCY_S,
        unit="s",
        example="1e-6 for 1 us",
        error=ConfigError,
    )


def _count(owner: str, name: str, value: int, most: int, least: int = 1) -> None:
    check_count(value, what=f"{owner}: {name}", most=most, least=least, error=ConfigError)


@dataclass(frozen=True, slots=True, kw_only=True)
class ChipSpec:
    """One accelerator chip: peak matmul rate per dtype and its HBM.

    ``peak_flops_per_s[dtype]`` is the dense rate of a matmul with inputs of ``dtype`` *as XLA
    lowers it by default*. For ``float32`` on NVIDIA H100/H200/B200/GB200 that is the TF32
    tensor-core rate: JAX's default matmul precision computes float32 dots in TF32 on recent
    GPUs (docs.jax.dev, "Matmul precision"), bf16 passes on TPU. ``vector_flops_per_s[dtype]``
    is the rate of element-wise and reduction work outside the matrix units (CUDA-core FP32 on
    a GPU, which is also what a ``precision=HIGHEST`` float32 matmul runs at); optional, and
    listed only where the vendor publishes it.
    """

    name: str
    peak_flops_per_s: FrozenMap
    hbm_bytes_per_s: float
    hbm_capacity_bytes: float
    source: str
    vector_flops_per_s: FrozenMap = field(default_factory=FrozenMap)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise ConfigError(f"chip name must be text, got {self.name!r}")
        for table in ("peak_flops_per_s", "vector_flops_per_s"):
            given: Mapping[str, float] = getattr(self, table)
            if not isinstance(given, Mapping):
                raise ConfigError(
                    f"chip {self.name!r}: {table} must map dtype names to FLOPs/s (e.g. "
                    f"{{'bfloat16': 1.97e14}}), got {given!r}"
                )
            if not isinstance(given, FrozenMap):  # built in code from a dict: keep it hashable
                object.__setattr__(self, table, FrozenMap(given))
            for dtype, rate in getattr(self, table).items():
                if canonical_dtype(dtype) != dtype:
                    raise ConfigError(
                        f"chip {self.name!r}: {table} key {dtype!r} is an alias; "
                        f"write {canonical_dtype(dtype)!r}"
                    )
                _rate(f"chip {self.name!r}", f"{table}.{dtype}", rate)
        if not self.peak_flops_per_s:
            raise ConfigError(f"chip {self.name!r}: peak_flops_per_s lists no dtype")
        _sourced(f"chip {self.name!r}", self.source)
        _bandwidth(f"chip {self.name!r}", "hbm_bytes_per_s", self.hbm_bytes_per_s)
        check_number(
            self.hbm_capacity_bytes,
            what=f"chip {self.name!r}: hbm_capacity_bytes",
            bounds=limits.CAPACITY_BYTES,
            unit="bytes",
            example="17179869184 for 16 GiB",
            error=ConfigError,
        )

    def peak_flops_per_s_for(self, dtype: str) -> float:
        """Peak dense matmul FLOPs/s for ``dtype``; a clear error if the chip lacks it."""
        key = canonical_dtype(dtype)
        try:
            return self.peak_flops_per_s[key]
        except KeyError:
            raise UnknownNameError(
                f"chip {self.name!r} has no peak matmul rate for dtype {key!r}; it lists "
                f"{', '.join(self.peak_flops_per_s)}. Use one of those with --dtype, or add "
                f"peak_flops_per_s.{key} (with its source) to a copy of the preset."
            ) from None

    def critical_intensity_flops_per_byte(self, dtype: str = "bfloat16") -> float:
        """Peak FLOPs/s over HBM bytes/s: above this intensity a kernel is compute-bound."""
        return self.peak_flops_per_s_for(dtype) / self.hbm_bytes_per_s


@dataclass(frozen=True, slots=True, kw_only=True)
class IciSpec:
    """A TPU slice's torus interconnect."""

    link_bytes_per_s_per_direction: float
    num_torus_dims: int
    max_shape: tuple[int, ...]
    wraparound: Wraparound
    hop_latency_s: float
    source: str
    cube_edge: int = 4
    #: Slices built of whole cubes (TPU7x): a slice larger than one cube has every axis a
    #: multiple of ``cube_edge`` and at most this many cubes; ``max_shape`` then only names
    #: the pod. 0: any slice that fits inside ``max_shape`` (v5e, v6e, v4, v5p).
    max_cubes: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.wraparound, Wraparound):
            raise ConfigError(f"[ici]: wraparound must be a Wraparound, got {self.wraparound!r}")
        if not isinstance(self.max_shape, tuple):
            raise ConfigError(f"[ici]: max_shape must be a tuple of sizes, got {self.max_shape!r}")
        _count("[ici]", "num_torus_dims", self.num_torus_dims, most=3)
        _bandwidth("[ici]", "link_bytes_per_s_per_direction", self.link_bytes_per_s_per_direction)
        _latency("[ici]", "hop_latency_s", self.hop_latency_s)
        _sourced("[ici]", self.source)
        if self.num_torus_dims not in (1, 2, 3):
            raise ConfigError(f"[ici]: num_torus_dims must be 1, 2 or 3, got {self.num_torus_dims}")
        if len(self.max_shape) != self.num_torus_dims:
            raise ConfigError(
                f"[ici]: max_shape {list(self.max_shape)} must list {self.num_torus_dims} "
                "positive sizes, one per torus dimension"
            )
        for size in self.max_shape:
            _count("[ici]", "max_shape entry", size, most=2**16)
        _count("[ici]", "cube_edge", self.cube_edge, most=64)
        _count("[ici]", "max_cubes", self.max_cubes, most=2**20, least=0)

    @property
    def links_per_chip(self) -> int:
        """Nearest neighbours in the torus: 4 in 2D (v5e, v6e), 6 in 3D (v4, v5p)."""
        return 2 * self.num_torus_dims

    @property
    def link_bytes_per_s_bidirectional(self) -> float:
        """The book's ``W_ici``: both directions of one link (what a wrapped axis gives)."""
        return 2 * self.link_bytes_per_s_per_direction

    def wraps(self, shape: tuple[int, ...]) -> tuple[bool, ...]:
        """Which axes of a slice of this ``shape`` (one size per torus dim) wrap around.

        v5e/v6e (``full-axis``): only an axis at the pod's full length (16) wraps, so a 4x4
        has no wraparound and an 8x16 wraps only on its 16 axis. v4/v5p (``full-cubes``):
        slices are built from 4x4x4 cubes and every axis wraps when the slice is whole cubes
        (4x4x4, 4x4x8, ...), none otherwise (2x2x4). An axis of 1 or 2 never needs one.
        """
        if self.wraparound is Wraparound.FULL_AXIS:
            if len(shape) == len(self.max_shape):
                full = self.max_shape
            else:
                full = (max(self.max_shape),) * len(shape)
            return tuple(size > 2 and size == f for size, f in zip(shape, full, strict=True))
        if self.wraparound is Wraparound.FULL_CUBES:
            # a slice given with fewer sizes than the torus has dimensions is 1 chip thick in
            # the others, so smaller than a cube: no wraparound (a 4-chip "4" is 1x1x4)
            every_dim = len(shape) == self.num_torus_dims
            whole = every_dim and all(size % self.cube_edge == 0 for size in shape)
            return tuple(whole and size > 2 for size in shape)
        if self.wraparound is Wraparound.ALWAYS:
            return tuple(size > 2 for size in shape)
        return tuple(False for _ in shape)


@dataclass(frozen=True, slots=True, kw_only=True)
class NvlinkSpec:
    """A GPU NVLink domain: GPUs behind NVSwitches, each at its full egress to any other."""

    gpus_per_domain: int
    bytes_per_s_per_gpu_per_direction: float
    latency_s: float  # per ring step over NVLink (NCCL hwLatencies[NVLINK][RING][SIMPLE])
    source: str
    #: NCCL's fixed latency of one ring collective (baseLatencies[RING][SIMPLE]), paid once
    #: per AllGather/ReduceScatter/AllReduce on top of the per-step latencies; 0: none.
    ring_base_latency_s: float = 0.0

    def __post_init__(self) -> None:
        _count("[nvlink]", "gpus_per_domain", self.gpus_per_domain, most=2**16)
        _bandwidth(
            "[nvlink]", "bytes_per_s_per_gpu_per_direction", self.bytes_per_s_per_gpu_per_direction
        )
        _latency("[nvlink]", "latency_s", self.latency_s)
        if self.ring_base_latency_s != 0:
            _latency("[nvlink]", "ring_base_latency_s (0: none)", self.ring_base_latency_s)
        _sourced("[nvlink]", self.source)


@dataclass(frozen=True, slots=True, kw_only=True)
class ScaleOutLevel:
    """One level of the switched fabric above the NVLink domain or TPU slice.

    ``children`` is how many units of the level below one unit of this level joins (32 nodes
    per DGX SuperPod scalable unit; 4 units per spine); 0 means unbounded (DCN between
    slices). Bandwidth is per chip, per direction: each unit below reaches this level at
    ``chips in the unit x bytes_per_s_per_chip_per_direction`` (an H100 node's 8 x 50 GB/s
    = 400 GB/s egress; a scalable unit's 256 x 50 GB/s = 12.8 TB/s).
    """

    name: str
    link: LinkKind
    children: int
    bytes_per_s_per_chip_per_direction: float
    latency_s: float
    source: str

    def __post_init__(self) -> None:
        owner = f"[[scale_out]] {self.name!r}"
        if not isinstance(self.link, LinkKind):
            raise ConfigError(f"{owner}: link must be a LinkKind, got {self.link!r}")
        _count(owner, "children (0 = unbounded)", self.children, most=2**20, least=0)
        if self.link not in (LinkKind.INFINIBAND, LinkKind.DCN):
            raise ConfigError(
                f"{owner}: link must be 'infiniband' or 'dcn', got {self.link.value!r}"
            )
        _bandwidth(
            owner, "bytes_per_s_per_chip_per_direction", self.bytes_per_s_per_chip_per_direction
        )
        _latency(owner, "latency_s", self.latency_s)
        _sourced(owner, self.source)


class HardwareKind(enum.Enum):
    TPU = "tpu"
    GPU = "gpu"


@dataclass(frozen=True, slots=True, kw_only=True)
class HardwareSpec:
    """A chip with its interconnect: what a preset file describes."""

    name: str
    description: str
    kind: HardwareKind
    chip: ChipSpec
    ici: IciSpec | None = None
    nvlink: NvlinkSpec | None = None
    scale_out: tuple[ScaleOutLevel, ...] = ()
    notes: str = ""
    path: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        where = self.path or self.name
        if not isinstance(self.kind, HardwareKind):
            raise ConfigError(f"{where}: kind must be 'tpu' or 'gpu', got {self.kind!r}")
        if not isinstance(self.chip, ChipSpec):
            raise ConfigError(f"{where}: chip must be a ChipSpec, got {self.chip!r}")
        if not isinstance(self.scale_out, tuple) or not all(
            isinstance(level, ScaleOutLevel) for level in self.scale_out
        ):
            raise ConfigError(
                f"{where}: scale_out must be a tuple of ScaleOutLevel, got {self.scale_out!r}"
            )
        if self.kind is HardwareKind.TPU and (self.ici is None or self.nvlink is not None):
            raise ConfigError(f"{where}: a TPU preset needs an [ici] table and no [nvlink]")
        if self.kind is HardwareKind.GPU and (self.nvlink is None or self.ici is not None):
            raise ConfigError(f"{where}: a GPU preset needs an [nvlink] table and no [ici]")
        wanted = LinkKind.DCN if self.kind is HardwareKind.TPU else LinkKind.INFINIBAND
        for level in self.scale_out:
            if level.link is not wanted:
                raise ConfigError(
                    f"{where}: [[scale_out]] {level.name!r} has link = {level.link.value!r}, but "
                    f"a {self.kind.value.upper()} preset's scale-out is {wanted.value!r}"
                )
        names = [level.name for level in self.scale_out]
        if len(set(names)) != len(names):
            raise ConfigError(f"{where}: [[scale_out]] level names repeat: {names}")
        for level in self.scale_out[:-1]:
            if level.children == 0:
                raise ConfigError(
                    f"{where}: [[scale_out]] {level.name!r} has children = 0 (unbounded) but is "
                    "not the outermost level; only the last level may be unbounded"
                )
