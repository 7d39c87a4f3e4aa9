"""Programs: the graph, the layers, the mechanical backward pass, strategies, the evaluator
(against the single-einsum planner), the layout search and the ``layer`` command."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from sharding_roofline import DeviceMesh, Einsum, PlanError, Planner, SpecError, load_preset
from sharding_roofline.cli import main
from sharding_roofline.errors import ConfigError
from sharding_roofline.plans import Rejected
from sharding_roofline.program.analysis import critical_batch, max_model_parallel
from sharding_roofline.program.autodiff import Remat, training
from sharding_roofline.program.evaluate import Placement, ProgramPlan, evaluate
from sharding_roofline.program.graph import (
    LetterRoles,
    Op,
    OpInput,
    OpKind,
    Phase,
    Program,
    Tensor,
    TensorKind,
)
from sharding_roofline.program.layers import LayerKind, LayerSpec, build_layer, einsum_program
from sharding_roofline.program.search import compare, search
from sharding_roofline.program.strategies import Strategy, named_strategies, place

BLOCK = {"d": 256, "f": 512, "n": 8, "k": 2, "h": 32, "t": 64}


def block(tokens: int = 64 * 64, **kw: object) -> Program:
    return build_layer(LayerSpec.from_dims("block", BLOCK, batch_tokens=tokens, **kw))  # type: ignore[arg-type]


def v5e(mesh: str = "x=2,y=4", topology: str = "2x4") -> DeviceMesh:
    return DeviceMesh.create(load_preset("tpu-v5e"), mesh, topology)


# -- the graph and the layers ---------------------------------------------------------------


def _tiny(ops: tuple[Op, ...], tensors: tuple[Tensor, ...]) -> Program:
    return Program(
        name="tiny",
        dims=(("b", 4), ("d", 8)),
        tensors=tensors,
        ops=ops,
        roles=LetterRoles(batch="b", sequence="b", model="d", hidden=()),
        stages=(("s", "matmul"),),
    )


def test_a_program_reads_only_what_exists() -> None:
    x = Tensor(name="x", letters="bd", dtype="bf16", kind=TensorKind.INPUT)
    y = Tensor(name="y", letters="bd", dtype="bf16", kind=TensorKind.ACTIVATION)
    early = Op(
        name="add",
        kind=OpKind.POINTWISE,
        inputs=(OpInput(tensor="y", letters="bd"), OpInput(tensor="x", letters="bd")),
        output="y",
        out_letters="bd",
        fn="add",
        stage="s",
    )
    with pytest.raises(SpecError, match="reads 'y' before anything writes it"):
        _tiny((early,), (x, y))
    three = Op(
        name="e",
        kind=OpKind.EINSUM,
        inputs=tuple(OpInput(tensor="x", letters="bd") for _ in range(3)),
        output="y",
        out_letters="bd",
        stage="s",
    )
    with pytest.raises(SpecError, match="takes two operands"):
        _tiny((three,), (x, y))
    with pytest.raises(SpecError, match="letters 'bD' must be lowercase"):
        Tensor(name="z", letters="bD", dtype="bf16", kind=TensorKind.INPUT)


@pytest.mark.parametrize(
    ("kind", "dims", "tokens", "message"),
    [
        ("mlp", {"d": 64}, 128, "needs f"),
        ("attention", {"d": 64, "n": 6, "k": 4, "t": 8}, 64, "multiple of k"),
        ("block", BLOCK, 100, "not a whole number of sequences"),
        ("mlp", {"d": 64, "f": 64, "q": 2}, 64, "unknown letter 'q'"),
        ("conv", {"d": 64}, 64, "unknown layer 'conv'"),
    ],
)
def test_layer_specs_say_what_is_wrong(
    kind: str, dims: dict[str, int], tokens: int, message: str
) -> None:
    with pytest.raises(SpecError, match=message):
        LayerSpec.from_dims(kind, dims, batch_tokens=tokens)


def _global_flops(program: Program, strategy: str = "fsdp=x+y") -> float:
    """Matmul FLOPs summed over the 8 chips of a strategy that replicates nothing."""
    mesh = v5e()
    plan = evaluate(program, mesh, place(program, mesh, strategy))
    return plan.cost.flops * mesh.num_devices


def test_forward_flops_are_two_per_parameter_per_token_plus_attention() -> None:
    """transformers.md: matmuls 2·params·tokens forward; attention's QK^T and AV
    4·B·T²·N·H (dense, as XLA computes a masked softmax), half under causal_flops=half."""
    program = block()
    b, t, n, h = 64, 64, 8, 32
    params = sum(program.elements(p.name) for p in program.params if p.letters != "d")
    attention = 4 * b * t * t * n * h
    assert _global_flops(program) == 2 * params * b * t + attention
    half = block(causal_flops="half")
    assert _global_flops(half) == 2 * params * b * t + attention / 2


@pytest.mark.parametrize(("remat", "factor"), [(Remat.NONE, 3), (Remat.FULL, 4), (Remat.DOTS, 3)])
def test_training_flops_are_three_times_forward_and_remat_adds_a_forward(
    remat: Remat, factor: int
) -> None:
    """Backward costs twice the forward (6·params·tokens in all); block remat recomputes
    the forward (8·params·tokens) but for the last matmul, whose result the backward never
    reads (jax.checkpoint does not recompute it either); saving the matmul outputs
    recomputes no matmul."""
    forward = block()
    not_recomputed = 2 * 64 * 64 * BLOCK["f"] * BLOCK["d"] if remat is Remat.FULL else 0
    assert _global_flops(training(forward, remat=remat)) == (
        factor * _global_flops(forward) - not_recomputed
    )


def test_flash_attention_keeps_scores_on_chip_and_recomputes_them() -> None:
    """A fused kernel: the scores and probabilities never reach HBM and are not saved; the
    backward pass recomputes QK^T (2·B·T²·N·H more FLOPs: the backward's attention is 2.5x
    the forward's instead of 2x)."""
    b, t, n, h = 64, 64, 8, 32
    materialized = training(block())
    flash = training(block(attention="flash"))
    assert _global_flops(flash) - _global_flops(materialized) == 2 * b * t * t * n * h
    mesh = v5e()
    plans = [evaluate(p, mesh, place(p, mesh, "fsdp=x+y")) for p in (materialized, flash)]
    saved = [{t for c, t, _ in plan.memory.items if c == "activations"} for plan in plans]
    assert "probs" in saved[0]  # the softmax's and AV's gradients read it
    assert not {"scores", "probs", "re_scores", "re_probs"} & saved[1]
    per_chip_probs = 2 * (b // 8) * n * t * t  # bf16 [b/8, k, g, t, s]
    assert plans[0].memory.activations - plans[1].memory.activations >= per_chip_probs
    assert plans[1].cost.hbm_bytes < plans[0].cost.hbm_bytes


def test_the_backward_of_an_einsum_is_two_einsums() -> None:
    forward = build_layer(LayerSpec(kind=LayerKind.MLP, d=64, f=128, t=8, batch_tokens=64))
    program = training(forward)
    grads = {op.name: op.equation for op in program.ops if op.of == "in"}
    assert grads == {"in_grad_x": "btf,df->btd", "in_grad_w_in": "btd,btf->df"}
    saved = [i for op in program.ops if op.of == "in" for i in op.inputs if i.saved_at]
    assert [(i.tensor, i.saved_at) for i in saved] == [("x", "in")]
    assert dict(program.gradients)["w_in"] == "d_w_in_in"


def test_a_tensor_read_three_times_gets_its_gradients_summed() -> None:
    program = training(block())
    sums = [op for op in program.ops if op.name.startswith("sum_d_xn1")]
    assert len(sums) == 2  # q, k and v projections: two adds
    assert all(op.phase is Phase.BACKWARD and op.fn == "add" for op in sums)


def test_a_summed_free_letter_has_no_gradient_einsum() -> None:
    program = einsum_program(Einsum.create("bd,df->f", "b=4,d=8,f=16"))
    with pytest.raises(SpecError, match="summed free letter"):
        training(program)


# -- strategies --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "dp=x",
        "fsdp=x+y",
        "fsdp=x,tp=y",
        "fsdp=x,sp=y",
        "dp=x,zero=1",
        "fsdp=x,mlp.f=y",
        "dp=x,sp=y,regather=1",
    ],
)
def test_strategy_names_parse_back(text: str) -> None:
    assert Strategy.parse(text).name == text
    assert Strategy.parse(Strategy.parse(text).name) == Strategy.parse(text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("fsdp=x,tp=x", "given to both fsdp and tp"),
        ("dq=x", "unknown key 'dq'"),
        ("fsdp", "is not KEY=AXES"),
        ("zero=4", "expected 0, 1, 2 or 3"),
        ("dp=x,regather=yes", "regather='yes'; expected 1"),
        ("", "empty strategy"),
    ],
)
def test_bad_strategies_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        Strategy.parse(text)


