"""A guest task's scheduling policy and parameters, read from its ``task_struct``.

Why: the traps learn an RT task from its ``sched_setattr()`` call.  A task
that set its policy before the agent attached (a guest booting under host
load takes tens of seconds to be attached; a program started by the guest's
init) makes that call before anyone listens, and stays invisible although
it runs SCHED_FIFO every 4 ms.  Its ``task_struct`` still says what it is:
the agent reads it the first time the task traps (its clock_nanosleep),
instead of waiting for a call that will not come.

No debug info: the offsets are found from facts every Linux kernel shares
(``include/linux/sched.h``, ``init/init_task.c``, ``kernel/sched/core.c``):

* ``int prio, static_prio, normal_prio; unsigned int rt_priority`` are
  adjacent; ``init_task`` holds 120, 120, 120, 0 (``MAX_PRIO - 20``), and in
  every task ``normal_prio`` is -1 for SCHED_DEADLINE, ``99 - rt_priority``
  for SCHED_FIFO/RR, else ``static_prio`` (``__normal_prio()``);
* ``unsigned int policy`` comes a little before ``const cpumask_t
  *cpus_ptr``, which in ``init_task`` points at its own ``cpus_mask`` right
  after ``user_cpus_ptr`` (5.15+) or right after itself: policy and
  ``nr_cpus_allowed`` just before it (up to 6.9; Debian 6.1 leaves a 4-byte
  hole), or policy, then ``unsigned long max_allowed_capacity`` (1024 in
  init_task), then ``nr_cpus_allowed`` (6.10+);
* ``struct sched_dl_entity`` holds ``u64 dl_runtime, dl_deadline,
  dl_period, dl_bw, dl_density`` with ``dl_bw = (runtime << 20) / period``
  and ``dl_density = (runtime << 20) / deadline`` (``to_ratio()``): five
  numbers no other place in a deadline task repeats.  Non-deadline tasks
  hold zeros there, so that offset is found on the first deadline task met.

Candidates are confirmed on every process of the task list: one offset
that is consistent in all of them, else :class:`SymbolError`.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, replace
from typing import List, Optional, Tuple

from .decode import POLICY_NAMES, SCHED_DEADLINE, SCHED_FIFO, SCHED_RR
from .layout import TaskLayout, task_list
from .symbols import Reader, RuntimeSymbols, SymbolError, read_exact

__all__ = ["SchedLayout", "SchedState", "discover_sched_layout", "read_sched"]

#: ``MAX_PRIO - 20``: nice 0.
NICE0_PRIO = 120
MAX_RT_PRIO = 100
#: ``SCHED_CAPACITY_SCALE``: init_task's max_allowed_capacity (6.10+).
CAPACITY_SCALE = 1024
#: The prio block sits early (before ``struct sched_entity``).
PRIO_SCAN = 1024
#: ``policy`` sits after the scheduling entities and statistics.
POLICY_SCAN = 8192
#: Processes read to confirm the offsets.
CONFIRM_TASKS = 64
#: ``NR_CPUS`` is at most this on x86_64.
NR_CPUS_MAX = 8192
#: ``BW_SHIFT`` of ``to_ratio()``.
BW_SHIFT = 20
_DL_MIN = 1 << 10


@dataclass(frozen=True)
class SchedLayout:
    """Byte offsets in ``struct task_struct`` of the scheduling fields of one kernel build."""

    prio: int                    #: ``int prio`` (static_prio, normal_prio, rt_priority follow)
    policy: int                  #: ``unsigned int policy``
    dl: Optional[int] = None     #: ``u64 dl_runtime`` (dl_deadline, dl_period, dl_bw, dl_density follow)

    def __repr__(self) -> str:
        dl = f"{self.dl:#x}" if self.dl is not None else "unknown"
        return f"SchedLayout(prio={self.prio:#x}, policy={self.policy:#x}, dl={dl})"


@dataclass(frozen=True)
class SchedState:
    """What a task's ``task_struct`` says of its scheduling (policy names as decode.POLICY_NAMES)."""

    policy: str
    priority: int = 0            #: rt_priority (FIFO/RR: 1..99)
    runtime_ns: Optional[int] = None
    deadline_ns: Optional[int] = None
    period_ns: Optional[int] = None

    @property
    def realtime(self) -> bool:
        return self.policy in ("fifo", "rr", "deadline")


