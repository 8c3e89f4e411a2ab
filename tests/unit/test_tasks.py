"""The guest task model's evidence rules and the adaptation's do-no-harm rules (issue 11).

Each test names the rule it guards; removing the rule makes it fail.  The
replay at the end drives the real runtime (``Introspector._on_hit``, the
sampling policy, ``adapted()``) through the sequence measured on a TCG guest
under gdbstub traps.  Fakes (named as such): ``FakeGuestMemory``, the
``FakeBackend`` of test_introspect_runtime and a fake host clock.
"""
from __future__ import annotations

import struct
from fractions import Fraction

import pytest

from kairos_libvirt import analysis
from kairos_libvirt.introspect import adapt as adapt_mod
from kairos_libvirt.introspect import plan, runtime, tasks
from kairos_libvirt.introspect.decode import PT_REGS_OFFSETS, SchedRequest, SleepRequest, Timespec
from kairos_libvirt.introspect.plan import GuestEvent, Hit
from kairos_libvirt.introspect.tasks import PERIOD_CONFIRM, TaskModel
from kairos_libvirt.model import VcpuSched
from tests.unit.test_introspect_runtime import FakeBackend, FakeSymbols

MS = 1_000_000
T = 4 * MS  # cyclictest -i 4000


def fifo(m: TaskModel, key: str = "a", prio: int = 80) -> None:
    m.apply(GuestEvent("sched", key, 0, 0, sched=SchedRequest("fifo", prio)))


