"""Pins on the cost code: each test fixes one term to an independent formula written out
from the book (sharding.md) with named intermediates, so a one-line change to the cost code
(found surviving by mutation testing, docs/mutation.md) fails a test."""

from __future__ import annotations

import pytest

from sharding_roofline import Collective, DeviceMesh, TopologyError, collective_cost, load_preset
from sharding_roofline.collectives import (
    Combine,
    _span_time,
    bytes_sent_per_chip,
    combine_terms_s,
    group_rate,
    parse_collective,
    ring_base_latency_s,
    switch_all_gather,
    switch_all_to_all,
    switch_permute,
    torus_all_gather,
    torus_all_to_all,
    torus_permute,
)
from sharding_roofline.errors import UnknownNameError
from sharding_roofline.mesh import AxisFactor, MeshAxis, RingSegment, _segment, parse_mesh_axes

BF16 = 2
US = 1e-6
W_UNI_V5E = 4.5e10  # tpus.md: v5e ICI, one direction
HOP_S = 1 * US  # sharding.md: about 1 us per hop


def _strided() -> DeviceMesh:
    """A v5e line of 8 chips (1x8, no wraparound: only an axis of 16 wraps), split x=2
    (every 4th chip: stride 4) and y=4 (neighbours)."""
    return DeviceMesh.create(load_preset("tpu-v5e"), "x=2,y=4", "8")


def test_permute_at_a_stride_crosses_stride_links_and_adds_its_terms() -> None:
    """sharding.md, point-to-point: a ring shift over x moves each chip's buffer to the next
    x-chip, 4 links away (stride 4), and 4 interleaved groups share those links: the
    bandwidth term is bytes x stride / W_uni. Without wraparound the last chip's message goes
    back along the line: (X-1) x stride = 4 hops. The terms add."""
    elements = 2**20
    buffer_bytes = elements * BF16
    stride = 4
    bandwidth_s = buffer_bytes * stride / W_UNI_V5E
    hops = (2 - 1) * stride
    latency_s = hops * HOP_S
    cost = collective_cost(
        _strided(),
        Collective.COLLECTIVE_PERMUTE,
        ("x",),
        elements_in_per_chip=elements,
        dtype="bf16",
    )
    assert cost.bandwidth_s == pytest.approx(bandwidth_s, rel=1e-12)
    assert cost.latency_s == pytest.approx(latency_s, rel=1e-12)
    assert cost.time_s == pytest.approx(bandwidth_s + latency_s, rel=1e-12)


def test_permute_terms_add_on_every_link_family() -> None:
    """A point-to-point permute is never max(): the book adds its terms (sharding.md)."""
    assert combine_terms_s(Collective.COLLECTIVE_PERMUTE, 3.0, 2.0) == 5.0
    assert combine_terms_s(Collective.COLLECTIVE_PERMUTE, 3.0, 2.0, Combine.MAX) == 5.0
    assert combine_terms_s(Collective.ALL_GATHER, 3.0, 2.0) == 3.0
    assert combine_terms_s(Collective.ALL_GATHER, 3.0, 2.0, Combine.SUM) == 5.0
    small = collective_cost(
        _strided(), Collective.COLLECTIVE_PERMUTE, ("y",), elements_in_per_chip=1, dtype="bf16"
    )
    assert small.time_s == pytest.approx(small.bandwidth_s + small.latency_s, rel=1e-12)
    assert small.time_s > max(small.bandwidth_s, small.latency_s)


def test_alltoall_at_a_stride_shares_each_link() -> None:
    """sharding.md, AllToAll by bisection: half the group sends the other half V/4. The x
    group is 2 chips 4 links apart on a line: the cut crosses N/X = 1 row of 1 link (no
    wraparound), shared by 4 interleaved groups, so W_uni/4: T = (V/4) / (W_uni/4)."""
    elements = 2**20
    group = 2
    v = elements * BF16 * group  # every chip's buffer together
    stride = 4
    bisection_bytes_per_s = (group / group) * 1 * W_UNI_V5E / stride
    expected = (v / 4) / bisection_bytes_per_s
    cost = collective_cost(
        _strided(), Collective.ALL_TO_ALL, ("x",), elements_in_per_chip=elements, dtype="bf16"
    )
    assert cost.bandwidth_s == pytest.approx(expected, rel=1e-12)
    assert cost.latency_s == pytest.approx(4 * HOP_S, rel=1e-12)  # the far chip: 4 hops


