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

import math
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
    "SlotGroups",
    "adamw",
    "apply_op",
    "checkpoint_label",
    "forward_function",
    "forward_outputs",
    "labels",
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


def _saved_softmax(axis: int, dtype: Any, name: Callable[[jax.Array], jax.Array]) -> Any:
    """A softmax whose gradient reads its saved output, ``y · (dy - Σ dy·y)``: JAX's own
    derivative reads the output before the cast, which a checkpoint policy cannot name, so
    a ``jax.checkpoint``-ed scan would recompute the scores for it (``name`` marks the
    output saved, as the plan saves it)."""

    @jax.custom_vjp
    def f(x: jax.Array) -> jax.Array:
        return _softmax(x, axis).astype(dtype)

    def fwd(x: jax.Array) -> tuple[jax.Array, tuple[jax.Array]]:
        y = name(_softmax(x, axis).astype(dtype))
        return y, (y,)

    def bwd(res: tuple[jax.Array], g: jax.Array) -> tuple[jax.Array]:
        y = res[0].astype(jnp.float32)
        g32 = g.astype(jnp.float32)
        return ((y * (g32 - jnp.sum(g32 * y, axis=axis, keepdims=True))).astype(g.dtype),)

    f.defvjp(fwd, bwd)
    return f


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
class SlotGroups:
    """How a mixture-of-experts dispatch groups its tokens (GShard's groups): each group of
    tokens fills its own capacity slots. At a ``RELABEL`` op the slot letter is laid out as
    the token letters it stands for, so one chip's tokens are one group; on global arrays
    (the reference, the jit program) the tokens split into the same groups: ``token_axes``
    gives, per token letter, the mesh axes splitting it at the op and their sizes (major
    first), ``slot_axes`` the slot letter's axes (major first: the groups' order along it)."""

    token_axes: tuple[tuple[str, tuple[tuple[str, int], ...]], ...] = ()
    slot_axes: tuple[str, ...] = ()

    @property
    def count(self) -> int:
        return math.prod(size for _, axes in self.token_axes for _, size in axes)


@dataclass(frozen=True, slots=True, kw_only=True)
class OpContext:
    """What :func:`apply_op` needs besides the op's input values."""

    program: Program
    dtype: str | None = None  # overrides every tensor's dtype (numerics in float32)
    #: ``letter -> global position of this block's first element`` (the causal mask, the
    #: loss's labels, a vocabulary-split lookup's rows)
    offsets: Mapping[str, Any] | None = None
    #: ``letter -> size in this block`` where it differs from the program's (a lookup's
    #: gradient learns its table block's rows from it); the program's sizes by default
    sizes: Mapping[str, int] | None = None
    #: ``op name -> its dispatch groups`` on global arrays (none: the block is one group)
    groups: Mapping[str, SlotGroups] | None = None
    #: a vocabulary-split loss's reductions over the axes splitting the vocabulary
    #: (``reduce(value, "max" | "sum")``, one per statistic, in the plan's order)
    reduce: Callable[[jax.Array, str], jax.Array] | None = None
    #: what an op keeps for its gradient op besides its inputs (the loss's log-sum-exp,
    #: by the loss op's name), written and read by the replay
    stash: dict[str, jax.Array] | None = None
    #: names a residual the backward reads (the jit program's checkpoint policy)
    residual: Callable[[Op, jax.Array], jax.Array] | None = None

    def out_dtype(self, op: Op) -> Any:
        tensor = self.program.tensor(op.output)
        if jnp.issubdtype(jnp.dtype(tensor.dtype), jnp.integer):
            return jnp.dtype(tensor.dtype)
        return jnp.dtype(self.dtype or tensor.dtype)

    def size(self, letter: str) -> int:
        if self.sizes and letter in self.sizes:
            return self.sizes[letter]
        return self.program.size(letter)


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
    if op.kind is OpKind.RELABEL:
        return _relabel(op, values, ctx)
    if op.kind is OpKind.GATHER:
        return _lookup(op, values, ctx)
    if op.kind is OpKind.SCATTER:
        return _lookup_grad(op, values, ctx)
    if op.kind is OpKind.LOSS:
        return _xent(op, values, ctx)
    if op.fn == "xent_grad":
        return _xent_grad(op, values, ctx)
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
    if fn == "router":  # the gates: a softmax over the experts, a stop-gradient
        axis_letter = _reduced_letter(op)
        gates = _softmax(aligned[0], out.index(axis_letter)).astype(out_dtype)
        return cast(jax.Array, _lax.stop_gradient(gates))
    if fn in ("softmax", "causal_softmax"):
        axis_letter = _reduced_letter(op)
        x = aligned[0]
        if fn == "causal_softmax":
            mask = _causal_mask(
                out, x.shape, roles.sequence, roles.kv_sequence or axis_letter, offsets
            )
            x = jnp.where(mask, x, jnp.asarray(-jnp.inf, x.dtype))
        residual = ctx.residual
        if residual is None:
            return _softmax(x, out.index(axis_letter)).astype(out_dtype)
        named = _saved_softmax(out.index(axis_letter), out_dtype, lambda v: residual(op, v))
        return cast(jax.Array, named(x))
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
        "rmsnorm (and their _grad), rmsnorm_apply, adamw, reduce, router, dispatch, combine, "
        "gather, scatter, xent (and its _grad)"
    )


