"""Programs against the scaling book's training rules (training.md, gpus.md; the digest in
shared/reference/scaling_book.md section 4). Each expected value is computed here from the
book's formula with the preset's own numbers, then checked against the book's number."""

from __future__ import annotations

import dataclasses
import math

import pytest

from sharding_roofline import DeviceMesh, load_preset
from sharding_roofline.hardware import Wraparound
from sharding_roofline.program.analysis import critical_batch, max_model_parallel
from sharding_roofline.program.autodiff import OptimizerSpec, training
from sharding_roofline.program.evaluate import ProgramPlan, evaluate
from sharding_roofline.program.layers import LayerKind, LayerSpec, build_layer
from sharding_roofline.program.strategies import place

V5P_C = 4.59e14  # bf16 FLOPs/s (tpus.md)
V5P_W = 1.8e11  # bidirectional ICI bandwidth per axis (one wrapped ring)
ALPHA = V5P_C / V5P_W  # the book's 2550
H100_C = 9.89e14
H100_NVLINK = 4.5e11  # per-GPU egress inside a node
H100_NODE = 4e11  # node egress (8 x 50 GB/s NICs)
# NCCL's ring model (src/graph/tuning.cc, v2.30): base 8.4 us per collective, 3.4 us per NVLink
# step, 14 us per network step; an all-reduce over N ranks takes 2(N-1) steps
NCCL_BASE_S, NCCL_NVLINK_STEP_S, NCCL_NET_STEP_S = 8.4e-6, 3.4e-6, 14e-6


def nccl_all_reduce_latency_s(ranks: int, nodes: int) -> float:
    """One ring all-reduce over ``ranks`` GPUs in ``nodes`` nodes: 2(nodes-1) of its steps
    cross the network, the rest NVLink."""
    steps, net = 2 * (ranks - 1), 2 * (nodes - 1)
    return NCCL_BASE_S + (steps - net) * NCCL_NVLINK_STEP_S + net * NCCL_NET_STEP_S


def dp_latency_tokens(latency_s: float, d: int, f: int) -> float:
    """Tokens per chip the two gradient all-reduces' latency adds to the book's crossover:
    the backward pass computes 8DF FLOPs per token, so 2L = 8DF·t/C gives t = L·C/(4DF)."""
    return latency_s * H100_C / (4 * d * f)


def mlp(d: int, f: int, tokens: int, *, backward: bool = True) -> object:
    """The book's MLP block (W_in[D, F], W_out[F, D]), token-only."""
    forward = build_layer(LayerSpec(kind=LayerKind.MLP, d=d, f=f, batch_tokens=tokens))
    return training(forward) if backward else forward


def plan_of(program: object, mesh: DeviceMesh, strategy: str, **kw: object) -> ProgramPlan:
    return evaluate(program, mesh, place(program, mesh, strategy, **kw))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def cube() -> DeviceMesh:
    return DeviceMesh.create(load_preset("tpu-v5p"), "x=16,y=16,z=16", "16x16x16")


def test_preset_numbers_are_the_books() -> None:
    chip = load_preset("tpu-v5p")
    assert chip.chip.peak_flops_per_s["bfloat16"] == V5P_C
    assert chip.ici is not None
    assert chip.ici.link_bytes_per_s_bidirectional == V5P_W
    assert round(ALPHA) == 2550


@pytest.mark.parametrize("strategy", ["fsdp=x", "dp=x"])
def test_data_parallel_on_one_axis_is_compute_bound_above_2550_tokens_per_chip(
    cube: DeviceMesh, strategy: str
) -> None:
    """DP: T_math = 8BDF/(X·C) against T_comms = 8DF/W in the backward pass; FSDP: 4BDF/XC
    against 4DF/W forward (and 8/8 backward). Either way B/X > C/W = 2550 per chip of the
    axis. The other two axes stay idle and unused (--no-idle-axes), as in the book."""
    program = mlp(8192, 32768, 2**22)
    plan = plan_of(program, cube, strategy, idle_axes=False)
    cross = critical_batch(plan)
    assert cross.tokens is not None
    per_chip_of_the_axis = cross.tokens / 16
    assert per_chip_of_the_axis == pytest.approx(ALPHA, rel=1e-6)
    assert per_chip_of_the_axis == pytest.approx(2550, rel=1e-3)
    assert cross.pass_name == ("backward" if strategy.startswith("dp") else "forward")


