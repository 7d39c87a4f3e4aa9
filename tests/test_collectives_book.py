"""The scaling book's worked collective answers.

Each case computes the expected time in the test from the book's formula with named
intermediates, checks that against the answer the book states (within the book's rounding),
and checks our model against the formula.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest

from sharding_roofline import Bound, Collective, DeviceMesh, collective_cost, load_preset

BF16 = 2
US = 1e-6


@dataclass(frozen=True)
class BookCase:
    hardware: str
    topology: str
    mesh: str
    kind: Collective
    axes: tuple[str, ...]
    elements_in_per_chip: int
    formula_s: float  # the book's formula, evaluated in the test
    book_answer_s: float  # what the book states
    book_rtol: float  # the book's rounding
    bound: Bound = Bound.BANDWIDTH
    # GPU links: NCCL's latency, added to the book's bandwidth term (None: TPU, max of terms)
    nccl_latency_s: float | None = None


# -- TPU (sharding.md) ---------------------------------------------------------------------

# Pop quiz 2 (a): AllGather_Y([E_Y, F]) on v5e {X: 8, Y: 4}, E=2048, F=8192, bf16. A 4-chip
# v5e axis has no wraparound, so an end chip takes 3 shards over one 4.5e10 B/s link.
E, F, Y = 2048, 8192, 4
V_a = E * F * BF16
W_UNI_V5E = 4.5e10
quiz2a = BookCase(
    "tpu-v5e",
    "8x4",
    "x=8,y=4",
    Collective.ALL_GATHER,
    ("y",),
    elements_in_per_chip=E // Y * F,
    formula_s=(Y - 1) * (V_a / Y) / W_UNI_V5E,
    book_answer_s=560 * US,  # "3 * 8.4e6 / 4.5e10 = 560us"
    book_rtol=0.01,
)

# Pop quiz 2 (b): the same with E=256, F=256: each shard 32 kB, 0.7 us per hop, so 3 hops
# of ~1 us latency bound it: "roughly 3 * 1us = 3us".
E_b, F_b = 256, 256
T_MIN = 1 * US
quiz2b = BookCase(
    "tpu-v5e",
    "8x4",
    "x=8,y=4",
    Collective.ALL_GATHER,
    ("y",),
    elements_in_per_chip=E_b // Y * F_b,
    formula_s=(Y - 1) * T_MIN,
    book_answer_s=3 * US,
    book_rtol=0.0,
    bound=Bound.LATENCY,
)

# Q2 on a v4p 4x4x4 cube (every axis wraps, 9e10 B/s bidirectional), B=1024, D=4096, bf16.
B, D = 1024, 4096
X = Y4 = Z = 4
W_BIDI_V4P = 9e10
# (1) AllGather_X([B_X, D_Y]): 2BD/(Y·W) -> "23us"
q2_1 = BookCase(
    "tpu-v4p",
    "4x4x4",
    "x=4,y=4,z=4",
    Collective.ALL_GATHER,
    ("x",),
    elements_in_per_chip=(B // X) * (D // Y4),
    formula_s=2 * B * D / (Y4 * W_BIDI_V4P),
    book_answer_s=23 * US,
    book_rtol=0.02,
)
# (2) AllGather_XY([B_X, D_Y]): two axes' links, 2BD/(2W) -> "46us" (latency bound 4 us)
q2_2 = BookCase(
    "tpu-v4p",
    "4x4x4",
    "x=4,y=4,z=4",
    Collective.ALL_GATHER,
    ("x", "y"),
    elements_in_per_chip=(B // X) * (D // Y4),
    formula_s=2 * B * D / (2 * W_BIDI_V4P),
    book_answer_s=46 * US,
    book_rtol=0.02,
)
# Fun fact to Q2: with Z idle, reshard [B_X, D_Y] -> [B_XZ, D_Y] for free and gather over
# X, Y and Z at once: three axes' links for the whole 2BD bytes, 2BD/(3W) -> "31us"
q2_xyz = BookCase(
    "tpu-v4p",
    "4x4x4",
    "x=4,y=4,z=4",
    Collective.ALL_GATHER,
    ("x", "y", "z"),
    elements_in_per_chip=(B // (X * Z)) * (D // Y4),
    formula_s=2 * B * D / (3 * W_BIDI_V4P),
    book_answer_s=31 * US,
    book_rtol=0.01,
)
# (3) AllReduce_Z([B_X, D_Y] {U_Z}): 2x an all-gather of 2BD/(XY) bytes -> "11.6us"
q2_3 = BookCase(
    "tpu-v4p",
    "4x4x4",
    "x=4,y=4,z=4",
    Collective.ALL_REDUCE,
    ("z",),
    elements_in_per_chip=(B // X) * (D // Y4),
    formula_s=4 * B * D / (X * Y4 * W_BIDI_V4P),
    book_answer_s=11.6 * US,
    book_rtol=0.01,
)
# Q3: AllGather_X([B_X]) with B=128 bf16 on the same cube: latency-bound, a ring of 4
# gathers in 2 hops -> "roughly 2us".
q3 = BookCase(
    "tpu-v4p",
    "4x4x4",
    "x=4,y=4,z=4",
    Collective.ALL_GATHER,
    ("x",),
    elements_in_per_chip=128 // X,
    formula_s=(X // 2) * T_MIN,
    book_answer_s=2 * US,
    book_rtol=0.0,
    bound=Bound.LATENCY,
)

# -- GPU (gpus.md) -------------------------------------------------------------------------

N_NODE = 8
W_GPU = 450e9
W_NODE = 400e9
# NCCL v2.30 src/graph/tuning.cc, Ring/Simple: baseLatencies 8.4 us; hwLatencies NVLINK 3.4 us
# and NET 14 us per step. ncclTopoTuneModel: nsteps = N-1 (AllGather, ReduceScatter) or 2(N-1)
# (AllReduce) over all N ranks, nInterSteps = nNodes-1 (twice for AllReduce), and
# latency = base + (nsteps - nInterSteps)·intraLat + nInterSteps·interLat.
NCCL_BASE_S = 8.4 * US
NCCL_NVLINK_S = 3.4 * US
NCCL_NET_S = 14 * US


def nccl_ring_latency(num_ranks: int, num_nodes: int, *, all_reduce: bool = False) -> float:
    """NCCL's formula, written out."""
    factor = 2 if all_reduce else 1
    nsteps = factor * (num_ranks - 1)
    inter_steps = factor * (num_nodes - 1)
    return NCCL_BASE_S + (nsteps - inter_steps) * NCCL_NVLINK_S + inter_steps * NCCL_NET_S


