"""A guest task's policy and parameters read from its task_struct (introspect/schedlayout.py),
on synthetic guest memory (the task list of test_symbols), and their use by the model and the
introspector: an RT task that set its policy before the attach is learnt at its first trap.
Hostile memory may only ever produce SymbolError.
"""
from __future__ import annotations

import struct
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kairos_libvirt.introspect import layout as lay
from kairos_libvirt.introspect import runtime
from kairos_libvirt.introspect.decode import SchedRequest, SleepRequest, Timespec
from kairos_libvirt.introspect.plan import GuestEvent, Hit
from kairos_libvirt.introspect.schedlayout import SchedLayout, SchedState, discover_sched_layout, \
    read_sched
from kairos_libvirt.introspect.symbols import SymbolError
from kairos_libvirt.introspect.tasks import TaskModel
from kairos_libvirt.model import VcpuSched
from tests.unit.test_introspect_runtime import PT_REGS, STACK_TOP, USER_BUF, FakeBackend, ptregs
from tests.unit.test_symbols import task_memory

PRIO, POLICY, DL = 0x6c, 0x3cc, 0x200
POLICY10 = 0x3c8
MS = 1_000_000

OTHER = (120, 120, 120, 0, 0)


def _put(mem, task, off, fmt, *vals):
    """Either fake memory (test_kallsyms' maps pages, fakes' puts bytes)."""
    write = mem.map if hasattr(mem, "map") else mem.put
    write(task + off, struct.pack(fmt, *vals))


def fifo(prio, rr=False):
    return (99 - prio, 120, 99 - prio, prio, 2 if rr else 1)


DEADLINE = (-1, 120, -1, 0, 6)


def plant(mem, task, state, dl=None, *, v610=False):
    """Write the scheduling fields of one task (and, for init_task, its cpus_ptr signature)."""
    prio, static, normal, rt, policy = state
    _put(mem, task, PRIO, "<iiiI", prio, static, normal, rt)
    if v610:   # 6.10+: policy, a hole, max_allowed_capacity, nr_cpus_allowed, a hole, cpus_ptr
        _put(mem, task, POLICY10, "<IIQiI", policy, 0, 1024, 2, 0)
        _put(mem, task, POLICY10 + 24, "<QQ", task + POLICY10 + 40, 0)
    else:      # policy, nr_cpus_allowed, a hole, cpus_ptr, user_cpus_ptr, cpus_mask (Debian 6.1)
        _put(mem, task, POLICY, "<IiI", policy, 2, 0)
        _put(mem, task, POLICY + 12, "<QQ", task + POLICY + 28, 0)
    if dl is not None:
        r, d, p = dl
        _put(mem, task, DL, "<QQQQQ", r, d, p, (r << 20) // p, (r << 20) // d)


def sched_memory(states, dls=None, v610=False):
    names = ("init", "kthreadd", "migration/0", "cyclictest", "rtapp", "dlprog")[:len(states) - 1]
    k, rt, tasks = task_memory(names=names)
    for i, (t, s) in enumerate(zip(tasks, states)):
        plant(k.mem, t, s, (dls or {}).get(i), v610=v610)
    # A decoy quadruple in init_task that other tasks contradict.
    _put(k.mem, tasks[0], 0x30, "<iiiI", 120, 120, 120, 0)
    return k, rt, tasks


STATES = [OTHER, OTHER, OTHER, fifo(99), fifo(80), fifo(7, rr=True), DEADLINE]


@pytest.mark.parametrize("v610", [False, True])
def test_discover_and_read_every_policy(v610):
    k, rt, tasks = sched_memory(STATES, {6: (2 * MS, 5 * MS, 10 * MS)}, v610=v610)
    layout = lay.discover_layout(k.mem.read, rt)
    sl = discover_sched_layout(k.mem.read, rt, layout)
    assert sl == SchedLayout(prio=PRIO, policy=POLICY10 if v610 else POLICY, dl=DL)
    got = [read_sched(k.mem.read, t, sl)[0] for t in tasks]
    assert got == [SchedState("other")] * 3 + [
        SchedState("fifo", 99), SchedState("fifo", 80), SchedState("rr", 7),
        SchedState("deadline", runtime_ns=2 * MS, deadline_ns=5 * MS, period_ns=10 * MS)]
    assert [g.realtime for g in got] == [False] * 3 + [True] * 4


def test_deadline_offset_found_on_the_first_deadline_task_read():
    k, rt, tasks = sched_memory(STATES[:6])
    sl = discover_sched_layout(k.mem.read, rt, lay.discover_layout(k.mem.read, rt))
    assert sl.dl is None
    t = tasks[5]    # becomes a deadline task after the discovery
    plant(k.mem, t, DEADLINE, (1 * MS, 10 * MS, 10 * MS))
    state, sl2 = read_sched(k.mem.read, t, sl)
    assert sl2.dl == DL and state.period_ns == 10 * MS and state.runtime_ns == 1 * MS


def test_a_task_contradicting_the_kernels_invariants_is_refused():
    k, rt, tasks = sched_memory(STATES[:5])
    sl = discover_sched_layout(k.mem.read, rt, lay.discover_layout(k.mem.read, rt))
    for bad in [(79, 120, 79, 7, 1),          # rt_priority != 99 - normal_prio
                (120, 120, 120, 0, 1),        # FIFO policy with a nice-level prio
                (-1, 120, -1, 0, 1),          # deadline prio, FIFO policy
                (120, 300, 120, 0, 0)]:       # static_prio out of range
        plant(k.mem, tasks[4], bad)
        with pytest.raises(SymbolError):
            read_sched(k.mem.read, tasks[4], sl)
    plant(k.mem, tasks[4], DEADLINE)          # deadline without parameters
    with pytest.raises(SymbolError, match="dl_bw"):
        read_sched(k.mem.read, tasks[4], sl)


def test_no_consistent_offset_is_an_error_not_a_guess():
    k, rt, tasks = sched_memory(STATES[:5])
    # PID 2 contradicts every candidate: no layout (not a wrong one).
    _put(k.mem, tasks[2], PRIO, "<iiiI", 50, 120, 50, 3)
    with pytest.raises(SymbolError, match="prio/.policy"):
        discover_sched_layout(k.mem.read, rt, lay.discover_layout(k.mem.read, rt))


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 0x7f0 // 4), st.binary(min_size=4,
                                                                                    max_size=4)),
                max_size=12))
