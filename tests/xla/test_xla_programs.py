"""Program plans (whole layers, forward and forward+backward) against XLA.

The sweep: every named strategy of a 2x4 (TPU v5e) and a 2x2x2 (TPU v5p) mesh, for the MLP,
the gated MLP, GQA attention and the pre-norm block, forward and forward+backward, each
compiled on simulated CPU devices (compile-only; the plan's own shard_map program whenever
XLA's jit program differs). No case may be a mismatch, and every xla-differs case must be
the one recorded, with its reason, in ``tests/data/xla_differs_programs.json`` (regenerate
with ``python benchmarks/layer_agreement.py --write-report``). A representative subset runs
on data: both programs against ``jax.vjp`` of the unsharded layer, in float32.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from sharding_roofline.mesh import DeviceMesh
from sharding_roofline.presets import load_preset
from sharding_roofline.program.autodiff import training
from sharding_roofline.program.evaluate import ProgramPlan, evaluate
from sharding_roofline.program.graph import OpKind, Phase, Program
from sharding_roofline.program.layers import LayerKind, LayerSpec, build_layer
from sharding_roofline.program.strategies import named_strategies, place

jax = pytest.importorskip("jax")

from sharding_roofline.xla import programs  # noqa: E402
from sharding_roofline.xla.cli import format_program_validation  # noqa: E402
from sharding_roofline.xla.compare import Verdict  # noqa: E402
from sharding_roofline.xla.hlo import dot_flops, read_collectives  # noqa: E402
from sharding_roofline.xla.program_compare import (  # noqa: E402
    ProgramValidation,
    validate_program,
)

pytestmark = [pytest.mark.jax, pytest.mark.devices(8)]

REPORT_PATH = Path(__file__).resolve().parents[1] / "data" / "xla_differs_programs.json"
REPORT: dict[str, Any] = json.loads(REPORT_PATH.read_text())
SWEEP = REPORT["sweep"]


@cache
def mesh_of(mesh_id: str) -> DeviceMesh:
    hardware, axes, topology = SWEEP["meshes"][mesh_id]
    return DeviceMesh.create(load_preset(hardware), axes, topology)


@cache
def program_of(kind: str, mode: str, remat: str = "none", optimizer: bool = False) -> Program:
    spec = LayerSpec.from_dims(kind, SWEEP["sizes"], batch_tokens=SWEEP["batch_tokens"])
    forward = build_layer(spec)
    return forward if mode == "forward" else training(forward, remat=remat, optimizer=optimizer)


@cache
def plan_of(  # noqa: PLR0917 (the case's parts, in its id's order)
    mesh_id: str, kind: str, mode: str, strategy: str, remat: str = "none", opt: bool = False
) -> ProgramPlan:
    program = program_of(kind, mode, remat, opt)
    mesh = mesh_of(mesh_id)
    return evaluate(program, mesh, place(program, mesh, strategy))


@cache
def validation_of(mesh_id: str, kind: str, mode: str, strategy: str) -> ProgramValidation:
    return validate_program(plan_of(mesh_id, kind, mode, strategy), prove=False)


def _sweep() -> list[Any]:
    cases = []
    for mesh_id in SWEEP["meshes"]:
        for kind in (k.value for k in LayerKind):
            for mode in SWEEP["modes"]:
                for strategy in named_strategies(mesh_of(mesh_id)):
                    case_id = f"{mesh_id}-{kind}-{mode}-{strategy.name}"
                    cases.append(pytest.param(mesh_id, kind, mode, strategy.name, id=case_id))
    return cases


SWEEP_CASES = _sweep()


def test_the_sweep_covers_every_named_strategy_layer_and_mode() -> None:
    strategies = sum(len(named_strategies(mesh_of(m))) for m in SWEEP["meshes"])
    assert strategies >= 7 + 10
    assert len(SWEEP_CASES) == strategies * len(LayerKind) * 2
    listed = set(REPORT["xla_differs"])
    assert listed <= {c.id for c in SWEEP_CASES}, "the report lists cases the sweep lacks"
    assert REPORT["agreement"]["mismatch"] == 0
    for entry in REPORT["xla_differs"].values():
        assert entry["reason"] in REPORT["reasons"], entry


@pytest.mark.parametrize(("mesh_id", "kind", "mode", "strategy"), SWEEP_CASES)
def test_program_plan_agrees_with_xla(mesh_id: str, kind: str, mode: str, strategy: str) -> None:
    v = validation_of(mesh_id, kind, mode, strategy)
    case_id = f"{mesh_id}-{kind}-{mode}-{strategy}"
    assert v.verdict is not Verdict.MISMATCH, v.reasons
    assert v.flops.ok, v.flops
    listed = REPORT["xla_differs"].get(case_id)
    if v.verdict is Verdict.MATCH:
        assert listed is None, f"{case_id} now matches; rewrite the report"
        assert v.difference == ""
        assert all(a.agrees for a in v.per_op)
    else:
        assert listed is not None, f"{case_id} differs and is not explained: {v.difference}"
        assert v.difference == listed["difference"]
        assert v.shard_map is not None  # the plan's own program was compiled and is exact


# -- FLOPs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [k.value for k in LayerKind])
@pytest.mark.parametrize(
    ("mesh_id", "strategy"), [("2x4", "fsdp=x,tp=y"), ("2x2x2", "fsdp=x+y,sp=z")]
)
def test_training_does_three_times_the_forward_matmul_flops(
    mesh_id: str, kind: str, strategy: str
) -> None:
    forward = validation_of(mesh_id, kind, "forward", strategy)
    train = validation_of(mesh_id, kind, "train", strategy)
    assert train.flops.plan == 3 * forward.flops.plan
    assert train.flops.jit == train.flops.plan  # XLA's dot count, backward included
    assert forward.flops.jit == forward.flops.plan
    # the book's 6 · params · tokens for the matmuls with a weight (attention's scores and
    # context matmuls come on top), per chip: every named strategy splits them 8 ways
    program = program_of(kind, "forward")
    weights = [t for t in program.params if len(t.letters) > 1]  # not the norm scales
    with_weight = {
        op.name
        for op in program.ops
        if op.kind is OpKind.EINSUM
        and any(i.tensor in {w.name for w in weights} for i in op.inputs)
    }
    plan = plan_of(mesh_id, kind, "train", strategy)
    weight_flops = sum(p.cost.flops for p in plan.ops if (p.op.of or p.op.name) in with_weight)
    tokens = program.tokens
    params = sum(program.elements(w.name) for w in weights)
    assert weight_flops == 6 * params * tokens / mesh_of(mesh_id).num_devices
    if kind in ("mlp", "gated-mlp"):
        assert train.flops.plan == weight_flops


# -- numerics ----------------------------------------------------------------------------------

NUMERICS = [
    pytest.param("2x4", "block", "train", "fsdp=x,sp=y", "none", id="block-fsdp-sp"),
    pytest.param("2x2x2", "attention", "train", "tp=x+y+z", "none", id="attention-tp3"),
    pytest.param("2x4", "attention", "train", "dp=x,attn.t=y", "none", id="attention-causal-t"),
    pytest.param("2x4", "gated-mlp", "forward", "dp=x,tp=y", "none", id="gated-forward"),
    pytest.param("2x2x2", "mlp", "train", "fsdp=x+y+z", "full", id="mlp-remat-full"),
    pytest.param("2x4", "block", "train", "fsdp=x,sp=y", "dots", id="block-remat-dots"),
    pytest.param("2x4", "block", "train", "fsdp=x,tp=y,io.d=y", "none", id="block-norm-d-pinned"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("mesh_id", "kind", "mode", "strategy", "remat"), NUMERICS)
def test_both_programs_compute_the_reference_numbers(
    mesh_id: str, kind: str, mode: str, strategy: str, remat: str
) -> None:
    v = validate_program(plan_of(mesh_id, kind, mode, strategy, remat), execute=True)
    assert v.verdict is not Verdict.MISMATCH, v.reasons
    n = v.numerics
    assert n is not None
    assert n.shard_map_ok, n.as_dict()  # the plan, replayed, is the layer and its gradients
    assert n.jit_ok, n.as_dict()
    assert n.shard_map_max_rel_error < 1e-5  # float32: rounding only


def test_optimizer_update_runs_in_the_optimizer_state_layout() -> None:
    plan = plan_of("2x4", "gated-mlp", "train", "dp=x,tp=y,zero=1", "none", True)
    v = validate_program(plan, execute=True)
    assert v.verdict is not Verdict.MISMATCH, v.reasons
    assert v.numerics is not None
    assert v.numerics.ok, v.numerics.as_dict()
    updates = [op for op in plan.ops if op.op.phase is Phase.OPTIMIZER]
    assert len(updates) == 3
    # ZeRO-1: the updated weights are all-gathered back into their replicated storage
    assert any(s.kind is not None and s.operand.startswith("new_") for s in plan.collectives)


# -- the programs themselves -------------------------------------------------------------------


def test_the_jit_program_saves_what_the_plan_saves() -> None:
    program = program_of("gated-mlp", "train")
    saved = programs.saved_activations(program)
    # inputs as read at each matmul (x stays gathered under sp), pointwise inputs, and the
    # activations the backward's einsums read
    assert set(saved) == {
        ("gate", "x"),
        ("up", "x"),
        ("act", "gate_out"),
        ("gating", "act_out"),
        ("gating", "up_out"),
        ("down", "hidden"),
    }


def test_shard_map_program_keeps_the_second_gather_of_a_weight() -> None:
    # ZeRO-3 gathers each weight in the forward and again in the backward: 6 gathers of
    # 3 weights; CSE would have merged each pair into one
    v = validate_program(plan_of("2x4", "gated-mlp", "train", "fsdp=x+y"), prove=True)
    assert v.shard_map is not None
    gathers = [r for r in v.shard_map if r.kind == "all-gather"]
    assert len(gathers) == 6
    assert v.verdict is Verdict.MATCH


def test_per_op_attribution_names_forward_and_backward_ops() -> None:
    v = validation_of("2x4", "gated-mlp", "train", "fsdp=x,tp=y")
    where = {(a.op, a.pass_name): sorted(r.kind for r in a.observed) for a in v.per_op}
    assert where[("gate", "forward")] == ["all-gather"]
    assert where[("down", "forward")] == ["all-gather", "all-reduce"]
    assert where[("gate", "backward")] == ["all-gather", "reduce-scatter"]
    assert ("", "") not in where  # every collective XLA emitted is attributed
    # the plan adds x's two gradient contributions as partial sums and all-reduces once
    # (charged to the add); XLA's CPU pipeline all-reduces each: one more, at up's backward
    assert where[("sum_d_x_2", "backward")] == ["all-reduce"]
    assert v.verdict is Verdict.XLA_DIFFERS
    assert v.difference == "+all-reduce[y]@up/backward"


def test_a_broken_plan_is_a_mismatch() -> None:
    import dataclasses  # noqa: PLC0415

    plan = plan_of("2x4", "mlp", "train", "fsdp=x+y")
    # drop the reduce-scatter of w_in's gradient: the plan now stores unreduced partial
    # sums as the gradient, and its own program cannot reach the gradient's layout
    ops = tuple(
        dataclasses.replace(p, steps_out=()) if p.op.name == "in_grad_w_in" else p for p in plan.ops
    )
    broken = dataclasses.replace(plan, ops=ops)
    v = validate_program(broken)
    assert v.verdict is Verdict.MISMATCH
    assert any("not at its home" in r for r in v.reasons), v.reasons


def test_reduce_ops_are_vector_work_not_dots() -> None:
    # the norm scales' gradients are REDUCE ops: the plan counts vector FLOPs, and neither
    # program emits a dot for them (XLA's transpose of the broadcast multiply is a reduce)
    plan = plan_of("2x4", "block", "train", "dp=x+y")
    reduces = [p for p in plan.ops if p.op.kind is OpKind.REDUCE]
    assert len(reduces) == 2
    assert all(p.cost.flops == 0 and p.cost.vector_flops > 0 for p in reduces)
    v = validation_of("2x4", "block", "train", "dp=x+y")
    assert v.flops.jit == plan.cost.flops


@pytest.mark.slow
def test_fast_compile_options_do_not_change_collectives_or_dots() -> None:
    plan = plan_of("2x4", "gated-mlp", "train", "fsdp=x,sp=y")
    fn, args = programs.jit_program(plan)
    lowered = fn.lower(*args)
    fast = lowered.compile(compiler_options=programs.FAST_COMPILE_OPTIONS).as_text()
    default = lowered.compile().as_text()

    def key(text: str) -> tuple[Any, ...]:
        colls = [(c.kind, c.result_types, c.groups) for c in read_collectives(text)]
        return tuple(sorted(colls, key=str)), dot_flops(text)

    assert key(fast) == key(default)


def test_format_program_validation() -> None:
    v = validation_of("2x4", "gated-mlp", "train", "fsdp=x,tp=y")
    text = format_program_validation(v)
    assert "verdict: xla-differs" in text
    assert "fsdp=x,tp=y" in text
    assert "all-gather[x] 1024->2048" in text
    assert "XLA's jit program adds all-reduce[y] 8192->8192" in text  # a reason
    assert "same" in text  # ops where XLA agrees
    assert "matmul FLOPs per chip" in text
    assert format_program_validation(v.as_dict()) == text
    json.dumps(v.as_dict())  # JSON-able


# -- the single einsum as a one-op program ------------------------------------------------------


def test_a_single_einsum_validates_the_same_as_a_one_op_program() -> None:
    # every other strategy of an einsum sweep case, through both validators: the program
    # evaluator predicts the planner's collectives, XLA compiles the same for both, verdicts
    # and FLOPs agree (docs/validation.md: the same on the einsum sweep's first cases)
    from sharding_roofline.einsum import Einsum  # noqa: PLC0415
    from sharding_roofline.planner import Planner  # noqa: PLC0415
    from sharding_roofline.xla.compare import multiset, validate_plan  # noqa: PLC0415
    from sharding_roofline.xla.program_compare import one_op_program  # noqa: PLC0415

    mesh = mesh_of("2x4")
    einsum = Einsum.create("bd,df->bf", "b=64,d=32,f=128", dtype="bfloat16")
    plans = Planner(einsum, mesh, check_memory=False).search(top=None).strategies[::2]
    assert len(plans) > 15
    verdicts = set()
    for plan in plans:
        single = validate_plan(plan, prove=False)
        program = validate_program(one_op_program(plan), prove=False)
        assert multiset(program.predicted) == multiset(single.predicted), plan.strategy
        assert multiset(program.observed) == multiset(single.observed), plan.strategy
        assert program.verdict is single.verdict, plan.strategy
        assert program.flops.plan == single.flops.plan
        verdicts.add(single.verdict)
    assert Verdict.XLA_DIFFERS in verdicts  # both paths see XLA's other choices too
