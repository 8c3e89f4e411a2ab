"""Measure how much SCHED_DEADLINE bandwidth the kernel admits right now.

Why probe: the kernel's limit is not just ``sched_rt_runtime_us /
sched_rt_period_us`` per CPU.  Since Linux 6.12 a per-CPU fair server takes
0.05 of it (unreadable under lockdown), so on 2 CPUs the kernel admits 1.80,
not 1.90.  The ledger must not promise what the kernel will refuse with EBUSY.

How: park helper threads, raise each one's SCHED_DEADLINE bandwidth by binary
search until the kernel refuses, sum, then let the threads *exit* while still
under SCHED_DEADLINE: exiting returns their bandwidth (switching a sleeping
thread back to SCHED_OTHER would leak it).
"""
from __future__ import annotations

import errno as _errno
import os
import threading
import time
from fractions import Fraction
from typing import List

from ..errors import HostError
from . import sched

#: Short on purpose: a SCHED_DEADLINE thread that exits returns its bandwidth
#: only at its "0-lag" time (inactive_task_timer), up to one deadline later.
PERIOD_NS = 10_000_000
STEP_NS = 1_000  # 1 us: 1e-4 of a CPU at this period


def _max_runtime(tid: int) -> int:
    """Largest runtime (ns, at PERIOD_NS) the kernel admits for ``tid``; 0 if none."""
    lo, hi = 0, PERIOD_NS // STEP_NS  # in steps; lo is admitted (0 = nothing yet)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        runtime = max(mid * STEP_NS, 1024)
        try:
            sched.set_deadline(tid, runtime, PERIOD_NS, PERIOD_NS)
        except HostError as exc:
            if exc.errno != _errno.EBUSY:
                raise
            hi = mid - 1
        else:
            lo = mid
    if lo:
        sched.set_deadline(tid, lo * STEP_NS, PERIOD_NS, PERIOD_NS)
    return lo * STEP_NS


def probe_free_bandwidth(max_threads: int = 256) -> Fraction:
    """Free deadline bandwidth of the calling thread's root domain, in CPUs."""
    stop = threading.Event()
    ready: List[int] = []
    lock = threading.Condition()

    def park() -> None:
        with lock:
            ready.append(threading.get_native_id())
            lock.notify()
        stop.wait()

    threads: List[threading.Thread] = []
    total = Fraction(0)
    try:
        for _ in range(max_threads):
            t = threading.Thread(target=park, daemon=True, name="kairos-dlprobe")
            with lock:
                t.start()
                lock.wait_for(lambda: len(ready) == len(threads) + 1, timeout=5)
            threads.append(t)
            got = _max_runtime(ready[-1])
            if got == 0:
                break
            total += Fraction(got, PERIOD_NS)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=5)
        wait_threads_gone(ready)
        time.sleep(2 * PERIOD_NS / 1e9)  # let the exited threads' 0-lag timers fire
    return total


def wait_threads_gone(tids: List[int], timeout_s: float = 5.0) -> None:
    """``Thread.join`` returns before the kernel has reaped the thread, and a
    SCHED_DEADLINE thread's bandwidth is returned only then."""
    deadline = time.monotonic() + timeout_s
    pid = os.getpid()
    while time.monotonic() < deadline:
        if not any(os.path.exists(f"/proc/{pid}/task/{t}") for t in tids):
            return
        time.sleep(0.001)
