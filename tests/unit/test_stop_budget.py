"""The stop budget's arithmetic (injectable clock) and the gdbstub backend's obedience to it."""
from __future__ import annotations

from fractions import Fraction

import pytest

from kairos_libvirt.introspect.budget import BudgetSpec, StopBudget

MS = 1_000_000
S = 1_000_000_000


class Clock:
    def __init__(self, t: int = 10 * S) -> None:
        self.t = t

    def __call__(self) -> int:
        return self.t


def budget(share=Fraction(1, 100), max_stop=5 * MS, **kw) -> StopBudget:
    return StopBudget(BudgetSpec(share=share, max_stop_ns=max_stop, **kw), clock=Clock())


def test_stopped_in_counts_overlaps_at_the_window_edges():
    b = budget()
    b.record(0, 4 * MS)
    b.record(10 * MS, 14 * MS)
    assert b.stopped_in(0, 20 * MS) == 8 * MS
    assert b.stopped_in(2 * MS, 12 * MS) == 4 * MS       # half of each
    assert b.stopped_in(4 * MS, 10 * MS) == 0             # the gap, edges touching
    assert b.stopped_in(13 * MS, 13 * MS) == 0


def test_the_first_stop_is_reserved_at_the_longest_allowed():
    b = budget(max_stop=5 * MS)
    assert b.expected_ns == 5 * MS
    b.record(0, 2 * MS)
    assert b.expected_ns == 3 * MS                        # 1.5 x the longest recent
    b.record(10 * MS, 10 * MS + 4 * MS)
    assert b.expected_ns == 5 * MS                        # capped at max_stop


