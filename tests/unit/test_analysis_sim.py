"""The analysis against a discrete-time simulation of the worst-case supply pattern.

The pattern that achieves sbf exactly: the server's budget came as early as
possible in a first period (ending at time 0), then as late as possible in
every later one — no supply for the blackout Π + Δ − 2Θ, then Θ units every
Π.  Tasks are released synchronously at 0 and then periodically.  In that
pattern the supply in [0, t) is sbf(t) for every t, so:

* EDF: dbf(t) > sbf(t) means the jobs due by t cannot all finish — the
  analysis and the simulation agree both ways;
* FP with distinct priorities: the first job of each task completes exactly
  at the least t with rbf_i(t) <= sbf(t), so again both ways;
* everything else (DL above RT, equal priorities): the analysis is safe,
  "schedulable" implies no miss in the simulation.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import List, Optional, Sequence, Tuple

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kairos_libvirt.analysis import (EDP, Task, edf_schedulable, fp_response_times, interface_for,
                                     minimal_budget, schedulable)
from kairos_libvirt.analysis.interface import DL_MIN_RUNTIME_NS

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

#: Periods with small common multiples keep the simulated horizon short.
PERIODS = [2, 3, 4, 6, 8, 12]
SERVER_PERIODS = [1, 2, 3, 4, 6, 8, 12]


def supplied(s: int, server: Optional[EDP]) -> bool:
    """Is slot [s, s+1) supplied in the worst-case pattern?"""
    if server is None:
        return True
    b = server.blackout_ns
    return s >= b and (s - b) % server.period_ns < server.budget_ns


def simulate(tasks: Sequence[Task], server: Optional[EDP], horizon: int) -> Optional[Tuple[str, int]]:
    """First deadline miss (task, absolute deadline) in [0, horizon], or None.

    DL (edf) jobs run before RT (fp) jobs, as Linux runs SCHED_DEADLINE above
    SCHED_FIFO/RR.  EDF picks the earliest absolute deadline; FP the highest
    priority, FIFO order among equals.
    """
    jobs: List[List[int]] = []  # [task index, release, abs deadline, remaining]
    for s in range(horizon + 1):
        for i, t in enumerate(tasks):
            if s % t.period_ns == 0:
                jobs.append([i, s, s + t.deadline_ns, t.runtime_ns])
        for j in jobs:
            if j[3] > 0 and j[2] <= s:
                return tasks[j[0]].name, j[2]
        jobs = [j for j in jobs if j[3] > 0]
        if s == horizon or not supplied(s, server):
            continue
        dl = [j for j in jobs if tasks[j[0]].scheduler == "edf"]
        if dl:
            pick = min(dl, key=lambda j: (j[2], j[0]))
        else:
            rt = [j for j in jobs if tasks[j[0]].scheduler == "fp"]
            if not rt:
                continue
            pick = min(rt, key=lambda j: (-(tasks[j[0]].priority or 0), j[1], j[0]))
        pick[3] -= 1
    return None


def horizon_for(tasks: Sequence[Task], server: Optional[EDP]) -> int:
    """Long enough to expose any EDF violation: dbf − sbf repeats (or drops) every lcm(H, Π)."""
    h = math.lcm(*(t.period_ns for t in tasks))
    p = server.period_ns if server else 1
    d = server.deadline_ns if server else 1
    return math.lcm(h, p) + d + max(t.deadline_ns for t in tasks) + (server.blackout_ns if server else 0)


@st.composite
def tasks_st(draw, scheduler: str = "edf", n_max: int = 4, distinct: bool = False,
             mixed: bool = False) -> List[Task]:
    n = draw(st.integers(1, n_max))
    prios = draw(st.permutations(range(1, 20))) if distinct else None
    out = []
    for i in range(n):
        t = draw(st.sampled_from(PERIODS))
        d = draw(st.integers(1, t))
        c = draw(st.one_of(st.just(1), st.integers(1, d)))  # small C: more schedulable sets
        sched = draw(st.sampled_from(["edf", "fp"])) if mixed else scheduler
        prio = prios[i] if distinct else draw(st.integers(1, 5))
        out.append(Task(f"t{i}", c, t, d, priority=prio, scheduler=sched))
    return out


@st.composite
def server_st(draw) -> EDP:
    p = draw(st.sampled_from(SERVER_PERIODS))
    q = draw(st.integers(1, p))
    d = draw(st.integers(q, p))
    return EDP(p, q, d)


@SETTINGS
@given(tasks_st("edf"), server_st())
def test_edf_verdict_matches_simulation_both_ways(tasks, server):
    sim_ok = simulate(tasks, server, horizon_for(tasks, server)) is None
    assert edf_schedulable(tasks, server) == sim_ok


@SETTINGS
@given(tasks_st("edf"))
def test_edf_dedicated_processor_matches_simulation(tasks):
    # Dedicated CPU (Θ = Δ = Π): the processor-demand criterion, exact both ways.
    sim_ok = simulate(tasks, None, horizon_for(tasks, None)) is None
    assert edf_schedulable(tasks, EDP(1, 1, 1)) == sim_ok


@SETTINGS
@given(tasks_st("fp", distinct=True), server_st())
def test_fp_verdict_matches_simulation_both_ways(tasks, server):
    rts = fp_response_times(tasks, server)
    sim = simulate(tasks, server, horizon_for(tasks, server))
    assert (sim is None) == all(r is not None for r in rts.values())


@SETTINGS
@given(tasks_st("fp", distinct=True))
def test_fp_response_times_match_simulation_on_dedicated_cpu(tasks):
    # Response-time analysis on a whole CPU is exact for the first (worst) job.
    rts = fp_response_times(tasks, EDP(1, 1, 1))
    for t in tasks:
        if rts[t.name] is None:
            continue
        # Simulate with the task's deadline relaxed so that we can observe completion.
        finish = _first_completion(tasks, t.name)
        assert finish == rts[t.name]


def _first_completion(tasks: Sequence[Task], name: str) -> int:
    i = next(k for k, t in enumerate(tasks) if t.name == name)
    remaining = {}  # (task index, release) -> remaining
    s = 0
    while True:
        for k, t in enumerate(tasks):
            if s % t.period_ns == 0:
                remaining[(k, s)] = t.runtime_ns
        ready = [key for key, r in remaining.items() if r > 0]
        if ready:
            key = min(ready, key=lambda kr: (-(tasks[kr[0]].priority or 0), kr[1]))
            remaining[key] -= 1
            if key == (i, 0) and remaining[key] == 0:
                return s + 1
        s += 1


@SETTINGS
@given(tasks_st(mixed=True), server_st())
def test_mixed_and_tied_priorities_are_safe(tasks, server):
    if schedulable(tasks, server).schedulable:
        assert simulate(tasks, server, horizon_for(tasks, server)) is None


@SETTINGS
@given(tasks_st("edf"), st.sampled_from(SERVER_PERIODS), st.booleans())
def test_minimal_budget_is_minimal_in_simulation(tasks, period, edp):
    # Scale times so SCHED_DEADLINE's 1024 ns minimum runtime does not bind.
    k = 2048
    big = [replace(t, runtime_ns=t.runtime_ns * k, deadline_ns=t.deadline_ns * k,
                   period_ns=t.period_ns * k) for t in tasks]
    deadline = (period * k) // 2 if edp and period % 2 == 0 else None
    q = minimal_budget(big, period_ns=period * k, deadline_ns=deadline, granularity_ns=k)
    d = deadline if deadline is not None else period * k
    if q is None:
        full = EDP(period, d // k, d // k)
        assert simulate(tasks, full, horizon_for(tasks, full)) is not None
        return
    assert q % k == 0 and q >= DL_MIN_RUNTIME_NS
    small = EDP(period, q // k, d // k)
    assert simulate(tasks, small, horizon_for(tasks, small)) is None
    if q // k > 1:
        worse = EDP(period, q // k - 1, d // k)
        assert simulate(tasks, worse, horizon_for(tasks, worse)) is not None


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tasks_st(mixed=True, n_max=3), st.integers(1, 2))
def test_interface_for_servers_survive_simulation(tasks, vcpus):
    k = 1024  # keeps runtimes >= 1024 ns with unit task times
    big = [replace(t, runtime_ns=t.runtime_ns * k, deadline_ns=t.deadline_ns * k,
                   period_ns=t.period_ns * k) for t in tasks]
    iface = interface_for(big, vcpus=vcpus, period_bounds=(k, 12 * k), granularity_ns=k,
                          period_steps=6)
    for s in iface.servers:
        if not s.schedulable or not s.tasks:
            continue
        mine = [t for t in tasks if t.name in s.tasks]
        server = EDP(s.period_ns // k, s.budget_ns // k, s.deadline_ns // k)
        assert simulate(mine, server, horizon_for(mine, server)) is None
