"""The planner: the book's four cases, its strategy comparisons, and properties of the search."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sharding_roofline import (
    Collective,
    DeviceMesh,
    Einsum,
    Overlap,
    Plan,
    PlanError,
    Planner,
    SpecError,
    collective_cost,
    crossover,
    estimate,
    load_preset,
    plan,
)
from sharding_roofline.hardware import Wraparound

V5P_C = 4.59e14  # bf16 FLOPs/s
V5P_W = 1.8e11  # bidirectional ICI per link
ALPHA = V5P_C / V5P_W  # 2550


def kinds(p: Plan) -> list[tuple[str, str, tuple[str, ...]]]:
    return [(s.operand, s.kind.value, s.axes) for s in p.collectives if s.kind is not None]


def find(ranking_plans: tuple[Plan, ...], **sigma: tuple[str, ...]) -> Plan:
    for candidate in ranking_plans:
        assignment = dict(candidate.assignment)
        if all(assignment[letter] == axes for letter, axes in sigma.items()):
            return candidate
    raise AssertionError(f"no strategy with {sigma}")


def v5p_ring(size: int) -> DeviceMesh:
    """One v5p axis of ``size`` with its wraparound, as an axis of a whole 4x4x4 cube has
    (W = 1.8e11 B/s bidirectional), modelled on its own: a v5p whose every axis wraps."""
    v5p = load_preset("tpu-v5p")
    assert v5p.ici is not None
    ringed = dataclasses.replace(
        v5p, ici=dataclasses.replace(v5p.ici, wraparound=Wraparound.ALWAYS)
    )
    return DeviceMesh.create(ringed, f"x={size}", str(size))


@pytest.fixture(scope="module")
def ring4() -> DeviceMesh:
    return v5p_ring(4)


# -- the book's four cases (sharding.md) ---------------------------------------------------


def test_case1_contracting_dim_unsharded_needs_nothing() -> None:
    mesh = DeviceMesh.create(load_preset("tpu-v5e"), "x=2,y=4", "2x4")
    mm = Einsum.create("ij,jk->ik", "i=1024,j=2048,k=4096")
    p = estimate(mm, mesh, lhs="x,None", rhs="None,y", out="x,y")
    assert p.collectives == ()
    assert p.cost.flops == 2 * 1024 * 2048 * 4096 / 8


def test_case2_gathers_the_sharded_input_or_reduces_whichever_is_cheaper(ring4: DeviceMesh) -> None:
    """A[I, J_x]·B[J, K] -> C[I, K]: all-gather A (bytes(A)/W), or slice B for free, multiply
    locally and all-reduce C (2·bytes(C)/W). With K >> J the gather wins; with J >> K the
    reduction wins (sharding.md Q9: their costs scale as M/K)."""
    wide = Einsum.create("ij,jk->ik", "i=256,j=1024,k=65536")
    p = estimate(wide, ring4, lhs="None,x", rhs="None,None", out="None,None")
    assert kinds(p) == [("lhs", "all-gather", ("x",))]
    assert p.cost.comm_s == pytest.approx(2 * 256 * 1024 / V5P_W)
    deep = Einsum.create("ij,jk->ik", "i=256,j=65536,k=1024")
    p = estimate(deep, ring4, lhs="None,x", rhs="None,None", out="None,None")
    assert kinds(p) == [("out", "all-reduce", ("x",))]
    assert p.cost.comm_s == pytest.approx(2 * (2 * 256 * 1024) / V5P_W)
    assert any(step.kind is None and step.operand == "rhs" for step in p.steps)  # the free slice


def test_case3_reduces_with_allreduce_or_reduce_scatter(ring4: DeviceMesh) -> None:
    mm = Einsum.create("ij,jk->ik", "i=4096,j=8192,k=4096")
    c_bytes = 2 * 4096 * 4096
    full = estimate(mm, ring4, lhs="None,x", rhs="x,None", out="None,None")
    assert kinds(full) == [("out", "all-reduce", ("x",))]
    assert full.cost.comm_s == pytest.approx(2 * c_bytes / V5P_W)
    scattered = estimate(mm, ring4, lhs="None,x", rhs="x,None", out="None,x")
    assert kinds(scattered) == [("out", "reduce-scatter", ("x",))]
    assert scattered.cost.comm_s == pytest.approx(c_bytes / V5P_W)
    assert str(scattered.operation) == "lhs[I, J_x] · rhs[J_x, K] -> out[I, K] {U_x}"


def test_case4_gathers_one_input(ring4: DeviceMesh) -> None:
    """A[I_x, J]·B[J, K_x] is invalid as is; gather B to get C[I_x, K], or A for C[I, K_x]."""
    mm = Einsum.create("ij,jk->ik", "i=4096,j=1024,k=8192")
    keep_i = estimate(mm, ring4, lhs="x,None", rhs="None,x", out="x,None")
    assert kinds(keep_i) == [("rhs", "all-gather", ("x",))]
    assert keep_i.cost.comm_s == pytest.approx(2 * 1024 * 8192 / V5P_W)
    keep_k = estimate(mm, ring4, lhs="x,None", rhs="None,x", out="None,x")
    assert kinds(keep_k) == [("lhs", "all-gather", ("x",))]
    assert keep_k.cost.comm_s == pytest.approx(2 * 4096 * 1024 / V5P_W)


# -- the book's strategy comparison on v5p (sharding.md Q4) -----------------------------------


@pytest.mark.parametrize(
    ("b", "d", "f"), [(1024, 8192, 32768), (512, 8192, 8192), (4096, 16384, 8192)]
)
def test_allgather_then_matmul_vs_matmul_then_allreduce(
    ring4: DeviceMesh, b: int, d: int, f: int
) -> None:
    """X[B, D]·Y[D_X, F] -> Z[B, F]. S1 gathers Y: max(2BDF/C, 2DF/W). S2 slices X, multiplies
    and all-reduces: max(2BDF/(X·C), 4BF/W)."""
    x = 4
    mm = Einsum.create("bd,df->bf", {"b": b, "d": d, "f": f})
    ranking = Planner(mm, ring4, lhs="None,None", rhs="x,None", out="None,None").search(top=None)
    s1 = find(ranking.strategies, b=(), d=(), f=())
    s2 = find(ranking.strategies, b=(), d=("x",), f=())
    t1_math, t1_comm = 2 * b * d * f / V5P_C, 2 * d * f / V5P_W
    t2_math, t2_comm = 2 * b * d * f / (x * V5P_C), 4 * b * f / V5P_W
    assert (s1.cost.compute_s, s1.cost.comm_s) == pytest.approx((t1_math, t1_comm))
    assert (s2.cost.compute_s, s2.cost.comm_s) == pytest.approx((t2_math, t2_comm))
    # the book's conclusions: S1 is comm-bound iff B < C/W = 2550 ...
    assert (t1_comm > t1_math) == (b < ALPHA)
    assert (s1.cost.comm_s > s1.cost.compute_s) == (b < ALPHA)
    # ... and below it S2's comms beat S1's iff D > 2B
    if b < ALPHA:
        assert (s2.cost.comm_s < s1.cost.comm_s) == (d > 2 * b)
    # the planner's choice is no worse than either
    assert ranking.best.cost.lower_bound_s <= min(s1.cost.lower_bound_s, s2.cost.lower_bound_s)


def test_crossovers_are_the_books_thresholds(ring4: DeviceMesh) -> None:
    """S1 turns compute-bound at B = C/W = 2550; S2 at D = 2·X·C/W (X < D/5100 for X=2)."""
    mm = Einsum.create("bd,df->bf", "b=1024,d=8192,f=32768")
    ranking = Planner(mm, ring4, lhs="None,None", rhs="x,None", out="None,None").search(top=None)
    s1 = crossover(find(ranking.strategies, b=(), d=(), f=()), "b")
    assert s1.size == pytest.approx(ALPHA, rel=1e-6)
    assert s1.comm_bound_below
    s2 = crossover(find(ranking.strategies, b=(), d=("x",), f=()), "d")
    assert s2.size == pytest.approx(2 * 4 * ALPHA, rel=1e-6)
    none = crossover(find(ranking.strategies, b=(), d=("x",), f=()), "b")
    assert none.size is None  # S2's all-reduce grows with B as fast as its compute


def test_critical_intensity_from_plans() -> None:
    """An unsharded bf16 matmul with B << D, F turns compute-bound at B ≈ C/W_hbm (≈240 on
    v5e): the plan's HBM time equals its compute time there."""
    mesh = DeviceMesh.create(load_preset("tpu-v5e"), "x=1", "1")
    for b, bound in ((128, "hbm"), (512, "compute")):
        p = estimate(
            Einsum.create("bd,df->bf", {"b": b, "d": 16384, "f": 16384}),
            mesh,
            lhs="None,None",
            rhs="None,None",
            out="None,None",
        )
        assert p.cost.bottleneck.value == bound


