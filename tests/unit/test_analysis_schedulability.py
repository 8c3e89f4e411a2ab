"""Demand functions and the exact EDF / fixed-priority tests, on textbook task sets."""
from __future__ import annotations

import math
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kairos_libvirt.analysis import (EDP, Task, check_bound, dbf, dedicated, edf_schedulable,
                                     fp_response_times, last_deadline, prm, rbf, schedulable,
                                     sbf, utilisation, workload)
from kairos_libvirt.analysis.schedulability import Workload
from kairos_libvirt.errors import AnalysisError

SETTINGS = settings(max_examples=150, deadline=None)


def T(name, c, t, d=None, prio=None, sched="edf"):
    return Task(name, c, t, d, priority=prio, scheduler=sched)


# -- demand --------------------------------------------------------------------------

def test_dbf_hand_values():
    ts = [T("a", 1, 4, 3), T("b", 2, 6, 5)]
    assert [dbf(ts, t) for t in (0, 2, 3, 4, 5, 7, 11)] == [0, 0, 1, 1, 3, 4, 7]


def test_rbf_hand_values():
    ts = [T("a", 1, 4), T("b", 2, 6)]
    assert [rbf(ts, t) for t in (0, 1, 4, 5, 6, 7)] == [0, 3, 3, 4, 4, 6]


def test_workload_counts_a_carried_in_job():
    # C = 2, D = 5, T = 6: a job may still run in the 2 units before its deadline.
    t = T("a", 2, 6, 5)
    assert [workload(t, x) for x in (0, 1, 3, 10)] == [0, 1, 2, 5]


def test_last_deadline():
    ts = [T("a", 1, 4, 3), T("b", 2, 6, 5)]
    assert last_deadline(ts, 2) is None
    assert last_deadline(ts, 6) == 5 and last_deadline(ts, 10) == 7 and last_deadline(ts, 11) == 11


def test_utilisation_is_exact():
    assert utilisation([T("a", 2, 5), T("b", 4, 7)]) == Fraction(34, 35)


# -- dedicated processor: the classic results ----------------------------------------

def test_buttazzo_rm_versus_edf():
    # Buttazzo, Hard Real-Time Computing Systems (3rd ed.), ch. 4: τ1 = (2, 5),
    # τ2 = (4, 7), U = 34/35.  RM misses τ2's first deadline, EDF meets all.
    ts = [T("t1", 2, 5, prio=2), T("t2", 4, 7, prio=1)]
    assert edf_schedulable(ts, dedicated())
    # RTA: R2 = 4 + ⌈6/5⌉·2 = 8 > 7.
    assert fp_response_times(ts, dedicated()) == {"t1": 2, "t2": None}


def test_burns_wellings_response_times():
    # Burns & Wellings, Real-Time Systems and Programming Languages, RTA example:
    # (T, C) = (7, 3), (12, 3), (20, 5) under RM give R = 3, 6, 20.
    ts = [T("a", 3, 7, prio=3), T("b", 3, 12, prio=2), T("c", 5, 20, prio=1)]
    assert fp_response_times(ts, dedicated()) == {"a": 3, "b": 6, "c": 20}


def test_deadline_monotonic_response_times():
    # Buttazzo, HRTCS 3rd ed., §4.5 (deadline monotonic, response-time analysis):
    # (C, T, D) = (1, 4, 3), (1, 5, 4), (2, 6, 5), (1, 11, 10).  By hand:
    # R4: 5 → 1+2+1+2 = 6 → 7 → 9 → 10 → 10 <= D4 = 10.
    ts = [T("t1", 1, 4, 3, sched="fp"), T("t2", 1, 5, 4, sched="fp"),
          T("t3", 2, 6, 5, sched="fp"), T("t4", 1, 11, 10, sched="fp")]
    # No priorities given: deadline-monotonic ones are assigned.
    assert fp_response_times(ts, dedicated()) == {"t1": 1, "t2": 2, "t3": 4, "t4": 10}


def test_processor_demand_criterion_for_constrained_deadlines():
    # U = 11/12 < 1, but dbf(6) = 2 + 2 + 3 = 7 > 6 (Baruah, Rosier & Howell 1990;
    # Buttazzo §4.6.1): utilisation alone is not enough with D < T.
    bad = [T("a", 2, 6, 4), T("b", 2, 8, 5), T("c", 3, 9, 6)]
    assert utilisation(bad) == Fraction(11, 12)
    assert not edf_schedulable(bad, dedicated())
    ok = [T("a", 2, 6, 4), T("b", 2, 8, 5), T("c", 3, 9, 7)]  # tight at t = 16: dbf = 16
    assert dbf(ok, 16) == 16
    assert edf_schedulable(ok, dedicated())


@SETTINGS
@given(st.lists(st.tuples(st.integers(1, 50), st.integers(1, 60)), min_size=1, max_size=6))
def test_edf_implicit_deadlines_iff_utilisation_at_most_one(pairs):
    # Liu & Layland (1973): on a whole CPU, implicit deadlines are EDF-feasible iff U <= 1.
    ts = [T(f"t{i}", min(c, p), p) for i, (c, p) in enumerate(pairs)]
    assert edf_schedulable(ts, dedicated()) == (utilisation(ts) <= 1)


# -- check-point bound -------------------------------------------------------------------

def test_check_bound_dedicated_is_the_classic_bound():
    # L = Σ(T − D)U / (1 − U) = (25/12)/(1/12) = 25 < hyperperiod 72.
    ok = [T("a", 2, 6, 4), T("b", 2, 8, 5), T("c", 3, 9, 7)]
    assert check_bound(ok, dedicated()) == 25


