"""From the guest task model to per-vCPU reservations, never above the ceiling (pure).

The admin's declaration is the floor and the ceiling the cap: while the
guest has known real-time tasks, a vCPU whose analysed server (the smallest
one the hierarchical analysis finds for them; EDP: the deadline may be
shorter than the period, which SCHED_DEADLINE expresses directly) needs more
bandwidth than declared gets that server; otherwise, and when the tasks are
gone, it keeps its declared reservation (the guest's own kernel and non-RT
work live in it).  A demand above the ceiling is capped and reported, never
granted.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Dict, List, Mapping, Optional

from .. import analysis
from ..errors import AnalysisError
from ..model import VcpuSched
from .tasks import TaskModel

#: The cost of switching a vCPU in and out once per period, added to budgets.
DEFAULT_OVERHEAD_NS = 20_000
GRANULARITY_NS = 1_000       # whole microseconds: cgroup files and readable numbers


@dataclass(frozen=True)
class Adapted:
    vcpu: int
    sched: VcpuSched                  # what to enforce
    source: str                       # "declared" | "introspection"
    budget_ns: Optional[int] = None   # the analysis's interface (before any cap)
    period_ns: Optional[int] = None
    deadline_ns: Optional[int] = None
    capped: bool = False
    note: str = ""
    tasks: tuple = ()


def adapt(model: TaskModel, declared: Mapping[int, VcpuSched],
          ceilings: Mapping[int, Fraction], overhead_ns: int = DEFAULT_OVERHEAD_NS
          ) -> Dict[int, Adapted]:
    """Per declared vCPU: the reservation to enforce now."""
    vids = sorted(declared)
    out = {v: Adapted(v, declared[v], "declared") for v in vids}
    tasks: List[analysis.Task] = []
    index = {v: i for i, v in enumerate(vids)}
    for t in model.rt_tasks():
        d = t.demand()
        if d is None:
            continue
        runtime, deadline, period = d
        tasks.append(analysis.Task(name=t.key, runtime_ns=runtime, deadline_ns=deadline,
                                   period_ns=period,
                                   priority=t.priority if t.policy in ("fifo", "rr") else None,
                                   # The vCPU the task was last seen on gets its budget
                                   # (the guest may migrate it: the next event moves it).
                                   vcpu=index.get(t.vcpu) if t.vcpu is not None else None,
                                   scheduler="edf" if t.policy == "deadline" else "fp"))
    if not tasks or not vids:
        return out
    try:
        iface = analysis.interface_for(tasks, vcpus=len(vids), model="edp",
                                       overhead_ns=overhead_ns, granularity_ns=GRANULARITY_NS)
    except AnalysisError as exc:
        return {v: Adapted(v, declared[v], "declared", note=f"analysis refused: {exc}")
                for v in vids}
    for server in iface.servers:
        vid = vids[server.vcpu]
        if server.budget_ns == 0:
            continue
        base = declared[vid]
        runtime, period = server.runtime_ns, server.period_ns
        deadline = server.deadline_ns
        ceiling = ceilings[vid]
        capped, note = False, ""
        if not server.schedulable:
            capped, note = True, f"guest tasks not schedulable even on a full vCPU: {server.reason}"
        if Fraction(runtime, period) > ceiling:
            capped = True
            note = note or (f"demand {float(Fraction(runtime, period)):.3f} CPU capped at the "
                            f"ceiling {float(ceiling):.3f}")
            runtime = int(ceiling * period) // GRANULARITY_NS * GRANULARITY_NS
            deadline = max(deadline, runtime)
        runtime = max(runtime, 1024)
        if runtime > deadline:
            deadline = runtime
        if Fraction(runtime, period) <= base.bandwidth:
            out[vid] = Adapted(vid, base, "declared", server.budget_ns, server.period_ns,
                               server.deadline_ns, capped, note or "the declared reservation "
                               "covers the guest tasks", tuple(server.tasks))
            continue
        if base.policy == "deadline":
            sched = VcpuSched("deadline", runtime, period, deadline_ns=deadline)
        else:
            # RT-group vCPU: the budget per period bounds it; priority stays the admin's.
            sched = VcpuSched(base.policy, -(-runtime // 1000) * 1000, period,
                              priority=base.priority)
        out[vid] = Adapted(vid, sched, "introspection", server.budget_ns, server.period_ns,
                           server.deadline_ns, capped, note, tuple(server.tasks))
    return out