@pytest.mark.parametrize("strategy", ["fsdp=x+y+z", "dp=x+y+z"])
def test_over_three_axes_the_critical_batch_is_850(cube: DeviceMesh, strategy: str) -> None:
    """Spanning M_X = 3 axes triples the bandwidth: B/X > C/(3W) = 850 (7.6M tokens a pod)."""
    plan = plan_of(mlp(8192, 32768, 2**22), cube, strategy)
    cross = critical_batch(plan)
    assert cross.tokens_per_chip == pytest.approx(ALPHA / 3, rel=1e-6)
    assert cross.tokens_per_chip == pytest.approx(850, rel=1e-3)


def test_fsdp_moves_the_weights_the_book_says(cube: DeviceMesh) -> None:
    """FSDP comm per layer: 4DF forward (gather both weights), 8DF backward (gather them
    again, reduce-scatter the gradients), in bf16 bytes over X chips' rings."""
    d, f = 8192, 32768
    plan = plan_of(mlp(d, f, 2**22), cube, "fsdp=x+y+z")
    bandwidth = 3 * V5P_W  # three wrapped axes
    assert plan.pass_cost("forward").comm_s == pytest.approx(2 * (2 * d * f) / bandwidth)
    assert plan.pass_cost("backward").comm_s == pytest.approx(4 * (2 * d * f) / bandwidth)
    kinds = sorted(s.kind.value for s in plan.collectives if s.kind is not None)
    assert kinds == ["all-gather"] * 4 + ["reduce-scatter"] * 2


def test_tensor_parallel_limit_is_f_over_2550(cube: DeviceMesh) -> None:
    """TP: T_math = 4BDF/(Y·C), T_comms = 4BD/W, so compute-bound iff Y < M_Y·F·W/C. For
    LLaMA-3-70B (F = 28672) that is 11.2: fine at 8-way, communication-bound at 16."""
    d, f = 8192, 28672
    expected = f * V5P_W / V5P_C
    assert expected == pytest.approx(11.24, abs=0.01)
    for tp, topology, mesh_text in ((8, "16x16x8", "x=256,y=8"), (16, "16x16x16", "x=256,y=16")):
        mesh = DeviceMesh.create(load_preset("tpu-v5p"), mesh_text, topology)
        plan = plan_of(mlp(d, f, 2**22, backward=False), mesh, "dp=x,tp=y")
        assert max_model_parallel(plan) == pytest.approx(expected, rel=1e-6)
        forward = plan.pass_cost("forward")
        assert (forward.compute_s > forward.comm_s) is (tp == 8)


def test_training_keeps_the_forward_pass_tp_limit(cube: DeviceMesh) -> None:
    """Backward: 8BDF/(Y·C) against 4BD/W (one all-reduce of dx), so 2F/α; the forward
    pass's F/α is the tighter one."""
    mesh = DeviceMesh.create(load_preset("tpu-v5p"), "x=256,y=16", "16x16x16")
    plan = plan_of(mlp(8192, 28672, 2**22), mesh, "dp=x,tp=y")
    assert max_model_parallel(plan) == pytest.approx(28672 / ALPHA, rel=1e-6)


