"""Build a plan's two programs, compile them on simulated CPU devices, and run them.

For one :class:`~sharding_roofline.planner.Plan` the validator builds two programs:

``jit``
    What XLA does with the plan's layouts. Inputs are ``ShapeDtypeStruct``s in their stored
    layouts (``NamedSharding`` on an Auto mesh); each operand is pinned *at the op* with
    ``with_sharding_constraint`` to the plan's operation layouts, and the output is pinned
    with ``out_shardings``. XLA's SPMD partitioner chooses every collective.

``shard_map``
    The plan itself: a per-device program that issues exactly the plan's steps (pre-steps on
    the operands, the local einsum, post-steps on the result) with ``jax.lax`` collectives.
    Its compiled HLO must hold exactly the predicted collectives.

Both compile from ``ShapeDtypeStruct``s, with no data (0.05-0.3 s each); compiled text and
XLA's stderr warnings (e.g. "Involuntary full rematerialization", written by C++ to fd 2)
are captured and cached per layout. :func:`execute_plan` runs both on random data and checks
them against numpy (small shapes only: execution costs seconds at hundreds of devices).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from sharding_roofline.collectives import Collective
from sharding_roofline.errors import ValidationError
from sharding_roofline.plans import Plan, Step

from .devices import jax_mesh, named_sharding, partition_spec
from .hlo import dot_flops

__all__ = [
    "CompiledPlan",
    "Execution",
    "apply_step",
    "block_index",
    "capture_stderr",
    "clear_cache",
    "compile_plan",
    "execute_plan",
    "interesting_lines",
    "jit_program",
    "shard_map_program",
    "tolerance",
]

#: Lines of XLA's stderr worth reporting: absl warnings and errors (``W1125 14:50:16.58 ...
#: spmd_partitioner.cc:656] [SPMD] Involuntary full rematerialization ...``) and Python-style
#: ``WARNING`` lines; the rest (informational logs) is dropped.
_WARNING_RE = re.compile(r"^[WEF]\d{4} |WARNING|rematerializ")

Program = tuple[Any, tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]]  # (jitted fn, inputs)

# jax.lax's collectives and ShapeDtypeStruct are untyped in 0.10.2; mypy --strict sees Any.
_lax: Any = jax.lax
_ShapeDtypeStruct: Any = jax.ShapeDtypeStruct


# -- capturing XLA's stderr ------------------------------------------------------------------


@contextlib.contextmanager
def capture_stderr() -> Iterator[list[str]]:
    """Redirect file descriptor 2 (where XLA's C++ logging goes) into a buffer; on exit the
    yielded list holds the captured non-empty lines."""
    lines: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield lines
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode("utf-8", errors="replace")
            lines.extend(line.strip() for line in text.splitlines() if line.strip())


def interesting_lines(lines: list[str]) -> tuple[str, ...]:
    """The lines of XLA's captured stderr worth reporting (warnings and errors)."""
    return tuple(line for line in lines if _WARNING_RE.search(line))


# -- the two programs ----------------------------------------------------------------------


def _inputs(plan: Plan, mesh: Mesh) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
    dtype = jnp.dtype(plan.einsum.dtype)
    lhs, rhs = (
        _ShapeDtypeStruct(
            plan.einsum.shape(role), dtype, sharding=named_sharding(mesh, getattr(plan, role))
        )
        for role in ("lhs", "rhs")
    )
    return lhs, rhs


def _einsum(plan: Plan) -> Callable[[jax.Array, jax.Array], jax.Array]:
    equation = plan.einsum.spec.equation
    accum = jnp.dtype(plan.einsum.accum_dtype)

    def local(a: jax.Array, b: jax.Array) -> jax.Array:
        return jnp.einsum(equation, a, b, preferred_element_type=accum)

    return local


def jit_program(plan: Plan, mesh: Mesh | None = None) -> Program:
    """The ``jit`` program and its input ``ShapeDtypeStruct``s: operands pinned at the op,
    output pinned to ``plan.out``; XLA chooses the collectives."""
    mesh = mesh if mesh is not None else jax_mesh(plan.mesh)
    local = _einsum(plan)
    at_lhs = named_sharding(mesh, plan.operation.lhs)
    at_rhs = named_sharding(mesh, plan.operation.rhs)

    def program(a: jax.Array, b: jax.Array) -> jax.Array:
        a = _lax.with_sharding_constraint(a, at_lhs)
        b = _lax.with_sharding_constraint(b, at_rhs)
        return local(a, b)

    fn = jax.jit(program, out_shardings=named_sharding(mesh, plan.out))
    return fn, _inputs(plan, mesh)


def unguided_program(plan: Plan, mesh: Mesh | None = None) -> Program:
    """XLA's own choice: the operands in their stored layouts and the output's layout given,
    nothing pinned at the op (the baseline the plan is judged against)."""
    mesh = mesh if mesh is not None else jax_mesh(plan.mesh)
    fn = jax.jit(_einsum(plan), out_shardings=named_sharding(mesh, plan.out))
    return fn, _inputs(plan, mesh)


def _changed_dims(step: Step) -> tuple[list[int], list[int]]:
    """(dimensions that lost axes, dimensions that gained axes) in this step."""
    lost, gained = [], []
    for d, (before, after) in enumerate(zip(step.before.dims, step.after.dims, strict=True)):
        if len(after) < len(before):
            lost.append(d)
        elif len(after) > len(before):
            gained.append(d)
    return lost, gained


def block_index(axes: tuple[str, ...], axis_size: dict[str, int]) -> jax.Array:
    """This device's linear index over ``axes`` (major first), as a traced scalar."""
    index: Any = jnp.int32(0)
    for axis in axes:
        index = index * axis_size[axis] + _lax.axis_index(axis)
    return cast(jax.Array, index)


def apply_step(x: jax.Array, step: Step, axis_size: dict[str, int]) -> jax.Array:
    """One plan step on this device's block, exactly as the planner defines it (the step's
    layouts say which dimension it gathers, slices or scatters; its operand's name is not
    used, so a program's named tensors replay through the same code)."""
    lost, gained = _changed_dims(step)
    axes = step.axes
    name: str | tuple[str, ...] = axes[0] if len(axes) == 1 else axes
    where = f"step {step.kind.value if step.kind else 'slice'} over {'+'.join(axes)}"
    if step.kind is None:  # a free dynamic slice: take block axis_index of the dimension
        (d,) = gained
        pieces = math.prod(axis_size[a] for a in axes)
        size = x.shape[d] // pieces
        start = block_index(axes, axis_size) * size
        return cast(jax.Array, _lax.dynamic_slice_in_dim(x, start, size, axis=d))
    if step.kind is Collective.ALL_GATHER:
        (d,) = lost
        return cast(jax.Array, _lax.all_gather(x, name, axis=d, tiled=True))
    if step.kind is Collective.ALL_TO_ALL:
        (d,) = lost
        (e,) = gained
        return cast(jax.Array, _lax.all_to_all(x, name, split_axis=e, concat_axis=d, tiled=True))
    if step.kind is Collective.REDUCE_SCATTER:
        (e,) = gained
        return cast(jax.Array, _lax.psum_scatter(x, name, scatter_dimension=e, tiled=True))
    if step.kind is Collective.ALL_REDUCE:
        return cast(jax.Array, _lax.psum(x, name))
    raise ValidationError(f"the shard_map program cannot issue {where}")  # pragma: no cover


def shard_map_program(plan: Plan, mesh: Mesh | None = None) -> Program:
    """The plan as a per-device program: its pre-steps, the local einsum, its post-steps."""
    mesh = mesh if mesh is not None else jax_mesh(plan.mesh)
    axis_size = dict(zip(plan.mesh.axis_names, plan.mesh.shape, strict=True))
    local = _einsum(plan)
    pre = {role: [s for s in plan.steps if s.operand == role] for role in ("lhs", "rhs")}
    post = [s for s in plan.steps if s.operand == "out"]

    def body(a: jax.Array, b: jax.Array) -> jax.Array:
        for step in pre["lhs"]:
            a = apply_step(a, step, axis_size)
        for step in pre["rhs"]:
            b = apply_step(b, step, axis_size)
        c = local(a, b)
        for step in post:
            c = apply_step(c, step, axis_size)
        return c

    mapped = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(partition_spec(plan.lhs), partition_spec(plan.rhs)),
        out_specs=partition_spec(plan.out),
        check_vma=False,  # gathered blocks are "varying" to the checker; the layouts are exact
    )
    return jax.jit(mapped), _inputs(plan, mesh)


