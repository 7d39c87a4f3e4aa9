"""The HLO text reader, against real compiled text from JAX 0.10.2 (tests/data/hlo/*.txt).

No JAX here: the fixtures were captured by tests/data/hlo/make_fixtures.py on a 2x4 mesh
('x', 'y') of simulated CPU devices (4x4 for one case), with A[M, K] @ B[K, N] and
M, K, N = 256, 512, 1024 unless a case says otherwise. Expected values are derived here
from the shapes and the shardings, not copied from the text.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sharding_roofline.errors import SpecError, ValidationError
from sharding_roofline.xla.hlo import (
    HloCollective,
    dedupe_and_weight,
    dot_flops,
    groups_to_axes,
    op_name,
    pairs_to_axes,
    parse_collectives,
    parse_replica_groups,
    read_collectives,
    reclassify_reduce_scatters,
    split_combined,
)

DATA = Path(__file__).resolve().parents[1] / "data" / "hlo"
M, K, N = 256, 512, 1024
MESH_2X4 = (2, 4)
MESH_4X4 = (4, 4)
AXES = ("x", "y")


def fixture_text(name: str) -> str:
    return (DATA / f"{name}.txt").read_text()


# --------------------------------------------------------------------------------------
# Replica groups: every printed form, expected device sets written out from the semantics.

Y_GROUPS = ((0, 1, 2, 3), (4, 5, 6, 7))  # vary y (the minor axis), x fixed
X_GROUPS = ((0, 4), (1, 5), (2, 6), (3, 7))  # vary x, y fixed
ALL_8 = (tuple(range(8)),)


@pytest.mark.parametrize(
    ("attr", "num_devices", "expected"),
    [
        pytest.param("{{0,1,2,3},{4,5,6,7}}", None, Y_GROUPS, id="explicit"),
        pytest.param("{{0,4},{1,5},{2,6},{3,7}}", None, X_GROUPS, id="explicit-strided"),
        pytest.param("{{0},{1}}", None, ((0,), (1,)), id="explicit-singletons"),
        pytest.param("{}", 8, ALL_8, id="empty-is-all-devices"),
        pytest.param("replica_groups={}", 4, ((0, 1, 2, 3),), id="with-attribute-name"),
        pytest.param("[2,4]<=[8]", None, Y_GROUPS, id="iota"),
        pytest.param("[1,8]<=[8]", None, ALL_8, id="iota-one-group"),
        # arange(8).reshape(2,4).T -> 0,4,1,5,2,6,3,7; rows of 2.
        pytest.param("[4,2]<=[2,4]T(1,0)", None, X_GROUPS, id="iota-transposed"),
        # arange(8).reshape(2,2,2).transpose(0,2,1): value a*4+b*2+c read in (a,c,b) order.
        pytest.param(
            "[4,2]<=[2,2,2]T(0,2,1)", None, ((0, 2), (1, 3), (4, 6), (5, 7)), id="iota-3d"
        ),
        # XLA's own test (replica_group_test.cc, IotaListToString2).
        pytest.param(
            "[2,10]<=[4,5]T(1,0)",
            None,
            ((0, 5, 10, 15, 1, 6, 11, 16, 2, 7), (12, 17, 3, 8, 13, 18, 4, 9, 14, 19)),
            id="iota-transposed-xla-test",
        ),
        pytest.param("mesh['axis_0'=2,'axis_1'=4] {'axis_1'}", None, Y_GROUPS, id="mesh"),
        pytest.param("mesh['axis_0'=2,'axis_1'=4] {'axis_0'}", None, X_GROUPS, id="mesh-major"),
        pytest.param("mesh['axis_0'=8,'axis_1'=1] {'axis_0'}", None, ALL_8, id="mesh-f2"),
        # Groups list the axes in the printed order: y-major here.
        pytest.param(
            "mesh['axis_0'=2,'axis_1'=4] {'axis_1','axis_0'}",
            None,
            ((0, 4, 1, 5, 2, 6, 3, 7),),
            id="mesh-two-axes-reordered",
        ),
        pytest.param(
            "mesh['a'=2,'b'=2] {}", None, ((0,), (1,), (2,), (3,)), id="mesh-no-axes-singletons"
        ),
        # Device array arange(8).reshape(2,4).T = [[0,4],[1,5],[2,6],[3,7]] read as [1,4,2]:
        # position (0,i,j) holds 4*j + i, so varying i with j fixed gives the y groups.
        pytest.param(
            "mesh['axis_0'=1,'axis_1'=4,'axis_2'=2], device_ids=([2,4]T(1,0)) {'axis_1'}",
            None,
            Y_GROUPS,
            id="mesh-device-ids",
        ),
        pytest.param(
            "mesh['axis_0'=1,'axis_1'=16], device_ids=([4,4]T(1,0)) {'axis_1'}",
            None,
            ((0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15),),
            id="mesh-device-ids-4x4",
        ),
        # Sub-axis a:(pre)size splits a=8 into [pre, size, rest] and varies `size`.
        pytest.param("mesh['a'=8] {'a':(1)2}", None, X_GROUPS, id="sub-axis-major"),
        pytest.param(
            "mesh['a'=8] {'a':(2)2}", None, ((0, 2), (1, 3), (4, 6), (5, 7)), id="sub-axis-mid"
        ),
        pytest.param(
            "mesh['a'=8] {'a':(4)2}", None, ((0, 1), (2, 3), (4, 5), (6, 7)), id="sub-axis-minor"
        ),
        pytest.param(
            "mesh['a'=8] {'a':(1)2,'a':(4)2}",
            None,
            ((0, 1, 4, 5), (2, 3, 6, 7)),
            id="two-sub-axes",
        ),
        pytest.param(
            "mesh['a'=8] {'a':(4)2,'a':(1)2}",
            None,
            ((0, 4, 1, 5), (2, 6, 3, 7)),
            id="two-sub-axes-reordered",
        ),
        # XLA's own tests (replica_group_test.cc), unquoted names as XLA prints them there.
        pytest.param(
            "mesh[a=6,b=6] {a:(1)3,b:(1)3}",
            None,
            (
                (0, 2, 4, 12, 14, 16, 24, 26, 28),
                (1, 3, 5, 13, 15, 17, 25, 27, 29),
                (6, 8, 10, 18, 20, 22, 30, 32, 34),
                (7, 9, 11, 19, 21, 23, 31, 33, 35),
            ),
            id="sub-axes-two-dims-xla-test",
        ),
        pytest.param(
            "mesh[ooo=10], device_ids=(8,3,7,5,4,2,6,0,1,9) {ooo:(5)2}",
            None,
            ((8, 3), (7, 5), (4, 2), (6, 0), (1, 9)),
            id="device-id-list-sub-axis-xla-test",
        ),
        pytest.param(
            "mesh[x=2,y=2], device_ids=(3,1,0,2) {x}",
            None,
            ((3, 0), (1, 2)),
            id="device-id-list-xla-test",
        ),
    ],
)
def test_parse_replica_groups(
    attr: str, num_devices: int | None, expected: tuple[tuple[int, ...], ...]
) -> None:
    assert parse_replica_groups(attr, num_devices) == expected


@pytest.mark.parametrize(
    ("mesh_form", "iota_form"),
    [  # XLA's MaterializedReplicaGroupsMatchExpectedV2 pairs: the same groups, two spellings.
        ("mesh[a=8] {a:(1)2}", "[4,2]<=[2,4]T(1,0)"),
        ("mesh[a=8] {a:(1)4}", "[2,4]<=[4,2]T(1,0)"),
        ("mesh[a=8] {a:(2)2}", "[4,2]<=[2,2,2]T(0,2,1)"),
        ("mesh[a=8] {a:(2)4}", "[2,4]<=[8]"),
        ("mesh[a=8] {a:(4)2}", "[4,2]<=[8]"),
        ("mesh[a=8] {a:(1)2, a:(4)2}", "[2,4]<=[2,2,2]T(1,0,2)"),
        ("mesh[a=8] {a:(4)2, a:(1)2}", "[2,4]<=[2,2,2]T(1,2,0)"),
        ("mesh[a=8] {a}", "[1,8]<=[8]"),
    ],
)
def test_mesh_and_iota_forms_agree(mesh_form: str, iota_form: str) -> None:
    assert parse_replica_groups(mesh_form) == parse_replica_groups(iota_form)


@pytest.mark.parametrize(
    ("attr", "why"),
    [
        pytest.param("garbage", "none of the printed forms", id="garbage"),
        pytest.param("", "none of the printed forms", id="empty-string"),
        pytest.param("{}", "pass num_devices", id="empty-without-device-count"),
        pytest.param("{{0,1},{x}}", "braces of integer lists", id="explicit-not-ints"),
        pytest.param("[2,4]<=[7]", "num_groups, group_size", id="iota-wrong-size"),
        pytest.param("[2,4]<=[2,4]T(0,0)", "not a permutation", id="iota-bad-perm"),
        pytest.param("mesh['a'=8] {'b'}", "not one of the mesh axes", id="unknown-axis"),
        pytest.param("mesh['a'=8] {'a':(3)2}", "does not divide", id="sub-axis-not-dividing"),
        pytest.param("mesh['a'=8] {'a','a'}", "listed twice", id="axis-twice"),
        pytest.param(
            "mesh['a'=4], device_ids=(0,1,2) {'a'}", "device_ids has 3", id="device-ids-short"
        ),
    ],
)
def test_parse_replica_groups_rejects_bad_text(attr: str, why: str) -> None:
    with pytest.raises(ValidationError, match=why) as info:
        parse_replica_groups(attr)
    message = str(info.value)
    assert repr(attr) in message  # names the text
    assert "Accepted forms:" in message  # and lists what it accepts
    assert "[2,4]<=[8] (iota)" in message


# --------------------------------------------------------------------------------------
# Groups and pairs -> mesh axes


@pytest.mark.parametrize(
    ("groups", "mesh_shape", "device_ids", "expected"),
    [
        pytest.param(Y_GROUPS, MESH_2X4, None, ("y",), id="y"),
        pytest.param(X_GROUPS, MESH_2X4, None, ("x",), id="x"),
        pytest.param(ALL_8, MESH_2X4, None, ("x", "y"), id="both"),
        pytest.param(((0, 4, 1, 5, 2, 6, 3, 7),), MESH_2X4, None, ("x", "y"), id="order-free"),
        pytest.param(tuple((d,) for d in range(8)), MESH_2X4, None, (), id="singletons"),
        pytest.param(((0, 1), (2, 3), (4, 5), (6, 7)), MESH_2X4, None, None, id="sub-axis"),
        pytest.param(((0, 1, 2, 3),), MESH_2X4, None, None, id="partial-cover"),
        pytest.param(((0, 1, 2, 3), (4, 5, 6, 9)), MESH_2X4, None, None, id="foreign-device"),
        pytest.param(ALL_8, (1, 8), None, ("y",), id="size-1-axis-left-out"),
        # Devices laid out as [[3,1,0,2],[7,5,4,6]]: x pairs 3-7, 1-5, 0-4, 2-6.
        pytest.param(
            ((3, 7), (1, 5), (0, 4), (2, 6)),
            MESH_2X4,
            (3, 1, 0, 2, 7, 5, 4, 6),
            ("x",),
            id="device-ids",
        ),
    ],
)
def test_groups_to_axes(
    groups: tuple[tuple[int, ...], ...],
    mesh_shape: tuple[int, int],
    device_ids: tuple[int, ...] | None,
    expected: tuple[str, ...] | None,
) -> None:
    assert groups_to_axes(groups, mesh_shape, AXES, device_ids) == expected


def test_groups_to_axes_rejects_a_mesh_that_does_not_match_its_names() -> None:
    with pytest.raises(SpecError, match="same length"):
        groups_to_axes(Y_GROUPS, (2, 4, 1), AXES)
    with pytest.raises(SpecError, match="each of the mesh's 8 devices once"):
        groups_to_axes(Y_GROUPS, MESH_2X4, AXES, device_ids=(0, 1, 2))


@pytest.mark.parametrize(
    ("pairs", "expected"),
    [
        # jnp.roll over y: a ring inside each row.
        pytest.param(
            ((0, 1), (4, 5), (1, 2), (5, 6), (2, 3), (6, 7), (3, 0), (7, 4)), ("y",), id="y-ring"
        ),
        pytest.param(((0, 4), (4, 0)), ("x",), id="x-swap"),
        pytest.param(((1, 4),), ("x", "y"), id="diagonal"),
        pytest.param(((0, 0), (5, 5)), (), id="self-copies"),
        pytest.param(((0, 8),), None, id="off-mesh"),
    ],
)
def test_pairs_to_axes(pairs: tuple[tuple[int, int], ...], expected: tuple[str, ...]) -> None:
    assert pairs_to_axes(pairs, MESH_2X4, AXES) == expected


# --------------------------------------------------------------------------------------
# Real compiled programs: kind, axes, per-device elements, times run, scatter/gather dims.

Expected = tuple[str, tuple[str, ...] | None, int, int, tuple[int, ...]]


@pytest.mark.parametrize(
    ("fixture", "mesh_shape", "expected"),
    [
        # (a) A[x, -] @ B[-, y] -> C[x, y]: nothing to communicate.
        pytest.param("a_no_comm_bf16", MESH_2X4, [], id="a-no-comm"),
        # (b) A[-, y] gathered over y to the whole of A, along K (dim 1).
        pytest.param(
            "b_all_gather_mesh_bf16", MESH_2X4, [("all-gather", ("y",), M * K, 1, (1,))], id="b"
        ),
        # (c1) K split over y: each device all-reduces its C[M/2, N] partial sum.
        pytest.param(
            "c1_all_reduce_f32", MESH_2X4, [("all-reduce", ("y",), M // 2 * N, 1, ())], id="c1"
        ),
        # (c2) the same into C[x, y]: all-reduce + dynamic-slice = reduce-scatter to N/4.
        pytest.param(
            "c2_reduce_scatter_bf16",
            MESH_2X4,
            [("reduce-scatter", ("y",), M // 2 * N // 4, 1, (1,))],
            id="c2",
        ),
        # (e) A[x, -] @ B[-, x]: XLA replicates A by a permute of M/4 rows, then an
        # all-gather over y of the whole of A along M (dim 0).
        pytest.param(
            "e_permute_all_gather_bf16",
            MESH_2X4,
            [
                ("collective-permute", ("x", "y"), M // 4 * K, 1, ()),
                ("all-gather", ("y",), M * K, 1, (0,)),
            ],
            id="e",
        ),
        # (f2) B[(x, y), -]: the weight gathered over all 8 devices.
        pytest.param(
            "f2_all_gather_all8_f32",
            MESH_2X4,
            [("all-gather", ("x", "y"), K * N, 1, (0,))],
            id="f2",
        ),
        pytest.param(
            "reduce_scatter_x_f32",
            MESH_2X4,
            [("reduce-scatter", ("x",), M // 4 * N // 2, 1, (1,))],
            id="rs-over-x",
        ),
        pytest.param(
            "all_gather_x_f32", MESH_2X4, [("all-gather", ("x",), M * K, 1, (1,))], id="ag-over-x"
        ),
        # A[y, -] -> A[-, y]: the local [M/4, K] block leaves as 4 tuple leaves.
        pytest.param(
            "all_to_all_bf16", MESH_2X4, [("all-to-all", ("y",), M // 4 * K, 1, ())], id="a2a"
        ),
        # (A @ B, A @ C) with K over y, both outputs replicated: one combined all-reduce.
        pytest.param(
            "combined_all_reduce_f32",
            MESH_2X4,
            [("all-reduce", ("y",), M * K + M * M, 1, ())],
            id="combined",
        ),
        # The same with only A @ B sharded [-, y]: one channel, split into two ops.
        pytest.param(
            "combined_mixed_f32",
            MESH_2X4,
            [("all-reduce", ("y",), M * M, 1, ()), ("reduce-scatter", ("y",), M * K // 4, 1, (1,))],
            id="combined-mixed",
        ),
        # 6 scanned layers, each [M/2, K] @ [K/4, K] -> reduce-scatter; one gather after.
        pytest.param(
            "scan_f32",
            MESH_2X4,
            [
                ("reduce-scatter", ("y",), M // 2 * K // 4, 6, (1,)),
                ("all-gather", ("y",), M // 2 * K, 1, (1,)),
            ],
            id="scan",
        ),
        pytest.param(
            "nested_scan_f32",
            MESH_2X4,
            [
                ("reduce-scatter", ("y",), M // 2 * K // 4, 3 * 4, (1,)),
                ("all-gather", ("y",), M // 2 * K, 1, (1,)),
            ],
            id="nested-scan",
        ),
        # bmk,kn->bmn with b over x, k over y, out [x, -, y]: [B/2, M, N'] scattered on n.
        pytest.param(
            "einsum_batch_f32",
            MESH_2X4,
            [("reduce-scatter", ("y",), 4 // 2 * M * M // 4, 1, (2,))],
            id="einsum-batch",
        ),
        # A[-, (x,y)] @ B[x, y] -> C[-, x]: gathers over sub-axes of y have no axis name.
        pytest.param(
            "sub_axis_all_gathers_bf16",
            MESH_2X4,
            [
                ("all-gather", ("x", "y"), M * K, 1, (1,)),
                ("collective-permute", ("x", "y"), M * K // 8, 1, ()),
                ("all-gather", None, M * K // 4, 1, (1,)),  # groups {0,1},{2,3},...
                ("all-gather", None, K * M // 2, 1, (0,)),  # groups {0,2},{1,3},...
            ],
            id="sub-axes",
        ),
        # 4x4 mesh, K over (y, x): the partial sums reduce over all 16 devices.
        pytest.param(
            "mesh4x4_all_reduce_yx_f32",
            MESH_4X4,
            [("all-reduce", ("x", "y"), M * M, 1, ())],
            id="4x4",
        ),
        # Device order permuted in the mesh: the groups are partition ids, so same as (b).
        pytest.param(
            "permuted_mesh_all_gather_bf16",
            MESH_2X4,
            [("all-gather", ("y",), M * K, 1, (1,))],
            id="permuted-mesh",
        ),
    ],
)
def test_read_collectives_on_compiled_programs(
    fixture: str, mesh_shape: tuple[int, int], expected: list[Expected]
) -> None:
    observed = []
    for coll in read_collectives(fixture_text(fixture)):
        if coll.kind == "collective-permute":
            assert coll.pairs is not None
            axes = pairs_to_axes(coll.pairs, mesh_shape, AXES)
        else:
            assert coll.groups is not None
            axes = groups_to_axes(coll.groups, mesh_shape, AXES)
        observed.append(
            (coll.kind, axes, coll.elements_out_per_device, coll.count, coll.dimensions)
        )
    assert observed == expected


def test_cpu_prints_bf16_collectives_as_f32() -> None:
    """jax_notes.md section 0.5: bf16 collectives read as f32; element counts are exact."""
    (coll,) = read_collectives(fixture_text("c2_reduce_scatter_bf16"))
    assert coll.result_types == (("f32", (M // 2, N // 4)),)
    assert coll.channel_id == 1
    assert coll.computation == "main.0_spmd"
    assert coll.name == "all-reduce.1"
    assert coll.group_size == 4


def test_all_to_all_tuple_form_sums_its_leaves() -> None:
    (coll,) = parse_collectives(fixture_text("all_to_all_bf16"))
    assert coll.result_types == (("f32", (64, 1, 128)),) * 4
    assert coll.elements_out_per_device == 4 * 64 * 128


def test_reclassify_needs_the_slice() -> None:
    """The raw parse sees an all-reduce; only the dynamic-slice makes it a reduce-scatter."""
    text = fixture_text("c2_reduce_scatter_bf16")
    (raw,) = parse_collectives(text)
    assert raw.kind == "all-reduce"
    assert raw.result_types == (("f32", (M // 2, N)),)
    (rs,) = reclassify_reduce_scatters((raw,), text)
    assert rs.kind == "reduce-scatter"
    assert rs.elements_out_per_device * rs.group_size == raw.elements_out_per_device
    # An all-reduce whose result is used whole (the ROOT) stays one.
    (ar,) = parse_collectives(fixture_text("c1_all_reduce_f32"))
    assert reclassify_reduce_scatters((ar,), fixture_text("c1_all_reduce_f32")) == (ar,)


def test_trip_count_comes_from_the_while_loop() -> None:
    text = fixture_text("scan_f32")
    raw = reclassify_reduce_scatters(parse_collectives(text), text)
    assert [c.count for c in raw] == [1, 1]  # parse alone does not weight
    in_loop, after = dedupe_and_weight(raw, text)
    assert (in_loop.count, in_loop.computation) == (6, "wide.region_0.1_spmd.clone")
    assert after.count == 1


@pytest.mark.parametrize(
    ("fixture", "expected"),
    [
        pytest.param("a_no_comm_bf16", 2 * M * K * N // 8, id="a-bf16-ynn-fusion"),
        pytest.param("c1_all_reduce_f32", 2 * M * K * N // 8, id="c1"),
        pytest.param("c2_reduce_scatter_bf16", 2 * M * K * N // 8, id="c2"),
        # Replicated work: the gathered A times all of B on every device.
        pytest.param("b_all_gather_mesh_bf16", 2 * M * K * N, id="b-replicated"),
        pytest.param("f2_all_gather_all8_f32", 2 * M * K * N // 2, id="f2-x-only"),
        pytest.param("e_permute_all_gather_bf16", 2 * M * K * N // 2, id="e"),
        pytest.param("all_to_all_bf16", 0, id="no-dot"),
        pytest.param("combined_all_reduce_f32", 2 * M * K * (K + M) // 4, id="two-dots"),
        pytest.param("einsum_batch_f32", 2 * 4 * M * K * M // 8, id="batch-dim"),
        pytest.param("mesh4x4_all_reduce_yx_f32", 2 * M * K * M // 16, id="4x4"),
        pytest.param("sub_axis_all_gathers_bf16", 2 * M * K * M // 2, id="sub-axes"),
        # Loops: [M/2, K/4] @ [K/4, K] per layer, 6 layers; 3 x 4 nested.
        pytest.param("scan_f32", 6 * 2 * (M // 2) * (K // 4) * K, id="scan"),
        pytest.param("nested_scan_f32", 12 * 2 * (M // 2) * (K // 4) * K, id="nested-scan"),
    ],
)
def test_dot_flops(fixture: str, expected: int) -> None:
    assert dot_flops(fixture_text(fixture)) == expected


# --------------------------------------------------------------------------------------
# Hand-written forms the CPU never prints (tests/data/hlo/hand_*.txt)


def test_async_start_forms() -> None:
    text = fixture_text("hand_async_gpu")
    permute, gather, reduce, scatter = read_collectives(text)
    # collective-permute-start returns (operand, output, u32[], u32[]): only the output.
    assert permute.kind == "collective-permute"
    assert permute.is_async
    assert permute.result_types == (("bf16", (64, 512)),)
    assert permute.group_size == 8
    assert pairs_to_axes(permute.pairs or (), MESH_2X4, AXES) == ("y",)
    assert permute.count == 5  # inside a while loop with known_trip_count 5
    # all-gather-start returns (operand, output).
    assert (gather.kind, gather.is_async, gather.result_types) == (
        "all-gather",
        True,
        (("bf16", (32, 512)),),
    )
    assert gather.dimensions == (0,)
    # all-reduce-start returns its output directly.
    assert (reduce.kind, reduce.result_types, reduce.channel_id) == (
        "all-reduce",
        (("f32", (128, 1024)),),
        2,
    )
    assert groups_to_axes(reduce.groups or (), MESH_2X4, AXES) == ("x",)
    # An async all-reduce whose -done result is sliced to 1/4 is a reduce-scatter.
    assert (scatter.kind, scatter.result_types, scatter.dimensions) == (
        "reduce-scatter",
        (("f32", (128, 256)),),
        (1,),
    )


def test_tpu_forms() -> None:
    text = fixture_text("hand_tpu")
    raw = parse_collectives(text)
    assert [(c.kind, c.channel_id) for c in raw] == [
        ("all-reduce", 7),
        ("all-reduce", 8),
        ("all-gather", 4),
        ("all-gather", 4),  # the same async op, printed in two fused computations
    ]
    rs_tiled, rs_root, gather = read_collectives(text)
    # %all-reduce-scatter fusion body: all-reduce -> dynamic-slice, tiled layouts skipped.
    assert (rs_tiled.kind, rs_tiled.result_types) == ("reduce-scatter", (("bf16", (128, 256)),))
    assert rs_tiled.computation == "all-reduce-scatter.3"
    # A body whose slice is not visible: the body's root is 1/g of the all-reduce.
    assert (rs_root.kind, rs_root.result_types, rs_root.group_size) == (
        "reduce-scatter",
        (("bf16", (4, 128)),),
        8,
    )
    # Deduped by channel_id; is_async from the async_collective_fusion computation.
    assert gather.channel_id == 4
    assert gather.is_async
    assert gather.result_types == (("bf16", (1, 4096, 4096)),)
    assert gather.elements_out_per_device == 4096 * 4096
    # The dot prints over three lines with inline tiled operand types.
    assert dot_flops(text) == 2 * 128 * 512 * 1024


def test_dedupe_keeps_kinds_apart_and_the_largest_count() -> None:
    text = fixture_text("hand_tpu")
    gathers = [c for c in parse_collectives(text) if c.kind == "all-gather"]
    assert len(gathers) == 2
    (merged,) = dedupe_and_weight(gathers, text)
    assert merged.name == "all-gather-start.1"
    # Ops without a channel are never merged.
    no_channel = [
        HloCollective(
            kind="all-reduce",
            is_async=False,
            result_types=(("f32", (4,)),),
            groups=ALL_8,
            pairs=None,
            dimensions=(),
            channel_id=None,
            computation="main",
            name=f"ar.{i}",
        )
        for i in range(2)
    ]
    assert len(dedupe_and_weight(no_channel, text)) == 2


# --------------------------------------------------------------------------------------
# The record itself, odd text, and the no-JAX promise


def test_hlo_collective_validates_and_derives() -> None:
    coll = HloCollective(
        kind="all-to-all",
        is_async=False,
        result_types=(("f32", (2, 3)), ("f32", (2, 3))),
        groups=Y_GROUPS,
        pairs=None,
        dimensions=(),
        channel_id=1,
        computation="main",
        name="a2a",
    )
    assert coll.elements_out_per_device == 12
    assert coll.group_size == 4
    assert coll.count == 1
    with pytest.raises(ValidationError, match="unknown kind 'all-sum'"):
        HloCollective(
            kind="all-sum",
            is_async=False,
            result_types=(),
            groups=None,
            pairs=None,
            dimensions=(),
            channel_id=None,
            computation="main",
            name="x",
        )


def test_empty_groups_without_a_device_count_are_left_unknown() -> None:
    text = """