# Pop quiz 1: AllGather(bf16[B_X, F]) in an 8xH100 node, B=1024, F=16384:
# bytes·(N-1)/(N·W) -> "more precisely, 65us"
Bg, Fg = 1024, 16384
gpu_quiz1 = BookCase(
    "h100",
    "1x8",
    "x=8",
    Collective.ALL_GATHER,
    ("x",),
    elements_in_per_chip=Bg // N_NODE * Fg,
    formula_s=2 * Bg * Fg * (N_NODE - 1) / (N_NODE * W_GPU),
    book_answer_s=65 * US,
    book_rtol=0.01,
    nccl_latency_s=nccl_ring_latency(8, 1),  # 8.4 + 7 x 3.4 = 32.2 us
)
# Q3: AllGather of bf16[D_X, F], D=4096, F=65536 in one node: 536e6·7/(8·450e9) -> "1.04ms"
Dq, Fq = 4096, 65536
gpu_q3 = BookCase(
    "h100",
    "1x8",
    "x=8",
    Collective.ALL_GATHER,
    ("x",),
    elements_in_per_chip=Dq // N_NODE * Fq,
    formula_s=2 * Dq * Fq * (N_NODE - 1) / (N_NODE * W_GPU),
    book_answer_s=1.04e-3,
    book_rtol=0.01,
    nccl_latency_s=nccl_ring_latency(8, 1),
)
# Cross-node AllGather over a whole DGX H100 SuperPod (4 units x 32 nodes x 8 GPUs):
# bytes·max_i (D_i-1)/(D_i·W_i) with node 8 @ 450 GB/s, leaf 32 @ 400 GB/s, spine 4 @ 12.8 TB/s
# -> "overall AG or RS bandwidth is min(514GB/s, 413GB/s, 17.1TB/s) = 413GB/s"
V_pod = 2**31  # bytes gathered
per_level = [
    (N_NODE - 1) / (N_NODE * W_GPU),
    (32 - 1) / (32 * W_NODE),
    (4 - 1) / (4 * 12.8e12),
]
superpod = BookCase(
    "h100",
    "128x8",
    "node=128,gpu=8",
    Collective.ALL_GATHER,
    ("node", "gpu"),
    elements_in_per_chip=V_pod // BF16 // 1024,
    formula_s=V_pod * max(per_level),
    book_answer_s=V_pod / 413e9,
    book_rtol=0.002,
    nccl_latency_s=nccl_ring_latency(1024, 128),  # 8.4 + 896 x 3.4 + 127 x 14 us
)
# Q5: AllGather over exactly 2 nodes: node level B·7/(8·450e9) = B/514e9 beats the
# cross-node B·1/(2·400e9) = B/800e9, so the node level bounds it.
V_2n = 2**30
two_nodes = BookCase(
    "h100",
    "2x8",
    "node=2,gpu=8",
    Collective.ALL_GATHER,
    ("node", "gpu"),
    elements_in_per_chip=V_2n // BF16 // 16,
    formula_s=max(V_2n * 7 / (8 * W_GPU), V_2n * 1 / (2 * W_NODE)),
    book_answer_s=V_2n / 514e9,
    book_rtol=0.002,
    nccl_latency_s=nccl_ring_latency(16, 2),  # 8.4 + 14 x 3.4 + 1 x 14 us
)
# In-node AllToAll: B·(N-1)/(W·N²) (pop quiz 2, dense case)
V_a2a = 2 * 65536 * 8 * 512  # bf16[B_X, N] with B=65536 rows of 8x512: bandwidth-bound
gpu_a2a = BookCase(
    "h100",
    "1x8",
    "x=8",
    Collective.ALL_TO_ALL,
    ("x",),
    elements_in_per_chip=V_a2a // BF16 // N_NODE,
    formula_s=V_a2a * (N_NODE - 1) / (W_GPU * N_NODE**2),
    book_answer_s=V_a2a / (W_GPU * N_NODE),  # "or roughly V / (W·N)"
    book_rtol=0.13,  # the book drops the (N-1)/N = 0.875 factor here
    nccl_latency_s=NCCL_NVLINK_S,  # send/receive: one step, no ring base latency
)
# Cross-node AllToAll over M=16 full nodes: B·(M-1)/(M²·W_node) ~ B/(M·W_node)
M = 16
V_xa2a = 2**30
cross_a2a = BookCase(
    "h100",
    "16x8",
    "node=16,gpu=8",
    Collective.ALL_TO_ALL,
    ("node", "gpu"),
    elements_in_per_chip=V_xa2a // BF16 // (M * 8),
    formula_s=V_xa2a * (M - 1) / (M**2 * W_NODE),
    book_answer_s=V_xa2a / (M * W_NODE),
    book_rtol=0.07,  # (M-1)/M = 0.9375
    nccl_latency_s=NCCL_NVLINK_S + NCCL_NET_S,  # one step through each tier
)


