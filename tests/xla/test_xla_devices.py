"""Simulated devices and meshes: the count is fixed when JAX starts; meshes keep our axes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

jax = pytest.importorskip("jax")

from jax.sharding import AxisType, PartitionSpec  # noqa: E402

import sharding_roofline  # noqa: E402
from sharding_roofline.errors import ValidationError  # noqa: E402
from sharding_roofline.mesh import DeviceMesh  # noqa: E402
from sharding_roofline.presets import load_preset  # noqa: E402
from sharding_roofline.sharding import ShardingSpec  # noqa: E402
from sharding_roofline.xla.devices import (  # noqa: E402
    ensure_devices,
    jax_mesh,
    named_sharding,
    num_simulated_devices,
    partition_spec,
)

pytestmark = pytest.mark.jax

SRC = str(Path(sharding_roofline.__file__).resolve().parents[1])


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (its own JAX backend), with only ``env`` set."""
    clean = {k: v for k, v in os.environ.items() if k not in ("JAX_NUM_CPU_DEVICES", "XLA_FLAGS")}
    clean.update(PYTHONPATH=SRC, JAX_PLATFORMS="cpu", **env)
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=clean,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("x,None", PartitionSpec("x", None), id="one-axis"),
        pytest.param("x+y,None", PartitionSpec(("x", "y"), None), id="two-axes-one-dim"),
        pytest.param("y,x", PartitionSpec("y", "x"), id="transposed"),
        pytest.param("None,None", PartitionSpec(None, None), id="replicated"),
    ],
)
def test_partition_spec(text: str, expected: PartitionSpec) -> None:
    # compare as P objects: P('x', None) != ('x', None) since jax 0.10
    assert partition_spec(ShardingSpec.parse(text)) == expected


def test_jax_mesh_keeps_axis_names_order_and_auto_types() -> None:
    mesh = DeviceMesh.create(load_preset("tpu-v5e"), "x=2,y=4")
    jmesh = jax_mesh(mesh)
    assert jmesh.axis_names == ("x", "y")
    assert dict(jmesh.shape) == {"x": 2, "y": 4}
    assert jmesh.axis_types == (AxisType.Auto, AxisType.Auto)
    assert list(jmesh.devices.flat) == jax.devices("cpu")[:8]
    sharding = named_sharding(jmesh, ShardingSpec.parse("x+y,None"))
    assert sharding.spec == PartitionSpec(("x", "y"), None)


def test_ensure_devices_when_enough_are_running() -> None:
    have = num_simulated_devices()
    assert have >= 8
    assert ensure_devices(8) == have


def test_ensure_devices_explains_the_fix_once_jax_has_started() -> None:
    jax.devices("cpu")  # the backend is up in this process
    with pytest.raises(ValidationError, match=r"JAX_NUM_CPU_DEVICES=4096 .*before any JAX"):
        ensure_devices(4096)  # the most the validator starts; more than this process has


def test_ensure_devices_refuses_more_than_it_can_simulate() -> None:
    """``validate --devices 20000`` aborted or hung XLA's CPU client: refused with the limit."""
    with pytest.raises(
        ValidationError, match=r"20000 simulated CPU devices are more than the 4096"
    ):
        ensure_devices(20_000)


def test_ensure_devices_rejects_zero() -> None:
    with pytest.raises(ValidationError, match="at least one device"):
        ensure_devices(0)


def test_ensure_devices_before_jax_starts_sets_the_count() -> None:
    code = (
        "from sharding_roofline.xla.devices import ensure_devices\n"
        "import jax\n"
        "print(ensure_devices(12), len(jax.devices('cpu')))\n"
    )
    result = _python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["12", "12"]


def test_ensure_devices_never_lowers_a_larger_count() -> None:
    code = (
        "from sharding_roofline.xla.devices import ensure_devices\n"
        "import jax\n"
        "print(ensure_devices(4), len(jax.devices('cpu')))\n"
    )
    result = _python(code, JAX_NUM_CPU_DEVICES="16")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["16", "16"]


def test_ensure_devices_after_a_jax_operation_says_how_to_fix_it() -> None:
    code = (
        "import jax.numpy as jnp\n"
        "jnp.ones(3).block_until_ready()\n"
        "from sharding_roofline.xla.devices import ensure_devices\n"
        "ensure_devices(12)\n"
    )
    result = _python(code)
    assert result.returncode != 0
    assert "needs 12 simulated CPU devices but JAX already started with 1" in result.stderr
    assert "JAX_NUM_CPU_DEVICES=12" in result.stderr


def test_importing_the_package_and_the_cli_helpers_does_not_import_jax() -> None:
    # the main CLI builds every parser with add_validate_arguments: no JAX start-up cost
    code = (
        "import sys, sharding_roofline, sharding_roofline.xla.hlo\n"
        "from sharding_roofline.xla.cli import add_validate_arguments\n"
        "sys.exit('jax' in sys.modules)\n"
    )
    assert _python(code).returncode == 0
