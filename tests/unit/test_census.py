"""The census of guest tasks (introspect/census.py) on synthetic guest memory: threads through
their list (thread_group-style, and thread_node-style with the signal head in the ring), trap
keys from task->stack, and the introspector learning and forgetting tasks from it.
"""
from __future__ import annotations

import struct
from fractions import Fraction

import pytest

from kairos_libvirt.introspect import census as cs
from kairos_libvirt.introspect import layout as lay
from kairos_libvirt.introspect import runtime
from kairos_libvirt.introspect.plan import PT_REGS_SIZE, THREAD_SIZE
from kairos_libvirt.introspect.schedlayout import SchedLayout
from kairos_libvirt.introspect.census import PF_KTHREAD
from kairos_libvirt.introspect.sleepers import STACK_END_MAGIC
from kairos_libvirt.introspect.symbols import SymbolError
from kairos_libvirt.model import VcpuSched
from tests.unit.test_introspect_runtime import FakeBackend
from tests.unit.test_schedlayout import OTHER, POLICY, PRIO, fifo, plant
from tests.unit.test_symbols import _put, task_memory

STACK, THREADS = 0x20, 0xa20
STACKS = 0xffffc90000100000
DIRECT = 0xffff888001000000


def with_threads(signal_head=False):
    """init, kthreadd, cyclictest (+1 thread, FIFO 80), rtapp (+2 threads); stacks planted."""
    k, rt, tasks = task_memory(names=("init", "kthreadd", "cyclictest", "rtapp"))
    mem = k.mem
    extra = [DIRECT + 0x100000 + i * 0x4000 for i in range(3)]
    for t in extra:
        mem.map(t, bytes(0x4000))
    every = tasks + extra
    for i, t in enumerate(every):
        _put(mem, t, STACK + 12, "<I", PF_KTHREAD if i in (0, 2) else 0x400100)   # task->flags
        _put(mem, t, STACK, "<Q", STACKS + i * THREAD_SIZE)
        mem.map(STACKS + i * THREAD_SIZE, struct.pack("<Q", STACK_END_MAGIC))   # end of the stack
        _put(mem, t, THREADS, "<QQ", t + THREADS, t + THREADS)     # empty: single-threaded
        plant(mem, t, OTHER)
    # Threads: cyclictest (pid 3) + tid 10; rtapp (pid 4) + tids 11, 12.
    for addr, tid, tgid, name in ((extra[0], 10, 3, b"cyclictest"), (extra[1], 11, 4, b"rtapp"),
                                  (extra[2], 12, 4, b"rtapp")):
        _put(mem, addr, lay_pid(), "<ii", tid, tgid)
        mem.map(addr + 0xba0, name + bytes(16 - len(name)))
    ring(mem, [tasks[3], extra[0]], signal_head)
    ring(mem, [tasks[4], extra[1], extra[2]], signal_head)
    plant(mem, extra[0], fifo(80))
    return k, rt, tasks, extra


def lay_pid():
    return 0x970


def ring(mem, members, signal_head):
    nodes = [m + THREADS for m in members]
    if signal_head:            # 6.7+: signal->thread_head is in the ring too
        head = DIRECT + 0x200000 + len(members) * 0x100
        mem.map(head, bytes(16))
        nodes.append(head)
    for i, n in enumerate(nodes):
        mem.map(n, struct.pack("<QQ", nodes[(i + 1) % len(nodes)], nodes[i - 1]))