def test_check_bound_from_the_linear_supply_bound():
    # PRM(4, 2): α = 1/2, B = 4; one task U = 1/10, D = T: L = ⌊2·4 / (2 − 4/10)⌋ = 5.
    assert check_bound([T("a", 1, 10)], prm(4, 2)) == 5


def test_check_bound_uses_the_hyperperiod_when_smaller():
    # U = 23/24, Σ(T − D)U = 29/24: the utilisation bound 29 exceeds H = 24.
    ts = [T("a", 1, 4, 2), T("b", 2, 6, 5), T("c", 3, 8, 7)]
    assert check_bound(ts, dedicated()) == 24


def test_check_bound_when_utilisation_equals_bandwidth():
    t = [T("a", 1, 2)]
    assert check_bound(t, EDP(2, 1, 2)) is None  # U = α and Θ < Δ: cannot fit
    assert check_bound(t, EDP(2, 1, 1)) == 2     # U = α, Θ = Δ: busy-period bound
    assert edf_schedulable(t, EDP(2, 1, 1)) and not edf_schedulable(t, EDP(2, 1, 2))


def test_utilisation_above_bandwidth_fails_with_a_reason():
    v = schedulable([T("a", 3, 4)], prm(4, 2))
    assert not v.schedulable and "utilisation 3/4 exceeds" in v.reason


def test_verdict_names_the_failing_deadline():
    v = schedulable([T("a", 2, 6, 4), T("b", 2, 8, 5), T("c", 3, 9, 6)], dedicated())
    assert not v.schedulable and v.failed_at_ns == 6 and "EDF demand 7 ns" in v.reason


def test_verdict_for_equal_utilisation_and_budget_below_deadline():
    v = schedulable([T("a", 1, 2)], EDP(2, 1, 2))
    assert not v.schedulable and "equals the bandwidth" in v.reason


# -- composition: SCHED_DEADLINE above SCHED_FIFO/RR ------------------------------------------

def test_dl_tasks_interfere_with_fp_tasks_but_not_the_other_way():
    dl = T("dl", 2, 10, 4)
    rt = T("rt", 3, 10, 10, prio=99, sched="fp")
    v = schedulable([dl, rt], dedicated())
    # rt may wait for dl's whole job (2) and a carried-in one: W(R) <= 4 here.
    assert v.schedulable and v.response_times_ns["rt"] <= 3 + 4
    heavy = T("rt", 7, 10, 8, prio=99, sched="fp")
    v = schedulable([dl, heavy], dedicated())
    assert not v.schedulable and v.failed_task == "rt" and "'rt' misses" in v.reason


def test_equal_priorities_interfere_both_ways():
    a, b = T("a", 2, 5, prio=5, sched="fp"), T("b", 2, 5, prio=5, sched="fp")
    assert fp_response_times([a, b], dedicated()) == {"a": 4, "b": 4}


def test_fp_priorities_must_be_all_or_none():
    with pytest.raises(AnalysisError, match="'b': priority is missing"):
        fp_response_times([T("a", 1, 5, prio=3), T("b", 1, 5)], dedicated())


# -- work limit ---------------------------------------------------------------------------------

def test_work_limit_gives_a_safe_not_proven_verdict(monkeypatch):
    # Near-critical bandwidth with a huge hyperperiod: the walk is long.
    ts = [T("a", 1000, 9973), T("b", 1000, 10007), T("c", 3000, 10009)]
    s = EDP(100, 50, 100)
    monkeypatch.setattr(Workload, "max_work", 1)
    wl = Workload(ts)
    wl.max_steps = 1
    v = wl.verdict(s)
    assert not v.schedulable and "not proven" in v.reason
    assert wl.capped == 1
    w = wl.violation(100, 50, 100)
    assert w is not None and w(100, 51, 100) and not w(100, 50, 100)


# -- the host's enforcement loss: supply sbf(t) − g ------------------------------------

def _brute_edf(tasks, p, q, d, loss, horizon):
    """dbf(t) <= max(0, sbf(t) − loss) at every deadline up to ``horizon`` (no cleverness)."""
    from kairos_libvirt.analysis import dbf
    deadlines = sorted({k * t.period_ns + t.deadline_ns for t in tasks
                        for k in range(horizon // t.period_ns + 1)
                        if k * t.period_ns + t.deadline_ns <= horizon})
    return all(dbf(tasks, x) <= sbf(x, p, q, d, loss) for x in deadlines)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 4), st.integers(5, 30)), min_size=1, max_size=3),
       st.integers(4, 20), st.integers(0, 6))
def test_edf_with_a_loss_matches_a_brute_force_walk(pairs, period, loss):
    tasks = [T(f"t{i}", c, t) for i, (c, t) in enumerate(pairs)]
    for q in range(1, period + 1):
        supply = EDP(period, q, period, loss)
        got = edf_schedulable(tasks, supply)
        bound = check_bound(tasks, supply)
        horizon = 4 * math.lcm(period, *(t.period_ns for t in tasks)) + 200
        want = bound is not None and _brute_edf(tasks, period, q, period, loss, max(horizon, bound))
        assert got == want, (pairs, period, q, loss)


def test_a_loss_delays_fp_response_by_exactly_the_supply_it_takes_back():
    # A dedicated-like server (Θ = Δ = Π) less a 3-unit loss: the first 3 units never come.
    ts = [T("a", 2, 100, 100, prio=10, sched="fp")]
    assert fp_response_times(ts, EDP(10, 10, 10))["a"] == 2
    assert fp_response_times(ts, EDP(10, 10, 10, 3))["a"] == 5