ENTRY %main (p: f32[8]) -> f32[8] {
  %p = f32[8]{0} parameter(0)
  ROOT %all-reduce = f32[8]{0} all-reduce(f32[8]{0} %p), replica_groups={}, to_apply=%add
}
"""
    (coll,) = read_collectives(text)
    assert coll.groups is None
    with pytest.raises(ValidationError, match="no replica groups"):
        _ = coll.group_size
    with_count = "HloModule m, num_partitions=4\n" + text
    (coll,) = read_collectives(with_count)
    assert coll.groups == ((0, 1, 2, 3),)


def test_a_dot_whose_operand_is_not_in_the_text_is_an_error() -> None:
    text = """
%f (a: f32[4,8]) -> f32[4,2] {
  ROOT %dot = f32[4,2]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}
"""
    with pytest.raises(ValidationError, match="cannot find the type of operand 0"):
        dot_flops(text)


def test_hlo_reader_does_not_import_jax() -> None:
    code = "import sys, sharding_roofline.xla.hlo; sys.exit('jax' in sys.modules)"
    src = Path(__file__).resolve().parents[2] / "src"
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONPATH": str(src)},
        check=False,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


def test_ops_sharing_a_channel_id_in_one_computation_stay_distinct() -> None:
    """A shard_map program prints channel_id=1 on every collective of ENTRY; only copies in
    different computations (async start/done halves) are one op."""
    attrs = "dimensions={0}, use_global_device_ids=true"
    text = "\n".join(
        [
            "HloModule m, entry_computation_layout={()->()}",
            "",
            "ENTRY %main (a: f32[4,8], b: f32[8,4]) -> (f32[8,8], f32[8,16]) {",
            "  %a = f32[4,8]{1,0} parameter(0)",
            "  %b = f32[8,4]{1,0} parameter(1)",
            "  %ag.0 = f32[8,8]{1,0} all-gather(%a), channel_id=1, "
            f"replica_groups={{{{0,1}},{{2,3}}}}, {attrs}",
            "  %ag.1 = f32[8,16]{1,0} all-gather(%b), channel_id=1, "
            f"replica_groups={{{{0,2}},{{1,3}}}}, {attrs.replace('{0}', '{1}')}",
            "  ROOT %t = (f32[8,8]{1,0}, f32[8,16]{1,0}) tuple(%ag.0, %ag.1)",
            "}",
        ]
    )
    first, second = read_collectives(text)
    assert first.groups == ((0, 1), (2, 3))
    assert second.groups == ((0, 2), (1, 3))


def test_split_combined_gives_one_op_per_leaf_and_remembers_where_it_was() -> None:
    # (A @ B, A @ C) with K over y: one tuple all-reduce of two leaves
    text = fixture_text("combined_all_reduce_f32")
    (combined,) = read_collectives(text)
    leaves = split_combined([combined])
    assert [(c.kind, c.result_types, c.leaf_indices) for c in leaves] == [
        ("all-reduce", (("f32", (256, 512)),), (0,)),
        ("all-reduce", (("f32", (256, 256)),), (1,)),
    ]
    assert op_name(text, combined) == "jit(two_matmuls)/dot_general"


def test_split_combined_keeps_leaf_positions_through_reclassification() -> None:
    # the same op with only A @ B (its first leaf) sliced: a reduce-scatter of leaf 0 and
    # an all-reduce of leaf 1, each still naming its leaf of the printed op
    text = fixture_text("combined_mixed_f32")
    split = split_combined(read_collectives(text))
    assert sorted((c.kind, c.leaf_indices) for c in split) == [
        ("all-reduce", (1,)),
        ("reduce-scatter", (0,)),
    ]


def test_split_combined_leaves_a_tuple_all_to_all_whole() -> None:
    text = fixture_text("all_to_all_bf16")
    colls = read_collectives(text)
    assert split_combined(colls) == colls


def test_synchronous_ops_sharing_a_channel_id_in_two_computations_stay_distinct() -> None:
    """A shard_map program prints channel_id=1 on every collective: the psum in a scan's
    body (3 trips) and the one in the entry are two ops, not two copies of one."""
    text = fixture_text("scan_psum_shard_map_f32")
    in_loop, entry = read_collectives(text)
    assert (in_loop.kind, in_loop.result_types, in_loop.count) == (
        "all-reduce",
        (("f32", (4,)),),
        3,
    )
    assert (entry.kind, entry.result_types, entry.count) == ("all-reduce", (("f32", (8,)),), 1)
    assert in_loop.channel_id == entry.channel_id == 1
    assert in_loop.computation != entry.computation
    assert in_loop.groups == entry.groups == Y_GROUPS


def test_a_scan_body_reduce_scatter_sliced_inside_the_stacking_fusion() -> None:
    """The scan's body all-reduces [8, 4] over y (4 devices) and a dynamic-update-slice
    fusion writes this device's [2, 4] quarter into the stacked result: a reduce-scatter,
    3 times."""
    text = fixture_text("scan_reduce_scatter_f32")
    (coll,) = read_collectives(text)
    assert (coll.kind, coll.result_types, coll.count) == (
        "reduce-scatter",
        (("f32", (8 // 4, 4)),),
        3,
    )
    assert coll.groups == Y_GROUPS
