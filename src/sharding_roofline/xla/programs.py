"""A program plan's two programs, compiled on simulated CPU devices, and run.

For one :class:`~sharding_roofline.program.evaluate.ProgramPlan` (the layer as JAX code is
``program_jax.py``):

``jit``
    :func:`jit_program`: the layer under ``jit``, with the plan's layouts pinned and XLA's
    SPMD partitioner choosing every collective. Parameters come in at their storage, inputs
    and incoming gradients at their homes; each forward op's inputs are pinned at their
    layouts at the op and its result at its own (local, then home) layout
    (``with_sharding_constraint``, whose transpose pins the backward's cotangents the same
    way); every result leaves at the plan's layout (``out_shardings``). The forward is
    wrapped in ``jax.checkpoint`` with a policy that saves exactly the activations the plan
    saves (named with ``checkpoint_name`` at the op whose layout the plan saves them in), so
    the backward re-reads parameters from storage (FSDP gathers them again, as the plan
    does) and recomputes what the remat policy recomputes.

``shard_map``
    :func:`shard_map_program`: the plan itself. A per-device program that replays every op
    of the plan in order on local blocks: the steps moving each input from its source (its
    home, or the layout the plan saved it in) to its layout at the op, with ``jax.lax``
    collectives (``run.apply_step``), the local op, and the steps moving the result to its
    home. A tensor moved to a layout once is reused there, as the plan reuses it. Its
    compiled HLO must hold exactly the plan's collectives, and its numbers must equal the
    reference's (which also checks the mechanical backward pass of ``autodiff.py``).

Both compile from ``ShapeDtypeStruct``s (no data); compiled text is cached per plan.
:func:`execute_program_plan` runs the reference and both programs on random data, in
float32 unless told otherwise (the layouts and collectives do not depend on the dtype).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax import ad_checkpoint
from jax.sharding import Mesh, NamedSharding

from sharding_roofline.errors import ValidationError
from sharding_roofline.program.evaluate import LOSS_STATISTICS, OpPlan, ProgramPlan
from sharding_roofline.program.graph import Op, OpKind, Phase, Program, TensorKind
from sharding_roofline.reshard import Dims
from sharding_roofline.sharding import ShardingSpec

from .devices import jax_mesh, named_sharding, partition_spec
from .hlo import dot_flops
from .program_jax import (
    Arrays,
    OpContext,
    Pins,
    SlotGroups,
    adamw,
    apply_op,
    checkpoint_label,
    forward_function,
    forward_outputs,
    reference_function,
    saved_activations,
    seed_gradients,
    training_function,
)
from .run import apply_step, block_index, capture_stderr, interesting_lines

__all__ = [
    "FAST_COMPILE_OPTIONS",
    "CompiledProgram",
    "ProgramExecution",
    "clear_program_cache",
    "compile_program_plan",
    "execute_program_plan",
    "jit_program",
    "saved_activations",
    "shard_map_program",
]

_lax: Any = jax.lax
_ShapeDtypeStruct: Any = jax.ShapeDtypeStruct
_checkpoint_name: Any = ad_checkpoint.checkpoint_name
_policies: Any = jax.checkpoint_policies

#: (jitted fn, its argument ``ShapeDtypeStruct``s: params, inputs, seeds)
JaxProgram = tuple[Any, tuple[dict[str, Any], dict[str, Any], dict[str, Any]]]


# -- the plan's layouts -----------------------------------------------------------------------


def _result_names(program: Program) -> tuple[str, ...]:
    names = forward_outputs(program)
    return (*names, *(n for n in program.outputs if n not in names))


def _arg_names(program: Program) -> tuple[list[str], list[str], list[str]]:
    params = [t.name for t in program.params]
    seeds = set(seed_gradients(program).values())
    inputs = [t.name for t in program.inputs if t.name not in seeds]
    return params, inputs, list(seed_gradients(program).values())


def _args(
    plan: ProgramPlan, mesh: Mesh, dtype: str | None
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    program = plan.program
    groups = _arg_names(program)
    out = tuple(
        {
            name: _ShapeDtypeStruct(
                program.shape(name),
                value_dtype(program, name, dtype),
                sharding=named_sharding(mesh, ShardingSpec(plan.home(name))),
            )
            for name in names
        }
        for names in groups
    )
    return out[0], out[1], out[2]


def value_dtype(program: Program, name: str, dtype: str | None) -> Any:
    """A tensor's dtype in a run: ``dtype`` overrides floating ones (numerics in float32);
    integer tensors (token ids) keep theirs."""
    own = jnp.dtype(program.tensor(name).dtype)
    return own if jnp.issubdtype(own, jnp.integer) else jnp.dtype(dtype or own)


def slot_groups(plan: ProgramPlan) -> dict[str, SlotGroups]:
    """Each token <-> slot view's groups on global arrays (``program_jax.SlotGroups``): the
    token letters' axes at the op and the slot letter's, as the plan lays them out."""
    axis_size = dict(zip(plan.mesh.axis_names, plan.mesh.shape, strict=True))
    out: dict[str, SlotGroups] = {}
    for op_plan in plan.ops:
        op = op_plan.op
        if not op.relabel:
            continue
        dims: dict[str, tuple[str, ...]] = {}
        for item, (_, layout) in zip(op.inputs, op_plan.at_op, strict=True):
            dims.update(zip(item.letters, layout, strict=True))
        dims.update(zip(op.out_letters, op_plan.out_local, strict=True))
        ((slot, tokens),) = op.relabel
        out[op.name] = SlotGroups(
            token_axes=tuple(
                (c, tuple((a, axis_size[a]) for a in dims.get(c, ()))) for c in tokens
            ),
            slot_axes=dims.get(slot, ()),
        )
    return out


def _sharding(mesh: Mesh, dims: Dims) -> NamedSharding:
    return named_sharding(mesh, ShardingSpec(dims))


class PlanPins(Pins):
    """The jit program's pins: inputs at their layout at the op, results at their local
    layout (when it is reduced) and then at their home; saved activations named."""

    def __init__(self, plan: ProgramPlan, mesh: Mesh | None) -> None:
        """``mesh=None`` pins with bare ``PartitionSpec``s (inside a ``shard_map`` that is
        manual over other axes: a pipeline's stages)."""
        self.mesh = mesh
        self.ops = {op_plan.op.name: op_plan for op_plan in plan.ops}
        self.saved = set(saved_activations(plan.program))
        #: (forward op, tensor) the backward reads from the tensor's home, not from the
        #: op's layout (``Strategy.regather``): saved before the op's gather
        self.regathered = {
            (item.saved_at, item.tensor)
            for op_plan in plan.ops
            for item, src in zip(op_plan.op.inputs, op_plan.sources, strict=True)
            if item.saved_at
            and src != tuple(dict(self.ops[item.saved_at].sigma).get(c, ()) for c in item.letters)
        }

    def _pin(self, value: jax.Array, dims: Dims) -> jax.Array:
        where = (
            partition_spec(ShardingSpec(dims)) if self.mesh is None else _sharding(self.mesh, dims)
        )
        return cast(jax.Array, _lax.with_sharding_constraint(value, where))

    def input(self, op: Op, index: int, value: jax.Array) -> jax.Array:
        op_plan = self.ops[op.name]
        tensor, dims = op_plan.at_op[index]
        saved = (op.name, tensor) in self.saved
        if saved and (op.name, tensor) in self.regathered:
            # saved as its producer left it; the gather to the op's layout is recomputed
            value = _checkpoint_name(value, checkpoint_label(op.name, tensor))
            return self._pin(value, dims)
        value = self._pin(value, dims)
        if saved:
            value = _checkpoint_name(value, checkpoint_label(op.name, tensor))
        return value

    def output(self, op: Op, value: jax.Array) -> jax.Array:
        op_plan = self.ops[op.name]
        if not op_plan.unreduced and op_plan.out_local != op_plan.out_home:
            value = self._pin(value, op_plan.out_local)
            if (op.name, op.output) in self.saved:
                value = _checkpoint_name(value, checkpoint_label(op.name, op.output))
        value = self._pin(value, op_plan.out_home)
        if (op.name, op.output) in self.saved and op_plan.out_local == op_plan.out_home:
            value = _checkpoint_name(value, checkpoint_label(op.name, op.output))
        if ("", op.output) in self.saved:
            value = _checkpoint_name(value, checkpoint_label("", op.output))
        return value

    def residual(self, op: Op, value: jax.Array) -> jax.Array:
        if (op.name, op.output) in self.saved:
            value = _checkpoint_name(value, checkpoint_label(op.name, op.output))
        return value


def checkpoint_policy(program: Program) -> Any:
    names = [checkpoint_label(at, tensor) for at, tensor in saved_activations(program)]
    if not names:
        return _policies.nothing_saveable
    return _policies.save_only_these_names(*names)


def jit_program(plan: ProgramPlan, *, dtype: str | None = None) -> JaxProgram:
    """The ``jit`` program and its argument ``ShapeDtypeStruct``s (XLA chooses the
    collectives; the plan's layouts are pinned as the module docstring says)."""
    mesh = jax_mesh(plan.mesh)
    program = plan.program
    pins = PlanPins(plan, mesh)
    forward = forward_function(program, dtype=dtype, pins=pins, groups=slot_groups(plan))
    if program.has_backward:
        opt = {
            op_plan.op.name: op_plan for op_plan in plan.ops if op_plan.op.phase is Phase.OPTIMIZER
        }

        def optimizer(op: Op, param: jax.Array, grad: jax.Array) -> jax.Array:
            op_plan = opt[op.name]
            param = _lax.with_sharding_constraint(param, _sharding(mesh, op_plan.at_op[0][1]))
            grad = _lax.with_sharding_constraint(grad, _sharding(mesh, op_plan.at_op[1][1]))
            return adamw(param, grad)

        body = training_function(
            program, forward, policy=checkpoint_policy(program), optimizer=optimizer
        )
    else:

        def body(params: Arrays, inputs: Arrays, seeds: Arrays) -> Arrays:
            return forward(params, inputs)

    out = {name: _sharding(mesh, plan.home(name)) for name in _result_names(program)}
    return jax.jit(body, out_shardings=out), _args(plan, mesh, dtype)


# -- the shard_map program --------------------------------------------------------------------


class Replay:
    """The plan's ops on this device's blocks (inside ``shard_map``)."""

    def __init__(self, plan: ProgramPlan, dtype: str | None) -> None:
        self.plan = plan
        self.program = plan.program
        self.dtype = dtype
        self.axis_size = dict(zip(plan.mesh.axis_names, plan.mesh.shape, strict=True))
        self.sizes = self.program.sizes

    def local_shape(self, letters: str, dims: Dims) -> tuple[int, ...]:
        return tuple(
            self.sizes[c] // math.prod(self.axis_size[a] for a in axes)
            for c, axes in zip(letters, dims, strict=True)
        )

    def source(self, op_plan: OpPlan, index: int) -> Dims:
        """Where the plan reads the op's input from (its home, or where it was saved)."""
        return op_plan.sources[index]

    def start(self) -> None:
        """Forget what a previous run left: which results are partial sums, the stash."""
        self.partial: dict[str, tuple[str, ...]] = {}
        self.stash: dict[str, jax.Array] = {}

    def run(self, homes: dict[str, jax.Array]) -> dict[str, jax.Array]:
        self.start()
        copies: dict[tuple[str, Dims], jax.Array] = {}
        for name, value in homes.items():
            copies[(name, self.plan.home(name))] = value
        for op_plan in self.plan.ops:
            self.run_op(op_plan, copies)
        for name in _result_names(self.program):
            if self.partial.get(name):
                raise ValidationError(
                    f"the plan leaves its result {name} a partial sum over "
                    f"{'+'.join(self.partial[name])}"
                )
        return {name: copies[(name, self.plan.home(name))] for name in _result_names(self.program)}

    def fetch(
        self, tensor: str, dims: Dims, copies: dict[tuple[str, Dims], jax.Array], why: str
    ) -> jax.Array:
        value = copies.get((tensor, dims))
        if value is not None:
            return value
        letters = self.program.tensor(tensor).letters
        for (name, have), candidate in copies.items():  # the same blocks (size-1 axes)
            if name == tensor and self._same_blocks(have, dims, letters):
                return candidate
        raise ValidationError(
            f"the plan reads {tensor} as {ShardingSpec(dims).text()} ({why}), but no op left "
            "it there (a planner bug: a move the plan does not count)"
        )

    def _same_blocks(self, a: Dims, b: Dims, letters: str) -> bool:
        def squeeze(dims: Dims) -> Dims:
            return tuple(tuple(x for x in d if self.axis_size[x] > 1) for d in dims)

        return len(a) == len(letters) and squeeze(a) == squeeze(b)

    def run_op(self, op_plan: OpPlan, copies: dict[tuple[str, Dims], jax.Array]) -> None:
        op = op_plan.op
        pending = list(op_plan.steps_in)
        values: list[jax.Array] = []
        with jax.named_scope(op.name):
            for index, (tensor, dst) in enumerate(op_plan.at_op):
                src = self.source(op_plan, index)
                mine = []
                layout = src
                while pending and pending[0].operand == tensor and layout != dst:
                    if pending[0].before.dims != layout:
                        break
                    mine.append(pending.pop(0))
                    layout = mine[-1].after.dims
                where = f"input {index} of op {op.name}"
                partial = self.partial.get(tensor, ())
                adds_partials = op.fn == "add" and op_plan.unreduced == partial
                if partial and (mine or not adds_partials):
                    raise ValidationError(
                        f"{where} reads {tensor}, a partial sum over {'+'.join(partial)}, "
                        + ("and moves it" if mine else "as if it were reduced")
                        + " (only an add of partial sums over the same axes may read it)"
                    )
                if mine:
                    value = self.fetch(tensor, src, copies, f"the source of {where}")
                    for step in mine:
                        value = apply_step(value, step, self.axis_size)
                else:
                    value = self.fetch(tensor, dst, copies, where)
                if layout != dst and mine:
                    raise ValidationError(
                        f"the plan's steps for {where} end at {ShardingSpec(layout).text()}, "
                        f"not at its layout at the op {ShardingSpec(dst).text()}"
                    )
                copies[(tensor, dst)] = value
                values.append(value)
            if pending:
                raise ValidationError(
                    f"op {op.name}: plan steps left over after its inputs: "
                    + ", ".join(f"{s.operand} {s.kind}" for s in pending)
                )
            offsets = self._offsets(op_plan)
            # a vocabulary-split loss: its leading result steps reduce its statistics
            stats = (
                list(op_plan.steps_out[:LOSS_STATISTICS])
                if op.kind is OpKind.LOSS and op_plan.unreduced
                else []
            )
            pending_stats = list(stats)

            def reduce(value: jax.Array, how: str) -> jax.Array:
                if not pending_stats:
                    raise ValidationError(
                        f"op {op.name}: the loss reduces more statistics over the axes "
                        f"splitting the vocabulary than the plan's {len(stats)}"
                    )
                step = pending_stats.pop(0)
                axes = step.axes[0] if len(step.axes) == 1 else step.axes
                if how == "max":
                    return cast(jax.Array, _lax.pmax(value, axes))
                return cast(jax.Array, _lax.psum(value, axes))

            ctx = OpContext(
                program=self.program,
                dtype=self.dtype,
                offsets=offsets,
                sizes=self.local_sizes(op_plan),
                reduce=reduce,
                stash=self.stash,
            )
            out = apply_op(op, values, ctx)
            if pending_stats:
                raise ValidationError(
                    f"op {op.name}: the plan reduces {len(stats)} statistics of the loss, "
                    f"the cross-entropy {len(stats) - len(pending_stats)}"
                )
            expected = self.local_shape(op.out_letters, op_plan.out_local)
            if tuple(out.shape) != expected:  # pragma: no cover - a validator bug guard
                raise ValidationError(
                    f"op {op.name}: local result {tuple(out.shape)}, the plan says {expected}"
                )
            if not op_plan.unreduced:
                copies[(op.output, op_plan.out_local)] = out
            elif stats:
                # the loss is a partial sum at the op; what its gradient reads there, as the
                # loss saved at its layout, is the statistics' log-sum-exp (whole)
                copies[(op.output, op_plan.out_local)] = self.stash[op.name]
            steps_out = op_plan.steps_out[len(stats) :]
            for step in steps_out:
                out = apply_step(out, step, self.axis_size)
            home = self.local_shape(op.out_letters, op_plan.out_home)
            left = steps_out[-1].unreduced_after if steps_out else op_plan.unreduced
            if tuple(out.shape) != home:
                raise ValidationError(
                    f"op {op.name}: its steps leave {op.output} as a {tuple(out.shape)} block"
                    + (f" unreduced over {'+'.join(left)}" if left else "")
                    + f", not at its home {ShardingSpec(op_plan.out_home).text()} "
                    f"({home} per chip)"
                )
            # a gradient contribution may stay a partial sum at its home, to be added to
            # others as partial and reduced once (the plan's gradient accumulation)
            self.partial[op.output] = left
            copies[(op.output, op_plan.out_home)] = out

    def local_sizes(self, op_plan: OpPlan) -> dict[str, int]:
        """Every letter's size in this device's blocks at the op."""
        op = op_plan.op
        out: dict[str, int] = {}
        pairs = [
            (item.letters, dims) for item, (_, dims) in zip(op.inputs, op_plan.at_op, strict=True)
        ]
        pairs.append((op.out_letters, op_plan.out_local))
        for letters, dims in pairs:
            for c, axes in zip(letters, dims, strict=True):
                out[c] = self.sizes[c] // math.prod(self.axis_size[a] for a in axes)
        return out

    def _offsets(self, op_plan: OpPlan) -> dict[str, Any]:
        """This block's global offsets along the letters a causal mask, the loss's labels
        or a vocabulary-split lookup depend on."""
        op = op_plan.op
        positional = op.fn in ("causal_softmax", "causal_softmax_grad", "xent_grad") or (
            op.kind in (OpKind.LOSS, OpKind.GATHER, OpKind.SCATTER)
        )
        if not positional:
            return {}
        sigma = dict(op_plan.sigma)
        offsets: dict[str, Any] = {}
        for letter in dict.fromkeys(op.letters):
            axes = sigma.get(letter, ())
            if axes:
                local = self.sizes[letter] // math.prod(self.axis_size[a] for a in axes)
                offsets[letter] = block_index(axes, self.axis_size) * local
        return offsets


def shard_map_program(plan: ProgramPlan, *, dtype: str | None = None) -> JaxProgram:
    """The plan as a per-device program (see the module docstring)."""
    mesh = jax_mesh(plan.mesh)
    program = plan.program
    replay = Replay(plan, dtype)
    params, inputs, seeds = _arg_names(program)
    results = _result_names(program)

    def body(p: Arrays, i: Arrays, s: Arrays) -> Arrays:
        return replay.run({**p, **i, **s})

    def specs(names: Sequence[str]) -> dict[str, Any]:
        return {name: partition_spec(ShardingSpec(plan.home(name))) for name in names}

    mapped = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(specs(params), specs(inputs), specs(seeds)),
        out_specs=specs(results),
        check_vma=False,  # gathered blocks are "varying" to the checker; the layouts are exact
    )
    return jax.jit(mapped), _args(plan, mesh, dtype)


