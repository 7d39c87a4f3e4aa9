"""Validate a decode step on simulated CPU devices: collectives and numerics.

For one layer of a serving plan's decode block (``program.serve_plan``) this module builds two
programs from the block's program itself, op by op, as the einsum validator does
(``xla.run``, ``xla.compare``):

``jit``
    What XLA does with the plan's layouts: every op's inputs are pinned
    (``with_sharding_constraint``) to the plan's layout at the op and its result to the
    plan's layout after it; the inputs (activations, the KV cache, weights) arrive in their
    stored layouts and the outputs leave in theirs. XLA's SPMD partitioner chooses every
    collective.

``shard_map``
    The plan itself: a per-device program that issues exactly the plan's steps for each op
    (``xla.run._apply_step``: its inputs' moves, the local op, its result's reduction and
    move) with ``jax.lax`` collectives.

The compiled HLO's collectives (``xla.hlo.read_collectives``, mapped to mesh axes by their
replica groups) are compared with the plan's as a multiset of (kind, axes, elements in and
out per device). The verdict is the validator's: ``match`` when XLA's own program issues the
plan's collectives; ``xla-differs`` when only the plan's ``shard_map`` program does (XLA
chose others: e.g. an all-gather and a slice where the plan moves an axis by all-to-all,
two all-reduces where the plan reduces over two axes at once, several all-reduces combined
into one); ``mismatch`` when even the plan's own program does not, or computes wrong numbers.
Executed on random data, both programs' results (the block's output, the new token's key
and value) are compared with a decode step written directly in numpy, independent of the
program.

Only what a dense decode block holds is interpreted: einsums, the norm's sum of squares
(``REDUCE``) and scale, the softmax over the cache, SiLU, products and residual adds. The
scores are not scaled by ``1/sqrt(H)`` (the programs leave that constant factor out), and
the reference does the same.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from sharding_roofline.errors import ValidationError
from sharding_roofline.program.evaluate import ProgramPlan
from sharding_roofline.program.graph import Op, OpKind, TensorKind
from sharding_roofline.program.serve_plan import ServePlan
from sharding_roofline.reshard import Dims
from sharding_roofline.sharding import ShardingSpec

from .compare import Verdict
from .devices import jax_mesh, named_sharding, partition_spec
from .hlo import groups_to_axes, read_collectives
from .run import _apply_step, capture_stderr

__all__ = [
    "DecodeValidation",
    "combined",
    "decode_function",
    "decode_shard_map",
    "numpy_decode_step",
    "observed",
    "predicted",
    "validate_decode",
]

_lax: Any = jax.lax
_ShapeDtypeStruct: Any = jax.ShapeDtypeStruct
EPS = 1e-6

#: (kind, axes, elements in per device, elements out per device)
Record = tuple[str, tuple[str, ...] | None, int, int]


def _sharding(mesh: Mesh, dims: Dims) -> NamedSharding:
    return named_sharding(mesh, ShardingSpec(dims))


def _block(plan: ServePlan) -> ProgramPlan:
    if not plan.serving.is_decode:
        raise ValidationError(
            f"serving plan {plan.name}: validate_decode checks decode steps; plan one without "
            "--prefill"
        )
    names = [name for name, _ in plan.parts]
    if "block" not in names:
        raise ValidationError(
            f"serving plan {plan.name} has no dense decode block (parts: {', '.join(names)}); "
            "validate a dense model (mixture-of-experts blocks are not interpreted)"
        )
    return plan.part("block")


def _inputs(part: ProgramPlan) -> list[str]:
    """The block's inputs and weights, in program order (the jitted function's arguments)."""
    kinds = (TensorKind.INPUT, TensorKind.PARAM)
    return [t.name for t in part.program.tensors if t.kind in kinds]


def _apply(op: Op, args: Sequence[Any], xp: Any, sizes: dict[str, int]) -> Any:
    """One op of the decode block, on jax.numpy or numpy arrays (``xp``), whole or on one
    device's blocks (``sizes``: the global sizes, for the norm's mean over ``d``)."""
    if op.kind is OpKind.EINSUM:
        return xp.einsum(op.equation, *args)
    if op.kind is OpKind.REDUCE:  # the norm's sum of squares over the reduced letters
        (x,) = args
        return xp.einsum(f"{op.inputs[0].letters}->{op.out_letters}", x * x)
    if op.kind is OpKind.SOFTMAX:
        (scores,) = args
        axis = op.out_letters.index(op.reduce_letters)
        shifted = scores - xp.max(scores, axis=axis, keepdims=True)
        e = xp.exp(shifted)
        return e / xp.sum(e, axis=axis, keepdims=True)
    if op.kind is OpKind.POINTWISE:
        if op.fn == "add":
            return args[0] + args[1]
        if op.fn == "mul":
            return args[0] * args[1]
        if op.fn == "silu":
            (x,) = args
            return x / (1 + xp.exp(-x))
        if op.fn == "rmsnorm_apply":
            x, ss, scale = args
            return x / xp.sqrt(ss[..., None] / sizes[op.reduce_letters or "d"] + EPS) * scale
    raise ValidationError(
        f"op {op.name} ({op.kind.value} {op.fn}) is not part of a dense decode block; the decode "
        "validator interprets einsums, norms, softmax, SiLU, products and adds"
    )


def decode_function(plan: ServePlan, mesh: Mesh | None = None) -> tuple[Any, list[Any]]:
    """The plan's decode block (one layer) as a jitted function pinned to the plan's
    layouts, and its inputs as ``ShapeDtypeStruct``s in their stored layouts (float32)."""
    part = _block(plan)
    mesh = mesh if mesh is not None else jax_mesh(plan.mesh)
    program = part.program
    names = _inputs(part)
    homes = {name: part.home(name) for name in names}
    outputs = program.outputs
    sizes = program.sizes

    def body(*arrays: Any) -> tuple[Any, ...]:
        env = dict(zip(names, arrays, strict=True))
        for op_plan in part.ops:
            args = [
                _lax.with_sharding_constraint(env[tensor], _sharding(mesh, dims))
                for tensor, dims in op_plan.at_op
            ]
            out = _apply(op_plan.op, args, jnp, sizes)
            env[op_plan.op.output] = _lax.with_sharding_constraint(
                out, _sharding(mesh, op_plan.out_home)
            )
        return tuple(env[name] for name in outputs)

    out_shardings = tuple(_sharding(mesh, part.home(name)) for name in outputs)
    fn = jax.jit(body, out_shardings=out_shardings)
    inputs = [
        _ShapeDtypeStruct(program.shape(name), jnp.float32, sharding=_sharding(mesh, homes[name]))
        for name in names
    ]
    return fn, inputs


def decode_shard_map(plan: ServePlan, mesh: Mesh | None = None) -> tuple[Any, list[Any]]:
    """The plan's decode block (one layer) as a per-device program issuing exactly the
    plan's steps: each input moved from where it lives to its layout at the op (a copy the
    plan reuses is reused), the op on this device's blocks, its result reduced and moved to
    its home; and the inputs as for ``decode_function``."""
    part = _block(plan)
    mesh = mesh if mesh is not None else jax_mesh(plan.mesh)
    program = part.program
    names = _inputs(part)
    homes = {name: part.home(name) for name in names}
    outputs = program.outputs
    sizes = program.sizes
    axis_size = dict(zip(plan.mesh.axis_names, plan.mesh.shape, strict=True))

    def body(*arrays: Any) -> tuple[Any, ...]:
        blocks: dict[tuple[str, Dims], Any] = {
            (name, homes[name]): array for name, array in zip(names, arrays, strict=True)
        }
        where: dict[str, Dims] = dict(homes)
        for op_plan in part.ops:
            args = []
            for tensor, dims in op_plan.at_op:
                block = blocks.get((tensor, dims))
                if block is None:
                    block = blocks[(tensor, where[tensor])]
                    for step in op_plan.steps_in:
                        if step.operand == tensor:
                            block = _apply_step(block, step, axis_size)
                    blocks[(tensor, dims)] = block
                args.append(block)
            out = _apply(op_plan.op, args, jnp, sizes)
            for step in op_plan.steps_out:
                out = _apply_step(out, step, axis_size)
            blocks[(op_plan.op.output, op_plan.out_home)] = out
            where[op_plan.op.output] = op_plan.out_home
        return tuple(blocks[(name, where[name])] for name in outputs)

    mapped = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=tuple(partition_spec(ShardingSpec(homes[name])) for name in names),
        out_specs=tuple(partition_spec(ShardingSpec(part.home(name))) for name in outputs),
        check_vma=False,  # gathered blocks are "varying" to the checker; the layouts are exact
    )
    _, inputs = decode_function(plan, mesh)
    return jax.jit(mapped), inputs


def predicted(plan: ServePlan) -> list[Record]:
    """The plan's collectives in one layer of its decode block."""
    records: list[Record] = []
    for op_plan in _block(plan).ops:
        for step in op_plan.collectives:
            cost = step.cost
            if cost is not None and cost.group_size > 1:
                records.append(
                    (cost.kind.value, cost.axes, cost.elements_in_per_chip,
                     cost.elements_out_per_chip)
                )  # fmt: skip
    return records


