"""The scaling book's inference answers (inference.md, applied-inference.md), from the tool.

Each case computes the expected value from the book's formula with named intermediates,
checks the tool's programs reproduce it, and checks the formula gives the book's stated
number. Where the tool counts something the book's formula leaves out (the activations'
own HBM traffic: every chip reads and writes the ``[B, D]`` activations around each
matmul), the tolerance says so.
"""

from __future__ import annotations

import dataclasses
import math

import pytest

from sharding_roofline.hardware import HardwareSpec, Wraparound
from sharding_roofline.mesh import DeviceMesh
from sharding_roofline.presets import load_preset
from sharding_roofline.program.config import ModelConfig, load_model_config
from sharding_roofline.program.layers import LayerKind, LayerSpec, build_layer
from sharding_roofline.program.serve_plan import (
    ServePlan,
    batch_step,
    critical_batch,
    max_batch,
    model_parallel_limit,
    plan_program,
    plan_serving,
    require,
    search_serving,
    weight_matmuls,
)
from sharding_roofline.program.serving import Serving

V5E = load_preset("tpu-v5e")
C_BF16 = 1.97e14  # v5e bf16 FLOPs/s (tpus.md)
C_INT8 = 3.94e14
W_HBM = 8.2e11  # v5e HBM bytes/s
W_ICI = 9e10  # v5e bidirectional ICI per link (4.5e10 one way)
LLAMA3_70B = load_model_config("configs/models/llama3-70b.toml")

#: The book's "30B parameter dense model" with "100 kB / token KV caches" (inference.md pop
#: quiz): a GQA model of 30.25e9 parameters whose int8 cache is 2·49·8·128 = 100,352 bytes
#: per token.
BOOK_30B = ModelConfig(
    name="book-30b", d=6144, f=27136, n=64, k=8, h=128, layers=49, vocab=32000,
    tie_embeddings=True,
)  # fmt: skip


def _ring_hardware(beta: float | None = None) -> HardwareSpec:
    """v5e with every axis a ring (the book's collective formulas assume wraparound), and
    optionally the ICI bandwidth that makes ``β = W_hbm / W_ici`` exactly ``beta``."""
    assert V5E.ici is not None
    ici = dataclasses.replace(V5E.ici, wraparound=Wraparound.ALWAYS)
    if beta is not None:
        ici = dataclasses.replace(ici, link_bytes_per_s_per_direction=W_HBM / beta / 2)
    return dataclasses.replace(V5E, ici=ici)


def _best(config: ModelConfig, mesh: DeviceMesh, serving: Serving) -> ServePlan:
    plans, _ = search_serving(config, mesh, serving)
    assert plans
    assert plans[0].fits
    return plans[0]


@pytest.mark.parametrize(
    ("batch", "book_s"),
    [pytest.param(4, 2.5e-3, id="batch-4"), pytest.param(256, 21e-3, id="batch-256")],
)
def test_30b_generate_step_on_v5e_4x4(batch: int, book_s: float) -> None:
    """inference.md pop quiz: 30B params in int8, bf16 FLOPs, 8192 context, 100 kB/token,
    v5e 4x4: at least (4·819e6 + 30e9)/(16·8.2e11) = 2.5 ms; at 256,
    256·819e6/(16·8.2e11) + 2·256·30e9/(16·1.97e14) = 21 ms."""
    chips, context = 16, 8192
    params = BOOK_30B.params()["total"]
    kv_per_token = 2 * BOOK_30B.layers * BOOK_30B.k * BOOK_30B.h  # int8: 1 byte
    assert kv_per_token == pytest.approx(100e3, rel=0.01)  # the book's 100 kB
    kv_per_sequence = kv_per_token * context  # the book's 819 MB
    kv_s = batch * kv_per_sequence / (chips * W_HBM)
    flops_s = 2 * batch * params / (chips * C_BF16)
    weights_s = params * 1 / (chips * W_HBM)
    formula_s = kv_s + max(flops_s, weights_s)  # the book's generation step
    assert formula_s == pytest.approx(book_s, rel=0.03)

    mesh = DeviceMesh.create(V5E, "x=4,y=4", "4x4")
    plan = _best(BOOK_30B, mesh, Serving(batch=batch, context=context, weights="int8", kv="int8"))
    # the program's own terms are the formula's: the cache read once, fully sharded; the
    # weight matmuls' FLOPs; the weights read once
    assert plan.kv_hbm_s == pytest.approx(kv_s, rel=1e-9)
    assert plan.kv_bytes_per_token == kv_per_token
    compute, weight_hbm, _ = weight_matmuls(plan)
    # (the K and V projections split only K = 8 ways: on 16 chips some layouts replicate
    # them, their weights and their FLOPs, as the book allows: "replicating them is often
    # cheaper")
    assert compute == pytest.approx(flops_s, rel=0.07)
    assert weight_hbm == pytest.approx(weights_s, rel=0.07)
    # the step adds the activations' traffic and what no overlap hides: a few percent
    assert formula_s <= plan.step_time_s <= formula_s * 1.05
    assert plan.bottleneck == "hbm"