def test_alltoall_sends_all_but_the_own_share() -> None:
    """Each chip keeps 1/g of its buffer and sends the other (g-1)/g, not the whole of it."""
    mesh = DeviceMesh.create(load_preset("tpu-v5e"), "x=4,y=4", "4x4")
    elements = 4096
    cost = collective_cost(
        mesh, Collective.ALL_TO_ALL, ("y",), elements_in_per_chip=elements, dtype="f32"
    )
    buffer_bytes = elements * 4
    assert cost.bytes_sent_per_chip == (4 - 1) / 4 * buffer_bytes
    assert cost.group_bytes == buffer_bytes * 4
    assert cost.elements_out_per_chip == elements


def test_alltoall_across_tiers_counts_only_the_messages_that_cross_each() -> None:
    """gpus.md: of V/N² per pair, only the pairs in different nodes cross the fabric: over 2
    nodes of 8 GPUs, (M-1)/M² of V per node link, M = 2 (each GPU on its own NIC)."""
    mesh = DeviceMesh.create(load_preset("h100"), "node=2,gpu=8", "2x8")
    elements = 2**20
    n = 16
    v = elements * BF16 * n
    node_level = (2 - 1) * 8 * v / n**2 / 50e9  # chips in other nodes x V/N², own NIC
    gpu_level = (8 - 1) * 1 * (v * (8 / n) ** 2) / 8**2 / 450e9
    cost = collective_cost(
        mesh, Collective.ALL_TO_ALL, ("node", "gpu"), elements_in_per_chip=elements, dtype="bf16"
    )
    assert cost.bandwidth_s == pytest.approx(max(node_level, gpu_level), rel=1e-12)


def test_a_gap_in_a_ring_is_a_line_at_the_smallest_stride() -> None:
    """Three axes on one wrapped dimension of 16 (v5e, a full axis wraps), the middle one left
    out: the group's chips do not close a ring. It is costed as a line of 4 chips at stride 1
    (x stride 8, z stride 1; y = 4 at stride 2 left out)."""
    mesh = DeviceMesh.create(load_preset("tpu-v5e"), "x=2,y=4,z=2,w=16", "16x16")
    group = mesh.group(("x", "z"))
    [span] = group.spans
    [segment] = [s for s in span.segments if s.size > 1]
    assert segment == RingSegment(size=4, stride=1, wraps=False)
    whole = mesh.group(("x", "y", "z"))
    assert [s for s in whole.spans[0].segments if s.size > 1] == [
        RingSegment(size=16, stride=1, wraps=True)
    ]
    # the merge rule by hand: factors that chain merge; a gap never closes the ring
    chained = [AxisFactor(dim=0, count=2, stride=1), AxisFactor(dim=0, count=8, stride=2)]
    assert _segment(chained, 16, True) == RingSegment(size=16, stride=1, wraps=True)
    gap = [AxisFactor(dim=0, count=2, stride=1), AxisFactor(dim=0, count=2, stride=8)]
    assert _segment(gap, 16, True) == RingSegment(size=4, stride=1, wraps=False)
    # a gap whose chip count times its smallest stride equals the dimension still is no ring
    odd = [AxisFactor(dim=0, count=2, stride=2), AxisFactor(dim=0, count=4, stride=8)]
    assert _segment(odd, 16, True).wraps is False


# -- the per-link functions, each against its formula -------------------------------------------


