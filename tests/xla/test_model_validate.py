"""Whole models against XLA (``xla/model_validate.py``, ``xla/model_pipeline.py``).

A 2-layer dense model and a 2-layer mixture of experts (4 experts, top-2), forward and
backward with AdamW, on a 2x4 TPU v5e mesh, for DP, FSDP, TP, TP with sequence parallelism,
FSDP+TP, context parallelism and expert parallelism, each unrolled and as a ``lax.scan``
over the layers: compiled with the strategy's shardings, the plan's own step (its parts
replayed and composed) must hold exactly the model plan's collectives (each block's times
its 2 layers, a scan's trip count counted, plus the ends'), do its matmul FLOPs, and XLA's
step must be its layers' programs composed. Pipeline parallelism: a GPipe shard_map over
the pipeline axis. A few cases run on data against the unsharded reference.
"""

from __future__ import annotations

import math
from functools import cache
from typing import Any

import pytest

from sharding_roofline.mesh import DeviceMesh
from sharding_roofline.presets import load_preset
from sharding_roofline.program.config import ModelConfig
from sharding_roofline.program.model import ModelPlan, Training, plan_model

jax = pytest.importorskip("jax")

from sharding_roofline.errors import ValidationError  # noqa: E402
from sharding_roofline.xla.compare import Verdict  # noqa: E402
from sharding_roofline.xla.model_pipeline import validate_pipeline  # noqa: E402
from sharding_roofline.xla.model_validate import (  # noqa: E402
    ModelValidation,
    check_model_size,
    validate_model,
)

pytestmark = [pytest.mark.jax, pytest.mark.devices(8)]

MODELS = {
    "dense": ModelConfig(
        name="tiny-dense", d=32, f=64, n=4, k=2, h=8, layers=2, vocab=64, attention="materialized"
    ),
    "moe": ModelConfig(
        name="tiny-moe",
        d=32,
        f=64,
        n=4,
        k=2,
        h=8,
        layers=2,
        vocab=64,
        experts=4,
        top_k=2,
        expert_f=32,
        attention="materialized",
    ),
}
SEQ = 16
BATCH = 8  # sequences: 128 tokens


@cache
def mesh() -> DeviceMesh:
    return DeviceMesh.create(load_preset("tpu-v5e"), "x=2,y=4", "2x4")


@cache
def model_plan(model: str, strategy: str, microbatches: int = 1) -> ModelPlan:
    plan = plan_model(
        MODELS[model],
        mesh(),
        strategy,
        Training(batch_tokens=BATCH * SEQ, seq_len=SEQ, microbatches=microbatches),
    )
    assert isinstance(plan, ModelPlan), plan
    return plan


@cache
def validation(model: str, strategy: str, scan: bool, execute: bool = False) -> ModelValidation:
    return validate_model(model_plan(model, strategy), scan=scan, execute=execute)


#: (model, strategy, XLA's verdict); xla-differs cases differ by the layers' known reasons
#: (docs/validation.md, "Why XLA differs on programs")
CASES = [
    ("dense", "dp=x+y", Verdict.MATCH),
    ("dense", "fsdp=x+y", Verdict.MATCH),
    ("dense", "dp=x,tp=y", Verdict.XLA_DIFFERS),
    ("dense", "fsdp=x,sp=y", Verdict.XLA_DIFFERS),
    ("dense", "fsdp=x,tp=y", Verdict.XLA_DIFFERS),
    ("dense", "dp=x+y,cp=y", Verdict.XLA_DIFFERS),
    ("moe", "dp=x+y,ep=y", Verdict.MATCH),
    ("moe", "fsdp=x,tp=y,ep=x", Verdict.XLA_DIFFERS),
]


def _block_collectives(plan: ModelPlan) -> int:
    """Collectives of one block, from the plan's part (steps with a collective)."""
    (block,) = (p for name, p in plan.parts if name != "ends")
    return sum(len(op.collectives) for op in block.ops)


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan"])
@pytest.mark.parametrize(("model", "strategy", "verdict"), CASES)
def test_the_plans_own_step_holds_the_model_plans_collectives(
    model: str, strategy: str, verdict: Verdict, scan: bool
) -> None:
    v = validation(model, strategy, scan)
    assert v.verdict is verdict, (v.reasons, v.difference)
    assert v.shard_map is not None  # the plan's own step was compiled: it is the proof
    plan = v.plan
    layers = plan.config.layers
    # the plan's collectives: each block's times the 2 layers (counted, under scan, from
    # the while loop's trip count), plus the ends' once
    block = [r for r, row in _rows(v, "predicted") if row != "ends"]
    assert sum(r.count for r in block) == layers * _block_collectives(plan)
    in_loops = {r.count for r in v.shard_map if r.count > 1}
    assert in_loops == ({layers} if scan else set())
    # matmul FLOPs per chip: the plan's own step, XLA's step and the plan agree
    assert v.flops.shard_map == v.flops.plan == v.flops.jit
    if verdict is Verdict.XLA_DIFFERS:
        # XLA's step is its layers' programs composed: each difference is a layer's
        assert v.composes is True, v.reasons
        layer_verdicts = {layer.verdict for layer in dict(v.layers).values()}
        assert Verdict.MISMATCH not in layer_verdicts
    else:
        assert v.difference == ""