CASES = [
    pytest.param(quiz2a, id="v5e-allgather-no-wraparound"),
    pytest.param(quiz2b, id="v5e-allgather-latency-bound"),
    pytest.param(q2_1, id="v4p-allgather-one-axis"),
    pytest.param(q2_2, id="v4p-allgather-two-axes"),
    pytest.param(q2_xyz, id="v4p-allgather-three-axes"),
    pytest.param(q2_3, id="v4p-allreduce-sharded-array"),
    pytest.param(q3, id="v4p-allgather-latency-2-hops"),
    pytest.param(gpu_quiz1, id="h100-node-allgather"),
    pytest.param(gpu_q3, id="h100-node-allgather-536MB"),
    pytest.param(superpod, id="h100-superpod-allgather-413GBps"),
    pytest.param(two_nodes, id="h100-two-nodes-node-bound"),
    pytest.param(gpu_a2a, id="h100-node-alltoall"),
    pytest.param(cross_a2a, id="h100-16-nodes-alltoall"),
]


@pytest.mark.parametrize("case", CASES)
def test_book_answer(case: BookCase) -> None:
    # the book's formula reproduces the book's stated answer (up to its rounding) ...
    assert case.formula_s == pytest.approx(case.book_answer_s, rel=case.book_rtol, abs=1e-12)
    # ... and our model reproduces the formula
    mesh = DeviceMesh.create(load_preset(case.hardware), case.mesh, case.topology)
    cost = collective_cost(
        mesh, case.kind, case.axes, elements_in_per_chip=case.elements_in_per_chip, dtype="bf16"
    )
    if case.nccl_latency_s is None:  # TPU: the larger of the two terms
        assert cost.time_s == pytest.approx(case.formula_s, rel=1e-9)
    else:  # GPU: NCCL adds its latency to the book's bandwidth term
        assert cost.bandwidth_s == pytest.approx(case.formula_s, rel=1e-9)
        assert cost.latency_s == pytest.approx(case.nccl_latency_s, rel=1e-9)
        assert cost.time_s == pytest.approx(case.formula_s + case.nccl_latency_s, rel=1e-9)
    assert cost.bound is case.bound