def _to_order(x: jax.Array, letters: str, order: str) -> jax.Array:
    """``x[letters]`` transposed to ``order`` (the same letters)."""
    if letters == order:
        return x
    return jnp.transpose(x, [letters.index(c) for c in order])


# -- mixture of experts: the token <-> slot views -----------------------------------------------


def _group_layout(
    tokens: str, shape: Sequence[int], groups: SlotGroups, where: str
) -> tuple[list[int], list[int], int]:
    """For an array whose leading dims are the token letters (global sizes ``shape``): the
    shape splitting each token letter into its axes' blocks and its local part, the
    permutation to ``(slot axes..., local parts...)`` and the tokens per group."""
    by_letter = dict(groups.token_axes)
    split: list[int] = []
    labels: list[str] = []
    for letter, size in zip(tokens, shape, strict=False):
        axes = by_letter.get(letter, ())
        pieces = math.prod(n for _, n in axes)
        if size % pieces:
            raise ValidationError(f"{where}: {letter}={size} does not divide into {pieces} groups")
        split += [n for _, n in axes] + [size // pieces]
        labels += [a for a, _ in axes] + [f"local:{letter}"]
    token_axes = [a for _, axes in groups.token_axes for a, _ in axes]
    if sorted(token_axes) != sorted(groups.slot_axes):
        raise ValidationError(
            f"{where}: the slots are split over {'+'.join(groups.slot_axes) or 'nothing'}, the "
            f"tokens over {'+'.join(token_axes) or 'nothing'}; the slot letter must be laid out "
            "as the tokens it holds"
        )
    order = [labels.index(a) for a in groups.slot_axes]
    order += [labels.index(f"local:{c}") for c in tokens]
    n = math.prod(shape[: len(tokens)]) // groups.count
    return split, order, n


def _to_groups(x: jax.Array, tokens: str, groups: SlotGroups, where: str) -> jax.Array:
    """``x[tokens..., rest...]`` -> ``[G, n, rest...]``: the groups in the slot letter's order."""
    rest = list(x.shape[len(tokens) :])
    split, order, n = _group_layout(tokens, x.shape, groups, where)
    y = jnp.reshape(x, split + rest)
    y = jnp.transpose(y, order + list(range(len(split), len(split) + len(rest))))
    return jnp.reshape(y, [groups.count, n, *rest])


def _from_groups(
    y: jax.Array, tokens: str, shape: Sequence[int], groups: SlotGroups, where: str
) -> jax.Array:
    """The inverse of :func:`_to_groups`: ``[G, n, rest...]`` -> ``[tokens..., rest...]``."""
    rest = list(y.shape[2:])
    split, order, _ = _group_layout(tokens, shape, groups, where)
    z = jnp.reshape(y, [split[i] for i in order] + rest)
    inverse = [order.index(i) for i in range(len(split))]
    z = jnp.transpose(z, inverse + list(range(len(split), len(split) + len(rest))))
    return jnp.reshape(z, list(shape[: len(tokens)]) + rest)


def _routing(n: int, slots: int, experts: int) -> tuple[int, jax.Array]:
    """Hash routing within a group of ``n`` tokens: token ``i``'s ``j``-th choice is expert
    ``(i·k + j) mod E`` at slot ``(i·k + j) div E``, with ``k = min(E, ⌊E·slots/n⌋)`` choices
    (the top-k when the capacity factor is 1): balanced, so no token is dropped. Returns
    ``k`` and the one-hot ``[n, k, E]`` of each choice's expert."""
    k = min(experts, experts * slots // n)
    if k < 1:
        raise ValidationError(
            f"a group of {n} tokens does not fit {experts} experts of {slots} slots each"
        )
    q = jnp.arange(n)[:, None] * k + jnp.arange(k)[None, :]
    return k, (q[:, :, None] % experts) == jnp.arange(experts)[None, None, :]


def _relabel(op: Op, values: Sequence[jax.Array], ctx: OpContext) -> jax.Array:
    """A mixture-of-experts token <-> slot view (``moe.py``), on a group of tokens (one chip's
    at the op, or on global arrays every group of :class:`SlotGroups`): ``dispatch`` copies
    each token into its experts' slots ``[e, c, ...]`` (with gates: weighted by them, the
    combine's gradient); ``combine`` sums each token's slots back (with gates: weighted by
    them; without: the dispatch's gradient). Routing is the hash routing of
    :func:`_routing`; empty slots are zeros. No dot: the plan counts no matmul here."""
    if len(op.relabel) != 1:
        raise ValidationError(f"op {op.name!r}: the validator relabels exactly one slot letter")
    ((slot, tokens),) = op.relabel
    expert = ctx.program.roles.experts
    where = f"op {op.name!r} ({op.fn})"
    if ctx.size(expert) != ctx.program.size(expert):
        raise ValidationError(
            f"{where}: the expert letter {expert!r} is split at the op; a dispatch fills every "
            "expert's slots of its tokens, so the experts must be whole there"
        )
    experts = ctx.program.size(expert)
    groups = (ctx.groups or {}).get(op.name, SlotGroups())
    out_dtype = ctx.out_dtype(op)
    data, *rest_values = values
    data_letters = op.inputs[0].letters
    gates = None
    if rest_values:
        gate_letters = op.inputs[1].letters
        g = _to_order(rest_values[0], gate_letters, tokens + expert).astype(jnp.float32)
        gates = _to_groups(g, tokens, groups, where)  # [G, n, E]
    if op.fn == "dispatch":
        rest = "".join(c for c in data_letters if c not in tokens)
        x = _to_groups(_to_order(data, data_letters, tokens + rest), tokens, groups, where)
        count, n = x.shape[0], x.shape[1]
        slots = ctx.size(slot) // groups.count
        k, choice = _routing(n, slots, experts)
        trail = tuple(x.shape[2:])
        rep = jnp.broadcast_to(x[:, :, None], (count, n, k, *trail))
        if gates is not None:
            w = jnp.sum(gates[:, :, None, :] * choice[None], axis=-1)  # [G, n, k]
            rep = (rep.astype(jnp.float32) * w.reshape(w.shape + (1,) * len(trail))).astype(x.dtype)
        flat = jnp.reshape(rep, (count, n * k, *trail))
        pad = [(0, 0), (0, experts * slots - n * k)] + [(0, 0)] * len(trail)
        flat = jnp.pad(flat, pad)
        y = jnp.reshape(flat, (count, slots, experts, *trail))
        y = jnp.moveaxis(y, 2, 0)  # [E, G, slots, rest]
        y = jnp.reshape(y, (experts, count * slots, *trail))
        return _to_order(y, expert + slot + rest, op.out_letters).astype(out_dtype)
    if op.fn == "combine":
        rest = "".join(c for c in data_letters if c not in (expert, slot))
        y = _to_order(data, data_letters, expert + slot + rest)
        token_shape = [ctx.size(c) for c in tokens]
        count = groups.count
        slots = y.shape[1] // count
        n = math.prod(token_shape) // count
        k, choice = _routing(n, slots, experts)
        trail = tuple(y.shape[2:])
        z = jnp.reshape(y, (experts, count, slots, *trail))
        z = jnp.moveaxis(z, 0, 2)  # [G, slots, E, rest]
        z = jnp.reshape(z, (count, slots * experts, *trail))[:, : n * k]
        z = jnp.reshape(z, (count, n, k, *trail))
        if gates is not None:
            w = jnp.sum(gates[:, :, None, :] * choice[None], axis=-1)
            z = z.astype(jnp.float32) * w.reshape(w.shape + (1,) * len(trail))
        total = jnp.sum(z.astype(jnp.float32), axis=2)
        x = _from_groups(total, tokens, [*token_shape, *trail], groups, where)
        return _to_order(x, tokens + rest, op.out_letters).astype(out_dtype)
    raise ValidationError(f"{where}: unknown relabel function {op.fn!r}")


# -- the embedding and the loss -----------------------------------------------------------------


def _vocab_letter(op: Op, letters: str) -> str:
    missing = [c for c in letters if c not in op.out_letters]
    if len(missing) != 1:
        raise ValidationError(f"op {op.name!r}: expected one vocabulary letter, got {missing}")
    return missing[0]


def _lookup(op: Op, values: Sequence[jax.Array], ctx: OpContext) -> jax.Array:
    """An embedding lookup ``ids[b, t], table[v, d] -> x[b, t, d]``; a block of the table's
    rows (``v`` split at the op, its first row ``offsets[v]``) looks up the ids it holds and
    gives zeros for the others: a partial sum over the axes that split ``v``."""
    ids, table = values
    ids_letters, table_letters = (item.letters for item in op.inputs)
    vocab = _vocab_letter(op, table_letters)
    rest = "".join(c for c in table_letters if c != vocab)
    rows_table = _to_order(table, table_letters, vocab + rest)
    offset = (ctx.offsets or {}).get(vocab)
    if offset is None:
        rows = jnp.take(rows_table, ids, axis=0)
    else:
        local = ids - offset
        held = (local >= 0) & (local < rows_table.shape[0])
        rows = jnp.take(rows_table, jnp.clip(local, 0, rows_table.shape[0] - 1), axis=0)
        rows = jnp.where(held.reshape(held.shape + (1,) * len(rest)), rows, 0)
    return _to_order(rows, ids_letters + rest, op.out_letters).astype(ctx.out_dtype(op))


def _lookup_grad(op: Op, values: Sequence[jax.Array], ctx: OpContext) -> jax.Array:
    """The lookup's gradient ``d_x[b, t, d], ids[b, t] -> d_table[v, d]``: each token's
    gradient added into its row (into this block's rows, when ``v`` is split)."""
    dz, ids = values
    dz_letters, ids_letters = (item.letters for item in op.inputs)
    vocab = next(c for c in op.out_letters if c not in dz_letters)
    rest = "".join(c for c in op.out_letters if c != vocab)
    grads = _to_order(dz, dz_letters, ids_letters + rest).astype(jnp.float32)
    rows = ctx.size(vocab)
    table = jnp.zeros((rows, *grads.shape[len(ids_letters) :]), jnp.float32)
    offset = (ctx.offsets or {}).get(vocab)
    if offset is None:
        table = table.at[ids].add(grads)
    else:
        local = ids - offset
        held = (local >= 0) & (local < rows)
        table = table.at[jnp.where(held, local, rows)].add(grads, mode="drop")
    return _to_order(table, vocab + rest, op.out_letters).astype(ctx.out_dtype(op))


_LABEL_STRIDES = (31, 7, 13, 17, 19)


def labels(letters: str, shape: Sequence[int], vocab: int, offsets: Mapping[str, Any]) -> jax.Array:
    """The loss's target token at every position: a fixed hash of the global position
    (``(31·b + 7·t + 1) mod V``; the program has no label tensor, and its layouts do not
    depend on the targets)."""
    total: Any = jnp.int32(1)
    for i, (letter, size) in enumerate(zip(letters, shape, strict=True)):
        position = jnp.arange(size, dtype=jnp.int32) + offsets.get(letter, 0)
        index = [1] * len(shape)
        index[i] = size
        total = total + jnp.reshape(position, index) * _LABEL_STRIDES[i % len(_LABEL_STRIDES)]
    return jnp.broadcast_to(total % vocab, tuple(shape))


def _target(op: Op, logits: jax.Array, letters: str, ctx: OpContext) -> jax.Array:
    """One-hot targets over ``letters`` (the logits' letters, the vocabulary last)."""
    vocab = letters[-1]
    offsets = ctx.offsets or {}
    label = labels(letters[:-1], logits.shape[:-1], ctx.program.size(vocab), offsets)
    position = jnp.arange(logits.shape[-1], dtype=jnp.int32) + offsets.get(vocab, 0)
    return cast(jax.Array, label[..., None] == position)


def _xent(op: Op, values: Sequence[jax.Array], ctx: OpContext) -> jax.Array:
    """Softmax cross-entropy ``logits[b, t, v] -> loss[b, t]`` (float32) against the
    :func:`labels`: ``log Σ exp(l) - l[label]``, from the largest logit ``m``,
    ``Σ exp(l - m)`` and the label's logit. With the vocabulary split at the op (a block of
    it here) the first two are reductions over the axes splitting it (``ctx.reduce``: max,
    sum) and the label's logit a partial sum, so the loss is one, reduced by the plan's steps
    after the op: a vocabulary-parallel loss. On whole rows, a ``custom_vjp`` whose gradient
    reads the saved log-sum-exp, ``(exp(l - lse) - onehot) · d_loss``, as the plan's
    gradient op does (JAX's own derivative would recompute the max under remat)."""
    (logits,) = values
    letters = op.inputs[0].letters
    vocab = _vocab_letter(op, letters)
    order = "".join(c for c in letters if c != vocab) + vocab
    x = _to_order(logits, letters, order).astype(jnp.float32)
    onehot = _target(op, x, order, ctx)
    if _split(op, vocab, x.shape[-1], ctx):
        assert ctx.reduce is not None
        m = ctx.reduce(jnp.max(x, axis=-1), "max")
        total = ctx.reduce(jnp.sum(jnp.exp(x - m[..., None]), axis=-1), "sum")
        lse = jnp.log(total) + m
        if ctx.stash is not None:
            ctx.stash[op.name] = lse
        pick = jnp.sum(jnp.where(onehot, x, 0.0), axis=-1)
        first = (ctx.offsets or {}).get(vocab, 0) == 0  # the first block adds lse
        loss = jnp.where(first, lse, 0.0) - pick
    else:
        residual = ctx.residual
        loss = _cross_entropy(lambda v: residual(op, v) if residual else v)(x, onehot)
    return _to_order(loss, order[:-1], op.out_letters).astype(ctx.out_dtype(op))


def _log_sum_exp(x: jax.Array) -> jax.Array:
    m = jnp.max(x, axis=-1)
    return jnp.log(jnp.sum(jnp.exp(x - m[..., None]), axis=-1)) + m


def _cross_entropy(name: Callable[[jax.Array], jax.Array]) -> Any:
    """``f(logits, onehot) -> loss`` with a gradient that reads the saved log-sum-exp
    (``name`` marks it saved, for the jit program's checkpoint policy)."""

    @jax.custom_vjp
    def f(x: jax.Array, onehot: jax.Array) -> jax.Array:
        return _log_sum_exp(x) - jnp.sum(jnp.where(onehot, x, 0.0), axis=-1)

    def fwd(x: jax.Array, onehot: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        lse = name(_log_sum_exp(x))
        return lse - jnp.sum(jnp.where(onehot, x, 0.0), axis=-1), (x, lse, onehot)

    def bwd(res: tuple[jax.Array, ...], g: jax.Array) -> tuple[jax.Array, None]:
        x, lse, onehot = res
        return (jnp.exp(x - lse[..., None]) - onehot.astype(x.dtype)) * g[..., None], None

    f.defvjp(fwd, bwd)
    return f


def _xent_grad(op: Op, values: Sequence[jax.Array], ctx: OpContext) -> jax.Array:
    """``d_logits = (softmax(logits) - onehot) · d_loss``; with the vocabulary split, the
    softmax's ``log Σ exp`` is the one the loss op kept (``ctx.stash``)."""
    logits, _loss, dz = values
    letters = op.out_letters
    vocab = next(c for c in letters if c not in op.inputs[1].letters)
    order = "".join(c for c in letters if c != vocab) + vocab
    x = _to_order(_align(logits, op.inputs[0].letters, letters), letters, order)
    x = x.astype(jnp.float32)
    g = _to_order(_align(dz, op.inputs[2].letters, letters), letters, order).astype(jnp.float32)
    onehot = _target(op, x, order, ctx)
    if _split(op, vocab, x.shape[-1], ctx):
        lse = (ctx.stash or {}).get(op.of)
        if lse is None:
            raise ValidationError(
                f"op {op.name!r}: the vocabulary is split and the loss op {op.of!r} kept no "
                "log-sum-exp for its gradient"
            )
        p = jnp.exp(x - lse[..., None])
    else:
        p = jax.nn.softmax(x, axis=-1)
    d = (p - onehot.astype(jnp.float32)) * g
    return _to_order(d, order, letters).astype(ctx.out_dtype(op))


def _split(op: Op, vocab: str, local: int, ctx: OpContext) -> bool:
    """Whether this block holds part of the vocabulary (then ``ctx.reduce`` must exist)."""
    if local == ctx.program.size(vocab):
        return False
    if ctx.reduce is None and op.kind is OpKind.LOSS:
        raise ValidationError(
            f"op {op.name!r}: the vocabulary {vocab!r} is split at the op "
            f"({local} of {ctx.program.size(vocab)}) and no reduction over its axes is given"
        )
    return True


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

    def residual(self, op: Op, value: jax.Array) -> jax.Array:
        """A value the op computes besides its result that its gradient reads (the loss's
        log-sum-exp): named as the op's saved result is."""
        return value


def forward_function(
    program: Program,
    *,
    dtype: str | None = None,
    pins: Pins | None = None,
    groups: Mapping[str, SlotGroups] | None = None,
    ops: Sequence[Op] | None = None,
    outputs: Sequence[str] | None = None,
) -> Callable[[Arrays, Arrays], Arrays]:
    """The program's forward ops as ``f(params, inputs) -> {output: array}``. Each op runs
    under ``jax.named_scope(op.name)``, so the compiled HLO's ``op_name`` metadata names it
    (in the backward pass too: ``transpose(jvp(...))/.../gate/...``). ``ops`` and
    ``outputs`` select a part of the forward pass (a model runs its embedding, its blocks
    and its head apart)."""
    if ops is None:
        ops = [op for op in program.ops if op.phase is Phase.FORWARD]
    if outputs is None:
        outputs = forward_outputs(program)
    hooks = pins or Pins()
    ctx = OpContext(program=program, dtype=dtype, groups=groups, residual=hooks.residual)

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
    program: Program,
    *,
    dtype: str | None = None,
    groups: Mapping[str, SlotGroups] | None = None,
) -> Callable[[Arrays, Arrays, Arrays], Arrays]:
    """The program unsharded: ``f(params, inputs, seeds) -> {tensor: array}`` (the forward
    outputs, and for a training program its gradients and updates by ``jax.vjp``). A
    mixture-of-experts dispatch groups its tokens as ``groups`` says (the plan's)."""
    forward = forward_function(program, dtype=dtype, groups=groups)
    if not program.has_backward:
        return lambda params, inputs, seeds: forward(params, inputs)
    return training_function(program, forward, policy=None)
