"""The planner's resharding steps are exact: simulated with numpy on every device of a mesh,
they turn the source layout's blocks into the destination layout's blocks.

Independent of JAX and of the cost model: each step is applied by its meaning (gather the
group's blocks, take a block, sum over the group), not by the planner's code.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from sharding_roofline import Collective
from sharding_roofline.reshard import Dims, reshard_path

MESH = {"x": 2, "y": 2, "z": 2}
NAMES = tuple(MESH)
SHAPE = (8, 8, 8)  # every dimension divides over all three axes


def devices() -> list[dict[str, int]]:
    return [
        dict(zip(NAMES, c, strict=True))
        for c in itertools.product(*(range(MESH[a]) for a in NAMES))
    ]


def key(device: dict[str, int]) -> tuple[int, ...]:
    return tuple(device[a] for a in NAMES)


def block_index(device: dict[str, int], axes: tuple[str, ...]) -> tuple[int, int]:
    """Mixed-radix index of this device along ``axes`` (major first), and the count."""
    index = 0
    for axis in axes:
        index = index * MESH[axis] + device[axis]
    return index, math.prod(MESH[a] for a in axes)


def take(array: np.ndarray, dim: int, index: int, count: int) -> np.ndarray:
    size = array.shape[dim] // count
    return np.take(array, range(index * size, (index + 1) * size), axis=dim)


def layout_blocks(full: np.ndarray, dims: Dims) -> dict[tuple[int, ...], np.ndarray]:
    out = {}
    for device in devices():
        block = full
        for d, axes in enumerate(dims):
            index, count = block_index(device, axes)
            block = take(block, d, index, count)
        out[key(device)] = block
    return out


def group(device: dict[str, int], axes: tuple[str, ...]) -> list[dict[str, int]]:
    """The devices that differ from ``device`` only along ``axes``, in mixed-radix order."""
    members = []
    for values in itertools.product(*(range(MESH[a]) for a in axes)):
        member = dict(device)
        member.update(zip(axes, values, strict=True))
        members.append(member)
    return members


def apply(
    kind: Collective | None,
    axes: tuple[str, ...],
    before: Dims,
    after: Dims,
    blocks: dict[tuple[int, ...], np.ndarray],
) -> dict[tuple[int, ...], np.ndarray]:
    changed = [d for d in range(len(before)) if before[d] != after[d]]
    out = {}
    for device in devices():
        members = group(device, axes)
        if kind is None:  # slice: take this device's block along the dimension that grew
            (dim,) = changed
            index, count = block_index(device, axes)
            out[key(device)] = take(blocks[key(device)], dim, index, count)
        elif kind is Collective.ALL_GATHER:
            (dim,) = changed
            out[key(device)] = np.concatenate([blocks[key(m)] for m in members], axis=dim)
        elif kind is Collective.ALL_TO_ALL:
            source = next(d for d in changed if len(after[d]) < len(before[d]))
            target = next(d for d in changed if len(after[d]) > len(before[d]))
            gathered = np.concatenate([blocks[key(m)] for m in members], axis=source)
            index, count = block_index(device, axes)
            out[key(device)] = take(gathered, target, index, count)
        elif kind is Collective.ALL_REDUCE:
            out[key(device)] = sum(blocks[key(m)] for m in members)
        elif kind is Collective.REDUCE_SCATTER:
            (dim,) = changed
            total = sum(blocks[key(m)] for m in members)
            index, count = block_index(device, axes)
            out[key(device)] = take(total, dim, index, count)
        else:  # pragma: no cover
            raise AssertionError(kind)
    return out


@st.composite
def layouts(draw: st.DrawFn, exclude: tuple[str, ...] = ()) -> Dims:
    free = [a for a in NAMES if a not in exclude]
    order = draw(st.permutations(free))
    used = order[: draw(st.integers(0, len(free)))]
    dims: list[list[str]] = [[], [], []]
    for axis in used:
        dims[draw(st.integers(0, 2))].append(axis)
    return tuple(tuple(d) for d in dims)


@settings(max_examples=400)
@given(st.data())
def test_resharding_steps_turn_source_blocks_into_destination_blocks(data: st.DataObject) -> None:
    unreduced = tuple(data.draw(st.lists(st.sampled_from(NAMES), max_size=2, unique=True)))
    src = data.draw(layouts(exclude=unreduced))
    dst = data.draw(layouts())
    full = np.random.default_rng(0).standard_normal(SHAPE)
    partial_share = math.prod(MESH[a] for a in unreduced)
    blocks = {k: b / partial_share for k, b in layout_blocks(full, src).items()}
    spread = (SHAPE, tuple(MESH.items())) if data.draw(st.booleans()) else None
    steps = reshard_path(src, dst, unreduced, NAMES, spread)
    for kind, axes, before, after, _, _ in steps:
        blocks = apply(kind, axes, before, after, blocks)
    expected = layout_blocks(full, dst)
    for device, block in blocks.items():
        np.testing.assert_allclose(block, expected[device], rtol=1e-12, atol=1e-12)


def test_swapping_two_axes_between_dimensions() -> None:
    """[I_x, J_y] -> [I_y, J_x]: no step can go first without the other, so one axis is
    gathered, the other moves by all-to-all, and the first is sliced back in."""
    steps = reshard_path((("x",), ("y",), ()), (("y",), ("x",), ()), (), NAMES)
    assert [s[0] for s in steps] == [Collective.ALL_GATHER, Collective.ALL_TO_ALL, None]


def test_reduce_scatter_before_all_reduce_and_slices_first() -> None:
    """Unreduced over x and y, output split by x: reduce-scatter x (shrinks the array) before
    the all-reduce over y; a free slice of a replicated dimension comes before anything."""
    steps = reshard_path(((), (), ()), (("x",), ("z",), ()), ("x", "y"), NAMES)
    kinds = [s[0] for s in steps]
    assert kinds.index(Collective.REDUCE_SCATTER) < kinds.index(Collective.ALL_REDUCE)
    assert kinds[0] is None or kinds[0] is Collective.REDUCE_SCATTER
