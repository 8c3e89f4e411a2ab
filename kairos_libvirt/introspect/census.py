"""Every guest task, processes and their threads, read from memory with the VM running.

Why: the traps see a task only when it calls a trapped function, and on a
TCG guest under QEMU < 10.2 every breakpoint hit flushes all translated
code (docs/gdbcost.md): a periodic task's sleeps must not be trapped.  So
the RT tasks that set their policy before the attach are found by a census
of the task list instead, read from guest-physical memory (no stop, no hit),
and their policy from their task_struct (schedlayout).

Threads: ``init_task.tasks`` links processes only; a process's threads are
linked through a ``struct list_head`` of task_struct that is empty (points
to itself) in a single-threaded task and, in a multi-threaded one, leads to
task_structs of the same tgid (``thread_group`` up to Linux 6.6; from 6.7
``thread_node``, whose ring also holds ``signal->thread_head``, one node
that is no task).  Its offset is found on the first multi-threaded process.

A task's key is its pt_regs address (plan.task_key_from_rsp), the same the
traps compute: ``task->stack + THREAD_SIZE - PT_REGS_SIZE`` (sleepers.py finds
``stack``).  The reader must reach vmalloc (kernel stacks): sleepers.PageWalker.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import List, Optional, Tuple

from .layout import TaskLayout, task_ident, task_list
from .plan import PT_REGS_SIZE
from .sleepers import discover_stack_offset, task_stack_top
from .symbols import Reader, RuntimeSymbols, SymbolError, read_exact, try_read

__all__ = ["Census", "TaskRef", "discover_thread_offset", "all_tasks", "task_key"]

#: ``task->thread_info.cpu`` on x86_64 since Linux 5.16 (thread_info opens
#: task_struct: ``unsigned long flags, syscall_work; u32 status, cpu``); checked
#: against the running task of every vCPU before it is believed.
TI_CPU = 20
#: ``PF_KTHREAD`` in ``task->flags`` (include/linux/sched.h).
PF_KTHREAD = 0x00200000
#: Bounds: threads per process, tasks in all.
MAX_THREADS = 4096
MAX_ALL = 1 << 16
_KERNEL_HALF = 0xffff800000000000


@dataclass(frozen=True)
class TaskRef:
    addr: int
    tid: int
    tgid: int
    comm: str
    key: str      #: its pt_regs address, as the traps name it
    kthread: bool = False


def task_key(read: Reader, task: int, stack_off: int) -> str:
    """The trap key of the task: its pt_regs, just below the top of its kernel stack."""
    return f"{task_stack_top(read, task, stack_off) - PT_REGS_SIZE:#x}"


def discover_flags_offset(read: Reader, procs: List[Tuple[int, int, int, str]], stack_off: int) -> int:
    """Offset of ``unsigned int flags``: PF_KTHREAD set in init_task (the idle task) and
    kthreadd (PID 2), clear in init (PID 1).  It follows ``stack`` and ``usage``."""
    by_pid = {tid: addr for addr, tid, _, _ in procs}
    if not {0, 1, 2} <= set(by_pid):
        raise SymbolError("no init_task, init and kthreadd on the task list: cannot find task->flags")
    lo = stack_off + 8
    raw = {p: read_exact(read, by_pid[p] + lo, 24, f"task {p}'s flags") for p in (0, 1, 2)}
    hits = [lo + o for o in range(0, 24, 4)
            if all(bool(struct.unpack_from("<I", raw[p], o)[0] & PF_KTHREAD) == (p != 1)
                   for p in (0, 1, 2))]
    if len(hits) != 1:
        raise SymbolError(f"task->flags: {len(hits)} candidates after task->stack")
    return hits[0]


def _ring(read: Reader, head: int, limit: int) -> Optional[List[int]]:
    """The nodes of the list ring through ``head`` (head excluded), or None if it does not close."""
    out: List[int] = []
    raw, _ = try_read(read, head, 8)
    if raw is None:
        return None
    nxt, = struct.unpack("<Q", raw)
    while nxt != head:
        if nxt < _KERNEL_HALF or len(out) >= limit:
            return None
        out.append(nxt)
        raw, _ = try_read(read, nxt, 8)
        if raw is None:
            return None
        nxt, = struct.unpack("<Q", raw)
    return out


def _threads(read: Reader, leader: int, tgid: int, off: int, layout: TaskLayout
             ) -> Optional[List[Tuple[int, int, int, str]]]:
    """The other threads of ``leader`` through the list at ``off``; None if that list is not one."""
    nodes = _ring(read, leader + off, MAX_THREADS)
    if nodes is None:
        return None
    out, foreign = [], 0
    for n in nodes:
        try:
            tid, tg, comm = task_ident(read, n - off, layout)
        except SymbolError:
            tid, tg, comm = -1, -1, ""
        if tg == tgid and tid != tgid:
            out.append((n - off, tid, tg, comm))
        else:
            foreign += 1          # signal->thread_head (6.7+), at most one
    return out if foreign <= 1 else None


def discover_thread_offset(read: Reader, procs: List[Tuple[int, int, int, str]], layout: TaskLayout,
                           scan: int = 0x1000) -> Optional[int]:
    """The offset of the thread list, found on a multi-threaded process; None if none runs yet."""
    init_addr = procs[0][0]
    init = read_exact(read, init_addr, scan, "init_task")
    cands = [o for o in range(0, scan - 16, 8)
             if struct.unpack_from("<QQ", init, o) == (init_addr + o, init_addr + o)]
    found = []
    for o in cands:
        threads, bad = 0, False
        for addr, tid, tgid, _ in procs[1:]:
            got = _threads(read, addr, tgid, o, layout)
            if got is None:
                bad = True
                break
            threads += len(got)
        if not bad and threads:
            found.append(o)
    if len(found) > 1:
        raise SymbolError(f"task_struct thread list is ambiguous: offsets {[hex(o) for o in found]}")
    return found[0] if found else None


def all_tasks(read: Reader, syms: RuntimeSymbols, layout: TaskLayout, stack_off: int,
              thread_off: Optional[int], flags_off: Optional[int] = None) -> List[TaskRef]:
    """Processes and (when the thread list is known) their threads, with their trap keys."""
    procs = task_list(read, syms, layout)
    out: List[TaskRef] = []
    for addr, tid, tgid, comm in procs:
        group = [(addr, tid, tgid, comm)]
        if thread_off is not None and tid == tgid:
            group += _threads(read, addr, tgid, thread_off, layout) or []
        for a, t, g, c in group:
            try:
                kthread = False
                if flags_off is not None:
                    flags, = struct.unpack("<I", read_exact(read, a + flags_off, 4, "task->flags"))
                    kthread = bool(flags & PF_KTHREAD)
                out.append(TaskRef(a, t, g, c, task_key(read, a, stack_off), kthread))
            except SymbolError:
                continue      # a task being torn down: the next census sees it gone
            if len(out) >= MAX_ALL:
                return out
    return out


def cpu_offset_holds(read: Reader, syms: RuntimeSymbols, ncpus: int) -> bool:
    """``TI_CPU`` holds n in the task running on each CPU n < ncpus (and in init_task, CPU 0's idle)."""
    from .layout import current_task, percpu_base
    cur = [syms.resolve("init_task")] + [current_task(read, percpu_base(read, syms, n), syms)
                                         for n in range(ncpus)]
    want = [0] + list(range(ncpus))
    return [struct.unpack("<I", read_exact(read, t + TI_CPU, 4, "thread_info.cpu"))[0]
            for t in cur] == want


class Census:
    """Offsets found once (the thread list as soon as a multi-threaded process exists)."""

    def __init__(self, read: Reader, syms: RuntimeSymbols, layout: TaskLayout, ncpus: int = 1) -> None:
        self.read, self.syms, self.layout = read, syms, layout
        procs = task_list(read, syms, layout)
        self.stack_off = discover_stack_offset(read, [t for t, *_ in procs[:3]])
        self.flags_off = discover_flags_offset(read, procs, self.stack_off)
        self.thread_off: Optional[int] = None
        try:
            self.cpu_known = cpu_offset_holds(read, syms, ncpus)
        except SymbolError:
            self.cpu_known = False

    def cpu_of(self, task: int) -> Optional[int]:
        """The CPU (vCPU index) the task last ran on, or None if this kernel's field is not known."""
        if not self.cpu_known:
            return None
        raw, _ = try_read(self.read, task + TI_CPU, 4)
        return struct.unpack("<I", raw)[0] if raw is not None else None

    def tasks(self) -> List[TaskRef]:
        if self.thread_off is None:
            procs = task_list(self.read, self.syms, self.layout)
            self.thread_off = discover_thread_offset(self.read, procs, self.layout)
        return all_tasks(self.read, self.syms, self.layout, self.stack_off, self.thread_off,
                         self.flags_off)
