"""A program (a graph of named tensors and ops) as JAX code: the validator's interpreter.

:func:`apply_op` runs one op on its inputs, global arrays or one device's blocks alike (every
letter an op reduces over is whole at the op): an einsum is ``jnp.einsum(op.equation, ...)``
with ``preferred_element_type`` the output tensor's dtype (an op that reads a tensor under
other letters passes it positionally); a ``REDUCE`` op multiplies and sums on the vector
units (no ``dot``, as the plan counts it); the memory-bound functions are ``jnp`` code: add,
mul, SiLU, GELU, softmax and the causal softmax (a ``jnp.where`` mask over the sequence
letters, no ``1/sqrt(h)`` scale: it changes no layout), RMSNorm over ``d`` with its scale,
AdamW from zero moments; each ``*_grad`` function is the ``jax.vjp`` of its forward
function on the same block.

:func:`forward_function` chains a program's forward ops (each under
``jax.named_scope(op.name)``, so compiled HLO names the op it came from, in the backward
too), with optional :class:`Pins` hooks at every op's inputs and result (the jit program's
layouts). :func:`training_function` is its ``jax.vjp`` with the incoming gradients
``d_<y>`` as inputs, then the optimizer update; :func:`reference_function` is either,
unsharded: the numerics' reference.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import jax
import jax.numpy as jnp

from sharding_roofline.errors import ValidationError
from sharding_roofline.program.graph import Op, OpKind, Phase, Program, TensorKind

__all__ = [
    "Arrays",
    "OpContext",
    "Pins",
    "adamw",
    "apply_op",
    "checkpoint_label",
    "forward_function",
    "forward_outputs",
    "reference_function",
    "saved_activations",
    "seed_gradients",
    "training_function",
]

_lax: Any = jax.lax

Arrays = dict[str, jax.Array]

_RMS_EPS = 1e-6
_ADAMW_LR = 1e-3
_ADAMW_EPS = 1e-8
_ADAMW_DECAY = 0.01


# -- one op -------------------------------------------------------------------------------


def _align(x: jax.Array, letters: str, target: str) -> jax.Array:
    """``x[letters]`` transposed and broadcast-shaped to ``target``'s letter order."""
    if letters == target:
        return x
    order = [letters.index(c) for c in target if c in letters]
    y = jnp.transpose(x, order)
    shape = [x.shape[letters.index(c)] if c in letters else 1 for c in target]
    return jnp.reshape(y, shape)


def _causal_mask(
    letters: str, shape: tuple[int, ...], query: str, key: str, offsets: Mapping[str, Any]
) -> jax.Array:
    """True where key position <= query position (global positions of this block)."""
    qi, ki = letters.index(query), letters.index(key)
    q = jnp.arange(shape[qi]) + offsets.get(query, 0)
    k = jnp.arange(shape[ki]) + offsets.get(key, 0)
    q_shape = [1] * len(shape)
    q_shape[qi] = shape[qi]
    k_shape = [1] * len(shape)
    k_shape[ki] = shape[ki]
    return jnp.reshape(k, k_shape) <= jnp.reshape(q, q_shape)


def _softmax(x: jax.Array, axis: int) -> jax.Array:
    return jax.nn.softmax(x.astype(jnp.float32), axis=axis).astype(x.dtype)


def _rmsnorm_hat(x: jax.Array, axis: int) -> jax.Array:
    """``x / rms(x)`` over ``axis`` (in float32, returned in x's dtype)."""
    x32 = x.astype(jnp.float32)
    rms = _lax.rsqrt(jnp.mean(x32 * x32, axis=axis, keepdims=True) + _RMS_EPS)
    return cast(jax.Array, (x32 * rms).astype(x.dtype))


def adamw(param: jax.Array, grad: jax.Array) -> jax.Array:
    """One AdamW step from zero moments (``m̂ = g``, ``v̂ = g²``), learning rate 1e-3."""
    update = grad / (jnp.abs(grad) + _ADAMW_EPS) + _ADAMW_DECAY * param
    return (param - _ADAMW_LR * update).astype(param.dtype)


@dataclass(frozen=True, slots=True, kw_only=True)
class OpContext:
    """What :func:`apply_op` needs besides the op's input values."""

    program: Program
    dtype: str | None = None  # overrides every tensor's dtype (numerics in float32)
    #: ``letter -> global position of this block's first element`` (the causal mask)
    offsets: Mapping[str, Any] | None = None

    def out_dtype(self, op: Op) -> Any:
        return jnp.dtype(self.dtype or self.program.tensor(op.output).dtype)


def _reduced_letter(op: Op) -> str:
    if len(op.reduce_letters) != 1:
        raise ValidationError(
            f"op {op.name!r} ({op.fn}) reduces over {op.reduce_letters!r}; the validator's "
            "softmax and norm reduce over exactly one letter"
        )
    return op.reduce_letters


