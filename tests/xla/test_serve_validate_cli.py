"""``serve --validate``: one layer of each part of a serving step (decode or prefill)
compiled on simulated devices, from the CLI (the shipped toy configs,
configs/models/tiny-*.toml)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("jax")

from sharding_roofline.cli import main
from sharding_roofline.program.config import load_model_config

pytestmark = [pytest.mark.jax, pytest.mark.devices(8)]

DENSE = "configs/models/tiny-dense.toml"
MOE = "configs/models/tiny-moe.toml"
MESH = ["--hardware", "tpu-v5e", "--topology", "2x4", "--mesh", "x=2,y=4"]
CHIPS = 8


def _serve(capsys: pytest.CaptureFixture[str], *extra: str, config: str = DENSE) -> dict:
    code = main(["serve", "--config", config, *MESH, *extra, "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0, out
    return out


def _block_flops(tokens: int, attention: int) -> tuple[int, int]:
    """The tiny dense block's matmul FLOPs for ``tokens`` tokens: (projections and MLP,
    the scores and context), from the config's dims, not from the plan."""
    c = load_model_config(DENSE)
    per_token = 2 * (2 * c.d * c.n * c.h + 2 * c.d * c.k * c.h + 3 * c.d * c.f)
    return tokens * per_token, 2 * 2 * attention * c.n * c.h


def test_serve_validate_a_decode_step_against_xla_and_numpy(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """dp=y,tp=x: the sequences over y, the 2 KV heads and the MLP's width over x, so every
    matmul of the decode block splits 8 ways."""
    batch, context = 8, 32
    data = _serve(capsys, "--batch", str(batch), "--context", str(context),
                  "--strategy", "dp=y,tp=x", "--validate", "--execute")  # fmt: skip
    v = data["validation"]
    assert (v["phase"], v["strategy"], v["model"]) == ("decode", "dp=y,tp=x", "tiny-dense")
    assert v["verdict"] != "mismatch"
    assert [(p["part"], p["layers"]) for p in v["parts"]] == [("block", 2), ("ends", 1)]
    block = v["parts"][0]
    assert block["verdict"] == "match", block["reasons"]
    # one new token per sequence, each attending to `context` cached positions
    weights, attention = _block_flops(batch, batch * context)
    assert block["flops"]["plan"] == block["flops"]["jit"] == (weights + attention) / CHIPS
    assert block["planned_flops"] is None  # decode counts every FLOP whole
    # all-reduces over x (tp) after the attention and the MLP, [B/4, D] per chip each
    d = load_model_config(DENSE).d
    reduce = f"all-reduce[x] {batch // 4 * d}->{batch // 4 * d}"
    assert sorted(r for op in block["per_op"] for r in op["predicted"]) == [reduce, reduce]
    assert v["numerics_ok"] is True
    assert v["numpy_rel_error"] < 1e-4
    assert all(p["numerics"]["ok"] for p in v["parts"])


def test_serve_validate_a_prefill_counts_the_causal_matmuls_whole(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A flash prefill counts QK^T and AV at half; the compiled program computes them whole,
    and the validator checks XLA's FLOPs against the plan with them whole."""
    batch, context = 4, 32
    data = _serve(capsys, "--prefill", "--batch", str(batch), "--context", str(context),
                  "--strategy", "dp=y,tp=x", "--validate", "--execute")  # fmt: skip
    v = data["validation"]
    assert v["phase"] == "prefill"
    assert v["verdict"] != "mismatch"
    block = v["parts"][0]
    weights, attention = _block_flops(batch * context, batch * context * context)
    assert block["flops"]["jit"] == block["flops"]["plan"] == (weights + attention) / CHIPS
    assert block["planned_flops"] == (weights + attention / 2) / CHIPS
    assert any("flash attention" in note for note in v["notes"])
    assert v["numpy_rel_error"] is None  # numpy's reference is a decode step's
    assert v["numerics_ok"] is True


def test_serve_validate_prints_each_part_of_an_moe_decode(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(["serve", "--config", MOE, *MESH, "--batch", "8", "--context", "32",
                 "--strategy", "tp=x+y,ep=x", "--validate"])  # fmt: skip
    text = capsys.readouterr().out
    assert code == 0
    section = text.split("validation against XLA of the decode step:\n")[1]
    assert section.startswith("decode step of tiny-moe: tp=x+y,ep=x on tpu-v5e x=2,y=4")
    assert "part moe block (one layer of 2 per step):" in section
    assert "part ends (once per step):" in section
    assert "verdict: mismatch" not in section
    assert "numerics" not in section  # not executed


DECODE = ["--batch", "8", "--context", "32"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([*DECODE, "--validate"], "pass --strategy"),
        ([*DECODE, "--search", "--validate"], "pass --strategy"),
        ([*DECODE, "--strategy", "tp=x+y", "--validate", "--processes", "2"], "drop --processes"),
        ([*DECODE, "--strategy", "tp=x+y", "--execute"], "add --validate or drop --execute"),
        ([*DECODE, "--strategy", "tp=x+y", "--validate", "--devices", "4"], "pass --devices 8"),
    ],
)
def test_serve_validate_refuses_what_it_cannot_do(
    capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    code = main(["serve", "--config", DENSE, *MESH, *extra, "--json"])
    assert code == 1
    assert message in json.loads(capsys.readouterr().out)["error"]


def test_serve_validate_refuses_sizes_too_large_with_the_limit(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(["serve", "--config", "configs/models/llama3-70b.toml", *MESH, "--batch", "64",
                 "--context", "8192", "--strategy", "tp=x+y", "--validate", "--execute",
                 "--json"])  # fmt: skip
    assert code == 1
    error = json.loads(capsys.readouterr().out)["error"]
    assert "more than the 4 GiB" in error
    assert "drop --execute" in error
    code = main(["serve", "--config", DENSE, "--hardware", "tpu-v5p", "--topology", "16x16x24",
                 "--batch", "6144", "--context", "32", "--strategy", "dp=x+y+z", "--validate",
                 "--json"])  # fmt: skip
    assert code == 1
    error = json.loads(capsys.readouterr().out)["error"]
    assert "6144 devices, more than the 4096" in error
    assert "smaller mesh" in error
