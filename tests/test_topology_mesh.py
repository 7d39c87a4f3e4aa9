"""Topologies (wraparound, GPU tiers, DCN) and meshes laid over them."""

from __future__ import annotations

import pytest

from sharding_roofline import (
    Collective,
    DeviceMesh,
    TopologyError,
    UnknownNameError,
    collective_cost,
    load_preset,
)
from sharding_roofline.topology import Topology, parse_shape


def segments(mesh: DeviceMesh, *axes: str) -> list[tuple[int, int, bool]]:
    group = mesh.group(axes)
    return [(s.size, s.stride, s.wraps) for span in group.spans for s in span.segments]


@pytest.mark.parametrize(
    ("hardware", "shape", "wraps"),
    [
        pytest.param("tpu-v5e", "4x4", (False, False), id="v5e-4x4-none"),
        pytest.param("tpu-v5e", "8x16", (False, True), id="v5e-8x16-only-16"),
        pytest.param("tpu-v5e", "16x16", (True, True), id="v5e-16x16-both"),
        pytest.param("tpu-v5p", "4x4x4", (True, True, True), id="v5p-cube"),
        pytest.param("tpu-v5p", "4x4x8", (True, True, True), id="v5p-two-cubes"),
        pytest.param("tpu-v5p", "2x2x4", (False, False, False), id="v5p-2x2x4-none"),
        pytest.param("tpu-v4p", "4x4x16", (True, True, True), id="v4p-4-cubes"),
        pytest.param("tpu-v5p", "4", (False,), id="v5p-4-chips-is-not-a-cube"),
        pytest.param("tpu-v5p", "4x4", (False, False), id="v5p-4x4-is-not-a-cube"),
        pytest.param("tpu-v5e", "16", (True,), id="v5e-axis-of-16"),
    ],
)
def test_wraparound_follows_the_books_rules(
    hardware: str, shape: str, wraps: tuple[bool, ...]
) -> None:
    topo = Topology.build(load_preset(hardware), shape)
    assert tuple(d.wraps for d in topo.dims) == wraps


def test_mesh_axes_map_major_to_minor_onto_the_topology() -> None:
    mesh = DeviceMesh.create(load_preset("tpu-v5p"), "data=16,model=8", "4x4x8")
    # data spans the two major dims (4x4), model the minor one (8)
    assert segments(mesh, "data") == [(4, 1, True), (4, 1, True)]
    assert segments(mesh, "model") == [(8, 1, True)]


def test_an_axis_may_take_a_strided_factor_of_a_ring() -> None:
    # x=2 takes every 4th chip of a wrapped 8-ring (two v5p cubes): 4 interleaved groups
    # share each link,
    # and each of its hops crosses 4 links
    mesh = DeviceMesh.create(load_preset("tpu-v5p"), "a=4,b=4,x=2,y=4", "4x4x8")
    assert segments(mesh, "x") == [(2, 4, True)]
    assert segments(mesh, "y") == [(4, 1, False)]
    assert segments(mesh, "x", "y") == [(8, 1, True)]
    elements = 2**20
    strided = collective_cost(
        mesh, Collective.ALL_GATHER, ("x",), elements_in_per_chip=elements, dtype="bf16"
    )
    # one hop of 4 links, each shared by 4 groups: V/W_bidi · 4
    assert strided.time_s == pytest.approx(2 * elements * 2 / 1.8e11 * 4)


def test_wraparound_halves_allgather_time_on_an_axis_of_16() -> None:
    """Losing the wraparound 'typically doubles the time' (tpus.md)."""
    v5e = load_preset("tpu-v5e")
    ring = DeviceMesh.create(v5e, "x=16,y=8", "16x8")
    line = DeviceMesh.create(v5e, "x=8,y=16", "8x16")
    elements = 2**22
    wrapped = collective_cost(
        ring, Collective.ALL_GATHER, ("x",), elements_in_per_chip=elements, dtype="bf16"
    )
    unwrapped = collective_cost(
        line, Collective.ALL_GATHER, ("x",), elements_in_per_chip=elements * 2, dtype="bf16"
    )
    v = elements * 16 * 2
    assert wrapped.time_s == pytest.approx(v / 9e10)  # V / W_bidi
    assert unwrapped.time_s == pytest.approx(7 / 8 * v / 4.5e10)  # (X-1)/X · V / W_uni
    assert unwrapped.time_s / wrapped.time_s == pytest.approx(2 * 7 / 8)


def test_gpu_topology_splits_nodes_over_the_fat_tree() -> None:
    h100 = load_preset("h100")
    topo = Topology.build(h100, "128x8")
    assert [(d.name, d.size) for d in topo.dims] == [("spine", 4), ("leaf", 32), ("gpu", 8)]
    assert [t.name for t in topo.tiers] == ["nvlink", "leaf", "spine"]
    small = Topology.build(h100, "4x8")
    assert [(d.name, d.size) for d in small.dims] == [("leaf", 4), ("gpu", 8)]


