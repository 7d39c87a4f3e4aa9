"""A pipelined model plan checked on simulated devices: stages in a ``shard_map`` over the
pipeline axis, ``ppermute`` between them.

:func:`validate_pipeline` takes a :class:`~sharding_roofline.program.model.ModelPlan` with
``pp`` (one mesh axis, ``P`` stages of ``L/P`` layers each, ``m >= P`` microbatches) and
builds its training step as a GPipe schedule: a ``shard_map`` manual over the pipeline axis
only (the other axes stay automatic: each stage's blocks, embedding and head are the jit
step's, with the plan's layouts pinned, and XLA chooses their collectives). Every tick each
stage runs its layers on the microbatch it holds (the first stage embeds a new one, the last
computes its loss) and sends the result to the next stage with ``ppermute``; ``jax.vjp``
of the whole schedule is the backward pass (each send's transpose is the send back), then
AdamW. Each stage holds its own copy of the embedding and the head (the first and last use
them; the others' gradients are zero): no gradient is reduced over the pipeline axis.

The check, against the plan's :class:`~sharding_roofline.program.model.Pipeline`:

* every stage-boundary send XLA compiles is a ``collective-permute`` over the pipeline
  axis moving the plan's activations per chip (``tokens/m · d`` over the data axes, and
  the tp axes with sequence parallelism: ``model._stage_permutes``);
* there are ``m + P - 2`` sends each way (the ticks that carry a microbatch; the last
  tick's is dead), of which the plan's time counts the ``2(P-1)`` on the critical path:
  ``Pipeline.permute_s`` equals ``2(P-1)`` times the observed send's cost;
* numerics: the loss of every microbatch, every gradient (summed over the microbatches)
  and every update equal the unsharded reference's, run microbatch by microbatch.

The stages' other collectives are XLA's (reported, not judged: the schedule runs every
stage on every tick, bubbles included).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from sharding_roofline.collectives import Collective, collective_cost
from sharding_roofline.errors import ValidationError
from sharding_roofline.program.evaluate import ProgramPlan
from sharding_roofline.program.graph import Op, Phase
from sharding_roofline.program.model import ModelPlan
from sharding_roofline.reshard import Dims
from sharding_roofline.sharding import ShardingSpec

from .compare import CollectiveRecord, hlo_records
from .devices import jax_mesh, named_sharding
from .hlo import read_collectives, split_combined
from .model_validate import (
    ENDS,
    _compile,
    _first_input,
    _forward_outputs,
    _gradient,
    check_model_size,
)
from .program_jax import Arrays, adamw, forward_function
from .programs import (
    _RTOL,
    FAST_COMPILE_OPTIONS,
    PlanPins,
    _random_args,
    checkpoint_policy,
    slot_groups,
    value_dtype,
)

__all__ = ["PipelineValidation", "validate_pipeline"]

_lax: Any = jax.lax
_P: Any = PartitionSpec
_ShapeDtypeStruct: Any = jax.ShapeDtypeStruct


@dataclass(frozen=True, slots=True)
class _Pipe:
    plan: ModelPlan
    axis: str
    stages: int
    microbatches: int
    part: str
    block: ProgramPlan
    ends: ProgramPlan
    per_stage: int  # layers


def _pipe(plan: ModelPlan) -> _Pipe:
    pipeline = plan.pipeline
    if pipeline is None:
        raise ValidationError(f"{plan.name}: not a pipelined plan; use validate_model")
    if len(plan.strategy.pp) != 1:
        raise ValidationError(
            f"{plan.name}: the pipeline validator runs stages over one mesh axis, not "
            f"{'+'.join(plan.strategy.pp)}"
        )
    parts = dict(plan.parts)
    blocks = [name for name in parts if name != ENDS]
    if len(blocks) != 1:
        raise ValidationError(
            f"{plan.name}: the pipeline validator stacks one kind of block, not {blocks}"
        )
    config = plan.config
    if config.layers % pipeline.stages:
        raise ValidationError(
            f"{plan.name}: {config.layers} layers do not split evenly over {pipeline.stages} stages"
        )
    if config.tie_embeddings:
        raise ValidationError(
            f"{plan.name}: tied embeddings need the first and last stages to add their "
            "gradients of the table; the pipeline validator takes untied ones"
        )
    if pipeline.virtual_stages != 1:
        raise ValidationError(f"{plan.name}: the pipeline validator runs one chunk per stage")
    block = parts[blocks[0]]
    return _Pipe(
        plan=plan,
        axis=plan.strategy.pp[0],
        stages=pipeline.stages,
        microbatches=pipeline.microbatches,
        part=blocks[0],
        block=block,
        ends=parts[ENDS],
        per_stage=config.layers // pipeline.stages,
    )


def _split_ends(ends: ProgramPlan) -> tuple[list[Any], list[Any]]:
    """The ends' forward ops: the embedding's (from the ids) and the head's (from x_last)."""
    depends: dict[str, bool] = {"x_last": True}
    embed: list[Op] = []
    head: list[Op] = []
    for op in ends.program.ops:
        if op.phase is not Phase.FORWARD:
            continue
        uses = any(depends.get(i.tensor, False) for i in op.inputs)
        depends[op.output] = uses
        (head if uses else embed).append(op)
    return embed, head


