"""Benchmark of the introspection backends in the nested testbed (run by intro.py inside L1).

Same L2, same boot, same site (``__x64_sys_getpid``'s fentry NOP), ``rtprog --getpid-loop``:
  none     the site untrapped;
  kvm-ud   armed through :class:`KvmUdBackend` (the agent's backend; its run loop drains the ring);
  gdbstub  the agent's fallback (QEMU's gdbstub, the project's RspClient).  A breakpoint cannot be
           planted in this testbed: a software breakpoint's INT3 in L2 is not intercepted by L1's KVM
           (L2's kernel oopses "int3" at the site: QEMU's TCG SVM checks the INTn intercept, not the
           #BP exception intercept, for INT3) and a hardware breakpoint never fires (0 hits over
           300 calls).  So each gdbstub event is emulated by what the backend does per hit, minus
           the trap: stop the VM (RSP interrupt, the stop reply), read the registers, write RIP,
           continue -- while L2 runs the same loop.  The guest-visible cost per event is the loop's
           extra time over the number of events.  This leaves out the trap's own exit, which is the
           *whole* of kvm-ud's cost: the ratio is, if anything, in gdbstub's favour.
Reports ns per call and the cost per trapped call (armed - none) of each, and their ratio.
"""
from __future__ import annotations

import re
import threading
import time

from kairos_libvirt.introspect import kvmud
from kairos_libvirt.introspect.kvmud_backend import KvmUdBackend
from kairos_libvirt.introspect.plan import ResolvedPlan, TrapSite

SITE = TrapSite("getpid", ("__x64_sys_getpid",))
CALLS = {"none": 20000, "kvm-ud": 5000, "gdbstub": 2_000_000}


def _trapped(l2, be, site: int, calls: int, timeout: float) -> dict:
    be.open()
    try:
        be.plan = ResolvedPlan({site: SITE})
        be.arm(site)
        hits = [0]
        stop = threading.Event()
        t = threading.Thread(target=be.run, args=(lambda h, r: hits.__setitem__(0, hits[0] + 1), stop),
                             daemon=True)
        t.start()
        t0 = time.monotonic()
        ns = l2.getpid_ns(calls, timeout)
        wall = time.monotonic() - t0
        time.sleep(0.3)
        stop.set()
        t.join(10)
    finally:
        be.close()
    return {"calls": calls, "ns_per_call": ns, "hits": hits[0], "wall_s": round(wall, 2),
            "suppressed": be.counters.suppressed, "handler_ns": be.counters.handler_ns}


def _gdbstub_events(l2, be, calls: int) -> dict:
    """Stop/handle/resume the VM through the gdbstub as a hit would, while L2 loops getpid."""
    c = be.open()                      # attaching stops the VM
    events, stopped_ns = 0, 0
    try:
        c.cont()
        pos = l2.run("getpid", calls)
        while not re.search(r"^KT-DONE getpid$", l2.con.poll()[pos:], re.M):
            t0 = time.monotonic_ns()
            c.interrupt(timeout=5.0)
            regs = c.read_registers()
            c.set_register("rip", regs["rip"])
            c.cont()
            stopped_ns += time.monotonic_ns() - t0
            events += 1
        out = l2.con.text[pos:]
    finally:
        be.close()
    m = re.search(r"getpid-loop calls=(\d+) total_ns=(\d+) ns_per_call=([\d.]+)", out)
    return {"calls": calls, "ns_per_call": float(m.group(3)), "total_ns": int(m.group(2)), "hits": events,
            "emulated": True, "driver_ns_per_event": stopped_ns // max(events, 1), "suppressed": 0}


def run(l2, rsyms, make_gdbstub) -> dict:
    site = rsyms.resolve("__x64_sys_getpid")
    with kvmud.KvmUd.attach(l2.qemu.pid) as ud:
        if ud.peek(site, 5)[0] != kvmud.NOP5:
            raise RuntimeError(f"__x64_sys_getpid at {site:#x} is not the fentry NOP")
    out: dict = {"site": site}
    out["none"] = {"calls": CALLS["none"], "ns_per_call": l2.getpid_ns(CALLS["none"])}
    out["kvm-ud"] = _trapped(l2, KvmUdBackend(l2.qemu.pid, rate=1_000_000, burst=100_000), site,
                             CALLS["kvm-ud"], 300)
    out["gdbstub"] = _gdbstub_events(l2, make_gdbstub("/tmp/kt-intro/gdb-bench"), CALLS["gdbstub"])
    out["none_after"] = {"calls": CALLS["none"], "ns_per_call": l2.getpid_ns(CALLS["none"])}
    base = min(out["none"]["ns_per_call"], out["none_after"]["ns_per_call"])
    out["kvm-ud"]["trap_cost_ns"] = round(out["kvm-ud"]["ns_per_call"] - base, 1)
    g = out["gdbstub"]   # one event per stop, not per call: the loop's extra time over the events
    g["trap_cost_ns"] = round((g["total_ns"] - base * g["calls"]) / max(g["hits"], 1), 1)
    out["gdbstub_over_kvmud"] = round(out["gdbstub"]["trap_cost_ns"] / out["kvm-ud"]["trap_cost_ns"], 1)
    return out
