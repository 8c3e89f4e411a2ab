"""The kvm-ud backend (kairos_libvirt.introspect.kvmud_backend) over a fake kernel.

Fakes used here (named as such): ``FakeGuest`` (a guest address space in a
dict, tests/unit/fakes.py), ``FakeKvmUd`` (stands for :class:`kvmud.KvmUd`:
the trap table, arming and a ring that does what the patched KVM does at a trap: copies the registers
and runs the site's fetch list against ``FakeGuest``, then packs a real
512-byte event that goes through :func:`kvmud.decode_event`).
"""
from __future__ import annotations

import os
import struct
import threading
import time
from fractions import Fraction

import pytest

from kairos_libvirt.errors import KairosError
from kairos_libvirt.introspect import backends, kvmud, kvmud_backend, plan, runtime
from kairos_libvirt.introspect.decode import PT_REGS_OFFSETS, DecodeError
from kairos_libvirt.introspect.kvmud import ARMED5, NOP5, KvmUdError, RingCounters
from kairos_libvirt.introspect.kvmud_backend import (EventMemory, KvmUdBackend, NotFetched,
                                                     fetch_list)
from kairos_libvirt.introspect.plan import PLAN, Hit, ResolvedPlan, decode_hit
from kairos_libvirt.model import VcpuSched
from tests.unit.fakes import FakeGuestMemory

STACK_TOP = 0xffffc90000124000
PT_REGS = STACK_TOP - plan.PT_REGS_SIZE
RSP = STACK_TOP - 0x200
USER_BUF = 0x7ffd0000
SITES = {site.kind: 0xffffffff81000000 + 0x1000 * i for i, site in enumerate(PLAN)}


def FakeGuest():
    """A FakeGuestMemory whose faults are what the kernel's peek returns (EFAULT)."""
    return FakeGuestMemory(lambda addr: KvmUdError("fake peek", f"unmapped {addr:#x}", 14))


class FakeKvmUd:
    """Stands for kvmud.KvmUd: what the agent sees of the patched KVM."""

    def __init__(self, guest, nr_events=16):
        self.guest = guest
        self.efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.nr_events = nr_events
        self.traps, self.rate = [], 0
        self.pending = []
        self.seq = 0
        self.c = dict(hits=0, recorded=0, rate_dropped=0, overflow=0, fetch_faults=0, stale=0)
        self.armed = set()
        self.closed = False
        self.peeks = 0
        for a in SITES.values():
            guest.put(a, NOP5)

    # -- ioctls
    def set_traps(self, traps, rate=0, burst=0):
        for i in self.armed:
            if i >= len(traps) or traps[i].gva != self.traps[i].gva:
                raise KvmUdError("KAIROS_UD_SET_TRAPS", "armed site moved", 16)
        kvmud.encode_traps(traps)  # the kernel's checks
        self.traps, self.rate = list(traps), rate

    def arm(self, index, **kw):
        gva = self.traps[index].gva
        if self.guest.read(gva, 5) not in (NOP5, ARMED5):
            raise KvmUdError("KAIROS_UD_CTL arm", "Bad message", 74)
        self.guest.put(gva, ARMED5)
        self.armed.add(index)
        return ARMED5

    def disarm(self, index, **kw):
        gva = self.traps[index].gva
        self.guest.put(gva, NOP5)
        self.armed.discard(index)
        return NOP5

    def peek(self, gva, length, **kw):
        self.peeks += 1
        assert length <= kvmud.PEEK_MAX
        return self.guest.read(gva, length), 0

    # -- the kernel's side of a trap
    def trap(self, kind, *, rdi=PT_REGS, rsp=RSP, vcpu=0, host_ns=1_000):
        idx = next(i for i, t in enumerate(self.traps) if t.gva == SITES[kind])
        assert idx in self.armed
        self.c["hits"] += 1
        if len(self.pending) >= self.nr_events:
            self.c["overflow"] += 1
            return
        regs = dict(rdi=rdi, rsi=0, rdx=0, r10=0, r8=0, r9=0, rax=0, rsp=rsp)
        data, status, prev = b"", 0, None
        for j, f in enumerate(self.traps[idx].fetch):
            base = struct.unpack_from("<Q", prev)[0] if f.base == "prev" else regs[f.base]
            try:
                chunk = self.guest.read(base + f.offset, f.len)
            except KvmUdError:
                status = j + 1
                break
            data, prev = data + chunk, chunk
        raw = struct.pack("<6Q8QIIHBBHH384s", self.seq, host_ns, 0, SITES[kind], 0x1000, 0x246,
                          *regs.values(), vcpu, self.traps[idx].id, idx, 0, status, len(data),
                          1 if status else 0, data)
        self.seq += 1
        self.c["recorded"] += 1
        self.pending.append(kvmud.decode_event(raw))
        os.eventfd_write(self.efd, 1)

    # -- the ring
    def read_events(self, limit=None):
        n = len(self.pending) if limit is None else min(limit, len(self.pending))
        out, self.pending = self.pending[:n], self.pending[n:]
        return out

    def skip_to_head(self):
        n, self.pending = len(self.pending), []
        return n

    def counters(self):
        return RingCounters(self.nr_events, armed_mask=sum(1 << i for i in self.armed), head=self.seq,
                            tail=self.seq - len(self.pending), trap_hits=(), **self.c)

    def close(self):
        self.closed = True
        os.close(self.efd)


