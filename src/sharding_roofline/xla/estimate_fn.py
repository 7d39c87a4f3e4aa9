"""Estimate any jitted JAX function on a target chip from the program XLA compiles for it.

:func:`estimate_jitted` compiles ``fn`` for as many simulated CPU devices as the target
mesh has (nothing runs), walks the compiled per-device program (:mod:`.hlo.walk`), costs
every op on the target (:mod:`.hlo_cost`) and puts the compiler's own ``memory_analysis()``
and ``cost_analysis()`` beside ours. Unlike those two (and ``jax.experimental.roofline``),
a ``lax.scan`` body counts once per iteration.

Logical types: the CPU backend widens bf16 to f32 (jax_notes.md section 3.4). The walk
undoes that by rule (:mod:`.hlo.logical`), and the collectives take their types from the
module dumped right after SPMD partitioning in the same compile (matched by channel id).

The simulated device count is fixed when JAX's backend starts, so call this before any JAX
operation in the process, or start the process with enough devices
(``JAX_NUM_CPU_DEVICES``); :func:`.devices.ensure_devices` explains the fix otherwise.
"""

from __future__ import annotations

import contextlib
import glob
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec, Sharding

from sharding_roofline.errors import ShardingRooflineError, SpecError, ValidationError
from sharding_roofline.mesh import DeviceMesh
from sharding_roofline.presets import load_preset
from sharding_roofline.sharding import ShardingSpec

from .devices import ensure_devices, jax_mesh, partition_spec
from .hlo.walk import collective_hints_from
from .hlo_cost import ProgramEstimate, estimate_hlo

# untyped JAX constructors (mypy --strict sees them as Any here)
_SDS: Any = jax.ShapeDtypeStruct
_P: Any = PartitionSpec

__all__ = ["compile_for_mesh", "estimate_jitted", "to_target_mesh"]

_SHARDING_HELP = (
    "a PartitionSpec string like 'x,None' (x+y for two axes on one dimension), a "
    "jax.sharding.PartitionSpec, a NamedSharding, or None (replicated)"
)


def to_target_mesh(
    mesh: DeviceMesh | str,
    hardware: Any = None,
    topology: str | tuple[int, ...] | None = None,
    *,
    num_slices: int = 1,
) -> DeviceMesh:
    """Our mesh from a ``DeviceMesh`` or ``"x=4,y=4"`` plus a hardware preset (name, path
    or ``HardwareSpec``)."""
    if isinstance(mesh, DeviceMesh):
        return mesh
    if hardware is None:
        raise SpecError(
            f"mesh {mesh!r} is given as text, so the hardware is needed too: pass "
            "hardware='tpu-v5p' (a preset name or .toml path), or a DeviceMesh"
        )
    spec = load_preset(str(hardware)) if isinstance(hardware, str | os.PathLike) else hardware
    return DeviceMesh.create(spec, mesh, topology, num_slices=num_slices)


def _leaf_rank(arg: Any) -> int | None:
    shape = getattr(arg, "shape", None)
    return len(shape) if shape is not None else None


def _one_sharding(spec: Any, jmesh: Any, arg: Any, what: str, mesh: DeviceMesh) -> Any:
    if isinstance(spec, Sharding):
        return spec
    if spec is None or isinstance(spec, str | PartitionSpec | list | tuple):
        rank = _leaf_rank(arg)
        parsed = ShardingSpec.parse(spec, rank=rank)
        shape = getattr(arg, "shape", None)
        if shape is not None:
            parsed.check(
                shape=tuple(shape), axis_size={a.name: a.size for a in mesh.axes}, what=what
            )
        return NamedSharding(jmesh, partition_spec(parsed))
    raise SpecError(f"{what}: cannot read the sharding {spec!r}; give {_SHARDING_HELP}")


