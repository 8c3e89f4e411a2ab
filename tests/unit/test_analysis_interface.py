"""Minimal interfaces: least budgets, period/deadline search, partitioning, overhead."""
from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kairos_libvirt.analysis import (DL_MIN_RUNTIME_NS, EDP, Task, interface_for, minimal_budget,
                                     partition, schedulable)
from kairos_libvirt.analysis.schedulability import Workload
from kairos_libvirt.errors import AnalysisError

MS = 1_000_000
US = 1_000
SETTINGS = settings(max_examples=60, deadline=None)


def T(name, c, t, d=None, prio=None, sched="edf", vcpu=None):
    return Task(name, c, t, d, priority=prio, scheduler=sched, vcpu=vcpu)


@st.composite
def tasksets(draw, sched="edf", n_max=4):
    out = []
    for i in range(draw(st.integers(1, n_max))):
        t = draw(st.sampled_from([2, 3, 4, 5, 6, 8, 10, 12])) * MS
        d = draw(st.integers(1, t // (100 * US))) * 100 * US
        c = draw(st.integers(1, max(1, d // (200 * US)))) * 100 * US
        out.append(T(f"t{i}", min(c, d), t, d, prio=draw(st.integers(1, 9)), sched=sched))
    return out


# -- least budget -----------------------------------------------------------------------

def test_minimal_budget_by_hand():
    # One task C = 2 ms, D = T = 10 ms on PRM(Π = 4 ms): for 1 < Θ < 2 (ms),
    # sbf(10) = Θ + (2Θ − 2) = 3Θ − 2 >= 2  ⇔  Θ >= 4/3 ms.
    task = [T("a", 2 * MS, 10 * MS)]
    q = minimal_budget(task, period_ns=4 * MS)
    assert q == 1_333_334
    assert schedulable(task, EDP(4 * MS, q, 4 * MS)).schedulable
    assert not schedulable(task, EDP(4 * MS, q - 1, 4 * MS)).schedulable


def test_minimal_budget_on_a_microsecond_grid():
    task = [T("a", 2 * MS, 10 * MS)]
    assert minimal_budget(task, period_ns=4 * MS, granularity_ns=US) == 1_334_000


def test_minimal_budget_respects_the_kernel_minimum_runtime():
    q = minimal_budget([T("a", 1, 10 * MS)], period_ns=MS)
    assert q == DL_MIN_RUNTIME_NS
    q = minimal_budget([T("a", 1, 10 * MS)], period_ns=MS, overhead_ns=1000)
    assert q == DL_MIN_RUNTIME_NS - 1000


def test_minimal_budget_none_when_even_the_full_budget_fails():
    assert minimal_budget([T("a", 3 * MS, 4 * MS, 3 * MS)], period_ns=4 * MS, deadline_ns=2 * MS) is None


@SETTINGS
@given(tasksets(), st.sampled_from([1, 2, 3, 5]), st.booleans())
def test_minimal_budget_is_least(tasks, period_ms, constrained):
    p = period_ms * MS
    d = p // 2 if constrained else p
    q = minimal_budget(tasks, period_ns=p, deadline_ns=d, granularity_ns=US)
    if q is None:
        assert not schedulable(tasks, EDP(p, d, d)).schedulable
        return
    assert q % US == 0 and schedulable(tasks, EDP(p, q, d)).schedulable
    if q - US >= DL_MIN_RUNTIME_NS:
        assert not schedulable(tasks, EDP(p, q - US, d)).schedulable


@SETTINGS
@given(tasksets("fp"), st.sampled_from([1, 2, 3, 5]))
def test_minimal_budget_is_least_for_fixed_priority(tasks, period_ms):
    p = period_ms * MS
    q = minimal_budget(tasks, period_ns=p, granularity_ns=US)
    if q is None:
        return
    assert schedulable(tasks, EDP(p, q, p)).schedulable
    if q - US >= DL_MIN_RUNTIME_NS:
        assert not schedulable(tasks, EDP(p, q - US, p)).schedulable


@SETTINGS
@given(tasksets(), st.sampled_from([1, 2, 4]))
def test_edp_with_deadline_equal_period_equals_prm(tasks, period_ms):
    p = period_ms * MS
    a = interface_for(tasks, vcpus=1, model="prm", period_ns=p, granularity_ns=US).servers[0]
    b = interface_for(tasks, vcpus=1, model="edp", period_ns=p, deadline_ns=p,
                      granularity_ns=US).servers[0]
    assert (a.budget_ns, a.deadline_ns, a.schedulable) == (b.budget_ns, b.deadline_ns, b.schedulable)
    c = interface_for(tasks, vcpus=1, model="edp", period_ns=p, granularity_ns=US).servers[0]
    # Letting the deadline drop never costs bandwidth.
    if a.schedulable:
        assert c.schedulable and c.budget_ns <= a.budget_ns and c.deadline_ns <= p


def test_edp_loosens_the_deadline_but_keeps_the_least_budget():
    tasks = [T("a", 1 * MS, 4 * MS), T("b", 2 * MS, 6 * MS), T("c", 3 * MS, 8 * MS)]
    s = interface_for(tasks, vcpus=1, model="edp", period_ns=MS, granularity_ns=US).servers[0]
    assert s.schedulable and s.budget_ns < s.deadline_ns <= MS
    assert schedulable(tasks, EDP(MS, s.budget_ns, s.deadline_ns)).schedulable
    # least: one microsecond less fails even with the tightest deadline Δ = Θ
    assert not schedulable(tasks, EDP(MS, s.budget_ns - US, s.budget_ns - US)).schedulable


# -- period search --------------------------------------------------------------------------

def test_period_search_stays_in_bounds_and_is_least_for_its_period():
    tasks = [T("a", 1 * MS, 4 * MS), T("b", 2 * MS, 6 * MS), T("c", 3 * MS, 8 * MS)]
    for model in ("prm", "edp"):
        s = interface_for(tasks, vcpus=1, model=model, overhead_ns=20 * US,
                          period_bounds=(200 * US, 2 * MS), granularity_ns=US).servers[0]
        assert 200 * US <= s.period_ns <= 2 * MS and s.schedulable and s.exact
        assert s.runtime_ns == s.budget_ns + 20 * US and s.runtime_ns <= s.deadline_ns
        assert s.bandwidth == Fraction(s.runtime_ns, s.period_ns)
        if s.deadline_ns == s.period_ns:
            # Δ = Π (prm, or the host-cheapest EDP): least for that deadline.
            assert not schedulable(tasks, EDP(s.period_ns, s.budget_ns - US, s.period_ns)).schedulable
        else:
            # a loosened EDP deadline: least even with the tightest deadline Δ = Θ + overhead
            d = s.budget_ns + 20 * US
            assert not schedulable(tasks, EDP(s.period_ns, s.budget_ns - US, d - US)).schedulable


def test_overhead_pushes_the_period_up():
    tasks = [T("a", 1 * MS, 10 * MS), T("b", 2 * MS, 20 * MS)]
    cheap = interface_for(tasks, vcpus=1, model="prm", granularity_ns=US).servers[0]
    costly = interface_for(tasks, vcpus=1, model="prm", overhead_ns=50 * US, granularity_ns=US).servers[0]
    assert costly.period_ns > cheap.period_ns


def test_edp_needs_no_more_bandwidth_than_prm_in_the_search():
    tasks = [T("a", 1 * MS, 4 * MS), T("b", 2 * MS, 6 * MS), T("c", 1 * MS, 8 * MS)]
    prm = interface_for(tasks, vcpus=1, model="prm", overhead_ns=10 * US, granularity_ns=US)
    edp = interface_for(tasks, vcpus=1, model="edp", overhead_ns=10 * US, granularity_ns=US)
    assert edp.total_bandwidth <= prm.total_bandwidth


def test_unschedulable_vcpu_reports_the_full_budget():
    g = interface_for([T("a", 3 * MS, 4 * MS), T("b", 3 * MS, 4 * MS)], vcpus=1, period_ns=MS)
    s = g.servers[0]
    assert not g.schedulable and not s.schedulable
    assert s.budget_ns == s.deadline_ns == MS and "full budget" in s.reason
    g = interface_for([T("a", 3 * MS, 4 * MS), T("b", 3 * MS, 4 * MS)], vcpus=1)
    assert not g.schedulable


def test_work_limit_marks_the_result_inexact_but_safe(monkeypatch):
    tasks = [T("a", 1000 * US, 9973 * US), T("b", 1000 * US, 10007 * US), T("c", 3000 * US, 10009 * US)]
    monkeypatch.setattr(Workload, "max_work", 0)
    orig = Workload.__init__

    def tiny(self, ts):
        orig(self, ts)
        self.max_steps = 2
    monkeypatch.setattr(Workload, "__init__", tiny)
    s = interface_for(tasks, vcpus=1, model="prm", period_ns=1000 * US, granularity_ns=US).servers[0]
    assert s.schedulable and not s.exact and "may not be least" in s.reason
    monkeypatch.undo()
    assert schedulable(tasks, EDP(s.period_ns, s.budget_ns, s.deadline_ns)).schedulable


# -- vCPUs, partition, priorities -----------------------------------------------------------------

def test_pinned_tasks_stay_and_the_rest_are_spread_worst_fit():
    tasks = [T("p0", 4 * MS, 10 * MS, vcpu=0), T("x", 3 * MS, 10 * MS), T("y", 2 * MS, 10 * MS),
             T("z", 1 * MS, 10 * MS)]
    where, assumed = partition(tasks, 2)
    assert assumed and where == {"p0": 0, "x": 1, "y": 1, "z": 0}
    g = interface_for(tasks, vcpus=2, granularity_ns=US)
    assert g.partition == "assumed" and g.assignment == where
    assert [s.tasks for s in g.servers] == [("p0", "z"), ("x", "y")]


def test_all_pinned_or_one_vcpu_is_not_assumed():
    tasks = [T("a", MS, 10 * MS, vcpu=1), T("b", MS, 10 * MS, vcpu=0)]
    assert interface_for(tasks, vcpus=2).partition == "pinned"
    assert interface_for([T("a", MS, 10 * MS)], vcpus=1).partition == "pinned"


def test_empty_vcpu_needs_no_reservation():
    g = interface_for([T("a", MS, 10 * MS, vcpu=0)], vcpus=2, period_ns=MS)
    s = g.servers[1]
    assert s.tasks == () and s.budget_ns == 0 and s.runtime_ns == 0 and s.bandwidth == 0
    assert s.schedulable and g.total_bandwidth == g.servers[0].bandwidth


def test_fp_tasks_get_deadline_monotonic_priorities():
    tasks = [T("slow", MS, 20 * MS, sched="fp"), T("fast", MS, 5 * MS, sched="fp"),
             T("mid", MS, 10 * MS, 8 * MS, sched="fp"), T("dl", MS, 10 * MS)]
    g = interface_for(tasks, vcpus=1, period_ns=MS)
    assert g.priorities == {"fast": 99, "mid": 98, "slow": 97}
    assert set(g.servers[0].response_times_ns) == {"fast", "mid", "slow"}


def test_more_than_99_deadlines_share_priority_levels():
    tasks = [T(f"t{i}", 1000, 10 * MS + i * 1000, sched="fp") for i in range(150)]
    g = interface_for(tasks, vcpus=1, period_ns=MS)
    prios = [g.priorities[f"t{i}"] for i in range(150)]
    assert prios[0] == 99 and min(prios) >= 1 and prios == sorted(prios, reverse=True)
    assert g.schedulable


# -- bad parameters --------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,match", [
    (dict(model="gps"), "model 'gps'"),
    (dict(vcpus=0), "vcpus 0"),
    (dict(deadline_ns=MS), "without a period"),
    (dict(model="prm", period_ns=2 * MS, deadline_ns=MS), "prm model"),
    (dict(period_ns=1000), "SCHED_DEADLINE needs at least 1024"),
    (dict(period_ns=MS, deadline_ns=2 * MS), "deadline 2000000"),
    (dict(period_ns=MS, overhead_ns=-1), "overhead_ns -1"),
    (dict(granularity_ns=0), "granularity_ns 0"),
    (dict(period_bounds=(2 * MS, MS)), "period bounds"),
    (dict(period_bounds=(7 * US, 9 * US), granularity_ns=10 * US), "no multiple"),
])
def test_bad_parameters_are_refused(kw, match):
    kw.setdefault("vcpus", 1)
    with pytest.raises(AnalysisError, match=match):
        interface_for([T("a", MS, 10 * MS)], **kw)


def test_duplicate_names_and_bad_pins_are_refused():
    with pytest.raises(AnalysisError, match="'a': name is used twice"):
        interface_for([T("a", MS, 10 * MS), T("a", MS, 10 * MS)], vcpus=1)
    with pytest.raises(AnalysisError, match="vcpu 3 is not allowed"):
        interface_for([T("a", MS, 10 * MS, vcpu=3)], vcpus=2)
    with pytest.raises(AnalysisError, match="at least one vCPU"):
        partition([], 0)


# -- the host's enforcement granularity (tick overrun) ----------------------------------------

from kairos_libvirt.analysis.admission import Reservation, check_admission  # noqa: E402
from kairos_libvirt.analysis.enforcement import Enforcement  # noqa: E402


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 8), st.sampled_from([20, 25, 40, 50, 100])),
                min_size=1, max_size=3),
       st.sampled_from([0, 50 * US, 1 * MS, 4 * MS]))
