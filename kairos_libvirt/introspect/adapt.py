"""From the guest task model to per-vCPU reservations, never above the ceiling (pure).

The admin's declaration is the floor and the ceiling the cap.  While the
guest has known real-time tasks, each vCPU's declared reservation is itself
analysed as a server (SCHED_DEADLINE: EDP; RT group budget: PRM): if it
meets every deadline of the tasks on that vCPU, it stays.  Otherwise the
analysed server (the smallest one the hierarchical analysis finds; EDP: the
deadline may be shorter than the period, which SCHED_DEADLINE expresses
directly), its runtime raised to at least the declared bandwidth (the
guest's own kernel and non-RT work live in it), is a *candidate*.  Bandwidth
alone decides nothing: 1.5 ms every 10 ms can leave a vCPU 17 ms without
supply.  When the tasks are gone the declaration is back.  A demand above
the ceiling is capped and reported, never granted.

Never worse than declared (issue 11):

* The candidate replaces the declaration only if it is at least as good for
  every known guest task: every task whose deadlines the declared server
  guarantees keeps that guarantee; and it must gain something (a task's
  guarantee, or more CPU for tasks neither guarantees: a capped demand).  Both servers
  are analysed with the same supply model, :func:`server_supply` (the one
  place that says what a server gives the guest).
* Its period never exceeds the shortest deadline of the tasks on that vCPU.
* :func:`adapt` is a function of the task model's analysis input only: the
  same task set gives the same servers (the runtime re-runs it only when the
  model's ``version`` moves), so a server changes only with the task set.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Dict, FrozenSet, List, Mapping, Optional, Sequence

from .. import analysis
from ..analysis.enforcement import Enforcement
from ..analysis.schedulability import Workload
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
    #: (task key, worst-case response time in ns under ``sched``, None: not guaranteed),
    #: for the tasks of this vCPU: the guarantee the reservation in force gives each.
    bounds: tuple = ()


def adapt(model: TaskModel, declared: Mapping[int, VcpuSched],
          ceilings: Mapping[int, Fraction], overhead_ns: int = DEFAULT_OVERHEAD_NS,
          enforcement_ns: int = 0) -> Dict[int, Adapted]:
    """Per declared vCPU: the reservation to enforce now.

    ``enforcement_ns`` is the host's enforcement granularity (one tick
    without HRTICK_DL, :mod:`kairos_libvirt.analysis.enforcement`); 0 is the
    plain EDP model.
    """
    vids = sorted(declared)
    return _analyse(demand_tasks(model, vids), vids, declared, ceilings, overhead_ns,
                    enforcement_ns)


def demand_tasks(model: TaskModel, vids: Sequence[int]) -> List[analysis.Task]:
    """The analysis input: the model's RT tasks with a known demand, vCPU as an index of ``vids``."""
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
    return tasks


class Adapter:
    """:func:`adapt` for one domain, re-analysing only the vCPUs whose tasks changed.

    When every task has a vCPU (the guest placed it: the usual case) the
    vCPUs' servers are independent (interface_for analyses each vCPU's own
    tasks), so a vCPU whose task tuple is what it was keeps its result and
    costs nothing.  A task without a vCPU is partitioned with the others:
    then all vCPUs are analysed together.  Same results as :func:`adapt`,
    except that an analysis error is confined to its vCPU.
    """

    def __init__(self, declared: Mapping[int, VcpuSched], ceilings: Mapping[int, Fraction],
                 overhead_ns: int = DEFAULT_OVERHEAD_NS, enforcement_ns: int = 0) -> None:
        self.declared, self.ceilings = dict(declared), dict(ceilings)
        self.overhead_ns, self.enforcement_ns = overhead_ns, enforcement_ns
        self.vids = sorted(declared)
        self._memo: Dict[int, tuple] = {}      # vCPU -> (its tasks, its Adapted)
        #: vCPU analyses run (a joint analysis counts every vCPU): the cost the memo saves.
        self.analysed = 0

    def adapt(self, model: TaskModel) -> Dict[int, Adapted]:
        tasks = demand_tasks(model, self.vids)
        if any(t.vcpu is None for t in tasks):
            self._memo.clear()
            self.analysed += len(self.vids)
            return _analyse(tasks, self.vids, self.declared, self.ceilings, self.overhead_ns,
                            self.enforcement_ns)
        out: Dict[int, Adapted] = {}
        for i, vid in enumerate(self.vids):
            mine = tuple(t for t in tasks if t.vcpu == i)
            memo = self._memo.get(vid)
            if memo is not None and memo[0] == mine:
                out[vid] = memo[1]
                continue
            self.analysed += 1
            got = _analyse([replace(t, vcpu=0) for t in mine], [vid], self.declared,
                           self.ceilings, self.overhead_ns, self.enforcement_ns)[vid]
            self._memo[vid] = (mine, got)
            out[vid] = got
        return out


