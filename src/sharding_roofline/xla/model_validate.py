"""Whole models checked against XLA: a model plan's training step on simulated devices.

:func:`validate_model` takes a :class:`~sharding_roofline.program.model.ModelPlan` (a small
config: a few layers, tiny dimensions) and builds its whole training step (the embedding,
every block, the head and the loss, the backward pass, AdamW) three ways, each either
*unrolled* (one copy of the block per layer) or as a ``lax.scan`` over the layers' stacked
parameters:

``reference``
    The step in plain JAX, unsharded: the programs' ops (``program_jax.apply_op``) chained
    from the token ids to the loss, ``jax.vjp`` for the gradients, then AdamW.
``jit``
    The same step under ``jit`` with the strategy's shardings: parameters at their storage
    layouts, the ids and the incoming gradient at their homes, every op's inputs and result
    pinned where the plan puts them (``programs.PlanPins``), each block and each end under
    ``jax.checkpoint`` with the policy that saves what the plan saves. XLA's SPMD
    partitioner chooses every collective.
``shard_map``
    The plan itself: each part's ops replayed on local blocks with the plan's collectives
    (``programs.Replay``), composed into the step: the embedding, the blocks' forward passes
    (each layer's saved activations kept, as scan outputs under ``scan``), the head and the
    loss's gradient, the blocks' backward passes in reverse, the embedding's gradient, the
    optimizer. Its compiled HLO must hold exactly the model plan's collectives: each block's
    times its number of layers (a scan's trip count counted), plus the ends'.

The verdict is :func:`program_compare.validate_program`'s, for the whole step: ``match``
when XLA's jit step runs the plan's multiset of collectives; ``xla-differs`` when it runs
others and the plan's own step holds exactly the predicted ones (and computes the
reference's numbers, when executed); ``mismatch`` otherwise (a planner bug: a composition the
plan does not count, a layout two parts disagree on, wrong numbers). Each XLA collective is
attributed to its part and op (``layer3/q_proj``, ``stack0/.../q_proj``, ``ends/loss``),
and :attr:`ModelValidation.composes` says whether XLA's step is its layers' programs
composed: XLA's collectives equal each part's own jit program's (``validate_program``) times
its layers, so every difference is one the layer validation already explains.

Pipeline parallelism is :func:`validate_pipeline` (``xla/model_pipeline.py``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from sharding_roofline.errors import ValidationError
from sharding_roofline.program.evaluate import OpPlan, ProgramPlan
from sharding_roofline.program.graph import Phase, Program
from sharding_roofline.program.model import ModelPlan
from sharding_roofline.reshard import Dims
from sharding_roofline.sharding import ShardingSpec

from .compare import (
    CollectiveRecord,
    FlopsCheck,
    Verdict,
    difference_lines,
    hlo_records,
    judge,
    multiset,
    total_time_s,
)
from .devices import jax_mesh, named_sharding, partition_spec
from .hlo import dot_flops, op_name, read_collectives, split_combined
from .program_compare import (
    OpAgreement,
    ProgramValidation,
    _members,
    _origin_of_path,
    _segments_with_offsets,
    predicted_program_collectives,
    validate_program,
)
from .program_jax import Arrays, adamw, forward_function
from .programs import (
    _RTOL,
    FAST_COMPILE_OPTIONS,
    PlanPins,
    Replay,
    _random_args,
    checkpoint_policy,
    slot_groups,
    value_dtype,
)
from .run import capture_stderr, interesting_lines

__all__ = [
    "MAX_MODEL_ELEMENTS",
    "ModelExecution",
    "ModelOpAgreement",
    "ModelValidation",
    "check_model_size",
    "validate_model",
]

_lax: Any = jax.lax
_ShapeDtypeStruct: Any = jax.ShapeDtypeStruct

#: The largest model the validator builds: parameters plus one step's activations, in
#: elements (about 64 MiB of float32 on the host per copy, each simulated device holding
#: its shards: small configs only, 2 to 4 layers of tiny dimensions).
MAX_MODEL_ELEMENTS = 1 << 24

_SHARD_MAP_OPTIONS: dict[str, Any] = {
    **FAST_COMPILE_OPTIONS,
    "xla_disable_hlo_passes": "cse,while-loop-all-reduce-code-motion",
}
ENDS = "ends"


# -- the model's parts ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Segment:
    """Consecutive layers of one block part (a scan runs each segment)."""

    part: str
    start: int
    layers: int

    @property
    def scope(self) -> str:
        return f"stack{self.start}"


def _gradient(program: Program, tensor: str) -> str:
    for fwd, grad in program.gradients:
        if fwd == tensor:
            return grad
    raise ValidationError(f"program {program.name!r} has no gradient of {tensor!r}")


def _first_input(program: Program) -> str:
    seeds = {g for _, g in program.gradients}
    (name,) = [t.name for t in program.inputs if t.name not in seeds]
    return name


class _Parts:
    """A model plan as the validator runs it: its block parts in layer order, the ends'
    ops by when they run, and the tensor each part hands the next."""

    def __init__(self, plan: ModelPlan) -> None:
        if plan.pipeline is not None:
            raise ValidationError(
                f"{plan.name}: a pipelined plan is validated by validate_pipeline "
                "(a shard_map over the pipeline axes)"
            )
        if plan.training.microbatches != 1:
            raise ValidationError(
                f"{plan.name}: {plan.training.microbatches} microbatches; the validator runs "
                "one microbatch per step: drop mb= and --microbatches (Training(microbatches="
                "1) in Python) to validate it (gradient accumulation only moves the "
                "data-parallel reductions to the last microbatch)"
            )
        self.plan = plan
        config = plan.config
        self.parts: dict[str, ProgramPlan] = dict(plan.parts)
        if ENDS not in self.parts:
            raise ValidationError(f"{plan.name}: the model plan has no ends part")
        self.ends = self.parts[ENDS]
        dense = config.layers - config.moe_layers
        order = ["block"] * dense + ["moe block"] * config.moe_layers
        missing = sorted({p for p in order if p not in self.parts})
        if missing:
            raise ValidationError(f"{plan.name}: the model plan has no part {missing[0]!r}")
        self.layer_parts = tuple(order)
        segments: list[_Segment] = []
        for i, part in enumerate(order):
            if segments and segments[-1].part == part:
                last = segments[-1]
                segments[-1] = _Segment(part, last.start, last.layers + 1)
            else:
                segments.append(_Segment(part, i, 1))
        self.segments = tuple(segments)
        self.layers = Counter(order)
        for part, count in self.layers.items():
            if self.parts[part].layers != count:
                raise ValidationError(
                    f"{plan.name}: part {part!r} is repeated {self.parts[part].layers} times "
                    f"for {count} layers"
                )
        self._check_homes()
        self._schedule_ends()

    # the tensors parts hand each other must live in the same layout in both
    def _check_homes(self) -> None:
        ends = self.ends
        prog = ends.program
        handoffs: list[tuple[str, Dims, str, Dims]] = []
        previous = ("ends x0", ends.home("x0"))
        grad_prev = ("ends d_x0", ends.home(_gradient(prog, "x0")))
        for part in dict.fromkeys(self.layer_parts):
            block = self.parts[part]
            x = _first_input(block.program)
            (out,) = _forward_outputs(block.program)
            handoffs.append((previous[0], previous[1], f"{part} {x}", block.home(x)))
            handoffs.append(
                (
                    grad_prev[0],
                    grad_prev[1],
                    f"{part} {_gradient(block.program, x)}",
                    block.home(_gradient(block.program, x)),
                )
            )
            previous = (f"{part} {out}", block.home(out))
            grad_prev = (
                f"{part} {_gradient(block.program, out)}",
                block.home(_gradient(block.program, out)),
            )
        handoffs.append((previous[0], previous[1], "ends x_last", ends.home("x_last")))
        handoffs.append(
            (
                grad_prev[0],
                grad_prev[1],
                "ends d_x_last",
                ends.home(_gradient(prog, "x_last")),
            )
        )
        for a, da, b, db in handoffs:
            if da != db:
                raise ValidationError(
                    f"{self.plan.name}: {a} lives at {ShardingSpec(da).text()} but {b} at "
                    f"{ShardingSpec(db).text()}: a reshard between the parts the model plan "
                    "does not count (a planner bug)"
                )

    def _schedule_ends(self) -> None:
        """The ends' ops by when they run in the step: ``early`` (the embedding), ``middle``
        (the head, the loss and their gradients, down to the last block's incoming
        gradient), ``late`` (the embedding's gradient, after the blocks' backward passes),
        ``optimizer``."""
        program = self.ends.program
        d_x0 = _gradient(program, "x0")
        roots = {"x_last", d_x0}
        depends: dict[str, frozenset[str]] = {r: frozenset({r}) for r in roots}
        early: list[OpPlan] = []
        middle: list[OpPlan] = []
        late: list[OpPlan] = []
        optimizer: list[OpPlan] = []
        for op_plan in self.ends.ops:
            op = op_plan.op
            deps = frozenset().union(*(depends.get(i.tensor, frozenset()) for i in op.inputs))
            depends[op.output] = deps
            if op.phase is Phase.OPTIMIZER:
                optimizer.append(op_plan)
            elif d_x0 in deps:
                late.append(op_plan)
            elif "x_last" in deps or op.phase is not Phase.FORWARD:
                middle.append(op_plan)
            else:
                early.append(op_plan)
        if any(p.op.phase is Phase.FORWARD for p in late):
            raise ValidationError("the ends' forward pass reads the embedding's gradient")
        self.early, self.middle, self.late, self.optimizer = early, middle, late, optimizer

    # -- names -------------------------------------------------------------------------------

    def param_names(self, part: str) -> list[str]:
        return [t.name for t in self.parts[part].program.params]

    def updated(self, part: str) -> list[tuple[str, str, str]]:
        """``(param, its gradient, its update)`` for every parameter with a gradient."""
        program = self.parts[part].program
        out = []
        for op in program.ops:
            if op.phase is Phase.OPTIMIZER:
                param, grad = (item.tensor for item in op.inputs)
                out.append((param, grad, op.output))
        return out

    def scope(self, layer: int) -> str:
        return f"layer{layer}"

    def part_of_scope(self, name: str) -> str | None:
        if name == ENDS:
            return ENDS
        if name.startswith("layer") and name[5:].isdigit():
            index = int(name[5:])
            return self.layer_parts[index] if index < len(self.layer_parts) else None
        for segment in self.segments:
            if name == segment.scope:
                return segment.part
        return None


def _forward_outputs(program: Program) -> tuple[str, ...]:
    from .program_jax import forward_outputs  # noqa: PLC0415

    return forward_outputs(program)


# -- the arguments ---------------------------------------------------------------------------

#: the step's arguments: params ("ends" -> {name: array}; per segment: stacked arrays under
#: scan, else one dict per layer), inputs (the ids), seeds (the loss's incoming gradient)
Params = dict[str, Any]


def _stacked(dims: Dims) -> Dims:
    return ((), *dims)


def _param_layout(parts: _Parts, mesh: Mesh, dtype: str | None, scan: bool) -> Params:
    """``ShapeDtypeStruct``s of every parameter at its storage layout."""

    def one(plan: ProgramPlan, name: str, layers: int | None) -> Any:
        program = plan.program
        shape = program.shape(name)
        dims = plan.home(name)
        if layers is not None:
            shape, dims = (layers, *shape), _stacked(dims)
        return _ShapeDtypeStruct(
            shape,
            value_dtype(program, name, dtype),
            sharding=named_sharding(mesh, ShardingSpec(dims)),
        )

    ends = parts.ends
    out: Params = {ENDS: {n: one(ends, n, None) for n in parts.param_names(ENDS)}}
    for segment in parts.segments:
        plan = parts.parts[segment.part]
        names = parts.param_names(segment.part)
        if scan:
            out[segment.scope] = {n: one(plan, n, segment.layers) for n in names}
        else:
            out[segment.scope] = [{n: one(plan, n, None) for n in names}] * segment.layers
    return out


def _ends_args(parts: _Parts, mesh: Mesh, dtype: str | None) -> tuple[Arrays, Arrays]:
    ends = parts.ends
    program = ends.program

    def one(name: str) -> Any:
        return _ShapeDtypeStruct(
            program.shape(name),
            value_dtype(program, name, dtype),
            sharding=named_sharding(mesh, ShardingSpec(ends.home(name))),
        )

    d_loss = _gradient(program, "loss")
    return {"ids": one("ids")}, {d_loss: one(d_loss)}


def _result_layouts(parts: _Parts, scan: bool) -> dict[str, Dims]:
    """Every result of the step (the loss, each gradient and update) and its layout, keyed
    ``ends/<tensor>`` and ``layer<i>/<tensor>`` (``stack<i>/<tensor>`` stacked, under scan)."""
    ends = parts.ends
    out: dict[str, Dims] = {f"{ENDS}/loss": ends.home("loss")}
    for _, grad, new in parts.updated(ENDS):
        out[f"{ENDS}/{grad}"] = ends.home(grad)
        out[f"{ENDS}/{new}"] = ends.home(new)
    for segment in parts.segments:
        plan = parts.parts[segment.part]
        for _, grad, new in parts.updated(segment.part):
            for name in (grad, new):
                if scan:
                    out[f"{segment.scope}/{name}"] = _stacked(plan.home(name))
                else:
                    for i in range(segment.layers):
                        out[f"layer{segment.start + i}/{name}"] = plan.home(name)
    return out


# -- the jit step (XLA chooses) -----------------------------------------------------------------


def _sharding(mesh: Mesh, dims: Dims) -> NamedSharding:
    return named_sharding(mesh, ShardingSpec(dims))


def _step_function(
    parts: _Parts, mesh: Mesh | None, dtype: str | None, scan: bool
) -> Callable[[Params, Arrays, Arrays], dict[str, jax.Array]]:
    """The training step in plain JAX (the plan's layouts pinned when ``mesh`` is given)."""
    ends = parts.ends
    e_program = ends.program
    e_pins = PlanPins(ends, mesh) if mesh is not None else None
    e_groups = slot_groups(ends)
    embed = forward_function(
        e_program,
        dtype=dtype,
        pins=e_pins,
        groups=e_groups,
        ops=[p.op for p in parts.early],
        outputs=("x0",),
    )
    head = forward_function(
        e_program,
        dtype=dtype,
        pins=e_pins,
        groups=e_groups,
        ops=[p.op for p in parts.middle if p.op.phase is Phase.FORWARD],
        outputs=("loss",),
    )
    policy = checkpoint_policy(e_program)
    embed_c = jax.checkpoint(lambda p, i: embed(p, i)["x0"], policy=policy)
    head_c = jax.checkpoint(lambda p, x: head(p, {"x_last": x})["loss"], policy=policy)
    layers: dict[str, Callable[[Arrays, jax.Array], jax.Array]] = {}
    for part in dict.fromkeys(parts.layer_parts):
        plan = parts.parts[part]
        program = plan.program
        block = forward_function(
            program,
            dtype=dtype,
            pins=PlanPins(plan, mesh) if mesh is not None else None,
            groups=slot_groups(plan),
        )
        x_name = _first_input(program)
        (out_name,) = _forward_outputs(program)

        def layer(
            p: Arrays,
            x: jax.Array,
            block: Callable[[Arrays, Arrays], Arrays] = block,
            x_name: str = x_name,
            out_name: str = out_name,
        ) -> jax.Array:
            return block(p, {x_name: x})[out_name]

        layers[part] = jax.checkpoint(layer, policy=checkpoint_policy(program))

    def forward(params: Params, inputs: Arrays) -> Any:
        with jax.named_scope(ENDS):
            x = embed_c(params[ENDS], inputs)
        for segment in parts.segments:
            layer = layers[segment.part]
            if scan:
                with jax.named_scope(segment.scope):
                    x, _ = _lax.scan(
                        lambda x, p, f=layer: (f(p, x), None), x, params[segment.scope]
                    )
            else:
                for i in range(segment.layers):
                    with jax.named_scope(parts.scope(segment.start + i)):
                        x = layer(params[segment.scope][i], x)
        with jax.named_scope(ENDS):
            return head_c(params[ENDS], x)

    def update(plan: ProgramPlan, new: str, p: jax.Array, g: jax.Array, stack: bool) -> Any:
        op_plan = plan.op(next(o.name for o in plan.program.ops if o.output == new))
        if mesh is not None:
            (_, at_p), (_, at_g) = op_plan.at_op
            if stack:
                at_p, at_g = _stacked(at_p), _stacked(at_g)
            p = _lax.with_sharding_constraint(p, _sharding(mesh, at_p))
            g = _lax.with_sharding_constraint(g, _sharding(mesh, at_g))
        with jax.named_scope(op_plan.op.name):
            return adamw(p, g)

    def step(params: Params, inputs: Arrays, seeds: Arrays) -> dict[str, jax.Array]:
        loss, vjp = jax.vjp(lambda p: forward(p, inputs), params)
        (grads,) = vjp(next(iter(seeds.values())))
        out = {f"{ENDS}/loss": loss}
        with jax.named_scope(ENDS):
            for name, grad, new in parts.updated(ENDS):
                g = grads[ENDS][name]
                out[f"{ENDS}/{grad}"] = g
                out[f"{ENDS}/{new}"] = update(ends, new, params[ENDS][name], g, False)
        for segment in parts.segments:
            plan = parts.parts[segment.part]
            for name, grad, new in parts.updated(segment.part):
                if scan:
                    g = grads[segment.scope][name]
                    with jax.named_scope(segment.scope):
                        value = update(plan, new, params[segment.scope][name], g, True)
                    out[f"{segment.scope}/{grad}"] = g
                    out[f"{segment.scope}/{new}"] = value
                    continue
                for i in range(segment.layers):
                    g = grads[segment.scope][i][name]
                    with jax.named_scope(parts.scope(segment.start + i)):
                        value = update(plan, new, params[segment.scope][i][name], g, False)
                    out[f"layer{segment.start + i}/{grad}"] = g
                    out[f"layer{segment.start + i}/{new}"] = value
        return out

    return step


def jit_model(
    parts: _Parts, *, scan: bool, dtype: str | None = None
) -> tuple[Any, tuple[Params, Arrays, Arrays]]:
    mesh = jax_mesh(parts.plan.mesh)
    step = _step_function(parts, mesh, dtype, scan)
    out = {k: _sharding(mesh, d) for k, d in _result_layouts(parts, scan).items()}
    inputs, seeds = _ends_args(parts, mesh, dtype)
    return jax.jit(step, out_shardings=out), (
        _param_layout(parts, mesh, dtype, scan),
        inputs,
        seeds,
    )


# -- the plan's own step (shard_map) --------------------------------------------------------------


def shard_map_model(
    parts: _Parts, *, scan: bool, dtype: str | None = None
) -> tuple[Any, tuple[Params, Arrays, Arrays]]:
    """The model plan as a per-device program: every part's ops replayed with the plan's
    collectives, composed as the module docstring says."""
    mesh = jax_mesh(parts.plan.mesh)
    ends = parts.ends
    e_program = ends.program
    replays = {part: Replay(parts.parts[part], dtype) for part in parts.parts}
    d_x0 = _gradient(e_program, "x0")
    d_x_last = _gradient(e_program, "x_last")

    def home_copies(plan: ProgramPlan, values: Arrays) -> dict[tuple[str, Dims], jax.Array]:
        return {(name, plan.home(name)): value for name, value in values.items()}

    def block_forward(part: str, p: Arrays, x: jax.Array) -> tuple[jax.Array, dict[Any, Any]]:
        plan = parts.parts[part]
        program = plan.program
        x_name = _first_input(program)
        (out_name,) = _forward_outputs(program)
        copies = home_copies(plan, p)
        copies[(x_name, plan.home(x_name))] = x
        for op_plan in plan.ops:
            if op_plan.op.phase is Phase.FORWARD:
                replays[part].run_op(op_plan, copies)
        params = set(p)
        keep = {key: v for key, v in copies.items() if key[0] not in params}
        return copies[(out_name, plan.home(out_name))], keep

    def block_backward(
        part: str, p: Arrays, keep: dict[Any, Any], g: jax.Array
    ) -> tuple[jax.Array, Arrays]:
        plan = parts.parts[part]
        program = plan.program
        x_name = _first_input(program)
        (out_name,) = _forward_outputs(program)
        seed = _gradient(program, out_name)
        copies = {**home_copies(plan, p), **keep}
        copies[(seed, plan.home(seed))] = g
        for op_plan in plan.ops:
            if op_plan.op.phase in (Phase.RECOMPUTE, Phase.BACKWARD):
                replays[part].run_op(op_plan, copies)
        d_x = _gradient(program, x_name)
        grads = {grad: copies[(grad, plan.home(grad))] for _, grad, _ in parts.updated(part)}
        return copies[(d_x, plan.home(d_x))], grads

    def block_update(part: str, p: Arrays, grads: Arrays) -> Arrays:
        plan = parts.parts[part]
        copies = {**home_copies(plan, p), **home_copies(plan, grads)}
        for op_plan in plan.ops:
            if op_plan.op.phase is Phase.OPTIMIZER:
                replays[part].run_op(op_plan, copies)
        return {new: copies[(new, plan.home(new))] for _, _, new in parts.updated(part)}

    def body(params: Params, inputs: Arrays, seeds: Arrays) -> dict[str, jax.Array]:
        for replay in replays.values():
            replay.start()
        out: dict[str, jax.Array] = {}
        e_replay = replays[ENDS]
        e_copies = home_copies(ends, {**params[ENDS], **inputs, **seeds})
        with jax.named_scope(ENDS):
            for op_plan in parts.early:
                e_replay.run_op(op_plan, e_copies)
        x = e_copies[("x0", ends.home("x0"))]
        saved: list[Any] = []
        for segment in parts.segments:
            part = segment.part
            if scan:
                keys: list[Any] = []

                def fwd(x: jax.Array, p: Arrays, part: str = part, keys: list[Any] = keys) -> Any:
                    y, keep = block_forward(part, p, x)
                    keys[:] = list(keep)
                    return y, tuple(keep[k] for k in keys)

                with jax.named_scope(segment.scope):
                    x, ys = _lax.scan(fwd, x, params[segment.scope])
                saved.append((keys, ys))
            else:
                per_layer = []
                for i in range(segment.layers):
                    with jax.named_scope(parts.scope(segment.start + i)):
                        x, keep = block_forward(part, params[segment.scope][i], x)
                    per_layer.append(keep)
                saved.append(per_layer)
        e_copies[("x_last", ends.home("x_last"))] = x
        with jax.named_scope(ENDS):
            for op_plan in parts.middle:
                e_replay.run_op(op_plan, e_copies)
        g = e_copies[(d_x_last, ends.home(d_x_last))]
        grads: dict[str, Any] = {}
        for index in reversed(range(len(parts.segments))):
            segment = parts.segments[index]
            part = segment.part
            if scan:
                keys, ys = saved[index]

                def bwd(g: jax.Array, xs: Any, part: str = part, keys: list[Any] = keys) -> Any:
                    p, values = xs
                    return block_backward(part, p, dict(zip(keys, values, strict=True)), g)

                with jax.named_scope(segment.scope):
                    g, stacked = _lax.scan(bwd, g, (params[segment.scope], ys), reverse=True)
                grads[segment.scope] = stacked
            else:
                per_layer_grads: list[Arrays] = [{}] * segment.layers
                for i in reversed(range(segment.layers)):
                    with jax.named_scope(parts.scope(segment.start + i)):
                        g, per_layer_grads[i] = block_backward(
                            part, params[segment.scope][i], saved[index][i], g
                        )
                grads[segment.scope] = per_layer_grads
        e_copies[(d_x0, ends.home(d_x0))] = g
        with jax.named_scope(ENDS):
            for op_plan in (*parts.late, *parts.optimizer):
                e_replay.run_op(op_plan, e_copies)
        out[f"{ENDS}/loss"] = e_copies[("loss", ends.home("loss"))]
        for _, grad, new in parts.updated(ENDS):
            out[f"{ENDS}/{grad}"] = e_copies[(grad, ends.home(grad))]
            out[f"{ENDS}/{new}"] = e_copies[(new, ends.home(new))]
        for segment in parts.segments:
            part = segment.part
            if scan:

                def opt(_: Any, xs: Any, part: str = part) -> tuple[None, Arrays]:
                    p, gs = xs
                    return None, block_update(part, p, gs)

                with jax.named_scope(segment.scope):
                    _, news = _lax.scan(opt, None, (params[segment.scope], grads[segment.scope]))
                for key, value in {**grads[segment.scope], **news}.items():
                    out[f"{segment.scope}/{key}"] = value
                continue
            for i in range(segment.layers):
                layer = segment.start + i
                with jax.named_scope(parts.scope(layer)):
                    news = block_update(part, params[segment.scope][i], grads[segment.scope][i])
                for key, value in {**grads[segment.scope][i], **news}.items():
                    out[f"layer{layer}/{key}"] = value
        return out

    param_args = _param_layout(parts, mesh, dtype, scan)
    inputs, seeds = _ends_args(parts, mesh, dtype)

    def spec_of(arg: Any) -> Any:
        return arg.sharding.spec

    in_specs = jax.tree.map(spec_of, (param_args, inputs, seeds))
    out_specs = {
        k: partition_spec(ShardingSpec(d)) for k, d in _result_layouts(parts, scan).items()
    }
    mapped = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    return jax.jit(mapped), (param_args, inputs, seeds)


# -- attribution and records -----------------------------------------------------------------------

#: ``(part, forward op, pass)``: where a collective belongs (empty strings when unknown)
ModelOrigin = tuple[str, str, str]


def _origin(parts: _Parts, path: str) -> ModelOrigin:
    part = None
    for _, segment in _segments_with_offsets(path):
        name = segment
        for _ in range(8):
            found = parts.part_of_scope(name)
            if found is not None:
                part = found
                break
            inner = name.find("(")
            if inner < 0 or not name.endswith(")"):
                break
            name = name[inner + 1 : -1]
        if part is not None:
            break
    if part is None:
        return ("", "", "")
    program = parts.parts[part].program
    known = {op.name: "forward" for op in program.ops if op.phase is Phase.FORWARD}
    known.update({op.name: "optimizer" for op in program.ops if op.phase is Phase.OPTIMIZER})
    op, pass_name = _origin_of_path(path, known)
    return (part, op, pass_name)


def _predicted(parts: _Parts) -> tuple[list[CollectiveRecord], list[ModelOrigin]]:
    records: list[CollectiveRecord] = []
    origins: list[ModelOrigin] = []
    counts = {ENDS: 1, **parts.layers}
    for part, plan in parts.parts.items():
        mine, where = predicted_program_collectives(plan)
        for record, (op, pass_name) in zip(mine, where, strict=True):
            records.append(dataclasses.replace(record, count=record.count * counts[part]))
            origins.append((part, op, pass_name))
    return records, origins


def _observed(
    parts: _Parts, text: str, predicted: Sequence[CollectiveRecord]
) -> tuple[list[CollectiveRecord], list[ModelOrigin]]:
    mesh = parts.plan.mesh
    by_key = {r.key: r for r in predicted}
    default = parts.ends.program.tensor("x0").dtype

    def describe(_: Any, key: tuple[Any, ...]) -> tuple[str | None, str]:
        record = by_key.get(key)
        return (record.operand, record.dtype) if record is not None else (None, default)

    records: list[CollectiveRecord] = []
    origins: list[ModelOrigin] = []
    for coll in read_collectives(text):
        members = _members(op_name(text, coll))
        for leaf in split_combined([coll]):
            (index,) = leaf.leaf_indices or (0,)
            path = members[index] if index < len(members) else members[0]
            origin = _origin(parts, path)
            for record in hlo_records(mesh, [leaf], describe):
                records.append(record)
                origins.append(origin)
    return records, origins


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelOpAgreement(OpAgreement):
    """One part's forward op and pass: the plan's collectives there (times the part's
    layers) and XLA's."""

    part: str

    def as_dict(self) -> dict[str, Any]:
        return {"part": self.part, **OpAgreement.as_dict(self)}


def _per_op(
    predicted: Sequence[CollectiveRecord],
    predicted_origins: Sequence[ModelOrigin],
    observed: Sequence[CollectiveRecord],
    observed_origins: Sequence[ModelOrigin],
) -> tuple[ModelOpAgreement, ...]:
    """Rows per (part, op, pass); an extra collective of one op that another op of the same
    part and pass lacks (XLA kept another reader's copy) moves there, as for a layer."""
    origins = list(observed_origins)
    missing: Counter[tuple[ModelOrigin, Any]] = Counter()
    for record, origin in zip(predicted, predicted_origins, strict=True):
        missing[(origin, record.key)] += record.count
    extra = []
    for i, (record, origin) in enumerate(zip(observed, origins, strict=True)):
        if missing[(origin, record.key)] >= record.count:
            missing[(origin, record.key)] -= record.count
        else:
            extra.append(i)
    for i in extra:
        record, origin = observed[i], origins[i]
        for (other, key), n in missing.items():
            same_part = origin[0] in (other[0], "")
            same_pass = origin[2] in (other[2], "")
            if n >= record.count and key == record.key and same_part and same_pass:
                missing[(other, key)] -= record.count
                origins[i] = other
                break
    order: dict[ModelOrigin, None] = dict.fromkeys(predicted_origins)
    order.update(dict.fromkeys(origins))
    rows = []
    for origin in order:
        want = tuple(r for r, o in zip(predicted, predicted_origins, strict=True) if o == origin)
        got = tuple(r for r, o in zip(observed, origins, strict=True) if o == origin)
        if want or got:
            rows.append(
                ModelOpAgreement(
                    part=origin[0], op=origin[1], pass_name=origin[2], predicted=want, observed=got
                )
            )
    return tuple(rows)


# -- compiling and running ----------------------------------------------------------------------


def _compile(program: tuple[Any, Any], options: dict[str, Any]) -> tuple[str, tuple[str, ...]]:
    fn, args = program
    with capture_stderr() as lines:
        try:
            text = str(fn.lower(*args).compile(compiler_options=options).as_text())
        except ValidationError:
            raise
        except Exception as exc:  # JAX and XLA raise many types; wrap them with the context
            raise ValidationError(f"{type(exc).__name__}: {exc}") from exc
    return text, interesting_lines(lines)


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelExecution:
    """The reference and both steps run on the same random data."""

    dtype: str
    tolerance: float
    jit_rel_error: tuple[tuple[str, float], ...]
    shard_map_rel_error: tuple[tuple[str, float], ...]
    run_s: float

    @property
    def jit_max_rel_error(self) -> float:
        return max((e for _, e in self.jit_rel_error), default=0.0)

    @property
    def shard_map_max_rel_error(self) -> float:
        return max((e for _, e in self.shard_map_rel_error), default=0.0)

    @property
    def ok(self) -> bool:
        return max(self.jit_max_rel_error, self.shard_map_max_rel_error) <= self.tolerance

    def as_dict(self) -> dict[str, Any]:
        return {
            "dtype": self.dtype,
            "tolerance": self.tolerance,
            "jit_max_rel_error": self.jit_max_rel_error,
            "shard_map_max_rel_error": self.shard_map_max_rel_error,
            "ok": self.ok,
        }


def _random_params(parts: _Parts, dtype: str, scan: bool, seed: int) -> tuple[Params, Any, Any]:
    e_params, e_inputs, e_seeds = _random_args(parts.ends.program, dtype, seed)
    params: Params = {ENDS: e_params}
    for segment in parts.segments:
        program = parts.parts[segment.part].program
        layers = [
            _random_args(program, dtype, seed + 1 + segment.start + i)[0]
            for i in range(segment.layers)
        ]
        if scan:
            params[segment.scope] = {
                name: np.stack([layer[name] for layer in layers]) for name in layers[0]
            }
        else:
            params[segment.scope] = layers
    inputs = {"ids": e_inputs["ids"]}
    d_loss = _gradient(parts.ends.program, "loss")
    return params, inputs, {d_loss: e_seeds[d_loss]}


def _execute(parts: _Parts, scan: bool, dtype: str, seed: int = 0) -> ModelExecution:
    params, inputs, seeds = _random_params(parts, dtype, scan, seed)
    start = time.perf_counter()
    reference = jax.jit(_step_function(parts, None, dtype, scan))
    want = {k: np.asarray(v, np.float64) for k, v in reference(params, inputs, seeds).items()}
    errors: dict[str, tuple[tuple[str, float], ...]] = {}
    with capture_stderr():
        for name, build, options in (
            ("jit", jit_model, FAST_COMPILE_OPTIONS),
            ("shard_map", shard_map_model, _SHARD_MAP_OPTIONS),
        ):
            fn, args = build(parts, scan=scan, dtype=dtype)
            placed = jax.tree.map(
                lambda value, arg: jax.device_put(value, arg.sharding),
                (params, inputs, seeds),
                args,
            )
            try:
                got = fn.lower(*args).compile(compiler_options=options)(*placed)
            except Exception as exc:
                raise ValidationError(
                    f"running the {name} step of {parts.plan.name} failed: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            rel = []
            for key, expected in want.items():
                diff = np.max(np.abs(np.asarray(got[key], np.float64) - expected))
                rel.append((key, float(diff / max(np.max(np.abs(expected)), 1e-30))))
            errors[name] = tuple(rel)
    return ModelExecution(
        dtype=dtype,
        tolerance=_RTOL.get(dtype, 6e-2),
        jit_rel_error=errors["jit"],
        shard_map_rel_error=errors["shard_map"],
        run_s=time.perf_counter() - start,
    )


# -- the result -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelValidation:
    """A model plan's training step checked against XLA."""

    plan: ModelPlan
    scan: bool
    verdict: Verdict
    predicted: tuple[CollectiveRecord, ...]
    observed: tuple[CollectiveRecord, ...]  # XLA's jit step
    shard_map: tuple[CollectiveRecord, ...] | None  # the plan's own step
    per_op: tuple[ModelOpAgreement, ...]
    flops: FlopsCheck
    numerics: ModelExecution | None
    #: each part's own validation (``validate_program``), when XLA's step was compared
    #: with its layers'
    layers: tuple[tuple[str, ProgramValidation], ...]
    #: XLA's step is its layers' jit programs composed (``None``: not compared)
    composes: bool | None
    warnings: tuple[str, ...]
    reasons: tuple[str, ...]
    compile_s: float

    @property
    def ok(self) -> bool:
        return self.verdict is not Verdict.MISMATCH

    @property
    def jit_flops_agree(self) -> bool:
        return abs(self.flops.jit - self.flops.plan) <= 1e-9 * max(self.flops.plan, 1.0)

    @property
    def difference(self) -> str:
        """What XLA's step lacks (``-``) and adds (``+``), by kind, axes, part, op and
        pass: ``+all-reduce[y]@moe block/expert_up/backward x2``; empty on a match."""
        parts: list[str] = []
        for row in self.per_op:
            want, got = multiset(row.predicted), multiset(row.observed)
            where = f"@{row.part or '?'}/{row.op or '?'}/{row.pass_name or '?'}"
            for sign, diff in (("-", want - got), ("+", got - want)):
                for (kind, axes, _, _), n in sorted(diff.items(), key=lambda kv: str(kv[0])):
                    axes_text = "?" if axes is None else "+".join(axes)
                    parts.append(f"{sign}{kind}[{axes_text}]{where}" + (f" x{n}" if n > 1 else ""))
        return " ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        plan = self.plan
        return {
            "verdict": self.verdict.value,
            "model": plan.config.name,
            "strategy": plan.name,
            "scan": self.scan,
            "layers": plan.config.layers,
            "hardware": plan.mesh.hardware.name,
            "mesh": {axis.name: axis.size for axis in plan.mesh.axes},
            "predicted": [r.as_dict() for r in self.predicted],
            "observed": [r.as_dict() for r in self.observed],
            "shard_map": None if self.shard_map is None else [r.as_dict() for r in self.shard_map],
            "per_op": [row.as_dict() for row in self.per_op],
            "difference": self.difference,
            "plan_time_s": sum((r.time_s or 0.0) * r.count for r in self.predicted),
            "xla_time_s": total_time_s(self.observed),
            "flops": {**self.flops.as_dict(), "jit_agrees": self.jit_flops_agree},
            "numerics": None if self.numerics is None else self.numerics.as_dict(),
            "composes": self.composes,
            "layer_verdicts": {part: v.verdict.value for part, v in self.layers},
            "warnings": list(self.warnings),
            "reasons": list(self.reasons),
            "compile_s": self.compile_s,
        }


def check_model_size(plan: ModelPlan) -> None:
    """Refuse a model too big to build on simulated devices, naming the limit."""
    from .devices import num_simulated_devices  # noqa: PLC0415

    elements = 0
    for _, part in plan.parts:
        program = part.program
        per_layer = sum(program.elements(t.name) for t in program.tensors)
        elements += per_layer * part.layers
    if elements > MAX_MODEL_ELEMENTS:
        raise ValidationError(
            f"{plan.config.name}: the step's tensors hold {elements:,} elements; the validator "
            f"builds whole models of at most {MAX_MODEL_ELEMENTS:,} (about "
            f"{MAX_MODEL_ELEMENTS * 4 >> 20} MiB of float32 on the host, shared by the "
            f"simulated devices): validate a small config of the same shape (2 layers, "
            "d and f in the tens or hundreds, a few thousand tokens)"
        )
    devices = plan.mesh.num_devices
    if devices > max(num_simulated_devices(), 0) and devices > 512:
        raise ValidationError(
            f"{plan.mesh}: {devices} devices; the model validator compiles on at most 512 "
            "simulated CPU devices: validate a smaller mesh of the same shape"
        )


def validate_model(
    plan: ModelPlan,
    *,
    scan: bool = False,
    execute: bool = False,
    prove: bool = True,
    explain: bool = True,
    dtype: str = "float32",
) -> ModelValidation:
    """Compile ``plan``'s training step on simulated CPU devices and judge the plan.

    ``scan`` runs the blocks as a ``lax.scan`` over their stacked parameters (else
    unrolled); ``execute`` also runs the reference and both steps on random data in
    ``dtype``; ``prove=False`` skips the plan's own step when XLA's matches; ``explain``
    compares a differing XLA step with its layers' own jit programs (``composes``)."""
    check_model_size(plan)
    parts = _Parts(plan)
    start = time.perf_counter()
    predicted, predicted_origins = _predicted(parts)
    jit_text, warnings = _compile(jit_model(parts, scan=scan), FAST_COMPILE_OPTIONS)
    observed, observed_origins = _observed(parts, jit_text, predicted)
    want = multiset(predicted)
    jit_agrees = multiset(observed) == want
    reasons: list[str] = []
    proof: tuple[CollectiveRecord, ...] | None = None
    shard_text: str | None = None
    if prove or execute or not jit_agrees:
        try:
            shard_text, more = _compile(shard_map_model(parts, scan=scan), _SHARD_MAP_OPTIONS)
            warnings += tuple(f"shard_map: {w}" for w in more)
        except ValidationError as exc:
            reasons.append(f"the plan's shard_map step cannot be built: {exc}")
    if shard_text is not None:
        records, _ = _observed(parts, shard_text, predicted)
        proof = tuple(records)
        reasons += difference_lines(want, multiset(proof), "the plan's shard_map step")
    counts = {ENDS: 1, **parts.layers}
    plan_flops = sum(p.cost.flops / p.layers * counts[name] for name, p in parts.parts.items())
    flops = FlopsCheck(
        plan=plan_flops,
        shard_map=None if shard_text is None else dot_flops(shard_text),
        shard_map_written=None,
        jit=dot_flops(jit_text),
    )
    if shard_text is not None and not math.isclose(flops.shard_map or 0, plan_flops):
        reasons.append(
            f"the plan's shard_map step does {flops.shard_map} matmul FLOPs per chip, the "
            f"plan says {plan_flops:g}"
        )
    numerics = None
    notes: list[str] = []
    if execute and shard_text is not None:
        numerics = _execute(parts, scan, dtype)
        if numerics.shard_map_max_rel_error > numerics.tolerance:
            reasons.append(
                "the plan's shard_map step computes wrong numbers: max relative error "
                f"{numerics.shard_map_max_rel_error:.3g} > {numerics.tolerance:g}"
            )
        if numerics.jit_max_rel_error > numerics.tolerance:
            notes.append(
                "XLA's jit step computes wrong numbers: max relative error "
                f"{numerics.jit_max_rel_error:.3g} > {numerics.tolerance:g}"
            )
    layers: list[tuple[str, ProgramValidation]] = []
    composes: bool | None = None
    verdict = judge(reasons, want, observed, "XLA's jit step")
    if explain and not jit_agrees:
        composed: Counter[Any] = Counter()
        for name, part in parts.parts.items():
            v = validate_program(part, prove=False)
            layers.append((name, v))
            for record in v.observed:
                composed[record.key] += record.count * counts[name]
        composes = composed == multiset(observed)
        if not composes:
            notes += difference_lines(
                composed, multiset(observed), "XLA's step, against its layers' jit programs,"
            )
    return ModelValidation(
        plan=plan,
        scan=scan,
        verdict=verdict,
        predicted=tuple(predicted),
        observed=tuple(observed),
        shard_map=proof,
        per_op=_per_op(predicted, predicted_origins, observed, observed_origins),
        flops=flops,
        numerics=numerics,
        layers=tuple(layers),
        composes=composes,
        warnings=warnings,
        reasons=tuple(reasons + notes),
        compile_s=time.perf_counter() - start,
    )
