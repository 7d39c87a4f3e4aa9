"""Execution on simulated devices: a representative set of plans computes the right numbers
(against numpy in float64 on the same rounded inputs) and leaves the output in its layout."""

from __future__ import annotations

import pytest

pytest.importorskip("jax")

from sharding_roofline.einsum import Einsum
from sharding_roofline.mesh import DeviceMesh
from sharding_roofline.planner import Planner
from sharding_roofline.plans import Plan
from sharding_roofline.presets import load_preset
from sharding_roofline.xla.compare import Verdict, validate_plan

pytestmark = [pytest.mark.jax, pytest.mark.slow]

BD = "b=64,d=32,f=128"


def _mesh(name: str) -> DeviceMesh:
    if name == "v5e-2x4":
        return DeviceMesh.create(load_preset("tpu-v5e"), "x=2,y=4")
    if name == "v5p-2x2x2":
        return DeviceMesh.create(load_preset("tpu-v5p"), "x=2,y=2,z=2")
    return DeviceMesh.create(load_preset("h100"), "x=2,y=4", "1x8")  # float32 peak listed


def _plan(
    request: tuple[str, ...],
    *,
    dtype: str = "bfloat16",
    accum: str | None = "float32",
    **assignment: str,
) -> Plan:
    """``request`` = (mesh, equation, dims, lhs, rhs, out); ``assignment`` picks a strategy."""
    mesh, equation, dims, lhs, rhs, out = request
    einsum = Einsum.create(equation, dims, dtype=dtype, accum_dtype=accum)
    ranking = Planner(einsum, _mesh(mesh), lhs=lhs, rhs=rhs, out=out, check_memory=False).search(
        top=None
    )
    return ranking.find(**assignment) if assignment else ranking.best


CASES = [
    # the book's four cases (bf16 operands, f32 accumulation)
    pytest.param(("v5e-2x4", "bd,df->bf", BD, "x,None", "None,y", "x,y"), {}, id="case1"),
    pytest.param(
        ("v5e-2x4", "bd,df->bf", BD, "None,x", "None,None", "None,None"),
        {"b": "", "d": "", "f": ""},
        id="case2-gather",
    ),
    pytest.param(
        ("v5e-2x4", "bd,df->bf", BD, "None,x", "None,None", "None,None"),
        {"b": "", "d": "x", "f": ""},
        id="case2-slice-all-reduce",
    ),
    pytest.param(
        ("v5e-2x4", "bd,df->bf", BD, "None,y", "y,None", "None,None"), {}, id="case3-all-reduce"
    ),
    pytest.param(
        ("v5e-2x4", "bd,df->bf", BD, "None,y", "y,None", "None,y"), {}, id="case3-reduce-scatter"
    ),
    pytest.param(("v5e-2x4", "bd,df->bf", BD, "x,None", "None,x", "x,None"), {}, id="case4"),
    # resharded outputs
    pytest.param(("v5e-2x4", "bd,df->bf", BD, "x,None", "None,y", "y,x"), {}, id="out-swapped"),
    pytest.param(("v5e-2x4", "bd,df->bf", BD, "x,None", "None,y", "None,x+y"), {}, id="out-moved"),
    pytest.param(
        ("v5e-2x4", "bd,df->bf", BD, "x,y", "y,None", "y,x"), {}, id="reduce-then-reshard"
    ),
    # multi-axis shardings
    pytest.param(
        ("v5e-2x4", "bd,df->bf", BD, "None,x+y", "x+y,None", "x+y,None"), {}, id="rs-two-axes"
    ),
    pytest.param(
        ("v5e-2x4", "bd,df->bf", BD, "None,x+y", "y,x", "None,None"), {}, id="stored-y+x-vs-x+y"
    ),
    pytest.param(
        ("v5p-2x2x2", "btd,df->btf", "b=8,t=16,d=32,f=64", "x,y,z", "z,x", "y,None,x"),
        {},
        id="btd-2x2x2-reshard",
    ),
    pytest.param(
        (
            "v5p-2x2x2",
            "bhqd,bhkd->bhqk",
            "b=4,h=8,q=16,k=16,d=32",
            "None,x+y,z,None",
            "None,None,None,x+y+z",
            "x,y,z,None",
        ),
        {},
        id="attention-2x2x2",
    ),
    # FSDP: weight sharded on the contracting dim, every way of computing it
    pytest.param(
        ("v5e-2x4", "bd,df->bf", BD, "x,None", "y,None", "x,None"),
        {"b": "x", "d": "", "f": ""},
        id="fsdp-gather-weight",
    ),
    pytest.param(
        ("v5e-2x4", "bd,df->bf", BD, "x,None", "y,None", "x,None"),
        {"b": "x", "d": "y", "f": ""},
        id="fsdp-slice-all-reduce",
    ),
]