# -- compiling (cached) -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class CompiledProgram:
    """Both programs' compiled per-device HLO text and what XLA printed while compiling.
    ``shard_map_text`` is ``None`` when that program was not asked for; ``replay_error``
    says why the plan could not be replayed (a planner bug), when it could not."""

    jit_text: str
    shard_map_text: str | None
    shard_map_written_flops: int | None
    replay_error: str | None
    warnings: tuple[str, ...]
    compile_s: float


@dataclass(frozen=True, slots=True)
class _Entry:
    text: str
    warnings: tuple[str, ...]
    written_flops: int


_CACHE: dict[tuple[Any, ...], _Entry | str] = {}
_CACHE_SIZE = 1024


def clear_program_cache() -> None:
    _CACHE.clear()


def _plan_key(plan: ProgramPlan) -> tuple[Any, ...]:
    """Everything a plan's programs depend on: the program, the mesh and every op's
    layouts and steps."""
    ops = tuple(
        (
            p.op,
            p.sigma,
            p.at_op,
            p.out_local,
            p.unreduced,
            p.out_home,
            tuple((s.operand, s.kind, s.axes, s.before.dims, s.after.dims) for s in p.steps),
        )
        for p in plan.ops
    )
    homes = tuple((name, plan.home(name)) for names in _arg_names(plan.program) for name in names)
    return (plan.program, plan.mesh.axis_names, plan.mesh.shape, ops, homes)