def _rows(v: ModelValidation, side: str) -> list[tuple[Any, str]]:
    return [(r, row.part) for row in v.per_op for r in getattr(row, side)]


@pytest.mark.parametrize("strategy", ["dp=x+y", "fsdp=x+y"])
def test_data_parallel_matmul_flops_are_the_models_over_the_chips(strategy: str) -> None:
    # every matmul split 8 ways over the batch: the per-chip FLOPs are the model's (6 ·
    # params · tokens plus attention, counted from the programs' global FLOPs) over 8
    v = validation("dense", strategy, True)
    assert v.flops.jit == v.plan.model_flops / mesh().num_devices
    assert v.flops.plan == v.plan.model_flops / mesh().num_devices


def test_expert_parallelism_moves_tokens_to_their_experts_by_all_to_all() -> None:
    # ep=y: dispatch and combine, each forward and backward, are all-to-alls over y
    # moving one chip's slots: E · (c over x+y) · d = 4 · (64 / 8) · 32 elements
    v = validation("moe", "dp=x+y,ep=y", False)
    capacity = math.ceil(BATCH * SEQ * 2 * 1.0 / 4)
    a2a = [r for r in v.observed if r.kind == "all-to-all"]
    assert {(r.axes, r.elements_in_per_chip) for r in a2a} == {(("y",), 4 * capacity // 8 * 32)}
    assert sum(r.count for r in a2a) == 4 * 2  # 4 per layer, 2 layers
    assert v.verdict is Verdict.MATCH


def test_xla_differs_where_its_layer_programs_do() -> None:
    # under tp, x's gradient contributions (from the gate and up projections) are partial
    # sums; the plan adds them and all-reduces once, XLA's CPU pipeline once each: one
    # all-reduce more per layer, at the MLP's backward
    v = validation("dense", "fsdp=x,tp=y", True)
    assert v.difference == "+all-reduce[y]@block/up/backward x2"
    layer = dict(v.layers)["block"]
    assert layer.difference == "+all-reduce[y]@up/backward"


def test_a_pipelined_plan_is_refused_by_validate_model() -> None:
    with pytest.raises(ValidationError, match="validate_pipeline"):
        validate_model(model_plan("dense", "pp=x,dp=y", 2))


def test_a_big_model_is_refused_with_the_limit() -> None:
    big = ModelConfig(name="big", d=4096, f=14336, n=32, k=8, h=128, layers=32, vocab=128256)
    plan = plan_model(big, mesh(), "fsdp=x+y", Training(batch_tokens=8192, seq_len=1024))
    assert isinstance(plan, ModelPlan)
    with pytest.raises(ValidationError, match="at most 16,777,216"):
        check_model_size(plan)


# -- pipelines and numerics ---------------------------------------------------------------


@pytest.mark.slow
def test_pipeline_stage_sends_match_the_plans_pipeline() -> None:
    # 2 stages over x, dp over y, 2 microbatches of 4 sequences
    v = validate_pipeline(model_plan("dense", "pp=x,dp=y", 2), execute=True)
    assert v.ok, v.reasons
    # one send carries a microbatch's activations per chip: 64 tokens over y (4) x d=32
    assert v.plan_elements == (BATCH * SEQ // 2) * 32 // 4
    assert {(r.axes, r.elements_in_per_chip) for r in v.permutes} == {(("x",), 512)}
    # GPipe over m + P - 1 = 3 ticks: 2 sends carry microbatches each way
    assert v.forward_sends == v.backward_sends == 2 + 2 - 2
    assert v.observed_permute_s == pytest.approx(v.plan_permute_s)
    assert v.max_rel_error is not None
    assert v.max_rel_error < 1e-5


NUMERICS = [
    pytest.param("dense", "fsdp=x,sp=y", True, id="dense-fsdp-sp-scan"),
    pytest.param("moe", "dp=x+y,ep=y", False, id="moe-ep-unrolled"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("model", "strategy", "scan"), NUMERICS)
def test_both_steps_compute_the_reference_numbers(model: str, strategy: str, scan: bool) -> None:
    v = validation(model, strategy, scan, True)
    assert v.verdict is not Verdict.MISMATCH, v.reasons
    n = v.numerics
    assert n is not None
    assert n.ok, n.as_dict()
    assert n.shard_map_max_rel_error < 1e-5  # float32: rounding only
    assert n.jit_max_rel_error < 1e-5
    # every result compared: the loss, and each parameter's gradient and update
    names = {key for key, _ in n.shard_map_rel_error}
    assert "ends/loss" in names
    assert any(key.endswith("/new_w_q") for key in names)