def test_generation_tp_limit_book_setting() -> None:
    """inference.md, "Note on ICI bounds for generation": T_HBM = 2DF/(Y·W_hbm) per matmul
    against T_ICI = 2BD/W_ici, so model parallelism pays until Y = F/(B·β), β = W_hbm/W_ici
    "about 8": F = 16384, B = 32 gives 64."""
    f, b, d = 16384, 32, 4096
    beta = 8.0
    expected = f / (b * beta)
    assert expected == 64  # the book's number
    hardware = _ring_hardware(beta)
    mesh = DeviceMesh.create(hardware, "y=8", "8")
    mlp = build_layer(LayerSpec(kind=LayerKind.MLP, d=d, f=f, batch_tokens=b, mlp="plain"))
    plan = require(plan_program(mlp, mesh, "tp=y", Serving(batch=b, context=1)))
    assert model_parallel_limit(plan) == pytest.approx(expected, rel=1e-9)
    # on the v5e preset beta is 8.2e11/9e10 = 9.1, so the limit is 56
    real = DeviceMesh.create(_ring_hardware(), "y=8", "8")
    plan = require(plan_program(mlp, real, "tp=y", Serving(batch=b, context=1)))
    assert model_parallel_limit(plan) == pytest.approx(f / (b * W_HBM / W_ICI), rel=1e-9)


def _mlp_comm_s(mesh: DeviceMesh, strategy: str, b: int, d: int) -> float:
    mlp = build_layer(LayerSpec(kind=LayerKind.MLP, d=d, f=4 * d, batch_tokens=b, mlp="plain"))
    plan = require(plan_program(mlp, mesh, strategy, Serving(batch=b, context=1)))
    steps = [s for _, one in plan.parts for op in one.ops for s in op.collectives]
    return sum(s.cost.bandwidth_s for s in steps if s.cost is not None)


