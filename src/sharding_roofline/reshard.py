"""The exact resharding engine: the steps that take an array from one layout to another.

Per dimension, the common prefix of the two layouts stays; the rest of the source is removed
from the minor end and the rest of the destination appended in order. Each step is exact
about layout, so a ``shard_map`` program can issue it as is:

* an all-gather removes the minor-most axes of one dimension;
* a free dynamic slice, or a reduce-scatter of an unreduced array, appends minor-most axes;
* an all-to-all moves the minor-most run of axes of one dimension to the end of another;
* an all-reduce reduces the unreduced axes the destination does not split.

``tests/test_reshard_semantics.py`` replays every step with numpy on every device.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

from .collectives import Collective
from .errors import PlanError

Dims = tuple[tuple[str, ...], ...]

RawStep = tuple[Collective | None, tuple[str, ...], Dims, Dims, tuple[str, ...], tuple[str, ...]]


# Bounded: a sweep reuses paths across searches without its memory growing with the sweep.
@functools.lru_cache(maxsize=8192)
def reshard_path(  # noqa: PLR0917 (positional: the arguments are the cache key)
    src: Dims,
    dst: Dims,
    unreduced: tuple[str, ...] = (),
    mesh_order: tuple[str, ...] = (),
    spread: tuple[tuple[int, ...], tuple[tuple[str, int], ...]] | None = None,
    busy: tuple[str, ...] = (),
) -> tuple[RawStep, ...]:
    """The steps taking an array from layout ``src`` (unreduced over ``unreduced``) to
    ``dst``. Each step: (kind or None for a slice, axes, before, after, unreduced before,
    unreduced after).

    Per dimension the common prefix of ``src`` and ``dst`` stays; the rest of ``src`` is
    removed (from the minor end) and the rest of ``dst`` appended in order. Greedy, cheapest
    first: free slices and reduce-scatters shrink the array before anything moves; an axis
    leaving one dimension for another goes by all-to-all; all-reduce handles unreduced axes
    the output does not split; all-gathers come last, when the array is smallest.

    ``spread`` (the array's dimension sizes and the mesh's axis sizes) turns on the book's
    use of idle replicated axes (sharding.md Q2, "fun fact"): before an all-gather, axes the
    array is replicated over and the destination does not use are sliced onto the gathered
    dimension for free, and gathered along with it, so the gather runs over more links
    (``AllGather_X [B_X, D_Y] -> AllGather_XZ [B_XZ, D_Y]``: 23 us -> 11.5 us on a v4p cube).
    Axes in ``busy`` are never widened over (their chips do other work: pipeline stages).
    """
    rank = len(dst)
    current = [list(d) for d in src]
    pending_u = list(unreduced)
    prefix = [_common_prefix(src[d], dst[d]) for d in range(rank)]
    queue = [list(dst[d][prefix[d] :]) for d in range(rank)]
    wanted_in = {axis: d for d in range(rank) for axis in queue[d]}
    added = [False] * rank  # dimension d has started taking its new axes
    steps: list[RawStep] = []

    def removals(d: int) -> list[str]:
        # what is left of src beyond the kept prefix; appends happen only once it is empty
        return current[d][prefix[d] :] if len(current[d]) > prefix[d] and not added[d] else []

    def snapshot() -> Dims:
        return tuple(tuple(d) for d in current)

    def emit(kind: Collective | None, axes: list[str], before: Dims, u_before: list[str]) -> None:
        steps.append((kind, tuple(axes), before, snapshot(), tuple(u_before), tuple(pending_u)))

    guard = 0
    while True:
        guard += 1
        if guard > 8 * (rank + len(unreduced) + 4) ** 2:  # pragma: no cover - a bug guard
            raise PlanError(f"resharding {src} -> {dst} did not converge (a planner bug)")
        progress = False
        used = {axis for d in current for axis in d}
        # 1. append to dimensions whose removals are done: first what shrinks the array
        # (free slices, reduce-scatters) everywhere, then moves (all-to-all) on the result
        for moves in (False, True):
            for e in range(rank):
                if removals(e):
                    continue
                while queue[e]:
                    head = queue[e][0]
                    before, u_before = snapshot(), list(pending_u)
                    if head in pending_u:
                        group = _take_while(queue[e], lambda a: a in pending_u)
                        for axis in group:
                            pending_u.remove(axis)
                        current[e].extend(group)
                        emit(Collective.REDUCE_SCATTER, group, before, u_before)
                    elif head not in used:
                        group = _take_while(
                            queue[e], lambda a, used=used: a not in used and a not in pending_u
                        )
                        current[e].extend(group)
                        emit(None, group, before, u_before)
                    elif not moves:
                        break
                    else:
                        source = next(d for d in range(rank) if head in current[d])
                        tail = removals(source)
                        if source == e or not tail or head not in tail:
                            break
                        # move the run of queue heads that sit, in order, at the end of `source`
                        start = tail.index(head)
                        run = tail[start:]
                        if queue[e][: len(run)] != run:
                            break
                        del queue[e][: len(run)]
                        del current[source][len(current[source]) - len(run) :]
                        current[e].extend(run)
                        emit(Collective.ALL_TO_ALL, run, before, u_before)
                    added[e] = True
                    progress = True
                    used = {axis for d in current for axis in d}
            if progress:
                break
        if progress:
            continue
        # 2. all-reduce the unreduced axes the output does not split
        leftover = [axis for axis in pending_u if axis not in wanted_in]
        if leftover:
            before, u_before = snapshot(), list(pending_u)
            for axis in leftover:
                pending_u.remove(axis)
            emit(Collective.ALL_REDUCE, _in_order(leftover, mesh_order), before, u_before)
            continue
        # 3. all-gather: the longest minor run of axes not wanted in another dimension
        pending_dims = [d for d in range(rank) if removals(d)]
        if not pending_dims:
            break
        for d in pending_dims:
            tail = removals(d)
            gathered: list[str] = []
            for axis in reversed(tail):
                if wanted_in.get(axis, d) != d:
                    break
                gathered.insert(0, axis)
            if gathered:
                break
        else:
            d = pending_dims[0]
            gathered = removals(d)[-1:]  # break a cycle (x<->y swaps): gather one axis
        if spread is not None:
            # an axis the path has just all-reduced is replicated too, but slicing it back
            # would make that all-reduce a reduce-scatter: left for the all-reduce alone
            reduced = [*pending_u, *unreduced]
            idle = _idle_axes(
                current,
                pending_u=reduced,
                dst=dst,
                dim=d,
                spread=spread,
                mesh_order=tuple(a for a in mesh_order if a not in busy),
            )
            if idle:
                before, u_before = snapshot(), list(pending_u)
                current[d].extend(idle)
                emit(None, idle, before, u_before)
                gathered = gathered + idle
        before, u_before = snapshot(), list(pending_u)
        del current[d][len(current[d]) - len(gathered) :]
        emit(Collective.ALL_GATHER, gathered, before, u_before)
    if snapshot() != dst or pending_u:  # pragma: no cover - a bug guard
        raise PlanError(f"resharding {src} -> {dst} ended at {snapshot()} (a planner bug)")
    return tuple(steps)


def _idle_axes(
    current: list[list[str]],
    *,
    pending_u: list[str],
    dst: Dims,
    dim: int,
    spread: tuple[tuple[int, ...], tuple[tuple[str, int], ...]],
    mesh_order: tuple[str, ...],
) -> list[str]:
    """Axes the array is replicated over, that the destination does not use, and that
    dimension ``dim`` can still be divided by: free to slice onto it and gather along."""
    dim_sizes, axis_sizes = spread
    size = dict(axis_sizes)
    used = {axis for d in current for axis in d} | set(pending_u) | {a for d in dst for a in d}
    pieces = math.prod(size[a] for a in current[dim])
    idle: list[str] = []
    for axis in mesh_order:
        if axis in used or size[axis] == 1:
            continue
        if dim_sizes[dim] % (pieces * size[axis]) == 0:
            idle.append(axis)
            pieces *= size[axis]
    return idle


def _common_prefix(a: tuple[str, ...], b: tuple[str, ...]) -> int:
    n = 0
    while n < len(a) and n < len(b) and a[n] == b[n]:
        n += 1
    return n


def _take_while(queue: list[str], keep: Any) -> list[str]:
    taken: list[str] = []
    while queue and keep(queue[0]):
        taken.append(queue.pop(0))
    return taken


def _in_order(axes: Sequence[str], order: tuple[str, ...]) -> list[str]:
    if not order:
        return list(axes)
    return sorted(axes, key=order.index)
