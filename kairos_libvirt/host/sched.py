"""Thread scheduling syscalls: ``sched_setattr``/``sched_getattr`` via ctypes.

The only place that changes a thread's scheduling class.  glibc has no
wrapper for sched_setattr, hence the raw syscall; syscall numbers come from a
per-architecture table and an unknown architecture is an error (pyroute2's
silent fallback to x86 numbers is the cautionary tale).
"""
from __future__ import annotations

import ctypes
import errno as _errno
import os
import platform
from dataclasses import dataclass
from typing import Optional

from ..errors import HostError

SCHED_OTHER, SCHED_FIFO, SCHED_RR, SCHED_BATCH, SCHED_IDLE, SCHED_DEADLINE = 0, 1, 2, 3, 5, 6
SCHED_FLAG_RESET_ON_FORK = 0x01
SCHED_FLAG_RECLAIM = 0x02
POLICY_NAMES = {SCHED_OTHER: "other", SCHED_FIFO: "fifo", SCHED_RR: "rr", SCHED_BATCH: "batch",
                SCHED_IDLE: "idle", SCHED_DEADLINE: "deadline"}
POLICY_IDS = {v: k for k, v in POLICY_NAMES.items()}

# (sched_setattr, sched_getattr) by machine, from the kernel's syscall tables.
_SYSCALLS = {
    "x86_64": (314, 315),
    "aarch64": (274, 275),
    "riscv64": (274, 275),
    "ppc64le": (355, 356),
    "s390x": (345, 346),
    "i686": (351, 352),
}


class SchedAttr(ctypes.Structure):
    """uapi ``struct sched_attr`` (include/uapi/linux/sched/types.h), SCHED_ATTR_SIZE_VER1."""

    _fields_ = [
        ("size", ctypes.c_uint32),
        ("sched_policy", ctypes.c_uint32),
        ("sched_flags", ctypes.c_uint64),
        ("sched_nice", ctypes.c_int32),
        ("sched_priority", ctypes.c_uint32),
        ("sched_runtime", ctypes.c_uint64),
        ("sched_deadline", ctypes.c_uint64),
        ("sched_period", ctypes.c_uint64),
        ("sched_util_min", ctypes.c_uint32),
        ("sched_util_max", ctypes.c_uint32),
    ]


SCHED_ATTR_SIZE_VER0 = 48


@dataclass(frozen=True)
class ThreadSched:
    """A thread's scheduling parameters as the kernel reports them."""

    tid: int
    policy: str
    priority: int
    runtime_ns: int
    deadline_ns: int
    period_ns: int
    flags: int = 0
    nice: int = 0


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _numbers() -> tuple:
    machine = platform.machine()
    try:
        return _SYSCALLS[machine]
    except KeyError:
        raise HostError("sched_setattr", f"syscall numbers for architecture {machine!r} are "
                        "unknown to kairos-libvirt",
                        fix="add them to kairos_libvirt/host/sched.py _SYSCALLS") from None


def _check(ret: int, knob: str, tid: int, wanted: str) -> None:
    if ret == -1:
        err = ctypes.get_errno()
        raise HostError(f"{knob}(tid {tid})", os.strerror(err), wanted=wanted,
                        fix=_FIXES.get(err), errno=err)


_FIXES = {
    _errno.EBUSY: "the kernel's SCHED_DEADLINE admission refused the bandwidth: the CPUs' "
                  "deadline bandwidth is used up (see 'kairosvm ledger' and "
                  "/proc/sys/kernel/sched_rt_runtime_us)",
    _errno.EPERM: "run as root; a SCHED_DEADLINE thread's CPU affinity must span its whole root "
                  "domain (remove vcpupin/cpuset pinning or give it an exclusive cpuset "
                  "partition); SCHED_FIFO in a cgroup with cpu.rt_runtime_us = 0 is refused",
    _errno.ESRCH: "the thread is gone (the domain stopped?)",
    _errno.EINVAL: "parameters out of range: runtime >= 1024ns, runtime <= deadline <= period, "
                   "period within /proc/sys/kernel/sched_deadline_period_{min,max}_us",
}


def set_deadline(tid: int, runtime_ns: int, deadline_ns: int, period_ns: int,
                 flags: int = 0) -> None:
    """Put thread ``tid`` under SCHED_DEADLINE.  EBUSY is a refusal, never ignored."""
    attr = SchedAttr(size=ctypes.sizeof(SchedAttr), sched_policy=SCHED_DEADLINE,
                     sched_flags=flags, sched_runtime=runtime_ns, sched_deadline=deadline_ns,
                     sched_period=period_ns)
    ret = _libc.syscall(_numbers()[0], ctypes.c_int(tid), ctypes.byref(attr), ctypes.c_uint(0))
    _check(ret, "sched_setattr", tid,
           f"SCHED_DEADLINE runtime={runtime_ns}ns deadline={deadline_ns}ns period={period_ns}ns")


def set_rt(tid: int, policy: str, priority: int) -> None:
    """SCHED_FIFO or SCHED_RR at a Linux priority (1..99, higher runs first)."""
    assert policy in ("fifo", "rr"), policy
    attr = SchedAttr(size=ctypes.sizeof(SchedAttr), sched_policy=POLICY_IDS[policy],
                     sched_priority=priority)
    ret = _libc.syscall(_numbers()[0], ctypes.c_int(tid), ctypes.byref(attr), ctypes.c_uint(0))
    _check(ret, "sched_setattr", tid, f"SCHED_{policy.upper()} priority {priority}")


def set_other(tid: int) -> None:
    """Back to SCHED_OTHER.  Beware: a *sleeping* DEADLINE thread leaks bandwidth here
    (see :func:`kairos_libvirt.host.cpuset.rebuild_root_domains`)."""
    attr = SchedAttr(size=ctypes.sizeof(SchedAttr), sched_policy=SCHED_OTHER)
    ret = _libc.syscall(_numbers()[0], ctypes.c_int(tid), ctypes.byref(attr), ctypes.c_uint(0))
    _check(ret, "sched_setattr", tid, "SCHED_OTHER")


def get(tid: int) -> ThreadSched:
    """Read a thread's scheduling parameters back from the kernel."""
    attr = SchedAttr()
    ret = _libc.syscall(_numbers()[1], ctypes.c_int(tid), ctypes.byref(attr),
                        ctypes.c_uint(ctypes.sizeof(SchedAttr)), ctypes.c_uint(0))
    _check(ret, "sched_getattr", tid, "read")
    return ThreadSched(tid=tid, policy=POLICY_NAMES.get(attr.sched_policy,
                                                        f"unknown({attr.sched_policy})"),
                       priority=attr.sched_priority, runtime_ns=attr.sched_runtime,
                       deadline_ns=attr.sched_deadline, period_ns=attr.sched_period,
                       flags=attr.sched_flags, nice=attr.sched_nice)


def try_get(tid: int) -> Optional[ThreadSched]:
    """Like :func:`get`, but None when the thread vanished (a race, not an error)."""
    try:
        return get(tid)
    except HostError as exc:
        if exc.errno == _errno.ESRCH:
            return None
        raise
