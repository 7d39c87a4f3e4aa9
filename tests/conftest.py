"""Test setup. JAX's simulated CPU device count must be fixed before anything touches a
JAX backend, so it is set here, first: one process with the largest count any test needs
(256, for the 16x16 validation); smaller meshes take ``jax.devices()[:n]``."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

NUM_SIMULATED_DEVICES = int(os.environ.get("SR_NUM_CPU_DEVICES", "256"))
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # no TPU/GPU plugin probing on CI

#: Set to 1 to run the suite without the test extras (JAX): the ~100 validator tests skip.
#: Without it, a missing or broken JAX install is an error, not a silent skip.
ALLOW_NO_JAX = os.environ.get("SR_ALLOW_NO_JAX", "") == "1"

try:
    import jax
    import nbclient  # noqa: F401  (the notebook tests)
    import nbformat  # noqa: F401
except ImportError as exc:  # pragma: no cover - the core tests run without JAX
    if not ALLOW_NO_JAX:
        raise pytest.UsageError(
            f"the test extras (JAX, nbclient) do not import: {exc}. Install them with "
            "pip install -e '.[test]' (make setup), or set SR_ALLOW_NO_JAX=1 to run only the "
            "tests that need no JAX"
        ) from exc
    jax = None
else:
    jax.config.update("jax_num_cpu_devices", NUM_SIMULATED_DEVICES)

# Deterministic property tests: CI and every developer see the same examples.
settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "devices(n): needs n simulated JAX devices")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    have: int | None = None
    for item in items:
        marker = item.get_closest_marker("devices")
        if marker is None:
            continue
        if jax is None:
            item.add_marker(pytest.mark.skip(reason="JAX is not installed"))
            continue
        have = have if have is not None else jax.device_count()
        if have < marker.args[0]:
            item.add_marker(
                pytest.mark.skip(reason=f"needs {marker.args[0]} simulated devices, have {have}")
            )