# -- the search -----------------------------------------------------------------------------

EINSUMS = ["bd,df->bf", "btd,df->btf", "bhqd,bhkd->bhqk", "bsd,dnh->bsnh", "ij,jk->ik"]
MESHES = [
    ("tpu-v5e", "2x4", "x=2,y=4"),
    ("tpu-v5p", "2x2x2", "x=2,y=2,z=2"),
    ("h100", "2x8", "dp=2,tp=8"),
    ("tpu-v5e", "16x16", "x=16,y=16"),
]


@st.composite
def problems(draw: st.DrawFn) -> tuple[Einsum, DeviceMesh]:
    equation = draw(st.sampled_from(EINSUMS))
    hardware, topology, mesh_text = draw(st.sampled_from(MESHES))
    letters = sorted(set(equation.replace(",", "").replace("->", "")))
    dims = {c: draw(st.sampled_from([16, 32, 48, 64, 256])) for c in letters}
    return Einsum.create(equation, dims), DeviceMesh.create(
        load_preset(hardware), mesh_text, topology
    )


@given(problems())
def test_total_flops_equal_unsharded_flops_times_replication(
    problem: tuple[Einsum, DeviceMesh],
) -> None:
    mm, mesh = problem
    sizes = {a.name: a.size for a in mesh.axes}
    for p in plan(mm, mesh, top=None, check_memory=False).strategies:
        used = math.prod(sizes[a] for _, axes in p.assignment for a in axes)
        replication = mesh.num_devices // used
        assert p.cost.flops * mesh.num_devices == mm.flops * replication