def test_2d_weight_stationary_beats_1d_above_72_chips() -> None:
    """inference.md Q7 (ESTI's 2D weight-stationary): T_2D = 2BD/(X·W) + 4BF/(YZ·W),
    best at X = sqrt(N/8), YZ = sqrt(8N) (F = 4D), T = sqrt(128)·BD/(sqrt(N)·W); 1D model
    parallelism over three axes costs 4BD/(3W); 2D wins when N > 128·(3/4)² = 72."""
    b, d = 2048, 8192
    f = 4 * d
    v5p = load_preset("tpu-v5p")
    assert v5p.ici is not None
    w = 2 * v5p.ici.link_bytes_per_s_per_direction  # the book's bidirectional W_ici
    one_d = 4 * b * d / (3 * w)
    times = {}
    for n, shape in ((128, (4, 4, 8)), (512, (8, 8, 8))):
        x = math.isqrt(n // 8)  # 4 for 128 chips, 8 for 512
        assert x * x == n // 8
        yz = n // x
        mesh = DeviceMesh.create(v5p, f"x={shape[0]},y={shape[1]},z={shape[2]}")
        two_d = 2 * b * d / (x * w) + 4 * b * f / (yz * w)
        assert two_d == pytest.approx(math.sqrt(128) * b * d / (math.sqrt(n) * w), rel=1e-9)
        assert _mlp_comm_s(mesh, "tp=x+y+z", b, d) == pytest.approx(one_d, rel=1e-9)
        assert _mlp_comm_s(mesh, "tp=y+z,d=x", b, d) == pytest.approx(two_d, rel=1e-9)
        times[n] = _mlp_comm_s(mesh, "tp=y+z,d=x", b, d)
    # the 2D time falls as 1/sqrt(N) while 1D's stays: they cross where
    # T_2D(128)·sqrt(128/N) = T_1D
    assert times[512] == pytest.approx(times[128] / 2, rel=1e-9)
    crossover = 128 * (times[128] / one_d) ** 2
    assert crossover == pytest.approx(72, rel=1e-9)
    assert 32 * (f / d) * (3 / 4) ** 2 == 72  # the book's general condition at F = 4D


def test_llama3_70b_batch_32_8k_context_int8_on_v5e_4x2() -> None:
    """applied-inference.md: KV caches of 2·K·H·L = 2·8·128·80 bytes per token in int8;
    at batch 32 and 8192 context on a v5e 4x2 the step is (KV + params)/(8·8.2e11)
    ≈ 17 ms, 32/0.017/8 ≈ 235 tokens/s per chip."""
    config = LLAMA3_70B
    kv_per_token = 2 * config.k * config.h * config.layers
    assert kv_per_token == 163_840  # the book's number
    batch, context, chips = 32, 8192, 8
    params = config.params()["total"]
    kv_bytes = kv_per_token * context * batch
    step = (kv_bytes + params) / (chips * W_HBM)  # memory-bound: batch 32 < 120
    per_chip = batch / step / chips
    assert step == pytest.approx(17e-3, rel=0.03)
    assert per_chip == pytest.approx(235, rel=0.03)

    mesh = DeviceMesh.create(V5E, "x=4,y=2", "4x2")
    plan = _best(config, mesh, Serving(batch=batch, context=context, weights="int8", kv="int8"))
    assert plan.kv_bytes_per_token == kv_per_token
    assert plan.memory.kv_cache == pytest.approx(kv_bytes / chips, rel=1e-9)
    assert plan.fits
    # the step adds the activations' HBM traffic to the weights' and the cache's
    assert step <= plan.step_time_s <= step * 1.04
    assert plan.tokens_per_s_per_chip == pytest.approx(per_chip, rel=0.04)
    assert plan.bottleneck == "hbm"


def test_llama3_70b_bf16_batch_64_per_matmul_on_v5e_4x8() -> None:
    """applied-inference.md: LLaMA-3-70B in bf16 at batch 64 on a v5e 4x8 (32-way model
    parallelism), per MLP matmul: T_ici = 2BD/W_ici = 11 us, T_hbm = 2DF/(32·W_hbm) = 18 us,
    T_math = 2BDF/(32·C) = 4 us: still HBM-bound."""
    b, d, f, y = 64, LLAMA3_70B.d, LLAMA3_70B.f, 32
    t_ici = 2 * b * d / W_ICI
    t_hbm = 2 * d * f / (y * W_HBM)
    t_math = 2 * b * d * f / (y * C_BF16)
    assert (t_ici, t_hbm, t_math) == pytest.approx((11.65e-6, 17.9e-6, 4.77e-6), rel=2e-3)

    serving = Serving(batch=b, context=8192)
    ring = DeviceMesh.create(_ring_hardware(), "x=4,y=8", "4x8")
    plan = require(plan_serving(LLAMA3_70B, ring, "tp=x+y,kvb=y", serving))
    block = plan.part("block")
    for name in ("gate", "up", "down"):
        op = block.op(name)
        assert op.cost.compute_s == pytest.approx(t_math, rel=1e-9)
        weight = next(t for t, _ in op.at_op if t.startswith("w_"))
        dims = dict(op.at_op)[weight]
        local = d * f // math.prod(ring.axis_size(a) for axes in dims for a in axes)
        assert local * 2 / W_HBM == pytest.approx(t_hbm, rel=1e-9)
    # the MLP's one collective: the all-reduce of [B, D] over x+y; over two rings its
    # bandwidth term is 2·V/(2·W_ici) with V = 2BD bytes: the book's per-matmul T_ici
    (step,) = block.op("down").collectives
    assert step.cost is not None
    assert step.cost.kind.value == "all-reduce"
    assert step.cost.axes == ("x", "y")
    assert step.cost.bandwidth_s == pytest.approx(t_ici, rel=1e-9)
    # a real v5e 4x8 has no wraparound (only an axis of 16 wraps): each line's all-gather
    # takes (X-1)/X·V/W_uni, the two axes' rates add, and the all-reduce is two of them
    real = DeviceMesh.create(V5E, "x=4,y=8", "4x8")
    plan = require(plan_serving(LLAMA3_70B, real, "tp=x+y,kvb=y", serving))
    (step,) = plan.part("block").op("down").collectives
    w_uni = W_ICI / 2
    rate = sum(1 / ((n - 1) / (n * w_uni)) for n in (4, 8))
    assert step.cost is not None
    assert step.cost.bandwidth_s == pytest.approx(2 * (2 * b * d) / rate, rel=1e-9)


def _decode_mlp_critical(weights: str, compute: str) -> tuple[float, float | None]:
    d, f, b = 8192, 28672, 64
    mlp = build_layer(
        LayerSpec(
            kind=LayerKind.MLP, d=d, f=f, batch_tokens=b, mlp="plain", dtype=compute,
            param_dtype=weights,
        )
    )  # fmt: skip
    mesh = DeviceMesh.create(V5E, "y=8", "8")
    plan = require(plan_program(mlp, mesh, "tp=y", Serving(batch=b, context=1)))
    crit = critical_batch(plan)
    assert crit.weights_only is not None
    return crit.weights_only, crit.tokens


@pytest.mark.parametrize(
    ("weights", "compute", "peak", "weight_bytes", "book"),
    [
        pytest.param("bfloat16", "bfloat16", C_BF16, 2, 240, id="bf16"),
        pytest.param("int8", "bfloat16", C_BF16, 1, 120, id="int8-weights-bf16-compute"),
        pytest.param("int8", "int8", C_INT8, 1, 240, id="int8-weights-int8-compute"),
    ],
)
def test_critical_decode_batch_on_v5e(
    weights: str, compute: str, peak: float, weight_bytes: int, book: int
) -> None:
    """inference.md: generation matmuls are compute-bound when the per-replica token batch
    exceeds B_crit = (C/W_hbm)·(bytes per weight)/2: 240 in bf16 on v5e, 120 with int8
    weights and bf16 compute, 240 again with int8 compute. Counting the activations' bytes
    too (the exact 2BDF/(2BD + 2DF + 2BF) with each chip's F/Y), a little more."""
    alpha = peak / W_HBM
    expected = alpha * weight_bytes / 2
    assert expected == pytest.approx(book, rel=0.005)
    weights_only, exact = _decode_mlp_critical(weights, compute)
    assert weights_only == pytest.approx(expected, rel=1e-9)
    # exact: per chip, each matmul moves B·D and B·F/Y activations (a bytes each) and
    # D·F/Y weights: FLOPs 2·B·D·F/Y = alpha·(a·B·D + w·D·F/Y + a·B·F/Y)
    a = 2 if compute == "bfloat16" else 1
    d, f_local = 8192, 28672 // 8
    exact_expected = (
        alpha * weight_bytes * d * f_local / (2 * d * f_local - alpha * a * (d + f_local))
    )
    assert exact == pytest.approx(exact_expected, rel=1e-9)


def test_moe_decode_critical_batch_is_e_over_k_times_dense() -> None:
    """inference.md Q5: an MoE with E experts of which k are active reads E times the
    weights for k times the FLOPs, so its HBM roofline rises by E/k: the book's 18B-like
    model with E = 16, k = 2 needs 240·16/2 = 1920 tokens on v5e (bf16)."""
    model = ModelConfig(
        name="book-q5-moe", d=4096, f=16384, n=32, k=8, h=256, layers=64, vocab=32128,
        tie_embeddings=True, experts=16, top_k=2,
    )  # fmt: skip
    params = model.params()
    assert params["total"] == pytest.approx(212e9, rel=0.005)  # the book's 212e9
    assert params["active"] == pytest.approx(31.2e9, rel=0.005)  # and 31.2e9 active
    multiplier = model.experts / model.top_k
    expected = C_BF16 / W_HBM * multiplier
    assert expected == pytest.approx(1920, rel=0.002)
    mesh = DeviceMesh.create(V5E, "y=8", "8")
    batch = 64  # a multiple of E/k, so every expert's capacity is exactly B·k/E slots
    plan = require(plan_serving(model, mesh, "tp=y", Serving(batch=batch, context=4096)))
    experts = {"expert_gate", "expert_up", "expert_down"}
    crit = critical_batch(plan, ops=experts)
    assert crit.weights_only == pytest.approx(expected, rel=1e-9)
    # DeepSeek (E = 256, k = 8) with int8 weights and bf16 FLOPs: 120·256/8 = 3840
    deepseek = load_model_config("configs/models/deepseek-v3-like.toml")
    int8 = Serving(batch=256, context=1024, weights="int8", kv="int8")
    plan = require(plan_serving(deepseek, mesh, "tp=y", int8))
    crit = critical_batch(plan, ops=experts)
    expected = C_BF16 / W_HBM / 2 * deepseek.experts / deepseek.top_k
    assert expected == pytest.approx(3840, rel=0.002)
    assert crit.weights_only == pytest.approx(expected, rel=1e-9)


def test_llama3_70b_int8_batch_that_fits_on_v5e_4x2() -> None:
    """applied-inference.md, smallest topologies at 8k context: in int8 on a 4x2, 128 GB of
    HBM less 70 GB of weights leaves 58 GB, 43 caches of 162 kB/token x 8192. The preset's
    HBM is 16 GiB per chip (the book writes 16 GB), so the same arithmetic gives 49."""
    chips, context = 8, 8192
    params = LLAMA3_70B.params()["total"]
    kv_sequence = 163_840 * context
    book = math.floor((chips * 16e9 - 70e9) / (162e3 * context))
    assert book == 43
    capacity = V5E.chip.hbm_capacity_bytes
    expected = math.floor((chips * capacity - params) / kv_sequence)
    mesh = DeviceMesh.create(V5E, "x=4,y=2", "4x2")
    serving = Serving(batch=32, context=context, weights="int8", kv="int8")
    plan = _best(LLAMA3_70B, mesh, serving)
    fit = max_batch(plan)
    step = batch_step(plan)
    # the activations take a little, and the batch splits `step` ways
    assert expected - step < fit <= expected
