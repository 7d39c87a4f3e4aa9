"""XLA's unguided choice as the baseline: the program compiled with only the stored input
layouts and the output layout given, costed with the same model, and the verdict."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("jax")

from sharding_roofline import DeviceMesh, Einsum, Planner, load_preset
from sharding_roofline.cli import main
from sharding_roofline.xla.compare import CollectiveRecord, Unguided, unguided

pytestmark = pytest.mark.jax

# v5e 2x4: no wraparound, so an axis of 4 is a line: AG of V bytes takes ·V/(X·W_uni)
W_UNI = 4.5e10
B, D, F = 256, 512, 1024


def _record(kind: str, time_s: float | None, elements: int = 1024) -> CollectiveRecord:
    return CollectiveRecord(
        kind=kind, axes=("y",), operand="lhs", group_size=4, dtype="bfloat16",
        elements_in_per_chip=elements, elements_out_per_chip=4 * elements,
        bytes_sent_per_chip=6 * elements, time_s=time_s,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("predicted_s", "observed", "verdict"),
    [
        (2e-6, [("all-gather", 2e-6, 1024)], "match"),  # the same collective
        (2e-6, [("all-gather", 3e-6, 2048)], "plan-cheaper"),
        (2e-6, [("all-gather", 1e-6, 512)], "xla-cheaper"),
        (2e-6, [("all-reduce", 2.0000001e-6, 512)], "same"),  # another collective, same time
        (2e-6, [("all-gather", None, 2048)], "uncosted"),
        (2e-6, [], "xla-cheaper"),  # XLA needed nothing
    ],
)
def test_the_verdict_compares_collectives_then_time(
    predicted_s: float, observed: list[tuple[str, float | None, int]], verdict: str
) -> None:
    predicted = (_record("all-gather", predicted_s),)
    got = Unguided.judge(predicted, tuple(_record(k, t, n) for k, t, n in observed))
    assert got.verdict == verdict
    assert got.plan_time_s == predicted_s


def _plan(lhs: str, rhs: str, out: str, **assignment: str) -> object:
    mesh = DeviceMesh.create(load_preset("tpu-v5e"), "x=2,y=4", "2x4")
    einsum = Einsum.create("bd,df->bf", f"b={B},d={D},f={F}")
    ranking = Planner(einsum, mesh, lhs=lhs, rhs=rhs, out=out, check_memory=False).search(top=None)
    return ranking.find(**assignment) if assignment else ranking.best


def test_a_plan_xla_would_choose_itself_matches() -> None:
    """Case 3 with the output split as the reduction leaves it: XLA's one choice is the
    plan's all-reduce over y."""
    found = unguided(_plan("x,y", "y,None", "x,None"))  # type: ignore[arg-type]
    assert found.verdict == "match"
    assert [r.kind for r in found.observed] == ["all-reduce"]


def test_unguided_xla_gathers_over_y_where_the_plan_uses_the_idle_axis_too() -> None:
    """Case 2, lhs[B, D_y] with everything else replicated: XLA all-gathers the lhs over y
    (a line of 4: 3·V/(4·W_uni) with V = B·D·2 bytes), the plan slices x in for free and
    gathers over y+x, cheaper."""
    plan = _plan("None,y", "None,None", "None,None")
    found = unguided(plan)  # type: ignore[arg-type]
    xla_s = 3 * (B * D * 2) / (4 * W_UNI)
    assert [(r.kind, r.axes) for r in found.observed] == [("all-gather", ("y",))]
    assert found.xla_time_s == pytest.approx(xla_s, rel=1e-9)
    assert found.verdict == "plan-cheaper"
    assert found.plan_time_s < xla_s


def test_validate_json_gains_the_unguided_baseline(capsys: pytest.CaptureFixture[str]) -> None:
    args = [
        "validate", "--hardware", "tpu-v5e", "--topology", "2x4", "--mesh", "x=2,y=4",
        "--einsum", "bd,df->bf", "--dims", f"b={B},d={D},f={F}",
        "--lhs", "None,y", "--rhs", "None,None", "--out", "None,None", "--json",
    ]  # fmt: skip
    assert main(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data["unguided"]) >= {"observed", "xla_time_s", "verdict"}
    assert data["unguided"]["verdict"] == "plan-cheaper"
    assert data["unguided"]["observed"][0]["kind"] == "all-gather"
    assert main(args[:-1]) == 0
    assert "XLA unguided (stored and output layouts only): plan-cheaper" in capsys.readouterr().out
