"""host/proc's readers of /proc/PID/stat and /proc/PID/status, on this very process (real /proc)."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

from kairos_libvirt.host import proc

#: A thread name with spaces and parentheses: stat's fields start after comm's *last* ')'.
ODD_COMM = "b) 9 9 (z)"


def _no_such_pid() -> int:
    with open("/proc/sys/kernel/pid_max") as f:
        return int(f.read()) + 1          # no process can have it


def _spin(seconds: float, clock=time.process_time) -> None:
    t0 = clock()
    while clock() - t0 < seconds:
        pass


def test_cpu_seconds_of_this_process_grow_with_its_cpu_use():
    pid = os.getpid()
    before = proc.cpu_seconds(pid)
    assert before is not None
    _spin(0.25)
    p0 = time.process_time()
    after = proc.cpu_seconds(pid)
    p1 = time.process_time()
    assert after - before >= 0.2
    # utime + stime is the process's CPU time, to the clock tick (USER_HZ).
    assert p0 - 0.05 <= after <= p1 + 0.05


def test_cpu_seconds_of_one_thread_whose_name_has_parentheses():
    pid = os.getpid()
    main_tid = threading.get_native_id()
    main_before = proc.cpu_seconds(pid, main_tid)
    got = {}

    def worker() -> None:
        tid = threading.get_native_id()
        with open(f"/proc/self/task/{tid}/comm", "w") as f:
            f.write(ODD_COMM)
        got["tid"], got["comm"] = tid, proc.comm(pid, tid)
        got["before"] = proc.cpu_seconds(pid, tid)
        _spin(0.25, time.thread_time)
        got["thread_time"] = time.thread_time()
        got["after"] = proc.cpu_seconds(pid, tid)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    main_after = proc.cpu_seconds(pid, main_tid)
    assert got["tid"] != main_tid and got["comm"] == ODD_COMM
    assert got["before"] is not None and got["before"] < 0.1
    assert got["after"] - got["before"] >= 0.2
    assert abs(got["after"] - got["thread_time"]) <= 0.05
    # The main thread waited in join(): the worker's CPU is not counted as its own.
    assert main_before is not None and main_after - main_before < 0.15
    # Once the thread has exited its /proc entry goes, and so does its figure.
    deadline = time.monotonic() + 5
    while proc.cpu_seconds(pid, got["tid"]) is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.cpu_seconds(pid, got["tid"]) is None


def test_rss_of_this_process_grows_with_memory_it_touches():
    pid = os.getpid()
    before = proc.rss_kib(pid)
    assert before is not None and before > 0
    blob = b"\x01" * (64 << 20)           # written, so resident
    after = proc.rss_kib(pid)
    del blob
    assert after - before >= 48 * 1024


def test_a_process_that_does_not_exist_has_no_figures():
    gone = _no_such_pid()
    assert proc.cpu_seconds(gone) is None
    assert proc.cpu_seconds(gone, gone) is None
    assert proc.rss_kib(gone) is None
    assert not proc.pid_alive(gone)
    assert proc.cpu_seconds(os.getpid(), gone) is None      # no such thread of ours


def test_a_zombie_keeps_its_cpu_figure_but_has_no_rss():
    child = subprocess.Popen([sys.executable, "-c", ""])
    try:
        deadline = time.monotonic() + 10
        while proc.pid_alive(child.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        # Exited, not reaped: a zombie, whose status has no VmRSS line.
        assert not proc.pid_alive(child.pid)
        cpu = proc.cpu_seconds(child.pid)
        assert cpu is not None and cpu >= 0
        assert proc.rss_kib(child.pid) is None
    finally:
        child.wait()
    assert proc.cpu_seconds(child.pid) is None and proc.rss_kib(child.pid) is None
    assert proc.pid_alive(os.getpid())


def test_a_thread_named_for_proc_shows_its_name_in_comm():
    got = {}

    def body():
        proc.name_this_thread("kairos-census-and-more")       # cut at 15 bytes, as the kernel keeps
        with open(f"/proc/self/task/{threading.get_native_id()}/comm") as f:
            got["comm"] = f.read().strip()
    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert got["comm"] == "kairos-census-a"


def test_thread_cpu_ns_is_exact_and_grows_with_work():
    tid = threading.get_native_id()
    a = proc.thread_cpu_ns(os.getpid(), tid)
    t0 = time.thread_time_ns()
    while time.thread_time_ns() - t0 < 20_000_000:
        pass
    b = proc.thread_cpu_ns(os.getpid(), tid)
    assert a is not None and b is not None and b - a >= 15_000_000
    assert proc.thread_cpu_ns(os.getpid(), 2 ** 22 + 7) is None      # no such thread
