"""The validator's CLI pieces: arguments, the JSON object, human text, sweeps with progress."""

from __future__ import annotations

import argparse
import io
import json

import pytest

pytest.importorskip("jax")

from sharding_roofline.einsum import Einsum
from sharding_roofline.errors import ValidationError
from sharding_roofline.mesh import DeviceMesh
from sharding_roofline.planner import Planner
from sharding_roofline.plans import Plan
from sharding_roofline.presets import load_preset
from sharding_roofline.xla.cli import (
    Progress,
    add_validate_arguments,
    format_validation,
    format_validations,
    run_validate,
    run_validate_many,
    validate_many,
)
from sharding_roofline.xla.compare import validate_plan

pytestmark = pytest.mark.jax


def _ranking(lhs: str | None, rhs: str | None, out: str | None):
    einsum = Einsum.create("bd,df->bf", "b=64,d=32,f=128", accum_dtype="float32")
    mesh = DeviceMesh.create(load_preset("tpu-v5e"), "x=2,y=4")
    return Planner(einsum, mesh, lhs=lhs, rhs=rhs, out=out, check_memory=False).search(top=None)


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_validate_arguments(parser)
    return parser.parse_args(argv)


def test_arguments() -> None:
    args = _args("--devices", "16", "--execute")
    assert (args.devices, args.execute) == (16, True)
    args = _args()
    assert (args.devices, args.execute) == (None, False)


def test_run_validate_gives_the_json_object() -> None:
    plan = _ranking("None,y", "y,None", "None,None").best
    data = run_validate(_args("--execute"), plan)
    json.dumps(data)  # JSON-ready
    assert data["verdict"] == "match"
    assert [c["kind"] for c in data["predicted"]] == ["all-reduce"]
    assert data["numerics"]["ok"] is True


def test_run_validate_rejects_fewer_devices_than_the_mesh() -> None:
    plan = _ranking("None,y", "y,None", "None,None").best
    with pytest.raises(ValidationError, match=r"--devices 4 is fewer than the 8 devices"):
        run_validate(_args("--devices", "4"), plan)


def test_format_validation_shows_both_lists_and_the_verdict() -> None:
    plan = _ranking("None,x", "x,None", "None,x").find(b="", d="x", f="")
    text = format_validation(validate_plan(plan))
    assert "verdict: xla-differs (XLA chose another valid algorithm" in text
    assert "predicted (the plan):" in text
    assert "observed (XLA's jit):" in text
    assert "collective-permute" in text
    assert "reduce-scatter" in text
    assert "communication on tpu-v5e: plan " in text
    # the dict from run_validate formats the same way
    assert format_validation(validate_plan(plan).as_dict()) == text


def test_format_validation_without_collectives() -> None:
    plan = _ranking("x,None", "None,y", "x,y").best
    text = format_validation(validate_plan(plan, execute=True))
    assert "verdict: match" in text
    assert "  none" in text
    assert "numerics: ok" in text


def test_validate_many_keeps_order_and_counts() -> None:
    plans: list[Plan] = list(_ranking("x,y", "y,None", None).strategies[:4])
    stream = io.StringIO()
    validations = validate_many(plans, progress=True, stream=stream)
    assert [v.plan for v in validations] == plans
    assert stream.getvalue() == ""  # quicker than 2 s: no bar
    table = format_validations(validations)
    assert table.splitlines()[0].split()[:3] == ["#", "verdict", "strategy"]
    assert table.endswith(f"{len(plans)} validated: " + table.rsplit(": ", 1)[1])
    dicts = run_validate_many(_args(), plans, progress=False)
    assert [d["strategy"] for d in dicts] == [p.strategy for p in plans]


def test_progress_bar_appears_after_the_delay() -> None:
    stream = io.StringIO()
    bar = Progress(4, stream=stream, after_s=0.0, every_s=0.0)
    bar.update(1, "match=1")
    bar.update(4, "match=4")
    bar.close()
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("validating [#######")
    assert "1/4" in lines[0]
    assert "match=1" in lines[0]
    assert "4/4" in lines[1]
    quiet = io.StringIO()
    Progress(4, stream=quiet, after_s=60.0).update(1)
    assert quiet.getvalue() == ""


def test_validate_plot_writes_the_figure(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    """``validate --plot`` used to return before drawing: it now writes and says where."""
    from sharding_roofline.cli import main  # noqa: PLC0415

    target = tmp_path / "v.png"
    argv = [
        "validate", "--hardware", "tpu-v5e", "--mesh", "x=2,y=4",
        "--einsum", "bd,df->bf", "--dims", "b=64,d=32,f=128",
        "--lhs", "None,y", "--rhs", "y,None", "--out", "None,None", "--plot", str(target),
    ]  # fmt: skip
    assert main(argv) == 0
    assert f"wrote {target}" in capsys.readouterr().out
    assert target.read_bytes().startswith(b"\x89PNG")


def test_execute_memory_estimate_counts_inputs_outputs_and_device_copies() -> None:
    """``execute_bytes`` by hand: bf16 inputs (2 B) plus float64 copies (8 B), four float64
    arrays of the output, and every device's local operands three times over."""
    from sharding_roofline.xla.cli import check_execute_memory, execute_bytes  # noqa: PLC0415

    plan = _ranking("None,y", "y,None", "None,None").best  # accum float32 (4 B)
    b, d, f = 64, 32, 128
    host = (b * d + d * f) * (2 + 8) + b * f * 8 * 4
    local = b * (d // 4) + (d // 4) * f + b * f  # out replicated
    assert execute_bytes(plan) == host + 8 * local * 4 * 3
    with pytest.raises(ValidationError, match="more than the 1 KiB it may use"):
        check_execute_memory(plan, budget_bytes=1024)
