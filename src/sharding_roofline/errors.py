"""The one exception hierarchy of sharding_roofline.

Every error says what is wrong, the offending value, the context and the fix. The CLI
prints these without a traceback and exits 1; anything else escaping is a bug.
"""

from __future__ import annotations


class ShardingRooflineError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(ShardingRooflineError, ValueError):
    """A hardware preset or experiment config file is malformed (names the file and key)."""


class UnknownNameError(ShardingRooflineError, LookupError):
    """A name (preset, dtype, mesh axis, collective) is not one we know; lists the valid ones."""


class TopologyError(ShardingRooflineError, ValueError):
    """A topology or mesh does not fit the hardware (size, shape, divisibility)."""


class SpecError(ShardingRooflineError, ValueError):
    """An einsum, a sharding spec or a shape is malformed or does not fit the mesh."""


class PlanError(ShardingRooflineError, ValueError):
    """No valid strategy exists for the request (every candidate was rejected)."""


class ValidationError(ShardingRooflineError, RuntimeError):
    """The XLA validator could not compile, run or read a program."""


class OutputError(ShardingRooflineError, ValueError):
    """An output path cannot be written as asked (format, directory, existing file)."""
