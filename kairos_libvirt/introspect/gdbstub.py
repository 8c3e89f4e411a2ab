"""Backend ``gdbstub``: traps through QEMU's gdbstub, for stock kernels.

The agent opens QEMU's gdbstub on a root-only unix socket through libvirt
(HMP ``gdbserver``), speaks the remote protocol itself (:mod:`.rsp`), plants
breakpoints at the trap sites and handles each hit while the VM is stopped:
read the registers, decode (guest memory through the stopped vCPU's page
tables), then resume at site + 5 so the fentry NOP is skipped without a
single-step: one VM stop per hit instead of two (DESIGN.md §2).

Every hit stops the whole VM for milliseconds under TCG, so stops are a
budget (:mod:`.budget`): every stop (the attach, each hit, each interrupt to
arm or disarm) is accounted, and when one more stop would overrun the
domain's share of any 1 s window, the armed sites come off before the VM
resumes and go back on once the budget returned; the guest never waits.  A
token bucket per site also disarms a site that fires too often for a
cool-down, and the runtime disarms ``clock_nanosleep`` once periods are learnt.

Guest memory for the attach (the kernel's place, its slide, the trap sites'
bytes, the task layout) is read from QEMU's process (``guest_memory``,
:mod:`..host.guestmem`) while the VM runs, so the gdbstub is opened once, when
the kernel is up, only to plant the breakpoints.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Set

from ..errors import KairosError
from .budget import Bucket, StopBudget
from .control import IDLE_CHECK_S, ControlQueue
from .plan import Hit, ResolvedPlan
from .rsp.client import RspClient
from .rsp.errors import RspError, RspTimeout

log = logging.getLogger("kairosvm-agent.gdbstub")

SOCKET_NAME = "gdb.sock"


@dataclass
class Counters:
    hits: int = 0
    decoded: int = 0
    rejected: int = 0
    suppressed: int = 0          # times a site was disarmed by its rate limit
    handler_ns: int = 0          # time the VM spent stopped in our handler
    last_error: Optional[str] = None
    per_kind: Dict[str, int] = field(default_factory=dict)


#: Sites hit once per period of a periodic task: the first to wait for the stop budget.
HOT_KINDS = frozenset({"clock_nanosleep", "nanosleep"})
#: Expected stops kept for the lifecycle sites once the hot ones wait.
RESERVE_STOPS = 3


class GdbstubBackend:
    """Owns the RSP connection; runs its loop in a thread of the agent."""

    name = "gdbstub"
    cheap_traps = False
    identifies_tasks = True

    #: 50 hits/s at the 3-4.5 ms a hit costs under TCG (DESIGN.md §2) bounds the
    #: time the guest stands stopped for us to about 20 %.
    def __init__(self, open_server: Callable[[str], None], close_server: Callable[[], None],
                 sock_dir: str, rate: float = 50.0, burst: float = 50.0,
                 cooldown_s: float = 2.0, budget: Optional[StopBudget] = None,
                 guest_memory: Optional[Callable[[], object]] = None) -> None:
        self._open_server, self._close_server = open_server, close_server
        self.sock_dir = sock_dir
        self.client: Optional[RspClient] = None
        self.plan = ResolvedPlan()
        self.armed: Set[int] = set()
        self.rate, self.burst, self.cooldown_s = rate, burst, cooldown_s
        self.buckets: Dict[int, Bucket] = {}
        self.cooling: Dict[int, float] = {}
        self.control = ControlQueue()
        self.counters = Counters()
        self.budget = budget or StopBudget()
        #: Sites the budget took off, armed again when it returns.
        self.budget_off: Set[int] = set()
        self._guest_memory = guest_memory

    def guest_memory(self):
        """Guest-physical memory read from QEMU's process (no stop), or None where the host cannot.

        A failure (no RAM mapping of the domain's size) is raised once as a
        KairosError (backends._OpenOnce), later calls answer None.
        """
        return self._guest_memory() if self._guest_memory is not None else None

    # -- connection ------------------------------------------------------
    def open(self) -> RspClient:
        """Open QEMU's gdbstub on a root-only socket and attach (the VM pauses)."""
        os.makedirs(self.sock_dir, mode=0o700, exist_ok=True)
        os.chmod(self.sock_dir, 0o700)
        path = os.path.join(self.sock_dir, SOCKET_NAME)
        if os.path.exists(path):
            os.unlink(path)
        self._open_server(path)
        deadline = time.monotonic() + 5
        while not os.path.exists(path):
            if time.monotonic() > deadline:
                raise KairosError(f"QEMU did not create its gdbstub socket {path}")
            time.sleep(0.01)
        os.chmod(path, 0o600)
        # QEMU stops the VM when a debugger connects: the attach stop starts here.
        self.budget.begin("attach")
        try:
            self.client = RspClient.connect_unix(path, timeout=5.0)
        except BaseException:
            self.budget.end()
            raise
        return self.client

    def attach_elapsed_ns(self) -> int:
        """How long the VM has stood stopped for this attach so far."""
        return self.budget.stopped_for()

    def _resume(self, c: RspClient) -> None:
        """Let the VM run again (and close the stop in the account)."""
        c.cont()
        self.budget.end()

    def read(self, addr: int, n: int) -> bytes:
        """Guest-virtual read through the stopped vCPU's page tables."""
        assert self.client is not None
        return self.client.read_memory(addr, n)

    def close(self) -> None:
        """Remove every breakpoint, resume the VM, close the server and its socket."""
        c, self.client = self.client, None
        if c is not None:
            try:
                if c.state.name == "RUNNING":
                    self.budget.begin("control")
                    c.interrupt(timeout=2.0)
                for addr in list(self.armed):
                    c.remove_breakpoint(addr)
                self.armed.clear()
                c.detach()
            except RspError as exc:
                log.warning("gdbstub: detach: %s", exc)
            finally:
                c.close()
                self.budget.end()   # detached (or the connection is gone): the VM runs
                self.budget.stop_wait()
        self.budget_off.clear()
        try:
            self._close_server()
        except KairosError as exc:
            log.warning("gdbstub: closing the server: %s", exc)
        try:
            os.unlink(os.path.join(self.sock_dir, SOCKET_NAME))
        except FileNotFoundError:
            pass

    # -- arming (VM stopped) ---------------------------------------------
    def arm(self, addr: int) -> None:
        """Plant the breakpoint; while the budget is spent, the site waits for it instead."""
        assert self.client is not None
        if self.budget.waiting:
            self.budget_off.add(addr)
            return
        if addr not in self.armed:
            self.client.insert_breakpoint(addr)
            self.armed.add(addr)

    def disarm(self, addr: int) -> None:
        """Remove the breakpoint; a site cooling off after its rate limit stays off too."""
        assert self.client is not None
        self.cooling.pop(addr, None)
        self.budget_off.discard(addr)
        if addr in self.armed:
            self.client.remove_breakpoint(addr)
            self.armed.discard(addr)

    def request(self, op: Callable[[], None]) -> None:
        """Run ``op`` in the backend thread while the VM is stopped."""
        self.control.put(op)

    def wake(self) -> None:
        """Wake the loop with no work (the agent stops: it checks ``stop``)."""
        self.control.wake()

    # -- the loop ----------------------------------------------------------
    def run(self, on_hit: Callable[[Hit, Callable[[int, int], bytes]], None],
            stop: threading.Event) -> None:
        """Resume the VM and serve hits until ``stop`` is set (VM left stopped)."""
        c = self.client
        assert c is not None
        self._keep_budget()
        self._resume(c)          # ends the attach stop
        while not stop.is_set():
            try:
                # Sleeps on the socket (a hit) and the control pipe (a request, the
                # agent's stop) until timed work is due: idle, no wake-ups at all.
                reply = c.wait_stop(timeout=self._idle_wait_s(), wake=self.control.fileno())
            except RspTimeout:
                self.control.clear()
                if not stop.is_set():
                    self._idle(c)
                continue
            t0 = self.budget.begin("trap")
            if not reply.stopped:
                raise KairosError(f"QEMU's gdbstub reports the VM {reply.kind}")
            self._handle(c, reply, on_hit)
            self.control.run_pending()
            self._keep_budget()
            self.counters.handler_ns += time.monotonic_ns() - t0
            if not stop.is_set():
                self._resume(c)
        if c.state.name == "RUNNING":
            self.budget.begin("control")
            c.interrupt(timeout=2.0)

    def _keep_budget(self) -> None:
        """VM stopped, about to resume: if one more stop would overrun the budget, take the sites off.

        The hot sites (the sleeps: a periodic task hits them every period) come
        off first, while RESERVE_STOPS more stops would still fit: the rare
        lifecycle sites (sched_*, exit) keep that reserve, so a task's start or
        end is not missed while the sleeps wait for the budget.
        """
        if not self.armed:
            return
        if not self.budget.can_stop():
            off = list(self.armed)
        elif not self.budget.can_stop(n=1 + RESERVE_STOPS):
            off = [a for a in self.armed if a in self.plan.sites
                   and self.plan.sites[a].kind in HOT_KINDS]
        else:
            return
        if not off:
            return
        self.budget.start_wait()
        for a in off:
            self.client.remove_breakpoint(a)     # type: ignore[union-attr]
            self.armed.discard(a)
            self.budget_off.add(a)
        log.debug("stop budget spent: %d site(s) wait", len(self.budget_off))

    def _idle_wait_s(self) -> float:
        """Seconds the VM may run before :meth:`_idle` has timed work: a cooling site
        due, or the budget back for queued requests or for the sites it took off."""
        now = time.monotonic()
        waits = [IDLE_CHECK_S] + [t - now for t in self.cooling.values() if t > now]
        if self.budget_off:
            waits.append(self.budget.wait_left_ns(n=2) / 1e9)
        if not self.control.empty() or any(t <= now for t in self.cooling.values()):
            waits.append(self.budget.wait_left_ns(n=1) / 1e9)
        # (a floor: a budget that says "now" but refuses, cannot spin the loop)
        return max(0.005, min(waits))

    def _idle(self, c: RspClient) -> None:
        """VM running, no hit: stop it only for due work, and only within the budget.

        Interrupting costs a stop; re-arming the sites the budget took off
        needs room for that stop and one hit after it.
        """
        now = time.monotonic()
        due = [a for a, t in self.cooling.items() if t <= now]
        # Room for the interrupt (no hit) and one hit after it; control work needs the interrupt only.
        rearm = bool(self.budget_off) and self.budget.can_stop(n=2, hits=1)
        if not rearm and ((self.control.empty() and not due) or not self.budget.can_stop(hits=0)):
            return
        self.budget.begin("control")
        c.interrupt(timeout=2.0)
        if rearm:
            self.budget.stop_wait()
            for a in sorted(self.budget_off):
                if a in self.plan.sites and a not in self.cooling:
                    self.client.insert_breakpoint(a)       # type: ignore[union-attr]
                    self.armed.add(a)
            self.budget_off.clear()
        for a in due:
            del self.cooling[a]
            if a in self.plan.sites:
                self.arm(a)
        self.control.run_pending()
        self._keep_budget()
        self._resume(c)

    def _handle(self, c: RspClient, reply, on_hit) -> None:
        regs = c.read_registers()
        rip = regs.get("rip", 0)
        kind = self.plan.kind_at(rip)
        if kind is None:
            return  # an interrupt or someone else's stop: nothing of ours
        vcpu = (reply.thread.tid - 1) if reply.thread and reply.thread.tid > 0 else 0
        self.counters.hits += 1
        self.counters.per_kind[kind] = self.counters.per_kind.get(kind, 0) + 1
        try:
            on_hit(Hit(kind, vcpu, regs, time.monotonic_ns(), stopped_ns=self.budget.total_ns),
                   self.read)
        finally:
            # Skip the 5-byte fentry NOP: resume after it, no single-step.
            c.set_register("rip", rip + 5)
            now = time.monotonic()
            bucket = self.buckets.setdefault(rip, Bucket(self.rate, self.burst))
            if not bucket.take(now):
                self.disarm(rip)
                self.cooling[rip] = now + self.cooldown_s
                self.counters.suppressed += 1
                log.warning("trap %s fires faster than %.0f/s: disarmed for %.1fs",
                            kind, self.rate, self.cooldown_s)
