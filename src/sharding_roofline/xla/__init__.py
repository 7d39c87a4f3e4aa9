"""The validator (compile on simulated devices, read the collectives, compare with the plan)
and the estimator of any jitted function (:func:`estimate_jitted`).

The only part of sharding_roofline that imports JAX; the hlo package itself is pure text.
Importing this package does not import JAX: ``estimate_jitted`` loads on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["estimate_jitted"]


def __getattr__(name: str) -> Any:
    if name == "estimate_jitted":
        from .estimate_fn import estimate_jitted  # noqa: PLC0415 (imports JAX)

        return estimate_jitted
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