def _updates(plan: ProgramPlan) -> list[tuple[str, str, Any]]:
    out = []
    for op_plan in plan.ops:
        if op_plan.op.phase is Phase.OPTIMIZER:
            param, grad = (item.tensor for item in op_plan.op.inputs)
            out.append((param, grad, op_plan))
    return out


def _functions(pipe: _Pipe, dtype: str | None, pinned: bool) -> tuple[Any, Any, Any]:
    """(embed(params, ids) -> x0, layer(params, x) -> x, head(params, x) -> loss), each under
    ``jax.checkpoint`` with its part's policy (pinned with bare specs when ``pinned``)."""
    ends, block = pipe.ends, pipe.block
    e_program, b_program = ends.program, block.program
    embed_ops, head_ops = _split_ends(ends)
    e_pins = PlanPins(ends, None) if pinned else None
    groups = slot_groups(ends)
    embed = forward_function(
        e_program, dtype=dtype, pins=e_pins, groups=groups, ops=embed_ops, outputs=("x0",)
    )
    head = forward_function(
        e_program, dtype=dtype, pins=e_pins, groups=groups, ops=head_ops, outputs=("loss",)
    )
    forward = forward_function(
        b_program,
        dtype=dtype,
        pins=PlanPins(block, None) if pinned else None,
        groups=slot_groups(block),
    )
    x_name = _first_input(b_program)
    (out_name,) = _forward_outputs(b_program)
    e_policy = checkpoint_policy(e_program)
    embed_c = jax.checkpoint(lambda p, ids: embed(p, {"ids": ids})["x0"], policy=e_policy)
    head_c = jax.checkpoint(lambda p, x: head(p, {"x_last": x})["loss"], policy=e_policy)
    layer_c = jax.checkpoint(
        lambda p, x: forward(p, {x_name: x})[out_name], policy=checkpoint_policy(b_program)
    )
    return embed_c, layer_c, head_c


def _stage_dims(dims: Dims) -> Dims:
    return ((), *dims)