def test_torus_functions_by_hand() -> None:
    ring = (RingSegment(size=8, stride=1, wraps=True),)
    line = (RingSegment(size=8, stride=1, wraps=False),)
    v, w = 8e6, 1e10
    gather_ring = torus_all_gather(
        group_bytes=v, segments=ring, link_bytes_per_s_per_direction=w, hop_latency_s=HOP_S
    )
    assert gather_ring.bandwidth_s == pytest.approx(v / (2 * w))  # V/W_bidi
    assert gather_ring.latency_s == pytest.approx(4 * HOP_S)  # floor(8/2) hops
    gather_line = torus_all_gather(
        group_bytes=v, segments=line, link_bytes_per_s_per_direction=w, hop_latency_s=HOP_S
    )
    assert gather_line.bandwidth_s == pytest.approx(7 * v / (8 * w))
    assert gather_line.latency_s == pytest.approx(7 * HOP_S)
    a2a = torus_all_to_all(
        group_bytes=v, segments=ring, link_bytes_per_s_per_direction=w, hop_latency_s=HOP_S
    )
    assert a2a.bandwidth_s == pytest.approx(v / (4 * 2 * w))  # V/(4 W_bidi)
    shift = torus_permute(
        chip_bytes=v, segments=ring, link_bytes_per_s_per_direction=w, hop_latency_s=HOP_S
    )
    assert (shift.bandwidth_s, shift.latency_s) == (pytest.approx(v / w), pytest.approx(HOP_S))


def test_switch_functions_by_hand() -> None:
    v, w = 8e6, 1e10
    gather = switch_all_gather(
        group_bytes=v, num_children=4, chips_per_child=2, chip_bytes_per_s_per_direction=w,
        step_latency_s=HOP_S,
    )  # fmt: skip
    assert gather.bandwidth_s == pytest.approx(v * 3 / (4 * 2 * w))
    assert gather.latency_s == pytest.approx(3 * HOP_S)
    a2a = switch_all_to_all(
        group_bytes=v, num_children=4, chips_per_child=2, chip_bytes_per_s_per_direction=w,
        step_latency_s=HOP_S,
    )  # fmt: skip
    assert a2a.bandwidth_s == pytest.approx((4 - 1) * 2 * v / 8**2 / w)
    assert a2a.latency_s == pytest.approx(HOP_S)
    shift = switch_permute(
        chip_bytes=v, num_children=4, chip_bytes_per_s_per_direction=w, step_latency_s=HOP_S
    )
    assert (shift.bandwidth_s, shift.latency_s) == (pytest.approx(v / w), pytest.approx(HOP_S))


# -- gaps found by mutation testing (docs/mutation.md) ------------------------------------------

RING5 = (RingSegment(size=5, stride=1, wraps=True),)


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda: torus_all_gather(group_bytes=0.0, segments=RING5,
                     link_bytes_per_s_per_direction=1e10, hop_latency_s=HOP_S), id="ag-0-bytes"),
        pytest.param(lambda: torus_all_gather(group_bytes=8.0, segments=(),
                     link_bytes_per_s_per_direction=1e10, hop_latency_s=HOP_S), id="ag-no-seg"),
        pytest.param(lambda: torus_all_gather(group_bytes=8.0,
                     segments=(RingSegment(size=1, stride=1, wraps=False),),
                     link_bytes_per_s_per_direction=1e10, hop_latency_s=HOP_S), id="ag-size-1"),
        pytest.param(lambda: torus_all_to_all(group_bytes=0.0, segments=RING5,
                     link_bytes_per_s_per_direction=1e10, hop_latency_s=HOP_S), id="a2a-0"),
        pytest.param(lambda: torus_permute(chip_bytes=0.0, segments=RING5,
                     link_bytes_per_s_per_direction=1e10, hop_latency_s=HOP_S), id="perm-0"),
        pytest.param(lambda: switch_all_gather(group_bytes=0.0, num_children=4,
                     chips_per_child=1, chip_bytes_per_s_per_direction=1e10,
                     step_latency_s=HOP_S), id="sw-ag-0"),
        pytest.param(lambda: switch_all_gather(group_bytes=8.0, num_children=1,
                     chips_per_child=1, chip_bytes_per_s_per_direction=1e10,
                     step_latency_s=HOP_S), id="sw-ag-1-child"),
        pytest.param(lambda: switch_all_to_all(group_bytes=0.0, num_children=4,
                     chips_per_child=1, chip_bytes_per_s_per_direction=1e10,
                     step_latency_s=HOP_S), id="sw-a2a-0"),
        pytest.param(lambda: switch_all_to_all(group_bytes=8.0, num_children=1,
                     chips_per_child=1, chip_bytes_per_s_per_direction=1e10,
                     step_latency_s=HOP_S), id="sw-a2a-1-child"),
        pytest.param(lambda: switch_permute(chip_bytes=0.0, num_children=4,
                     chip_bytes_per_s_per_direction=1e10, step_latency_s=HOP_S), id="sw-perm-0"),
        pytest.param(lambda: switch_permute(chip_bytes=8.0, num_children=1,
                     chip_bytes_per_s_per_direction=1e10, step_latency_s=HOP_S),
                     id="sw-perm-1-child"),
    ],
)  # fmt: skip
def test_nothing_to_move_costs_exactly_zero(call: object) -> None:
    """Zero bytes, no segment, or one unit: both terms are exactly 0.0 (design.md: a size-1
    axis costs exactly zero), on every per-link function."""
    result = call()  # type: ignore[operator]
    assert (result.bandwidth_s, result.latency_s) == (0.0, 0.0)
    assert isinstance(result.bandwidth_s, float)
    assert isinstance(result.latency_s, float)


