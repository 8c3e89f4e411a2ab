"""Which vCPU runs which task: pinned tasks stay, the rest are placed.

The analysis is per vCPU (partitioned scheduling), so tasks without a
``vcpu`` need one.  Heuristic: worst-fit decreasing by utilisation — take
unpinned tasks from the largest C/T down and put each on the vCPU whose
load (pinned tasks included) is smallest so far, lowest index on ties.
Worst fit spreads load, which keeps every vCPU's server small and leaves
headroom on each host CPU; it is a heuristic, not an optimum.  The guest
must then really pin those tasks (``sched_setaffinity``): the result says
``partition == "assumed"`` so nobody mistakes it for what the guest does.
"""
from __future__ import annotations

import heapq
from fractions import Fraction
from typing import Dict, List, Sequence, Tuple

from ..errors import AnalysisError
from .model import Task

HEURISTIC = "worst-fit decreasing by utilisation"


def partition(tasks: Sequence[Task], vcpus: int) -> Tuple[Dict[str, int], bool]:
    """Map task name -> vCPU; the flag is True when some placement was assumed.

    With one vCPU nothing is assumed: every task can only run there.
    """
    if vcpus < 1:
        raise AnalysisError(f"vcpus {vcpus!r} is not allowed; a guest has at least one vCPU")
    load: List[Fraction] = [Fraction(0)] * vcpus
    where: Dict[str, int] = {}
    for t in tasks:
        if t.vcpu is not None:
            if t.vcpu >= vcpus:
                raise AnalysisError(f"task {t.name!r}: vcpu {t.vcpu!r} is not allowed; "
                                    f"use 0..{vcpus - 1} (the guest has {vcpus} vCPUs)")
            where[t.name] = t.vcpu
            load[t.vcpu] += t.utilisation
    free = sorted((t for t in tasks if t.vcpu is None), key=lambda t: (-t.utilisation, t.name))
    heap = [(load[i], i) for i in range(vcpus)]  # least loaded first, lowest index on ties
    heapq.heapify(heap)
    for t in free:
        u, v = heapq.heappop(heap)
        where[t.name] = v
        heapq.heappush(heap, (u + t.utilisation, v))
    return where, bool(free) and vcpus > 1
