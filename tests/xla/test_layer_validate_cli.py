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
