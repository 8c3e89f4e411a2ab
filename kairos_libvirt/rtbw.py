"""RT group bandwidth arithmetic, exactly as the kernel checks it (pure).

``tg_rt_schedulable()`` (kernel/sched/rt.c) compares fixed-point ratios
``to_ratio(period, runtime) = (runtime_ns << 20) // period_ns``: the sum of the
children's ratios must not exceed the parent's.  We size parents with the same
integer formula so that a write never fails on rounding.
"""
from __future__ import annotations

from typing import Iterable, Tuple

BW_SHIFT = 20
#: Parents (the domain's group, libvirt's ``machine``) get a 1 s period, the
#: cgroup default.
PARENT_PERIOD_US = 1_000_000


def to_ratio(period_us: int, runtime_us: int) -> int:
    if period_us <= 0:
        return 0
    return ((runtime_us * 1000) << BW_SHIFT) // (period_us * 1000)


def parent_runtime_us(children: Iterable[Tuple[int, int]],
                      period_us: int = PARENT_PERIOD_US) -> int:
    """Smallest runtime (us) at ``period_us`` whose ratio covers all ``(runtime_us, period_us)``."""
    need = sum(to_ratio(p, r) for r, p in children)
    if need == 0:
        return 0
    runtime = (need * period_us) >> BW_SHIFT
    while to_ratio(period_us, runtime) < need:
        runtime += 1
    return runtime
