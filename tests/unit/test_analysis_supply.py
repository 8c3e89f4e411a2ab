"""Supply bound functions of the periodic (PRM) and explicit-deadline periodic (EDP) models."""
from __future__ import annotations

import itertools
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kairos_libvirt.analysis import EDP, dedicated, prm, sbf, sbf_inverse
from kairos_libvirt.errors import AnalysisError

SETTINGS = settings(max_examples=200, deadline=None)


def shin_lee_prm_sbf(t: int, period: int, budget: int) -> int:
    """sbf of PRM as printed by Shin & Lee (RTSS 2003), for comparison.

    k = max(⌈(t − (Π − Θ))/Π⌉, 1); sbf(t) = t − (k + 1)(Π − Θ) if
    t ∈ [(k + 1)Π − 2Θ, (k + 1)Π − Θ], else (k − 1)Θ.
    """
    k = max(-(-(t - (period - budget)) // period), 1)
    if (k + 1) * period - 2 * budget <= t <= (k + 1) * period - budget:
        return t - (k + 1) * (period - budget)
    return (k - 1) * budget


@st.composite
def servers(draw, max_period: int = 50) -> EDP:
    p = draw(st.integers(1, max_period))
    q = draw(st.integers(1, p))
    d = draw(st.integers(q, p))
    return EDP(p, q, d)


# -- hand-computed values ---------------------------------------------------------

def test_prm_hand_values():
    # Π = 5, Θ = 2: blackout 2(Π − Θ) = 6, then 2 units every 5.
    s = prm(5, 2)
    assert s.blackout_ns == 6
    got = [s.sbf(t) for t in range(0, 18)]
    assert got == [0, 0, 0, 0, 0, 0, 0, 1, 2, 2, 2, 2, 3, 4, 4, 4, 4, 5]


def test_edp_hand_values():
    # Π = 5, Θ = 2, Δ = 3: blackout Π + Δ − 2Θ = 4.
    s = EDP(5, 2, 3)
    assert s.blackout_ns == 4
    assert [s.sbf(t) for t in range(0, 12)] == [0, 0, 0, 0, 0, 1, 2, 2, 2, 2, 3, 4]


def test_edp_with_deadline_equal_budget_is_a_fixed_slot():
    # Δ = Θ: the budget sits at the same place in every period; blackout Π − Θ.
    s = EDP(5, 2, 2)
    assert s.blackout_ns == 3
    assert [s.sbf(t) for t in range(0, 11)] == [0, 0, 0, 0, 1, 2, 2, 2, 2, 3, 4]


def test_dedicated_processor_supplies_everything():
    s = dedicated()
    assert [s.sbf(t) for t in range(6)] == list(range(6))
    assert s.bandwidth == 1 and s.blackout_ns == 0


def test_sbf_inverse_hand_values():
    s = prm(5, 2)
    assert [s.sbf_inverse(x) for x in range(0, 6)] == [0, 7, 8, 12, 13, 17]


def test_lsbf_is_the_line_through_the_bottom_corners():
    s = prm(5, 2)
    assert s.lsbf(6) == 0 and s.lsbf(11) == 2 and s.lsbf(8) == Fraction(4, 5)
    assert s.lsbf(0) == 0


@pytest.mark.parametrize("args", [(5, 0, 5), (5, 3, 2), (5, 2, 6), (0, 0, 0), (5, 2.0, 5), (5, True, 5)])
def test_invalid_servers_are_refused(args):
    with pytest.raises(AnalysisError):
        EDP(*args)


# -- against references and brute force --------------------------------------------

@SETTINGS
@given(st.integers(1, 60), st.data(), st.integers(0, 400))
def test_prm_matches_shin_lee_formula(period, data, t):
    budget = data.draw(st.integers(1, period))
    assert sbf(t, period, budget, period) == shin_lee_prm_sbf(t, period, budget)


def _worst_supply(period: int, budget: int, deadline: int, t: int, periods: int) -> int:
    """Least supply in any window of length t over every legal schedule of ``periods`` periods.

    Legal: exactly Θ unit slots inside [kΠ, kΠ + Δ) in every period k.
    """
    choices = list(itertools.combinations(range(deadline), budget))
    best = None
    for pick in itertools.product(choices, repeat=periods):
        slots = [0] * (periods * period)
        for k, offs in enumerate(pick):
            for o in offs:
                slots[k * period + o] = 1
        for a in range(0, periods * period - t + 1):
            got = sum(slots[a:a + t])
            best = got if best is None else min(best, got)
    return best


@pytest.mark.parametrize("period,budget,deadline", [
    (p, q, d) for p in (2, 3, 4) for q in range(1, p + 1) for d in range(q, p + 1)])
def test_sbf_is_the_least_supply_over_all_legal_schedules(period, budget, deadline):
    periods = 4
    for t in range(0, 2 * period + 1):
        assert sbf(t, period, budget, deadline) == _worst_supply(period, budget, deadline, t, periods)


@SETTINGS
@given(servers(), st.integers(0, 500))
def test_sbf_inverse_is_the_least_window(s, x):
    t = s.sbf_inverse(x)
    assert s.sbf(t) >= x
    assert t == 0 or s.sbf(t - 1) < x


@SETTINGS
@given(servers(), st.integers(0, 500))
def test_linear_bounds_sandwich_sbf(s, t):
    assert s.lsbf(t) <= s.sbf(t)
    # upper line through the top corners: α(t − (Δ − Θ))
    assert s.sbf(t) <= max(Fraction(0), s.bandwidth * (t - (s.deadline_ns - s.budget_ns)))


@SETTINGS
@given(servers(), st.integers(0, 300), st.integers(0, 300))
def test_sbf_is_superadditive(s, a, b):
    # The EDF check-point bound relies on it.
    assert s.sbf(a + b) >= s.sbf(a) + s.sbf(b)


@SETTINGS
@given(servers(), st.integers(0, 400))
def test_sbf_grows_with_budget_and_shrinks_with_deadline(s, t):
    p, q, d = s.period_ns, s.budget_ns, s.deadline_ns
    if q < d:
        assert sbf(t, p, q + 1, d) >= sbf(t, p, q, d)          # more budget, same deadline
        assert sbf(t, p, q, d - 1) >= sbf(t, p, q, d)          # tighter deadline
    if d < p:
        assert sbf(t, p, q + 1, d + 1) >= sbf(t, p, q, d)      # Δ tied to Θ (EDP search)


@SETTINGS
@given(st.integers(1, 60), st.data(), st.integers(0, 400))
def test_edp_with_deadline_equal_period_is_prm(period, data, t):
    budget = data.draw(st.integers(1, period))
    assert EDP(period, budget, period).sbf(t) == prm(period, budget).sbf(t)
    assert sbf_inverse(t, period, budget, period) == prm(period, budget).sbf_inverse(t)
