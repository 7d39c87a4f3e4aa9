"""The one exception hierarchy of sharding_roofline.

Every error says what is wrong, the offending value, the context and the fix. The CLI
prints these without a traceback and exits 1; anything else escaping is a bug.
"""

from __future__ import annotations

import re

#: Words a message's fix starts with ("...; pad D to a multiple of 4").
_FIX_VERBS = (
    "add", "choose", "copy", "give", "leave", "make", "pad", "pass", "put", "quote", "raise",
    "reduce", "remove", "run", "set", "shard", "split", "try", "use", "write", "fix", "see",
    "start", "drop", "name", "list", "lower", "shorten", "rename",
)  # fmt: skip


class ShardingRooflineError(Exception):
    """Base class of every error this package raises on purpose. ``fix`` says how to fix
    it: given explicitly, or the message's last clause that reads as an instruction."""

    def __init__(self, message: str = "", *, fix: str = "") -> None:
        super().__init__(message)
        self._fix: str = fix

    @property
    def fix(self) -> str:
        if self._fix:
            return self._fix
        return fix_of(str(self))


def fix_of(message: str) -> str:
    """The instruction in an error message: its last clause (after ``;`` or ``.``) that
    starts with a verb such as use, pass, pad, give, write; empty if none does."""
    clauses = [str(c).strip() for c in re.split(r"(?<=[.;])\s+|;\s*", message) if c and c.strip()]
    for clause in reversed(clauses):
        first = clause.split(" ", 1)[0].lower().strip("(\"'")
        if first in _FIX_VERBS or first.rstrip(",") in ("or", "e.g"):
            return clause.rstrip(".;")
    return ""


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