def test_sequence_parallel_moves_the_same_bytes_as_megatron() -> None:
    """An all-reduce is a reduce-scatter plus an all-gather: TP+SP's gather before and
    scatter after cost what TP's all-reduce costs, forward and backward; the activations
    between blocks take 1/Y of the memory."""
    mesh = DeviceMesh.create(load_preset("tpu-v5p"), "x=16,y=16,z=16", "16x16x16")
    program = mlp(8192, 28672, 2**20)
    tp = plan_of(program, mesh, "fsdp=x+y,tp=z")
    sp = plan_of(program, mesh, "fsdp=x+y,sp=z")
    for name in ("forward", "backward"):
        assert sp.pass_cost(name).comm_s == pytest.approx(tp.pass_cost(name).comm_s)
    tp_kinds = {s.kind.value for s in tp.collectives if s.axes == ("z",)}
    sp_kinds = {s.kind.value for s in sp.collectives if s.axes == ("z",)}
    assert tp_kinds == {"all-reduce"}
    assert sp_kinds == {"all-gather", "reduce-scatter"}


def test_fsdp_plus_tp_comm_to_compute_ratio_at_the_optimal_split() -> None:
    """FSDP+TP: T_FSDP = 4DF/(Y·W·M_X), T_TP = 4BD/(X·W·M_Y), T_math = 4BDF/(N·C); at
    X_opt = sqrt(B·M_X·N/(F·M_Y)) the ratio T_math/T_comms = sqrt(B·F·M_X·M_Y)/(α·sqrt(N)),
    compute-bound iff B/N > α²/(M_X·M_Y·F) (about 100 tokens per chip at F = 32k).

    The book lets the FSDP gathers (over X's links) and the TP collectives (over Y's)
    overlap each other, T_comms = max(T_FSDP, T_TP): the plan's busiest-link figure
    (``comm_lower_s``); one after the other they take twice as long (``comm_s``).

    On a v5p 16x16x8 (N = 2048), FSDP over the two 16-axes (X = 256, M_X = 2) and TP over
    the 8-axis (Y = 8, M_Y = 1); B chosen so that X_opt is 256 exactly."""
    d, f = 8192, 32768
    mesh = DeviceMesh.create(load_preset("tpu-v5p"), "x=16,y=16,z=8", "16x16x8")
    n, x, m_x, m_y = 2048, 256, 2, 1
    tokens = x * x * f * m_y // (m_x * n)  # X_opt = 256
    assert math.sqrt(tokens * m_x * n / (f * m_y)) == pytest.approx(x)
    plan = plan_of(mlp(d, f, tokens, backward=False), mesh, "fsdp=x+y,tp=z")
    forward = plan.pass_cost("forward")
    book_ratio = math.sqrt(tokens * f * m_x * m_y) / (ALPHA * math.sqrt(n))
    assert forward.compute_s / forward.comm_lower_s == pytest.approx(book_ratio, rel=1e-3)
    assert forward.comm_s == pytest.approx(2 * forward.comm_lower_s)
    bound = ALPHA**2 / (m_x * m_y * f)
    assert bound == pytest.approx(99.2, abs=0.05)  # the book's "about 100"
    assert (tokens / n > bound) is (forward.compute_s > forward.comm_lower_s)


def test_fsdp_plus_tp_optimum_on_a_cube() -> None:
    """On a 4x4x4 v5p (N = 64) with B = 48k tokens and F = 32768 the book's X_opt is 13.9
    (M_X/M_Y = 2); of the splits the cube allows, FSDP over two axes (X = 16) and TP over
    one (Y = 4) is the fastest FSDP+TP."""
    d, f, tokens = 8192, 32768, 49152
    x_opt = math.sqrt(tokens * 2 * 64 / f)
    assert x_opt == pytest.approx(13.9, abs=0.05)
    mesh = DeviceMesh.create(load_preset("tpu-v5p"), "x=4,y=4,z=4", "4x4x4")
    program = mlp(d, f, tokens, backward=False)
    times = {
        s: plan_of(program, mesh, s).pass_cost("forward").lower_bound_s
        for s in ("fsdp=x+y,tp=z", "fsdp=x,tp=y+z")
    }
    assert min(times, key=times.__getitem__) == "fsdp=x+y,tp=z"