def ptregs(**user):
    raw = bytearray(plan.PT_REGS_SIZE)
    for name, value in user.items():
        struct.pack_into("<Q", raw, PT_REGS_OFFSETS[name], value)
    return bytes(raw)


def sched_attr(policy, prio=0, runtime=0, deadline=0, period=0, size=48):
    return struct.pack("<IIQiIQQQ", size, policy, 0, 0, prio, runtime, deadline, period)


@pytest.fixture
def rig():
    guest = FakeGuest()
    fake = FakeKvmUd(guest)
    be = KvmUdBackend(os.getpid(), attach=lambda pid: fake)   # a live "QEMU"
    be.open()
    be.plan = ResolvedPlan({SITES[s.kind]: s for s in PLAN})
    for a in be.plan.sites:
        be.arm(a)
    yield guest, fake, be
    if be.ud is not None:
        be.close()


def drain_decoded(be):
    out = []

    def on_hit(hit, read):
        try:
            out.append((hit, decode_hit(hit, read)))
        except DecodeError as exc:
            out.append((hit, exc))
    be.drain(on_hit)
    return out


# -- fetch lists ------------------------------------------------------------

def test_fetch_list_is_pt_regs_then_the_sites_own_steps():
    by_kind = {s.kind: s for s in PLAN}
    steps = fetch_list(by_kind["sched_setattr"])
    assert [(f.base, f.offset, f.len) for f in steps] == [
        ("rdi", 0, plan.PT_REGS_SIZE), ("rdi", 0x68, 8), ("prev", 0, 56)]
    assert fetch_list(by_kind["exit"]) == ()
    for site in PLAN:  # every site's list is one the kernel accepts
        kvmud.encode_traps([kvmud.Trap(0x1000, fetch=fetch_list(site))])


def test_arm_sets_one_table_in_plan_order_and_close_restores(rig):
    guest, fake, be = rig
    assert [t.gva for t in fake.traps] == list(SITES.values())
    assert all(guest.read(a, 5) == ARMED5 for a in SITES.values())
    assert fake.traps[0].fetch == fetch_list(PLAN[0])
    be.disarm(SITES["clock_nanosleep"])
    assert guest.read(SITES["clock_nanosleep"], 5) == NOP5
    be.arm(SITES["clock_nanosleep"])
    with pytest.raises(KvmUdError, match="not a site"):
        be.arm(0x1234)
    be.close()
    assert all(guest.read(a, 5) == NOP5 for a in SITES.values())
    assert fake.traps == [] and fake.closed