def test_an_odd_ring_takes_floor_half_hops() -> None:
    """sharding.md: on a ring of X chips the farthest is floor(X/2) hops away; each hop moves
    V/X both ways: T = floor(X/2)·2V/(X·W_bidi). X = 5: 2 hops, 4V/(10 W_bidi)."""
    v, w_uni = 1e6, 1e10
    result = torus_all_gather(
        group_bytes=v, segments=RING5, link_bytes_per_s_per_direction=w_uni, hop_latency_s=HOP_S
    )
    assert result.latency_s == pytest.approx(2 * HOP_S, rel=1e-12)
    assert result.bandwidth_s == pytest.approx(2 * 2 * v / (5 * 2 * w_uni), rel=1e-12)


def test_gather_skips_size_one_dims_and_adds_the_others_and_counts_the_stride() -> None:
    """A size-1 dimension contributes nothing, the others' bandwidths add (V / Σ W_i), and a
    line at stride s is s times slower; slow links make any offset in the sum visible."""
    w = 2.0  # bytes/s: tiny, so the rates are small numbers and an error of 1 shows
    segments = (
        RingSegment(size=1, stride=1, wraps=False),
        RingSegment(size=4, stride=2, wraps=False),
        RingSegment(size=2, stride=1, wraps=False),
    )
    v = 12.0
    line4 = 1 / ((4 - 1) / (4 * w) * 2)  # bytes of V per second over the strided line of 4
    line2 = 1 / ((2 - 1) / (2 * w))
    result = torus_all_gather(
        group_bytes=v, segments=segments, link_bytes_per_s_per_direction=w, hop_latency_s=HOP_S
    )
    assert result.bandwidth_s == pytest.approx(v / (line4 + line2), rel=1e-12)
    assert result.latency_s == pytest.approx((3 * 2 + 1) * HOP_S, rel=1e-12)


def test_permute_over_a_line_of_four_pays_the_way_back() -> None:
    """Without wraparound the last chip's message travels back: X-1 = 3 hops, not 1."""
    cost = collective_cost(
        _strided(), Collective.COLLECTIVE_PERMUTE, ("y",), elements_in_per_chip=8, dtype="bf16"
    )
    assert cost.latency_s == pytest.approx(3 * HOP_S, rel=1e-12)
    two = switch_permute(
        chip_bytes=8.0, num_children=2, chip_bytes_per_s_per_direction=2.0, step_latency_s=HOP_S
    )
    assert (two.bandwidth_s, two.latency_s) == (4.0, HOP_S)  # two units still send


def test_a_size_one_group_has_no_terms_no_link_and_zero_bytes() -> None:
    mesh = DeviceMesh.create(load_preset("tpu-v5e"), "one=1,x=8", "8")
    for kind in Collective:
        cost = collective_cost(mesh, kind, ("one",), elements_in_per_chip=64, dtype="bf16")
        assert (cost.bandwidth_s, cost.latency_s, cost.time_s) == (0.0, 0.0, 0.0)
        assert cost.link == ""
        assert cost.bytes_sent_per_chip == 0.0
        assert cost.group_size == 1
    rate = group_rate(Collective.ALL_GATHER, mesh.group(("one",)))
    assert (rate.s_per_byte, rate.latency_s, rate.link, rate.group_size) == (0.0, 0.0, "", 1)
    assert rate.kind is Collective.ALL_GATHER
    assert rate.time_s(1.0) == 0.0


