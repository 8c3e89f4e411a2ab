"""From the guest task model to per-vCPU reservations, never above the ceiling (pure).

The admin's declaration is the floor and the ceiling the cap.  While the
guest has known real-time tasks, each vCPU's declared reservation is itself
analysed as a server (SCHED_DEADLINE: EDP; RT group budget: PRM): if it
meets every deadline of the tasks on that vCPU, it stays.  Otherwise the
vCPU gets the analysed server (the smallest one the hierarchical analysis
finds; EDP: the deadline may be shorter than the period, which
SCHED_DEADLINE expresses directly), its runtime raised to at least the
declared bandwidth (the guest's own kernel and non-RT work live in it).
Bandwidth alone decides nothing: 1.5 ms every 10 ms can leave a vCPU 17 ms
without supply.  When the tasks are gone the declaration is back.  A demand
above the ceiling is capped and reported, never granted.
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
    by_name = {t.name: t for t in tasks}
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
        if not capped and _declared_suffices(base, [by_name[n] for n in server.tasks],
                                             overhead_ns):
            out[vid] = Adapted(vid, base, "declared", server.budget_ns, server.period_ns,
                               server.deadline_ns, False, "the declared reservation "
                               "meets every guest deadline", tuple(server.tasks))
            continue
        # The analysed server, with at least the declared bandwidth: the floor
        # keeps the share the admin gave the guest's kernel and non-RT work.
        exact = Fraction(base.bandwidth) * period
        floor = -(-exact // GRANULARITY_NS) * GRANULARITY_NS
        if Fraction(floor, period) > ceiling:
            floor = int(exact // GRANULARITY_NS) * GRANULARITY_NS
        runtime = min(max(runtime, floor), period)
        runtime = max(runtime, 1024)
        if runtime > deadline:
            deadline = runtime
        if base.policy == "deadline":
            sched = VcpuSched("deadline", runtime, period, deadline_ns=deadline)
        else:
            # RT-group vCPU: the budget per period bounds it; priority stays the admin's.
            sched = VcpuSched(base.policy, -(-runtime // 1000) * 1000, period,
                              priority=base.priority)
        out[vid] = Adapted(vid, sched, "introspection", server.budget_ns, server.period_ns,
                           server.deadline_ns, capped, note, tuple(server.tasks))
    return out


def _declared_suffices(base: VcpuSched, tasks: List[analysis.Task], overhead_ns: int) -> bool:
    """Does the declared reservation itself meet every deadline of ``tasks``?

    Bandwidth alone does not tell: 1.5 ms every 10 ms can leave a vCPU
    without supply for 17 ms, too long for a task due every 5 ms.  The
    declared server is analysed as what it is: SCHED_DEADLINE's (runtime,
    deadline, period) is an EDP; an RT-group budget per period (cgroup
    cpu.rt_runtime_us) is a periodic resource (PRM).  The switching overhead
    is not available to the guest.
    """
    budget = base.runtime_ns - overhead_ns
    if budget <= 0 or not tasks:
        return not tasks
    if base.policy == "deadline":
        deadline = base.deadline_ns or base.period_ns
        supply = analysis.EDP(base.period_ns, min(budget, deadline), deadline)
    else:
        supply = analysis.prm(base.period_ns, budget)
    try:
        return analysis.schedulable(tasks, supply).schedulable
    except AnalysisError:
        return False