def sleep(key, ns, *, absolute=True, t=0, stopped=None, vcpu=0):
    return GuestEvent("sleep", key, vcpu, t, stopped_ns=stopped,
                      sleep=SleepRequest(1, absolute, Timespec(ns // 10**9, ns % 10**9)))


def feed(m, targets, key="a", stopped=None):
    for i, ns in enumerate(targets):
        m.apply(sleep(key, 10**9 + ns, t=i, stopped=stopped))


# -- 1. a period is believed only on evidence -------------------------------------

def test_abstime_period_is_the_gcd_of_requested_wakeups_however_many_periods_skipped():
    """Stops make cyclictest skip periods (``next += interval`` while late): gaps of
    34-36 periods.  The requested targets still differ by whole periods: T exactly
    (the old estimator took their median, 137 ms, as the period)."""
    m = TaskModel()
    fifo(m)
    ks = [34, 35, 36, 34, 35, 37, 34, 36]
    feed(m, [sum(ks[:i]) * T for i in range(len(ks) + 1)])
    t = m.tasks["a"]
    assert t.observed_period_ns == T and t.periods.source == "abstime"
    assert t.periods.jitter_ns == 0 and t.periods.support == len(ks)


def test_no_period_before_period_confirm_samples():
    m = TaskModel()
    fifo(m)
    feed(m, [i * T for i in range(PERIOD_CONFIRM)])  # PERIOD_CONFIRM - 1 gaps
    assert m.tasks["a"].observed_period_ns is None and m.tasks["a"].demand() is None
    v = m.version
    assert m.apply(sleep("a", 10**9 + PERIOD_CONFIRM * T, t=99))
    assert m.tasks["a"].observed_period_ns == T and m.version == v + 1


def test_a_changed_period_needs_period_confirm_consistent_samples():
    m = TaskModel()
    fifo(m)
    feed(m, [i * T for i in range(10)])
    assert m.tasks["a"].observed_period_ns == T
    v, last = m.version, 9 * T
    for i in range(1, PERIOD_CONFIRM):              # 5 ms gaps: not a multiple of 4 ms
        assert not m.apply(sleep("a", 10**9 + last + i * 5 * MS, t=100 + i))
        assert m.tasks["a"].observed_period_ns == T and m.version == v
    assert m.apply(sleep("a", 10**9 + last + PERIOD_CONFIRM * 5 * MS, t=200))
    assert m.tasks["a"].observed_period_ns == 5 * MS and m.version == v + 1


def test_isolated_odd_gaps_never_move_the_period():
    m = TaskModel()
    fifo(m)
    feed(m, [i * T for i in range(10)])
    v, last = m.version, 9 * T
    for i in range(40):  # every other gap odd (a hiccup): never PERIOD_CONFIRM in a row
        last += 7_300_000 if i % 2 else T
        m.apply(sleep("a", 10**9 + last, t=100 + i))
    assert m.tasks["a"].observed_period_ns == T and m.version == v


def test_gap_across_a_stop_of_the_guest_is_no_sample():
    """Each trap stops the VM 4 ms (its own cost: a sample); a gap across another
    300 ms stop (attach, other traps) is a span, not a sample."""
    m = TaskModel()
    fifo(m)
    stopped = 0
    for i in range(8):
        m.apply(sleep("a", 10**9 + i * T, t=i, stopped=stopped))
        stopped += 4 * MS
    t = m.tasks["a"]
    assert t.periods.count == 7 and t.periods.rejected == 0 and m.own_stop_ns == 4 * MS
    stopped += 300 * MS  # someone else's stop
    m.apply(sleep("a", 10**9 + 8 * T, t=9, stopped=stopped))
    assert t.periods.count == 7 and t.periods.rejected == 1 and t.periods.spans == [T]


def test_relative_gaps_exclude_the_tasks_own_trap_stop():
    """Relative sleeps: host time between calls less the trap's own stop (source "gaps")."""
    m = TaskModel()
    fifo(m)
    host = stopped = 0
    for i in range(8):
        m.apply(sleep("a", 3_600_000, absolute=False, t=host, stopped=stopped))
        stopped += 4 * MS
        host += T + 4 * MS  # 0.4 ms busy + 3.6 ms sleep, plus the 4 ms trap stop
    t = m.tasks["a"]
    assert t.periods.source == "gaps" and t.observed_period_ns == T
    assert t.busy.believed == 400_000
    assert t.demand() == (400_000, T, T)


def test_sampling_pause_gap_is_no_sample_and_resampling_changes_nothing():
    m = TaskModel()
    fifo(m)
    feed(m, [i * T for i in range(20)])
    t = m.tasks["a"]
    demand, v, count = t.demand(), m.version, t.periods.count
    m.resume_sampling(fresh=runtime.RESAMPLE_SAMPLES)
    assert not m.stable()
    # 10.25 s later (the traps were off): a span, not a sample.
    last = 19 * T + 10_252 * MS
    assert not m.apply(sleep("a", 10**9 + last, t=50))
    assert t.periods.count == count and t.periods.spans[-1] == 10_252 * MS
    for i in range(1, runtime.RESAMPLE_SAMPLES + 1):
        assert not m.apply(sleep("a", 10**9 + last + i * T, t=50 + i))
    assert t.demand() == demand and m.version == v and m.stable()


def test_rate_limit_pause_gap_is_no_sample():
    m = TaskModel()
    fifo(m)
    feed(m, [i * T for i in range(10)])
    count = m.tasks["a"].periods.count
    m.note_pause()
    m.apply(sleep("a", 10**9 + 9 * T + 2_008 * MS, t=99))
    assert m.tasks["a"].periods.count == count and m.tasks["a"].periods.rejected == 1


def test_jittery_gaps_spread_too_wide_give_no_period():
    m = TaskModel()
    fifo(m)
    gaps = [3 * MS, 9_100_000, 4_700_000, 13_900_000, 6_100_000, 21_300_000]
    feed(m, [sum(gaps[:i]) for i in range(len(gaps) + 1)])
    assert m.tasks["a"].observed_period_ns is None


def sampled(key, ns, spacing, t=0):
    """A target read from memory by the sampler, ``spacing`` ns after the read that last saw
    the previous target pending."""
    return GuestEvent("sleep", key, 0, t, spacing_ns=spacing,
                      sleep=SleepRequest(1, True, Timespec(ns // 10**9, ns % 10**9)))


def test_sampled_targets_read_too_rarely_are_spans_not_a_threefold_period():
    """Measured (e2e test_delivered_supply, CI): a 50 ms cyclictest read every ~145 ms
    showed every third target; the GCD made its period 150 ms.  Reads more than half a
    gap apart may skip targets: those gaps are spans and teach no period."""
    m = TaskModel()
    fifo(m)
    for i in range(12):
        m.apply(sampled("a", 10**9 + i * 150 * MS, None if i == 0 else 145 * MS, t=i))
    t = m.tasks["a"]
    assert t.observed_period_ns is None and t.periods.count == 0
    assert t.periods.rejected == 11 and set(t.periods.spans) == {150 * MS}
    # Read every ~2 ms, the same task gives consecutive targets: 50 ms.
    last = 11 * 150 * MS
    for i in range(1, PERIOD_CONFIRM + 1):
        m.apply(sampled("a", 10**9 + last + i * 50 * MS, 2 * MS, t=20 + i))
    assert t.observed_period_ns == 50 * MS and t.periods.source == "abstime"


def test_a_slow_readers_span_that_breaks_the_period_brings_the_fast_reads_back():
    """Once stable the sampler reads every ~250 ms: its gaps are spans.  One that is no
    multiple of the believed period makes the model unstable (the sampler speeds up),
    and only PERIOD_CONFIRM fresh samples move the period."""
    m = TaskModel()
    fifo(m)
    for i in range(20):
        m.apply(sampled("a", 10**9 + i * 50 * MS, None if i == 0 else 3 * MS, t=i))
    t = m.tasks["a"]
    assert t.observed_period_ns == 50 * MS and m.stable()
    last = 19 * 50 * MS
    last += 300 * MS                                   # a slow read, whole periods: fine
    assert not m.apply(sampled("a", 10**9 + last, 260 * MS, t=30))
    assert m.stable() and t.periods.spans[-1] == 300 * MS
    last += 280 * MS                                   # the task now runs every 70 ms
    assert not m.apply(sampled("a", 10**9 + last, 240 * MS, t=31))
    assert not m.stable() and t.observed_period_ns == 50 * MS
    for i in range(PERIOD_CONFIRM):
        last += 70 * MS
        m.apply(sampled("a", 10**9 + last, 10 * MS, t=40 + i))
    assert t.observed_period_ns == 70 * MS


def test_structure_counts_guest_changes_not_beliefs():
    m = TaskModel()
    fifo(m)
    s = m.structure
    feed(m, [i * T for i in range(10)])
    assert m.structure == s and m.tasks["a"].observed_period_ns == T
    m.apply(GuestEvent("sched", "a", 0, 0, sched=SchedRequest("fifo", 70)))
    assert m.structure == s + 1
    m.apply(GuestEvent("exit", "a", 0, 0))
    assert m.structure == s + 2


# -- 2. never worse than declared -------------------------------------------------------

def fp_model(period=T):
    m = TaskModel()
    fifo(m)
    feed(m, [i * period for i in range(10)])
    return m


DECLARED = {0: VcpuSched("deadline", 1 * MS, 10 * MS)}
CEIL = {0: Fraction(3, 5)}


def test_declared_server_that_guarantees_every_task_stays():
    # 4 ms of 5 every 5 ms: a 0.4 ms task due in 4 ms always gets it.
    base = {0: VcpuSched("deadline", 4 * MS, 5 * MS)}
    a = adapt_mod.adapt(fp_model(), base, {0: Fraction(4, 5)})[0]
    assert a.source == "declared" and a.sched == base[0]


def test_adapted_server_guarantees_what_the_declared_one_did_and_more():
    a = adapt_mod.adapt(fp_model(), DECLARED, CEIL)[0]
    assert a.source == "introspection"
    tsk = [analysis.Task(name="a", runtime_ns=400_000, deadline_ns=T, period_ns=T,
                         priority=80, scheduler="fp")]
    ov = adapt_mod.DEFAULT_OVERHEAD_NS
    assert adapt_mod.guarantees(tsk, adapt_mod.server_supply(DECLARED[0], ov)) == frozenset()
    assert adapt_mod.guarantees(tsk, adapt_mod.server_supply(a.sched, ov)) == {"a"}


def test_each_task_carries_the_response_bound_of_the_reservation_in_force():
    """The live state says what the reservation guarantees each task: its worst-case
    response time under the server in force (within its deadline), or nothing."""
    a = adapt_mod.adapt(fp_model(), DECLARED, CEIL)[0]
    bounds = dict(a.bounds)
    assert set(bounds) == {"a"} and bounds["a"] is not None and 400_000 <= bounds["a"] <= T
    tsk = [analysis.Task(name="a", runtime_ns=400_000, deadline_ns=T, period_ns=T,
                         priority=80, scheduler="fp")]
    ov = adapt_mod.DEFAULT_OVERHEAD_NS
    assert adapt_mod.response_bounds(tsk, adapt_mod.server_supply(a.sched, ov)) == bounds
    # The declared server guarantees nothing to it: no bound, the same rule as guarantees().
    assert adapt_mod.response_bounds(tsk, adapt_mod.server_supply(DECLARED[0], ov)) == {"a": None}


def test_a_server_that_drops_a_guarantee_is_refused(monkeypatch):
    """Two tasks; the declared server guarantees the slow one.  A candidate that would
    guarantee the fast one but lose the slow one is not granted."""
    m = fp_model()
    m.apply(GuestEvent("sched", "b", 0, 0, sched=SchedRequest("fifo", 10)))
    feed(m, [i * 100 * MS for i in range(10)], key="b")
    base = {0: VcpuSched("deadline", 30 * MS, 50 * MS)}
    real_guarantees = adapt_mod.guarantees

    def candidate_loses_b(tasks_, supply):
        got = real_guarantees(tasks_, supply)
        return got if supply.period_ns == 50 * MS else (got | {"a"}) - {"b"}
    monkeypatch.setattr(adapt_mod, "guarantees", candidate_loses_b)
    a = adapt_mod.adapt(m, base, {0: Fraction(4, 5)})[0]
    assert real_guarantees([analysis.Task(name="b", runtime_ns=10 * MS, deadline_ns=100 * MS,
                                          period_ns=100 * MS, priority=10, scheduler="fp")],
                           adapt_mod.server_supply(base[0], adapt_mod.DEFAULT_OVERHEAD_NS))
    assert a.source == "declared" and a.sched == base[0] and "no longer guarantee" in a.note


def test_adapted_period_never_above_the_shortest_deadline(monkeypatch):
    real = analysis.interface_for

    def long_period(*a, **k):
        iface = real(*a, **k)
        s = iface.servers[0]
        import dataclasses
        return dataclasses.replace(iface, servers=(dataclasses.replace(
            s, period_ns=10 * T, deadline_ns=10 * T, budget_ns=s.budget_ns * 10),))
    monkeypatch.setattr(analysis, "interface_for", long_period)
    a = adapt_mod.adapt(fp_model(), DECLARED, CEIL)[0]
    assert a.source == "declared" and "shortest guest deadline" in a.note


def test_server_supply_is_the_one_model_for_both():
    ov = adapt_mod.DEFAULT_OVERHEAD_NS
    s = adapt_mod.server_supply(VcpuSched("deadline", 1 * MS, 10 * MS, deadline_ns=5 * MS), ov)
    assert (s.period_ns, s.budget_ns, s.deadline_ns) == (10 * MS, 1 * MS - ov, 5 * MS)
    prm = adapt_mod.server_supply(VcpuSched("fifo", 1 * MS, 10 * MS, priority=5), ov)
    assert prm.deadline_ns == prm.period_ns == 10 * MS
    assert adapt_mod.server_supply(VcpuSched("deadline", ov, 10 * MS), ov) is None


# -- the runtime: hysteresis, counters, and the replay -----------------------------------

STACK_TOP = 0xffffc90000124000
PT_REGS = STACK_TOP - plan.PT_REGS_SIZE
TS_BUF, PARAM_BUF = 0x7ffd0000, 0x7ffd1000
SLEEP_SITE, SCHED_SITE = 0x204000, 0x202000


class FakeClock:
    """The host's monotonic clock, advanced by the replay (a fake, named as such)."""

    def __init__(self):
        self.ns = 10**12

    def monotonic(self):
        return self.ns / 1e9

    def monotonic_ns(self):
        return self.ns


def ptregs(**user):
    raw = bytearray(plan.PT_REGS_SIZE)
    for name, value in user.items():
        struct.pack_into("<Q", raw, PT_REGS_OFFSETS[name], value)
    return bytes(raw)


class Replay:
    """A guest running ``cyclictest -i 4000`` under gdbstub traps, step by step."""

    def __init__(self, monkeypatch, declared=DECLARED):
        self.clock = FakeClock()
        monkeypatch.setattr(runtime, "time", self.clock)
        self.be = FakeBackend()
        self.be.identifies_tasks = False
        self.intro = runtime.Introspector(self.be, lambda read: FakeSymbols(), declared, CEIL)
        # As attached: both sites armed (the attach itself is another test's business).
        self.be.plan.sites[SCHED_SITE] = plan.PLAN[1]
        self.be.plan.sites[SLEEP_SITE] = plan.PLAN[3]
        self.be.armed |= {SCHED_SITE, SLEEP_SITE}
        self.intro._sleep_sites = [SLEEP_SITE]
        self.intro.status.state = "running"
        self.stopped = 0
        self.guest = 0               # guest CLOCK_MONOTONIC
        self.next = 0
        self.periods = set()         # every period the model believed
        self.servers = []            # every server adaptation decided
        self.mem = self.be.mem
        # cyclictest: sched_setscheduler(0, SCHED_FIFO, {80})
        self.mem.put(PT_REGS, ptregs(di=0, si=1, dx=PARAM_BUF))
        self.mem.put(PARAM_BUF, struct.pack("<i", 80))
        self._hit("sched_setscheduler", SCHED_SITE)

    def _hit(self, kind, site, cost_ns=4 * MS):
        h = Hit(kind, 0, {"rsp": STACK_TOP - 0x100, "rdi": PT_REGS, "rip": site},
                self.clock.ns, stopped_ns=self.stopped)
        self.be.counters.hits += 1
        self.intro._on_hit(h, self.mem.read)
        self.be.control.run_pending()
        self.advance(cost_ns, stop=True)

    def advance(self, ns, stop=False):
        """Time passes on the host; the guest clock runs on (TCG: wall-clock rate)."""
        self.clock.ns += ns
        self.guest += ns
        if stop:
            self.stopped += ns

    def sleep_hit(self, target_ns):
        self.mem.put(PT_REGS, ptregs(di=1, si=1, dx=TS_BUF))
        self.mem.put(TS_BUF, struct.pack("<qq", target_ns // 10**9, target_ns % 10**9))
        self._hit("clock_nanosleep", SLEEP_SITE)

    def iteration(self, busy_ns=50_000):
        """One cyclictest loop: clock_nanosleep(TIMER_ABSTIME, next), then its work."""
        self.next += T
        while self.guest > self.next:  # late: cyclictest skips the missed periods
            self.next += T
        if SLEEP_SITE in self.be.armed:
            self.sleep_hit(self.next)
        if self.guest < self.next:
            self.advance(self.next - self.guest)
        self.advance(busy_ns)
        self.observe()

    def observe(self):
        self.intro.tick()
        self.be.control.run_pending()
        for t in self.intro.model.rt_tasks():
            self.periods.add(t.observed_period_ns)
        a = self.intro.adapted()[0]
        if not self.servers or self.servers[-1] != a.sched:
            self.servers.append(a.sched)


def test_replay_of_the_measured_sequence_keeps_4ms_and_never_flips(monkeypatch):
    """The run of issue 11: stops inflating gaps, a rate-limit cool-down, an attach-like
    stop, a guest so starved that it wakes every 34-37 periods, and the agent's
    re-sampling pauses.  The period believed is 4 ms throughout (or not yet known),
    the vCPU's server changes once (declared -> analysed, period <= 4 ms), and the
    re-sampling never changes it."""
    monkeypatch.setattr(runtime, "COALESCE_S", 0.0)
    r = Replay(monkeypatch)
    for _ in range(60):                       # traps dearer than the period: k = 1, 2
        r.iteration()
    r.be.disarm(SLEEP_SITE)                   # the backend's rate limit: 2 s cool-down
    r.be.counters.suppressed += 1
    r.advance(2_000 * MS)
    r.be.arm(SLEEP_SITE)
    for _ in range(30):
        r.iteration()
    r.stopped += 300 * MS                     # someone else's stop (attach, a read)
    r.advance(300 * MS, stop=False)
    for _ in range(30):
        r.iteration(busy_ns=138 * MS)         # starved: wakes every 34-37 periods
    for _ in range(3):                        # three re-sampling rounds, 10 s apart
        for _ in range(2_600):
            r.iteration()
    assert r.periods <= {None, T} and T in r.periods
    changes = [s for s in r.servers[1:]]
    assert len(changes) == 1 and r.servers[0] == DECLARED[0], r.servers
    assert changes[0].period_ns <= T
    assert r.intro.server_changes == 1 and r.intro.server_flips == 0
    assert r.intro._sleep_sites and r.be.counters.hits > 0
    # Re-sampling happened (the traps went off and on again): it moved nothing.
    assert r.intro.model.tasks[next(iter(r.intro.model.tasks))].periods.rejected >= 3


def test_flips_are_counted_when_beliefs_flap(monkeypatch):
    """Without the hysteresis (PERIOD_CONFIRM = 1) an alternating gap pattern moves the
    period back and forth with no change in the guest's tasks: the counter shows it."""
    monkeypatch.setattr(runtime, "COALESCE_S", 0.0)
    monkeypatch.setattr(tasks, "PERIOD_CONFIRM", 1)
    r = Replay(monkeypatch)
    last = 10**9
    for i in range(40):
        last += T if (i // 6) % 2 == 0 else 5 * MS
        r.sleep_hit(last)
        r.observe()
    assert r.intro.server_changes >= 3 and r.intro.server_flips > 0


def test_adaptation_counters_reach_the_live_state():
    from kairos_libvirt import metrics, state
    assert {"server_changes", "server_flips"} <= set(state.INTRO_COUNTERS)
    names = {k for k, *_ in metrics.INTRO_COUNTER_FAMILIES}
    assert {"server_changes", "server_flips"} <= names
    st = state.DomainState(agent_pid=1, qemu_pid=2, introspection={
        "backend": "gdbstub", "state": "running", "server_changes": 3, "server_flips": 0},
        tasks=[{"key": "0x1", "policy": "fifo", "period_source": "abstime"}])
    back = state.from_xml(state.to_xml(st))
    assert back.introspection["server_changes"] == 3 and back.introspection["server_flips"] == 0
    assert back.tasks[0]["period_source"] == "abstime"


class FakeBudget:
    waits = 0


@pytest.mark.parametrize("why", [None, "rate limit", "stop budget"])
def test_runtime_notes_a_pause_the_backend_made(monkeypatch, why):
    """The backend took the site off (rate limit, or the stop budget spent): the gap
    across is no sample.  With no such pause the same gap is one (a control)."""
    r = Replay(monkeypatch)
    r.be.budget = FakeBudget()
    for _ in range(12):
        r.iteration()
    t = next(iter(r.intro.model.tasks.values()))
    count = t.periods.count
    r.be.disarm(SLEEP_SITE)
    if why == "rate limit":
        r.be.counters.suppressed += 1
    elif why == "stop budget":
        r.be.budget.waits += 1
    r.advance(2_000 * MS + 1_000_000)
    r.be.arm(SLEEP_SITE)
    r.iteration()
    assert (t.periods.count == count) == (why is not None)


def test_adapted_deadline_servers_keep_room_for_the_hosts_overrun():
    """Raised to the declared floor, the server's deadline moves out so runtime + g still fits."""
    g = 4_000_000
    s = analysis.interface_for([analysis.Task("t", 2_000_000, 50_000_000)], vcpus=1,
                               overhead_ns=20_000, enforcement_ns=g).servers[0]
    base = VcpuSched("deadline", 9 * s.period_ns // 10, s.period_ns)  # a 0.9 floor
    assert adapt_mod._candidate(s, base, Fraction(1), g) is None  # 0.9 Π + g > Π
    base = VcpuSched("deadline", s.period_ns // 2, s.period_ns)
    sched, _, _ = adapt_mod._candidate(s, base, Fraction(1), g)
    assert sched.runtime_ns >= s.period_ns // 2
    assert sched.runtime_ns + g <= sched.deadline_ns <= sched.period_ns
