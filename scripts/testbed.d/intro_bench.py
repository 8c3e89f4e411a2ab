"""Benchmark of the introspection backends in the nested testbed (run by intro.py inside L1).

Same L2, same boot, same site (``__x64_sys_getpid``'s fentry NOP), ``rtprog --getpid-loop``:
  none     the site untrapped;
  kvm-ud   armed through :class:`KvmUdBackend` (the agent's backend; its run loop drains the ring);
  gdbstub  a breakpoint through :class:`GdbstubBackend` (the agent's fallback: QEMU's gdbstub,
           the project's RspClient, one VM stop per hit, resume at site + 5).
Reports ns per call and the cost per trapped call (armed - none) of each, and their ratio.
"""
from __future__ import annotations

import threading
import time

from kairos_libvirt.introspect import kvmud
from kairos_libvirt.introspect.kvmud_backend import KvmUdBackend
from kairos_libvirt.introspect.plan import ResolvedPlan, TrapSite

SITE = TrapSite("getpid", ("__x64_sys_getpid",))
CALLS = {"none": 20000, "kvm-ud": 5000, "gdbstub": 300}


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


def run(l2, rsyms, make_gdbstub) -> dict:
    site = rsyms.resolve("__x64_sys_getpid")
    with kvmud.KvmUd.attach(l2.qemu.pid) as ud:
        if ud.peek(site, 5)[0] != kvmud.NOP5:
            raise RuntimeError(f"__x64_sys_getpid at {site:#x} is not the fentry NOP")
    out: dict = {"site": site}
    out["none"] = {"calls": CALLS["none"], "ns_per_call": l2.getpid_ns(CALLS["none"])}
    out["kvm-ud"] = _trapped(l2, KvmUdBackend(l2.qemu.pid, rate=1_000_000, burst=100_000), site,
                             CALLS["kvm-ud"], 300)
    out["gdbstub"] = _trapped(l2, make_gdbstub("/tmp/kt-intro/gdb-bench"), site, CALLS["gdbstub"], 600)
    out["none_after"] = {"calls": CALLS["none"], "ns_per_call": l2.getpid_ns(CALLS["none"])}
    base = min(out["none"]["ns_per_call"], out["none_after"]["ns_per_call"])
    for k in ("kvm-ud", "gdbstub"):
        out[k]["trap_cost_ns"] = round(out[k]["ns_per_call"] - base, 1)
    out["gdbstub_over_kvmud"] = round(out["gdbstub"]["trap_cost_ns"] / out["kvm-ud"]["trap_cost_ns"], 1)
    return out
