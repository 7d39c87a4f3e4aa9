"""Verdicts: the book's four cases match XLA; XLA's other algorithms are told apart from
planner bugs; records speak the estimate JSON's vocabulary with the plan's dtypes."""

from __future__ import annotations

import dataclasses

import pytest

pytest.importorskip("jax")

from sharding_roofline.collectives import Collective, collective_cost
from sharding_roofline.einsum import Einsum
from sharding_roofline.estimate import Cost
from sharding_roofline.mesh import DeviceMesh
from sharding_roofline.planner import Planner
from sharding_roofline.plans import Plan
from sharding_roofline.presets import load_preset
from sharding_roofline.report import plan_dict
from sharding_roofline.xla.compare import (
    Verdict,
    agreement,
    plan_key,
    validate_plan,
)

pytestmark = pytest.mark.jax

B, D, F = 64, 32, 128
X, Y = 2, 4


def _ranking(lhs: str, rhs: str, out: str, dtype: str = "bfloat16", accum: str = "float32"):
    einsum = Einsum.create("bd,df->bf", f"b={B},d={D},f={F}", dtype=dtype, accum_dtype=accum)
    mesh = DeviceMesh.create(load_preset("tpu-v5e"), f"x={X},y={Y}")
    return Planner(einsum, mesh, lhs=lhs, rhs=rhs, out=out, check_memory=False).search(top=None)


def _kinds(records) -> list[tuple[str, tuple[str, ...] | None, int, int]]:
    return sorted(r.key for r in records)


# -- the scaling book's four cases (chapter "Sharded Matmuls"), 2x4, bf16 -> f32 -------------