@pytest.mark.parametrize("signal_head", [False, True])
def test_census_lists_processes_and_threads_with_their_trap_keys(signal_head):
    k, rt, tasks, extra = with_threads(signal_head)
    layout = lay.discover_layout(k.mem.read, rt)
    c = cs.Census(k.mem.read, rt, layout)
    assert c.stack_off == STACK and c.flags_off == STACK + 12 and c.cpu_known and c.cpu_of(extra[0]) == 0
    assert not cs.Census(k.mem.read, rt, layout, ncpus=2).cpu_known   # no CPU 1 to check it on
    got = c.tasks()
    assert c.thread_off == THREADS
    assert sorted((t.tid, t.tgid, t.comm) for t in got) == [
        (0, 0, "swapper/0"), (1, 1, "init"), (2, 2, "kthreadd"), (3, 3, "cyclictest"),
        (4, 4, "rtapp"), (10, 3, "cyclictest"), (11, 4, "rtapp"), (12, 4, "rtapp")]
    assert [t.tid for t in got if t.kthread] == [0, 2]
    t10 = next(t for t in got if t.tid == 10)
    stack = STACKS + (len(tasks)) * THREAD_SIZE         # extra[0] is task number len(tasks)
    assert t10.key == f"{stack + THREAD_SIZE - PT_REGS_SIZE:#x}" and t10.addr == extra[0]


def test_no_thread_list_before_a_multi_threaded_process():
    k, rt, tasks = task_memory(names=("init", "kthreadd"))
    for t in tasks:
        _put(k.mem, t, THREADS, "<QQ", t + THREADS, t + THREADS)
    layout = lay.discover_layout(k.mem.read, rt)
    assert cs.discover_thread_offset(k.mem.read, lay.task_list(k.mem.read, rt, layout), layout) is None


def test_a_task_without_a_kernel_stack_has_no_key():
    k, rt, tasks, extra = with_threads()
    _put(k.mem, tasks[1], STACK, "<Q", STACKS + 8)     # not THREAD_SIZE aligned
    with pytest.raises(SymbolError, match="no kernel stack"):
        cs.task_key(k.mem.read, tasks[1], STACK)


# -- the introspector's census ------------------------------------------------

class FakeCensus:
    def __init__(self, mem, refs, thread_off=None):
        self.read, self.refs, self.thread_off = mem.read, refs, thread_off

    def tasks(self):
        return list(self.refs)

    def cpu_of(self, task):
        return 0


def test_introspector_census_learns_and_forgets_memory_tasks():
    be = FakeBackend()
    intro = runtime.Introspector(be, lambda read: None, {0: VcpuSched("deadline", 10**6, 10**7)},
                                 {0: Fraction(1, 2)})
    intro.sched_layout = SchedLayout(PRIO, POLICY)
    a, b = 0xffff888003000000, 0xffff888003004000
    for addr, state in ((a, fifo(80)), (b, OTHER)):
        be.mem.put(addr, bytes(0x400))
        plant(be.mem, addr, state)
    refs = [cs.TaskRef(a, 10, 3, "cyclictest", "0xk10"), cs.TaskRef(b, 11, 3, "cyclictest", "0xk11")]
    intro.census = FakeCensus(be.mem, refs)
    assert intro.census_once()
    snap = intro.tasks_snapshot()
    assert [(t["key"], t["policy"], t["priority"], t["origin"], t["vcpu"]) for t in snap] == [
        ("0xk10", "fifo", 80, "memory", 0)]
    assert not intro.census_once()                      # nothing new
    refs.pop(0)                                         # the thread is gone
    assert not intro.census_once()                      # one miss is not enough (a racing walk)
    assert intro.census_once() and intro.tasks_snapshot() == []


def test_a_task_a_call_taught_is_forgotten_once_the_census_finds_it_gone():
    from kairos_libvirt.introspect.decode import SchedRequest
    from kairos_libvirt.introspect.plan import GuestEvent
    be = FakeBackend()
    intro = runtime.Introspector(be, lambda read: None, {0: VcpuSched("deadline", 10**6, 10**7)},
                                 {0: Fraction(1, 2)})
    intro.sched_layout = SchedLayout(PRIO, POLICY)
    intro.census = FakeCensus(be.mem, [])
    intro.model.apply(GuestEvent("sched", "0xk20", 0, 0, tid=20, sched=SchedRequest("fifo", 50)))
    intro.census_once()
    assert intro.tasks_snapshot()             # one miss: a walk may race the guest
    intro.census_once()                       # its exit is not trapped while the census runs
    assert intro.tasks_snapshot() == []