# -- compiling (cached) ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class CompiledPlan:
    """Both programs' compiled per-device HLO text and what XLA printed while compiling.
    ``shard_map_text`` is ``None`` when that program was not asked for."""

    jit_text: str
    shard_map_text: str | None
    #: matmul FLOPs per chip of the shard_map program as written (its HLO before XLA's
    #: optimisations, which turn a dot with a contracting size of 1 into a multiply)
    shard_map_written_flops: int | None
    warnings: tuple[str, ...]
    compile_s: float  # seconds spent compiling in this call (0 when both came from the cache)


@dataclass(frozen=True, slots=True)
class _Entry:
    text: str
    warnings: tuple[str, ...]
    written_flops: int


_JIT_CACHE: dict[tuple[Any, ...], _Entry] = {}
_SHARD_MAP_CACHE: dict[tuple[Any, ...], _Entry] = {}
_UNGUIDED_CACHE: dict[tuple[Any, ...], _Entry] = {}
_CACHE_SIZE = 4096  # programs per cache; the oldest go first (a sweep's text is ~10-50 kB each)


def _remember(cache: dict[tuple[Any, ...], _Entry], key: tuple[Any, ...], entry: _Entry) -> None:
    while len(cache) >= _CACHE_SIZE:
        del cache[next(iter(cache))]
    cache[key] = entry


