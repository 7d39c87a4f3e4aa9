"""Unit constants and human formatting. Everything is stored in base units (bytes, seconds,
FLOPs); scaled units appear only here, when formatting for people."""

from __future__ import annotations

import math

KiB = 1024
MiB = 1024**2
GiB = 1024**3
KB = 1e3
MB = 1e6
GB = 1e9
TB = 1e12

US = 1e-6
MS = 1e-3


def _scaled(value: float, steps: tuple[tuple[float, str], ...], digits: int) -> str:
    if value == 0 or not math.isfinite(value):  # in the base unit: 0 s, inf s, nan B
        base = next((unit for factor, unit in steps if factor == 1), steps[0][1])
        return f"{value:g} {base}".rstrip()
    for factor, unit in reversed(steps):
        if abs(value) >= factor:
            return f"{value / factor:.{digits}g} {unit}".rstrip()
    factor, unit = steps[0]
    return f"{value / factor:.{digits}g} {unit}".rstrip()


def format_bytes(num_bytes: float, digits: int = 4) -> str:
    """Binary units, as memory is sized: ``format_bytes(3 * MiB) == '3 MiB'``."""
    return _scaled(
        num_bytes, ((1, "B"), (KiB, "KiB"), (MiB, "MiB"), (GiB, "GiB"), (1024**4, "TiB")), digits
    )


def format_seconds(seconds: float, digits: int = 4) -> str:
    """``format_seconds(2.3e-5) == '23 us'``."""
    if seconds == 0:
        return "0 s"
    return _scaled(seconds, ((1e-9, "ns"), (1e-6, "us"), (1e-3, "ms"), (1.0, "s")), digits)


def format_rate(per_s: float, unit: str = "B", digits: int = 4) -> str:
    """Decimal units, as rates are quoted: ``format_rate(4.5e10) == '45 GB/s'``."""
    steps = ((1.0, ""), (1e3, "k"), (1e6, "M"), (1e9, "G"), (1e12, "T"), (1e15, "P"), (1e18, "E"))
    for factor, prefix in reversed(steps):
        if abs(per_s) >= factor:
            return f"{per_s / factor:.{digits}g} {prefix}{unit}/s"
    return f"{per_s:.{digits}g} {unit}/s"


def format_count(value: float, digits: int = 4) -> str:
    """Decimal magnitude for counts such as FLOPs: ``format_count(1.374e11) == '137.4 G'``
    (4 significant digits by default: ``format_count(1.37e11) == '137 G'``)."""
    steps = ((1.0, ""), (1e3, "k"), (1e6, "M"), (1e9, "G"), (1e12, "T"), (1e15, "P"), (1e18, "E"))
    for factor, prefix in reversed(steps):
        if abs(value) >= factor:
            return f"{value / factor:.{digits}g} {prefix}".rstrip()
    return f"{value:.{digits}g}"


def format_flops(flops: float, digits: int = 4) -> str:
    """``format_flops(686) == '686 FLOP'``, ``format_flops(2.749e11) == '274.9 GFLOP'``."""
    text = format_count(flops, digits)
    return f"{text}FLOP" if text.endswith((" k", " M", " G", " T", " P", " E")) else f"{text} FLOP"