def _analyse(tasks: List[analysis.Task], vids: Sequence[int], declared: Mapping[int, VcpuSched],
             ceilings: Mapping[int, Fraction], overhead_ns: int,
             enforcement_ns: int) -> Dict[int, Adapted]:
    out = {v: Adapted(v, declared[v], "declared") for v in vids}
    if not tasks or not vids:
        return out
    by_name = {t.name: t for t in tasks}
    extra = {"enforcement_ns": enforcement_ns} if enforcement_ns else {}
    # A SCHED_DEADLINE vCPU is sized as an EDP (its deadline may be below the
    # period); an RT-group vCPU can only be given a budget per period: a PRM.
    models = {v: "edp" if declared[v].policy == "deadline" else "prm" for v in vids}
    ifaces = {}
    try:
        for m in sorted(set(models.values())):
            ifaces[m] = analysis.interface_for(tasks, vcpus=len(vids), model=m,
                                               overhead_ns=overhead_ns,
                                               granularity_ns=GRANULARITY_NS, **extra)
    except AnalysisError as exc:
        return {v: Adapted(v, declared[v], "declared", note=f"analysis refused: {exc}")
                for v in vids}
    for i, vid in enumerate(vids):
        server = ifaces[models[vid]].servers[i]
        if server.budget_ns == 0:
            continue
        base = declared[vid]
        mine = [by_name[n] for n in server.tasks]
        names = tuple(server.tasks)
        base_guarantees = guarantees(mine, server_supply(base, overhead_ns, enforcement_ns))
        if base_guarantees == frozenset(names):
            out[vid] = Adapted(vid, base, "declared", server.budget_ns, server.period_ns,
                               server.deadline_ns, False, "the declared reservation "
                               "meets every guest deadline", names)
            continue
        cand = _candidate(server, base, ceilings[vid], enforcement_ns)
        if cand is None:
            out[vid] = Adapted(vid, base, "declared", server.budget_ns, server.period_ns,
                               server.deadline_ns, True,
                               f"the analysed server with the declared bandwidth leaves no room "
                               f"for the host's {enforcement_ns} ns enforcement overrun: the "
                               "declaration stays", names)
            continue
        sched, capped, note = cand
        shortest = min(t.deadline_ns for t in mine)
        if sched.period_ns > shortest:
            out[vid] = Adapted(vid, base, "declared", server.budget_ns, server.period_ns,
                               server.deadline_ns, capped,
                               f"analysed period {sched.period_ns} ns is above the shortest "
                               f"guest deadline {shortest} ns: the declaration stays", names)
            continue
        kept = guarantees(mine, server_supply(sched, overhead_ns, enforcement_ns))
        lost = sorted(base_guarantees - kept)
        gains = kept > base_guarantees or (
            kept == base_guarantees and Fraction(sched.runtime_ns, sched.period_ns) > base.bandwidth)
        if lost or not gains:
            why = (f"it would no longer guarantee {', '.join(lost)}" if lost
                   else "it guarantees no task more than the declaration, with no more CPU")
            out[vid] = Adapted(vid, base, "declared", server.budget_ns, server.period_ns,
                               server.deadline_ns, capped,
                               (note + "; " if note else "") +
                               f"the analysed server is not better: {why}", names)
            continue
        out[vid] = Adapted(vid, sched, "introspection", server.budget_ns, server.period_ns,
                           server.deadline_ns, capped, note, names)
    for vid, a in out.items():
        if a.tasks:
            b = response_bounds([by_name[n] for n in a.tasks],
                                server_supply(a.sched, overhead_ns, enforcement_ns))
            out[vid] = replace(a, bounds=tuple(sorted(b.items())))
    return out