def test_fuzz_only_symbolerror(edits):
    k, rt, tasks = sched_memory(STATES, {6: (2 * MS, 5 * MS, 10 * MS)})
    layout = lay.discover_layout(k.mem.read, rt)
    for i, word, raw in edits:
        k.mem.map(tasks[i] + 4 * word, raw)
    try:
        sl = discover_sched_layout(k.mem.read, rt, layout)
    except SymbolError:
        sl = SchedLayout(PRIO, POLICY)
    for t in tasks:
        try:
            state, sl = read_sched(k.mem.read, t, sl)
        except SymbolError:
            continue
        assert state.policy in ("other", "fifo", "rr", "batch", "idle", "deadline")


# -- the model -----------------------------------------------------------------------

def sleep(key, ns, tid=None, t=0):
    return GuestEvent("sleep", key, 0, t, tid=tid, comm="cyclictest",
                      sleep=SleepRequest(1, True, Timespec(ns // 10**9, ns % 10**9)))


def test_model_discovers_a_task_and_learns_its_period_from_then_on():
    m = TaskModel()
    ev = sleep("k", 10**9)
    assert m.discover(ev, "fifo", 80)
    t = m.tasks["k"]
    assert (t.policy, t.priority, t.origin) == ("fifo", 80, "memory")
    assert not m.discover(ev, "fifo", 81)     # known: what it taught stays
    for i in range(1, 12):
        m.apply(sleep("k", 10**9 + i * 4 * MS, t=i))
    assert m.tasks["k"].observed_period_ns == 4 * MS and m.tasks["k"].priority == 80
    assert not m.discover(sleep("o", 10**9), "other")


def test_a_task_named_by_pid_takes_its_key_at_its_first_trap():
    m = TaskModel()
    m.apply(GuestEvent("sched", "caller", 0, 0, tid=10, target_pid=42,
                       sched=SchedRequest("fifo", 50)))
    assert list(m.tasks) == ["pid:42"]
    for i in range(8):
        m.apply(sleep("real", 10**9 + i * 2 * MS, tid=42, t=i))
    assert list(m.tasks) == ["real"]
    assert m.tasks["real"].priority == 50 and m.tasks["real"].observed_period_ns == 2 * MS


# -- the introspector: first trap of an unknown task reads its task_struct -------------

TASK = 0xffff888003000000


def intro_with_task(monkeypatch, state):
    be = FakeBackend()
    intro = runtime.Introspector(be, lambda read: None, {0: VcpuSched("deadline", MS, 10 * MS)},
                                 {0: Fraction(1, 2)})
    intro.layout = lay.TaskLayout(tasks=0x890, pid=0x970, tgid=0x974, comm=0xba0)
    intro.sched_layout = SchedLayout(PRIO, POLICY)
    intro.rsyms = object()
    monkeypatch.setattr(lay, "current_task", lambda read, gs, rsyms: TASK)
    monkeypatch.setattr(lay, "task_ident", lambda read, task, layout: (42, 42, "cyclictest"))
    plant(be.mem, TASK, state)
    be.mem.put(PT_REGS, ptregs(di=1, si=1, dx=USER_BUF))    # CLOCK_MONOTONIC, TIMER_ABSTIME
    return intro, be


def sleep_hit(be, i):
    be.mem.put(USER_BUF, struct.pack("<qq", 5, i * 4 * MS))
    return Hit("clock_nanosleep", 0, {"rsp": STACK_TOP - 0x200, "rdi": PT_REGS, "rip": 0,
                                      "gs_base": 0xffff888007000000}, i)


def counting_reader(mem):
    """A reader of ``mem`` that records the addresses it was asked for."""
    reads = []

    def read(a, n):
        reads.append(a)
        return mem.read(a, n)
    return read, reads


def test_an_rt_task_set_before_the_attach_is_learnt_at_its_first_sleep(monkeypatch):
    intro, be = intro_with_task(monkeypatch, fifo(80))
    counting, reads = counting_reader(be.mem)
    for i in range(1, 10):
        intro._on_hit(sleep_hit(be, i), counting)
    snap = intro.tasks_snapshot()
    assert len(snap) == 1 and snap[0]["policy"] == "fifo" and snap[0]["priority"] == 80
    assert snap[0]["origin"] == "memory" and snap[0]["tid"] == 42
    assert snap[0]["observed_period_ns"] == 4 * MS and intro.discovered == 1
    # Its task_struct was read once, at the first trap.
    assert sum(1 for a in reads if a == TASK + PRIO) == 1


def test_a_non_rt_task_is_read_once_until_it_exits(monkeypatch):
    intro, be = intro_with_task(monkeypatch, OTHER)
    counting, reads = counting_reader(be.mem)
    for i in range(1, 5):
        intro._on_hit(sleep_hit(be, i), counting)
    assert intro.tasks_snapshot() == [] and sum(1 for a in reads if a == TASK + PRIO) == 1
    intro._on_hit(Hit("exit", 0, {"rsp": STACK_TOP - 0x200, "rdi": PT_REGS, "rip": 0,
                                  "gs_base": 0xffff888007000000}, 9), counting)
    plant(be.mem, TASK, fifo(10))       # a new task on the same stack, RT by inheritance
    intro._on_hit(sleep_hit(be, 10), counting)
    assert [t["priority"] for t in intro.tasks_snapshot()] == [10]


def test_unreadable_task_struct_changes_nothing(monkeypatch):
    intro, be = intro_with_task(monkeypatch, fifo(80))
    intro.sched_layout = SchedLayout(PRIO + 0x10000, POLICY)   # points at unmapped memory
    intro._on_hit(sleep_hit(be, 1), be.mem.read)
    assert intro.tasks_snapshot() == [] and "task_struct of cyclictest" in be.counters.last_error