def test_sampler_learns_the_period_from_sleep_targets_in_memory_without_a_trap():
    from tests.unit.test_sleepers import LIVE_AT, TASK, WAKEUP, Kernel, sleeper, stacked
    k = Kernel()
    top = stacked(k, (LIVE_AT, sleeper(10**9, 10**9, TASK)))
    key = f"{top - PT_REGS_SIZE:#x}"
    be = FakeBackend()
    intro = runtime.Introspector(be, lambda read: None, {0: VcpuSched("deadline", 10**6, 10**7)},
                                 {0: Fraction(1, 2)})
    intro.census = FakeCensus(k.ram, [])
    intro.census.read = k.walker().reader()
    intro._sampling, intro._wakeup_fn = True, WAKEUP
    intro._walker, intro._phys_read = k.walker(), k.ram.read
    intro.model.tasks.clear()
    from kairos_libvirt.introspect.plan import GuestEvent
    intro.model.discover(GuestEvent("census", key, None, 0, tid=10, comm="cyclictest"), "fifo", 80)
    intro._addrs[key] = TASK
    skips = [1, 3, 2, 5, 1, 4, 2, 3, 1, 2, 6]          # whole periods between the samples
    target = 10**9
    assert intro.sample_once() == 1
    assert intro.sample_interval() == runtime.SAMPLE_MIN_S   # sleeping, no period yet: fast
    for n in skips:
        assert intro.sample_once() in (0, 1)
        assert intro.sample_once() == 0                # the same target again: nothing new
        target += n * 4 * MS
        k.vwrite(top - THREAD_SIZE + LIVE_AT, sleeper(target, target, TASK))
    intro.sample_once()
    (t,) = intro.tasks_snapshot()
    assert t["observed_period_ns"] == 4 * MS and t["period_source"] == "abstime"
    assert intro.samples == len(skips) + 1 and be.counters.hits == 0
    # Confirmed (TaskModel.stable): the sampler slows down; before, a third of T, floored.
    assert intro.model.stable() and intro.sample_interval() == runtime.SAMPLE_STABLE_S
    intro.model.tasks[key].periods.support = 1
    assert intro.sample_interval() == max(runtime.SAMPLE_MIN_S, 4 * MS / 3e9)
    watch = intro._watches[key]
    assert watch.reads <= 2 * (len(skips) + 1) + 2        # one full scan, then one read each
    # A relative sleep (is_rel 1) says nothing of the period: skipped.
    raw = bytearray(sleeper(target + 7, target + 7, TASK))
    raw[57] = 1
    k.vwrite(top - THREAD_SIZE + LIVE_AT, bytes(raw))
    assert intro.sample_once() == 0


MS = 1_000_000


@pytest.mark.parametrize("census, sampling, cheap, armed", [
    (False, False, False, {"sched_setattr", "clock_nanosleep", "exit"}),
    (True, False, False, {"sched_setattr", "clock_nanosleep"}),
    (True, True, False, {"sched_setattr"}),
    # kvm-ud: a trap costs microseconds, the guest never stops: every site stays armed.
    (True, False, True, {"sched_setattr", "clock_nanosleep", "exit"})])