def _candidate(server: analysis.ServerInterface, base: VcpuSched, ceiling: Fraction,
               enforcement_ns: int = 0):
    """The analysed server as a reservation: at least the declared bandwidth, at most the ceiling.

    A SCHED_DEADLINE reservation keeps room for the host's overrun before its
    deadline (runtime + g <= deadline, what admission requires); None when the
    floor or the ceiling leave none.
    """
    runtime, period = server.runtime_ns, server.period_ns
    deadline = server.deadline_ns
    capped, note = False, ""
    if not server.schedulable:
        capped, note = True, f"guest tasks not schedulable even on a full vCPU: {server.reason}"
    if Fraction(runtime, period) > ceiling:
        capped = True
        note = note or (f"demand {float(Fraction(runtime, period)):.3f} CPU capped at the "
                        f"ceiling {float(ceiling):.3f}")
        runtime = int(ceiling * period) // GRANULARITY_NS * GRANULARITY_NS
        deadline = max(deadline, runtime)
    # The floor keeps the share the admin gave the guest's kernel and non-RT work.
    exact = Fraction(base.bandwidth) * period
    floor = -(-exact // GRANULARITY_NS) * GRANULARITY_NS
    if Fraction(floor, period) > ceiling:
        floor = int(exact // GRANULARITY_NS) * GRANULARITY_NS
    runtime = min(max(runtime, floor), period)
    runtime = max(runtime, 1024)
    if base.policy == "deadline":
        if runtime + enforcement_ns > period:
            return None
        deadline = max(deadline, runtime + enforcement_ns)
        return VcpuSched("deadline", runtime, period, deadline_ns=deadline), capped, note
    if runtime > deadline:
        deadline = runtime
    # RT-group vCPU: the budget per period bounds it; priority stays the admin's.
    return (VcpuSched(base.policy, min(-(-runtime // 1000) * 1000, period), period,
                      priority=base.priority), capped, note)


def server_supply(sched: VcpuSched, overhead_ns: int,
                  enforcement_ns: int = 0) -> Optional[analysis.EDP]:
    """What this reservation guarantees the guest: the one supply model of adaptation.

    The declared and the analysed server are both judged through it.
    SCHED_DEADLINE's (runtime, deadline, period) is an EDP; an RT-group
    budget per period (cgroup cpu.rt_runtime_us) is a periodic resource
    (PRM).  The switching overhead is not available to the guest, and a
    host that enforces at its tick overruns by up to ``enforcement_ns``
    (the supply is sbf less that: :mod:`kairos_libvirt.analysis.enforcement`).
    None: the server guarantees nothing.
    """
    budget = sched.runtime_ns - overhead_ns
    if budget <= 0:
        return None
    # Below a tick the kernel repays its debt in whole budgets: the loss is
    # larger than g for a runtime under g (analysis.enforcement).
    loss = Enforcement(enforcement_ns).loss_ns(sched.runtime_ns)
    extra = {"loss_ns": loss} if loss else {}
    try:
        if sched.policy == "deadline":
            deadline = sched.deadline_ns or sched.period_ns
            return analysis.EDP(sched.period_ns, min(budget, deadline), deadline, **extra)
        return analysis.EDP(sched.period_ns, budget, sched.period_ns, **extra)
    except (AnalysisError, TypeError):
        return None


def guarantees(tasks: Sequence[analysis.Task], supply: Optional[analysis.EDP]) -> FrozenSet[str]:
    """The tasks whose every deadline ``supply`` guarantees."""
    return frozenset(n for n, b in response_bounds(tasks, supply).items() if b is not None)


def response_bounds(tasks: Sequence[analysis.Task],
                    supply: Optional[analysis.EDP]) -> Dict[str, Optional[int]]:
    """Per task, the worst-case response time ``supply`` guarantees (ns), None: none.

    SCHED_DEADLINE tasks share one EDF test (all or none): each is bounded by
    its deadline.  Each FIFO/RR task has its own worst-case response time (DL
    tasks above it, as in Linux), which must be within its deadline.
    """
    out: Dict[str, Optional[int]] = {t.name: None for t in tasks}
    if supply is None or not tasks:
        return out
    try:
        wl = Workload(list(tasks))
        p, q, d = supply.period_ns, supply.budget_ns, supply.deadline_ns
        extra = (getattr(supply, "loss_ns", 0),) if getattr(supply, "loss_ns", 0) else ()
        if wl.dl and wl.edf_violation(p, q, d, *extra) is None:
            out.update((t.name, t.deadline_ns) for t in wl.tasks if t.scheduler == "edf")
        for i, (name, *_rest) in enumerate(wl.fp):
            out[name] = wl.fp_response(i, p, q, d, *extra)
        return out
    except AnalysisError:
        return {t.name: None for t in tasks}