def _h100(nodes: int) -> DeviceMesh:
    return DeviceMesh.create(load_preset("h100"), f"node={nodes},gpu=8", f"{nodes}x8")


def test_gpu_data_parallel_in_a_node_is_2200_per_gpu() -> None:
    """In a node: T_comms = 8DF·(N-1)/(N·W_GPU) against T_math = 8BDF/(X·C); the book drops
    (N-1)/N and quotes C/W = 2200 tokens per GPU. NCCL's latency (56 us per all-reduce)
    adds L·C/(4DF) = 52 tokens per GPU."""
    mesh = DeviceMesh.create(load_preset("h100"), "gpu=8", "1x8")
    plan = plan_of(mlp(8192, 32768, 2**20), mesh, "dp=gpu")
    cross = critical_batch(plan)
    alpha = H100_C / H100_NVLINK
    latency = dp_latency_tokens(nccl_all_reduce_latency_s(8, 1), 8192, 32768)
    assert cross.tokens_per_chip == pytest.approx(alpha * 7 / 8 + latency, rel=1e-6)
    assert (cross.tokens_per_chip - latency) * 8 / 7 == pytest.approx(2200, rel=0.01)


def test_gpu_data_parallel_across_nodes_is_2475_per_gpu() -> None:
    """Across nodes each node's 400 GB/s of NICs carries the reduction: B/X > C/W_node =
    2475 per GPU, times (D-1)/D for D nodes under the leaf (31/32 on 64 nodes)."""
    plan = plan_of(mlp(8192, 32768, 2**22), _h100(64), "dp=node+gpu")
    cross = critical_batch(plan)
    alpha = H100_C / H100_NODE  # 9.89e14 / 4e11 = 2472.5; the book rounds C to 990e12
    assert alpha == pytest.approx(2475, rel=2e-3)
    # a ring over 512 GPUs: 1022 steps, 126 of them between nodes (4.8 ms: NCCL would
    # switch to a tree here; the ring's latency is the model's, and it is added)
    latency = dp_latency_tokens(nccl_all_reduce_latency_s(512, 64), 8192, 32768)
    assert cross.tokens_per_chip == pytest.approx(alpha * 31 / 32 + latency, rel=1e-6)
    assert cross.tokens_per_chip - latency == pytest.approx(2475, rel=0.04)


def test_two_node_data_parallel_is_1237_per_gpu() -> None:
    """DP over 2 nodes, TP inside each: the (X-1)/X factor halves the requirement,
    B/N > α·(X-1)/X = 1237 (why 2-way DP is common)."""
    plan = plan_of(mlp(8192, 32768, 2**20), _h100(2), "dp=node,tp=gpu")
    cross = critical_batch(plan, axes=("node",))
    latency = dp_latency_tokens(nccl_all_reduce_latency_s(2, 2), 8192, 32768)
    assert cross.tokens_per_chip == pytest.approx(H100_C / H100_NODE / 2 + latency, rel=1e-6)
    assert cross.tokens_per_chip - latency == pytest.approx(1237, rel=1e-3)


def test_gpu_tensor_parallel_limit_is_f_over_2200() -> None:
    """TP in a node: Y < F·W/C = F/2200; F = 28k gives about 11-way (in practice 8)."""
    d, f, tokens = 8192, 28672, 2**16
    mesh = DeviceMesh.create(load_preset("h100"), "gpu=8", "1x8")
    plan = plan_of(mlp(d, f, tokens, backward=False), mesh, "tp=gpu")
    # the forward pass: 4BDF FLOPs over Y GPUs against one all-reduce of the bf16 output
    # (V = 2BD bytes; a switched ring moves 2V(N-1)/N) plus NCCL's latency: the degree at
    # which they are equal, with the all-reduce's time held at its value on 8 GPUs
    all_reduce_s = 2 * (2 * tokens * d) * 7 / 8 / H100_NVLINK + nccl_all_reduce_latency_s(8, 1)
    expected = 4 * tokens * d * f / H100_C / all_reduce_s
    assert max_model_parallel(plan) == pytest.approx(expected, rel=1e-6)
    bandwidth_only = f * H100_NVLINK / H100_C * 8 / 7
    assert bandwidth_only * 7 / 8 == pytest.approx(f / 2200, rel=0.01)
    assert max_model_parallel(plan) < bandwidth_only  # latency only lowers the limit


