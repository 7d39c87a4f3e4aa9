"""Serving: the prefill and decode programs, the serving strategies and their layouts, the
plans' memory, batch limits and curves, the ``serve`` command and its figure.

Expected values come from the models' shapes and the hardware's numbers, not from the
tool's own output."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")

from sharding_roofline.cli import main
from sharding_roofline.errors import PlanError, SpecError, UnknownNameError
from sharding_roofline.mesh import DeviceMesh
from sharding_roofline.plans import Rejected
from sharding_roofline.plot.serving import latency_throughput as draw
from sharding_roofline.plot.serving import step_breakdown
from sharding_roofline.presets import load_preset
from sharding_roofline.program.config import load_model_config
from sharding_roofline.program.graph import OpKind, TensorKind
from sharding_roofline.program.serve_plan import (
    ServePlan,
    latency_throughput,
    max_batch,
    plan_serving,
    require,
    search_serving,
    serve,
)
from sharding_roofline.program.serve_strategies import ServeStrategy, serving_candidates
from sharding_roofline.program.serving import (
    Serving,
    decode_block,
    decode_moe_block,
    prefill_block,
    serving_parts,
)

V5E = load_preset("tpu-v5e")
LLAMA3_70B = load_model_config("configs/models/llama3-70b.toml")
LLAMA3_8B = load_model_config("configs/models/llama3-8b.toml")
MIXTRAL = load_model_config("configs/models/mixtral-8x7b.toml")
MESH_4X8 = DeviceMesh.create(V5E, "x=4,y=8", "4x8")


def _plan(config: object, mesh: DeviceMesh, strategy: str, serving: Serving) -> ServePlan:
    return require(plan_serving(config, mesh, strategy, serving))  # type: ignore[arg-type]


def _collectives(plan: ServePlan, part: str = "block") -> list[tuple[str, str, tuple[str, ...]]]:
    return [
        (op.name, s.cost.kind.value, s.cost.axes)
        for op in plan.part(part).ops
        for s in op.collectives
        if s.cost is not None
    ]


# -- programs ------------------------------------------------------------------------------


def test_decode_block_reads_the_cache_in_its_dtype() -> None:
    serving = Serving(batch=16, context=4096, weights="int8", kv="float8_e4m3fn")
    program = decode_block(LLAMA3_70B, serving)
    sizes = program.sizes
    assert (sizes["b"], sizes["s"], sizes["k"], sizes["g"], sizes["h"]) == (16, 4096, 8, 8, 128)
    for name in ("k_cache", "v_cache"):
        cache = program.tensor(name)
        assert cache.kind is TensorKind.INPUT
        assert cache.letters == "bskh"
        assert cache.itemsize == 1
    assert program.tensor("k_new").dtype == "float8_e4m3fn"  # the new token's cache entry
    assert program.tensor("w_q").dtype == "int8"
    assert program.tensor("norm1_scale").dtype == "bfloat16"  # a norm scale stays in compute
    assert program.tensor("x").dtype == "bfloat16"
    # every einsum's first operand is an activation, so its FLOPs run at the compute peak
    for op in program.ops:
        if op.kind is OpKind.EINSUM:
            assert program.tensor(op.inputs[0].tensor).kind is not TensorKind.PARAM


def test_decode_flops_are_two_per_weight_plus_attention_over_the_cache() -> None:
    """transformers.md: a forward pass costs 2·params·tokens in its matmuls; attention over a
    cache of S positions adds QK^T and AV, 2·S·N·H each per token per layer."""
    config, batch, context = LLAMA3_70B, 8, 2048
    program = decode_block(config, Serving(batch=batch, context=context))
    sizes = program.sizes
    flops = sum(
        2 * math.prod(sizes[c] for c in op.letters)
        for op in program.ops
        if op.kind is OpKind.EINSUM
    )
    d, f, n, k, h = config.d, config.f, config.n, config.k, config.h
    block_params = 2 * d * n * h + 2 * d * k * h + 3 * d * f
    assert flops == 2 * batch * block_params + 2 * 2 * batch * context * n * h


def test_prefill_block_writes_the_cache_once() -> None:
    serving = Serving(phase="prefill", batch=2, context=1024, kv="int8")
    program = prefill_block(LLAMA3_8B, serving)
    assert program.tensor("k").dtype == "int8"
    assert "k" in program.outputs
    assert program.tokens == 2 * 1024
    # flash attention skips the causal mask's upper half
    assert program.op("scores").flops_scale == 0.5


@pytest.mark.parametrize(
    ("name", "kv_dtype", "expected"),
    [
        pytest.param("llama3-70b", "int8", 2 * 80 * 8 * 128, id="llama3-70b-int8"),
        pytest.param("llama3-70b", "bfloat16", 2 * 80 * 8 * 128 * 2, id="llama3-70b-bf16"),
        # inference.md: LLaMA-2 13B (MHA, 40 KV heads) caches 6.7 GB for one 8192-token
        # sequence in bf16
        pytest.param("llama2-13b", "bfloat16", 2 * 40 * 40 * 128 * 2, id="llama2-13b"),
    ],
)
def test_kv_bytes_per_token(name: str, kv_dtype: str, expected: int) -> None:
    config = load_model_config(f"configs/models/{name}.toml")
    plan = _plan(config, MESH_4X8, "tp=x+y", Serving(batch=8, context=1024, kv=kv_dtype))
    assert plan.kv_bytes_per_token == expected
    if name == "llama2-13b":
        assert expected * 8192 == pytest.approx(6.7e9, rel=0.01)


def test_moe_decode_block_has_experts_and_slots() -> None:
    program = decode_moe_block(MIXTRAL, Serving(batch=32, context=1024))
    sizes = program.sizes
    assert sizes["e"] == 8
    assert sizes["c"] == 32 * 2 // 8  # tokens · top_k / E
    assert {p.name for p in program.params} >= {"w_gate_e", "w_up_e", "w_down_e", "w_router"}
    parts = serving_parts(MIXTRAL, Serving(batch=32, context=1024))
    assert [(p.name, p.count) for p in parts] == [("moe block", 32), ("ends", 1)]


def test_serving_rejects_bad_input() -> None:
    with pytest.raises(SpecError, match="--batch N"):
        Serving(batch=0, context=1024)
    with pytest.raises(SpecError, match="--context"):
        Serving(batch=1, context=-5)
    with pytest.raises(UnknownNameError, match="unknown dtype 'int7'"):
        Serving(batch=1, context=8, weights="int7")
    with pytest.raises(SpecError, match="prefill or decode"):
        Serving(phase="sample", batch=1, context=8)
    with pytest.raises(SpecError, match="flash or materialized"):
        Serving(batch=1, context=8, attention="ring")


# -- strategies ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["tp=x+y", "tp=x+y,kvb=y", "tp=y,d=x,kvb=x", "dp=x,tp=y", "sp=x+y", "tp=x+y,ep=x", "fsdp=x+y"],
)
def test_strategy_names_parse_back(text: str) -> None:
    strategy = ServeStrategy.parse(text)
    assert strategy.name == text
    assert ServeStrategy.parse(strategy.name) == strategy


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("tp=x,dp=x", "given to both", id="axis-twice"),
        pytest.param("tp=x,kvb=y", "kvb axis 'y' is not a model axis", id="kvb-not-model"),
        pytest.param("tp=x,cp=x", "cp axis 'x' is not a dp axis", id="cp-not-dp"),
        pytest.param("tp=x,ep=y", "ep axis 'y' is neither", id="ep-elsewhere"),
        pytest.param("d=x", "needs tp axes", id="2d-without-tp"),
        pytest.param("sp=y,d=x", "use one of them", id="sp-and-2d"),
        pytest.param("tp", "not KEY=AXES", id="no-axes"),
        pytest.param("zz=x", "unknown key 'zz'", id="unknown-key"),
        pytest.param("", "empty serving strategy", id="empty"),
    ],
)
def test_bad_strategies_say_why(text: str, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        ServeStrategy.parse(text)


def test_phase_specific_strategies_are_refused() -> None:
    decode = Serving(batch=8, context=1024)
    with pytest.raises(SpecError, match="cp splits the prompt"):
        plan_serving(LLAMA3_8B, MESH_4X8, "dp=x,tp=y,cp=x", decode)
    with pytest.raises(SpecError, match="drop kvb for --prefill"):
        plan_serving(LLAMA3_8B, MESH_4X8, "tp=x+y,kvb=y", decode.with_phase("prefill"))
    with pytest.raises(SpecError, match="has axes x, y"):
        plan_serving(LLAMA3_8B, MESH_4X8, "tp=q", decode)


def test_a_batch_that_does_not_split_is_rejected_with_the_fix() -> None:
    result = plan_serving(LLAMA3_70B, MESH_4X8, "tp=x+y,kvb=y", Serving(batch=12, context=512))
    assert isinstance(result, Rejected)
    assert "multiple of 8" in result.reason
    with pytest.raises(PlanError, match="multiple of 8"):
        require(result, LLAMA3_70B)


def test_candidates_cover_the_books_layouts() -> None:
    names = {c.name for c in serving_candidates(MESH_4X8, decode=True, moe=False, kv_heads=8)}
    assert {"tp=x+y", "tp=x+y,kvb=y", "dp=x,tp=y", "tp=y,d=x", "fsdp=x+y"} <= names
    prefill = {c.name for c in serving_candidates(MESH_4X8, decode=False, moe=False, kv_heads=8)}
    assert "dp=x,tp=y,cp=x" in prefill
    assert not any("kvb" in name for name in prefill)


# -- layouts and their collectives ---------------------------------------------------------------


def test_kv_cache_over_heads_then_batch() -> None:
    """inference.md: shard the KV cache over heads (K-way), then over the batch,
    KV[2, B_Z, S, K_Y, H]; it costs two all-to-alls per attention layer."""
    batch, context = 64, 8192
    serving = Serving(batch=batch, context=context)
    kv_total = batch * context * 2 * 80 * 8 * 128 * 2  # bytes, bf16, every layer
    chips = MESH_4X8.num_devices
    heads_only = _plan(LLAMA3_70B, MESH_4X8, "tp=x+y", serving)
    both = _plan(LLAMA3_70B, MESH_4X8, "tp=x+y,kvb=y", serving)
    # the 8 KV heads split over x (4); without kvb each y-group of 8 chips holds one copy
    assert heads_only.memory.kv_cache == pytest.approx(kv_total / 4, rel=1e-9)
    assert both.memory.kv_cache == pytest.approx(kv_total / chips, rel=1e-9)
    assert both.kv_hbm_s == pytest.approx(kv_total / chips / V5E.chip.hbm_bytes_per_s, rel=1e-9)
    moves = [c for c in _collectives(both) if c[1] == "all-to-all"]
    assert [(name, axes) for name, _, axes in moves] == [("q_proj", ("y",)), ("context", ("y",))]
    assert not [c for c in _collectives(heads_only) if c[1] == "all-to-all"]
    assert both.step_time_s < heads_only.step_time_s


def test_2d_weight_stationary_collectives() -> None:
    """inference.md Q7: AllGather over YZ, AllReduce over X between the matmuls,
    ReduceScatter over YZ after; and the norm's sum of squares, a [B] all-reduce."""
    plan = _plan(LLAMA3_70B, MESH_4X8, "tp=y,d=x", Serving(batch=32, context=1024))
    mlp = [c for c in _collectives(plan) if c[0] in ("gate", "up", "down")]
    assert ("gate", "all-gather", ("y",)) in mlp
    assert ("gate", "all-reduce", ("x",)) in mlp
    assert ("down", "reduce-scatter", ("y",)) in mlp
    norm = [c for c in _collectives(plan) if c[0] == "norm2_ss"]
    assert norm == [("norm2_ss", "all-reduce", ("x", "y"))]
    ss = plan.part("block").op("norm2_ss").collectives[0].cost
    assert ss is not None
    assert ss.elements_in_per_chip == 32  # one float32 per sequence
    # every weight is split over all 32 chips (D over x, F or heads over y)
    w_up = dict(plan.part("block").op("up").at_op)["w_up"]
    assert w_up == (("x",), ("y",))


