"""What the guest's tasks ask for: demand and request bound functions.

All functions take tasks and a window length in integer nanoseconds and
assume synchronous release at the start of the window (the critical instant
for sporadic tasks with constrained deadlines, D <= T).
"""
from __future__ import annotations

from fractions import Fraction
from typing import Iterable, Optional

from .model import Task


def dbf(tasks: Iterable[Task], t: int) -> int:
    """EDF demand bound: work of jobs released in [0, t) that are due by t.

    dbf(t) = Σ max(0, ⌊(t − D)/T⌋ + 1)·C (Baruah, Rosier & Howell, 1990).
    """
    total = 0
    for task in tasks:
        if t >= task.deadline_ns:
            total += ((t - task.deadline_ns) // task.period_ns + 1) * task.runtime_ns
    return total


def rbf(tasks: Iterable[Task], t: int) -> int:
    """Request bound: work released in [0, t), Σ ⌈t/T⌉·C (fixed-priority interference)."""
    return sum(-(-t // task.period_ns) * task.runtime_ns for task in tasks) if t > 0 else 0


def workload(task: Task, t: int) -> int:
    """Most work ``task`` can execute in any window of length ``t`` if every job meets its deadline.

    A job may run as late as its deadline, so a window can catch a carried-in
    job plus the following ones (Bertogna, Cirinei & Lipari, OPODIS 2005):
    N = ⌊(t + D − C)/T⌋, W = N·C + min(C, t + D − C − N·T), and never more than t.
    This is the interference SCHED_DEADLINE tasks cause to SCHED_FIFO/RR tasks
    on the same vCPU; the DL jobs are not released in step with the RT task.
    """
    if t <= 0:
        return 0
    c, d, p = task.runtime_ns, task.deadline_ns, task.period_ns
    x = t + d - c
    n = x // p
    return min(t, n * c + min(c, x - n * p))


def last_deadline(tasks: Iterable[Task], t: int) -> Optional[int]:
    """Latest absolute deadline <= t, or None: dbf only steps there."""
    best: Optional[int] = None
    for task in tasks:
        if t >= task.deadline_ns:
            d = (t - task.deadline_ns) // task.period_ns * task.period_ns + task.deadline_ns
            if best is None or d > best:
                best = d
    return best


def utilisation(tasks: Iterable[Task]) -> Fraction:
    """Σ C/T, exact."""
    return sum((t.utilisation for t in tasks), Fraction(0))