def observed(plan: ServePlan, text: str) -> list[Record]:
    """The collectives of the compiled block (``compiled.as_text()``), on mesh axes."""
    mesh = plan.mesh
    records: list[Record] = []
    for coll in read_collectives(text):
        if coll.groups is None:
            axes = None
        else:
            axes = groups_to_axes(coll.groups, mesh.shape, mesh.axis_names)
        group = coll.group_size
        if axes == () or group <= 1:
            continue
        out = coll.elements_out_per_device
        if coll.kind == "all-gather":
            into = out // group
        elif coll.kind == "reduce-scatter":
            into = out * group
        else:
            into = out
        records.extend([(coll.kind, axes, into, out)] * coll.count)
    return records


def numpy_decode_step(values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One decode step of a GQA block written directly in numpy (not from the program):
    RMSNorm, Q/K/V projections, attention of each query group over its KV head's cache,
    O projection, residual, RMSNorm, SwiGLU MLP, residual."""
    v = values

    def norm(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
        out: np.ndarray = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS) * scale
        return out

    def silu(x: np.ndarray) -> np.ndarray:
        out: np.ndarray = x / (1 + np.exp(-x))
        return out

    x = v["x"]
    xn = norm(x, v["norm1_scale"])
    q = np.einsum("bd,dkgh->bkgh", xn, v["w_q"])
    k_new = np.einsum("bd,dkh->bkh", xn, v["w_k"])
    v_new = np.einsum("bd,dkh->bkh", xn, v["w_v"])
    scores = np.einsum("bkgh,bskh->bkgs", q, v["k_cache"])
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs = scores / scores.sum(axis=-1, keepdims=True)
    ctx = np.einsum("bkgs,bskh->bkgh", probs, v["v_cache"])
    h = x + np.einsum("bkgh,kghd->bd", ctx, v["w_o"])
    hn = norm(h, v["norm2_scale"])
    mlp = np.einsum(
        "bf,fd->bd",
        silu(np.einsum("bd,df->bf", hn, v["w_gate"])) * np.einsum("bd,df->bf", hn, v["w_up"]),
        v["w_down"],
    )
    return {"block_out": h + mlp, "k_new": k_new, "v_new": v_new}


@dataclass(frozen=True, slots=True, kw_only=True)
class DecodeValidation:
    """One decode layer's collectives: the plan's, XLA's (``observed``, from the ``jit``
    program) and those of the plan's own ``shard_map`` program (``proof``); and, executed,
    each program's largest error against the numpy decode step."""

    strategy: str
    predicted: tuple[Record, ...]
    observed: tuple[Record, ...]
    proof: tuple[Record, ...]
    warnings: tuple[str, ...] = ()
    #: max |result - numpy| of the jit and shard_map programs, and max |numpy| (the scale)
    jit_error: float | None = None
    shard_map_error: float | None = None
    scale: float | None = None

    @property
    def jit_agrees(self) -> bool:
        return _agree(self.predicted, self.observed)

    @property
    def proof_agrees(self) -> bool:
        return _agree(self.predicted, self.proof)

    def _close(self, error: float | None) -> bool | None:
        if error is None or self.scale is None:
            return None
        return error <= 1e-4 * max(self.scale, 1.0)

    @property
    def numerics_ok(self) -> bool | None:
        """Both programs within float32 rounding of numpy (None: not executed)."""
        jit, proof = self._close(self.jit_error), self._close(self.shard_map_error)
        if jit is None or proof is None:
            return None
        return jit and proof

    @property
    def verdict(self) -> Verdict:
        if not self.proof_agrees or self._close(self.shard_map_error) is False:
            return Verdict.MISMATCH
        return Verdict.MATCH if self.jit_agrees else Verdict.XLA_DIFFERS

    def difference(self, against: str = "observed") -> str:
        """What the plan has that the chosen program (``observed``: XLA's; ``proof``: the
        plan's own) does not, and the other way round."""
        want, got = Counter(self.predicted), Counter(getattr(self, against))

        def text(counter: Counter[Record]) -> str:
            return ", ".join(
                f"{kind} over {'+'.join(axes) if axes else '?'} ({into}->{out})"
                + (f" x{n}" if n > 1 else "")
                for (kind, axes, into, out), n in sorted(counter.items(), key=str)
            )

        missing, extra = want - got, got - want
        parts = []
        if missing:
            parts.append("the plan has, the program does not: " + text(missing))
        if extra:
            parts.append("the program has, the plan does not: " + text(extra))
        return "; ".join(parts) or "the same collectives"