def pipeline_step(pipe: _Pipe, dtype: str | None = None) -> tuple[Any, tuple[Any, ...]]:
    """The jitted GPipe step and its argument ``ShapeDtypeStruct``s: block parameters
    ``[L, ...]`` split over the pipeline axis (``L/P`` per stage), the ends' parameters
    ``[P, ...]`` (a copy per stage), the ids and the incoming gradients ``[m, b, t]``."""
    mesh = jax_mesh(pipe.plan.mesh)
    axis, stages, m, per_stage = pipe.axis, pipe.stages, pipe.microbatches, pipe.per_stage
    embed_c, layer_c, head_c = _functions(pipe, dtype, pinned=True)
    ends, block = pipe.ends, pipe.block
    x_name = _first_input(block.program)
    x_shape = block.program.shape(x_name)
    x_dtype = value_dtype(block.program, x_name, dtype)
    loss_home = ends.home("loss")

    def body(bp: Arrays, ep: Arrays, ids: jax.Array, d_loss: jax.Array) -> jax.Array:
        stage = _lax.axis_index(axis)
        ep = {k: v[0] for k, v in ep.items()}
        state = jnp.zeros(x_shape, x_dtype)
        losses = []
        for tick in range(m + stages - 1):
            with jax.named_scope(f"tick{tick}"):
                fresh = embed_c(ep, ids[min(tick, m - 1)])
                x = jnp.where(stage == 0, fresh, state)
                for i in range(per_stage):
                    with jax.named_scope(f"layer{i}"):
                        x = layer_c({k: v[i] for k, v in bp.items()}, x)
                if tick >= stages - 1:
                    loss = head_c(ep, x)
                    losses.append(jnp.where(stage == stages - 1, loss, 0.0))
                pairs = [(s, s + 1) for s in range(stages - 1)]
                state = _lax.ppermute(x, axis, pairs)
        del d_loss
        return jnp.stack(losses)[None]

    b_names = [t.name for t in block.program.params]
    e_names = [t.name for t in ends.program.params]
    mapped = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=({n: _P(axis) for n in b_names}, {n: _P(axis) for n in e_names}, _P(), _P()),
        out_specs=_P(axis),
        axis_names={axis},
        check_vma=False,
    )
    b_updates, e_updates = _updates(block), _updates(ends)

    def step(bp: Arrays, ep: Arrays, ids: jax.Array, d_loss: jax.Array) -> dict[str, Any]:
        losses, vjp = jax.vjp(lambda bp, ep: mapped(bp, ep, ids, d_loss), bp, ep)
        seed = jnp.broadcast_to(d_loss[None], losses.shape).astype(losses.dtype)
        seed = _lax.with_sharding_constraint(seed, _sharding(mesh, (axis,), loss_home, 1))
        g_b, g_e = vjp(seed)
        # every stage's losses (the last stage's are the microbatches', the others' zeros):
        # taking the last stage's here would move them between stages
        out: dict[str, Any] = {"loss": losses}
        for name, grad, op_plan in b_updates:
            (_, at_p), (_, at_g) = op_plan.at_op
            p = _lax.with_sharding_constraint(bp[name], _sharding(mesh, (axis,), at_p, 0))
            g = _lax.with_sharding_constraint(g_b[name], _sharding(mesh, (axis,), at_g, 0))
            out[f"{pipe.part}/{grad}"] = g
            with jax.named_scope(op_plan.op.name):
                out[f"{pipe.part}/{op_plan.op.output}"] = adamw(p, g)
        for name, grad, op_plan in e_updates:
            (_, at_p), (_, at_g) = op_plan.at_op
            p = _lax.with_sharding_constraint(ep[name], _sharding(mesh, (axis,), at_p, 0))
            g = _lax.with_sharding_constraint(g_e[name], _sharding(mesh, (axis,), at_g, 0))
            out[f"{ENDS}/{grad}"] = g
            with jax.named_scope(op_plan.op.name):
                out[f"{ENDS}/{op_plan.op.output}"] = adamw(p, g)
        return out

    layers = pipe.plan.config.layers

    def arg(program: Any, plan: ProgramPlan, name: str, lead: int, over: str | None) -> Any:
        shape = (lead, *program.shape(name))
        dims = ((over,) if over else (), *plan.home(name))
        return _ShapeDtypeStruct(
            shape,
            value_dtype(program, name, dtype),
            sharding=named_sharding(mesh, ShardingSpec(dims)),
        )

    b_args = {n: arg(block.program, block, n, layers, axis) for n in b_names}
    e_args = {n: arg(ends.program, ends, n, stages, axis) for n in e_names}
    ids = arg(ends.program, ends, "ids", m, None)
    d_loss_name = _gradient(ends.program, "loss")
    d_loss = arg(ends.program, ends, d_loss_name, m, None)
    return jax.jit(step), (b_args, e_args, ids, d_loss)


def _sharding(mesh: Any, lead: tuple[str, ...], dims: Dims, extra: int) -> NamedSharding:
    """``[lead, (extra unsharded dims), dims...]``."""
    return named_sharding(mesh, ShardingSpec((lead, *(((),) * extra), *dims)))


# -- the reference ---------------------------------------------------------------------------