def _shardings(
    specs: Any, args: Sequence[Any], jmesh: Any, mesh: DeviceMesh, what: str
) -> tuple[Any, ...]:
    """One sharding per positional argument (a pytree argument takes one for all leaves)."""
    if isinstance(specs, str | PartitionSpec | Sharding) or specs is None:
        specs = (specs,) * len(args) if len(args) != 1 or specs is None else (specs,)
    specs = tuple(specs)
    if len(specs) != len(args):
        raise SpecError(
            f"{what} has {len(specs)} entries but the function gets {len(args)} arguments; "
            f"give one per argument ({_SHARDING_HELP})"
        )
    out = []
    for k, (spec, arg) in enumerate(zip(specs, args, strict=True)):
        leaves = jax.tree_util.tree_leaves(arg)
        if len(leaves) == 1 and leaves[0] is arg:
            out.append(_one_sharding(spec, jmesh, arg, f"{what}[{k}]", mesh))
        elif spec is None or isinstance(spec, str | PartitionSpec | Sharding):
            out.append(
                jax.tree_util.tree_map(
                    lambda leaf, s=spec, k=k: _one_sharding(s, jmesh, leaf, f"{what}[{k}]", mesh),
                    arg,
                )
            )
        else:
            out.append(
                jax.tree_util.tree_map(
                    lambda s, leaf, k=k: _one_sharding(s, jmesh, leaf, f"{what}[{k}]", mesh),
                    spec,
                    arg,
                    is_leaf=lambda x: x is None or isinstance(x, str | PartitionSpec | Sharding),
                )
            )
    return tuple(out)


def _abstract(arg: Any) -> Any:
    """An array or ``ShapeDtypeStruct`` as a plain ``ShapeDtypeStruct`` (no data, no
    sharding: the jit's ``in_shardings`` place it)."""

    def one(x: Any) -> Any:
        if hasattr(x, "shape") and hasattr(x, "dtype"):
            return _SDS(tuple(x.shape), x.dtype)
        return x

    return jax.tree_util.tree_map(one, arg)


def _own_sharding(arg: Any, jmesh: Any) -> Any:
    """An argument's own NamedSharding when it is on a mesh of the target's size, else
    replicated on the target mesh."""

    def one(x: Any) -> Any:
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh.size == jmesh.size:
            return NamedSharding(jmesh, sharding.spec)
        return NamedSharding(jmesh, _P())

    return jax.tree_util.tree_map(one, arg)


def _jax_failure(exc: Exception, name: str, fix: str) -> ValidationError:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    first = lines[0] if lines else ""
    return ValidationError(
        f"JAX could not compile {name}: {type(exc).__name__}: {first[:400]}. {fix}"
    )


def compile_for_mesh(
    fn: Callable[..., Any],
    *args: Any,
    mesh: DeviceMesh,
    in_shardings: Any = None,
    out_shardings: Any = None,
    static_argnums: int | Sequence[int] = (),
) -> tuple[Any, str]:
    """Compile ``fn`` on ``mesh.num_devices`` simulated CPU devices: the compiled object and
    the module text right after SPMD partitioning (logical types), or ``""``."""
    ensure_devices(mesh.num_devices)
    jmesh = jax_mesh(mesh)
    static = (static_argnums,) if isinstance(static_argnums, int) else tuple(static_argnums)
    dynamic = [a for k, a in enumerate(args) if k not in static]
    if in_shardings is None:
        ins: Any = tuple(_own_sharding(a, jmesh) for a in dynamic)
    else:
        ins = _shardings(in_shardings, dynamic, jmesh, mesh, "in_shardings")
    kwargs: dict[str, Any] = {"in_shardings": ins, "static_argnums": static}
    if out_shardings is not None:
        if isinstance(out_shardings, str | PartitionSpec | Sharding):
            kwargs["out_shardings"] = _one_sharding(
                out_shardings, jmesh, None, "out_shardings", mesh
            )
        else:
            kwargs["out_shardings"] = jax.tree_util.tree_map(
                lambda s: _one_sharding(s, jmesh, None, "out_shardings", mesh),
                out_shardings,
                is_leaf=lambda x: x is None or isinstance(x, str | PartitionSpec | Sharding),
            )
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
    abstract = [a if k in static else _abstract(a) for k, a in enumerate(args)]
    try:
        lowered = jax.jit(fn, **kwargs).lower(*abstract)
    except ShardingRooflineError:
        raise
    except Exception as exc:
        raise _jax_failure(
            exc,
            name,
            "Check that the arguments' shapes and dtypes are what the function expects and "
            "that each sharding fits its argument",
        ) from None
    with tempfile.TemporaryDirectory(prefix="sr-hlo-") as dump:
        try:
            compiled = lowered.compile(
                compiler_options={
                    "xla_dump_to": dump,
                    "xla_dump_hlo_pass_re": "spmd-partitioning",
                }
            )
        except Exception as exc:
            raise _jax_failure(exc, name, "XLA rejected the program on this mesh") from None
        spmd = ""
        found = sorted(glob.glob(os.path.join(dump, "*after_spmd-partitioning*.txt")))
        if found:
            with contextlib.suppress(OSError), open(found[-1]) as handle:
                spmd = handle.read()
    return compiled, spmd