def test_replicas_do_not_communicate() -> None:
    """inference.md: data parallelism at the model level means copies of the model, each on
    its own batch: no collective at all."""
    mesh = DeviceMesh.create(V5E, "x=4,y=8", "4x8")
    plan = _plan(LLAMA3_8B, mesh, "dp=x+y", Serving(batch=32, context=1024, weights="int8"))
    assert plan.cost.comm == ()
    params = LLAMA3_8B.params()["total"]
    assert plan.memory.weights == pytest.approx(params, rel=1e-3)  # int8: a byte each
    assert plan.tokens_per_s_per_chip == pytest.approx(32 / plan.step_time_s / 32)


def test_fsdp_loses_for_decode() -> None:
    """inference.md: "FSDP is impossible" for generation: moving weights over ICI every step
    is far slower than reading them from HBM."""
    plans, _ = search_serving(LLAMA3_70B, MESH_4X8, Serving(batch=64, context=4096))
    names = [p.name for p in plans]
    fsdp = next(p for p in plans if p.name == "fsdp=x+y")
    best = plans[0]
    assert names.index("fsdp=x+y") > 0
    assert fsdp.bottleneck == "comm"
    weight_bytes = 2 * LLAMA3_70B.params()["total"]
    # each chip receives (nearly) every weight over its 4 links: at least bytes/(4·W_uni)
    assert fsdp.step_time_s > weight_bytes * 31 / 32 / (4 * 4.5e10) * 0.9
    assert fsdp.step_time_s > 10 * best.step_time_s