def _reference(pipe: _Pipe, dtype: str) -> Any:
    """The step unsharded, microbatch by microbatch: the losses, the gradients summed over
    the microbatches, AdamW on them (the same layout of results as the pipeline's)."""
    embed_c, layer_c, head_c = _functions(pipe, dtype, pinned=False)
    layers, stages, m = pipe.plan.config.layers, pipe.stages, pipe.microbatches

    def loss_of(bp: Arrays, ep: Arrays, ids: jax.Array) -> Any:
        x = embed_c(ep, ids)
        for i in range(layers):
            x = layer_c({k: v[i] for k, v in bp.items()}, x)
        return head_c(ep, x)

    def step(bp: Arrays, ep: Arrays, ids: jax.Array, d_loss: jax.Array) -> dict[str, Any]:
        e_one = {k: v[0] for k, v in ep.items()}
        losses = []
        g_b = jax.tree.map(jnp.zeros_like, bp)
        g_e = jax.tree.map(jnp.zeros_like, e_one)
        for j in range(m):
            loss, vjp = jax.vjp(lambda bp, ep, j=j: loss_of(bp, ep, ids[j]), bp, e_one)
            db, de = vjp(d_loss[j].astype(loss.dtype))
            g_b = jax.tree.map(jnp.add, g_b, db)
            g_e = jax.tree.map(jnp.add, g_e, de)
            losses.append(loss)
        every = jnp.stack(losses)
        out: dict[str, Any] = {"loss": jnp.zeros((stages, *every.shape)).at[-1].set(every)}
        for name, grad, op_plan in _updates(pipe.block):
            out[f"{pipe.part}/{grad}"] = g_b[name]
            out[f"{pipe.part}/{op_plan.op.output}"] = adamw(bp[name], g_b[name])
        embed_ops, _ = _split_ends(pipe.ends)
        embedding = {i.tensor for op in embed_ops for i in op.inputs}
        for name, grad, op_plan in _updates(pipe.ends):
            # the pipeline's stage copies: the first stage's embedding and the last stage's
            # head get the gradients, the other copies zeros; every copy is updated
            user = 0 if name in embedding else stages - 1
            g = jnp.zeros((stages, *g_e[name].shape), g_e[name].dtype).at[user].set(g_e[name])
            out[f"{ENDS}/{grad}"] = g
            out[f"{ENDS}/{op_plan.op.output}"] = adamw(ep[name], g)
        return out

    return jax.jit(step)


# -- the result ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class PipelineValidation:
    """A pipelined plan's stage-boundary sends and numerics against XLA's step."""

    plan: ModelPlan
    ok: bool
    #: the plan's activations per chip in one send, and XLA's sends (each direction)
    plan_elements: int
    permutes: tuple[CollectiveRecord, ...]
    forward_sends: int
    backward_sends: int
    expected_sends: int  # per direction: m + P - 2
    plan_permute_s: float
    observed_permute_s: float  # 2(P-1) sends of the observed size, on the plan's hardware
    others: tuple[CollectiveRecord, ...]  # the stages' own collectives (XLA's)
    rel_error: tuple[tuple[str, float], ...] | None
    tolerance: float
    reasons: tuple[str, ...]
    compile_s: float

    @property
    def max_rel_error(self) -> float | None:
        if self.rel_error is None:
            return None
        return max((e for _, e in self.rel_error), default=0.0)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "model": self.plan.config.name,
            "strategy": self.plan.name,
            "stages": self.plan.pipeline.stages if self.plan.pipeline else 1,
            "microbatches": self.plan.training.microbatches,
            "plan_elements_per_send": self.plan_elements,
            "permutes": [r.as_dict() for r in self.permutes],
            "forward_sends": self.forward_sends,
            "backward_sends": self.backward_sends,
            "expected_sends_per_direction": self.expected_sends,
            "plan_permute_s": self.plan_permute_s,
            "observed_permute_s": self.observed_permute_s,
            "other_collectives": [r.label() for r in self.others],
            "max_rel_error": self.max_rel_error,
            "tolerance": self.tolerance,
            "reasons": list(self.reasons),
            "compile_s": self.compile_s,
        }


def _random(pipe: _Pipe, dtype: str, seed: int) -> tuple[Any, ...]:
    layers, stages, m = pipe.plan.config.layers, pipe.stages, pipe.microbatches
    per_layer = [_random_args(pipe.block.program, dtype, seed + 1 + i)[0] for i in range(layers)]
    bp = {k: np.stack([layer[k] for layer in per_layer]) for k in per_layer[0]}
    e_params, _, _ = _random_args(pipe.ends.program, dtype, seed)
    ep = {k: np.stack([v] * stages) for k, v in e_params.items()}
    d_loss_name = _gradient(pipe.ends.program, "loss")
    draws = [_random_args(pipe.ends.program, dtype, seed + 100 + j) for j in range(m)]
    ids = np.stack([d[1]["ids"] for d in draws])
    d_loss = np.stack([d[2][d_loss_name] for d in draws])
    return bp, ep, ids, d_loss


