"""Trap plan, task model, adaptation, gdbstub backend and the runtime, with fakes.

Fakes used here (named as such): ``FakeMemory`` (a guest address space in a
dict), ``FakeClient`` (an RspClient that replays stops), ``FakeBackend``.
"""
from __future__ import annotations

import struct
import threading
import time
from fractions import Fraction

import pytest

from kairos_libvirt import analysis
from kairos_libvirt.errors import AnalysisError, KairosError
from kairos_libvirt.introspect import adapt as adapt_mod
from kairos_libvirt.introspect import backends, gdbstub, plan, runtime
from kairos_libvirt.introspect.decode import (DecodeError, PT_REGS_OFFSETS, SchedRequest,
                                              SleepRequest, Timespec)
from kairos_libvirt.introspect.plan import GuestEvent, Hit
from kairos_libvirt.introspect.control import ControlQueue
from tests.unit.fakes import FakeGuestMemory
from kairos_libvirt.introspect.tasks import MAX_TASKS, PERIOD_CONFIRM, STABLE_SAMPLES, TaskModel
from kairos_libvirt.model import VcpuSched

STACK_TOP = 0xffffc90000124000
PT_REGS = STACK_TOP - plan.PT_REGS_SIZE
USER_BUF = 0x7ffd0000


FakeMemory = FakeGuestMemory


def ptregs(**user):
    raw = bytearray(plan.PT_REGS_SIZE)
    for name, value in user.items():
        struct.pack_into("<Q", raw, PT_REGS_OFFSETS[name], value)
    return bytes(raw)


def sched_attr(policy, prio=0, runtime=0, deadline=0, period=0):
    return struct.pack("<IIQiIQQQ", 48, policy, 0, 0, prio, runtime, deadline, period)


def hit(kind, mem, *, rsp=STACK_TOP - 0x200, rdi=PT_REGS, vcpu=0, t=0):
    return Hit(kind, vcpu, {"rsp": rsp, "rdi": rdi, "rip": 0}, t)


# -- plan --------------------------------------------------------------------

def test_decode_sched_setattr_hit():
    mem = FakeMemory()
    mem.put(PT_REGS, ptregs(di=0, si=USER_BUF, dx=0))
    mem.put(USER_BUF, sched_attr(6, runtime=2_000_000, deadline=10_000_000, period=10_000_000))
    ev = plan.decode_hit(hit("sched_setattr", mem), mem.read)
    assert ev.kind == "sched" and ev.task_key == f"{PT_REGS:#x}" and ev.target_pid == 0
    assert (ev.sched.policy, ev.sched.runtime_ns, ev.sched.period_ns) == \
        ("deadline", 2_000_000, 10_000_000)


def test_decode_sleep_and_exit_and_setscheduler():
    mem = FakeMemory()
    mem.put(PT_REGS, ptregs(di=1, si=1, dx=USER_BUF))  # CLOCK_MONOTONIC, TIMER_ABSTIME
    mem.put(USER_BUF, struct.pack("<qq", 5, 250_000_000))
    ev = plan.decode_hit(hit("clock_nanosleep", mem), mem.read)
    assert ev.sleep.absolute and ev.sleep.time.ns == 5_250_000_000
    assert plan.decode_hit(hit("exit", mem), mem.read).kind == "exit"
    mem.put(PT_REGS, ptregs(di=0, si=1, dx=USER_BUF))
    mem.put(USER_BUF, struct.pack("<i", 42))
    ev = plan.decode_hit(hit("sched_setscheduler", mem), mem.read)
    assert (ev.sched.policy, ev.sched.priority) == ("fifo", 42)


def test_hostile_hits_are_decode_errors():
    mem = FakeMemory()
    with pytest.raises(DecodeError, match="not this task's pt_regs"):
        plan.decode_hit(hit("sched_setattr", mem, rdi=0xdead0000), mem.read)
    mem.put(PT_REGS, ptregs(si=0))  # NULL user pointer
    with pytest.raises(DecodeError):
        plan.decode_hit(hit("sched_setattr", mem), mem.read)
    with pytest.raises(KairosError):  # unmapped pt_regs
        plan.decode_hit(hit("nanosleep", FakeMemory()), FakeMemory().read)


def test_resolve_plan_checks_sites():
    addrs = {"__x64_sys_sched_setattr": 0x1000, "__x64_sys_sched_setscheduler": 0x2000,
             "__x64_sys_sched_setparam": 0x3000, "__x64_sys_clock_nanosleep": 0x4000}

    def resolve(name):
        if name not in addrs:
            raise KairosError(f"no symbol {name}")
        return addrs[name]

    rp = plan.resolve_plan(resolve, lambda a: a)
    assert rp.kind_at(0x1000) == "sched_setattr" and rp.kind_at(0x9999) is None
    assert len(rp.skipped) == 2  # nanosleep and do_exit are optional
    del addrs["__x64_sys_clock_nanosleep"]
    with pytest.raises(KairosError, match="clock_nanosleep"):
        plan.resolve_plan(resolve, lambda a: a)

    def bad_fentry(a):
        raise KairosError("bytes at the site are not the fentry NOP")
    with pytest.raises(KairosError, match="fentry NOP"):
        plan.resolve_plan(lambda n: 1, bad_fentry)