def _prio_ok(prio: int, static: int, normal: int, rt: int, policy: Optional[int] = None) -> bool:
    """The kernel's own invariants between the prio fields (and the policy when given)."""
    if not MAX_RT_PRIO <= static < MAX_RT_PRIO + 40 or not 0 <= rt < MAX_RT_PRIO:
        return False
    if not -1 <= prio < MAX_RT_PRIO + 40:
        return False
    if normal == -1:
        kind = SCHED_DEADLINE
        ok = rt == 0
    elif 0 <= normal < MAX_RT_PRIO - 1:
        kind = SCHED_FIFO
        ok = rt == MAX_RT_PRIO - 1 - normal
    else:
        kind = None
        ok = normal == static and rt == 0
    if not ok or policy is None:
        return ok
    if kind == SCHED_DEADLINE:
        return policy == SCHED_DEADLINE
    if kind == SCHED_FIFO:
        return policy in (SCHED_FIFO, SCHED_RR)
    return policy in POLICY_NAMES and policy not in (SCHED_FIFO, SCHED_RR, SCHED_DEADLINE)


def _prio_candidates(init: bytes) -> List[int]:
    want = (NICE0_PRIO, NICE0_PRIO, NICE0_PRIO, 0)
    return [o for o in range(0, min(len(init), PRIO_SCAN) - 16, 4)
            if struct.unpack_from("<iiiI", init, o) == want]


def _policy_candidates(init_addr: int, init: bytes, after: int) -> List[int]:
    """Offsets of ``policy`` that the ``cpus_ptr -> cpus_mask`` signature of init_task allows.

    ``cpus_ptr`` is 8-aligned; what precedes it may leave a 4-byte hole:
    ``policy, nr_cpus_allowed`` end at it or 4 bytes before (Debian 6.1:
    policy at -12), and 6.10+ puts ``max_allowed_capacity`` in between.
    The task list decides between the candidates.
    """
    def i32(o: int) -> int:
        return struct.unpack_from("<i", init, o)[0] if 0 <= o <= len(init) - 4 else -1

    out = []
    for q in range((after + 24 + 7) & ~7, min(len(init), POLICY_SCAN) - 8, 8):
        ptr, = struct.unpack_from("<Q", init, q)
        if ptr not in (init_addr + q + 8, init_addr + q + 16):
            continue
        for nr_at in (q - 4, q - 8):
            if 1 <= i32(nr_at) <= NR_CPUS_MAX and (nr_at == q - 4 or i32(q - 4) == 0):
                out.append(nr_at - 4)                           # policy, nr_cpus_allowed
        if struct.unpack_from("<Q", init, q - 16)[0] == CAPACITY_SCALE and \
                1 <= i32(q - 8) <= NR_CPUS_MAX:
            out.extend((q - 24, q - 20))                        # policy, max_allowed_capacity, nr
    return [p for p in out if p >= after and i32(p) == 0]      # init_task: SCHED_NORMAL


def _fields(read: Reader, task: int, lay: SchedLayout) -> Tuple[int, int, int, int, int]:
    prio = struct.unpack("<iiiI", read_exact(read, task + lay.prio, 16, f"prio of task {task:#x}"))
    policy, = struct.unpack("<I", read_exact(read, task + lay.policy, 4, f"policy of task {task:#x}"))
    return prio + (policy,)   # type: ignore[return-value]