def _compiler_memory(compiled: Any) -> dict[str, int] | None:
    try:
        stats = compiled.memory_analysis()
    except Exception:
        return None
    if stats is None:
        return None
    keys = (
        "argument_size_in_bytes",
        "output_size_in_bytes",
        "alias_size_in_bytes",
        "temp_size_in_bytes",
        "peak_memory_in_bytes",
    )
    out = {k: int(getattr(stats, k, 0) or 0) for k in keys}
    out["footprint_bytes"] = (
        out["argument_size_in_bytes"]
        + out["output_size_in_bytes"]
        + out["temp_size_in_bytes"]
        - out["alias_size_in_bytes"]
    )
    return out


def _compiler_cost(compiled: Any) -> dict[str, float] | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:
        return None
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    if not isinstance(cost, dict):
        return None
    return {k: float(cost[k]) for k in ("flops", "bytes accessed", "transcendentals") if k in cost}


def estimate_jitted(
    fn: Callable[..., Any],
    *args: Any,
    mesh: DeviceMesh | str,
    hardware: Any = None,
    topology: str | tuple[int, ...] | None = None,
    num_slices: int = 1,
    in_shardings: Any = None,
    out_shardings: Any = None,
    static_argnums: int | Sequence[int] = (),
) -> ProgramEstimate:
    """Estimate ``fn(*args)`` per step and per chip on the target mesh.

    ``args``: arrays or ``jax.ShapeDtypeStruct``s (pytrees of them), never executed.
    ``mesh``: a :class:`DeviceMesh`, or ``"x=4,y=4"`` with ``hardware`` (a preset name,
    a .toml path or a ``HardwareSpec``) and optionally ``topology``. ``in_shardings``: one
    per positional argument (``"x,None"``, ``PartitionSpec``, ``NamedSharding``, ``None``
    for replicated); without it each argument keeps its own ``NamedSharding`` (or is
    replicated). ``out_shardings``: likewise, or ``None`` to let XLA choose.

    Returns a :class:`~.hlo_cost.ProgramEstimate`: ``.ops`` (per-op table),
    ``.collectives``, ``.uncosted``, the totals and bounds, ``.walk.memory`` beside
    ``.compiler_memory``, and ``.as_dict()`` (the ``estimate-fn --json`` object).
    """
    target = to_target_mesh(mesh, hardware, topology, num_slices=num_slices)
    compiled, spmd = compile_for_mesh(
        fn,
        *args,
        mesh=target,
        in_shardings=in_shardings,
        out_shardings=out_shardings,
        static_argnums=static_argnums,
    )
    text = compiled.as_text()
    hints = collective_hints_from(spmd) if spmd else None
    name = getattr(fn, "__module__", "") + ":" + (getattr(fn, "__qualname__", "") or "")
    estimate = estimate_hlo(
        text, target, cpu_upcast=True, collective_hints=hints, source=name.strip(":")
    )
    return replace(
        estimate,
        compiler_memory=_compiler_memory(compiled),
        compiler_cost=_compiler_cost(compiled),
    )