def test_expert_parallelism_over_a_model_axis_moves_no_tokens() -> None:
    """With the tokens replicated over the model axes, each chip runs its own experts on
    every token: no all-to-all; over a replica axis, the tokens travel to their experts."""
    mesh = DeviceMesh.create(V5E, "x=8,y=4", "8x4")
    serving = Serving(batch=64, context=1024)
    model_ep = _plan(MIXTRAL, mesh, "tp=x+y,ep=x", serving)
    kinds = {kind for _, kind, _ in _collectives(model_ep, "moe block")}
    assert "all-to-all" not in kinds
    expert_w = dict(model_ep.part("moe block").op("expert_up").at_op)["w_up_e"]
    assert expert_w == (("x",), (), ("y",))  # experts over x, each expert's F over y
    data_ep = _plan(MIXTRAL, mesh, "dp=x,tp=y,ep=x", serving)
    moved = {(n, k, a) for n, k, a in _collectives(data_ep, "moe block")}
    # the book's two all-to-alls of an MoE layer: to the experts and back
    assert ("dispatch", "all-to-all", ("x",)) in moved
    assert ("expert_down", "all-to-all", ("x",)) in moved


# -- memory and batches ----------------------------------------------------------------------------


def test_max_batch_fills_hbm_with_cache() -> None:
    serving = Serving(batch=32, context=8192)
    plan = _plan(LLAMA3_70B, MESH_4X8, "tp=x+y,kvb=y", serving)
    kv_per_sequence_per_chip = 8192 * 2 * 80 * 8 * 128 * 2 / 32
    room = V5E.chip.hbm_capacity_bytes - plan.memory.weights
    fit = max_batch(plan)
    assert fit % 8 == 0
    # the activations take a little too: within one step of 8 of the cache-only bound
    assert math.floor(room / kv_per_sequence_per_chip) - 8 <= fit
    assert fit <= room / kv_per_sequence_per_chip
    at = _plan(LLAMA3_70B, MESH_4X8, "tp=x+y,kvb=y", serving.with_batch(fit))
    over = _plan(LLAMA3_70B, MESH_4X8, "tp=x+y,kvb=y", serving.with_batch(fit + 8))
    assert at.fits
    assert not over.fits