#: The shard_map program is compiled without XLA's common-subexpression elimination: the
#: plan gathers a weight again in the backward pass (ZeRO-3), and CSE would merge the two
#: identical gathers into one (an ``optimization_barrier`` does not stop it: the CPU
#: pipeline expands barriers before its last CSE pass). The program must hold what the
#: plan issues, no more and no less.
#:
#: Both programs are compiled with the CPU backend's cheapest code generation: the
#: collectives and dots are fixed by the HLO passes (SPMD partitioning, the combiners),
#: which these options do not touch, while LLVM code generation is 90% of the compile time
#: of a layer (a block's forward+backward: 7 s by default, 0.9 s so).
#: ``tests/xla/test_xla_programs.py`` checks that the collectives and dot FLOPs are the same.
FAST_COMPILE_OPTIONS: dict[str, Any] = {
    "xla_backend_optimization_level": 0,
    "xla_cpu_use_fusion_emitters": False,
}
_SHARD_MAP_OPTIONS: dict[str, Any] = {**FAST_COMPILE_OPTIONS, "xla_disable_hlo_passes": "cse"}


def _compile(program: JaxProgram, options: dict[str, Any] | None = None) -> _Entry:
    fn, args = program
    with capture_stderr() as lines:
        try:
            lowered = fn.lower(*args)
            written = dot_flops(str(lowered.as_text(dialect="hlo")))
            text = str(lowered.compile(compiler_options=options).as_text())
        except ValidationError:
            raise
        except Exception as exc:  # JAX and XLA raise many types; wrap them with the context
            raise ValidationError(f"{type(exc).__name__}: {exc}") from exc
    return _Entry(text=text, warnings=interesting_lines(lines), written_flops=written)