def test_memory_reading_replaces_the_hot_sites_at_attach_and_at_unhold(census, sampling, cheap,
                                                                        armed):
    from kairos_libvirt.introspect.plan import PLAN, ResolvedPlan
    by_kind = {s.kind: s for s in PLAN}
    plan = ResolvedPlan({0x1000: by_kind["sched_setattr"], 0x2000: by_kind["clock_nanosleep"],
                         0x3000: by_kind["exit"]})
    be = FakeBackend()
    be.cheap_traps = cheap
    intro = runtime.Introspector(be, lambda read: None, {0: VcpuSched("deadline", 10**6, 10**7)},
                                 {0: Fraction(1, 2)})
    intro.census = FakeCensus(be.mem, []) if census else None
    intro._sampling = sampling
    intro._arm_plan(plan)
    assert {plan.sites[a].kind for a in be.armed} == armed
    intro.hold(True)
    be.control.run_pending()
    assert not be.armed
    intro.hold(False)
    be.control.run_pending()
    assert {plan.sites[a].kind for a in be.armed} == armed


def test_a_backend_whose_traps_cannot_name_tasks_learns_the_layout_only_with_guest_memory(
        monkeypatch):
    """kvm-ud's events carry no GS base: the task_struct layout serves only the census,
    which reads guest memory; without that memory the agent does not look for it."""
    from kairos_libvirt.introspect import layout as _layout
    from kairos_libvirt.errors import KairosError
    seen = []

    def discover(read, syms):
        seen.append(read)
        raise KairosError("init_task not there yet")
    monkeypatch.setattr(_layout, "discover_layout", discover)
    be = FakeBackend()
    be.identifies_tasks = False
    intro = runtime.Introspector(be, lambda read: None, {0: VcpuSched("deadline", 10**6, 10**7)},
                                 {0: Fraction(1, 2)})
    intro._discover_layout(be.read)
    assert seen == [] and intro._layout_at == float("inf")
    intro._kread = be.mem.read
    intro._discover_layout(intro._kread)
    assert seen == [be.mem.read] and intro._layout_at != float("inf")   # and retried later
    assert any(n.startswith("task ids unavailable") for n in intro.status.notes)


def test_the_census_names_a_task_its_trap_could_not():
    """kvm-ud's events carry no task identity: the census fills in tid and comm."""
    from kairos_libvirt.introspect.decode import SchedRequest
    from kairos_libvirt.introspect.plan import GuestEvent
    be = FakeBackend()
    intro = runtime.Introspector(be, lambda read: None, {0: VcpuSched("deadline", 10**6, 10**7)},
                                 {0: Fraction(1, 2)})
    intro.sched_layout = SchedLayout(PRIO, POLICY)
    a = 0xffff888003000000
    be.mem.put(a, bytes(0x400))
    plant(be.mem, a, fifo(50))
    intro.model.apply(GuestEvent("sched", "0xk10", 0, 0, sched=SchedRequest("fifo", 50)))
    version = intro.model.version
    intro.census = FakeCensus(be.mem, [cs.TaskRef(a, 10, 3, "cyclictest", "0xk10")])
    intro.census_once()
    (t,) = intro.tasks_snapshot()
    assert (t["tid"], t["comm"], t["origin"]) == (10, "cyclictest", "call")
    assert intro.model.version == version     # a name is no analysis input


def test_an_idle_guest_is_sampled_never_and_counted_rarely():
    """Issue 13: with no real-time task in the guest the sampler sleeps until the model
    changes and the census runs every CENSUS_IDLE_S; with one, at their working rates."""
    from kairos_libvirt.introspect.decode import SchedRequest
    from kairos_libvirt.introspect.plan import GuestEvent
    be = FakeBackend()
    intro = runtime.Introspector(be, lambda read: None, {0: VcpuSched("deadline", 10**6, 10**7)},
                                 {0: Fraction(1, 2)})
    assert intro.sample_interval() is None
    assert intro._census_interval() == runtime.CENSUS_IDLE_S
    with intro.lock:
        intro.model.apply(GuestEvent("sched", "0xk20", 0, 0, tid=20, sched=SchedRequest("fifo", 50)))
        intro._changed()
    assert intro._sample_wake.is_set()
    assert intro.sample_interval() == runtime.SAMPLE_S
    assert intro._census_interval() == runtime.CENSUS_S
