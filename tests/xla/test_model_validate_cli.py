"""``model --validate``: a whole model's training step compiled on simulated devices, from
the CLI (the shipped toy configs, configs/models/tiny-*.toml)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("jax")

from sharding_roofline.cli import main
from sharding_roofline.program.config import load_model_config

pytestmark = [pytest.mark.jax, pytest.mark.devices(8)]

DENSE = "configs/models/tiny-dense.toml"
ARGS = ["--hardware", "tpu-v5e", "--topology", "2x4", "--mesh", "x=2,y=4", "--batch-tokens", "128"]


def _model(capsys: pytest.CaptureFixture[str], *extra: str, config: str = DENSE) -> dict:
    code = main(["model", "--config", config, *ARGS, *extra, "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0, out
    return out


def test_model_validate_scans_the_blocks_and_counts_their_trip_count(
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = _model(capsys, "--strategy", "fsdp=x+y", "--validate", "--scan", "--execute")
    v = data["validation"]
    assert (v["pipeline"], v["scan"], v["verdict"]) == (False, True, "match")
    config = load_model_config(DENSE)
    # FSDP over all 8 chips: each block weight is gathered in the forward and the backward
    # and its gradient reduce-scattered, in each of the 2 layers: counted from the scan's
    # trip count (x2), not once
    q = [row for row in v["per_op"] if (row["part"], row["op"]) == ("block", "q_proj")]
    w_q = config.d * config.n * config.h  # elements of W_q
    gather = f"all-gather[x+y] {w_q // 8}->{w_q} x2"
    scatter = f"reduce-scatter[x+y] {w_q}->{w_q // 8} x2"
    assert [r["predicted"] for r in q] == [[gather], [gather, scatter]]
    assert all(r["agrees"] for r in q)
    assert v["flops"]["plan"] == v["flops"]["jit"] == v["flops"]["shard_map"]
    assert v["numerics"]["ok"]


def test_model_validate_a_pipeline_checks_the_stage_sends(
    capsys: pytest.CaptureFixture[str],
) -> None:
    v = _model(capsys, "--strategy", "pp=x,dp=y,mb=2", "--validate")["validation"]
    assert v["pipeline"] is True
    assert v["ok"], v["reasons"]
    # GPipe over 2 stages and 2 microbatches: m + P - 2 = 2 sends each way, each one
    # microbatch's activations per chip (64 tokens over y=4, d=32)
    assert v["forward_sends"] == v["backward_sends"] == v["expected_sends_per_direction"] == 2
    assert v["plan_elements_per_send"] == 64 // 4 * 32


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--strategy", "dp=x+y", "--scan"], "add --validate or drop --scan"),
        (["--strategy", "dp=x+y", "--execute"], "add --validate or drop --execute"),
        (["--search", "--validate"], "pass --strategy"),
        (["--strategy", "dp=x+y", "--validate", "--processes", "2"], "drop --processes"),
        (["--strategy", "dp=x,tp=y,mb=2", "--validate"], "drop mb= and --microbatches"),
    ],
)
def test_model_validate_refuses_what_it_cannot_do(
    capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    code = main(["model", "--config", DENSE, *ARGS, *extra, "--json"])
    assert code == 1
    assert message in json.loads(capsys.readouterr().out)["error"]


def test_model_validate_refuses_a_big_model_with_the_limit(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(["model", "--config", "configs/models/llama3-8b.toml", "--hardware", "tpu-v5e",
                 "--topology", "2x4", "--batch-tokens", "8192", "--seq-len", "1024",
                 "--strategy", "fsdp=x+y", "--validate", "--json"])  # fmt: skip
    assert code == 1
    assert "at most 16,777,216" in json.loads(capsys.readouterr().out)["error"]