def test_zero_and_one_byte_buffers() -> None:
    """No bytes: no latency either; one byte (int8): the full latency."""
    mesh = DeviceMesh.create(load_preset("tpu-v5e"), "x=2,y=4", "2x4")
    empty = collective_cost(mesh, "all-reduce", ("y",), elements_in_per_chip=0, dtype="int8")
    assert (empty.bandwidth_s, empty.latency_s, empty.time_s) == (0.0, 0.0, 0.0)
    one = collective_cost(mesh, "all-reduce", ("y",), elements_in_per_chip=1, dtype="int8")
    assert one.latency_s == pytest.approx(2 * 3 * HOP_S)  # RS + AG over a line of 4
    assert one.time_s == one.latency_s
    rate = group_rate(Collective.ALL_GATHER, mesh.group(("y",)))
    assert rate.time_s(1.0) == max(rate.s_per_byte, rate.latency_s) > 0


def test_a_group_of_two_sends_half() -> None:
    assert bytes_sent_per_chip(Collective.ALL_GATHER, 10, 2, 2.0) == 20.0
    assert bytes_sent_per_chip(Collective.REDUCE_SCATTER, 10, 2, 2.0) == 10.0
    assert bytes_sent_per_chip(Collective.ALL_REDUCE, 10, 2, 2.0) == 20.0
    assert bytes_sent_per_chip(Collective.ALL_TO_ALL, 10, 2, 2.0) == 10.0
    assert bytes_sent_per_chip(Collective.COLLECTIVE_PERMUTE, 10, 2, 2.0) == 20.0
    assert bytes_sent_per_chip(Collective.ALL_GATHER, 10, 1, 2.0) == 0.0


def test_costs_record_their_axes_and_link_family() -> None:
    tpu = DeviceMesh.create(load_preset("tpu-v5e"), "x=2,y=4", "2x4")
    gpu = DeviceMesh.create(load_preset("h100"), "x=2,y=4", "1x8")
    t = collective_cost(tpu, "all-gather", ("y", "x"), elements_in_per_chip=8, dtype="bf16")
    g = collective_cost(gpu, "all-gather", ("y", "x"), elements_in_per_chip=8, dtype="bf16")
    assert t.axes == g.axes == ("x", "y")  # mesh order
    assert (t.combine, g.combine) == (Combine.MAX, Combine.SUM)
    assert g.time_s == pytest.approx(g.bandwidth_s + g.latency_s, rel=1e-12)
    assert mesh_group_axes(tpu) == ("x", "y")


def mesh_group_axes(mesh: DeviceMesh) -> tuple[str, ...]:
    return mesh.group(("y", "x")).axes


def test_ring_base_latency_only_on_gpus_and_only_via_nccl_groups() -> None:
    tpu = DeviceMesh.create(load_preset("tpu-v5e"), "x=2,y=4", "2x4")
    gpu = DeviceMesh.create(load_preset("h100"), "x=8", "1x8")
    assert ring_base_latency_s(tpu) == 0.0
    assert ring_base_latency_s(gpu) == pytest.approx(8.4 * US)
    # called directly, group_rate adds no base latency unless given one
    plain = group_rate(Collective.ALL_GATHER, gpu.group(("x",)))
    assert plain.latency_s == pytest.approx(7 * 3.4 * US, rel=1e-12)
    based = group_rate(Collective.ALL_GATHER, gpu.group(("x",)), base_latency_s=1 * US)
    assert based.latency_s == pytest.approx(1 * US + 7 * 3.4 * US, rel=1e-12)


def test_alltoall_scales_each_tiers_share_by_the_square_of_its_chips() -> None:
    """Of V/N² per pair, the GPU tier of a 2x8 group carries the pairs inside a node:
    (8·V/N)² / ... i.e. V·(8/16)² spread as an in-node AllToAll of 8."""
    mesh = DeviceMesh.create(load_preset("h100"), "node=2,gpu=8", "2x8")
    group = mesh.group(("node", "gpu"))
    nvlink_span = next(span for span in group.spans if span.tier.name == "nvlink")
    v = 2.0**40  # large, so the seconds are not below pytest.approx's absolute tolerance
    expected = (8 - 1) * 1 * (v * (8 / 16) ** 2) / 8**2 / 450e9
    got = _span_time(Collective.ALL_TO_ALL, nvlink_span, v, group.size)
    assert got.bandwidth_s == pytest.approx(expected, rel=1e-12)


