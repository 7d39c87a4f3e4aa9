"""Simulated CPU devices, and our ``DeviceMesh`` as a ``jax.sharding.Mesh``.

JAX fixes the number of simulated CPU devices when its backend starts (the first JAX
operation); later changes raise. So :func:`ensure_devices` asks for enough devices *before*
that, and explains the fix when it is too late. One process should ask for the largest count
it needs; smaller meshes take the first ``n`` of ``jax.devices("cpu")`` (jax_notes.md §1).

Meshes use ``AxisType.Auto`` axes: every layout is pinned by the validator itself, and XLA's
SPMD partitioner picks the collectives (Explicit axes, ``jax.make_mesh``'s default in 0.10.2,
would reject some of the book's layouts at trace time instead; jax_notes.md §2).
"""

from __future__ import annotations

import os
import re
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the validator only needs CPU devices

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from sharding_roofline.errors import ValidationError
from sharding_roofline.limits import MAX_SIMULATED_DEVICES
from sharding_roofline.mesh import DeviceMesh
from sharding_roofline.sharding import ShardingSpec

# jax's config and PartitionSpec constructor are untyped; mypy --strict sees them as Any here.
_config: Any = jax.config
_P: Any = PartitionSpec

__all__ = [
    "backend_started",
    "ensure_devices",
    "jax_mesh",
    "named_sharding",
    "num_simulated_devices",
    "partition_spec",
]

_FLAG_RE = re.compile(r"--xla_force_host_platform_device_count=(\d+)")


def backend_started() -> bool:
    """Whether JAX's backends are up (after which the device count is fixed)."""
    from jax._src import xla_bridge  # noqa: PLC0415  (private, but the only way to ask)

    return bool(xla_bridge.backends_are_initialized())


def _configured_count() -> int:
    """The CPU device count JAX will start with: the config, else ``XLA_FLAGS``, else 1."""
    configured = int(_config.jax_num_cpu_devices)
    if configured > 0:
        return configured
    match = _FLAG_RE.search(os.environ.get("XLA_FLAGS", ""))
    return int(match.group(1)) if match else 1


def num_simulated_devices() -> int:
    """CPU devices available now (or that JAX will start with, if it has not started)."""
    if backend_started():
        return len(jax.devices("cpu"))
    return _configured_count()


def ensure_devices(n: int) -> int:
    """Make sure at least ``n`` simulated CPU devices exist; return how many there are.

    Before JAX's backend starts this raises the configured count to ``n`` (never lowers
    it). After, it only checks, and raises ``ValidationError`` with the fix.
    """
    if n < 1:
        raise ValidationError(f"the validator needs at least one device, asked for {n}")
    if n > MAX_SIMULATED_DEVICES:
        raise ValidationError(
            f"{n} simulated CPU devices are more than the {MAX_SIMULATED_DEVICES} the validator "
            "starts (XLA's CPU client aborts or hangs well before 20000); validate a smaller "
            f"mesh of the same shape, at most {MAX_SIMULATED_DEVICES} devices"
        )
    if not backend_started():
        have = _configured_count()
        if have < n:
            _config.update("jax_num_cpu_devices", n)
            have = n
        return have
    have = len(jax.devices("cpu"))
    if have < n:
        raise ValidationError(
            f"the validator needs {n} simulated CPU devices but JAX already started with "
            f"{have}, and the count is fixed once a JAX operation has run. Set "
            f"JAX_NUM_CPU_DEVICES={n} in the environment (or call "
            f"sharding_roofline.xla.devices.ensure_devices({n}) right after importing JAX, "
            "before any JAX operation), or pass --devices with the largest mesh you will "
            "validate in this process"
        )
    return have


def jax_mesh(mesh: DeviceMesh) -> Mesh:
    """Our mesh as a JAX ``Mesh`` over the first ``num_devices`` simulated CPU devices, with
    the same axis names and order (major to minor) and Auto axis types."""
    ensure_devices(mesh.num_devices)
    devices = np.array(jax.devices("cpu")[: mesh.num_devices]).reshape(mesh.shape)
    return Mesh(devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.shape))


def partition_spec(spec: ShardingSpec) -> PartitionSpec:
    """``ShardingSpec`` -> ``PartitionSpec``: ``x+y,None`` -> ``P(('x', 'y'), None)``."""
    entries: list[str | tuple[str, ...] | None] = []
    for dim in spec.dims:
        if not dim:
            entries.append(None)
        elif len(dim) == 1:
            entries.append(dim[0])
        else:
            entries.append(tuple(dim))
    spec_: PartitionSpec = _P(*entries)
    return spec_


def named_sharding(mesh: Mesh, spec: ShardingSpec) -> NamedSharding:
    return NamedSharding(mesh, partition_spec(spec))
