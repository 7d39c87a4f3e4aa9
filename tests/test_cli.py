"""The command line: the JSON contract (shared/cli_contract.md), human output, and errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sharding_roofline import list_presets
from sharding_roofline.cli import main

V5E = ["--hardware", "tpu-v5e", "--topology", "4x4", "--mesh", "x=4,y=4"]
MATMUL = ["--einsum", "bd,df->bf", "--dims", "b=8192,d=8192,f=32768", "--dtype", "bfloat16"]


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert main([*argv, "--json"]) == 0
    out = capsys.readouterr().out
    return json.loads(out)


def test_hardware_list_and_show(capsys: pytest.CaptureFixture[str]) -> None:
    data = run_json(capsys, "hardware", "list")
    assert [p["name"] for p in data["presets"]] == list_presets()
    show = run_json(capsys, "hardware", "show", "h100")
    assert show["chip"]["peak_flops_per_s"]["bfloat16"] == 9.89e14
    assert show["nvlink"]["gpus_per_domain"] == 8
    # NCCL's ring base latency (tuning.cc, Ring/Simple) and the CUDA-core FP32 rate (67 TFLOP/s)
    assert show["nvlink"]["ring_base_latency_s"] == 8.4e-6
    assert show["chip"]["vector_flops_per_s"] == {"float32": 6.7e13}
    assert run_json(capsys, "hardware", "show", "tpu-7x")["ici"]["max_cubes"] == 144
    assert main(["hardware", "show", "tpu-v5e"]) == 0
    text = capsys.readouterr().out
    assert "critical intensity 240.2" in text
    assert "source:" in text


def test_collective_json_contract(capsys: pytest.CaptureFixture[str]) -> None:
    data = run_json(
        capsys,
        "collective",
        "--hardware", "tpu-v5e", "--topology", "8x4", "--mesh", "x=8,y=4",
        "--op", "all-gather", "--axes", "y", "--shape", "2048,8192", "--spec", "y,None",
        "--dtype", "bfloat16",
    )  # fmt: skip
    v = 2048 * 8192 * 2
    assert data["time_s"] == pytest.approx(3 * (v / 4) / 4.5e10)  # no wraparound on v5e 8x4
    assert data["bytes_sent_per_chip"] == 3 / 4 * v
    assert data["bound"] == "bandwidth"
    assert data["notation"] == "AllGather_y A[I_y, J] -> A[I, J]"


def test_collective_two_axes_and_topology_default(capsys: pytest.CaptureFixture[str]) -> None:
    data = run_json(
        capsys,
        "collective", "--hardware", "tpu-v4p", "--mesh", "x=4,y=4,z=4",
        "--op", "all-gather", "--axes", "x,y", "--shape", "1024,4096", "--spec", "x,y",
    )  # fmt: skip
    assert data["topology"] == "4x4x4"
    assert data["time_s"] == pytest.approx(2 * 1024 * 4096 / (2 * 9e10))


def test_estimate_json_contract(capsys: pytest.CaptureFixture[str]) -> None:
    data = run_json(
        capsys, "estimate", *V5E, *MATMUL, "--lhs", "None,x", "--rhs", "x,y", "--out", "x,y"
    )
    assert set(data["time_s"]) >= {"compute", "hbm", "comm", "lower_bound", "upper_bound"}
    t = data["time_s"]
    assert t["lower_bound"] == max(t["compute"], t["hbm"], t["comm"])
    assert t["upper_bound"] == pytest.approx(t["compute"] + t["hbm"] + t["comm"])
    assert data["bottleneck"] in ("compute", "hbm", "comm")
    assert set(data["per_chip"]) >= {"flops", "hbm_bytes", "peak_memory_bytes"}
    assert data["per_chip"]["flops"] == 2 * 8192 * 8192 * 32768 / 16
    (coll,) = data["collectives"]
    assert set(coll) >= {
        "kind", "axes", "operand", "elements_in_per_chip", "elements_out_per_chip",
        "bytes_sent_per_chip", "time_s",
    }  # fmt: skip
    assert (coll["kind"], coll["axes"], coll["operand"]) == ("reduce-scatter", ["x"], "out")
    assert coll["elements_in_per_chip"] == 8192 * 32768 // 4
    assert coll["elements_out_per_chip"] == 8192 * 32768 // 16
    assert set(data["crossover"]) >= {"dimension", "size"}


def test_plan_json_contract(capsys: pytest.CaptureFixture[str]) -> None:
    data = run_json(capsys, "plan", *V5E, *MATMUL, "--top", "3")
    assert len(data["strategies"]) == 3
    for strategy in data["strategies"]:
        assert {"lhs", "rhs", "out", "time_s", "collectives", "bottleneck"} <= set(strategy)
    times = [s["time_s"]["lower_bound"] for s in data["strategies"]]
    assert times == sorted(times)


def test_plan_with_a_fixed_operand_and_explain(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "plan",
                *V5E,
                "--einsum",
                "bd,df->bf",
                "--dims",
                "b=6,d=16,f=16",
                "--rhs",
                "x,None",
                "--explain",
                "--top",
                "2",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "rejected:" in out
    assert "B (size 6) does not divide over" in out


def test_human_estimate_names_the_bottleneck_and_crossover(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["estimate", "--hardware", "tpu-v5p", "--mesh", "x=4", *MATMUL]
    assert (
        main(
            [
                *argv,
                "--lhs",
                "None,None",
                "--rhs",
                "x,None",
                "--out",
                "None,None",
                "--crossover-dim",
                "d",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "bottleneck:" in out
    assert "crossover:" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(
            ["hardware", "show", "tpu-v9"], "unknown hardware preset 'tpu-v9'", id="preset"
        ),
        pytest.param(
            ["plan", *V5E[:4], "--mesh", "x=4,q=4", *MATMUL, "--lhs", "q,None,None"],
            "has 3 entries",
            id="rank",
        ),
        pytest.param(
            ["plan", *V5E[:4], "--mesh", "x=4,y=8", *MATMUL],
            "has 32 devices but topology 4x4 has 16",
            id="mesh-size",
        ),
        pytest.param(
            [
                "estimate",
                *V5E,
                *MATMUL,
                "--lhs",
                "z,None",
                "--rhs",
                "None,None",
                "--out",
                "None,None",
            ],
            "uses mesh axis 'z'",
            id="axis",
        ),
        pytest.param(
            ["plan", *V5E, "--einsum", "ab,bc,cd->ad", "--dims", "a=1"], "two-operand", id="einsum"
        ),
        pytest.param(
            ["plan", *V5E, "--einsum", "bd,df->bf", "--dims", "b=6,d=8,f=8", "--lhs", "x,None"],
            "does not divide 6",
            id="divisible",
        ),
        pytest.param(
            ["collective", *V5E, "--op", "all-scatter", "--axes", "x", "--shape", "8,8"],
            "unknown collective",
            id="op",
        ),
        pytest.param(
            ["plan", *V5E, *MATMUL, "--dtype", "fp17"], "unknown dtype 'fp17'", id="dtype"
        ),
        pytest.param(
            ["plan", *V5E, *MATMUL, "--dtype", "float32"],
            "has no peak matmul rate for dtype 'float32'",
            id="tpu-f32",
        ),
    ],
)
def test_domain_errors_exit_1_with_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert message in captured.err
    assert "Traceback" not in captured.err
    assert captured.out == ""


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["estimate", "--hardware", "tpu-v5e"]) == 2
    assert "required" in capsys.readouterr().err


def test_json_errors_are_json_on_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    """Domain errors exit 1, usage errors 2; under --json both print one object
    {error, fix} on stdout, nothing on stderr."""
    argv = ["estimate", *V5E, *MATMUL, "--lhs", "None,x", "--rhs", "x,y", "--out", "x,y"]
    assert main([*argv[:-6], "--lhs", "q,None", "--rhs", "x,y", "--out", "x,y", "--json"]) == 1
    captured = capsys.readouterr()
    error = json.loads(captured.out)
    assert "mesh axis 'q'" in error["error"]
    assert set(error) == {"error", "fix"}
    assert captured.err == ""
    bad_size = [
        "estimate", *V5E, "--einsum", "bd,df->bf", "--dims", "b=6,d=8,f=8",
        "--lhs", "x,None", "--rhs", "None,y", "--out", "x,y", "--json",
    ]  # fmt: skip
    assert main(bad_size) == 1
    error = json.loads(capsys.readouterr().out)
    assert error["fix"].startswith("Pad B to a multiple of 4")
    assert main(["plan", *V5E, *MATMUL, "--top", "x", "--json"]) == 2
    usage = json.loads(capsys.readouterr().out)
    assert "invalid int value" in usage["error"]


def test_pinning_the_layout_at_the_op(capsys: pytest.CaptureFixture[str]) -> None:
    """The book's case 2 on one v5p axis: gathering the weight W[D_x, F] costs 2DF/W; with
    the layout at the op pinned (--at-op) and no idle axes, that is what estimate costs,
    whatever cheaper algorithm exists."""
    v5p = ["--hardware", "tpu-v5p", "--topology", "16x16x16", "--mesh", "x=16,y=16,z=16"]
    d, f = 8192, 32768
    mm = ["--einsum", "bd,df->bf", "--dims", f"b=4096,d={d},f={f}"]
    specs = ["--lhs", "None,None", "--rhs", "x,None", "--out", "None,None"]
    pinned = run_json(
        capsys, "estimate", *v5p, *mm, *specs, "--at-op", "b=None,d=None,f=None", "--no-idle-axes"
    )
    assert [(c["kind"], c["axes"]) for c in pinned["collectives"]] == [("all-gather", ["x"])]
    assert pinned["time_s"]["comm"] == pytest.approx(2 * d * f / 1.8e11)
    assert pinned["crossover"]["size"] == pytest.approx(4.59e14 / 1.8e11)  # B > 2550
    wide = run_json(capsys, "estimate", *v5p, *mm, *specs, "--at-op", "b=None,d=None,f=None")
    assert wide["time_s"]["comm"] < pinned["time_s"]["comm"] / 2  # gathered over idle y, z
    only_x = run_json(capsys, "plan", *v5p, *mm, "--rhs", "x,None", "--axes", "x", "--top", "50")
    for strategy in only_x["strategies"]:
        assert all(c["axes"] == ["x"] for c in strategy["collectives"])
    named = run_json(capsys, "estimate", *v5p, *mm, *specs, "--names", "x,w,y")
    assert named["strategy"].startswith("x[B, D] · w[D_x, F] -> y[")


def test_crossover_command(capsys: pytest.CaptureFixture[str]) -> None:
    """One v5e chip turns compute-bound at B = C/W_hbm · DF/(DF - α(D+F)) with the output
    counted (roofline.md's 240 for B << D, F)."""
    d, f = 8192, 32768
    data = run_json(
        capsys, "crossover", "--hardware", "tpu-v5e", "--topology", "1x1", "--mesh", "x=1",
        "--einsum", "bd,df->bf", "--dims", f"b=8192,d={d},f={f}",
    )  # fmt: skip
    alpha = 1.97e14 / 8.2e11
    assert data["hbm"]["size"] == pytest.approx(alpha * d * f / (d * f - alpha * (d + f)))
    assert data["hbm"]["size"] == pytest.approx(240, rel=0.04)
    assert data["comm"]["note"] == "this strategy needs no communication"
    tp = run_json(
        capsys, "crossover", *V5E, *MATMUL, "--lhs", "None,None", "--rhs", "None,y",
        "--out", "None,y", "--at-op", "b=x,d=None,f=y",
    )  # fmt: skip
    assert tp["axis_limits"]["y"] is None  # no collective over y
    assert main(["crossover", *V5E, *MATMUL, "--dim", "q"]) == 1
    assert "no letter 'q'" in capsys.readouterr().err


def test_module_entry_point_and_no_jax_on_import() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sharding_roofline", "hardware", "list"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "tpu-v5e" in result.stdout
    code = (
        "import sharding_roofline, sys; "
        "sys.exit('jax' in sys.modules or 'matplotlib' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


@pytest.mark.jax
def test_validate_json_contract(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["validate", "--hardware", "tpu-v5e", "--topology", "2x4", "--mesh", "x=2,y=4"]
    spec = ["--einsum", "bd,df->bf", "--dims", "b=256,d=512,f=1024"]
    data = run_json(
        capsys, *argv, *spec, "--lhs", "None,y", "--rhs", "y,None", "--out", "x,y", "--execute"
    )
    assert data["verdict"] == "match"
    (predicted,) = data["predicted"]
    (observed,) = data["observed"]
    assert (predicted["kind"], predicted["axes"]) == ("reduce-scatter", ["y"])
    assert (
        observed["elements_out_per_chip"]
        == predicted["elements_out_per_chip"]
        == 256 // 2 * 1024 // 4
    )
    assert data["numerics"]["ok"] is True


@pytest.mark.jax
def test_plan_validate_adds_a_verdict_per_strategy(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["plan", "--hardware", "h100", "--topology", "1x8", "--mesh", "x=2,y=4"]
    spec = ["--einsum", "bd,df->bf", "--dims", "b=256,d=512,f=1024", "--rhs", "x,y", "--top", "3"]
    data = run_json(capsys, *argv, *spec, "--validate")
    assert len(data["validation"]) == len(data["strategies"]) == 3
    assert {v["verdict"] for v in data["validation"]} <= {"match", "xla-differs"}