def combined(records: Sequence[Record]) -> Counter[Record]:
    """``records`` with the all-reduces over each axis group merged into one: XLA's
    all-reduce combiner fuses independent all-reduces over the same devices into one of
    their summed size (the 2D layout's Q, K and V partial sums), the same bytes in fewer
    launches."""
    out: Counter[Record] = Counter()
    sums: dict[tuple[str, ...] | None, int] = {}
    for kind, axes, into, outs in records:
        if kind == "all-reduce":
            sums[axes] = sums.get(axes, 0) + into
        else:
            out[(kind, axes, into, outs)] += 1
    for axes, total in sums.items():
        out[("all-reduce", axes, total, total)] += 1
    return out


def _agree(want: Sequence[Record], got: Sequence[Record]) -> bool:
    """The same collectives, or the same once XLA's combined all-reduces are merged."""
    return Counter(want) == Counter(got) or combined(want) == combined(got)


def _random_values(plan: ServePlan, seed: int) -> dict[str, np.ndarray]:
    part = _block(plan)
    rng = np.random.default_rng(seed)
    values = {}
    for name in _inputs(part):
        shape = part.program.shape(name)
        if part.program.tensor(name).kind is TensorKind.PARAM and len(shape) > 1:
            fan_in = math.prod(shape[:-1])
            values[name] = rng.standard_normal(shape).astype(np.float32) / math.sqrt(fan_in)
        elif name.endswith("_scale"):
            values[name] = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            values[name] = rng.standard_normal(shape).astype(np.float32)
    return values