def test_can_stop_refuses_a_stop_that_would_overrun_the_window_and_allows_it_later():
    b = budget(share=Fraction(1, 100), max_stop=4 * MS)   # 10 ms in any 1 s
    clock = b.clock
    b.record(clock.t, clock.t + 2 * MS)                   # expected: 3 ms
    clock.t += 2 * MS
    b.record(clock.t, clock.t + 2 * MS)
    clock.t += 2 * MS
    # 4 ms stopped, 3 ms more fits 10 ms; twice (6 ms) also; three times does not
    assert b.can_stop()
    assert b.can_stop(n=2)
    assert not b.can_stop(n=3)
    b.record(clock.t, clock.t + 2 * MS)
    b.record(clock.t + 2 * MS, clock.t + 4 * MS)
    clock.t += 4 * MS
    assert not b.can_stop()                               # 8 + 3 > 10
    wait = b.wait_left_ns()
    assert 0 < wait <= S
    # by then the first stop has left the window the next stop would close (an upper
    # bound: 1 ms of it leaving is enough here, 1.5 ms before is still too early)
    assert b.can_stop(now=clock.t + wait)
    assert not b.can_stop(now=clock.t + wait - 3 * MS // 2)


def test_the_open_stop_counts_while_the_vm_is_stopped():
    b = budget(share=Fraction(1, 100), max_stop=4 * MS)
    b.begin(now=0)
    assert b.stopped
    assert not b.can_stop(now=8 * MS)                     # 8 ms open + 4 ms expected > 10
    assert b.end(now=8 * MS) == 8 * MS
    assert not b.stopped and b.total_ns == 8 * MS and b.longest_ns == 8 * MS
    assert b.long_stops == 1                              # over max_stop: reported, not hidden


def test_the_report_counts_an_attach_stop_still_open():
    """The agent publishes as soon as introspection says "running", maybe before the
    attach stop has ended: the live state counts it already, with its time so far."""
    b = budget(share=Fraction(5, 100), max_stop=10 * MS, attach_stop_ns=200 * MS)
    b.begin("attach", now=b.clock.t)
    b.clock.t += 30 * MS
    r = b.report()
    assert (r["attach_stops"], r["stops"], r["stopped_ns"]) == (1, 1, 30 * MS)
    b.end()
    r = b.report()
    assert (r["attach_stops"], r["stops"], r["stopped_ns"]) == (1, 1, 30 * MS)


def test_peak_window_is_the_busiest_window_of_trap_stops():
    b = budget(share=Fraction(5, 100), max_stop=10 * MS)
    for k in range(5):                                     # 5 x 4 ms within 100 ms
        b.record(k * 20 * MS, k * 20 * MS + 4 * MS)
    b.record(3 * S, 3 * S + 4 * MS)                        # alone, 3 s later
    assert b.peak_window_ns == 20 * MS
    assert b.stops == 6 and b.total_ns == 24 * MS


def test_attach_stops_have_their_own_allowance_but_hold_traps_back():
    b = budget(share=Fraction(5, 100), max_stop=10 * MS, attach_stop_ns=200 * MS, attach_limit=2)
    assert b.can_attach()
    b.record(0, 120 * MS, "attach")
    assert b.attaches == 1 and b.attach_longest_ns == 120 * MS and b.long_stops == 0
    assert b.peak_window_ns == 0 and b.longest_ns == 0     # not a trap stop
    assert not b.can_stop(now=120 * MS)                    # traps wait for the attach to leave
    assert b.can_stop(now=120 * MS + S)
    b.record(2 * S, 2 * S + 300 * MS, "attach")
    assert b.long_stops == 1 and not b.can_attach()


def test_waiting_time_is_accounted():
    b = budget()
    b.start_wait(now=S)
    b.start_wait(now=S + 5)                                # idempotent
    assert b.waiting and b.waits == 1
    b.stop_wait(now=S + 300 * MS)
    assert not b.waiting and b.wait_ns == 300 * MS
    assert b.report()["budget_wait_ns"] == 300 * MS


def test_a_hit_is_charged_its_cost_beyond_the_stop_interrupts_are_not():
    b = budget(share=Fraction(5, 100), max_stop=10 * MS, hit_cost_ns=20 * MS)   # 50 ms a second
    clock = b.clock
    assert b.expected_ns == 30 * MS                       # a stop and the flush after it
    b.record(clock.t, clock.t + 2 * MS, kind="trap")
    b.record(clock.t + 100 * MS, clock.t + 102 * MS, kind="control")
    clock.t += 200 * MS
    assert b.stopped_in(clock.t - S, clock.t) == 2 * MS + 20 * MS + 2 * MS
    assert b.total_ns == 4 * MS and b.charged_ns == 20 * MS   # what the VM really stood
    assert b.expected_ns == 3 * MS + 20 * MS
    assert b.can_stop() and not b.can_stop(n=2)           # 24 + 23 fits 50; 24 + 46 does not
    assert b.can_stop(n=2, hits=1)                        # an interrupt and one hit: 24 + 3 + 23
    r = b.report()
    assert r["budget_hit_cost_ns"] == 20 * MS and r["charged_ns"] == 20 * MS


class FakeDom:
    def __init__(self, kind, version, fail=False):
        self.kind, self.version, self.fail = kind, version, fail

    def XMLDesc(self, flags):
        if self.fail:
            import libvirt
            raise libvirt.libvirtError("gone")
        return f"<domain type='{self.kind}'><name>x</name></domain>"

    def connect(self):
        return self

    def getVersion(self):
        return self.version


@pytest.mark.parametrize("kind, version, cost", [
    ("qemu", 7_002_022, 20 * MS), ("qemu", 10_001_000, 20 * MS), ("qemu", 10_002_000, 0),
    ("kvm", 7_002_022, 0)])
def test_hit_cost_follows_the_accelerator_and_the_qemu_version(kind, version, cost):
    from kairos_libvirt.introspect.backends import hit_cost_ns
    got, why = hit_cost_ns(FakeDom(kind, version))
    assert got == cost and (why is not None) == bool(cost)


def test_hit_cost_unknown_is_charged():
    from kairos_libvirt.introspect.backends import TCG_FLUSH_COST_NS, hit_cost_ns
    assert hit_cost_ns(FakeDom("qemu", 0, fail=True))[0] == TCG_FLUSH_COST_NS


def test_the_spec_refuses_a_stop_longer_than_the_share():
    with pytest.raises(AssertionError):
        BudgetSpec(share=Fraction(1, 100), max_stop_ns=20 * MS)


# -- the gdbstub backend keeps the budget (fake RSP client, fake clock) ----------

from tests.unit.test_introspect_runtime import FakeClient, make_backend  # noqa: E402


class TimedClient(FakeClient):
    """Each hit arrives ``gap`` after the last resume and takes ``cost`` to handle."""

    def __init__(self, rips, clock, gap=1 * MS, cost=4 * MS):
        super().__init__(rips)
        self.clock, self.gap, self.cost = clock, gap, cost

    def wait_stop(self, timeout=None, wake=None):
        if self.rips and self.rip is not None and self.rip not in self.breakpoints \
                and self.rips[0] not in self.breakpoints:
            self.rips.clear()            # the site is off: the guest runs past it
        if self.rips:
            self.clock.t += self.gap
        return super().wait_stop(timeout, wake)

    def set_register(self, name, value):
        self.clock.t += self.cost
        super().set_register(name, value)


def test_backend_takes_the_sites_off_when_the_budget_is_spent(tmp_path):
    import threading
    clock = Clock()
    b = StopBudget(BudgetSpec(share=Fraction(5, 100), max_stop_ns=10 * MS), clock=clock)
    c = TimedClient([0x1000] * 200, clock)
    be = make_backend(c, tmp_path, budget=b, rate=1e9, burst=1e9)
    be.arm(0x1000)
    stop = threading.Event()
    hits = []

    def on_hit(h, read):
        hits.append(h.stopped_ns)
        if len(hits) == 1:
            threading.Timer(0.3, stop.set).start()
    be.run(on_hit, stop)
    # 50 ms a window at 4 ms a hit: about ten hits, then the site waits, the guest does not
    assert 5 <= len(hits) < 20
    assert b.peak_window_ns <= b.spec.window_budget_ns
    assert b.waits == 1 and 0x1000 in be.budget_off and 0x1000 not in c.breakpoints
    # each hit says how long the VM had been stopped before it (monotonic, from the account)
    assert hits == sorted(hits) and hits[0] == 0 and hits[-1] > 0


def test_backend_refuses_to_rearm_while_over_budget_then_rearms(tmp_path):
    clock = Clock()
    b = StopBudget(BudgetSpec(share=Fraction(1, 100), max_stop_ns=4 * MS), clock=clock)
    c = FakeClient([])
    be = make_backend(c, tmp_path, budget=b)
    b.record(clock.t - 8 * MS, clock.t)          # 8 of 10 ms spent just now
    b.start_wait()
    be.budget_off.add(0x1000)
    be.arm(0x1000)                               # a request to arm while waiting: deferred
    c.state.name = "RUNNING"
    be._idle(c)
    assert c.interrupts == 0 and 0x1000 not in c.breakpoints
    clock.t += S                                 # the window is empty again
    be._idle(c)
    assert c.interrupts == 1 and 0x1000 in c.breakpoints and not be.budget_off
    assert not b.waiting and b.wait_ns == S
    assert b.stops == 2                          # the interrupt was a stop, accounted


def test_the_hot_sleep_sites_wait_first_and_the_lifecycle_sites_keep_a_reserve(tmp_path):
    from kairos_libvirt.introspect import gdbstub, plan
    clock = Clock()
    b = StopBudget(BudgetSpec(share=Fraction(5, 100), max_stop_ns=4 * MS), clock=clock)
    c = FakeClient([])
    be = make_backend(c, tmp_path, budget=b)
    kinds = {s.kind: s for s in plan.PLAN}
    be.plan.sites = {0x1000: kinds["sched_setattr"], 0x2000: kinds["clock_nanosleep"],
                     0x3000: kinds["exit"]}
    for a in be.plan.sites:
        be.arm(a)
    # Room for two more expected stops, not for 1 + RESERVE_STOPS: the sleep site waits.
    b.record(clock.t - 42 * MS, clock.t)         # 42 of 50 ms spent
    assert b.can_stop(n=2) and not b.can_stop(n=1 + gdbstub.RESERVE_STOPS)
    be._keep_budget()
    assert be.budget_off == {0x2000} and be.armed == {0x1000, 0x3000}
    # No room for even one stop: everything waits.
    b.record(clock.t - 5 * MS, clock.t)          # 47 of 50 ms: not one more 4 ms stop
    be._keep_budget()
    assert be.budget_off == {0x1000, 0x2000, 0x3000} and not be.armed