def test_gpu_allreduce_latency_is_nccls_formula_by_hand() -> None:
    """AllReduce over 4 nodes x 8 GPUs of h100 on a small buffer: NCCL's latency
    8.4 + (62 - 6) x 3.4 + 6 x 14 = 282.8 us (2(N-1) = 62 ring steps over all 32 ranks, 6 of
    them across nodes), plus bytes/bandwidth; the old per-level max() would say 2 x 14 us."""
    mesh = DeviceMesh.create(load_preset("h100"), "node=4,gpu=8", "4x8")
    elements = 4096
    cost = collective_cost(
        mesh, Collective.ALL_REDUCE, ("node", "gpu"), elements_in_per_chip=elements, dtype="bf16"
    )
    latency = 8.4 * US + (62 - 6) * 3.4 * US + 6 * 14 * US
    assert latency == pytest.approx(282.8 * US)
    assert cost.latency_s == pytest.approx(latency, rel=1e-12)
    v = elements * BF16
    node_level = 2 * v * 7 / (8 * W_GPU)  # AllReduce = 2 x AllGather's V(D-1)/(D W)
    leaf_level = 2 * v * 3 / (4 * W_NODE)
    assert cost.bandwidth_s == pytest.approx(max(node_level, leaf_level), rel=1e-12)
    assert cost.time_s == pytest.approx(latency + max(node_level, leaf_level), rel=1e-12)
    assert cost.bound is Bound.LATENCY


def test_tpu_ici_keeps_the_books_max() -> None:
    """On ICI the terms do not add: the larger one is the time (sharding.md)."""
    mesh = DeviceMesh.create(load_preset("tpu-v5e"), "x=4,y=4", "4x4")
    cost = collective_cost(
        mesh, Collective.ALL_GATHER, ("y",), elements_in_per_chip=1, dtype="bf16"
    )
    assert cost.time_s == max(cost.bandwidth_s, cost.latency_s) == cost.latency_s == 3 * US


def test_quiz3_sharded_inner_axis_within_one_scalable_unit() -> None:
    """gpus.md pop quiz 3: AllGather_X(bf16[D_X, F_Y]) with Y the inner axis over one SU.
    For Y <= 8 it costs 2DF·31/(32·400e9) whatever Y is; for Y > 8 about 2DF/(Y·50 GB/s)."""
    h100 = load_preset("h100")
    d, f = 8192, 32768
    full_bytes = 2 * d * f
    for y in (1, 2, 4, 8):
        x = 256 // y
        mesh = DeviceMesh.create(h100, f"x={x},y={y}", "32x8")
        cost = collective_cost(
            mesh, Collective.ALL_GATHER, ("x",), elements_in_per_chip=d // x * f // y, dtype="bf16"
        )
        assert cost.bandwidth_s == pytest.approx(full_bytes * 31 / (32 * 400e9), rel=1e-9)
    for y in (16, 32, 64):
        x = 256 // y
        nodes_spanned = 256 // 8 // (y // 8)  # the x-group has one GPU in each of these nodes
        mesh = DeviceMesh.create(h100, f"x={x},y={y}", "32x8")
        cost = collective_cost(
            mesh, Collective.ALL_GATHER, ("x",), elements_in_per_chip=d // x * f // y, dtype="bf16"
        )
        precise = (full_bytes / y) * (nodes_spanned - 1) / (nodes_spanned * 50e9)
        assert cost.bandwidth_s == pytest.approx(precise, rel=1e-9)
        assert cost.bandwidth_s == pytest.approx(
            full_bytes / (y * 50e9), rel=1 / nodes_spanned + 1e-9
        )


