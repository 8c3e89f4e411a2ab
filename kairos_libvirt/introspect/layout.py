"""The few ``struct task_struct`` offsets the trap decoders need, found in guest memory.

No debug info: the offsets are discovered from facts every Linux kernel
shares (``include/linux/sched.h``, ``init/init_task.c``, ``kernel/fork.c``):

* ``comm``: ``init_task`` (the idle task of CPU 0) is named ``swapper/0``
  (``init_idle()``: ``"%s/%d", INIT_TASK_COMM, cpu``);
* ``tasks``: the ``struct list_head`` of ``init_task`` whose ``next`` and
  ``prev`` are consistent list links leading to real tasks (``copy_process()``
  adds every new process at the tail of ``init_task.tasks``, so the first two
  are PID 1, the init process, and PID 2, ``kthreadd``);
* ``pid``/``tgid``: the one offset where ``init_task`` holds 0, 0, the first
  task 1, 1 and the second 2, 2 (``pid_t pid; pid_t tgid;`` are adjacent).

The running task of a CPU is the per-CPU ``current_task`` (Linux 6.1; from
6.2 to 6.14 the first member of the per-CPU ``struct pcpu_hot``), found at
``GS base + symbol`` when the vCPU stopped in kernel mode.

Every value comes from the guest: pointers are checked, every walk and read
is bounded, and what does not fit raises :class:`SymbolError`.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from kairos_libvirt.introspect.symbols import (
    Reader, RuntimeSymbols, SymbolError, read_exact, try_read,
)

__all__ = [
    "TaskLayout", "TASK_COMM_LEN", "PID_MAX_LIMIT",
    "discover_layout", "current_task", "percpu_base", "task_ident", "task_list",
]

TASK_COMM_LEN = 16
#: include/linux/threads.h: no pid_t above this on 64-bit.
PID_MAX_LIMIT = 4 * 1024 * 1024
#: Bytes of init_task examined (task_struct is 6..14 KiB; the fields we need come early).
SCAN_BYTES = 16 * 1024
#: ``struct list_head`` candidates examined in init_task.
MAX_LIST_CANDIDATES = 64
#: Tasks read to confirm pid/tgid (init_task, PID 1, PID 2, and one more).
CONFIRM_TASKS = 4
#: Bound for :func:`task_list`.
MAX_TASKS = 1 << 16

_KERNEL_HALF = 0xffff800000000000
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class TaskLayout:
    """Byte offsets in ``struct task_struct`` of one guest kernel build."""

    tasks: int   #: ``struct list_head tasks``
    pid: int     #: ``pid_t pid`` (the thread id)
    tgid: int    #: ``pid_t tgid`` (the process id)
    comm: int    #: ``char comm[TASK_COMM_LEN]``

    def __repr__(self) -> str:
        return (f"TaskLayout(tasks={self.tasks:#x}, pid={self.pid:#x}, tgid={self.tgid:#x}, "
                f"comm={self.comm:#x})")

    def span(self) -> Tuple[int, int]:
        """(first byte, length) covering pid, tgid and comm: one read per task."""
        lo = min(self.pid, self.tgid, self.comm)
        hi = max(self.pid + 4, self.tgid + 4, self.comm + TASK_COMM_LEN)
        return lo, hi - lo


def _kptr(v: int) -> bool:
    return _KERNEL_HALF <= v <= _MASK64 - SCAN_BYTES


def _u64(read: Reader, addr: int, what: str) -> int:
    return int.from_bytes(read_exact(read, addr, 8, what), "little")


def _comm(raw: bytes) -> Optional[str]:
    """A task name if *raw* (16 bytes) looks like one: printable, NUL-terminated, NUL-padded."""
    nul = raw.find(b"\0")
    if nul <= 0 or raw[nul:].strip(b"\0"):
        return None
    name = raw[:nul]
    if any(c < 0x20 or c == 0x7f for c in name):
        return None
    return name.decode("utf-8", "backslashreplace")


def _find_comm(init: bytes) -> int:
    for name in (b"swapper/0", b"swapper"):
        at = init.find(name + b"\0")
        while at >= 0:
            if at + TASK_COMM_LEN <= len(init) and _comm(init[at:at + TASK_COMM_LEN]) == name.decode():
                return at
            at = init.find(name + b"\0", at + 1)
    raise SymbolError("init_task holds no task name 'swapper/0' in its first "
                      f"{len(init)} bytes: the symbol init_task is not a task_struct, or the symbols "
                      "are for another kernel. Fix: check the slide and the symbol source")


def _list_candidates(read: Reader, init_addr: int, init: bytes, comm: int) -> List[Tuple[int, int]]:
    """(offset, first task) for each list_head in init_task that looks like ``tasks``."""
    out: List[Tuple[int, int]] = []
    for o in range(0, len(init) - 16, 8):
        nxt, prv = struct.unpack_from("<QQ", init, o)
        me = init_addr + o
        if nxt == me or not (_kptr(nxt) and _kptr(prv)) or nxt < o:
            continue
        back, _ = try_read(read, nxt + 8, 8)                    # next->prev == &init_task.tasks
        if back is None or struct.unpack("<Q", back)[0] != me:
            continue
        fwd, _ = try_read(read, prv, 8)                         # prev->next == &init_task.tasks
        if fwd is None or struct.unpack("<Q", fwd)[0] != me:
            continue
        first = nxt - o
        name, _ = try_read(read, first + comm, TASK_COMM_LEN)
        if name is None or _comm(name) is None:
            continue
        out.append((o, first))
        if len(out) >= MAX_LIST_CANDIDATES:
            break
    return out


def _walk(read: Reader, first: int, tasks_off: int, stop: int, count: int) -> List[int]:
    out = [first]
    while len(out) < count:
        nxt = _u64(read, out[-1] + tasks_off, "a task's tasks.next")
        if nxt == stop:
            break
        if not _kptr(nxt) or nxt < tasks_off:
            raise SymbolError(f"task list link {nxt:#x} is not a kernel pointer")
        out.append(nxt - tasks_off)
    return out


def discover_layout(read: Reader, syms: RuntimeSymbols) -> TaskLayout:
    """Find the ``task_struct`` offsets of the running guest kernel.

    Needs PID 1 and PID 2 to exist (the guest got past early boot), and a
    stopped guest for a consistent view of the task list.
    """
    init_addr = syms.resolve("init_task")
    init = read_exact(read, init_addr, SCAN_BYTES, "init_task")
    comm = _find_comm(init)
    found: Dict[int, List[int]] = {}
    tried: List[str] = []
    for tasks_off, first in _list_candidates(read, init_addr, init, comm):
        try:
            chain = [init_addr] + _walk(read, first, tasks_off, init_addr + tasks_off, CONFIRM_TASKS - 1)
        except SymbolError as exc:
            tried.append(f"list at +{tasks_off:#x}: {exc}")
            continue
        if len(chain) < 3:
            tried.append(f"list at +{tasks_off:#x}: only {len(chain)} tasks")
            continue
        bufs = [init] + [read_exact(read, t, SCAN_BYTES, "a task_struct") for t in chain[1:]]
        pids = []
        for q in range(0, SCAN_BYTES - 8, 4):
            vals = [struct.unpack_from("<ii", b, q) for b in bufs]
            if vals[:3] == [(0, 0), (1, 1), (2, 2)] and \
                    all(2 < p == g < PID_MAX_LIMIT for p, g in vals[3:]):
                pids.append(q)
        if pids:
            found[tasks_off] = pids
        else:
            tried.append(f"list at +{tasks_off:#x}: no offset holds pids 0, 1, 2")
    if len(found) != 1 or len(next(iter(found.values()))) != 1:
        if not found:
            why = "; ".join(tried[:6]) or "no list_head in init_task leads to other tasks"
            raise SymbolError(f"cannot find task_struct.tasks and .pid in init_task at {init_addr:#x}: "
                              f"{why}. Fix: wait until the guest has started init (PID 1) and "
                              "kthreadd (PID 2), and stop the guest while reading")
        raise SymbolError("task_struct layout is ambiguous: candidates (tasks: pid offsets) "
                          + ", ".join(f"{o:#x}: {[hex(p) for p in ps]}" for o, ps in found.items()))
    tasks_off, (pid,) = next(iter(found.items()))
    return TaskLayout(tasks=tasks_off, pid=pid, tgid=pid + 4, comm=comm)


def task_ident(read: Reader, task: int, layout: TaskLayout) -> Tuple[int, int, str]:
    """(tid, tgid, comm) of the ``struct task_struct`` at *task*.

    The name is whatever the guest set (``prctl(PR_SET_NAME)``): undecodable
    bytes come back backslash-escaped, never raw.
    """
    if not _kptr(task):
        raise SymbolError(f"task pointer {task:#x} is not a kernel address")
    lo, n = layout.span()
    raw = read_exact(read, task + lo, n, f"task_struct at {task:#x}")
    tid, = struct.unpack_from("<i", raw, layout.pid - lo)
    tgid, = struct.unpack_from("<i", raw, layout.tgid - lo)
    if not (0 <= tid < PID_MAX_LIMIT and 0 <= tgid < PID_MAX_LIMIT):
        raise SymbolError(f"task at {task:#x} has pid {tid}, tgid {tgid}: not a task_struct "
                          "(or the layout is for another kernel)")
    name = raw[layout.comm - lo:layout.comm - lo + TASK_COMM_LEN].split(b"\0", 1)[0]
    return tid, tgid, name.decode("utf-8", "backslashreplace")


def task_list(read: Reader, syms: RuntimeSymbols, layout: TaskLayout,
              limit: int = MAX_TASKS) -> List[Tuple[int, int, int, str]]:
    """(task address, tid, tgid, comm) of every process on ``init_task.tasks``, bounded."""
    init_addr = syms.resolve("init_task")
    head = init_addr + layout.tasks
    out = [(init_addr,) + task_ident(read, init_addr, layout)]
    nxt = _u64(read, head, "init_task.tasks.next")
    while nxt != head:
        if len(out) >= limit:
            raise SymbolError(f"task list longer than {limit}: a loop, or the guest changed it "
                              "while we read (stop the guest first)")
        if not _kptr(nxt) or nxt < layout.tasks:
            raise SymbolError(f"task list link {nxt:#x} is not a kernel pointer")
        t = nxt - layout.tasks
        out.append((t,) + task_ident(read, t, layout))
        nxt = _u64(read, nxt, "a task's tasks.next")
    return out


def percpu_base(read: Reader, syms: RuntimeSymbols, cpu: int) -> int:
    """``__per_cpu_offset[cpu]``: the GS base of *cpu* in kernel mode."""
    if not 0 <= cpu < 8192:
        raise SymbolError(f"cpu {cpu} is out of range")
    return _u64(read, syms.resolve("__per_cpu_offset") + 8 * cpu, f"__per_cpu_offset[{cpu}]")


def current_task(read: Reader, gs_base: int, syms: RuntimeSymbols) -> int:
    """The ``struct task_struct *`` running on the vCPU whose kernel GS base is *gs_base*.

    Use the GS base of a vCPU stopped in kernel mode (CPL 0), or
    :func:`percpu_base` for a CPU number.
    """
    for name, member in (("current_task", 0), ("pcpu_hot", 0)):  # pcpu_hot.current_task is first
        if name not in syms:
            continue
        sym = syms.lookup(name)
        if not sym.in_image and not _KERNEL_HALF <= gs_base <= _MASK64:
            raise SymbolError(f"GS base {gs_base:#x} is not a kernel per-CPU base: the vCPU stopped in "
                              "user mode. Fix: read it at a kernel-mode stop, use the KERNEL_GS_BASE "
                              "MSR, or percpu_base(read, syms, cpu)")
        addr = (gs_base + syms.resolve(name) + member) & _MASK64
        task = _u64(read, addr, f"{name} at GS base {gs_base:#x}")
        if not _kptr(task):
            raise SymbolError(f"{name} holds {task:#x}, not a task pointer: wrong GS base or symbols")
        return task
    raise SymbolError("the guest kernel has neither current_task nor pcpu_hot: cannot find the "
                      "running task. Fix: report this kernel version")
