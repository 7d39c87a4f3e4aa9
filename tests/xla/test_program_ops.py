"""The interpreter's model ops (``xla/program_jax.py``) against numpy written from their
definitions: the mixture-of-experts dispatch and combine (hash routing in groups), the
embedding lookup and its gradient on a block of the vocabulary, the cross-entropy and its
gradient."""

from __future__ import annotations

import numpy as np
import pytest

from sharding_roofline.program.autodiff import training
from sharding_roofline.program.config import ModelConfig
from sharding_roofline.program.model import ends_program
from sharding_roofline.program.moe import moe_block

jax = pytest.importorskip("jax")

import jax.numpy as jnp  # noqa: E402

from sharding_roofline.errors import ValidationError  # noqa: E402
from sharding_roofline.xla.program_jax import OpContext, SlotGroups, apply_op  # noqa: E402

pytestmark = [pytest.mark.jax]

MOE = ModelConfig(
    name="tinymoe", d=8, f=16, n=2, k=1, h=4, layers=2, vocab=32, experts=4, top_k=2, expert_f=8
)
B, T = 4, 8  # 32 tokens: capacity 32 · 2 / 4 = 16 slots per expert


def _moe() -> object:
    return training(moe_block(MOE, B * T, T))


def _route(n: int, experts: int, slots: int) -> list[list[tuple[int, int]]]:
    """Token i's choices: (expert, slot) = ((i·k + j) mod E, (i·k + j) div E)."""
    k = min(experts, experts * slots // n)
    return [[((i * k + j) % experts, (i * k + j) // experts) for j in range(k)] for i in range(n)]


def _dispatch_numpy(x: np.ndarray, experts: int, slots: int) -> np.ndarray:
    tokens = x.reshape(-1, x.shape[-1])
    out = np.zeros((experts, slots, x.shape[-1]))
    for i, choices in enumerate(_route(len(tokens), experts, slots)):
        for e, s in choices:
            out[e, s] = tokens[i]
    return out


def test_dispatch_and_combine_route_each_token_to_its_experts() -> None:
    program = _moe()
    dispatch, combine = program.op("dispatch"), program.op("combine")
    ctx = OpContext(program=program, dtype="float32")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, T, MOE.d)).astype(np.float32)
    slots = program.size("c")
    assert slots == 16
    x_e = np.asarray(apply_op(dispatch, [jnp.asarray(x)], ctx))
    np.testing.assert_array_equal(x_e, _dispatch_numpy(x, MOE.experts, slots))
    # every token in exactly k = 2 slots (the capacity holds them all: no token dropped)
    assert np.count_nonzero(np.abs(x_e).sum(-1)) == B * T * MOE.top_k
    # combine: each token's slots weighted by its gates for those experts, summed
    gates = rng.random((B, T, MOE.experts)).astype(np.float32)
    y_e = rng.standard_normal(x_e.shape).astype(np.float32)
    got = np.asarray(apply_op(combine, [jnp.asarray(y_e), jnp.asarray(gates)], ctx))
    g = gates.reshape(-1, MOE.experts)
    want = np.zeros((B * T, MOE.d))
    for i, choices in enumerate(_route(B * T, MOE.experts, slots)):
        for e, s in choices:
            want[i] += g[i, e] * y_e[e, s]
    np.testing.assert_allclose(got, want.reshape(B, T, MOE.d), rtol=1e-6)


def test_the_gradient_views_are_the_transposes() -> None:
    # <dispatch(x), y> = <x, combine(y)> (no gates) and <combine(y; g), z> = <y, dispatch(z; g)>
    program = _moe()
    ctx = OpContext(program=program, dtype="float32")
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((B, T, MOE.d)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((MOE.experts, 16, MOE.d)), jnp.float32)
    g = jnp.asarray(rng.random((B, T, MOE.experts)), jnp.float32)
    dispatch_grad = program.op("dispatch_grad")  # a combine without gates
    combine_grad = program.op("combine_grad")  # a dispatch with gates
    assert (dispatch_grad.fn, combine_grad.fn) == ("combine", "dispatch")
    dx = apply_op(program.op("dispatch"), [x], ctx)
    lhs = float(jnp.sum(dx * y))
    rhs = float(jnp.sum(x * apply_op(dispatch_grad, [y], ctx)))
    assert lhs == pytest.approx(rhs, rel=1e-5)
    cy = apply_op(program.op("combine"), [y, g], ctx)
    lhs = float(jnp.sum(cy * x))
    rhs = float(jnp.sum(y * apply_op(combine_grad, [x, g], ctx)))
    assert lhs == pytest.approx(rhs, rel=1e-5)


def test_grouped_dispatch_is_each_groups_dispatch_in_the_slot_order() -> None:
    # b over x (2) and t over y (2): 4 groups of 8 tokens, 4 slots per expert each; the
    # slot letter is laid out with y major (the expert axes minor-most): group (bx, ty) is
    # the block ty * 2 + bx of the slots
    program = _moe()
    groups = SlotGroups(token_axes=(("b", (("x", 2),)), ("t", (("y", 2),))), slot_axes=("y", "x"))
    ctx = OpContext(program=program, dtype="float32", groups={"dispatch": groups})
    rng = np.random.default_rng(2)
    x = rng.standard_normal((B, T, MOE.d)).astype(np.float32)
    got = np.asarray(apply_op(program.op("dispatch"), [jnp.asarray(x)], ctx))
    blocks = [None] * 4
    for bx in range(2):
        for ty in range(2):
            part = x[bx * 2 : bx * 2 + 2, ty * 4 : ty * 4 + 4]
            blocks[ty * 2 + bx] = _dispatch_numpy(part, MOE.experts, 4)
    np.testing.assert_array_equal(got, np.concatenate(blocks, axis=1))
    bad = SlotGroups(token_axes=(("b", (("x", 2),)),), slot_axes=("y",))
    with pytest.raises(ValidationError, match="laid out as the tokens"):
        apply_op(
            program.op("dispatch"),
            [jnp.asarray(x)],
            OpContext(program=program, groups={"dispatch": bad}),
        )


def _ends() -> object:
    return training(ends_program(MOE, B * T, T))


def test_lookup_and_its_gradient_on_a_block_of_the_vocabulary() -> None:
    program = _ends()
    rng = np.random.default_rng(3)
    ids = rng.integers(0, MOE.vocab, (B, T)).astype(np.int32)
    table = rng.standard_normal((MOE.vocab, MOE.d)).astype(np.float32)
    dz = rng.standard_normal((B, T, MOE.d)).astype(np.float32)
    whole = OpContext(program=program, dtype="float32")
    x = np.asarray(apply_op(program.op("embed"), [jnp.asarray(ids), jnp.asarray(table)], whole))
    np.testing.assert_array_equal(x, table[ids])
    # rows 8..15 of 32: the tokens whose ids fall there, zeros elsewhere (a partial sum)
    block = OpContext(program=program, dtype="float32", offsets={"v": 8}, sizes={"v": 8})
    part = np.asarray(
        apply_op(program.op("embed"), [jnp.asarray(ids), jnp.asarray(table[8:16])], block)
    )
    held = (ids >= 8) & (ids < 16)
    np.testing.assert_array_equal(part, np.where(held[..., None], table[ids], 0.0))
    grad = np.asarray(
        apply_op(program.op("embed_grad"), [jnp.asarray(dz), jnp.asarray(ids)], block)
    )
    want = np.zeros((8, MOE.d))
    for (b, t), i in np.ndenumerate(ids):
        if 8 <= i < 16:
            want[i - 8] += dz[b, t]
    np.testing.assert_allclose(grad, want, rtol=1e-6, atol=1e-6)


def test_cross_entropy_and_its_gradient() -> None:
    program = _ends()
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((B, T, MOE.vocab)).astype(np.float32) * 3
    g = rng.standard_normal((B, T)).astype(np.float32)
    b, t = np.meshgrid(np.arange(B), np.arange(T), indexing="ij")
    label = (31 * b + 7 * t + 1) % MOE.vocab
    shifted = logits - logits.max(-1, keepdims=True)
    lse = np.log(np.exp(shifted).sum(-1)) + logits.max(-1)
    want = lse - np.take_along_axis(logits, label[..., None], -1)[..., 0]
    ctx = OpContext(program=program, dtype="float32")
    loss_op = program.op("loss")
    got = np.asarray(apply_op(loss_op, [jnp.asarray(logits)], ctx))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    softmax = np.exp(logits - lse[..., None])
    onehot = np.eye(MOE.vocab)[label]
    d_want = (softmax - onehot) * g[..., None]
    grad_op = program.op("loss_grad")
    d_got = apply_op(grad_op, [jnp.asarray(logits), jnp.asarray(got), jnp.asarray(g)], ctx)
    np.testing.assert_allclose(np.asarray(d_got), d_want, rtol=1e-5, atol=1e-6)
    # the custom gradient of the loss op is the same
    vjp = jax.vjp(lambda v: apply_op(loss_op, [v], ctx), jnp.asarray(logits))[1]
    np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(g))[0]), d_want, rtol=1e-5, atol=1e-6)
    # a block of the vocabulary without the reductions over its axes is refused
    block = OpContext(program=program, offsets={"v": 0}, sizes={"v": 16})
    with pytest.raises(ValidationError, match="split at the op"):
        apply_op(loss_op, [jnp.asarray(logits[..., :16])], block)
