"""A decode step of a small GQA model on simulated CPU devices: the plan's collectives
against the compiled HLO's, and both programs' numbers against numpy."""

from __future__ import annotations

import pytest

jax = pytest.importorskip("jax")

from sharding_roofline.errors import ValidationError  # noqa: E402
from sharding_roofline.mesh import DeviceMesh  # noqa: E402
from sharding_roofline.presets import load_preset  # noqa: E402
from sharding_roofline.program.config import ModelConfig, load_model_config  # noqa: E402
from sharding_roofline.program.serve_plan import ServePlan, plan_serving, require  # noqa: E402
from sharding_roofline.program.serving import Serving  # noqa: E402
from sharding_roofline.xla.compare import Verdict  # noqa: E402
from sharding_roofline.xla.serving import combined, predicted, validate_decode  # noqa: E402

pytestmark = [pytest.mark.jax, pytest.mark.devices(8)]

#: A GQA model small enough to run: 8 query heads over 2 KV heads of 16
TINY = ModelConfig(name="tiny-gqa", d=64, f=128, n=8, k=2, h=16, layers=2, vocab=256)
B, S = 8, 32
MESH = DeviceMesh.create(load_preset("tpu-v5e"), "x=2,y=4")


def _plan(strategy: str) -> ServePlan:
    return require(plan_serving(TINY, MESH, strategy, Serving(batch=B, context=S)))


def _assert_valid(strategy: str) -> None:
    result = validate_decode(_plan(strategy))
    assert result.proof_agrees, result.difference("proof")
    assert result.verdict in (Verdict.MATCH, Verdict.XLA_DIFFERS), result.difference()
    assert result.numerics_ok, (result.jit_error, result.shard_map_error, result.scale)


def test_tensor_parallel_decode() -> None:
    """tp=x+y: activations replicated between blocks, one all-reduce of [B, D] after the
    attention and one after the MLP, over both axes (Megatron)."""
    plan = _plan("tp=x+y")
    reduce = ("all-reduce", ("x", "y"), B * TINY.d, B * TINY.d)
    assert predicted(plan) == [reduce, reduce]
    _assert_valid("tp=x+y")


def test_kv_cache_sharded_over_heads_then_batch() -> None:
    """tp=x+y,kvb=y: the 2 KV heads over x, the cache's batch over y; the queries go to the
    cache's layout and the attention's result back by all-to-all over y, each device
    holding B·(K/2)·(G/4)·H of them."""
    plan = _plan("tp=x+y,kvb=y")
    moved = B * (TINY.k // 2) * (TINY.n // TINY.k // 4) * TINY.h
    records = predicted(plan)
    assert records.count(("all-to-all", ("y",), moved, moved)) == 2
    cache = dict(plan.part("block").op("scores").at_op)["k_cache"]
    assert cache == (("y",), (), ("x",), ())  # [B_y, S, K_x, H]
    _assert_valid("tp=x+y,kvb=y")


def test_2d_weight_stationary_decode() -> None:
    """tp=y,d=x: the norm's [B] sum of squares all-reduced, activations gathered over y and
    reduce-scattered back, partial sums all-reduced over x between the matmuls (XLA combines
    the Q/K/V all-reduces into one: same bytes)."""
    plan = _plan("tp=y,d=x")
    records = predicted(plan)
    assert records.count(("all-reduce", ("x", "y"), B, B)) == 2  # the two norms
    assert records.count(("reduce-scatter", ("y",), B * TINY.d // 2, B * TINY.d // 8)) == 2
    # over x: Q's heads split 4 ways over y, K and V whole (2 KV heads do not split 4 ways;
    # the query groups take y), the MLP's gate and up split 4 ways
    partial = B * TINY.n * TINY.h // 4 + 2 * B * TINY.k * TINY.h + 2 * B * TINY.f // 4
    assert combined(records)[("all-reduce", ("x",), partial, partial)] == 1
    _assert_valid("tp=y,d=x")


def test_replicas_with_tensor_parallelism() -> None:
    plan = _plan("dp=x,tp=y")
    reduce = ("all-reduce", ("y",), B // 2 * TINY.d, B // 2 * TINY.d)
    assert predicted(plan) == [reduce, reduce]
    result = validate_decode(plan)
    assert result.verdict is Verdict.MATCH
    assert result.numerics_ok


def test_only_dense_decode_steps_are_interpreted() -> None:
    prefill = require(
        plan_serving(TINY, MESH, "tp=x+y", Serving(phase="prefill", batch=1, context=S))
    )
    with pytest.raises(ValidationError, match="decode steps"):
        validate_decode(prefill)
    mixtral = load_model_config("mixtral-8x7b")
    moe = require(plan_serving(mixtral, MESH, "tp=x+y", Serving(batch=8, context=64)))
    with pytest.raises(ValidationError, match="no dense decode block"):
        validate_decode(moe)