def _compile(fn: Any, inputs: list[Any]) -> tuple[Any, list[str]]:
    with capture_stderr() as lines:
        compiled = fn.lower(*inputs).compile()
    return compiled, lines


def _error(outputs: Sequence[Any], reference: dict[str, np.ndarray], names: Sequence[str]) -> float:
    return max(
        float(np.max(np.abs(np.asarray(got) - reference[name])))
        for name, got in zip(names, outputs, strict=True)
    )


def validate_decode(plan: ServePlan, *, execute: bool = True, seed: int = 0) -> DecodeValidation:
    """Compile one layer of ``plan``'s decode block both ways on simulated CPU devices,
    compare their collectives with the plan's, and (``execute``) run both against
    ``numpy_decode_step`` on random data."""
    part = _block(plan)
    mesh = jax_mesh(plan.mesh)
    fn, inputs = decode_function(plan, mesh)
    proof_fn, _ = decode_shard_map(plan, mesh)
    jit, lines = _compile(fn, inputs)
    proof, proof_lines = _compile(proof_fn, inputs)
    warnings = tuple(
        line for line in lines + proof_lines if "rematerializ" in line or line.startswith("W")
    )
    result = DecodeValidation(
        strategy=plan.name,
        predicted=tuple(predicted(plan)),
        observed=tuple(observed(plan, jit.as_text())),
        proof=tuple(observed(plan, proof.as_text())),
        warnings=warnings,
    )
    if not execute:
        return result
    values = _random_values(plan, seed)
    names = _inputs(part)
    arrays = [jax.device_put(values[name], inputs[i].sharding) for i, name in enumerate(names)]
    reference = numpy_decode_step(values)
    outputs = part.program.outputs
    return dataclasses.replace(
        result,
        jit_error=_error(jit(*arrays), reference, outputs),
        shard_map_error=_error(proof(*arrays), reference, outputs),
        scale=max(float(np.max(np.abs(reference[name]))) for name in outputs),
    )