def clear_cache() -> None:
    """Forget every compiled program (the caches live for the process)."""
    _JIT_CACHE.clear()
    _SHARD_MAP_CACHE.clear()
    _UNGUIDED_CACHE.clear()


def _jit_key(plan: Plan) -> tuple[Any, ...]:
    """What the jit program depends on: shapes, dtypes, layouts, and the mesh."""
    einsum = plan.einsum
    return (
        einsum.spec.equation,
        einsum.dims,
        einsum.dtype,
        einsum.accum_dtype,
        plan.lhs.dims,
        plan.rhs.dims,
        plan.out.dims,
        plan.operation.lhs.dims,
        plan.operation.rhs.dims,
        plan.mesh.axis_names,
        plan.mesh.shape,
    )


def _unguided_key(plan: Plan) -> tuple[Any, ...]:
    """The jit key without the layouts at the op: one compile serves every strategy of a
    request (its stored and output layouts)."""
    return _jit_key(plan)[:7] + _jit_key(plan)[9:]


def compile_unguided(plan: Plan) -> tuple[str, tuple[str, ...]]:
    """The compiled text (and XLA's warnings) of ``unguided_program``, cached per request."""
    key = _unguided_key(plan)
    entry = _UNGUIDED_CACHE.get(key)
    if entry is None:
        try:
            entry = _compile(unguided_program(plan))
        except ValidationError as exc:
            raise ValidationError(
                f"XLA could not compile the unguided program of {plan.einsum.spec.equation} "
                f"on {plan.mesh}: {exc}"
            ) from exc
        _remember(_UNGUIDED_CACHE, key, entry)
    return entry.text, entry.warnings


def _shard_map_key(plan: Plan) -> tuple[Any, ...]:
    """The jit key plus the steps the shard_map program issues."""
    steps = tuple((s.operand, s.kind, s.axes, s.before.dims, s.after.dims) for s in plan.steps)
    return (*_jit_key(plan), steps)


def _compile(program: Program) -> _Entry:
    fn, args = program
    with capture_stderr() as lines:
        try:
            lowered = fn.lower(*args)
            written = dot_flops(str(lowered.as_text(dialect="hlo")))
            text = str(lowered.compile().as_text())
        except Exception as exc:  # JAX and XLA raise many types; wrap them with the context
            raise ValidationError(f"{type(exc).__name__}: {exc}") from exc
    return _Entry(text=text, warnings=interesting_lines(lines), written_flops=written)


def compile_plan(plan: Plan, *, with_shard_map: bool = True) -> CompiledPlan:
    """Compile ``plan``'s programs from ``ShapeDtypeStruct``s (no data). Compiled text is
    cached for the process by shapes, dtypes, layouts, steps and mesh."""
    start = time.perf_counter()
    mesh = None
    jit_key = _jit_key(plan)
    jit = _JIT_CACHE.get(jit_key)
    if jit is None:
        mesh = jax_mesh(plan.mesh)
        try:
            jit = _compile(jit_program(plan, mesh))
        except ValidationError as exc:
            raise ValidationError(
                f"XLA could not compile the jit program of {plan.strategy} on {plan.mesh}: {exc}"
            ) from exc
        _remember(_JIT_CACHE, jit_key, jit)
    warnings = jit.warnings
    shard_map = None
    if with_shard_map:
        sm_key = _shard_map_key(plan)
        shard_map = _SHARD_MAP_CACHE.get(sm_key)
        if shard_map is None:
            mesh = mesh if mesh is not None else jax_mesh(plan.mesh)
            try:
                shard_map = _compile(shard_map_program(plan, mesh))
            except ValidationError as exc:
                raise ValidationError(
                    f"the shard_map program of {plan.strategy} on {plan.mesh} does not compile "
                    f"(a plan step JAX cannot express: a planner or validator bug): {exc}"
                ) from exc
            _remember(_SHARD_MAP_CACHE, sm_key, shard_map)
        warnings += tuple(f"shard_map: {w}" for w in shard_map.warnings)
    return CompiledPlan(
        jit_text=jit.text,
        shard_map_text=None if shard_map is None else shard_map.text,
        shard_map_written_flops=None if shard_map is None else shard_map.written_flops,
        warnings=warnings,
        compile_s=time.perf_counter() - start if mesh is not None else 0.0,
    )


# -- executing -------------------------------------------------------------------------------

