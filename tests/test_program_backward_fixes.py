"""Regressions in the mechanical backward pass found by the program validator
(tests/xla/test_xla_programs.py replays each plan in shard_map and compares it with
``jax.vjp``); these check the planner side without JAX."""

from __future__ import annotations

from sharding_roofline.mesh import DeviceMesh
from sharding_roofline.presets import load_preset
from sharding_roofline.program.autodiff import training
from sharding_roofline.program.evaluate import evaluate
from sharding_roofline.program.graph import OpKind, Phase
from sharding_roofline.program.layers import LayerSpec, build_layer
from sharding_roofline.program.strategies import place

SIZES = {"d": 64, "f": 128, "n": 8, "k": 4, "h": 8, "t": 16}


def _mesh() -> DeviceMesh:
    return DeviceMesh.create(load_preset("tpu-v5e"), "x=2,y=4", "2x4")


def _layer(kind: str) -> LayerSpec:
    return LayerSpec.from_dims(kind, SIZES, batch_tokens=256)


def test_full_remat_does_not_recompute_what_the_backward_never_reads() -> None:
    # Before: remat=full recomputed the layer's last matmul (re_down) and, under TP, its
    # all-reduce; nothing read the result, and jax.checkpoint never recomputes it.
    forward = build_layer(_layer("gated-mlp"))
    program = training(forward, remat="full")
    recomputed = [op.of for op in program.ops if op.phase is Phase.RECOMPUTE]
    assert recomputed == ["gate", "up", "act", "gating"]
    names = {op.name for op in program.ops}
    assert all(item.saved_at in names for op in program.ops for item in op.inputs if item.saved_at)
    # down's backward reads the recomputed hidden from its home (no op moved it elsewhere)
    (down_grad,) = (op for op in program.ops if op.name == "down_grad_w_down")
    assert (down_grad.inputs[0].tensor, down_grad.inputs[0].saved_at) == ("re_hidden", "")
    # the matmul FLOPs: the forward, the recomputation of 2 of its 3 matmuls, the backward
    mesh = _mesh()
    plan = evaluate(program, mesh, place(program, mesh, "dp=x,tp=y"))
    per_matmul = 2 * 256 * 64 * 128 / 8
    assert plan.cost.flops == (3 + 2 + 6) * per_matmul
    assert not [s for s in plan.collectives if s.operand == "re_mlp_out"]


def test_dots_remat_moves_a_recomputed_input_to_the_einsum_that_reads_it() -> None:
    # Before: under remat=dots the backward of an einsum that is not recomputed read the
    # recomputed re_xn2 as laid out at the forward op (gathered over the sequence under sp),
    # though only its home copy (split over y) existed: a gather the plan did not count.
    program = training(build_layer(_layer("block")), remat="dots")
    mesh = _mesh()
    plan = evaluate(program, mesh, place(program, mesh, "fsdp=x,sp=y"))
    reads = [(item.tensor, item.saved_at) for item in program.op("up_grad_w_up").inputs]
    assert reads[0] == ("re_xn2", "")
    gathers = [
        s
        for s in plan.collectives
        if s.operand == "re_xn2" and s.kind is not None and s.kind.value == "all-gather"
    ]
    assert len(gathers) == 1  # once in the backward pass, by its first reader ...
    assert gathers[0] in plan.op("up_grad_w_up").steps_in
    reuser = plan.op("gate_grad_w_gate")  # ... and reused by the next
    assert reuser.op.inputs[0].tensor == "re_xn2"
    assert all(s.operand != "re_xn2" for s in reuser.steps_in)


def test_norm_scale_gradient_keeps_the_normalised_letter_whole() -> None:
    # Before: the scale's gradient sum(dz * x / rms(x)) ran with d split when a pin split d
    # in the boundary stage, and rms(x) needs every d (the plan's program computed wrong
    # numbers). Now the op keeps d whole, as the norm does.
    program = training(build_layer(_layer("block")))
    reduce_ops = [op for op in program.ops if op.kind is OpKind.REDUCE]
    assert [op.reduce_letters for op in reduce_ops] == ["d", "d"]
    mesh = _mesh()
    plan = evaluate(program, mesh, place(program, mesh, "fsdp=x,tp=y,io.d=y"))
    for op in reduce_ops:
        assert "d" not in dict(plan.op(op.name).sigma)