def test_an_axis_inside_a_node_and_one_across_nodes_differ() -> None:
    mesh = DeviceMesh.create(load_preset("h100"), "dp=4,tp=8", "4x8")
    elements = 2**24
    inner = collective_cost(
        mesh, Collective.ALL_GATHER, ("tp",), elements_in_per_chip=elements, dtype="bf16"
    )
    outer = collective_cost(
        mesh, Collective.ALL_GATHER, ("dp",), elements_in_per_chip=elements, dtype="bf16"
    )
    assert inner.link == "nvlink"
    assert outer.link == "leaf"
    # outer: each node's 8 NICs carry the 8 concurrent dp-groups: 50 GB/s per GPU
    v_outer = elements * 4 * 2
    assert outer.bandwidth_s == pytest.approx(v_outer * 3 / (4 * 50e9))
    v_inner = elements * 8 * 2
    assert inner.bandwidth_s == pytest.approx(v_inner * 7 / (8 * 450e9))
    # NCCL adds its latency: base 8.4 us + 3 network steps (14 us) / 7 NVLink steps (3.4 us)
    assert outer.time_s == pytest.approx(outer.bandwidth_s + 8.4e-6 + 3 * 14e-6)
    assert inner.time_s == pytest.approx(inner.bandwidth_s + 8.4e-6 + 7 * 3.4e-6)


def test_tpu_multislice_adds_a_dcn_tier() -> None:
    mesh = DeviceMesh.create(load_preset("tpu-v5e"), "dcn=2,x=16,y=16", "16x16", num_slices=2)
    elements = 2**20
    cost = collective_cost(
        mesh, Collective.ALL_REDUCE, ("dcn",), elements_in_per_chip=elements, dtype="bf16"
    )
    assert cost.link == "dcn"
    v = elements * 2
    # two slices: each chip's DCN share (3.125e9 B/s) carries half the array, twice (RS + AG)
    assert cost.time_s == pytest.approx(2 * v * 1 / (2 * 3.125e9))


@pytest.mark.parametrize(
    ("mesh", "topology", "message"),
    [
        pytest.param(
            "x=4,y=4", "8x4", r"mesh x=4,y=4 has 16 devices but topology 8x4 has 32", id="size"
        ),
        pytest.param("x=3,y=4", "4x3", r"does not tile topology 4x3", id="tile"),
        pytest.param("x=4;y=4", "4x4", r"is not NAME=SIZE", id="syntax"),
        pytest.param("x=4,x=4", "4x4", r"axis 'x' is named twice", id="twice"),
    ],
)
def test_bad_meshes_say_what_to_fix(mesh: str, topology: str, message: str) -> None:
    with pytest.raises(TopologyError, match=message):
        DeviceMesh.create(load_preset("tpu-v5e"), mesh, topology)


@pytest.mark.parametrize(
    ("hardware", "topology", "message"),
    [
        pytest.param("tpu-v5e", "32x16", r"does not fit in one tpu-v5e pod of 16x16", id="too-big"),
        pytest.param("tpu-v5e", "4x4x4", r"tpu-v5e is a 2D torus", id="too-many-dims"),
        pytest.param("h100", "2x16", r"holds 8; write it as 4x8", id="gpus-per-node"),
        pytest.param("h100", "48x8", r"do not fill whole leaf groups of 32", id="partial-leaf"),
        pytest.param("h100", "256x8", r"more nodes than h100's fabric joins", id="beyond-spine"),
        pytest.param("tpu-v5e", "4by4", r"is not a shape", id="syntax"),
    ],
)
def test_bad_topologies_say_what_to_fix(hardware: str, topology: str, message: str) -> None:
    with pytest.raises(TopologyError, match=message):
        Topology.build(load_preset(hardware), topology)


def test_unknown_axis_lists_the_mesh_axes() -> None:
    mesh = DeviceMesh.create(load_preset("tpu-v5e"), "x=4,y=4", "4x4")
    with pytest.raises(UnknownNameError, match=r"unknown mesh axis 'z'.*has axes x, y"):
        mesh.group(("z",))


def test_default_topology_is_the_mesh_shape() -> None:
    tpu = DeviceMesh.create(load_preset("tpu-v5e"), "x=8,y=4")
    assert tpu.topology.shape == (8, 4)
    gpu = DeviceMesh.create(load_preset("h100"), "x=2,y=2,z=4")
    assert gpu.topology.shape_text == "2x8"


def test_parse_shape() -> None:
    assert parse_shape("4x4x8") == (4, 4, 8)
    assert parse_shape(" 32 x 8 ") == (32, 8)
    with pytest.raises(TopologyError, match="size 0"):
        parse_shape("0x4")