def validate_pipeline(
    plan: ModelPlan, *, execute: bool = True, dtype: str = "float32"
) -> PipelineValidation:
    """Compile (and, with ``execute``, run) ``plan``'s GPipe step; check its sends and
    numbers as the module docstring says."""
    check_model_size(plan)
    pipe = _pipe(plan)
    pipeline = plan.pipeline
    assert pipeline is not None
    start = time.perf_counter()
    text, _ = _compile(pipeline_step(pipe), FAST_COMPILE_OPTIONS)
    compile_s = time.perf_counter() - start
    mesh = plan.mesh
    records = hlo_records(
        mesh,
        split_combined(read_collectives(text)),
        lambda coll, key: (None, plan.config.dtype),
    )
    permutes = tuple(r for r in records if r.kind == "collective-permute")
    others = tuple(r for r in records if r.kind != "collective-permute")
    strategy = plan.strategy
    data = math.prod(mesh.axis_size(a) for a in (*strategy.dp, *strategy.fsdp))
    tp = math.prod(mesh.axis_size(a) for a in strategy.tp) if strategy.sp else 1
    elements = plan.training.microbatch_tokens * plan.config.d // max(data * tp, 1)
    reasons: list[str] = []
    for r in permutes:
        if r.axes != (pipe.axis,) or r.elements_in_per_chip != elements:
            reasons.append(
                f"XLA's stage send {r.label()} is not the plan's {elements} elements per chip "
                f"over {pipe.axis}"
            )
    expected = pipe.microbatches + pipe.stages - 2
    forward_sends, backward_sends = _directions(text, pipe)
    if (forward_sends, backward_sends) != (expected, expected):
        reasons.append(
            f"XLA's step sends {forward_sends} activations forward and {backward_sends} "
            f"gradients back; the schedule carries {expected} each way"
        )
    cost = collective_cost(
        mesh,
        Collective.COLLECTIVE_PERMUTE,
        (pipe.axis,),
        elements_in_per_chip=elements,
        dtype=plan.config.dtype,
    )
    observed_s = 2 * (pipe.stages - 1) * cost.time_s * pipeline.virtual_stages
    if not math.isclose(observed_s, pipeline.permute_s, rel_tol=1e-9):
        reasons.append(
            f"the plan's pipeline permutes take {pipeline.permute_s:.4g} s; 2(P-1) sends of "
            f"{elements} elements take {observed_s:.4g} s"
        )
    rel: tuple[tuple[str, float], ...] | None = None
    tolerance = _RTOL.get(dtype, 6e-2)
    if execute:
        rel = _execute(pipe, dtype)
        worst = max((e for _, e in rel), default=0.0)
        if worst > tolerance:
            reasons.append(
                f"the pipelined step computes wrong numbers: max relative error {worst:.3g} "
                f"> {tolerance:g}"
            )
    return PipelineValidation(
        plan=plan,
        ok=not reasons,
        plan_elements=elements,
        permutes=permutes,
        forward_sends=forward_sends,
        backward_sends=backward_sends,
        expected_sends=expected,
        plan_permute_s=pipeline.permute_s,
        observed_permute_s=observed_s,
        others=others,
        rel_error=rel,
        tolerance=tolerance,
        reasons=tuple(reasons),
        compile_s=compile_s,
    )


def _directions(text: str, pipe: _Pipe) -> tuple[int, int]:
    """Sends forward (stage s to s+1) and back, from the printed source-target pairs."""
    forward = backward = 0
    for coll in split_combined(read_collectives(text)):
        if coll.kind != "collective-permute" or coll.pairs is None:
            continue
        shape = pipe.plan.mesh.shape
        names = pipe.plan.mesh.axis_names
        k = names.index(pipe.axis)
        stride = math.prod(shape[k + 1 :])
        src, dst = coll.pairs[0]
        step = (dst - src) // stride
        if step > 0:
            forward += coll.count
        else:
            backward += coll.count
    return forward, backward


def _execute(pipe: _Pipe, dtype: str, seed: int = 0) -> tuple[tuple[str, float], ...]:
    args = _random(pipe, dtype, seed)
    want = {k: np.asarray(v, np.float64) for k, v in _reference(pipe, dtype)(*args).items()}
    fn, shapes = pipeline_step(pipe, dtype)
    placed = jax.tree.map(lambda value, s: jax.device_put(value, s.sharding), args, shapes)
    got = fn.lower(*shapes).compile(compiler_options=FAST_COMPILE_OPTIONS)(*placed)
    rel = []
    for key, expected in want.items():
        value = np.asarray(got[key], np.float64)
        diff = np.max(np.abs(value - expected))
        rel.append((key, float(diff / max(np.max(np.abs(expected)), 1e-30))))
    return tuple(rel)
