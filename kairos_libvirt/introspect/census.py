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
from typing import Dict, List, Optional, Tuple

from .layout import TaskLayout, task_ident, task_list
from .plan import PT_REGS_SIZE
from .sleepers import discover_stack_offset, task_stack_top
from .symbols import Reader, RuntimeSymbols, SymbolError, read_exact, try_read

__all__ = ["Census", "TaskRef", "discover_thread_offset", "all_tasks", "task_key"]

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


def task_key(read: Reader, task: int, stack_off: int) -> str:
    """The trap key of the task: its pt_regs, just below the top of its kernel stack."""
    return f"{task_stack_top(read, task, stack_off) - PT_REGS_SIZE:#x}"


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
              thread_off: Optional[int]) -> List[TaskRef]:
    """Processes and (when the thread list is known) their threads, with their trap keys."""
    procs = task_list(read, syms, layout)
    out: List[TaskRef] = []
    for addr, tid, tgid, comm in procs:
        group = [(addr, tid, tgid, comm)]
        if thread_off is not None and tid == tgid:
            group += _threads(read, addr, tgid, thread_off, layout) or []
        for a, t, g, c in group:
            try:
                out.append(TaskRef(a, t, g, c, task_key(read, a, stack_off)))
            except SymbolError:
                continue      # a task being torn down: the next census sees it gone
            if len(out) >= MAX_ALL:
                return out
    return out


class Census:
    """Offsets found once (the thread list as soon as a multi-threaded process exists)."""

    def __init__(self, read: Reader, syms: RuntimeSymbols, layout: TaskLayout) -> None:
        self.read, self.syms, self.layout = read, syms, layout
        self.stack_off = discover_stack_offset(read, [t for t, *_ in task_list(read, syms, layout)[:3]])
        self.thread_off: Optional[int] = None
        self.errors: Dict[str, int] = {}

    def tasks(self) -> List[TaskRef]:
        if self.thread_off is None:
            procs = task_list(self.read, self.syms, self.layout)
            self.thread_off = discover_thread_offset(self.read, procs, self.layout)
        return all_tasks(self.read, self.syms, self.layout, self.stack_off, self.thread_off)