# -- task model ---------------------------------------------------------------

def sched_ev(key, req, t=0, vcpu=0, pid=0, tid=None):
    return GuestEvent("sched", key, vcpu, t, tid=tid, target_pid=pid, sched=req)


def sleep_ev(key, ns, absolute=True, t=0, vcpu=0):
    return GuestEvent("sleep", key, vcpu, t,
                      sleep=SleepRequest(1, absolute, Timespec(ns // 10**9, ns % 10**9)))


def test_model_learns_a_periodic_fifo_task_with_skipped_wakeups():
    m = TaskModel()
    assert m.apply(sched_ev("a", SchedRequest("fifo", 50)))
    targets = [0, 5, 10, 20, 25, 40, 45, 50]  # cyclictest skips missed periods
    for i, ms in enumerate(targets):
        m.apply(sleep_ev("a", 10**9 + ms * 1_000_000, t=i))
    t = m.tasks["a"]
    assert t.observed_period_ns == 5_000_000 and t.periods.source == "abstime"
    assert t.periods.jitter_ns == 0      # every gap a whole number of periods
    assert t.demand() == (500_000, 5_000_000, 5_000_000)  # assumed 10 % until measured


def feed_targets(m, key, targets_ns, t0=0):
    for i, ns in enumerate(targets_ns):
        m.apply(sleep_ev(key, 10**9 + ns, t=t0 + i))


def test_model_period_is_a_tolerant_gcd_of_the_gaps():
    m = TaskModel()
    m.apply(sched_ev("a", SchedRequest("fifo", 50)))
    # 3T, 4T, 3T, 5T, 3T, each a few µs off (a program that computes its targets from now).
    gaps = [15_010_000, 19_990_000, 15_020_000, 25_000_000, 14_995_000]
    feed_targets(m, "a", [sum(gaps[:i]) for i in range(len(gaps) + 1)])
    assert abs(m.tasks["a"].observed_period_ns - 5_000_000) <= 50_000


def test_model_fixed_cadence_is_broken_by_a_span_across_a_sampling_pause():
    """Traps costlier than the period lock a TCG guest into k·T (seen in CI: 4·5 ms)."""
    m = TaskModel()
    m.apply(sched_ev("a", SchedRequest("fifo", 50)))
    feed_targets(m, "a", [i * 20_000_000 for i in range(10)])
    t = m.tasks["a"]
    assert t.observed_period_ns == 20_000_000  # all the gaps can show
    assert t.periods.count == 9
    m.resume_sampling(fresh=4)
    assert t.resumed
    # 10.010 s later (2002 periods of 5 ms): only a span, no sample.  It proposes
    # 10 ms; consistent samples must confirm it before it is believed.
    last = 180_000_000 + 10_010_000_000
    assert not m.apply(sleep_ev("a", 10**9 + last, t=20))
    assert t.periods.spans == [10_010_000_000] and t.periods.count == 9
    assert t.observed_period_ns == 20_000_000 and t.periods.proposed == 10_000_000
    for i in range(1, PERIOD_CONFIRM + 1):
        m.apply(sleep_ev("a", 10**9 + last + i * 20_000_000, t=20 + i))
    assert t.observed_period_ns == 10_000_000
    last += PERIOD_CONFIRM * 20_000_000
    m.resume_sampling(fresh=4)
    m.apply(sleep_ev("a", 10**9 + last + 4_005_000_000, t=40))  # 801 periods: odd
    last += 4_005_000_000
    for i in range(1, PERIOD_CONFIRM + 1):
        m.apply(sleep_ev("a", 10**9 + last + i * 20_000_000, t=40 + i))
    assert t.observed_period_ns == 5_000_000
    # A span that fits nothing (another loop) never widens or breaks it.
    m.resume_sampling(fresh=4)
    m.apply(sleep_ev("a", 10**9 + 30_000_000_000 + 1_234_567, t=60))
    assert t.observed_period_ns == 5_000_000


def test_model_jittery_gaps_fall_back_to_the_median():
    m = TaskModel()
    m.apply(sched_ev("a", SchedRequest("fifo", 50)))
    gaps = [5_000_000, 5_210_000, 4_930_000, 5_330_000, 5_070_000]
    feed_targets(m, "a", [sum(gaps[:i]) for i in range(len(gaps) + 1)])
    assert m.tasks["a"].observed_period_ns == 5_070_000


def test_model_relative_sleep_after_a_pause_is_not_a_gap():
    m = TaskModel()
    m.apply(sched_ev("a", SchedRequest("rr", 5)))
    for i in range(3):
        m.apply(sleep_ev("a", 4_000_000, absolute=False, t=i * 5_000_000))
    m.resume_sampling(fresh=4)
    m.apply(sleep_ev("a", 4_000_000, absolute=False, t=10 * 10**9))
    t = m.tasks["a"]
    assert t.periods.pending == [5_000_000, 5_000_000] and t.busy.samples == [1_000_000] * 2
    assert t.periods.rejected == 1
    m.apply(sleep_ev("a", 4_000_000, absolute=False, t=10 * 10**9 + 5_000_000))
    assert t.periods.pending[-1] == 5_000_000 and t.periods.source is None


def test_model_relative_sleeps_measure_busy_time():
    m = TaskModel()
    m.apply(sched_ev("a", SchedRequest("rr", 5)))
    for i in range(6):  # sleep 4 ms, call every 5 ms: 1 ms busy
        m.apply(sleep_ev("a", 4_000_000, absolute=False, t=i * 5_000_000))
    assert m.tasks["a"].observed_period_ns == 5_000_000
    assert m.tasks["a"].demand() == (1_000_000, 5_000_000, 5_000_000)


def test_model_exit_other_and_unknown_targets():
    m = TaskModel()
    dl = SchedRequest("deadline", 0, 2_000_000, 10_000_000, 10_000_000)
    m.apply(sched_ev("a", dl, tid=7))
    assert m.tasks["a"].demand() == (2_000_000, 10_000_000, 10_000_000)
    m.apply(sched_ev("b", SchedRequest("fifo", 9), pid=7))  # b sets a's policy by tid
    assert m.tasks["a"].policy == "fifo" and "b" not in m.tasks
    m.apply(sched_ev("b", SchedRequest("fifo", 9), pid=99))
    assert "pid:99" in m.tasks
    assert m.apply(GuestEvent("exit", "a", 0, 0))
    assert not m.apply(GuestEvent("exit", "a", 0, 0))
    assert m.apply(sched_ev("pid:99", SchedRequest("other")))
    assert "pid:99" not in m.tasks
    assert not m.apply(sleep_ev("nobody", 10**9))          # non-RT sleeps teach nothing
    assert not m.apply(sched_ev("c", SchedRequest("other")))


def test_model_is_capped():
    m = TaskModel()
    for i in range(MAX_TASKS + 10):
        m.apply(sched_ev(f"t{i}", SchedRequest("fifo", 1), t=i))
    assert len(m.tasks) == MAX_TASKS and m.evicted == 10
    assert "t0" not in m.tasks and f"t{MAX_TASKS + 9}" in m.tasks


def test_stable_after_enough_samples():
    m = TaskModel()
    m.apply(sched_ev("a", SchedRequest("fifo", 1)))
    assert not m.stable()
    for i in range(STABLE_SAMPLES + 2):
        m.apply(sleep_ev("a", 10**9 + i * 1_000_000, t=i))
    assert m.stable()


# -- adaptation ---------------------------------------------------------------

def dl_model(runtime_ms, period_ms=10):
    m = TaskModel()
    m.apply(sched_ev("a", SchedRequest("deadline", 0, runtime_ms * 1_000_000,
                                       period_ms * 1_000_000, period_ms * 1_000_000)))
    return m


def test_adapt_grows_above_the_declared_floor():
    out = adapt_mod.adapt(dl_model(2), {0: VcpuSched("deadline", 1_000_000, 10_000_000)},
                          {0: Fraction(1, 2)})
    a = out[0]
    assert a.source == "introspection" and not a.capped
    assert a.sched.runtime_ns >= a.budget_ns and 5 * a.budget_ns >= a.period_ns  # 2 ms/10 ms
    assert a.sched.runtime_ns <= a.sched.deadline_ns <= a.sched.period_ns


def test_adapt_keeps_a_sufficient_declaration():
    base = VcpuSched("deadline", 5_000_000, 10_000_000)
    a = adapt_mod.adapt(dl_model(1, period_ms=20), {0: base}, {0: Fraction(1, 2)})[0]
    assert a.source == "declared" and a.sched == base and "meets every" in a.note


def test_adapt_bandwidth_alone_is_not_enough():
    """5 ms every 10 ms may supply nothing for 10 ms: a 1 ms task due in 10 ms can miss.

    The vCPU gets the analysed (shorter) period, with at least the declared
    bandwidth (the floor), never above the ceiling.
    """
    base = VcpuSched("deadline", 5_000_000, 10_000_000)
    a = adapt_mod.adapt(dl_model(1), {0: base}, {0: Fraction(3, 5)})[0]
    assert a.source == "introspection" and not a.capped
    s = a.sched
    assert Fraction(s.runtime_ns, s.period_ns) >= Fraction(1, 2)
    assert Fraction(s.runtime_ns, s.period_ns) <= Fraction(3, 5)
    supply = analysis.EDP(s.period_ns, s.runtime_ns - adapt_mod.DEFAULT_OVERHEAD_NS,
                          s.deadline_ns)
    task = analysis.Task(name="a", runtime_ns=1_000_000, deadline_ns=10_000_000,
                         period_ns=10_000_000, scheduler="edf")
    assert analysis.schedulable([task], supply).schedulable
    assert not analysis.schedulable(
        [task], analysis.EDP(10_000_000, 5_000_000 - adapt_mod.DEFAULT_OVERHEAD_NS,
                             10_000_000)).schedulable


def test_adapt_rt_group_declaration_is_a_periodic_resource():
    base = VcpuSched("fifo", 5_000_000, 10_000_000, priority=30)
    assert adapt_mod.adapt(dl_model(1, period_ms=20), {0: base},
                           {0: Fraction(1, 2)})[0].source == "declared"
    a = adapt_mod.adapt(dl_model(1), {0: base}, {0: Fraction(3, 5)})[0]
    assert a.source == "introspection" and a.sched.priority == 30


def test_adapt_caps_at_the_ceiling():
    a = adapt_mod.adapt(dl_model(8), {0: VcpuSched("deadline", 1_000_000, 10_000_000)},
                        {0: Fraction(2, 5)})[0]
    assert a.capped and "ceiling" in a.note
    assert Fraction(a.sched.runtime_ns, a.sched.period_ns) <= Fraction(2, 5)


def test_adapt_rt_group_vcpu_keeps_priority():
    base = VcpuSched("fifo", 1_000_000, 10_000_000, priority=30)
    a = adapt_mod.adapt(dl_model(3), {0: base}, {0: Fraction(1, 2)})[0]
    assert a.sched.policy == "fifo" and a.sched.priority == 30
    assert a.sched.runtime_ns % 1000 == 0


def test_adapt_when_the_analysis_refuses(monkeypatch):
    def refuse(*a, **k):
        raise AnalysisError("nope")
    monkeypatch.setattr(analysis, "interface_for", refuse)
    base = VcpuSched("deadline", 1_000_000, 10_000_000)
    a = adapt_mod.adapt(dl_model(2), {0: base}, {0: Fraction(1, 2)})[0]
    assert a.sched == base and "analysis refused" in a.note


# -- gdbstub backend with a fake client ---------------------------------------

class FakeThread:
    def __init__(self, tid):
        self.tid = tid


class FakeReply:
    stopped = True
    kind = "signal"

    def __init__(self, thread):
        self.thread = FakeThread(thread)


class FakeClient:
    """Replays breakpoint stops at ``rips``; records what the backend does."""

    def __init__(self, rips):
        self.rips = list(rips)
        self.rip = None
        self.breakpoints = set()
        self.set_rips = []
        self.conts = 0
        self.interrupts = 0
        self.detached = False
        self.closed = False

        class S:
            name = "STOPPED"
        self.state = S()

    def cont(self):
        self.conts += 1
        self.state.name = "RUNNING"

    def wait_stop(self, timeout=None, wake=None):
        if not self.rips:
            time.sleep(0.01)
            raise gdbstub.RspTimeout(b"wait", timeout or 0)
        self.rip = self.rips.pop(0)
        self.state.name = "STOPPED"
        return FakeReply(2)

    def interrupt(self, timeout=None):
        self.interrupts += 1
        self.state.name = "STOPPED"

    def read_registers(self):
        return {"rip": self.rip, "rsp": STACK_TOP - 0x100, "rdi": PT_REGS}

    def set_register(self, name, value):
        self.set_rips.append(value)

    def insert_breakpoint(self, addr):
        self.breakpoints.add(addr)

    def remove_breakpoint(self, addr):
        self.breakpoints.discard(addr)

    def read_memory(self, addr, n):
        return b"\0" * n

    def detach(self):
        self.detached = True

    def close(self):
        self.closed = True


def make_backend(client, tmp_path, **kw):
    be = gdbstub.GdbstubBackend(lambda p: None, lambda: None, str(tmp_path), **kw)
    be.client = client
    rp = plan.ResolvedPlan()
    rp.sites[0x1000] = plan.PLAN[0]
    be.plan = rp
    return be


def test_backend_handles_hits_and_skips_the_site(tmp_path):
    c = FakeClient([0x1000, 0x1000, 0x5555])  # the last stop is not ours
    be = make_backend(c, tmp_path)
    be.arm(0x1000)
    stop = threading.Event()
    seen = []

    def on_hit(h, read):
        seen.append((h.kind, h.vcpu))
        if len(seen) == 2:
            threading.Timer(0.1, stop.set).start()

    be.run(on_hit, stop)
    assert seen == [("sched_setattr", 1), ("sched_setattr", 1)]
    assert c.set_rips == [0x1005, 0x1005]  # resumed at site + 5, no single-step
    assert be.counters.hits == 2 and be.counters.per_kind == {"sched_setattr": 2}
    be.close()
    assert c.detached and c.closed and not c.breakpoints


def test_backend_rate_limit_disarms_then_rearms(tmp_path):
    c = FakeClient([0x1000] * 5)
    be = make_backend(c, tmp_path, rate=1.0, burst=2.0, cooldown_s=0.05)
    be.arm(0x1000)
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    be.run(lambda h, r: None, stop)
    assert be.counters.suppressed >= 1
    assert 0x1000 in c.breakpoints  # re-armed after the cool-down


def test_the_idle_loop_sleeps_until_timed_work_is_due(tmp_path, monkeypatch):
    """No poll: the wait is the safety bound when nothing is timed, else until the
    first cooling site is due; a request wakes it (the control pipe)."""
    be = make_backend(FakeClient([]), tmp_path)
    assert be._idle_wait_s() == gdbstub.IDLE_CHECK_S
    monkeypatch.setattr(gdbstub.time, "monotonic", lambda: 100.0)
    be.cooling[0x1000] = 101.5
    assert be._idle_wait_s() == pytest.approx(1.5)
    be.cooling[0x1000] = 99.0                  # overdue: the floor, not a negative wait
    assert be._idle_wait_s() == 0.005
    import select
    assert not select.select([be.control.fileno()], [], [], 0)[0]
    be.request(lambda: None)
    assert select.select([be.control.fileno()], [], [], 0)[0]
    be.control.run_pending()
    assert not select.select([be.control.fileno()], [], [], 0)[0]


def test_backend_disarm_cancels_a_cooling_rearm(tmp_path):
    """A site the rate limit took off stays off once someone disarms it (hold, sampling)."""
    c = FakeClient([])
    be = make_backend(c, tmp_path, rate=1.0, burst=2.0, cooldown_s=0.05)
    be.arm(0x1000)
    be.cooling[0x1000] = 0.0          # as the rate limit leaves it: due for re-arming
    be.disarm(0x1000)
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    be.run(lambda h, r: None, stop)
    assert be.cooling == {} and 0x1000 not in c.breakpoints


def test_backend_control_requests_run_with_the_vm_stopped(tmp_path):
    c = FakeClient([])
    be = make_backend(c, tmp_path)
    stop = threading.Event()
    done = []

    def op():
        done.append(c.state.name)
        stop.set()
    be.request(op)
    be.run(lambda h, r: None, stop)
    assert done == ["STOPPED"] and c.interrupts >= 1


def test_backend_open_waits_for_the_socket(tmp_path, monkeypatch):
    be = gdbstub.GdbstubBackend(lambda p: open(p, "w").close(), lambda: None, str(tmp_path / "g"))
    monkeypatch.setattr(gdbstub.RspClient, "connect_unix",
                        classmethod(lambda cls, path, timeout: FakeClient([])))
    assert isinstance(be.open(), FakeClient)
    assert (tmp_path / "g").stat().st_mode & 0o777 == 0o700
    be2 = gdbstub.GdbstubBackend(lambda p: None, lambda: None, str(tmp_path / "h"))
    monkeypatch.setattr(gdbstub.time, "monotonic", iter([0.0, 10.0, 20.0]).__next__)
    with pytest.raises(KairosError, match="did not create its gdbstub socket"):
        be2.open()


def test_bucket():
    b = gdbstub.Bucket(rate=10, burst=2)
    assert b.take(1.0) and b.take(1.0) and not b.take(1.0)
    assert b.take(1.2)


# -- runtime with a fake backend -------------------------------------------------

class FakeBackend:
    name = "fake"

    def __init__(self, fail_open=0):
        self.counters = gdbstub.Counters()
        self.plan = plan.ResolvedPlan()
        self.armed = set()
        self.fail_open = fail_open
        self.opened = 0
        self.closed = 0
        self.mem = FakeMemory()
        self.hits = []
        self.control = ControlQueue()

    def open(self):
        self.opened += 1
        if self.opened <= self.fail_open:
            raise KairosError("guest kernel not up yet")

    def read(self, a, n):
        return self.mem.read(a, n)

    def arm(self, a):
        self.armed.add(a)

    def disarm(self, a):
        self.armed.discard(a)

    def request(self, op):
        self.control.put(op)  # as the real backends: run in run(), in order

    def run(self, on_hit, stop):
        self.control.run_pending()
        for h in self.hits:
            on_hit(h, self.mem.read)
        while not stop.wait(0.005):
            self.control.run_pending()

    def close(self):
        self.closed += 1


class FakeSymbols:
    def find_slide(self, read):
        return 0x200000

    def runtime(self, slide):
        class R:
            def resolve(self, name):
                table = {"__x64_sys_sched_setattr": 0x1000, "__x64_sys_sched_setscheduler": 0x2000,
                         "__x64_sys_sched_setparam": 0x3000, "__x64_sys_clock_nanosleep": 0x4000}
                if name not in table:
                    raise KairosError(f"no {name}")
                return table[name] + slide
        return R()


def test_runtime_attaches_learns_and_adapts(monkeypatch):
    import kairos_libvirt.introspect.symbols as symbols
    import kairos_libvirt.introspect.layout as layout
    monkeypatch.setattr(symbols, "fentry_site", lambda read, a: a)

    def no_layout(read, rsyms):
        raise KairosError("no init yet")
    monkeypatch.setattr(layout, "discover_layout", no_layout)
    monkeypatch.setattr(runtime, "ATTACH_RETRY_S", 0.01)
    be = FakeBackend(fail_open=2)
    be.mem.put(PT_REGS, ptregs(di=0, si=USER_BUF))
    be.mem.put(USER_BUF, sched_attr(6, runtime=3_000_000, deadline=10_000_000,
                                    period=10_000_000))
    be.hits = [Hit("sched_setattr", 0, {"rsp": STACK_TOP - 8, "rdi": PT_REGS}, 1),
               Hit("sched_setattr", 0, {"rsp": STACK_TOP - 8, "rdi": 0x1}, 2)]  # garbage
    intro = runtime.Introspector(be, lambda read: FakeSymbols(),
                                 {0: VcpuSched("deadline", 1_000_000, 10_000_000)},
                                 {0: Fraction(1, 2)})
    intro.start()
    try:
        deadline = time.monotonic() + 5
        while intro.status.state != "running" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert intro.status.state == "running" and be.opened == 3 and be.closed == 2
        assert intro.status.sites["sched_setattr"] == 0x201000
        assert any(n.startswith("task ids unavailable") for n in intro.status.notes)
        while be.counters.decoded < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert be.counters.rejected == 1 and "pt_regs" in be.counters.last_error
        time.sleep(runtime.COALESCE_S + 0.05)
        a = intro.adapted()[0]
        assert a.source == "introspection" and a.sched.runtime_ns * 10 >= 3 * a.sched.period_ns
        snap = intro.tasks_snapshot()
        assert snap[0]["policy"] == "deadline" and snap[0]["runtime_ns"] == 3_000_000
    finally:
        intro.stop()
    assert intro.status.state == "stopped"


def running_intro(monkeypatch, held=False):
    import kairos_libvirt.introspect.symbols as symbols
    monkeypatch.setattr(symbols, "fentry_site", lambda read, a: a)
    be = FakeBackend()
    be.identifies_tasks = False
    intro = runtime.Introspector(be, lambda read: FakeSymbols(),
                                 {0: VcpuSched("deadline", 1_000_000, 10_000_000)},
                                 {0: Fraction(1, 2)})
    if held:
        intro.hold(True)  # before attach: no site is ever armed
    intro.start()
    until(intro, "held" if held else "running")
    return intro, be


def until(intro, state):
    deadline = time.monotonic() + 5
    while intro.status.state != state and time.monotonic() < deadline:
        time.sleep(0.005)
    assert intro.status.state == state, (intro.status.state, intro.status.error)


def test_hold_disarms_every_site_and_unhold_arms_them_again(monkeypatch):
    intro, be = running_intro(monkeypatch)
    try:
        sites = set(intro.status.sites.values())
        assert be.armed == sites and len(sites) == 4
        intro.hold(True)
        until(intro, "held")
        assert be.armed == set()
        intro.tick()
        intro._sampling_policy()
        time.sleep(0.05)
        assert be.armed == set()
        intro.hold(False)
        until(intro, "running")
        assert be.armed == sites
    finally:
        intro.stop()
    assert intro.status.state == "stopped"


def test_hold_before_attach_arms_nothing(monkeypatch):
    intro, be = running_intro(monkeypatch, held=True)
    try:
        assert be.armed == set() and len(intro.status.sites) == 4
        intro.hold(False)
        until(intro, "running")
        assert be.armed == set(intro.status.sites.values())
    finally:
        intro.stop()


def test_hold_failure_is_reported_and_not_called_held(monkeypatch):
    intro, be = running_intro(monkeypatch)
    try:
        def stuck(a):
            raise KairosError("KAIROS_UD_CTL disarm: Connection timed out")
        be.disarm = stuck
        intro.hold(True)
        deadline = time.monotonic() + 5
        while not intro.status.error and time.monotonic() < deadline:
            time.sleep(0.005)
        assert intro.status.state == "running" and "timed out" in intro.status.error
        del be.disarm  # the vCPU runs again: the agent's next call succeeds
        intro.hold(True)
        until(intro, "held")
        assert be.armed == set() and intro.status.error is None
    finally:
        intro.stop()


def test_runtime_gives_up_and_keeps_the_declaration(monkeypatch):
    monkeypatch.setattr(runtime, "ATTACH_TIMEOUT_S", 0.05)
    monkeypatch.setattr(runtime, "ATTACH_RETRY_S", 0.01)
    be = FakeBackend(fail_open=1000)
    base = VcpuSched("deadline", 1_000_000, 10_000_000)
    intro = runtime.Introspector(be, lambda read: FakeSymbols(), {0: base}, {0: Fraction(1, 2)})
    intro._main()
    assert intro.status.state == "failed" and "not up yet" in intro.status.error
    assert intro.adapted()[0].sched == base


# -- backends -----------------------------------------------------------------------

def test_trusted_file(tmp_path):
    f = tmp_path / "vmlinuz"
    f.write_bytes(b"x")
    f.chmod(0o644)
    assert backends.trusted_file(str(f)) == (f.stat().st_uid == 0)
    f.chmod(0o666)
    assert not backends.trusted_file(str(f))
    assert not backends.trusted_file(str(tmp_path / "missing"))


def test_make_refuses_unknown_and_falls_back(monkeypatch, tmp_path):
    with pytest.raises(KairosError, match="unknown introspection backend"):
        backends.make("ebpf", "d", object(), 1, str(tmp_path))
    with pytest.raises(KairosError, match="needs a libvirt connection"):
        backends.make("gdbstub", "d", None, 1, str(tmp_path))
    from kairos_libvirt.introspect import kvmud_backend
    monkeypatch.setattr(kvmud_backend, "available", lambda: False)
    from tests.unit.test_stop_budget import FakeDom
    be, note = backends.make("kvm-ud", "d", FakeDom("qemu", 7_002_022), 1, str(tmp_path))
    assert be.name == "gdbstub" and "falling back to gdbstub" in note
    assert be.budget.spec.hit_cost_ns == backends.TCG_FLUSH_COST_NS     # TCG, QEMU 7.2


def test_symbol_loader_falls_back_to_memory(monkeypatch, tmp_path):
    from kairos_libvirt.introspect import kallsyms
    calls = []

    def bad_vmlinuz(path):
        calls.append("vmlinuz")
        raise KairosError("not a kernel")
    monkeypatch.setattr(kallsyms, "load_vmlinuz", bad_vmlinuz)
    monkeypatch.setattr(kallsyms, "load_from_memory", lambda read: calls.append("memory") or 7)
    monkeypatch.setattr(backends, "trusted_file", lambda p: True)
    assert backends.symbol_loader("/boot/vmlinuz")(lambda a, n: b"") == 7
    assert calls == ["vmlinuz", "memory"]
    assert backends.symbol_loader(None)(lambda a, n: b"") == 7


def intro_with_a_sleep_site(be):
    """An introspector whose sleep site 0x4000 is armed, and one FIFO task known."""
    intro = runtime.Introspector(be, lambda read: FakeSymbols(),
                                 {0: VcpuSched("deadline", 1_000_000, 10_000_000)},
                                 {0: Fraction(1, 2)})
    intro._sleep_sites = [0x4000]
    be.armed.add(0x4000)
    intro.model.apply(sched_ev("a", SchedRequest("fifo", 1)))
    return intro


def test_cheap_traps_keep_sleep_sites_armed_and_no_layout(monkeypatch):
    import kairos_libvirt.introspect.layout as layout
    called = []
    monkeypatch.setattr(layout, "discover_layout", lambda *a: called.append(1))
    be = FakeBackend()
    be.cheap_traps, be.identifies_tasks = True, False
    intro = intro_with_a_sleep_site(be)
    for i in range(STABLE_SAMPLES + 2):
        intro.model.apply(sleep_ev("a", 10**9 + i * 1_000_000, t=i))
    intro._sampling_policy()
    assert 0x4000 in be.armed           # gdbstub would have disarmed it
    intro._discover_layout(be.read)
    assert not called and intro.layout is None


def test_exact_periods_are_stable_sooner_than_measured_gaps():
    from kairos_libvirt.introspect.tasks import STABLE_EXACT_SAMPLES
    m = TaskModel()
    m.apply(sched_ev("a", SchedRequest("fifo", 1)))
    for i in range(STABLE_EXACT_SAMPLES + 1):          # n + 1 targets give n gaps
        m.apply(sleep_ev("a", 10**9 + i * 4_000_000, t=i))
    assert m.stable() and m.tasks["a"].periods.source == "abstime"
    r = TaskModel()
    r.apply(sched_ev("b", SchedRequest("fifo", 1)))
    for i in range(STABLE_EXACT_SAMPLES + 2):
        r.apply(sleep_ev("b", 3_000_000, absolute=False, t=i * 4_000_000))
    assert not r.stable()                              # relative gaps need STABLE_SAMPLES


def test_resampling_backs_off_while_windows_confirm_and_resets_on_a_change():
    from kairos_libvirt.introspect.tasks import STABLE_EXACT_SAMPLES
    be = FakeBackend()
    intro = intro_with_a_sleep_site(be)
    t = [0]

    def window(n=runtime.RESAMPLE_SAMPLES + 1):   # the same 4 ms period; then the policy decides
        for _ in range(n):
            t[0] += 1
            intro.model.apply(sleep_ev("a", 10**9 + t[0] * 4_000_000, t=t[0]))
        intro._sampling_policy()
    window(STABLE_EXACT_SAMPLES + 1)
    assert 0x4000 not in be.armed and intro._resample_every == runtime.RESAMPLE_EVERY_S
    everies = []
    for _ in range(6):
        intro._rearm_sleep(0.0)
        assert 0x4000 in be.armed
        window()
        everies.append(intro._resample_every)
    assert everies == [20.0, 40.0, 80.0, 160.0, 160.0, 160.0]
    # A window in which the model moved (a new task) brings the interval back.
    intro._rearm_sleep(0.0)
    intro.model.apply(sched_ev("b", SchedRequest("deadline", 0, 1_000_000, 10_000_000, 10_000_000)))
    window()
    assert intro._resample_every == runtime.RESAMPLE_EVERY_S


def test_the_adapter_reanalyses_only_the_vcpu_whose_tasks_changed():
    """Issue 13: with every task placed on a vCPU the servers are independent; the
    memoised analysis gives what adapt() gives and re-runs one vCPU per change."""
    declared = {v: VcpuSched("deadline", 1_000_000, 10_000_000) for v in (0, 1)}
    ceilings = {0: Fraction(1, 2), 1: Fraction(1, 2)}
    m = TaskModel()
    m.apply(sched_ev("a", SchedRequest("deadline", 0, 2_000_000, 10_000_000, 10_000_000), vcpu=0))
    m.apply(sched_ev("b", SchedRequest("deadline", 0, 3_000_000, 20_000_000, 20_000_000), vcpu=1))
    ad = adapt_mod.Adapter(declared, ceilings)
    assert ad.adapt(m) == adapt_mod.adapt(m, declared, ceilings) and ad.analysed == 2
    assert ad.adapt(m) == adapt_mod.adapt(m, declared, ceilings) and ad.analysed == 2
    m.apply(sched_ev("b", SchedRequest("deadline", 0, 4_000_000, 20_000_000, 20_000_000), vcpu=1))
    got = ad.adapt(m)
    assert got == adapt_mod.adapt(m, declared, ceilings) and ad.analysed == 3
    assert got[1].sched.runtime_ns >= 4_000_000 * got[1].sched.period_ns // 20_000_000


def test_a_task_with_no_vcpu_is_analysed_with_every_vcpu():
    declared = {v: VcpuSched("deadline", 1_000_000, 10_000_000) for v in (0, 1)}
    ceilings = {0: Fraction(1, 2), 1: Fraction(1, 2)}
    m = TaskModel()
    m.apply(sched_ev("a", SchedRequest("deadline", 0, 2_000_000, 10_000_000, 10_000_000),
                     vcpu=None))
    ad = adapt_mod.Adapter(declared, ceilings)
    assert ad.adapt(m) == adapt_mod.adapt(m, declared, ceilings) and ad.analysed == 2


def test_the_first_change_is_analysed_at_once_and_a_burst_after_it_coalesced(monkeypatch):
    """Leading edge: a change after a quiet spell is due now (the agent wakes on
    notify); later ones wait for the end of the COALESCE_S window, then together."""
    clock = [100.0]
    monkeypatch.setattr(runtime.time, "monotonic", lambda: clock[0])
    woken = []
    intro = runtime.Introspector(FakeBackend(), lambda read: None,
                                 {0: VcpuSched("deadline", 1_000_000, 10_000_000)},
                                 {0: Fraction(1, 2)})
    intro.notify = lambda: woken.append(clock[0])
    intro.adapted()                                   # the declaration, analysed once
    assert intro.next_due() is None
    clock[0] += 1.0                                   # a quiet second
    with intro.lock:
        intro.model.apply(sched_ev("a", SchedRequest("deadline", 0, 2_000_000, 10_000_000,
                                                     10_000_000)))
        intro._changed()
    assert woken == [101.0] and intro.next_due() == 0.0
    assert intro.adapted()[0].source == "introspection"
    clock[0] += 0.005
    with intro.lock:
        intro.model.apply(sched_ev("a", SchedRequest("deadline", 0, 3_000_000, 10_000_000,
                                                     10_000_000)))
        intro._changed()
    assert intro.next_due() == pytest.approx(runtime.COALESCE_S - 0.005)
    first = intro.adapted()[0].sched
    assert first.bandwidth < Fraction(3, 10)           # not yet: inside the window
    clock[0] += runtime.COALESCE_S
    assert intro.next_due() == 0.0
    assert intro.adapted()[0].sched.bandwidth >= Fraction(3, 10)
    assert intro.next_due() is None and intro.server_changes == 2


def test_a_churning_task_set_gets_a_bounded_number_of_analyses(monkeypatch):
    """A hostile guest spawning RT processes changes the model every few ms: after a
    burst the analyses (each may regrant under the host-wide lock) come at ANALYSIS_RATE."""
    clock = [100.0]
    monkeypatch.setattr(runtime.time, "monotonic", lambda: clock[0])
    intro = runtime.Introspector(FakeBackend(), lambda read: None,
                                 {0: VcpuSched("deadline", 1_000_000, 10_000_000)},
                                 {0: Fraction(1, 2)})
    intro.adapted()
    for i in range(400):                                  # 10 s, a change every 25 ms
        clock[0] += 0.025
        with intro.lock:
            intro.model.apply(sched_ev(f"k{i}", SchedRequest("deadline", 0, 1_000_000 + i * 1000,
                                                             10_000_000, 10_000_000)))
            intro._changed()
        due = intro.next_due()
        assert due is not None and due <= 1 / runtime.ANALYSIS_RATE + 1e-9
        intro.adapted()
    analyses = intro._adapter.analysed
    assert analyses <= runtime.ANALYSIS_BURST + 10 * runtime.ANALYSIS_RATE + 2
    assert analyses >= 10 * runtime.ANALYSIS_RATE      # it keeps following the guest
