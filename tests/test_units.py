"""units.py: the constants and the human formatting, including every docstring example."""

from __future__ import annotations

import math

import pytest

from sharding_roofline.units import (
    GB,
    KB,
    MB,
    MS,
    TB,
    US,
    GiB,
    KiB,
    MiB,
    format_bytes,
    format_count,
    format_rate,
    format_seconds,
)


def test_constants() -> None:
    assert (KiB, MiB, GiB) == (1024, 1024**2, 1024**3)
    assert (KB, MB, GB, TB) == (1e3, 1e6, 1e9, 1e12)
    assert (US, MS) == (1e-6, 1e-3)


def test_docstring_examples() -> None:
    """Each function's docstring example, exactly as written there."""
    assert format_bytes(3 * MiB) == "3 MiB"
    assert format_seconds(2.3e-5) == "23 us"
    assert format_rate(4.5e10) == "45 GB/s"
    assert format_count(1.374e11) == "137.4 G"
    assert format_count(1.37e11) == "137 G"  # 4 significant digits: not '137.4 G'


@pytest.mark.parametrize(
    ("value", "text"),
    [
        pytest.param(0, "0 B", id="zero"),
        pytest.param(1536, "1.5 KiB", id="binary"),
        pytest.param(16 * GiB, "16 GiB", id="GiB"),
        pytest.param(95 * GiB, "95 GiB", id="v5p"),
        pytest.param(2.5 * 1024**4, "2.5 TiB", id="TiB"),
        pytest.param(-1024, "-1 KiB", id="negative"),
        pytest.param(math.inf, "inf B", id="inf"),
        pytest.param(0.5, "0.5 B", id="fp4-element"),
    ],
)
def test_format_bytes(value: float, text: str) -> None:
    assert format_bytes(value) == text


@pytest.mark.parametrize(
    ("value", "text"),
    [
        pytest.param(0, "0 s", id="zero"),
        pytest.param(3.4e-6, "3.4 us", id="nvlink-step"),
        pytest.param(1.04e-3, "1.04 ms", id="ms"),
        pytest.param(12.0, "12 s", id="s"),
        pytest.param(5e-10, "0.5 ns", id="sub-ns"),
        pytest.param(math.inf, "inf s", id="inf-in-seconds"),
        pytest.param(-2e-3, "-2 ms", id="negative"),
    ],
)
def test_format_seconds(value: float, text: str) -> None:
    assert format_seconds(value) == text


def test_format_rate_and_count_prefixes() -> None:
    assert format_rate(0) == "0 B/s"
    assert format_rate(9.89e14, "FLOP") == "989 TFLOP/s"
    assert format_rate(1.25e10) == "12.5 GB/s"
    assert format_rate(5e18, "FLOP", 3) == "5 EFLOP/s"
    assert format_count(0) == "0"
    assert format_count(999) == "999"
    assert format_count(2_048_000) == "2.048 M"
    assert format_count(0.25) == "0.25"
