"""crossover.py's term arithmetic: how collectives' time terms overlap, scale and are
classified (independent of any plan: the terms are written by hand)."""

from __future__ import annotations

import pytest

from sharding_roofline.collectives import Collective, Combine
from sharding_roofline.crossover import ScaledTerm, solve_crossover, terms_comm_s, terms_regime

AG = Collective.ALL_GATHER


def test_collectives_on_disjoint_links_overlap_and_on_one_link_add() -> None:
    a = ScaledTerm(AG, 3e-3, 1e-6, True, (0,))
    b = ScaledTerm(AG, 2e-3, 1e-6, True, (1,))
    c = ScaledTerm(AG, 1e-3, 1e-6, False, (0,))
    assert terms_comm_s([a, b], 1.0) == pytest.approx(3e-3)  # disjoint: the busier link
    assert terms_comm_s([a, c], 1.0) == pytest.approx(4e-3)  # one link: in series
    assert terms_comm_s([a, c], 2.0) == pytest.approx(2 * 3e-3 + 1e-3)  # c does not scale


def test_gpu_terms_add_latency_and_tpu_terms_take_the_larger() -> None:
    tpu = ScaledTerm(AG, 1e-3, 4e-4, True, (0,))
    gpu = ScaledTerm(AG, 1e-3, 4e-4, True, (0,), Combine.SUM)
    assert terms_comm_s([tpu], 1.0) == pytest.approx(1e-3)
    assert terms_comm_s([gpu], 1.0) == pytest.approx(1.4e-3)


@pytest.mark.parametrize(
    ("latency_s", "regime"),
    [
        (1e-9, "bandwidth"),  # a tiny latency-bound gather beside a big bandwidth-bound one
        (0.05e-3, "bandwidth"),  # 5% of the time is latency's
        (0.5e-3, "mixed"),  # a third
        (20e-3, "latency"),  # 95%
    ],
)
def test_the_regime_is_weighted_by_time(latency_s: float, regime: str) -> None:
    """One bandwidth-bound collective of 1 ms beside one latency-bound one (bandwidth term
    1e-12 s): latency's share of the time decides (90% / 10% thresholds)."""
    big = ScaledTerm(AG, 1e-3, 1e-6, True, (0,))
    small = ScaledTerm(AG, 1e-12, latency_s, True, (1,))
    assert terms_regime([big, small], 1.0) == regime


def test_summed_latency_counts_as_latency_share() -> None:
    # NCCL-style: 1 ms of bandwidth + 9 ms of latency -> 90% latency
    assert terms_regime([ScaledTerm(AG, 1e-3, 9e-3, True, (0,), Combine.SUM)], 1.0) == "latency"
    assert terms_regime([ScaledTerm(AG, 9e-3, 1e-3, True, (0,), Combine.SUM)], 1.0) == "mixed"


def test_crossover_of_a_fixed_and_a_scaling_term() -> None:
    """comm(n) = 2 ms (weights, fixed) vs compute(n) = 1 ms · n/1000: equal at n = 2000."""
    terms = [ScaledTerm(AG, 2e-3, 1e-6, False, (0,))]
    found = solve_crossover(terms, 1e-3, "b", 1000)
    assert found.size == pytest.approx(2000, rel=1e-9)
    assert found.regime == "bandwidth"
