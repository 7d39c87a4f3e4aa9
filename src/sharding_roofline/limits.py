"""The bounds every number a user gives must fall within, and the checks that enforce them.

A number outside these ranges is a typo or a unit slip (bytes typed as GB/s, seconds as us),
or it would make the arithmetic meaningless (a bandwidth so small that every time underflows,
a size so large that a FLOP count overflows a float). Each bound is wide: an order of
magnitude or more beyond any real machine on either side.

| quantity | range | why |
| --- | --- | --- |
| bandwidth | 1e3 .. 1e16 B/s | 1 kB/s to 10 PB/s per link or chip (HBM today: ~1e13) |
| FLOP rate | 1e6 .. 1e19 FLOP/s | 1 MFLOP/s to 10 EFLOP/s per chip (today: ~1e16) |
| latency | 1e-12 .. 1 s | 1 ps to 1 s per hop or step (today: ~1e-6) |
| capacity | 1e6 .. 1e15 B | 1 MB to 1 PB per chip (today: ~2e11) |
| one array dimension / einsum letter | 1 .. 2**40 | a tera-element dimension; floats stay exact |
| elements of one array | <= 2**62 | what a 64-bit index addresses |
| array rank (``collective --shape``) | <= 8 | far beyond real collectives' arrays |
| mesh axes of size > 1 | <= 6 | the planner tries (letters + 1) ** axes assignments |
| simulated devices (``validate``) | <= 4096 | XLA's CPU client aborts or hangs beyond |
| config and preset files | <= 1 MiB, regular files | a config is a few kB; not /dev/zero |
"""

from __future__ import annotations

import math
import re
from typing import Any

from .errors import ShardingRooflineError

BANDWIDTH_BYTES_PER_S = (1e3, 1e16)
FLOPS_PER_S = (1e6, 1e19)
LATENCY_S = (1e-12, 1.0)
CAPACITY_BYTES = (1e6, 1e15)
MAX_DIM_SIZE = 2**40
MAX_ARRAY_ELEMENTS = 2**62
MAX_RANK = 8
MAX_MESH_AXES = 6
MAX_SIMULATED_DEVICES = 4096
MAX_CONFIG_BYTES = 1024**2

_COUNT = re.compile(r"^[0-9][0-9_]*$")


def shown(value: Any, most: int = 24) -> str:
    """``repr(value)``, cut short (a 400-digit integer prints as its first digits)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**most:
        return f"{str(value)[:12]}... ({len(str(abs(value)))} digits)"
    text = repr(value)
    return text if len(text) <= most else f"{text[: most - 3]}..."


def check_number(
    value: Any,
    *,
    what: str,
    bounds: tuple[float, float],
    unit: str,
    example: str,
    error: type[ShardingRooflineError],
) -> float:
    """``value`` as a float if it is a finite real number within ``bounds``; else ``error``
    naming ``what``, the value, the range and an example of a right one."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if number:
        try:
            as_float = float(value)
        except OverflowError:  # an integer too large for a float
            as_float = math.inf
    if not number or not math.isfinite(as_float):
        raise error(
            f"{what} must be a finite number of {unit} between {bounds[0]:g} and {bounds[1]:g}, "
            f"got {shown(value)}; write e.g. {example}"
        )
    low, high = bounds
    if not low <= as_float <= high:
        raise error(
            f"{what} = {as_float:g} {unit} is outside the physical range {low:g} to {high:g} "
            f"{unit} (a unit slip?); write it in {unit}, e.g. {example}"
        )
    return as_float


def check_count(
    value: Any, *, what: str, most: int, error: type[ShardingRooflineError], least: int = 1
) -> int:
    """``value`` if it is an integer (not a bool, not a float) in ``least .. most``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise error(f"{what} must be a whole number, got {value!r}; write e.g. {least}")
    if not least <= value <= most:
        raise error(
            f"{what} = {shown(value)} is outside {least} to {most}; use a value in that range"
        )
    return value


def parse_count(text: str, *, what: str, most: int, error: type[ShardingRooflineError]) -> int:
    """A whole number typed by a user: ASCII digits, ``_`` allowed between them (``8_192``).
    Rejects what ``str.isdigit`` would let through (``²``, other scripts' digits), signs,
    and sizes beyond ``most`` (checked on the digits, before any arithmetic)."""
    body = text.strip()
    if not _COUNT.match(body) or body.endswith("_"):
        raise error(
            f"{what} {text!r} is not a whole number; write ASCII digits like 8192 (or 8_192)"
        )
    digits = body.replace("_", "").lstrip("0") or "0"
    if len(digits) > len(str(most)):  # too long to be in range: no int() of 10^300 digits
        raise error(
            f"{what} {text!r} has {len(digits)} digits, more than any size up to {most}; "
            "use a smaller size"
        )
    return check_count(int(digits), what=what, most=most, error=error)