def test_close_after_qemu_exited_waits_for_no_vcpu(rig):
    """No vCPU thread runs to take a disarm once QEMU is gone (each op would wait its
    timeout): close releases the ring at once, the VM's teardown restores the NOPs."""
    import subprocess
    guest, fake, be = rig
    gone = subprocess.Popen(["true"])
    gone.wait()
    be.qemu_pid = gone.pid
    fake.disarm = lambda index, **kw: pytest.fail("a disarm op for an exited QEMU")
    be.close()
    assert fake.closed and be.armed == set()


def test_a_disarm_the_kernel_reads_back_armed_is_an_error(rig):
    """hold trusts the kernel's read-back of the site, not the ioctl's success alone."""
    guest, fake, be = rig
    site = SITES["sched_setattr"]
    fake.disarm = lambda index, **kw: ARMED5
    with pytest.raises(KairosError, match="still holds UD2"):
        be.disarm(site)
    assert site in be.armed


def test_read_peeks_in_64_byte_pieces(rig):
    guest, fake, be = rig
    guest.put(0xffffffff82000000 - 10, bytes(range(200)))
    fake.peeks = 0
    assert be.read(0xffffffff82000000 - 10, 200) == bytes(range(200))
    assert fake.peeks == 4  # 10 up to the page boundary, then 64, 64, 62


# -- events -> hits -> guest events ------------------------------------------

def test_sched_setattr_event_decodes_to_the_deadline_request(rig):
    guest, fake, be = rig
    guest.put(PT_REGS, ptregs(di=0, si=USER_BUF, dx=0))
    guest.put(USER_BUF, sched_attr(6, runtime=2_000_000, deadline=10_000_000, period=10_000_000)
              + b"\0" * 8)
    fake.trap("sched_setattr", vcpu=1, host_ns=777)
    guest.put(USER_BUF, b"\xff" * 56)  # the guest changes it afterwards: the event keeps what it saw
    [(hit, ev)] = drain_decoded(be)
    assert hit == Hit("sched_setattr", 1, hit.regs, 777) and hit.regs["rip"] == SITES["sched_setattr"]
    assert ev.kind == "sched" and ev.task_key == f"{PT_REGS:#x}" and ev.vcpu == 1
    assert (ev.sched.policy, ev.sched.runtime_ns, ev.sched.deadline_ns, ev.sched.period_ns) == \
        ("deadline", 2_000_000, 10_000_000, 10_000_000)
    assert be.counters.hits == 1 and be.counters.per_kind == {"sched_setattr": 1}


def test_sleep_and_fifo_and_exit_events(rig):
    guest, fake, be = rig
    guest.put(PT_REGS, ptregs(di=1, si=1, dx=USER_BUF))  # CLOCK_MONOTONIC, TIMER_ABSTIME
    guest.put(USER_BUF, struct.pack("<qq", 5, 250_000_000))
    fake.trap("clock_nanosleep")
    guest.put(PT_REGS, ptregs(di=0, si=1, dx=USER_BUF + 64))  # sched_setscheduler(0, FIFO, &p)
    guest.put(USER_BUF + 64, struct.pack("<i", 50))
    fake.trap("sched_setscheduler")
    guest.put(PT_REGS, ptregs(di=0, si=USER_BUF + 64))       # sched_setparam(0, &p)
    fake.trap("sched_setparam")
    guest.put(PT_REGS, ptregs(di=USER_BUF))                  # nanosleep(&ts)
    fake.trap("nanosleep")
    fake.trap("exit")
    evs = [e for _, e in drain_decoded(be)]
    assert evs[0].kind == "sleep" and evs[0].sleep.absolute and evs[0].sleep.clock_id == 1
    assert evs[0].sleep.time.ns == 5_250_000_000
    assert (evs[1].sched.policy, evs[1].sched.priority) == ("fifo", 50)
    assert (evs[2].sched.policy, evs[2].sched.priority) == (None, 50)
    assert not evs[3].sleep.absolute and evs[3].sleep.time.ns == 5_250_000_000
    assert evs[4].kind == "exit" and evs[4].task_key == f"{PT_REGS:#x}"


