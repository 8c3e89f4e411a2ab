"""Backend ``kvm-ud``: the patched KVM catches planted UD2 traps (kmod/).

The same backend protocol as :mod:`.gdbstub` (``open``/``read``/``arm``/
``disarm``/``request``/``run``/``close``, ``counters``, ``plan``), over the
kvm-ud uAPI (:mod:`.kvmud`):

- ``open()`` copies QEMU's VM fd (``pidfd_getfd``), sets up the per-VM event
  ring and an eventfd of ours.  The guest never stops for us.
- ``read()`` is the kernel's PEEK (64 bytes per vCPU round trip): slow, used
  only at attach (symbols, KASLR slide, task layout).
- ``arm``/``disarm`` keep one trap table for the plan (sites in plan order, so
  an agent that restarts sets the same indices again) and have the kernel
  write the one byte.  Each site's fetch list is **the whole ``struct
  pt_regs`` at ``rdi``** then the site's own :attr:`TrapSite.fetch` (the user
  pointer, then the struct behind it): exactly what :func:`plan.decode_hit`
  reads, so a hit decodes from the event alone, as the guest saw it at the
  trap.
- ``run()`` waits on the eventfd, drains the ring and hands each event to the
  runtime as a :class:`Hit` with a reader that serves reads from the event's
  fetched bytes only; anything else raises :class:`NotFetched` (a
  KairosError, which the decoders turn into a rejected event).
- ``counters.suppressed`` counts the kernel's drops: events over the rate
  limit and events lost to a full ring (the guest never waits for either).
- ``close()`` disarms every site (the NOP comes back) and releases the ring
  and the fd.  If that fails, the kernel restores the NOPs at VM teardown.

:func:`available` is true when the patched KVM with this package's API is
loaded; otherwise the agent falls back to gdbstub (``backends.make``).
"""
from __future__ import annotations

import logging
import os
import select
import struct
import threading
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..errors import KairosError
from ..host import proc
from . import kvmud
from .gdbstub import Counters
from .kvmud import Fetch, KvmUdError, KvmUdEvent, Trap
from .control import IDLE_CHECK_S, ControlQueue
from .plan import PT_REGS_SIZE, Hit, ResolvedPlan, TrapSite

log = logging.getLogger("kairosvm-agent.kvmud")

#: Ring slots (512 bytes each): 2 MiB, several seconds of a hammering guest.
NR_EVENTS = 4096
#: Kernel-side rate limit per VM (token bucket): events/s and burst.  A trap
#: over it still skips the site; only the event is lost (``suppressed``).
RATE = 5000
BURST = 500
#: How long a vCPU-side op (arm, disarm, peek) may wait for a vCPU thread.
OP_TIMEOUT_MS = 2000
#: Events handed to the runtime per drain (the rest waits for the next round).
DRAIN_LIMIT = 1024


class NotFetched(KairosError):
    """A decoder asked for guest memory the trap's fetch list did not copy."""


def fetch_list(site: TrapSite) -> Tuple[Fetch, ...]:
    """The kernel fetch list for ``site``: ``struct pt_regs`` at rdi, then ``site.fetch``.

    ``site.fetch`` steps are ``(base, offset, len)`` with base a register or
    ``"*"``: the pointer the previous step copied (kvm-ud's ``PREV``).  A site
    without a fetch list (``do_exit``) fetches nothing: its decoder needs only
    the stack pointer.
    """
    if not site.fetch:
        return ()
    steps = [Fetch("rdi", 0, PT_REGS_SIZE)]
    for base, off, n in site.fetch:
        steps.append(Fetch("prev" if base == "*" else base, off, n))
    return tuple(steps)


class EventMemory:
    """Guest-virtual memory as one event fetched it: a few (address, bytes) regions.

    ``read(addr, n)`` answers from one region that holds all ``n`` bytes, else
    raises :class:`NotFetched`.  Addresses are recomputed the way the kernel
    computed them (register + offset, or the previous step's first u64 +
    offset); a step the kernel could not copy (``fetch_status``) is absent.
    """

    def __init__(self, ev: KvmUdEvent, steps: Sequence[Fetch]) -> None:
        self.regions: List[Tuple[int, bytes]] = []
        prev: Optional[bytes] = None
        for step, data in zip(steps, ev.fetched(steps)):
            if step.base == "prev":
                if prev is None or len(prev) < 8:
                    break
                base = struct.unpack_from("<Q", prev)[0]
            elif step.base in ev.regs:
                base = ev.regs[step.base]
            else:
                break   # a register the event does not carry: cannot place the bytes
            self.regions.append(((base + step.offset) & (2**64 - 1), data))
            prev = data

    def read(self, addr: int, n: int) -> bytes:
        for start, data in self.regions:
            if start <= addr and addr + n <= start + len(data):
                return data[addr - start:addr - start + n]
        raise NotFetched(f"guest memory {addr:#x}+{n} was not fetched at the trap "
                         f"(fetched: {', '.join(f'{a:#x}+{len(d)}' for a, d in self.regions) or 'nothing'})")


def available() -> bool:
    """Is a KVM with the kairos #UD trap table (this package's API) loaded?"""
    return kvmud.patched_kvm_loaded()