def test_weights_that_do_not_fit_leave_no_batch() -> None:
    mesh = DeviceMesh.create(V5E, "x=2,y=2", "2x2")
    plan = _plan(LLAMA3_70B, mesh, "tp=x+y", Serving(batch=4, context=1024))
    assert plan.memory.weights > V5E.chip.hbm_capacity_bytes
    assert max_batch(plan) == 0
    assert "more than the" in plan.memory.overflow(V5E.chip.hbm_capacity_bytes)


def test_latency_throughput_curve() -> None:
    curve = latency_throughput(
        LLAMA3_70B, MESH_4X8, "tp=x+y,kvb=y", Serving(batch=64, context=4096, weights="int8")
    )
    batches = [p.batch for p in curve.points]
    assert batches == sorted(batches)
    assert all(b % 8 == 0 for b in batches)
    steps = [p.step_time_s for p in curve.points]
    rates = [p.tokens_per_s_per_chip for p in curve.points]
    assert steps == sorted(steps)  # a bigger batch never makes the step faster
    assert rates == sorted(rates)  # nor the throughput lower
    assert curve.critical_batch_weights_only == pytest.approx(1.97e14 / 8.2e11 / 2, rel=1e-9)
    assert curve.max_batch_point is not None
    assert curve.max_batch_point.fits
    assert curve.max_batch_point.batch == curve.max_batch
    assert any(not p.fits for p in curve.points)  # the sweep runs past what fits
    with pytest.raises(SpecError, match="multiples of 8"):
        latency_throughput(
            LLAMA3_70B, MESH_4X8, "tp=x+y,kvb=y", Serving(batch=64, context=64), [12]
        )


