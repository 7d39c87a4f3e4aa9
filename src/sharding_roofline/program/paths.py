"""Resharding paths of named tensors, costed on a mesh and cached.

``TensorPaths`` is the one place a program's tensors are moved between layouts: it asks the
exact resharding engine (``reshard.reshard_path``) for the steps taking a tensor from one
layout (possibly unreduced over some axes) to another, costs every collective once with
``collectives.collective_cost`` and keeps the result, so a search that meets the same move
again (the same tensor, layouts and unreduced axes) looks it up.

Like the single-einsum planner, it also tries the book's idle-axes trick (sharding.md Q2):
before an all-gather, axes the tensor is replicated over and the destination does not use
are sliced onto the gathered dimension for free and gathered along, so the gather runs over
more links; the cheaper of the two paths is kept (``idle_axes=False`` turns it off, for the
book's textbook comparisons on one axis).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..collectives import Collective, CollectiveCost, collective_cost
from ..mesh import DeviceMesh
from ..reshard import Dims, RawStep, reshard_path


@dataclass(frozen=True, slots=True)
class PathStep:
    """One step of a path: a collective with its cost, or (``kind is None``) a free slice."""

    kind: Collective | None
    axes: tuple[str, ...]
    before: Dims
    after: Dims
    unreduced_before: tuple[str, ...]
    unreduced_after: tuple[str, ...]
    cost: CollectiveCost | None


@dataclass(frozen=True, slots=True)
class Path:
    steps: tuple[PathStep, ...]
    time_s: float
    bytes_sent_per_chip: float

    @property
    def collectives(self) -> tuple[PathStep, ...]:
        return tuple(s for s in self.steps if s.cost is not None)


EMPTY = Path((), 0.0, 0.0)


class TensorPaths:
    """Costed resharding paths for tensors of known shapes on one mesh (cached)."""

    def __init__(
        self, mesh: DeviceMesh, *, idle_axes: bool = True, exclude: tuple[str, ...] = ()
    ) -> None:
        self.mesh = mesh
        self.idle_axes = idle_axes
        self.axis_size = {axis.name: axis.size for axis in mesh.axes}
        self.mesh_order = mesh.axis_names
        self.axis_items = tuple(self.axis_size.items())
        # axes a gather never widens over: their chips are busy with other work (other
        # pipeline stages' layers)
        self.busy = tuple(exclude)
        self._cache: dict[tuple[object, ...], Path | None] = {}
        self._pieces: dict[tuple[str, ...], int] = {}
        self._elements: dict[tuple[tuple[int, ...], Dims], int] = {}

    def pieces(self, axes: tuple[str, ...]) -> int:
        value = self._pieces.get(axes)
        if value is None:
            value = self._pieces[axes] = math.prod(self.axis_size[a] for a in axes)
        return value

    def elements(self, shape: tuple[int, ...], dims: Dims) -> int:
        key = (shape, dims)
        value = self._elements.get(key)
        if value is None:
            value = 1
            for size, axes in zip(shape, dims, strict=True):
                value *= size // self.pieces(axes)
            self._elements[key] = value
        return value

    def divisible(self, shape: tuple[int, ...], dims: Dims) -> bool:
        return all(size % self.pieces(axes) == 0 for size, axes in zip(shape, dims, strict=True))

    def path(
        self,
        shape: tuple[int, ...],
        dtype: str,
        src: Dims,
        dst: Dims,
        unreduced: tuple[str, ...] = (),
    ) -> Path | None:
        """The cheaper exact path from ``src`` (unreduced over ``unreduced``) to ``dst``;
        ``None`` when an intermediate layout does not divide the shape."""
        if src == dst and not unreduced:
            return EMPTY
        key = (shape, dtype, src, dst, unreduced)
        if key in self._cache:
            return self._cache[key]
        plain = self._cost(shape, dtype, reshard_path(src, dst, unreduced, self.mesh_order))
        best = plain
        gathers = plain is None or any(s.kind is Collective.ALL_GATHER for s in plain.steps)
        if self.idle_axes and gathers:
            spread_shape = tuple(math.gcd(n, self.mesh.num_devices) for n in shape)
            raw = reshard_path(
                src, dst, unreduced, self.mesh_order, (spread_shape, self.axis_items), self.busy
            )
            wide = self._cost(shape, dtype, raw)
            if wide is not None and (
                best is None
                or (wide.time_s, wide.bytes_sent_per_chip) < (best.time_s, best.bytes_sent_per_chip)
            ):
                best = wide
        self._cache[key] = best
        return best

    def _cost(self, shape: tuple[int, ...], dtype: str, raw: tuple[RawStep, ...]) -> Path | None:
        steps: list[PathStep] = []
        time_s = 0.0
        sent = 0.0
        for kind, axes, before, after, u_before, u_after in raw:
            if not self.divisible(shape, before) or not self.divisible(shape, after):
                return None
            if self.pieces(axes) == 1:
                continue  # over axes of size 1: moves nothing
            cost = None
            if kind is not None:
                cost = collective_cost(
                    self.mesh, kind, axes, elements_in_per_chip=self.elements(shape, before),
                    dtype=dtype,
                )  # fmt: skip
                if cost.group_size == 1:
                    continue
                time_s += cost.time_s
                sent += cost.bytes_sent_per_chip
            steps.append(PathStep(kind, axes, before, after, u_before, u_after, cost))
        return Path(tuple(steps), time_s, sent)
