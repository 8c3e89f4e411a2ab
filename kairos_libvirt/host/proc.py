"""/proc and libvirt's run directory: QEMU pid, vCPU threads, liveness."""
from __future__ import annotations

import os
import re
from typing import Dict, List, Optional

LIBVIRT_QEMU_RUN = "/run/libvirt/qemu"
_VCPU_COMM = re.compile(r"^CPU (\d+)/(KVM|TCG|HVF|WHPX)$")


def qemu_pid(domain: str, run_dir: str = LIBVIRT_QEMU_RUN) -> Optional[int]:
    """QEMU's pid from libvirt's pid file, if that process is alive."""
    try:
        with open(os.path.join(run_dir, f"{domain}.pid")) as f:
            pid = int(f.read().strip() or "0")
    except (OSError, ValueError):
        return None
    return pid if pid > 0 and pid_alive(pid) else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is not alive for our purposes.
    fields = _stat_fields(pid)
    return bool(fields) and fields[0] != "Z"


def _stat_fields(pid: int, tid: Optional[int] = None) -> Optional[List[str]]:
    """The fields of ``/proc/PID[/task/TID]/stat`` after comm, from the state on (index 0).

    comm (field 2) may hold spaces and parentheses: the fields start after its last ')'.
    None if the process or thread is gone (or the line has no comm)."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    try:
        with open(path) as f:
            line = f.read()
    except OSError:
        return None
    _, paren, rest = line.rpartition(")")
    return rest.split() if paren else None


def cpu_seconds(pid: int, tid: Optional[int] = None) -> Optional[float]:
    """utime + stime of a process (all its threads) or of its thread ``tid``, in seconds.

    One reader for what the benches and the e2e tests measure from outside (the agent's,
    QEMU's vCPUs', the host hogs' CPU use).  None if the process or thread is gone; a
    zombie still has its final figure."""
    fields = _stat_fields(pid, tid)
    if fields is None:
        return None
    # utime and stime are fields 14 and 15 of stat(5), in clock ticks.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu_ns(pid: int, tid: int) -> Optional[int]:
    """Time thread ``tid`` of ``pid`` ran on a CPU, in ns (``/proc/PID/task/TID/schedstat``).

    stat's utime/stime count clock ticks (10 ms here): an agent idling at 0.1 %
    of a CPU moves them by one tick in 10 s.  The scheduler's own sum is exact.
    None if the thread is gone or the kernel keeps no schedstat."""
    try:
        with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def rss_kib(pid: int) -> Optional[int]:
    """Resident set size of a process in KiB (VmRSS of ``/proc/PID/status``).

    One reader for the benches' and e2e tests' memory figures of the agent and its
    supervisor.  None if the process is gone or has no VmRSS line (a zombie, which has
    no memory left, or a kernel thread)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def comm(pid: int, tid: Optional[int] = None) -> Optional[str]:
    path = f"/proc/{pid}/task/{tid}/comm" if tid else f"/proc/{pid}/comm"
    try:
        with open(path) as f:
            return f.read().rstrip("\n")
    except OSError:
        return None


def cmdline(pid: int) -> list:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def vcpu_threads(pid: int) -> Dict[int, int]:
    """vCPU index -> thread id, from QEMU's thread names ``CPU K/KVM`` (or ``/TCG``)."""
    out: Dict[int, int] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for t in tids:
        name = comm(pid, int(t))
        m = _VCPU_COMM.match(name or "")
        if m:
            out[int(m.group(1))] = int(t)
    return dict(sorted(out.items()))


def boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def read_sched_stats(pid: int, tid: int) -> Dict[str, str]:
    """``/proc/PID/task/TID/sched`` as a dict (dl.runtime, nr_throttled …)."""
    out: Dict[str, str] = {}
    try:
        with open(f"/proc/{pid}/task/{tid}/sched") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep:
                    out[key.strip()] = value.strip()
    except OSError:
        pass
    return out


def online_cpus() -> frozenset:
    from .cpus import parse_cpulist
    with open("/sys/devices/system/cpu/online") as f:
        return parse_cpulist(f.read())


_PR_SET_NAME = 15


def name_this_thread(name: str) -> None:
    """Give the calling thread its name in /proc (``comm``: top -H, ps -L, bench/introspection).

    Python's thread names stay inside the interpreter (before 3.14); an admin
    looking at which thread of an agent uses the CPU sees them only this way.
    At most 15 bytes are kept; a failure is ignored (names are a courtesy).
    """
    import ctypes
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)
    except (OSError, AttributeError):
        pass