def _cached(key: tuple[Any, ...], build: Callable[[], JaxProgram]) -> _Entry | str:
    """The compiled program, or (a string) why the plan cannot be replayed."""
    found = _CACHE.get(key)
    if found is None:
        try:
            options = _SHARD_MAP_OPTIONS if key[0] == "shard_map" else FAST_COMPILE_OPTIONS
            found = _compile(build(), options)
        except ValidationError as exc:
            if key[0] != "shard_map":
                raise
            found = str(exc)
        while len(_CACHE) >= _CACHE_SIZE:
            del _CACHE[next(iter(_CACHE))]
        _CACHE[key] = found
    return found


def compile_program_plan(plan: ProgramPlan, *, with_shard_map: bool = True) -> CompiledProgram:
    """Compile ``plan``'s jit program (and its shard_map program) from ShapeDtypeStructs."""
    start = time.perf_counter()
    key = _plan_key(plan)
    fresh = ("jit", key) not in _CACHE or (with_shard_map and ("shard_map", key) not in _CACHE)
    try:
        jit = _cached(("jit", key), lambda: jit_program(plan))
    except ValidationError as exc:
        raise ValidationError(
            f"XLA could not compile the jit program of {plan.name} for {plan.program.name} on "
            f"{plan.mesh}: {exc}"
        ) from exc
    assert isinstance(jit, _Entry)
    warnings = jit.warnings
    text: str | None = None
    written: int | None = None
    error: str | None = None
    if with_shard_map:
        entry = _cached(("shard_map", key), lambda: shard_map_program(plan))
        if isinstance(entry, str):
            error = entry
        else:
            text, written = entry.text, entry.written_flops
            warnings += tuple(f"shard_map: {w}" for w in entry.warnings)
    return CompiledProgram(
        jit_text=jit.text,
        shard_map_text=text,
        shard_map_written_flops=written,
        replay_error=error,
        warnings=warnings,
        compile_s=time.perf_counter() - start if fresh else 0.0,
    )