@given(problems(), st.sampled_from(list(Overlap)))
def test_the_best_plan_is_no_worse_than_any_candidate(
    problem: tuple[Einsum, DeviceMesh], overlap: Overlap
) -> None:
    mm, mesh = problem
    ranking = plan(mm, mesh, top=None, overlap=overlap, check_memory=False)
    times = [p.cost.time_s(overlap) for p in ranking.strategies]
    assert times == sorted(times)
    assert ranking.num_valid == len(ranking.strategies)
    top = plan(mm, mesh, top=3, overlap=overlap, check_memory=False)
    assert top.best.cost.time_s(overlap) == pytest.approx(min(times))


@given(problems())
def test_no_sharded_contraction_and_matching_output_needs_no_collective(
    problem: tuple[Einsum, DeviceMesh],
) -> None:
    mm, mesh = problem
    spec = mm.spec
    for p in plan(mm, mesh, top=None, check_memory=False).strategies:
        assignment = dict(p.assignment)
        if any(assignment[c] for c in spec.summed):
            continue
        local_out = tuple(assignment[c] for c in spec.out)
        if (
            p.out.dims == local_out
            and p.lhs.dims == p.operation.lhs.dims
            and p.rhs.dims == p.operation.rhs.dims
        ):
            assert p.collectives == ()
            assert p.cost.comm_s == 0


@given(problems())
def test_estimate_of_a_ranked_strategy_reproduces_it(problem: tuple[Einsum, DeviceMesh]) -> None:
    mm, mesh = problem
    for p in plan(mm, mesh, top=4, check_memory=False).strategies:
        again = estimate(mm, mesh, lhs=p.lhs.text(), rhs=p.rhs.text(), out=p.out.text())
        assert again.cost.lower_bound_s <= p.cost.lower_bound_s * (1 + 1e-12)


def test_ranking_is_deterministic() -> None:
    mesh = DeviceMesh.create(load_preset("tpu-v5e"), "x=4,y=4", "4x4")
    mm = Einsum.create("bd,df->bf", "b=8192,d=8192,f=32768")
    first = [p.strategy for p in plan(mm, mesh, top=None).strategies]
    second = [p.strategy for p in plan(mm, mesh, top=None).strategies]
    assert first == second


def test_memory_check_rejects_what_does_not_fit_and_explains() -> None:
    """Book sharding.md Q7: two bf16[8192, 32768] weights are 536 MB each; with 16 GB per v5e
    chip an unsharded weight fits, but one of 2**17 x 2**17 (32 GiB) does not."""
    mesh = DeviceMesh.create(load_preset("tpu-v5e"), "x=2,y=2", "2x2")
    mm = Einsum.create("bd,df->bf", {"b": 128, "d": 2**17, "f": 2**17})
    ranking = plan(mm, mesh, top=None, explain=True)
    assert ranking.num_rejected > 0
    assert all(
        p.peak_memory_bytes <= mesh.hardware.chip.hbm_capacity_bytes for p in ranking.strategies
    )
    assert any("of HBM on TPU v5e" in r.reason for r in ranking.rejected)
    with pytest.raises(PlanError, match="no valid strategy"):
        plan(mm, mesh, lhs="None,None", rhs="None,None", out="None,None")