#: Relative error allowed per output element, against ``einsum(|A|, |B|)`` (the scale of the
#: rounding of each product and partial sum): a few units in the last place of the dtype the
#: result is accumulated and stored in.
_RTOL = {
    "float64": 1e-12,
    "float32": 1e-5,
    "float16": 4e-3,
    "bfloat16": 3e-2,
    "float8_e4m3fn": 2.5e-1,
    "float8_e5m2": 5e-1,
    "int32": 0.0,
    "int8": 0.0,
}


def tolerance(plan: Plan) -> float:
    """The relative tolerance of ``plan``'s result (by its accumulation and input dtypes)."""
    return max(_RTOL.get(plan.einsum.accum_dtype, 3e-2), _RTOL.get(plan.einsum.dtype, 0.0) / 8)


@dataclass(frozen=True, slots=True, kw_only=True)
class Execution:
    """Both programs run on random data and compared with numpy."""

    max_abs_error: float  # the worse of the two programs, in output units
    jit_max_abs_error: float
    shard_map_max_abs_error: float
    jit_max_rel_error: float  # max |err| / einsum(|A|, |B|)
    shard_map_max_rel_error: float
    tolerance: float
    jit_sharding_ok: bool
    shard_map_sharding_ok: bool
    run_s: float

    @property
    def max_rel_error(self) -> float:
        return max(self.jit_max_rel_error, self.shard_map_max_rel_error)

    @property
    def shard_map_ok(self) -> bool:
        """The plan's own program is right: numbers within tolerance, output layout."""
        return self.shard_map_max_rel_error <= self.tolerance and self.shard_map_sharding_ok

    @property
    def jit_ok(self) -> bool:
        return self.jit_max_rel_error <= self.tolerance and self.jit_sharding_ok

    @property
    def ok(self) -> bool:
        return self.shard_map_ok and self.jit_ok


def _random(shape: tuple[int, ...], dtype: str, rng: np.random.Generator) -> np.ndarray:
    if dtype.startswith("int"):
        return rng.integers(-4, 5, size=shape).astype(dtype)
    return np.asarray(rng.standard_normal(shape), dtype=jnp.dtype(dtype))


def execute_plan(plan: Plan, *, seed: int = 0) -> Execution:
    """Run both programs on random data in the stored layouts; compare with numpy's einsum
    (float64 on the same rounded inputs) and check the output layout is ``plan.out``."""
    mesh = jax_mesh(plan.mesh)
    rng = np.random.default_rng(seed)
    a = _random(plan.einsum.shape("lhs"), plan.einsum.dtype, rng)
    b = _random(plan.einsum.shape("rhs"), plan.einsum.dtype, rng)
    equation = plan.einsum.spec.equation
    accum = np.dtype(jnp.dtype(plan.einsum.accum_dtype))
    if np.issubdtype(accum, np.integer):
        # XLA accumulates an integer dot in the accumulation dtype and wraps (two's
        # complement): compute exactly, then wrap to that dtype; integers compare exactly
        exact = np.einsum(equation, a.astype(np.int64), b.astype(np.int64))
        want = exact.astype(accum).astype(np.float64)
        scale = np.ones_like(want)
    else:
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        want = np.einsum(equation, a64, b64)
        scale = np.einsum(equation, np.abs(a64), np.abs(b64))
    expected = named_sharding(mesh, plan.out)
    start = time.perf_counter()
    args = (
        jax.device_put(a, named_sharding(mesh, plan.lhs)),
        jax.device_put(b, named_sharding(mesh, plan.rhs)),
    )
    errors: dict[str, tuple[float, float, bool]] = {}
    with capture_stderr():
        for name, build in (("jit", jit_program), ("shard_map", shard_map_program)):
            fn, _ = build(plan, mesh)
            try:
                got_array = fn(*args)
                got = np.asarray(got_array, dtype=np.float64)
            except Exception as exc:
                raise ValidationError(
                    f"running the {name} program of {plan.strategy} on {plan.mesh} failed: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            diff = np.abs(got - want)
            rel = float(np.max(diff / np.maximum(scale, np.finfo(np.float64).tiny)))
            sharding = got_array.sharding
            same = isinstance(sharding, NamedSharding) and sharding.is_equivalent_to(
                expected, len(plan.einsum.shape("out"))
            )
            errors[name] = (float(np.max(diff)) if diff.size else 0.0, rel, bool(same))
    return Execution(
        max_abs_error=max(e[0] for e in errors.values()),
        jit_max_abs_error=errors["jit"][0],
        shard_map_max_abs_error=errors["shard_map"][0],
        jit_max_rel_error=errors["jit"][1],
        shard_map_max_rel_error=errors["shard_map"][1],
        tolerance=tolerance(plan),
        jit_sharding_ok=errors["jit"][2],
        shard_map_sharding_ok=errors["shard_map"][2],
        run_s=time.perf_counter() - start,
    )