def test_reads_outside_the_fetch_are_refused(rig):
    guest, fake, be = rig
    guest.put(PT_REGS, ptregs(di=0, si=USER_BUF, dx=0))
    # a VER1+ struct of 64 bytes: the decoder wants 8 bytes past the 56 that were fetched
    guest.put(USER_BUF, sched_attr(6, runtime=2_000_000, deadline=10_000_000, period=10_000_000,
                                   size=64) + b"\0" * 16)
    fake.trap("sched_setattr")
    got = []
    be.drain(lambda hit, read: got.append((hit, read)))
    hit, read = got[0]
    assert read(PT_REGS + 0x68, 8) == struct.pack("<Q", USER_BUF)
    assert len(read(USER_BUF, 56)) == 56
    for addr, n in ((USER_BUF + 48, 16), (PT_REGS - 8, 8), (0, 8), (STACK_TOP, 1)):
        with pytest.raises(NotFetched) as ei:
            read(addr, n)
        assert isinstance(ei.value, KairosError)
    with pytest.raises(DecodeError, match="not fetched"):
        decode_hit(hit, read)


def test_a_faulted_fetch_is_a_rejected_event_not_a_crash(rig):
    guest, fake, be = rig
    # the site fetches 56 bytes (VER1): a VER0 struct right before unmapped memory faults the step
    guest.put(PT_REGS, ptregs(di=0, si=USER_BUF, dx=0))
    guest.put(USER_BUF, sched_attr(6, runtime=2_000_000, deadline=10_000_000, period=10_000_000))
    fake.trap("sched_setattr")
    [(_, e0)] = drain_decoded(be)
    assert isinstance(e0, DecodeError) and "not fetched" in str(e0)
    guest.put(PT_REGS, ptregs(di=0, si=0x7fff00000000, dx=0))  # user pointer to nothing
    fake.trap("sched_setattr")
    fake.trap("clock_nanosleep", rdi=0xffffc90000ff0000)    # pt_regs unreadable: nothing fetched
    [(_, e1), (_, e2)] = drain_decoded(be)
    assert isinstance(e1, DecodeError) and isinstance(e2, DecodeError)


def test_event_memory_places_each_step():
    ev = kvmud.decode_event(struct.pack(
        "<6Q8QIIHBBHH384s", 0, 0, 0, 0, 0, 0, PT_REGS, 0, 0, 0, 0, 0, 0, RSP, 0, 1, 0, 0, 0,
        plan.PT_REGS_SIZE + 8 + 4, 0, ptregs(si=USER_BUF) + struct.pack("<Q", USER_BUF) + b"abcd"))
    mem = EventMemory(ev, fetch_list(PLAN[2]))  # sched_setparam: rdi+0x68 then 4 bytes
    assert mem.regions == [(PT_REGS, ptregs(si=USER_BUF)), (PT_REGS + 0x68, struct.pack("<Q", USER_BUF)),
                           (USER_BUF, b"abcd")]
    assert mem.read(USER_BUF + 1, 3) == b"bcd"


def test_overflow_and_rate_drops_are_counted_as_suppressed():
    fake = FakeKvmUd(FakeGuest())
    fake.c["overflow"] = 7  # before open: not ours
    be = KvmUdBackend(os.getpid(), attach=lambda pid: fake)   # a live "QEMU"
    be.open()
    be.plan = ResolvedPlan({SITES[s.kind]: s for s in PLAN})
    be.arm(SITES["exit"])
    for _ in range(fake.nr_events + 3):
        fake.trap("exit")
    fake.c["rate_dropped"] += 2
    got = drain_decoded(be)
    assert len(got) == fake.nr_events and be.counters.hits == fake.nr_events
    assert be.counters.suppressed == 3 + 2
    be.close()


def test_unknown_trap_index_is_rejected(rig):
    guest, fake, be = rig
    fake.trap("exit")
    be.table = be.table[:2]  # as if the table had changed under us
    assert drain_decoded(be) == [] and be.counters.rejected == 1


# -- the loop ----------------------------------------------------------------

