"""Einsum equations, FLOPs and bytes (roofline.md), and sharding specs in both notations."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sharding_roofline import (
    Collective,
    DeviceMesh,
    Einsum,
    EinsumSpec,
    ShardedOperation,
    ShardingSpec,
    SpecError,
    collective_cost,
    load_preset,
)
from sharding_roofline.dtypes import array_bytes, dtype_bytes


def test_dot_product_intensity_is_about_a_half() -> None:
    """roofline.md: bf16[N]·bf16[N] does 2N FLOPs over 4N+2 bytes -> 1/2."""
    n = 4096
    dot = Einsum.create("i,i->", {"i": n}, dtype="bfloat16")
    flops = 2 * n
    num_bytes = 2 * n + 2 * n + 2  # two bf16 vectors in, one bf16 scalar out
    assert dot.flops == flops
    assert dot.hbm_bytes == num_bytes
    assert dot.arithmetic_intensity_flops_per_byte == pytest.approx(flops / num_bytes)
    assert dot.arithmetic_intensity_flops_per_byte == pytest.approx(0.5, rel=1e-3)


def test_square_matmul_intensity() -> None:
    """N=4096 bf16 matmul: 2N³ = 137,438,953,472 FLOPs over 3·2N² = 100,663,296 bytes."""
    n = 4096
    mm = Einsum.create("ij,jk->ik", {"i": n, "j": n, "k": n})
    assert mm.flops == 2 * n**3 == 137_438_953_472
    assert mm.hbm_bytes == 3 * 2 * n**2 == 100_663_296
    assert mm.arithmetic_intensity_flops_per_byte == pytest.approx(1365.33, abs=0.01)


@pytest.mark.parametrize(
    ("preset", "critical"),
    [
        pytest.param("tpu-v5e", 1.97e14 / 8.2e11, id="v5e-240"),
        pytest.param("h100", 9.89e14 / 3.35e12, id="h100-295"),
    ],
)
def test_batch_at_which_a_matmul_turns_compute_bound(preset: str, critical: float) -> None:
    """roofline.md: for B << D, F the intensity of [B,D]·[D,F] is about B, so a bf16 matmul
    turns compute-bound at B ≈ C/W_hbm (240 on v5e, ≈295 on H100)."""
    chip = load_preset(preset).chip
    assert chip.critical_intensity_flops_per_byte("bfloat16") == pytest.approx(critical)
    d = f = 2**16
    below = Einsum.create("bd,df->bf", {"b": int(critical * 0.9), "d": d, "f": f})
    above = Einsum.create("bd,df->bf", {"b": int(critical * 1.1), "d": d, "f": f})
    assert (
        below.arithmetic_intensity_flops_per_byte
        < critical
        < above.arithmetic_intensity_flops_per_byte
    )


def test_letter_roles() -> None:
    spec = EinsumSpec.parse("bhqd,bhkd->bhqk")
    assert spec.batch == ("b", "h")
    assert spec.contracting == ("d",)
    assert spec.summed == ("d",)
    assert EinsumSpec.parse("bd,df").out == "bf"  # numpy's implicit output
    assert EinsumSpec.parse("BD,DF->BF").equation == "bd,df->bf"


def test_accumulation_dtype_sizes_the_output() -> None:
    mm = Einsum.create("bd,df->bf", "b=8,d=16,f=32", dtype="bf16", accum_dtype="f32")
    assert (mm.dtype, mm.accum_dtype) == ("bfloat16", "float32")
    assert mm.hbm_bytes == 2 * 8 * 16 + 2 * 16 * 32 + 4 * 8 * 32


@pytest.mark.parametrize(
    ("equation", "dims", "message"),
    [
        pytest.param(
            "ab,bc,cd->ad",
            "a=1",
            r"has 3 operand\(s\); sharding_roofline plans two-operand",
            id="three",
        ),
        pytest.param(
            "ab,bc->aa", "a=1,b=1,c=1", r"letter 'a' repeats in the output", id="repeat-out"
        ),
        pytest.param("aa,ab->b", "a=1,b=1", r"repeats in the lhs operand", id="trace"),
        pytest.param(
            "ab,bc->ad", "a=1,b=1,c=1", r"output letter 'd' appears in neither", id="new-out"
        ),
        pytest.param("ab,bc->ac", "a=1,b=2", r"missing c", id="dims-missing"),
        pytest.param("ab,bc->ac", "a=1,b=2,c=3,z=4", r"z not in the equation", id="dims-extra"),
        pytest.param("...b,bc->c", "b=1,c=1", r"ellipsis", id="ellipsis"),
        pytest.param("ab,bc->ac", "a=1;b=2", r"is not LETTER=SIZE", id="dims-syntax"),
    ],
)
def test_bad_einsums_say_what_to_fix(equation: str, dims: str, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        Einsum.create(equation, dims)


@pytest.mark.parametrize(
    ("text", "dims"),
    [
        ("x,None", (("x",), ())),
        ("x+y,None", (("x", "y"), ())),
        ("(x,y),None", (("x", "y"), ())),
        ("P('x', None)", (("x",), ())),
        ("None,data+model", ((), ("data", "model"))),
    ],
)
def test_partition_spec_spellings(text: str, dims: tuple[tuple[str, ...], ...]) -> None:
    assert ShardingSpec.parse(text).dims == dims


def test_partition_spec_objects_are_read_without_jax() -> None:
    class FakePartitionSpec(tuple):  # what jax.sharding.PartitionSpec iterates as
        pass

    spec = ShardingSpec.parse(FakePartitionSpec(("x", None, ("y", "z"))))
    assert spec.dims == (("x",), (), ("y", "z"))
    assert ShardingSpec.parse(None, rank=2).dims == ((), ())
    assert ShardingSpec.parse("x", rank=3).dims == (("x",), (), ())


def test_book_notation() -> None:
    spec = ShardingSpec.parse("x,y")
    assert spec.notation("A", "bd") == "A[B_x, D_y]"
    assert ShardingSpec.parse("x+y,None").notation("W", "df") == "W[D_xy, F]"
    assert ShardingSpec.parse("data+model").notation("A", "b") == "A[B_{data,model}]"


@pytest.mark.parametrize(
    ("spec", "shape", "message"),
    [
        pytest.param("x,x", (8, 8), r"uses mesh axis 'x' twice", id="twice"),
        pytest.param(
            "x,z",
            (8, 8),
            r"uses mesh axis 'z', but the mesh \(x=2, y=4\) has axes x, y",
            id="unknown",
        ),
        pytest.param(
            "None,y",
            (8, 6),
            r"D \(size 6\) is sharded over y \(4 pieces\), and 4 does not divide 6\. Pad D to a "
            r"multiple of 4",
            id="indivisible",
        ),
        pytest.param("x,None,None", (8, 8), r"has 3 entries but A has 2 dimensions", id="rank"),
    ],
)
def test_bad_shardings_say_what_to_fix(spec: str, shape: tuple[int, ...], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        ShardingSpec.parse(spec).check(
            shape=shape, axis_size={"x": 2, "y": 4}, what="A", letters="bd"
        )


AXES = ["x", "y", "z", "data", "model"]


@st.composite
def sharded_operations(draw: st.DrawFn) -> ShardedOperation:
    letters = "bdfhk"
    lhs = "".join(draw(st.permutations(letters))[: draw(st.integers(1, 4))])
    rhs = "".join(draw(st.permutations(letters))[: draw(st.integers(1, 4))])
    out = "".join(draw(st.permutations(sorted(set(lhs + rhs))))[: draw(st.integers(0, 3))])

    def spec(rank: int) -> ShardingSpec:
        dims = []
        for _ in range(rank):
            dims.append(tuple(draw(st.lists(st.sampled_from(AXES), max_size=2, unique=True))))
        return ShardingSpec(tuple(dims))

    unreduced = tuple(draw(st.lists(st.sampled_from(AXES), max_size=2, unique=True)))
    return ShardedOperation(
        lhs=spec(len(lhs)),
        rhs=spec(len(rhs)),
        out=spec(len(out)),
        lhs_letters=lhs,
        rhs_letters=rhs,
        out_letters=out,
        unreduced=unreduced,
    )


@given(sharded_operations())
def test_book_notation_round_trips(op: ShardedOperation) -> None:
    assert ShardedOperation.parse(str(op)) == op


@given(st.lists(st.lists(st.sampled_from(AXES), max_size=3, unique=True), min_size=1, max_size=4))
def test_partition_spec_text_round_trips(dims: list[list[str]]) -> None:
    spec = ShardingSpec(tuple(tuple(d) for d in dims))
    assert ShardingSpec.parse(spec.text()) == spec


def test_fp4_counts_half_a_byte_everywhere() -> None:
    """float4_e2m1fn packs two elements per byte: bytes per element is 0.5, element counts
    stay integers, and every byte figure (operands, collectives) is the exact half."""
    assert dtype_bytes("fp4") == 0.5
    assert array_bytes(3, "float4_e2m1fn") == 1.5
    mm = Einsum.create("bd,df->bf", "b=4,d=6,f=2", dtype="float4_e2m1fn", accum_dtype="bf16")
    assert mm.operand_bytes("lhs") == 4 * 6 * 0.5
    assert mm.operand_bytes("rhs") == 6 * 2 * 0.5
    assert mm.operand_bytes("out") == 4 * 2 * 2
    mesh = DeviceMesh.create(load_preset("b200"), "x=8", "1x8")
    cost = collective_cost(mesh, Collective.ALL_GATHER, ("x",), elements_in_per_chip=3, dtype="fp4")
    assert cost.elements_in_per_chip == 3
    assert cost.elements_out_per_chip == 24
    assert cost.bytes_sent_per_chip == 7 / 8 * 3 * 8 * 0.5  # (g-1)/g of the gathered 12 bytes
    assert cost.group_bytes == 12.0


def test_summed_free_letter_is_reduced_before_the_dot_as_xla_does() -> None:
    """``bd,df->f``: ``b`` is in one operand only and the output drops it. XLA reduces it
    first (B·D input elements to D: B·D - D adds) and then runs the dot ``d,df->f`` (2DF),
    not the 2BDF a product over every letter would count (64x more at B=64)."""
    b, d, f = 64, 512, 256
    einsum = Einsum.create("bd,df->f", {"b": b, "d": d, "f": f})
    assert einsum.spec.reduced_first == ("b",)
    assert einsum.spec.dot_letters == ("d", "f")
    assert einsum.dot_flops == 2 * d * f
    assert einsum.reduce_flops == b * d - d
    assert einsum.flops == 2 * d * f + b * d - d
    assert 2 * b * d * f / einsum.flops > 40  # what the old count overstated
    # a plain matmul is unchanged: every letter sits in two of the three arrays
    mm = Einsum.create("bd,df->bf", {"b": b, "d": d, "f": f})
    assert mm.spec.reduced_first == ()
    assert mm.flops == mm.dot_flops == 2 * b * d * f
    # both operands may hold one: 'ab,cd->' reduces each to a scalar, then multiplies
    outer = Einsum.create("ab,cd->", {"a": 2, "b": 3, "c": 4, "d": 5})
    assert outer.reduce_flops == (2 * 3 - 1) + (4 * 5 - 1)
    assert outer.dot_flops == 2


def test_planner_counts_the_pre_reduction_per_chip() -> None:
    """Per chip, ``bd,df->f`` with B over x and F over y computes the dot on its D×(F/y)
    shard (2·D·F/y) and first reduces its (B/x)×D block of the lhs to D (B/x·D - D adds)."""
    from sharding_roofline import DeviceMesh, Planner, load_preset  # noqa: PLC0415

    b, d, f = 64, 32, 128
    mesh = DeviceMesh.create(load_preset("tpu-v5e"), "x=2,y=4")
    einsum = Einsum.create("bd,df->f", {"b": b, "d": d, "f": f})
    plan = (
        Planner(einsum, mesh, lhs="x,None", rhs="None,y", out="y", check_memory=False)
        .search(top=None)
        .find(b="x", d="", f="y")
    )
    assert plan.cost.flops == 2 * d * (f // 4) + ((b // 2) * d - d)
