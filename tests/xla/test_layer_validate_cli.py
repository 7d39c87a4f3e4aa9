"""``layer --validate``: the best plan's program compiled on simulated devices, from the CLI."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("jax")

from sharding_roofline.cli import main

pytestmark = pytest.mark.jax

MLP = ["layer", "--hardware", "tpu-v5e", "--topology", "2x4", "--mesh", "x=2,y=4",
       "--layer", "mlp", "--dims", "d=256,f=1024", "--batch-tokens", "512"]  # fmt: skip


def test_layer_validate_reports_the_verdict_and_numerics(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main([*MLP, "--backward", "--strategy", "fsdp=x,sp=y", "--validate", "--execute",
                 "--json"])  # fmt: skip
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    validation = data["validation"]
    assert validation["verdict"] in ("match", "xla-differs")
    assert validation["strategy"] == "fsdp=x,sp=y"
    # FLOPs of forward+backward: 3x the forward's 2 matmuls of 2·B·D·F over 8 chips
    assert validation["flops"]["plan"] == 3 * 2 * 2 * 512 * 256 * 1024 / 8


def test_layer_validate_of_a_stack_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    code = main([*MLP, "--strategy", "fsdp=x,sp=y", "--layers", "2", "--validate", "--json"])
    assert code == 1
    assert "drop --layers 2" in json.loads(capsys.readouterr().out)["error"]


BLOCK = ["layer", "--hardware", "h100", "--topology", "1x8", "--mesh", "x=2,y=4",
         "--layer", "block", "--dims", "d=64,f=128,n=4,k=4,h=16,t=32", "--batch-tokens", "256",
         "--backward", "--validate", "--execute", "--json"]  # fmt: skip


@pytest.mark.slow
def test_regather_is_what_the_plans_own_program_does(capsys: pytest.CaptureFixture[str]) -> None:
    """``regather=1``: the plan's shard_map program does the plan's collectives, two more
    all-gathers than without it (xn1 and xn2 gathered again in the backward, 2048 -> 8192
    elements per chip), and computes the unsharded gradients."""
    gathers = {}
    for strategy in ("dp=x,sp=y", "dp=x,sp=y,regather=1"):
        assert main([*BLOCK, "--strategy", strategy]) == 0
        validation = json.loads(capsys.readouterr().out)["validation"]
        assert validation["verdict"] != "mismatch"
        assert validation["numerics"]["shard_map_max_rel_error"] < 2e-4

        def kinds(key: str, v: dict[str, list[dict[str, object]]] = validation) -> list[str]:
            return sorted(f"{c['kind']} {c['elements_in_per_chip']}" for c in v[key])

        assert kinds("shard_map") == kinds("predicted")
        gathers[strategy] = kinds("shard_map").count("all-gather 2048")
    assert gathers["dp=x,sp=y,regather=1"] == gathers["dp=x,sp=y"] + 2
