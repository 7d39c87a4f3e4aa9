"""A decode step of a small GQA model on simulated CPU devices: the plan's collectives
against the compiled HLO's (the programs' validator), and XLA's program against a numpy
decode step."""

from __future__ import annotations

from collections import Counter

import pytest

jax = pytest.importorskip("jax")

from sharding_roofline.errors import ValidationError  # noqa: E402
from sharding_roofline.mesh import DeviceMesh  # noqa: E402
from sharding_roofline.presets import load_preset  # noqa: E402
from sharding_roofline.program.config import ModelConfig, load_model_config  # noqa: E402
from sharding_roofline.program.serve_plan import ServePlan, plan_serving, require  # noqa: E402
from sharding_roofline.program.serving import Serving  # noqa: E402
from sharding_roofline.xla.compare import Verdict  # noqa: E402
from sharding_roofline.xla.serving import DecodeValidation, validate_decode  # noqa: E402

pytestmark = [pytest.mark.jax, pytest.mark.devices(8)]

#: A GQA model small enough to run: 8 query heads over 2 KV heads of 16
TINY = ModelConfig(name="tiny-gqa", d=64, f=128, n=8, k=2, h=16, layers=2, vocab=256)
B, S = 8, 32
MESH = DeviceMesh.create(load_preset("tpu-v5e"), "x=2,y=4")


def _plan(strategy: str) -> ServePlan:
    return require(plan_serving(TINY, MESH, strategy, Serving(batch=B, context=S)))


def _records(result: DecodeValidation, which: str = "predicted") -> Counter[tuple[object, ...]]:
    records = getattr(result.validation, which)
    return Counter(
        (r.kind, r.axes, r.elements_in_per_chip, r.elements_out_per_chip) for r in records
    )


def _valid(strategy: str) -> DecodeValidation:
    result = validate_decode(_plan(strategy))
    assert result.verdict is not Verdict.MISMATCH, result.validation.reasons
    assert result.validation.shard_map is not None
    assert _records(result, "shard_map") == _records(result)  # the plan's own program
    assert result.numerics_ok, (result.validation.numerics, result.numpy_rel_error)
    return result


def test_tensor_parallel_decode() -> None:
    """tp=x+y: activations replicated between blocks, one all-reduce of [B, D] after the
    attention and one after the MLP, over both axes (Megatron). XLA reduces the attention's
    over x and then y: the same result, a different collective."""
    result = _valid("tp=x+y")
    reduce = ("all-reduce", ("x", "y"), B * TINY.d, B * TINY.d)
    assert _records(result) == Counter({reduce: 2})
    assert result.verdict in (Verdict.MATCH, Verdict.XLA_DIFFERS)


def test_kv_cache_sharded_over_heads_then_batch() -> None:
    """sp=x+y,kvb=y: the 2 KV heads over x, the cache's batch over y; the queries go to the
    cache's layout and the attention's result back by all-to-all over y, each device holding
    B·(K/2)·(G/4)·H of them. XLA issues exactly the plan's collectives."""
    plan = _plan("sp=x+y,kvb=y")
    cache = dict(plan.part("block").op("scores").at_op)["k_cache"]
    assert cache == (("y",), (), ("x",), ())  # [B_y, S, K_x, H]
    result = _valid("sp=x+y,kvb=y")
    moved = B * (TINY.k // 2) * (TINY.n // TINY.k // 4) * TINY.h
    assert _records(result)[("all-to-all", ("y",), moved, moved)] == 2
    assert result.verdict is Verdict.MATCH


def test_2d_weight_stationary_decode() -> None:
    """tp=y,d=x: the norms' [B] sums of squares all-reduced, activations gathered over y and
    reduce-scattered back, partial sums all-reduced over x between the matmuls."""
    result = _valid("tp=y,d=x")
    records = _records(result)
    assert records[("all-reduce", ("x", "y"), B, B)] == 2  # the two norms
    assert records[("reduce-scatter", ("y",), B * TINY.d // 2, B * TINY.d // 8)] == 2
    assert records[("all-gather", ("y",), B * TINY.d // 8, B * TINY.d // 2)] == 2
    assert result.verdict is Verdict.MATCH


def test_replicas_with_tensor_parallelism() -> None:
    result = _valid("dp=x,tp=y")
    reduce = ("all-reduce", ("y",), B // 2 * TINY.d, B // 2 * TINY.d)
    assert _records(result) == Counter({reduce: 2})
    assert result.verdict is Verdict.MATCH


def test_only_dense_decode_steps_are_validated() -> None:
    prefill = require(
        plan_serving(TINY, MESH, "tp=x+y", Serving(phase="prefill", batch=1, context=S))
    )
    with pytest.raises(ValidationError, match="decode steps"):
        validate_decode(prefill)
    mixtral = load_model_config("mixtral-8x7b")
    moe = require(plan_serving(mixtral, MESH, "tp=x+y", Serving(batch=8, context=64)))
    with pytest.raises(ValidationError, match="no dense decode block"):
        validate_decode(moe)