def test_alltoall_is_a_quarter_of_allgather_on_a_tpu_ring() -> None:
    """sharding.md: on a bidirectional ring an AllToAll costs V/(4·W), a quarter of an
    AllGather of the same array (in the bandwidth-bound regime)."""
    mesh = DeviceMesh.create(load_preset("tpu-v5p"), "x=4,y=4,z=4", "4x4x4")
    elements = 2**22  # per chip: 8 MiB of bf16
    gather = collective_cost(
        mesh, Collective.ALL_GATHER, ("x",), elements_in_per_chip=elements, dtype="bf16"
    )
    a2a = collective_cost(
        mesh, Collective.ALL_TO_ALL, ("x",), elements_in_per_chip=elements, dtype="bf16"
    )
    v = elements * 4 * BF16
    assert gather.time_s == pytest.approx(v / 1.8e11)
    assert a2a.time_s == pytest.approx(v / (4 * 1.8e11))


def test_alltoall_on_a_3d_torus_uses_the_longest_axis() -> None:
    """sharding.md: AllToAll on an AxBxC torus costs V·max(A,B,C)/(4·N·W)."""
    mesh = DeviceMesh.create(load_preset("tpu-v5p"), "x=4,y=4,z=8", "4x4x8")
    elements = 2**20
    cost = collective_cost(
        mesh, Collective.ALL_TO_ALL, ("x", "y", "z"), elements_in_per_chip=elements, dtype="bf16"
    )
    n = 4 * 4 * 8
    v = elements * BF16 * n
    assert cost.time_s == pytest.approx(v * 8 / (4 * n * 1.8e11))


def test_gpu_in_node_alltoall_is_twice_as_fast_as_tpu_ring_relative_to_bandwidth() -> None:
    """gpus.md: within a node an AllToAll is B/(8W) against a TPU ring's B/(4W)."""
    gpu = DeviceMesh.create(load_preset("h100"), "x=8", "1x8")
    elements = 2**24
    cost = collective_cost(
        gpu, Collective.ALL_TO_ALL, ("x",), elements_in_per_chip=elements, dtype="bf16"
    )
    v = elements * BF16 * 8
    assert cost.bandwidth_s * W_GPU / v == pytest.approx((8 - 1) / 8**2)
    assert math.isclose((8 - 1) / 8**2, 1 / 8, rel_tol=0.13)


def test_bytes_sent_per_chip_follow_the_ring_algorithms() -> None:
    """(g-1)/g of the gathered array for AllGather; twice (g-1)/g of the buffer for AllReduce."""
    mesh = DeviceMesh.create(load_preset("tpu-v5e"), "x=4,y=4", "4x4")
    gather = collective_cost(
        mesh, Collective.ALL_GATHER, ("y",), elements_in_per_chip=1000, dtype="f32"
    )
    assert gather.bytes_sent_per_chip == 3 / 4 * 4000 * 4
    assert gather.elements_out_per_chip == 4000
    reduce = collective_cost(
        mesh, Collective.ALL_REDUCE, ("y",), elements_in_per_chip=1000, dtype="f32"
    )
    assert reduce.bytes_sent_per_chip == 2 * 3 / 4 * 4000
    scatter = collective_cost(
        mesh, Collective.REDUCE_SCATTER, ("y",), elements_in_per_chip=1000, dtype="f32"
    )
    assert scatter.elements_out_per_chip == 250
    assert scatter.bytes_sent_per_chip == 3 / 4 * 4000