def test_serve_adds_the_prefill_and_the_disaggregated_pools() -> None:
    """applied-inference.md: P prefill servers keep G generate servers busy when
    P/T_prefill = B·G/(T_step·n_decode)."""
    pool = DeviceMesh.create(V5E, "x=4,y=4", "4x4")
    serving = Serving(batch=32, context=4096, weights="int8", kv="int8")
    result = serve(LLAMA3_70B, MESH_4X8, serving, prefill_mesh=pool, decode_tokens=512)
    assert result.prefill is not None
    assert result.prefill.serving.batch == 1
    assert result.prefill.serving.context == 4096
    assert result.time_to_first_token_s(result.best) == result.prefill.step_time_s
    d = result.disaggregated
    assert d is not None
    expected = 32 * result.prefill.step_time_s / (1 * result.best.step_time_s * 512)
    assert d.prefill_per_decode == pytest.approx(expected)
    # one prompt's cache over the pool's DCN: its bytes over 16 chips' egress
    dcn = V5E.scale_out[-1].bytes_per_s_per_chip_per_direction
    assert d.kv_transfer_s == pytest.approx(163_840 * 4096 / (16 * dcn))


# -- the command ---------------------------------------------------------------------------------

ARGS = ["serve", "--config", "configs/models/llama3-70b.toml", "--hardware", "tpu-v5e"]


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, dict[str, object]]:
    code = main([*argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_serve_json_has_the_contract_fields(capsys: pytest.CaptureFixture[str]) -> None:
    code, data = _json(capsys, [*ARGS, "--topology", "4x8", "--batch", "64", "--context", "8192"])
    assert code == 0
    strategies = data["strategies"]
    assert isinstance(strategies, list)
    assert strategies
    for item in strategies:
        for key in (
            "name", "step_time_s", "tokens_per_s_per_chip", "kv_bytes_per_token",
            "memory_per_chip_bytes", "max_batch", "bottleneck",
        ):  # fmt: skip
            assert key in item
        assert item["kv_bytes_per_token"] == 327_680
        assert set(item["memory_per_chip_bytes"]) >= {"weights", "kv_cache", "activations", "peak"}
        assert item["bottleneck"] in ("compute", "hbm", "comm")
    steps = [
        s["step_time_s"] for s in strategies if s["memory_per_chip_bytes"]["peak"] <= 16 * 2**30
    ]
    assert steps == sorted(steps)  # best first
    assert data["mesh"] == {"x": 4, "y": 8}  # the topology's dimensions as axes
    assert data["prefill"]["time_to_first_token_s"] > 0


def test_serve_strategy_name_passes_back(capsys: pytest.CaptureFixture[str]) -> None:
    base = [*ARGS, "--topology", "4x8", "--batch", "32", "--context", "4096", "--kv", "int8"]
    _, searched = _json(capsys, [*base, "--top", "1"])
    best = searched["strategies"][0]
    _, again = _json(capsys, [*base, "--strategy", best["name"]])
    assert again["strategies"][0]["name"] == best["name"]
    assert again["strategies"][0]["step_time_s"] == pytest.approx(best["step_time_s"])


def test_serve_prefill(capsys: pytest.CaptureFixture[str]) -> None:
    code, data = _json(
        capsys,
        [*ARGS, "--topology", "4x4", "--batch", "1", "--context", "8192", "--prefill"],
    )
    assert code == 0
    assert data["phase"] == "prefill"
    best = data["strategies"][0]
    assert best["time_to_first_token_s"] == best["step_time_s"]
    # prefill is compute-bound: at least 2·params·tokens FLOPs at 16 chips' peak
    floor = 2 * LLAMA3_70B.params()["total"] * 8192 / (16 * 1.97e14)
    assert best["step_time_s"] > floor


def test_serve_errors_are_json_with_a_fix(capsys: pytest.CaptureFixture[str]) -> None:
    code, data = _json(capsys, [*ARGS, "--topology", "4x8", "--batch", "12", "--strategy",
                                "tp=x+y,kvb=y"])  # fmt: skip
    assert code == 1
    assert "multiple of 8" in data["error"]
    assert data["fix"]
    code, data = _json(capsys, [*ARGS, "--batch", "8"])
    assert code == 1
    assert "--topology" in data["error"]
    code, data = _json(capsys, [*ARGS, "--topology", "4x8", "--batch", "8", "--weights", "int3"])
    assert code == 1
    assert "int3" in data["error"]
    code = main([*ARGS, "--topology", "4x8", "--batch", "8", "--prefill", "--decode"])
    assert code == 2


def test_serve_text_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "serve.png"
    code = main([*ARGS, "--topology", "4x4", "--batch", "16", "--weights", "int8", "--kv",
                 "int8", "--context", "4096", "--plot", str(out)])  # fmt: skip
    text = capsys.readouterr().out
    assert code == 0
    assert out.stat().st_size > 10_000
    assert "time to first token" in text
    assert "best: " in text
    assert main([*ARGS, "--topology", "4x4", "--batch", "16", "--plot", str(out)]) == 1
    assert "exists" in capsys.readouterr().err


def test_plot_carries_the_curve() -> None:
    curve = latency_throughput(
        LLAMA3_70B, MESH_4X8, "tp=x+y,kvb=y", Serving(batch=32, context=4096, weights="int8")
    )
    ax = draw(curve)
    lines = {line.get_gid(): line for line in ax.get_lines()}
    fit = [p for p in curve.points if p.fits]
    assert list(lines["serve:curve"].get_xdata()) == pytest.approx([p.step_time_s for p in fit])
    assert list(lines["serve:curve"].get_ydata()) == pytest.approx(
        [p.tokens_per_s_per_chip for p in fit]
    )
    assert "serve:no-fit" in lines
    assert "serve:critical" in lines
    (x,) = lines["serve:max-batch"].get_xdata()
    assert curve.max_batch_point is not None
    assert x == pytest.approx(curve.max_batch_point.step_time_s)
    right = step_breakdown(curve)
    parts = {line.get_gid(): line for line in right.get_lines()}
    weights = list(parts["serve:part:weights"].get_ydata())
    assert weights == pytest.approx([weights[0]] * len(weights))  # the weights do not grow
    compute = list(parts["serve:part:compute"].get_ydata())
    batches = [p.batch for p in curve.points]
    assert compute[-1] / compute[0] == pytest.approx(batches[-1] / batches[0], rel=1e-6)


def test_max_batch_steps_down_to_a_batch_the_layout_divides() -> None:
    """Mixtral's capacity slots (B·k/E per expert) split over the expert axis: a batch whose
    slots do not divide is refused, and the largest batch that fits is one that divides."""
    serving = Serving(batch=128, context=4096, weights="int8", kv="int8")
    plan = _plan(MIXTRAL, MESH_4X8, "dp=x,tp=y,ep=x", serving)
    fit = max_batch(plan)
    assert fit > serving.batch
    at = plan_serving(MIXTRAL, MESH_4X8, "dp=x,tp=y,ep=x", serving.with_batch(fit))
    assert not isinstance(at, Rejected)
    assert at.fits
    kv_per_sequence_per_chip = 4096 * 2 * 32 * 8 * 128 / 32  # int8, over 4 replicas x 8 heads
    assert fit <= (V5E.chip.hbm_capacity_bytes - plan.memory.weights) / kv_per_sequence_per_chip
