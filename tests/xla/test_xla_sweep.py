"""Every strategy the planner lists for the sweep's einsums and meshes, validated against XLA
(compile-only): no mismatch, and every xla-differs verdict listed, with its reason, in the
committed report ``tests/data/xla_differs.json`` (regenerate it with
``python benchmarks/xla_agreement.py --write-report``). Also a 16x16 mesh of 256 devices."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("jax")

from sharding_roofline.einsum import Einsum
from sharding_roofline.mesh import DeviceMesh
from sharding_roofline.planner import Planner
from sharding_roofline.plans import Plan
from sharding_roofline.presets import load_preset
from sharding_roofline.xla.cli import validate_many
from sharding_roofline.xla.compare import Verdict, plan_key, validate_plan

pytestmark = [pytest.mark.jax, pytest.mark.slow]

REPORT_PATH = Path(__file__).resolve().parents[1] / "data" / "xla_differs.json"
REPORT: dict[str, Any] = json.loads(REPORT_PATH.read_text())
REGENERATE = "python benchmarks/xla_agreement.py --write-report"


def plans_for(case: dict[str, Any]) -> list[Plan]:
    """Every strategy the planner lists for a sweep case (as benchmarks/xla_agreement.py)."""
    mesh = DeviceMesh.create(load_preset(case["hardware"]), case["mesh"], case.get("topology"))
    einsum = Einsum.create(
        case["einsum"], case["dims"], dtype=case["dtype"], accum_dtype=case["accum_dtype"]
    )
    planner = Planner(
        einsum, mesh, lhs=case["lhs"], rhs=case["rhs"], out=case["out"], check_memory=False
    )
    return list(planner.search(top=None).strategies)


def test_report_reasons_are_known() -> None:
    reasons = REPORT["reasons"]
    for case_id, listed in REPORT["xla_differs"].items():
        for key, entry in listed.items():
            assert entry["reason"] in reasons, (case_id, key)
            assert entry["reason"] != "unexplained", (case_id, key)
    assert set(REPORT["agreement"]) == {case["id"] for case in REPORT["sweep"]}


@pytest.mark.parametrize("case", REPORT["sweep"], ids=[c["id"] for c in REPORT["sweep"]])
def test_every_enumerated_strategy(case: dict[str, Any]) -> None:
    plans = plans_for(case)
    assert plans
    validations = validate_many(plans, prove=case["prove"], progress=False)
    mismatches = [
        f"{plan_key(v.plan)}: {'; '.join(v.reasons)}"
        for v in validations
        if v.verdict is Verdict.MISMATCH
    ]
    assert not mismatches, "planner bugs:\n" + "\n".join(mismatches)
    got = {plan_key(v.plan): v.difference for v in validations if v.verdict is Verdict.XLA_DIFFERS}
    listed = REPORT["xla_differs"].get(case["id"], {})
    new = sorted(f"{k}: {d}" for k, d in got.items() if k not in listed)
    changed = sorted(
        f"{k}: was {listed[k]['difference']}, now {d}"
        for k, d in got.items()
        if k in listed and listed[k]["difference"] != d
    )
    gone = sorted(k for k in listed if k not in got)
    problems = [
        *(f"new xla-differs, not in the report: {line}" for line in new),
        *(f"XLA's algorithm changed: {line}" for line in changed),
        *(f"listed as xla-differs but now agrees (or is gone): {k}" for k in gone),
    ]
    assert not problems, (
        f"{len(problems)} differences from {REPORT_PATH.name} (explain them, then run "
        f"{REGENERATE}):\n" + "\n".join(problems[:20])
    )
    counts = {verdict.value: 0 for verdict in Verdict}
    for v in validations:
        counts[v.verdict.value] += 1
    assert counts == REPORT["agreement"][case["id"]]


@pytest.mark.devices(256)
@pytest.mark.parametrize(
    ("lhs", "rhs", "out"),
    [
        pytest.param("x,None", "y,None", None, id="fsdp-weight"),
        pytest.param("x,y", "y,None", "x,y", id="reduce-scatter"),
        pytest.param("None,x+y", "x+y,None", None, id="contracting-over-256"),
    ],
)
def test_16x16_mesh_of_256_devices(lhs: str, rhs: str, out: str | None) -> None:
    mesh = DeviceMesh.create(load_preset("tpu-v5e"), "x=16,y=16")
    einsum = Einsum.create("bd,df->bf", "b=8192,d=4096,f=16384", accum_dtype="float32")
    ranking = Planner(einsum, mesh, lhs=lhs, rhs=rhs, out=out, check_memory=False).search(top=3)
    for plan in ranking.strategies:
        v = validate_plan(plan)
        assert v.verdict is not Verdict.MISMATCH, (plan.describe(), v.reasons)
        assert v.flops.ok
        assert v.shard_map is not None
        assert sorted(r.key for r in v.shard_map) == sorted(r.key for r in v.predicted)