# -- executing ----------------------------------------------------------------------------------

#: Relative error allowed per result, as ``max |got - want| / max |want|``, by the dtype
#: the programs run in (the reference runs in the same dtype, unsharded).
_RTOL = {"float64": 1e-10, "float32": 2e-4, "bfloat16": 6e-2, "float16": 1e-2}


@dataclass(frozen=True, slots=True, kw_only=True)
class ProgramExecution:
    """The reference and both programs run on the same random data."""

    dtype: str
    tolerance: float
    #: ``result -> max |got - want| / max |want|`` per program
    jit_rel_error: tuple[tuple[str, float], ...]
    shard_map_rel_error: tuple[tuple[str, float], ...]
    jit_layout_ok: bool
    shard_map_layout_ok: bool
    run_s: float

    @property
    def jit_max_rel_error(self) -> float:
        return max((e for _, e in self.jit_rel_error), default=0.0)

    @property
    def shard_map_max_rel_error(self) -> float:
        return max((e for _, e in self.shard_map_rel_error), default=0.0)

    @property
    def shard_map_ok(self) -> bool:
        return self.shard_map_max_rel_error <= self.tolerance and self.shard_map_layout_ok

    @property
    def jit_ok(self) -> bool:
        return self.jit_max_rel_error <= self.tolerance and self.jit_layout_ok

    @property
    def ok(self) -> bool:
        return self.shard_map_ok and self.jit_ok

    def as_dict(self) -> dict[str, Any]:
        return {
            "dtype": self.dtype,
            "tolerance": self.tolerance,
            "jit_max_rel_error": self.jit_max_rel_error,
            "shard_map_max_rel_error": self.shard_map_max_rel_error,
            "jit_rel_error": dict(self.jit_rel_error),
            "shard_map_rel_error": dict(self.shard_map_rel_error),
            "jit_layout_ok": self.jit_layout_ok,
            "shard_map_layout_ok": self.shard_map_layout_ok,
            "jit_ok": self.jit_ok,
            "shard_map_ok": self.shard_map_ok,
            "ok": self.ok,
        }