def test_a_recomputed_dispatch_runs_at_the_forward_dispatch_layout() -> None:
    """Before: remat=full copied a MoE block's dispatch without its slot-as-token relabel,
    so the recomputed dispatch wrote every expert's every slot on each chip (a transient of
    448 GiB per chip for a DeepSeek-V3-like block on 1,024 H100s)."""
    from sharding_roofline.program.config import ModelConfig  # noqa: PLC0415
    from sharding_roofline.program.moe import moe_block  # noqa: PLC0415

    config = ModelConfig(
        name="tiny-moe", d=64, f=128, n=8, k=4, h=8, layers=2, vocab=256, experts=8, top_k=2,
        expert_f=32, seq_len=16,
    )  # fmt: skip
    program = training(moe_block(config, 256, 16), remat="full")
    mesh = _mesh()
    plan = evaluate(program, mesh, place(program, mesh, "fsdp=x+y,ep=y"))
    ops = {op.op.name: op for op in plan.ops}
    forward, again = ops["dispatch"], ops["re_dispatch"]
    assert again.op.relabel == forward.op.relabel != ()
    assert again.out_local == forward.out_local  # the same layout of x_e
    assert again.cost.peak_memory_bytes == forward.cost.peak_memory_bytes


def test_a_vocabulary_split_loss_all_reduces_its_statistics_first() -> None:
    # Before: the loss split over v (tp on the head) was one all-reduce of the per-token
    # loss, which no cross-entropy computes: log Σ exp needs the largest logit and the sum
    # of exponentials whole first (both read again by the gradient), then the label's
    # logit, a partial sum, is reduced into the loss's home (XLA's partitioner and
    # Megatron's vocabulary-parallel loss issue the same; the shard_map replay needs them)
    from sharding_roofline.collectives import Collective  # noqa: PLC0415
    from sharding_roofline.program.config import ModelConfig  # noqa: PLC0415
    from sharding_roofline.program.evaluate import LOSS_STATISTICS  # noqa: PLC0415
    from sharding_roofline.program.model import ends_program  # noqa: PLC0415

    config = ModelConfig(name="tiny", d=32, f=64, n=4, k=2, h=8, layers=2, vocab=64)
    batch, seq = 8, 16
    program = training(ends_program(config, batch * seq, seq))
    mesh = _mesh()  # x=2, y=4
    per_chip = batch // 2 * seq  # b over x, t whole at the loss
    assert LOSS_STATISTICS == 2
    for strategy, last in (
        ("dp=x,tp=y", (Collective.ALL_REDUCE, per_chip)),  # the loss's home: [b_x, t]
        ("dp=x,sp=y", (Collective.REDUCE_SCATTER, per_chip)),  # its home: [b_x, t_y]
    ):
        plan = evaluate(program, mesh, place(program, mesh, strategy))
        loss = plan.op("loss")
        assert loss.unreduced == ("y",)  # v over y: the loss itself is a partial sum
        steps = [(s.kind, s.axes, s.cost.elements_in_per_chip) for s in loss.steps_out]
        assert steps == [
            (Collective.ALL_REDUCE, ("y",), per_chip),
            (Collective.ALL_REDUCE, ("y",), per_chip),
            (last[0], ("y",), last[1]),
        ], strategy
        # its gradient reads them saved: it moves only the incoming gradient (gathered
        # from its sequence-parallel home under sp)
        assert {s.operand for s in plan.op("loss_grad").collectives} <= {"d_loss"}
    # the vocabulary whole at the loss (data parallelism only): nothing to reduce
    plan = evaluate(program, mesh, place(program, mesh, "dp=x+y"))
    assert plan.op("loss").steps_out == ()