def test_three_tier_groups_count_chips_below_each_tier() -> None:
    """A whole H100 SuperPod group: the spine joins 4 units of 32 nodes x 8 GPUs, so each
    spine child holds 256 of the group's chips (not 32)."""
    mesh = DeviceMesh.create(load_preset("h100"), "node=128,gpu=8", "128x8")
    spans = {span.tier.name: span for span in mesh.group(("node", "gpu")).spans}
    assert (spans["nvlink"].num_children, spans["nvlink"].chips_per_child) == (8, 1)
    assert (spans["leaf"].num_children, spans["leaf"].chips_per_child) == (32, 8)
    assert (spans["spine"].num_children, spans["spine"].chips_per_child) == (4, 256)


def test_multislice_default_topology_splits_the_devices_over_slices() -> None:
    mesh = DeviceMesh.create(load_preset("tpu-v5e"), "dcn=2,x=4,y=4", num_slices=2)
    assert mesh.topology.shape == (2, 16)
    assert mesh.topology.shape_text == "2 slices of 16"
    with pytest.raises(TopologyError, match="does not split into 3 slices"):
        DeviceMesh.create(load_preset("tpu-v5e"), "dcn=2,x=4,y=4", num_slices=3)


def test_mesh_axis_and_mesh_types_are_checked() -> None:
    with pytest.raises(TopologyError, match="cannot name a mesh axis"):
        MeshAxis(name="1x", size=2)
    mesh = _strided()
    with pytest.raises(TopologyError, match="tuple of MeshAxis"):
        DeviceMesh(topology=mesh.topology, axes=list(mesh.axes))  # type: ignore[arg-type]
    with pytest.raises(TopologyError, match="needs a Topology"):
        DeviceMesh(topology="8", axes=mesh.axes)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["all_gather", "AllGather", "ALL-GATHER", " all-gather "])
def test_collective_names_in_every_spelling(name: str) -> None:
    assert parse_collective(name) is Collective.ALL_GATHER


def test_describe_axis_names_the_links() -> None:
    assert _strided().describe_axis("x") == "x=2: ici line of 2, every 4th chip"
    assert _strided().describe_axis("y") == "y=4: ici line of 4"
    wrapped = DeviceMesh.create(load_preset("tpu-v5p"), "x=4,y=4,z=4", "4x4x4")
    assert wrapped.describe_axis("z") == "z=4: ici ring of 4"
    gpu = DeviceMesh.create(load_preset("h100"), "node=4,gpu=8", "4x8")
    assert gpu.describe_axis("node") == "node=4: leaf across 4"
    assert gpu.describe_axis("gpu") == "gpu=8: nvlink across 8"
    split = DeviceMesh.create(load_preset("h100"), "node=2,tp=16", "4x8")
    assert split.describe_axis("tp") == "tp=16: nvlink across 8; leaf across 2, 8 chips each"
    one = DeviceMesh.create(load_preset("tpu-v5e"), "one=1,x=8", "8")
    assert one.describe_axis("one") == "one=1: one chip"
    every2 = DeviceMesh.create(load_preset("tpu-v5e"), "x=4,y=2", "8")
    assert every2.describe_axis("x") == "x=4: ici line of 4, every 2th chip"
    pairs = DeviceMesh.create(load_preset("h100"), "node=2,tp=4", "2x4")
    assert pairs.describe_axis("node") == "node=2: leaf across 2"
    two_per = DeviceMesh.create(load_preset("h100"), "x=2,tp=4", "4x2")
    assert two_per.describe_axis("tp") == "tp=4: nvlink across 2; leaf across 2, 2 chips each"


def test_unknown_axes_and_zero_sizes_are_named() -> None:
    mesh = _strided()
    with pytest.raises(UnknownNameError, match=r"unknown mesh axis 'q'; the mesh \(x=2,y=4\)"):
        mesh.axis_size("q")
    with pytest.raises(UnknownNameError, match=r"unknown mesh axis 'q'"):
        mesh.factors("q")
    with pytest.raises(TopologyError, match=r"size of 'x' = 0 is outside 1 to"):
        parse_mesh_axes("x=0,y=4")