def unavailable_reason(qemu_pid: int) -> Optional[str]:
    """Why kvm-ud cannot serve QEMU ``qemu_pid`` (None: it can).

    The patched KVM must be loaded, and QEMU must run the guest under KVM: a
    TCG domain (``<domain type='qemu'>``) has no VM fd to trap through.
    """
    if not available():
        v = kvmud.api_version()
        if v is None:
            return "the patched KVM (kmod/) is not loaded"
        return f"the loaded patched KVM speaks API {v}, this agent {kvmud.API_VERSION} (rebuild kmod/)"
    try:
        if not kvmud.find_vm_fds(qemu_pid):
            return "QEMU runs this domain without KVM (TCG): there is no VM to trap in"
    except KvmUdError as exc:
        return str(exc)
    return None


class KvmUdBackend:
    """Introspection through the patched KVM; the guest keeps running at every trap."""

    name = "kvm-ud"
    #: A trap costs microseconds and never stops the guest: keep the sleep
    #: sites armed (no sampling windows).
    cheap_traps = True
    #: Events carry no GS base: a trap cannot name its task (the task_struct
    #: layout then serves only the census, which needs guest memory).
    identifies_tasks = False

    def __init__(self, qemu_pid: int, attach: Optional[Callable[[int], "kvmud.KvmUd"]] = None,
                 rate: int = RATE, burst: int = BURST, timeout_ms: int = OP_TIMEOUT_MS,
                 guest_memory: Optional[Callable[[], object]] = None) -> None:
        self.qemu_pid = qemu_pid
        self._guest_memory = guest_memory
        self._attach = attach or (lambda pid: kvmud.KvmUd.attach(pid, nr_events=NR_EVENTS))
        self.rate, self.burst, self.timeout_ms = rate, burst, timeout_ms
        self.ud: Optional["kvmud.KvmUd"] = None
        self.plan = ResolvedPlan()
        self.counters = Counters()
        self.table: List[int] = []              # trap index -> site address
        self.fetch: Dict[int, Tuple[Fetch, ...]] = {}
        self.armed: set = set()
        self.control = ControlQueue()
        self._base = (0, 0)                     # kernel (rate_dropped, overflow) at open
        self.stale_at_open = 0
        self._lost = 0                          # events skipped over a torn ring
        self.kernel: Dict[str, int] = {}        # the ring's counters, last seen
        # counters.handler_ns stays 0: the guest never stops for this backend

    def guest_memory(self):
        """Guest-physical memory read from QEMU's process, or None where the host cannot.

        QEMU maps a KVM guest's RAM in its own process as it does a TCG
        guest's: symbols, the task census and task_struct reads need no PEEK
        (64 bytes a vCPU round trip) and no event.  A failure is raised once
        (backends._OpenOnce), later calls answer None.
        """
        return self._guest_memory() if self._guest_memory is not None else None

    # -- connection ------------------------------------------------------
    def open(self) -> "kvmud.KvmUd":
        """Get QEMU's VM fd and our ring; the VM keeps running."""
        self.ud = self._attach(self.qemu_pid)
        # events left by an agent that ran before us describe a past we did not model
        self.stale_at_open = self._skip_pending()
        c = self.ud.counters()
        self._base = (c.rate_dropped, c.overflow)
        return self.ud

    def _skip_pending(self) -> int:
        assert self.ud is not None
        try:
            return len(self.ud.read_events())
        except KvmUdError:
            return self.ud.skip_to_head()

    def read(self, addr: int, n: int) -> bytes:
        """Guest-virtual read by the kernel on a vCPU thread (PEEK, 64 bytes a time)."""
        assert self.ud is not None
        out = bytearray()
        while n > 0:
            k = min(n, kvmud.PEEK_MAX, 4096 - (addr & 4095))
            out += self.ud.peek(addr, k, timeout_ms=self.timeout_ms)[0]
            addr, n = addr + k, n - k
        return bytes(out)

    def close(self) -> None:
        """Disarm every site (NOP back), drop the table, release the ring and the fd."""
        ud, self.ud = self.ud, None
        if ud is not None and not proc.pid_alive(self.qemu_pid):
            # QEMU is gone: no vCPU thread runs to take the ops (each would wait
            # OP_TIMEOUT_MS), and the VM's teardown restores the NOPs.
            self.armed = set()
        if ud is not None:
            for addr in list(self.armed):
                if addr not in self.table:
                    continue
                try:
                    ud.disarm(self.table.index(addr), timeout_ms=self.timeout_ms)
                    self.armed.discard(addr)
                except KvmUdError as exc:
                    log.warning("kvm-ud: disarming %#x: %s (the kernel restores it at VM teardown)",
                                addr, exc)
            if not self.armed:
                try:
                    ud.set_traps([])
                except KvmUdError as exc:
                    log.warning("kvm-ud: clearing the trap table: %s", exc)
            ud.close()
        self.table, self.fetch, self.armed = [], {}, set()

    # -- arming ----------------------------------------------------------
    def _ensure_table(self, addr: int) -> int:
        """The trap index of ``addr``; (re)sets the table when the plan has new sites.

        Sites keep their index once in the table (armed sites must: EBUSY),
        new ones are appended; the first table follows the plan's order.
        """
        assert self.ud is not None
        if addr not in self.plan.sites:
            raise KvmUdError("arm", f"{addr:#x} is not a site of the trap plan")
        if addr in self.table:
            return self.table.index(addr)
        table = list(self.table) + [a for a in self.plan.sites if a not in self.table]
        fetch = {a: fetch_list(self.plan.sites[a]) for a in table}
        self.ud.set_traps([Trap(a, id=i + 1, fetch=fetch[a]) for i, a in enumerate(table)],
                          rate=self.rate, burst=self.burst)
        self.table, self.fetch = table, fetch
        return table.index(addr)

    def arm(self, addr: int) -> None:
        if addr in self.armed:
            return
        i = self._ensure_table(addr)
        assert self.ud is not None
        self.ud.arm(i, timeout_ms=self.timeout_ms)
        self.armed.add(addr)

    def disarm(self, addr: int) -> None:
        if addr not in self.armed:
            return
        assert self.ud is not None
        after = self.ud.disarm(self.table.index(addr), timeout_ms=self.timeout_ms)
        if after == kvmud.ARMED5:  # the kernel read the site back: still a trap
            raise KairosError(f"kvm-ud: the site at {addr:#x} still holds UD2 after disarm")
        self.armed.discard(addr)

    def request(self, op: Callable[[], None]) -> None:
        """Run ``op`` in the backend thread (the loop wakes at once)."""
        self.control.put(op)

    def wake(self) -> None:
        """Wake the loop with no work (the agent stops: it checks ``stop``)."""
        self.control.wake()

    # -- the loop ----------------------------------------------------------
    def run(self, on_hit: Callable[[Hit, Callable[[int, int], bytes]], None],
            stop: threading.Event) -> None:
        """Serve events until ``stop`` is set (the guest runs all along)."""
        assert self.ud is not None
        efd = self.ud.efd
        while not stop.is_set():
            self.control.run_pending()
            # No timeout: a trap (eventfd), a request or the agent's stop (the pipe)
            # wakes it; idle it costs nothing.  IDLE_CHECK_S only bounds a lost wake-up.
            r, _, _ = select.select([efd, self.control.fileno()], [], [], IDLE_CHECK_S)
            if efd in r:
                try:
                    os.eventfd_read(efd)
                except BlockingIOError:
                    pass
            self.drain(on_hit)

    def drain(self, on_hit: Callable[[Hit, Callable[[int, int], bytes]], None]) -> int:
        """Hand every pending event to ``on_hit``; returns how many."""
        assert self.ud is not None
        n = 0
        while True:
            try:
                evs = self.ud.read_events(limit=DRAIN_LIMIT)
            except KvmUdError as exc:   # a torn ring (a bogus tail): start again at head
                lost = self.ud.skip_to_head()
                self._lost += lost
                self.counters.last_error = f"ring: {exc}; skipped {lost} event(s)"
                log.warning("kvm-ud: %s", self.counters.last_error)
                continue
            for ev in evs:
                self._deliver(ev, on_hit)
            n += len(evs)
            if len(evs) < DRAIN_LIMIT:
                break
        self._update_counters()
        return n

    def _deliver(self, ev: KvmUdEvent, on_hit) -> None:
        addr = self.table[ev.trap_index] if ev.trap_index < len(self.table) else None
        site = self.plan.sites.get(addr) if addr is not None else None
        if site is None or ev.rip != addr:
            self.counters.rejected += 1
            self.counters.last_error = f"event for unknown trap {ev.trap_index} at {ev.rip:#x}"
            return
        self.counters.hits += 1
        self.counters.per_kind[site.kind] = self.counters.per_kind.get(site.kind, 0) + 1
        regs = dict(ev.regs)
        regs.update(rip=ev.rip, eflags=ev.rflags, cr3=ev.cr3)
        mem = EventMemory(ev, self.fetch.get(addr, ()))
        # host_ns is the trap's ktime_get_ns(): CLOCK_MONOTONIC of this host, as time.monotonic_ns()
        try:
            on_hit(Hit(site.kind, ev.vcpu, regs, ev.host_ns), mem.read)
        except KairosError as exc:
            self.counters.last_error = str(exc)
            log.warning("kvm-ud: event %d (%s): %s", ev.seq, site.kind, exc)

    def _update_counters(self) -> None:
        assert self.ud is not None
        c = self.ud.counters()
        self.kernel = {"hits": c.hits, "recorded": c.recorded, "rate_dropped": c.rate_dropped,
                       "overflow": c.overflow, "fetch_faults": c.fetch_faults, "stale": c.stale}
        self.counters.suppressed = (self._lost + (c.rate_dropped - self._base[0])
                                    + (c.overflow - self._base[1]))


def make(name: str, qemu_pid: int,
         guest_memory: Optional[Callable[[], object]] = None) -> KvmUdBackend:
    """The backend for domain ``name`` whose QEMU runs as ``qemu_pid``."""
    return KvmUdBackend(qemu_pid, guest_memory=guest_memory)