def test_servers_leave_room_for_the_overrun_and_meet_deadlines_on_sbf_minus_it(pairs, g):
    tasks = [T(f"t{i}", c * 100 * US, p * MS) for i, (c, p) in enumerate(pairs)]
    s = interface_for(tasks, vcpus=1, overhead_ns=20 * US, enforcement_ns=g).servers[0]
    assert s.enforcement_ns == g
    if not s.schedulable:
        return
    assert s.runtime_ns + g <= s.deadline_ns <= s.period_ns <= min(t.deadline_ns for t in tasks)
    # At least a tick of runtime: below it the kernel's debt repayment loses more than g.
    assert s.runtime_ns >= g and Enforcement(g).loss_ns(s.runtime_ns) == g
    assert schedulable(tasks, EDP(s.period_ns, s.budget_ns, s.deadline_ns, g)).schedulable
    assert s.supply == EDP(s.period_ns, s.budget_ns, s.deadline_ns, g)
    # The host admits what the guest analysis granted, alone on this 2-CPU host.
    r = check_admission([Reservation("v", s.runtime_ns, s.period_ns, s.deadline_ns)], cpus=[0, 1],
                        enforcement=Enforcement(g), fair_server=True)
    assert r.admitted, r.message


def test_a_task_due_within_a_tick_has_no_server_and_the_reason_names_the_fix():
    s = interface_for([T("cyclictest", 200 * US, 4 * MS)], vcpus=1, overhead_ns=20 * US,
                      enforcement_ns=4 * MS).servers[0]
    assert not s.schedulable
    assert "enforcement overrun 4000000 ns" in s.reason and "HRTICK_DL" in s.reason


def test_the_search_prefers_the_server_the_host_charges_least():
    tasks = [T("a", 1 * MS, 20 * MS), T("b", 2 * MS, 50 * MS)]
    host = interface_for(tasks, vcpus=1, overhead_ns=20 * US, enforcement_ns=4 * MS).servers[0]
    # Least bandwidth at a fixed period with the tightest deadline costs the host more.
    tight = interface_for(tasks, vcpus=1, overhead_ns=20 * US, enforcement_ns=4 * MS,
                          period_ns=host.period_ns).servers[0]
    assert host.schedulable and tight.schedulable
    assert host.host_density <= tight.host_density


def test_negative_enforcement_is_refused():
    with pytest.raises(AnalysisError, match="enforcement_ns -1 is not allowed"):
        interface_for([T("a", 1 * MS, 20 * MS)], vcpus=1, enforcement_ns=-1)