def apply_op(op: Op, values: Sequence[jax.Array], ctx: OpContext) -> jax.Array:
    """One op on its inputs (global arrays or this device's blocks: every letter an op
    reduces over is whole at the op, so the same code serves both)."""
    out_dtype = ctx.out_dtype(op)
    letters = [item.letters for item in op.inputs]
    out = op.out_letters
    offsets = ctx.offsets or {}
    roles = ctx.program.roles
    if op.kind is OpKind.EINSUM:
        a, b = values
        return jnp.einsum(op.equation, a, b, preferred_element_type=out_dtype)
    if op.kind is OpKind.REDUCE:
        return _reduce(op, values, ctx)
    aligned = [_align(v, lt, out) for v, lt in zip(values, letters, strict=True)]
    fn = op.fn
    if fn == "add":
        return (aligned[0] + aligned[1]).astype(out_dtype)
    if fn == "mul":
        return (aligned[0] * aligned[1]).astype(out_dtype)
    if fn == "adamw":
        return adamw(aligned[0], aligned[1]).astype(out_dtype)
    unary: dict[str, Callable[[jax.Array], jax.Array]] = {
        "silu": jax.nn.silu,
        "gelu": jax.nn.gelu,
    }
    if fn in unary:
        return unary[fn](aligned[0]).astype(out_dtype)
    if fn.endswith("_grad") and fn[: -len("_grad")] in unary:
        forward = unary[fn[: -len("_grad")]]
        x, dz = aligned
        _, vjp = jax.vjp(forward, x)
        return cast(jax.Array, vjp(dz.astype(x.dtype))[0].astype(out_dtype))
    if fn in ("softmax", "causal_softmax"):
        axis_letter = _reduced_letter(op)
        x = aligned[0]
        if fn == "causal_softmax":
            mask = _causal_mask(
                out, x.shape, roles.sequence, roles.kv_sequence or axis_letter, offsets
            )
            x = jnp.where(mask, x, jnp.asarray(-jnp.inf, x.dtype))
        return _softmax(x, out.index(axis_letter)).astype(out_dtype)
    if fn in ("softmax_grad", "causal_softmax_grad"):
        axis_letter = _reduced_letter(op)
        y, dz = (v.astype(jnp.float32) for v in aligned)
        axis = out.index(axis_letter)
        dx = y * (dz - jnp.sum(dz * y, axis=axis, keepdims=True))  # masked: y = 0 there
        return dx.astype(out_dtype)
    if fn == "rmsnorm":
        axis_letter = _reduced_letter(op)
        x, scale = aligned
        return (_rmsnorm_hat(x, out.index(axis_letter)) * scale).astype(out_dtype)
    if fn == "rmsnorm_apply":
        # a sharded norm's second half (program/serving.py): given the sum of squares over
        # the model letter (a REDUCE of x·x), x / rms(x) · scale with the letter's global size
        x, squares, scale = (v.astype(jnp.float32) for v in aligned)
        width = ctx.program.size(roles.model)
        return cast(
            jax.Array, (x * _lax.rsqrt(squares / width + _RMS_EPS) * scale).astype(out_dtype)
        )
    if fn == "rmsnorm_grad":
        axis_letter = _reduced_letter(op)
        x, scale, dz = aligned
        axis = out.index(axis_letter)
        _, vjp = jax.vjp(lambda v: _rmsnorm_hat(v, axis) * scale, x)
        return cast(jax.Array, vjp(dz.astype(x.dtype))[0].astype(out_dtype))
    raise ValidationError(
        f"op {op.name!r}: the validator has no JAX code for function {fn!r} "
        f"({op.kind.value}); supported: add, mul, silu, gelu, softmax, causal_softmax, "
        "rmsnorm (and their _grad), rmsnorm_apply, adamw, reduce"
    )


def _reduce(op: Op, values: Sequence[jax.Array], ctx: OpContext) -> jax.Array:
    """A vector contraction (``REDUCE``): multiply, then sum the letters the output drops
    (on the vector units: no ``dot``, as the plan counts it). An RMSNorm's scale gradient
    reads the norm's input and contracts the incoming gradient with the *normalised* input,
    which needs the normalised letter whole at the op."""
    out_dtype = ctx.out_dtype(op)
    (la, a), (lb, b) = zip((item.letters for item in op.inputs), values, strict=True)
    norm = ctx.program.op(op.of) if op.of else None
    if norm is not None and norm.kind is OpKind.NORM and norm.fn == "rmsnorm":
        axis_letter = _reduced_letter(norm)
        b = _rmsnorm_hat(b, lb.index(axis_letter))
    every = "".join(dict.fromkeys(la + lb))
    product = _align(a.astype(jnp.float32), la, every) * _align(b.astype(jnp.float32), lb, every)
    summed = tuple(i for i, c in enumerate(every) if c not in op.out_letters)
    total = jnp.sum(product, axis=summed)
    kept = "".join(c for c in every if c in op.out_letters)
    order = [kept.index(c) for c in op.out_letters]
    return jnp.transpose(total, order).astype(out_dtype)


# -- the forward function and the reference -------------------------------------------------