def test_indivisible_candidates_are_rejected_not_raised() -> None:
    mesh = DeviceMesh.create(load_preset("tpu-v5e"), "x=4,y=4", "4x4")
    mm = Einsum.create("bd,df->bf", "b=6,d=8,f=8")
    ranking = plan(mm, mesh, top=None, explain=True)
    assert any("B (size 6) does not divide over" in r.reason for r in ranking.rejected)
    assert all(dict(p.assignment)["b"] == () for p in ranking.strategies)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param(
            {"lhs": "x,None,None"}, r"--lhs 'x,None,None' has 3 entries but the lhs 'bd'", id="rank"
        ),
        pytest.param({"lhs": "x,x"}, r"uses mesh axis 'x' twice", id="twice"),
        pytest.param({"rhs": "q,None"}, r"uses mesh axis 'q', but the mesh", id="unknown-axis"),
        pytest.param({"out": "None,y"}, r"F \(size 6\) is sharded over y", id="indivisible"),
    ],
)
def test_bad_fixed_layouts_are_errors(kwargs: dict[str, str], message: str) -> None:
    mesh = DeviceMesh.create(load_preset("tpu-v5e"), "x=4,y=4", "4x4")
    mm = Einsum.create("bd,df->bf", "b=8,d=8,f=6")
    with pytest.raises(SpecError, match=message):
        Planner(mm, mesh, **kwargs)


def test_multi_axis_reduction_uses_one_collective_over_both_axes() -> None:
    mesh = DeviceMesh.create(load_preset("tpu-v5p"), "x=4,y=4,z=4", "4x4x4")
    mm = Einsum.create("bd,df->bf", "b=4096,d=8192,f=4096")
    p = estimate(mm, mesh, lhs="z,x+y", rhs="x+y,None", out="z,None")
    assert kinds(p) == [("out", "all-reduce", ("x", "y"))]
    c_bytes = 2 * 4096 // 4 * 4096
    # two axes' links at once: AllReduce = 2 x V/(2·W)
    assert p.cost.comm_s == pytest.approx(2 * c_bytes / (2 * V5P_W))


def test_accumulation_dtype_makes_reductions_wider() -> None:
    mesh = v5p_ring(4)
    mm = Einsum.create("bd,df->bf", "b=1024,d=8192,f=1024", dtype="bf16", accum_dtype="f32")
    p = estimate(mm, mesh, lhs="None,x", rhs="x,None", out="None,None")
    (step,) = p.collectives
    assert step.cost is not None
    assert step.cost.kind is Collective.ALL_REDUCE
    assert step.cost.dtype == "float32"
    assert step.cost.time_s == pytest.approx(2 * 4 * 1024 * 1024 / V5P_W)


def test_idle_replicated_axes_join_the_gather() -> None:
    """sharding.md Q2 "fun fact": AllGather_X([B_X, D_Y]) on a v4p cube with Z idle: slice
    [B_X, D_Y] -> [B_XZ, D_Y] for free, then gather over X and Z's links: 23 us -> 11.5 us."""
    from sharding_roofline.reshard import reshard_path  # noqa: PLC0415

    b, d = 1024, 4096
    sizes = (("x", 4), ("y", 4), ("z", 4))
    steps = reshard_path((("x",), ("y",)), ((), ("y",)), (), ("x", "y", "z"), ((b, d), sizes))
    assert [(kind, axes) for kind, axes, *_ in steps] == [
        (None, ("z",)),
        (Collective.ALL_GATHER, ("x", "z")),
    ]
    mesh = DeviceMesh.create(load_preset("tpu-v4p"), "x=4,y=4,z=4", "4x4x4")
    cost = collective_cost(
        mesh, Collective.ALL_GATHER, ("x", "z"), elements_in_per_chip=b // 16 * d // 4, dtype="bf16"
    )
    w_bidi = 9e10
    formula = 2 * b * d / 4 / (2 * w_bidi)  # 2BD/Y bytes over two axes' links
    assert formula == pytest.approx(11.5e-6, rel=0.02)  # the book's answer
    assert cost.time_s == pytest.approx(formula)
    # the planner keeps the plain gather when the idle axis would only add latency
    tiny = reshard_path((("x",),), ((),), (), ("x", "y", "z"), ((128,), sizes))
    assert tiny[-1][1] == ("x", "y", "z")  # offered ...
    planner = Planner(Einsum.create("b,b->", "b=128"), mesh, lhs="x", rhs="None", out="")
    path = planner.ctx.path("lhs", (("x",),), ((),))
    assert [axes for kind, axes, *_ in path.steps if kind] == [("x",)]  # ... but not taken


