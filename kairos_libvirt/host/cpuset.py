"""Root-domain rebuild: the workaround for lost SCHED_DEADLINE bandwidth.

Measured on this project's hosts (DESIGN.md §2): switching a *sleeping*
SCHED_DEADLINE thread back to SCHED_OTHER, and some cpuset changes made by
libvirt while domains start, leave the kernel's deadline admission total
counting bandwidth nobody holds; every later ``sched_setattr`` then fails
with EBUSY.  Any cpuset change that rebuilds the scheduling domains makes the
kernel recompute that total from the tasks that really are SCHED_DEADLINE.
"""
from __future__ import annotations

import os
from typing import Optional

from .cpus import format_cpulist
from ..errors import HostError

_PROBE = "kairos-rd-rebuild"


def cpuset_v1_mount() -> Optional[str]:
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                pre, _, post = line.partition(" - ")
                pf = post.split()
                if len(pf) >= 3 and pf[0] == "cgroup" and "cpuset" in pf[2].split(","):
                    return pre.split()[4]
    except OSError:
        return None
    return None


def rebuild_root_domains() -> bool:
    """Force a scheduling-domain rebuild; True if it could be done."""
    mount = cpuset_v1_mount()
    if mount is None:
        # cgroup v2: toggling a child's cpuset.cpus has the same effect.
        mount = "/sys/fs/cgroup" if os.path.exists("/sys/fs/cgroup/cgroup.controllers") else None
    if mount is None:
        return False
    try:
        with open(os.path.join(mount, "cpuset.effective_cpus")) as f:
            cpus = f.read().strip()
    except OSError:
        return False
    d = os.path.join(mount, _PROBE)
    try:
        os.makedirs(d, exist_ok=True)
        mems = os.path.join(d, "cpuset.mems")
        if os.path.exists(mems):
            with open(os.path.join(mount, "cpuset.effective_mems")) as f:
                _write(mems, f.read().strip())
        _write(os.path.join(d, "cpuset.cpus"), cpus)
        first = sorted(int(c) for c in cpus.replace("-", ",").split(",") if c)[0]
        _write(os.path.join(d, "cpuset.cpus"), format_cpulist(frozenset({first})))
        return True
    except (OSError, HostError, ValueError, IndexError):
        return False
    finally:
        try:
            os.rmdir(d)
        except OSError:
            pass


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)