@pytest.mark.parametrize(("request_", "assignment"), CASES)
def test_bf16_with_f32_accumulation(request_: tuple[str, ...], assignment: dict[str, str]) -> None:
    plan = _plan(request_, **assignment)
    v = validate_plan(plan, execute=True)
    assert v.numerics is not None
    assert v.numerics.ok, v.reasons
    assert v.verdict is not Verdict.MISMATCH, v.reasons


@pytest.mark.parametrize(
    ("request_", "assignment"),
    [
        pytest.param(("h100-2x4", "bd,df->bf", BD, "None,y", "y,None", "None,y"), {}, id="rs"),
        pytest.param(("h100-2x4", "bd,df->bf", BD, "x,None", "None,x", "x,None"), {}, id="case4"),
        pytest.param(
            ("h100-2x4", "btd,df->btf", "b=8,t=16,d=32,f=64", "x,y,None", "None,x", "x,None,y"),
            {},
            id="btd-reshard",
        ),
        pytest.param(
            (
                "h100-2x4",
                "bhqd,bhkd->bhqk",
                "b=4,h=8,q=16,k=16,d=32",
                "x,y,None,None",
                "None,y,x,None",
                "x,y,None,None",
            ),
            {},
            id="attention-reshard",
        ),
    ],
)
def test_float32(request_: tuple[str, ...], assignment: dict[str, str]) -> None:
    plan = _plan(request_, dtype="float32", accum=None, **assignment)
    v = validate_plan(plan, execute=True)
    assert v.numerics is not None
    assert v.numerics.ok, v.reasons
    assert v.numerics.max_rel_error < 1e-6  # f32 all the way
    assert v.verdict is not Verdict.MISMATCH, v.reasons


def test_bf16_accumulation_within_bf16_tolerance() -> None:
    plan = _plan(("v5e-2x4", "bd,df->bf", BD, "None,y", "y,None", "None,y"), accum=None)
    v = validate_plan(plan, execute=True)
    assert v.numerics is not None
    assert v.numerics.ok, v.reasons
    assert v.numerics.tolerance >= 1e-2  # bf16 results: 8 bits of mantissa


def test_the_best_fsdp_strategies_compute_the_same_numbers() -> None:
    einsum = Einsum.create("bd,df->bf", BD, accum_dtype="float32")
    ranking = Planner(
        einsum, _mesh("v5e-2x4"), lhs="x,None", rhs="y,None", out="x,None", check_memory=False
    ).search(top=None)
    assert len(ranking.strategies) > 6
    for plan in ranking.strategies[:6]:  # the best six: gather, slice + reduce, reshards
        v = validate_plan(plan, execute=True)
        assert v.numerics is not None
        assert v.numerics.ok, (plan.describe(), v.reasons)


@pytest.mark.parametrize("accum", ["int32", "int8"])
def test_int8_matmuls_compare_exactly(accum: str) -> None:
    """Integer dots accumulate in their accumulation dtype and wrap there (int8 sums of
    products up to 16·D overflow int8): the reference wraps the exact int64 result the same
    way, and every element must match exactly."""
    plan = _plan(
        ("v5e-2x4", "bd,df->bf", BD, "None,y", "y,None", "None,y"), dtype="int8", accum=accum
    )
    v = validate_plan(plan, execute=True)
    assert v.numerics is not None
    assert v.numerics.ok, v.reasons
    assert v.numerics.max_abs_error == 0
