"""/proc and libvirt's run directory: QEMU pid, vCPU threads, liveness."""
from __future__ import annotations

import os
import re
from typing import Dict, Optional

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
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (OSError, IndexError):
        return False


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