def test_case_1_no_contracting_shards_needs_nothing() -> None:
    # A[I_X, J] · B[J, K_Y] -> C[I_X, K_Y]
    plan = _ranking("x,None", "None,y", "x,y").best
    v = validate_plan(plan)
    assert v.verdict is Verdict.MATCH
    assert v.predicted == v.observed == v.shard_map == ()
    assert v.flops.shard_map == v.flops.jit == 2 * (B // X) * D * (F // Y)


def test_case_2_gathers_the_sharded_operand() -> None:
    # A[I, J_X] · B[J, K] -> C[I, K]: AllGather_X A, then a full local matmul
    plan = _ranking("None,x", "None,None", "None,None").find(b="", d="", f="")
    v = validate_plan(plan)
    assert v.verdict is Verdict.MATCH
    local_a = B * D // X
    assert _kinds(v.observed) == [("all-gather", ("x",), local_a, local_a * X)]
    (gather,) = v.observed
    assert gather.operand == "lhs"
    assert gather.dtype == "bfloat16"  # the plan's dtype, not the f32 the CPU prints
    assert gather.bytes_sent_per_chip == (X - 1) / X * local_a * X * 2


def test_case_2_alternative_slices_and_all_reduces() -> None:
    # ... or slice B's J (free), multiply partially, AllReduce_X the result
    plan = _ranking("None,x", "None,None", "None,None").find(b="", d="x", f="")
    v = validate_plan(plan)
    assert v.verdict is Verdict.MATCH
    assert _kinds(v.observed) == [("all-reduce", ("x",), B * F, B * F)]
    (reduce,) = v.observed
    assert (reduce.operand, reduce.dtype) == ("out", "float32")  # the accumulation dtype
    assert reduce.bytes_sent_per_chip == 2 * (X - 1) / X * B * F * 4


@pytest.mark.parametrize(
    ("out", "expected"),
    [
        pytest.param("None,None", [("all-reduce", ("y",), B * F, B * F)], id="all-reduce"),
        pytest.param(
            "None,y", [("reduce-scatter", ("y",), B * F, B * F // Y)], id="reduce-scatter"
        ),
    ],
)
def test_case_3_both_contracting_shards_reduce(out: str, expected: list[tuple]) -> None:
    # A[I, J_Y] · B[J_Y, K] -> C[I, K] {U_Y}, then AllReduce or ReduceScatter
    plan = _ranking("None,y", "y,None", out).find(b="", d="y", f="")
    v = validate_plan(plan)
    assert v.verdict is Verdict.MATCH
    assert _kinds(v.predicted) == _kinds(v.observed) == _kinds(v.shard_map) == expected


def test_case_4_same_axis_on_both_free_dims_gathers_one() -> None:
    # A[I_X, J] · B[J, K_X] is invalid: gather B over X, then C[I_X, K]
    plan = _ranking("x,None", "None,x", "x,None").best
    v = validate_plan(plan)
    assert v.verdict is Verdict.MATCH
    assert _kinds(v.observed) == [("all-gather", ("x",), D * F // X, D * F)]


# -- XLA choosing another algorithm ----------------------------------------------------------


def test_xla_differs_reduces_then_permutes() -> None:
    # C[B, F_x] from U_x, y left free: the plan reduce-scatters over x; XLA splits F over
    # part of y, all-reduces the half-size result over x and permutes blocks into place
    plan = _ranking("None,x", "x,None", "None,x").find(b="", d="x", f="")
    v = validate_plan(plan)
    assert v.verdict is Verdict.XLA_DIFFERS
    assert _kinds(v.shard_map) == _kinds(v.predicted) == [("reduce-scatter", ("x",), 8192, 4096)]
    assert {r.kind for r in v.observed} == {"all-reduce", "collective-permute"}
    assert v.difference == "-reduce-scatter[x] +all-reduce[x] +collective-permute[x+y]"
    assert v.flops.jit == v.flops.plan // 2  # XLA's partial matmul is half the size
    assert v.xla_time_s is not None
    assert v.xla_time_s > v.plan_time_s > 0
    assert any("XLA's jit program adds" in r for r in v.reasons)


def test_two_gathers_with_one_channel_id_count_twice() -> None:
    # the shard_map lowering gives both all-gathers channel_id=1 in one computation; they
    # are two ops (copies of one async op would live in different computations)
    plan = _ranking("x,None", "y,None", "x,None").find(b="", d="", f="")
    v = validate_plan(plan)
    assert v.shard_map is not None
    assert sorted((r.kind, r.axes) for r in v.shard_map) == [
        ("all-gather", ("x",)),
        ("all-gather", ("y",)),
    ]
    assert v.verdict is not Verdict.MISMATCH


# -- planner bugs are mismatches -------------------------------------------------------------


def _first_with(kind: Collective) -> Plan:
    for plan in _ranking("None,y", "y,None", "None,None").strategies:
        if any(s.kind is kind for s in plan.steps):
            return plan
    raise AssertionError(kind)  # pragma: no cover


def test_wrong_predicted_elements_are_a_mismatch() -> None:
    plan = _first_with(Collective.ALL_REDUCE)
    steps = []
    for step in plan.steps:
        if step.kind is Collective.ALL_REDUCE and step.cost is not None:
            wrong = collective_cost(
                plan.mesh,
                step.kind,
                step.axes,
                elements_in_per_chip=2 * step.cost.elements_in_per_chip,
                dtype=step.cost.dtype,
            )
            steps.append(dataclasses.replace(step, cost=wrong))
        else:
            steps.append(step)
    broken = dataclasses.replace(plan, steps=tuple(steps))
    v = validate_plan(broken)
    assert v.verdict is Verdict.MISMATCH
    assert any("shard_map program lacks all-reduce[y] 16384->16384" in r for r in v.reasons)


def test_wrong_flops_are_a_mismatch() -> None:
    plan = _first_with(Collective.ALL_REDUCE)
    cost = plan.cost
    broken = dataclasses.replace(
        plan,
        cost=Cost(flops=2 * cost.flops, hbm_bytes=cost.hbm_bytes, compute_s=cost.compute_s),
    )
    v = validate_plan(broken)
    assert v.verdict is Verdict.MISMATCH
    assert not v.flops.ok
    assert any("matmul FLOPs per chip" in r for r in v.reasons)


def test_a_missing_reduction_computes_wrong_numbers() -> None:
    # drop the all-reduce: the plan's program then returns one device's partial sum
    plan = _first_with(Collective.ALL_REDUCE)
    broken = dataclasses.replace(
        plan, steps=tuple(s for s in plan.steps if s.kind is not Collective.ALL_REDUCE)
    )
    v = validate_plan(broken, execute=True)
    assert v.verdict is Verdict.MISMATCH
    assert v.numerics is not None
    assert not v.numerics.ok
    assert not v.numerics.shard_map_ok
    assert v.numerics.jit_ok  # XLA's program of the same layouts is right
    assert any("shard_map program computes wrong numbers" in r for r in v.reasons)


# -- the JSON shape ------------------------------------------------------------------------


def test_as_dict_speaks_the_estimate_vocabulary() -> None:
    plan = _ranking("None,y", "y,None", "None,y").find(b="", d="y", f="")
    v = validate_plan(plan, execute=True)
    d = v.as_dict()
    assert d["verdict"] == "match"
    for key in ("predicted", "observed", "numerics", "flops", "xla_time_s", "plan_time_s"):
        assert key in d
    assert d["warnings"] == []
    assert d["numerics"]["ok"] is True
    assert d["numerics"]["max_abs_error"] < 1e-3
    estimate = plan_dict(plan)["collectives"]
    assert len(d["predicted"]) == len(estimate) == 1
    for key, value in estimate[0].items():
        assert d["predicted"][0][key] == value, key
    observed = d["observed"][0]
    for key in (
        "kind",
        "axes",
        "operand",
        "elements_in_per_chip",
        "elements_out_per_chip",
        "bytes_sent_per_chip",
        "time_s",
    ):
        assert observed[key] == d["predicted"][0][key], key
    assert d["xla_time_s"] == d["plan_time_s"] == pytest.approx(plan.cost.comm_s)


def test_agreement_counts_every_verdict() -> None:
    plan = _ranking("x,None", "None,y", "x,y").best
    assert agreement([validate_plan(plan)]) == {"match": 1, "xla-differs": 0, "mismatch": 0}
    assert "@" in plan_key(plan)


def test_sub_axis_groups_are_reported_without_a_time() -> None:
    # FSDP stored layouts computed as A[B_y, D] · B[D, F]: XLA reshards A from B_x to B_y by
    # gathering over pairs of devices inside y, groups that are no whole mesh axis
    plan = _ranking("x,None", "y,None", "x,None").find(b="y", d="", f="")
    v = validate_plan(plan)
    assert v.verdict is Verdict.XLA_DIFFERS
    partial = [r for r in v.observed if r.axes is None]
    assert partial
    for record in partial:
        assert record.time_s is None
        assert record.bytes_sent_per_chip > 0
        assert record.as_dict()["axes"] is None
    assert v.xla_time_s is None
    assert "[?]" in v.difference