def _random_args(
    program: Program, dtype: str, seed: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for names in _arg_names(program):
        arrays = {}
        for name in names:
            shape = program.shape(name)
            if jnp.issubdtype(jnp.dtype(program.tensor(name).dtype), jnp.integer):
                arrays[name] = rng.integers(0, _id_range(program, name), shape).astype(
                    program.tensor(name).dtype
                )
                continue
            value = rng.standard_normal(shape)
            if program.tensor(name).kind is TensorKind.PARAM:
                # weights that keep activations O(1); a vector parameter is a norm's scale
                value = value / math.sqrt(shape[0]) if len(shape) > 1 else 1.0 + 0.1 * value
            arrays[name] = np.asarray(value, dtype=jnp.dtype(dtype))
        out.append(arrays)
    return out[0], out[1], out[2]


def _id_range(program: Program, name: str) -> int:
    """Token ids index the table a lookup reads them with: below its vocabulary size."""
    for op, item in program.consumers(name):
        if op.kind is OpKind.GATHER:
            table = next(i for i in op.inputs if i is not item)
            vocab = next(c for c in table.letters if c not in op.out_letters)
            return program.size(vocab)
    return 2


def execute_program_plan(
    plan: ProgramPlan, *, dtype: str = "float32", seed: int = 0
) -> ProgramExecution:
    """Run the reference (unsharded, one device), the jit and the shard_map programs on the
    same random data in ``dtype``; compare every result and check its layout."""
    mesh = jax_mesh(plan.mesh)
    program = plan.program
    params, inputs, seeds = _random_args(program, dtype, seed)
    start = time.perf_counter()
    groups = slot_groups(plan)
    want = jax.jit(reference_function(program, dtype=dtype, groups=groups))(params, inputs, seeds)
    want_np = {k: np.asarray(v, dtype=np.float64) for k, v in want.items()}
    placed = tuple(
        {k: jax.device_put(v, _sharding(mesh, plan.home(k))) for k, v in group.items()}
        for group in (params, inputs, seeds)
    )
    errors: dict[str, tuple[tuple[tuple[str, float], ...], bool]] = {}
    with capture_stderr():
        for name, build in (("jit", jit_program), ("shard_map", shard_map_program)):
            fn, args = build(plan, dtype=dtype)
            options = _SHARD_MAP_OPTIONS if name == "shard_map" else FAST_COMPILE_OPTIONS
            try:
                got = fn.lower(*args).compile(compiler_options=options)(*placed)
            except Exception as exc:
                raise ValidationError(
                    f"running the {name} program of {plan.name} for {program.name} on "
                    f"{plan.mesh} failed: {type(exc).__name__}: {exc}"
                ) from exc
            rel = []
            layout_ok = True
            for key, expected in want_np.items():
                value = got[key]
                diff = np.max(np.abs(np.asarray(value, dtype=np.float64) - expected))
                rel.append((key, float(diff / max(np.max(np.abs(expected)), 1e-30))))
                sharding = value.sharding
                layout_ok &= isinstance(sharding, NamedSharding) and sharding.is_equivalent_to(
                    _sharding(mesh, plan.home(key)), len(expected.shape)
                )
            errors[name] = (tuple(rel), bool(layout_ok))
    return ProgramExecution(
        dtype=dtype,
        tolerance=_RTOL.get(dtype, 6e-2),
        jit_rel_error=errors["jit"][0],
        shard_map_rel_error=errors["shard_map"][0],
        jit_layout_ok=errors["jit"][1],
        shard_map_layout_ok=errors["shard_map"][1],
        run_s=time.perf_counter() - start,
    )