def test_an_all_reduced_axis_is_not_sliced_back_in() -> None:
    """Found by the random agreement benchmark: after AllReduce_z, z is replicated and idle,
    but slicing it onto a dimension to widen a gather turns all-reduce + slice into what XLA
    (rightly) reads as a reduce-scatter. The path leaves z to the all-reduce."""
    from sharding_roofline.reshard import reshard_path  # noqa: PLC0415

    sizes = (("x", 2), ("y", 2), ("z", 2))
    steps = reshard_path(
        (("x",), (), (), ("y",)),
        ((), ("y",), (), ()),
        ("z",),
        ("x", "y", "z"),
        ((16, 16, 16, 16), sizes),
    )
    collectives = sorted((kind.value, axes) for kind, axes, *_ in steps if kind is not None)
    assert collectives == [("all-gather", ("x",)), ("all-reduce", ("z",)), ("all-to-all", ("y",))]
    assert not any(kind is None and "z" in axes for kind, axes, *_ in steps)


def test_slices_shrink_the_array_before_an_all_to_all_moves_it() -> None:
    """Found by the random agreement benchmark (XLA moved a third of our bytes): in
    B[D_x, N, H] -> B[D, N_x, H_y], slice H over y first, so the all-to-all over x moves a
    quarter-size array, not the whole one."""
    from sharding_roofline.reshard import reshard_path  # noqa: PLC0415

    steps = reshard_path(((("x",), (), ())), ((), ("x",), ("y",)), (), ("x", "y", "z"))
    assert [(kind, axes) for kind, axes, *_ in steps] == [
        (None, ("y",)),
        (Collective.ALL_TO_ALL, ("x",)),
    ]


def test_peak_memory_counts_inputs_copies_and_the_output() -> None:
    """Peak memory per chip: both stored operands, the resharded copy of each operand that
    moves, the local result, and the result's moved copy (all in their dtypes)."""
    mesh = DeviceMesh.create(load_preset("tpu-v5e"), "x=2,y=4", "2x4")
    b, d, f = 64, 32, 128
    mm = Einsum.create("bd,df->bf", f"b={b},d={d},f={f}", accum_dtype="float32")
    # no movement: lhs B/2 x D, rhs D x F/4, result B/2 x F/4 in f32
    still = estimate(mm, mesh, lhs="x,None", rhs="None,y", out="x,y")
    assert still.peak_memory_bytes == 2 * (b // 2) * d + 2 * d * (f // 4) + 4 * (b // 2) * (f // 4)
    # rhs moves F_y -> D_y (an all-to-all: its copy joins); the result is reduce-scattered
    # from B_x, F {U_y} to B_x, F_y (its moved copy joins)
    moved = estimate(mm, mesh, lhs="x,y", rhs="None,y", out="x,y", at_op="b=x,d=y,f=None")
    lhs = 2 * (b // 2) * (d // 4)
    rhs_stored, rhs_at_op = 2 * d * (f // 4), 2 * (d // 4) * f
    local_out, final_out = 4 * (b // 2) * f, 4 * (b // 2) * (f // 4)
    assert [s.kind.value for s in moved.collectives] == ["all-to-all", "reduce-scatter"]
    assert moved.peak_memory_bytes == lhs + rhs_stored + rhs_at_op + local_out + final_out


def test_an_axis_of_size_one_moves_nothing_and_copies_nothing() -> None:
    """A layout over an axis of size 1 is the replicated layout: no step, no second copy."""
    mesh = DeviceMesh.create(load_preset("tpu-v5e"), "x=1,y=4", "1x4")
    mm = Einsum.create("bd,df->bf", "b=64,d=32,f=128")
    over_one = estimate(mm, mesh, lhs="x,None", rhs="None,y", out="None,y")
    replicated = estimate(mm, mesh, lhs="None,None", rhs="None,y", out="None,y")
    assert over_one.steps == ()
    assert over_one.peak_memory_bytes == replicated.peak_memory_bytes