def test_pure_data_parallel_memory_is_10_bytes_per_param(cube: DeviceMesh) -> None:
    """bf16 parameters (2 bytes) plus AdamW's two fp32 moments (8 bytes), replicated: the
    largest model pure DP fits is HBM/10 (about 9B parameters on v5p). The gradients add
    their 2 bytes; a fp32 master copy 4 more."""
    program = mlp(8192, 32768, 2**22)
    params = 2 * 8192 * 32768
    book = OptimizerSpec(master_dtype="")
    plan = evaluate(program, cube, place(program, cube, "dp=x+y+z"), optimizer=book)
    assert (plan.memory.params + plan.memory.optimizer) / params == pytest.approx(10)
    assert plan.memory.grads / params == pytest.approx(2)
    mixed = evaluate(program, cube, place(program, cube, "dp=x+y+z"))
    assert mixed.memory.optimizer / params == pytest.approx(12)


@pytest.mark.parametrize(
    ("strategy", "params", "grads", "optimizer"),
    [
        ("dp=x", 1, 1, 1),
        ("dp=x,zero=1", 1, 1, 16),
        ("dp=x,zero=2", 1, 16, 16),
        ("fsdp=x", 16, 16, 16),
    ],
)
def test_zero_stages_shard_what_they_say(
    cube: DeviceMesh, strategy: str, params: int, grads: int, optimizer: int
) -> None:
    """ZeRO-1 shards the optimizer state, ZeRO-2 the gradients too, ZeRO-3 (FSDP) the
    weights as well: each divides its component by the 16 chips of the axis."""
    program = mlp(8192, 32768, 2**22)
    plan = plan_of(program, cube, strategy)
    n = 2 * 8192 * 32768
    assert plan.memory.params == pytest.approx(2 * n / params)
    assert plan.memory.grads == pytest.approx(2 * n / grads)
    assert plan.memory.optimizer == pytest.approx(12 * n / optimizer)


def test_zero_costs_what_dp_costs(cube: DeviceMesh) -> None:
    """ZeRO-1/2 reduce-scatter the gradients and all-gather the updated weights: an
    all-reduce's bytes, split across the backward and optimizer passes (with the idle y
    and z left idle: their links would speed the gather up)."""
    forward = build_layer(LayerSpec(kind=LayerKind.MLP, d=8192, f=32768, batch_tokens=2**22))
    program = training(forward, optimizer=True)
    dp = plan_of(program, cube, "dp=x", idle_axes=False)
    zero = plan_of(program, cube, "dp=x,zero=2", idle_axes=False)
    assert zero.cost.comm_s == pytest.approx(dp.cost.comm_s)
    assert zero.pass_cost("optimizer").comm_s == pytest.approx(dp.cost.comm_s / 2)


def test_a_one_axis_ring_without_wraparound_doubles_the_gather() -> None:
    """Losing the wraparound doubles most communication (tpus.md): FSDP on a v5p line of
    16 chips gathers at (X-1)/X·V/W_uni, twice the ring's V/W_bidi (times 15/16)."""
    v5p = load_preset("tpu-v5p")
    assert v5p.ici is not None
    ring = dataclasses.replace(v5p, ici=dataclasses.replace(v5p.ici, wraparound=Wraparound.ALWAYS))
    program = mlp(8192, 32768, 2**20, backward=False)
    line = plan_of(program, DeviceMesh.create(v5p, "x=16", "16"), "fsdp=x")
    wrapped = plan_of(program, DeviceMesh.create(ring, "x=16", "16"), "fsdp=x")
    assert line.cost.comm_s / wrapped.cost.comm_s == pytest.approx(2 * 15 / 16)
