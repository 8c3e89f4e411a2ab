"""cgroup files: find a thread's cpu cgroup and read/write RT group bandwidth.

cgroup v1 only has ``cpu.rt_runtime_us``/``cpu.rt_period_us`` (RT group
scheduling); cgroup v2 and most distribution kernels do not, and there the
fifo/rr declaration is refused up front (SCHED_DEADLINE needs no cgroup).
"""
from __future__ import annotations

import errno as _errno
import os
from typing import Dict, List, Optional, Tuple

from ..errors import HostError

_MOUNTINFO = "/proc/self/mountinfo"


def cpu_v1_mount() -> Optional[str]:
    """Mount point of the cgroup v1 ``cpu`` controller, or None."""
    try:
        with open(_MOUNTINFO) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        pre, _, post = line.partition(" - ")
        fields, post_fields = pre.split(), post.split()
        if len(post_fields) >= 3 and post_fields[0] == "cgroup":
            opts = post_fields[2].split(",")
            if "cpu" in opts:
                return fields[4]
    return None


def rt_group_sched_available() -> bool:
    mount = cpu_v1_mount()
    return bool(mount) and os.path.exists(os.path.join(mount, "cpu.rt_runtime_us"))


def why_no_rt_group_sched() -> str:
    if os.path.exists("/sys/fs/cgroup/cgroup.controllers") and not cpu_v1_mount():
        return ("this host uses cgroup v2, which has no RT group scheduling "
                "(cpu.rt_runtime_us); use policy 'deadline'")
    return ("the kernel has no RT group scheduling (CONFIG_RT_GROUP_SCHED: no "
            "cpu.rt_runtime_us in the cpu cgroup); use policy 'deadline'")


def thread_cpu_cgroup(pid: int, tid: int) -> Optional[str]:
    """Absolute directory of ``tid``'s cgroup v1 cpu controller, or None if gone."""
    mount = cpu_v1_mount()
    if not mount:
        return None
    try:
        with open(f"/proc/{pid}/task/{tid}/cgroup") as f:
            lines = f.read().splitlines()
    except (FileNotFoundError, ProcessLookupError):
        return None
    for line in lines:
        _hid, controllers, path = line.split(":", 2)
        if "cpu" in controllers.split(","):
            return os.path.normpath(mount + path)
    return None


def read_int(path: str) -> int:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except OSError as exc:
        raise HostError(path, exc.strerror or str(exc), errno=exc.errno) from None


def write_int(path: str, value: int) -> None:
    try:
        with open(path, "w") as f:
            f.write(f"{value}\n")
    except OSError as exc:
        current = None
        try:
            current = str(read_int(path))
        except HostError:
            pass
        fix = None
        if exc.errno in (_errno.EINVAL, _errno.EBUSY):
            fix = ("RT group bandwidth must be written parent first, a child never above its "
                   "parent, and a group with RT threads cannot drop to 0; see 'kairosvm ledger'")
        raise HostError(path, exc.strerror or str(exc), current=current, wanted=str(value),
                        fix=fix, errno=exc.errno) from None


def read_rt(group: str) -> Tuple[int, int]:
    """(runtime_us, period_us) of a cgroup directory."""
    return (read_int(os.path.join(group, "cpu.rt_runtime_us")),
            read_int(os.path.join(group, "cpu.rt_period_us")))


def set_rt(group: str, runtime_us: int, period_us: int) -> None:
    """Set a group's RT bandwidth; safe for leaves without RT threads and for parents.

    Lowers the runtime first when the period changes so that no intermediate
    state exceeds the parent.
    """
    cur_rt, cur_p = read_rt(group)
    if cur_p != period_us:
        if cur_rt:
            write_int(os.path.join(group, "cpu.rt_runtime_us"), 0)
        write_int(os.path.join(group, "cpu.rt_period_us"), period_us)
    if read_int(os.path.join(group, "cpu.rt_runtime_us")) != runtime_us:
        write_int(os.path.join(group, "cpu.rt_runtime_us"), runtime_us)


def children(group: str) -> List[str]:
    try:
        return sorted(os.path.join(group, d) for d in os.listdir(group)
                      if os.path.isdir(os.path.join(group, d)))
    except FileNotFoundError:
        return []


def tasks(group: str) -> List[int]:
    try:
        with open(os.path.join(group, "tasks")) as f:
            return [int(x) for x in f.read().split()]
    except FileNotFoundError:
        return []


def zero_rt_subtree(group: str) -> None:
    """Set a group and all its children to 0 RT runtime, leaves first."""
    if not os.path.isdir(group):
        return
    for child in children(group):
        zero_rt_subtree(child)
    if os.path.exists(os.path.join(group, "cpu.rt_runtime_us")):
        write_int(os.path.join(group, "cpu.rt_runtime_us"), 0)


def remove_empty_subtree(group: str) -> None:
    """rmdir a group and its children if no task is left in them (crash leftovers)."""
    if not os.path.isdir(group):
        return
    for child in children(group):
        remove_empty_subtree(child)
    if not tasks(group):
        try:
            os.rmdir(group)
        except OSError:
            pass  # busy or already gone: libvirt owns it; leaving it is harmless


def other_rt_users(parent: str, exclude: str) -> Dict[str, Tuple[int, int]]:
    """RT bandwidth held by a group's children other than ``exclude``."""
    out = {}
    for child in children(parent):
        if os.path.normpath(child) == os.path.normpath(exclude):
            continue
        try:
            rt, p = read_rt(child)
        except HostError:
            continue
        if rt:
            out[child] = (rt, p)
    return out