def discover_sched_layout(read: Reader, syms: RuntimeSymbols, layout: TaskLayout) -> SchedLayout:
    """Find the scheduling fields of the running guest kernel (a stopped guest, or physical reads).

    The deadline parameters' offset is found too if a deadline task runs;
    otherwise :func:`read_sched` finds it on the first one it reads.
    """
    init_addr = syms.resolve("init_task")
    init = read_exact(read, init_addr, POLICY_SCAN, "init_task")
    tasks = [t for t, *_ in task_list(read, syms, layout)][:CONFIRM_TASKS]
    found: List[SchedLayout] = []
    for p in _prio_candidates(init):
        for q in _policy_candidates(init_addr, init, p + 16):
            lay = SchedLayout(prio=p, policy=q)
            try:
                if all(_prio_ok(*_fields(read, t, lay)) for t in tasks):
                    found.append(lay)
            except SymbolError:
                continue
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} ambiguous"
        raise SymbolError(f"{what} candidate(s) for task_struct.prio/.policy in init_task at "
                          f"{init_addr:#x} ({', '.join(map(repr, found))}): tasks that set their "
                          "policy before the attach cannot be read (they are learnt from their "
                          "next sched_setattr call)")
    lay = found[0]
    for t in [t for t, *_ in task_list(read, syms, layout)]:
        if _fields(read, t, lay)[2] == -1:
            dl = _find_dl(read, t, lay)
            if dl is not None:
                return replace(lay, dl=dl)
    return lay


def _find_dl(read: Reader, task: int, lay: SchedLayout) -> Optional[int]:
    """The offset of ``dl_runtime`` in a deadline task: the one place ``to_ratio()`` holds."""
    lo, hi = (lay.prio + 16 + 7) & ~7, lay.policy          # u64s: 8-aligned in the task
    raw = read_exact(read, task + lo, hi - lo, f"scheduling entities of task {task:#x}")
    hits = []
    for o in range(0, len(raw) - 40, 8):
        r, d, p, bw, dens = struct.unpack_from("<QQQQQ", raw, o)
        if _DL_MIN <= r <= d <= p < (1 << 62) and bw == (r << BW_SHIFT) // p and \
                dens == (r << BW_SHIFT) // d:
            hits.append(lo + o)
    return hits[0] if len(hits) == 1 else None


def read_sched(read: Reader, task: int, lay: SchedLayout) -> Tuple[SchedState, SchedLayout]:
    """The scheduling state of the ``task_struct`` at *task*, and the layout (its ``dl`` found now
    if this is the first deadline task).  A state the kernel's invariants rule out raises
    :class:`SymbolError` (the pointer is not a task, or the layout is another kernel's)."""
    prio, static, normal, rt, policy = _fields(read, task, lay)
    if not _prio_ok(prio, static, normal, rt, policy):
        raise SymbolError(f"task {task:#x}: prio {prio}/{static}/{normal}, rt_priority {rt}, policy "
                          f"{policy} contradict each other: not a task_struct of this layout")
    name = POLICY_NAMES[policy]
    if name in ("fifo", "rr"):
        return SchedState(name, priority=rt), lay
    if name != "deadline":
        return SchedState(name), lay
    if lay.dl is None:
        dl = _find_dl(read, task, lay)
        if dl is None:
            raise SymbolError(f"deadline task {task:#x}: no dl_runtime/deadline/period whose "
                              "dl_bw and dl_density agree: its parameters cannot be read")
        lay = replace(lay, dl=dl)
    r, d, p, bw, dens = struct.unpack("<QQQQQ", read_exact(read, task + lay.dl, 40,
                                                           f"dl parameters of task {task:#x}"))
    if not (_DL_MIN <= r <= d <= p and bw == (r << BW_SHIFT) // p):
        raise SymbolError(f"deadline task {task:#x}: runtime {r}, deadline {d}, period {p} do not "
                          "hold the kernel's invariants: not this layout")
    return SchedState("deadline", runtime_ns=r, deadline_ns=d, period_ns=p), lay