def forward_outputs(program: Program) -> tuple[str, ...]:
    """The forward pass's results: a training program's seeded outputs (each has an
    incoming gradient ``d_<y>``), or a forward program's outputs."""
    if not program.has_backward:
        return program.outputs
    seeds = {g for _, g in program.gradients if program.tensor(g).kind is TensorKind.INPUT}
    return tuple(y for y, g in program.gradients if g in seeds)


def seed_gradients(program: Program) -> dict[str, str]:
    """``forward output -> its incoming gradient`` (empty for a forward program)."""
    if not program.has_backward:
        return {}
    return {y: g for y, g in program.gradients if program.tensor(g).kind is TensorKind.INPUT}


class Pins:
    """Hooks the forward function calls at every op (the jit program's layouts)."""

    def input(self, op: Op, index: int, value: jax.Array) -> jax.Array:
        return value

    def output(self, op: Op, value: jax.Array) -> jax.Array:
        return value


def forward_function(
    program: Program, *, dtype: str | None = None, pins: Pins | None = None
) -> Callable[[Arrays, Arrays], Arrays]:
    """The program's forward ops as ``f(params, inputs) -> {output: array}``. Each op runs
    under ``jax.named_scope(op.name)``, so the compiled HLO's ``op_name`` metadata names it
    (in the backward pass too: ``transpose(jvp(...))/.../gate/...``)."""
    ops = [op for op in program.ops if op.phase is Phase.FORWARD]
    outputs = forward_outputs(program)
    ctx = OpContext(program=program, dtype=dtype)
    hooks = pins or Pins()

    def forward(params: Arrays, inputs: Arrays) -> Arrays:
        env: dict[str, jax.Array] = {**params, **inputs}
        for op in ops:
            with jax.named_scope(op.name):
                values = [hooks.input(op, k, env[item.tensor]) for k, item in enumerate(op.inputs)]
                env[op.output] = hooks.output(op, apply_op(op, values, ctx))
        return {y: env[y] for y in outputs}

    return forward


def saved_activations(program: Program) -> tuple[tuple[str, str], ...]:
    """What a training program's backward (and recompute) ops read from the forward pass:
    ``(forward op, tensor)`` for a tensor saved as laid out at that op (a gathered input
    stays gathered), ``("", tensor)`` for one read from its home. Parameters are not saved
    (the backward re-reads them from storage)."""
    forward = {op.name for op in program.ops if op.phase is Phase.FORWARD}
    produced = {op.output for op in program.ops if op.phase is Phase.FORWARD}
    seeds = set(seed_gradients(program).values())
    produced |= {t.name for t in program.inputs if t.name not in seeds}
    out: dict[tuple[str, str], None] = {}
    for op in program.ops:
        if op.phase in (Phase.FORWARD, Phase.OPTIMIZER):
            continue
        for item in op.inputs:
            if item.tensor not in produced:
                continue
            at = item.saved_at if item.saved_at in forward else ""
            out.setdefault((at, item.tensor))
    return tuple(out)


def checkpoint_label(at: str, tensor: str) -> str:
    return f"saved:{at or 'home'}:{tensor}"


def training_function(
    program: Program,
    forward: Callable[[Arrays, Arrays], Arrays],
    *,
    policy: Any,
    optimizer: Callable[[Op, jax.Array, jax.Array], jax.Array] | None = None,
) -> Callable[[Arrays, Arrays, Arrays], Arrays]:
    """``train(params, inputs, seeds) -> {tensor: array}``: the forward outputs, then every
    output of the training program (gradients; AdamW-updated parameters)."""
    seeds = seed_gradients(program)
    grad_of = {fwd: grad for fwd, grad in program.gradients if fwd not in seeds}
    param_names = {t.name for t in program.params}
    updates = [op for op in program.ops if op.phase is Phase.OPTIMIZER]
    fn = jax.checkpoint(forward, policy=policy) if policy is not None else forward

    def train(params: Arrays, inputs: Arrays, incoming: Arrays) -> Arrays:
        outs, vjp = jax.vjp(fn, params, inputs)
        d_params, d_inputs = vjp({y: incoming[seeds[y]] for y in outs})
        result: dict[str, jax.Array] = dict(outs)
        for fwd, grad in grad_of.items():
            result[grad] = d_params[fwd] if fwd in param_names else d_inputs[fwd]
        for op in updates:
            param, grad = (item.tensor for item in op.inputs)
            with jax.named_scope(op.name):
                update = optimizer or (lambda _, p, g: adamw(p, g))
                result[op.output] = update(op, params[param], result[grad])
        return {name: result[name] for name in (*outs, *program.outputs)}

    return train


def reference_function(
    program: Program, *, dtype: str | None = None
) -> Callable[[Arrays, Arrays, Arrays], Arrays]:
    """The program unsharded: ``f(params, inputs, seeds) -> {tensor: array}`` (the forward
    outputs, and for a training program its gradients and updates by ``jax.vjp``)."""
    forward = forward_function(program, dtype=dtype)
    if not program.has_backward:
        return lambda params, inputs, seeds: forward(params, inputs)
    return training_function(program, forward, policy=None)