def test_run_serves_events_and_requests_until_stopped(rig, monkeypatch):
    """The loop sleeps on the eventfd and the control pipe only: with its safety
    timeout an hour long, a trap, a request and the stop still get through."""
    from kairos_libvirt.introspect import kvmud_backend
    monkeypatch.setattr(kvmud_backend, "IDLE_CHECK_S", 3600.0)
    guest, fake, be = rig
    guest.put(PT_REGS, ptregs(di=1, si=0, dx=USER_BUF))
    guest.put(USER_BUF, struct.pack("<qq", 0, 4_000_000))
    seen, ran = [], threading.Event()
    stop = threading.Event()
    t = threading.Thread(target=be.run, args=(lambda h, r: seen.append(decode_hit(h, r)), stop))
    t.start()
    try:
        fake.trap("clock_nanosleep")
        deadline = time.monotonic() + 5
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)
        be.request(ran.set)
        assert ran.wait(5)                                   # woken, not polled
    finally:
        stop.set()
        be.wake()                                            # as Introspector.stop does
        t.join(5)
    assert not t.is_alive()
    assert seen[0].sleep.time.ns == 4_000_000


def test_runtime_learns_a_deadline_task_through_kvm_ud(rig, monkeypatch):
    """The Introspector's _on_hit path with this backend: decoded counts, the task model."""
    guest, fake, be = rig
    decl = {0: VcpuSched("deadline", runtime_ns=1_000_000, deadline_ns=10_000_000,
                         period_ns=10_000_000)}
    intro = runtime.Introspector(be, lambda read: None, decl, {0: Fraction(6, 10)})
    intro.layout = object()          # no task ids from this backend (no gs_base in the event)
    guest.put(PT_REGS, ptregs(di=0, si=USER_BUF, dx=0))
    guest.put(USER_BUF, sched_attr(6, runtime=2_000_000, deadline=10_000_000, period=10_000_000)
              + b"\0" * 8)
    fake.trap("sched_setattr")
    be.drain(intro._on_hit)
    assert be.counters.decoded == 1 and be.counters.rejected == 0
    [task] = intro.tasks_snapshot()
    assert (task["policy"], task["runtime_ns"], task["period_ns"]) == ("deadline", 2_000_000, 10_000_000)


# -- choosing the backend ------------------------------------------------------

def test_available_is_the_patched_kvm_probe(monkeypatch):
    monkeypatch.setattr(kvmud, "patched_kvm_loaded", lambda path=kvmud.PARAM_PATH: True)
    assert kvmud_backend.available()
    monkeypatch.setattr(kvmud, "patched_kvm_loaded", lambda path=kvmud.PARAM_PATH: False)
    assert not kvmud_backend.available()


def test_make_picks_kvm_ud_or_says_why_not(monkeypatch, tmp_path):
    monkeypatch.setattr(kvmud, "patched_kvm_loaded", lambda path=kvmud.PARAM_PATH: True)
    monkeypatch.setattr(kvmud, "find_vm_fds", lambda pid: [11])
    be, note = backends.make("kvm-ud", "d", None, 4242, str(tmp_path))
    assert isinstance(be, KvmUdBackend) and be.name == "kvm-ud" and note is None and be.qemu_pid == 4242
    monkeypatch.setattr(kvmud, "find_vm_fds", lambda pid: [])
    from tests.unit.test_stop_budget import FakeDom
    be, note = backends.make("kvm-ud", "d", FakeDom("qemu", 7_002_022), 4242, str(tmp_path))
    assert be.name == "gdbstub" and "without KVM (TCG)" in note and "falling back to gdbstub" in note
    monkeypatch.setattr(kvmud, "patched_kvm_loaded", lambda path=kvmud.PARAM_PATH: False)
    monkeypatch.setattr(kvmud, "api_version", lambda path=kvmud.PARAM_PATH: 1)
    be, note = backends.make("kvm-ud", "d", FakeDom("kvm", 7_002_022), 4242, str(tmp_path))
    assert be.name == "gdbstub" and "API 1" in note and be.budget.spec.hit_cost_ns == 0