def test_regather_saves_the_shard_and_gathers_it_again_in_the_backward() -> None:
    """``regather=1``: the normed inputs that sequence parallelism all-gathers before the
    attention and MLP matmuls are saved as their shard (1/|y| of the gathered bytes) and
    all-gathered again in the backward: one more all-gather of each, of the forward's size;
    nothing else changes."""
    program = training(block())
    mesh = v5e()
    plain = evaluate(program, mesh, place(program, mesh, "dp=x,sp=y"))
    regather = evaluate(program, mesh, place(program, mesh, "dp=x,sp=y,regather=1"))
    assert not isinstance(plain, Rejected)
    assert not isinstance(regather, Rejected)
    # xn1 and xn2: [tokens, d] in bf16, split over dp (x=2); gathered over y=4 at the
    # matmuls, a quarter of that as the norm left them
    tokens, d, itemsize = 64 * 64, BLOCK["d"], 2
    gathered = tokens // 2 * d * itemsize
    assert plain.memory.activations - regather.memory.activations == pytest.approx(
        2 * (gathered - gathered / 4)
    )
    saved = {t: b for c, t, b in regather.memory.items if c == "activations"}
    assert saved["xn1"] == saved["xn2"] == gathered / 4

    def gathers(plan: ProgramPlan) -> list[tuple[str, int]]:
        return [
            (s.operand, s.cost.elements_in_per_chip)
            for op_plan in plan.ops
            if op_plan.op.phase is Phase.BACKWARD
            for s in op_plan.collectives
            if s.cost is not None and s.cost.kind.value == "all-gather"
        ]

    extra = sorted(gathers(regather))
    for item in gathers(plain):
        extra.remove(item)
    assert extra == [("xn1", tokens // 2 * d // 4), ("xn2", tokens // 2 * d // 4)]
    assert regather.cost.flops == plain.cost.flops


def test_a_strategy_on_axes_the_mesh_lacks_is_an_error() -> None:
    program = block()
    with pytest.raises(SpecError, match=r"mesh axis 'z'.*has axes x, y"):
        place(program, v5e(), "fsdp=z")
    with pytest.raises(SpecError, match="pins stage 'moe'"):
        place(program, v5e(), "fsdp=x,moe.f=y")


def test_named_strategies_put_data_on_major_and_model_on_minor_axes() -> None:
    names = [s.name for s in named_strategies(v5e())]
    assert names[0] == "fsdp=y,sp=x"  # TP on the other (major) axis, x
    assert names[1:3] == ["dp=x+y", "fsdp=x+y"]
    assert "fsdp=x,tp=y" in names
    assert names[-2:] == ["tp=x+y", "sp=x+y"]


def test_a_stack_of_layers_scales_time_and_persistent_memory() -> None:
    """L identical layers: L times every time and byte and the persistent memory; one
    transient peak; whether it fits is judged for the stack; the crossovers do not move."""
    program = training(block())
    mesh = v5e()
    one = evaluate(program, mesh, place(program, mesh, "fsdp=x,tp=y"))
    stack = one.repeat(80)
    assert stack.cost.lower_bound_s == pytest.approx(80 * one.cost.lower_bound_s)
    assert stack.memory.persistent == pytest.approx(80 * one.memory.persistent)
    assert stack.memory.transient == one.memory.transient
    assert critical_batch(stack).tokens == pytest.approx(critical_batch(one).tokens)
    assert max_model_parallel(stack) == pytest.approx(max_model_parallel(one))
    ranking = compare(program, mesh, ["fsdp=x,tp=y"], layers=80)
    assert ranking.best.memory.peak == pytest.approx(stack.memory.peak)


def test_megatron_all_reduces_once_per_pass_and_sp_gathers_and_scatters() -> None:
    """Over the tp axis: forward one all-reduce after the O projection and one after the MLP;
    backward one each for dx (the Q, K, V contributions are added before reducing). With
    as many KV heads as the tp axis has chips, TP splits them (k)."""
    dims = {**BLOCK, "k": 4}
    program = training(build_layer(LayerSpec.from_dims("block", dims, batch_tokens=64 * 64)))
    mesh = v5e()
    tp = evaluate(program, mesh, place(program, mesh, "fsdp=x,tp=y"))
    over_y = [(s.operand, s.kind.value) for s in tp.collectives if s.axes == ("y",)]
    assert over_y == [
        ("attn_out", "all-reduce"),
        ("mlp_out", "all-reduce"),
        ("d_xn2", "all-reduce"),
        ("d_xn1", "all-reduce"),
    ]
    sp = evaluate(program, mesh, place(program, mesh, "fsdp=x,sp=y"))
    moved = [(s.operand, s.kind.value) for s in sp.collectives if s.axes == ("y",)]
    activations = {kind for name, kind in moved if "scale" not in name}
    assert activations == {"all-gather", "reduce-scatter"}
    assert len(moved) == 8 + 2  # AG and RS per sublayer and pass; the norm scales' gradients
    scales = {kind for name, kind in moved if "scale" in name}
    assert scales == {"all-reduce"}  # their tokens are split over y too


def test_gqa_with_fewer_kv_heads_than_tp_reduces_their_gradients() -> None:
    """k = 2 KV heads on a tp axis of 4: TP splits the query groups (g), every chip keeps
    both KV heads, and their gradients (summed over the chip's groups) are all-reduced."""
    program = training(block())
    mesh = v5e()
    plan = evaluate(program, mesh, place(program, mesh, "fsdp=x,tp=y"))
    reduced = {s.operand for s in plan.collectives if s.axes == ("y",)}
    assert {"d_k_scores", "d_v_context"} <= reduced
    assert dict(plan.op("q_proj").sigma)["g"] == ("y",)


# -- the evaluator against the single-einsum planner --------------------------------------


@pytest.mark.parametrize(
    ("equation", "dims", "fixed"),
    [
        ("bd,df->bf", "b=256,d=512,f=1024", {"rhs": "x,y"}),
        ("bd,df->bf", "b=256,d=512,f=1024", {"lhs": "None,y", "out": "x,None"}),
        ("btd,df->btf", "b=8,t=32,d=256,f=512", {}),
        ("bhqd,bhkd->bhqk", "b=4,h=8,q=64,k=64,d=32", {}),
    ],
)
def test_a_one_op_program_costs_what_the_planner_says(
    equation: str, dims: str, fixed: dict[str, str]
) -> None:
    """The evaluator and the single-einsum planner are separate code over one resharding
    engine: every strategy the planner ranks costs the same as a one-op program."""
    mesh = v5e()
    einsum = Einsum.create(equation, dims)
    program = einsum_program(einsum)
    ranking = Planner(einsum, mesh, check_memory=False, **fixed).search(top=None)  # type: ignore[arg-type]
    assert ranking.strategies
    for plan in ranking.strategies:
        placement = Placement(
            name="one-op",
            stages=(("op", plan.assignment),),
            homes=(("lhs", plan.lhs.dims), ("rhs", plan.rhs.dims), ("out", plan.out.dims)),
        )
        got = evaluate(program, mesh, placement).cost
        want = plan.cost
        assert got.flops == want.flops
        assert got.hbm_bytes == want.hbm_bytes
        assert got.comm_s == pytest.approx(want.comm_s, rel=1e-12, abs=0)
        assert got.lower_bound_s == pytest.approx(want.lower_bound_s, rel=1e-12)


# -- memory, analysis, rejections ---------------------------------------------------------


def test_an_overflowing_plan_names_what_overflows() -> None:
    """2.1B parameters replicated need 16 bytes each: DP does not fit a 16 GB v5e."""
    forward = build_layer(LayerSpec(kind=LayerKind.MLP, d=16384, f=65536, batch_tokens=4096))
    mesh = v5e()
    ranking = compare(training(forward), mesh, ["dp=x+y", "fsdp=x+y"])
    assert [r.strategy for r in ranking.rejected] == ["dp=x+y"]
    reason = ranking.rejected[0].reason
    assert "more than the" in reason
    assert "largest: optimizer w_in" in reason
    assert [p.name for p in ranking.strategies] == ["fsdp=x+y", "dp=x+y"]  # fitting first
    assert not ranking.strategies[1].fits


def test_an_indivisible_batch_is_rejected_with_the_op_and_sizes() -> None:
    program = build_layer(LayerSpec(kind=LayerKind.MLP, d=64, f=64, batch_tokens=6))
    with pytest.raises(PlanError, match=r"B \(size 6\) does not divide over x\+y \(8 pieces\)"):
        evaluate(program, v5e(), place(program, v5e(), "dp=x+y"))


def test_a_strategy_without_collectives_has_no_critical_batch() -> None:
    program = build_layer(LayerSpec(kind=LayerKind.MLP, d=64, f=64, batch_tokens=64))
    plan = evaluate(program, v5e(), place(program, v5e(), "dp=x+y"))  # forward DP: no comm
    cross = critical_batch(plan)
    assert cross.tokens is None
    assert "needs no communication" in cross.note
    assert max_model_parallel(plan) is None


# -- the search ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def searched() -> tuple[Program, DeviceMesh, object]:
    program = training(block())
    mesh = DeviceMesh.create(load_preset("tpu-v5p"), "x=2,y=2,z=2", "2x2x2")
    return program, mesh, search(program, mesh, top=3)


def test_the_search_is_never_worse_than_a_named_strategy(searched: tuple) -> None:
    _, _, ranking = searched
    best = ranking.best
    assert ranking.named
    for named in ranking.named:
        if named.fits:
            assert best.time_s <= named.time_s * (1 + 1e-12)
    assert ranking.beats is not None
    assert ranking.beats >= -1e-12


def test_a_search_result_is_a_strategy_you_can_pass_back(searched: tuple) -> None:
    program, mesh, ranking = searched
    for found in ranking.strategies:
        again = evaluate(program, mesh, place(program, mesh, found.name))
        assert again.cost.lower_bound_s == pytest.approx(found.cost.lower_bound_s)
        assert again.memory.peak == pytest.approx(found.memory.peak)


# -- the layer command --------------------------------------------------------------------

LAYER = [
    "layer", "--layer", "gated-mlp", "--dims", "d=1024,f=4096", "--batch-tokens", "65536",
    "--hardware", "tpu-v5e", "--topology", "2x4", "--mesh", "x=2,y=4",
]  # fmt: skip


def _json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_layer_json_follows_the_contract(capsys: pytest.CaptureFixture[str]) -> None:
    data = _json(capsys, *LAYER, "--backward")
    assert data["mode"] == "compare"
    strategies = data["strategies"]
    assert [s["name"] for s in strategies] == sorted(
        (s["name"] for s in strategies),
        key=lambda n: next((i for i, t in enumerate(strategies) if t["name"] == n)),
    )
    first = strategies[0]
    for key in ("compute", "hbm", "comm", "lower_bound", "upper_bound"):
        assert isinstance(first["time_s"][key], float)
    assert set(first["memory_per_chip_bytes"]) >= {
        "params", "grads", "optimizer", "activations", "transient", "peak"
    }  # fmt: skip
    assert isinstance(first["fits"], bool)
    assert "critical_batch_tokens_per_chip" in first
    assert "max_model_parallel" in first
    assert first["ops"][0]["name"] == "gate"
    assert {"name", "time_s", "collectives"} <= set(first["ops"][0])
    times = [s["time_s"]["lower_bound"] for s in strategies if s["fits"]]
    assert times == sorted(times)


def test_layer_strategy_and_search(capsys: pytest.CaptureFixture[str]) -> None:
    one = _json(capsys, *LAYER, "--backward", "--strategy", "fsdp=x,tp=y")
    assert [s["name"] for s in one["strategies"]] == ["fsdp=x,tp=y"]
    found = _json(capsys, *LAYER, "--backward", "--search", "--top", "2")
    assert found["mode"] == "search"
    assert len(found["strategies"]) <= 2
    assert found["beats_best_named_by"] >= -1e-12


def test_layer_reads_a_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "layer.toml"
    config.write_text(
        'layer = "mlp"\ndims = "d=1024,f=4096"\nbatch_tokens = 65536\nsource = "a test"\n',
        encoding="utf-8",
    )
    mesh = ["--hardware", "tpu-v5e", "--topology", "2x4", "--mesh", "x=2,y=4"]
    data = _json(capsys, "layer", "--config", str(config), *mesh)
    assert data["program"] == "mlp"
    assert data["tokens"] == 65536
    config.write_text('layer = "mlp"\ndims = "d=8"\nbatch = 4\n', encoding="utf-8")
    assert main(["layer", "--config", str(config), *mesh]) == 1
    assert "unknown key 'batch'" in capsys.readouterr().err
    from sharding_roofline.program.cli import load_layer_config  # noqa: PLC0415

    with pytest.raises(ConfigError, match="is not a file"):
        load_layer_config(str(tmp_path))


def test_layer_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    base = LAYER[:5] + LAYER[7:]
    assert main(base) == 1  # no --batch-tokens
    assert "needs --batch-tokens" in capsys.readouterr().err
    assert main([*LAYER, "--remat", "full"]) == 1
    assert "need --backward" in capsys.readouterr().err
    assert main([*LAYER, "--strategy", "fsdp=q"]) == 1
    assert "mesh axis 'q'" in capsys.readouterr().err


def test_layer_text_shows_the_table_and_the_best(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*LAYER, "--backward", "--details"]) == 0
    text = capsys.readouterr().out
    assert "crit. batch/chip" in text
    assert "best: strategy" in text
    assert "gate_grad_w_gate" in text  # --details lists the ops
    assert math.isfinite(1.0)
