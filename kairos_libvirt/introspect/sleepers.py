"""When a sleeping guest task will wake: its hrtimer read from guest-physical memory, no VM stop.

A gdbstub breakpoint hit makes QEMU 7.2 (TCG) flush all its translated code
(docs/gdbcost.md), so periods are learnt without hits: the agent reads, while
the VM runs, the absolute wake-up target of the hrtimer a task sleeps on.
For ``clock_nanosleep(TIMER_ABSTIME)`` that is exactly the time the task asked
for; successive targets of a periodic task differ by whole periods.

Two parts, both reading only through a :data:`~.symbols.Reader`:

* :class:`PageWalker` translates kernel-virtual addresses (image, direct map,
  vmalloc: kernel stacks are vmalloc'd with ``CONFIG_VMAP_STACK``) through the
  kernel's own page tables, rooted at ``init_top_pgt`` (``swapper_pg_dir`` is a
  ``#define`` of it, arch/x86/include/asm/pgtable_64.h).  vmalloc mappings are
  made in those tables and shared by every process (``preallocate_vmalloc_pages()``,
  arch/x86/mm/init_64.c), so one root serves every task.  4-level, or 5-level
  when the kernel's ``__pgtable_l5_enabled`` says so (arch/x86/kernel/head64.c).
* :func:`sleep_expiry` finds the live ``struct hrtimer_sleeper`` on a task's
  kernel stack.  :func:`discover_stack_offset` and :func:`task_stack_top` give
  that stack from the ``task_struct``.

Linux v6.1 facts relied on (checked in Debian's linux-source-6.1, 6.1.192):

* include/linux/hrtimer.h: ``struct hrtimer { struct timerqueue_node node;
  ktime_t _softexpires; enum hrtimer_restart (*function)(struct hrtimer *);
  struct hrtimer_clock_base *base; u8 state, is_rel, is_soft, is_hard; }`` and
  ``struct hrtimer_sleeper { struct hrtimer timer; struct task_struct *task; }``;
  ``timerqueue_node`` is an ``rb_node`` (3 words) then ``ktime_t expires``.
  So, from the sleeper: expires +24, _softexpires +32, function +40, base +48,
  state +56, task +64 (72 bytes, 8-aligned).  ``HRTIMER_STATE_ENQUEUED`` = 1,
  ``HRTIMER_STATE_INACTIVE`` = 0 (no other state in 6.1).
* kernel/time/hrtimer.c: ``hrtimer_nanosleep()`` keeps ``struct
  hrtimer_sleeper t`` on its stack; ``__hrtimer_init_sleeper()`` sets
  ``function = hrtimer_wakeup`` and ``task = current``;
  ``hrtimer_set_expires_range_ns(&t.timer, rqtp, current->timer_slack_ns)`` sets
  ``_softexpires = rqtp`` and ``expires = rqtp + slack``; restarting it
  (``hrtimer_start_expires``) keeps both for ``HRTIMER_MODE_ABS``.
  ``hrtimer_wakeup()`` runs after ``__run_hrtimer()`` made the timer INACTIVE
  and sets ``task = NULL``; a signal ends the sleep through ``hrtimer_cancel()``
  (INACTIVE too).  So a sleeper whose state is ENQUEUED and whose task is the
  task is the one it sleeps on now: every earlier one left on the stack is
  INACTIVE, because the kernel never abandons an enqueued timer on a stack.
* kernel/sched/core.c ``__setscheduler_params()``: a SCHED_FIFO/RR/DEADLINE
  task gets ``timer_slack_ns = 0``.  We return ``_softexpires`` anyway: it is
  the requested time exactly, whatever the slack (50 µs by default for others).
* ``futex`` waits with a timeout and ``schedule_hrtimeout`` (poll, select,
  epoll) also sleep on an ``hrtimer_sleeper`` with ``hrtimer_wakeup``: their
  targets are returned too.  Which call a task sleeps in is not told here.
* kernel/fork.c ``set_task_stack_end_magic()`` writes ``STACK_END_MAGIC``
  (include/uapi/linux/magic.h) at ``task->stack``, the lowest word of the
  ``THREAD_SIZE`` stack (init/main.c does it for ``init_task``).

Everything read is hostile: walks are at most five levels, reads are bounded,
and what does not fit gives :class:`~.symbols.SymbolError` or None.  The VM
runs while we read, so a sleeper is read twice and believed only if both reads
agree.  x86_64 only.
"""
from __future__ import annotations

import struct
from typing import List, Optional, Sequence, Tuple

from .plan import THREAD_SIZE
from .symbols import KernelPlacement, Reader, RuntimeSymbols, SymbolError, read_exact, try_read

__all__ = ["PageWalker", "SleeperWatch", "sleep_expiry", "sleep_target", "discover_stack_offset", "task_stack_top",
           "SLEEPER_SIZE", "STACK_END_MAGIC", "MAX_READ"]

PAGE = 4096
#: Physical-address bits 12..51 of a page-table entry (bits 52..62 are software/PKEY, 63 NX).
_ADDR = 0x000ffffffffff000
_PRESENT = 1 << 0
_PSE = 1 << 7                    # a 1 GiB (PUD) or 2 MiB (PMD) page; the PAT bit in a PTE
_MASK64 = (1 << 64) - 1
#: Lowest kernel-half address: 47-bit (4-level) and 56-bit (5-level) canonical forms.
_KERNEL_HALF = {4: 0xffff800000000000, 5: 0xff00000000000000}
#: One read is bounded: a hostile guest chooses the addresses we follow.
MAX_READ = 1 << 20

#: ``sizeof(struct hrtimer_sleeper)`` and its members' offsets (Linux 6.1, see above).
SLEEPER_SIZE = 72
_EXPIRES, _SOFT, _FUNCTION, _BASE, _STATE, _TASK = 24, 32, 40, 48, 56, 64
_ENQUEUED = 1
#: include/uapi/linux/magic.h: the lowest word of every kernel stack.
STACK_END_MAGIC = 0x57AC6E9D
#: task_struct bytes searched for ``void *stack`` (offset 0x20 in 6.1: thread_info, __state).
STACK_SCAN = 512


def _u64(b: bytes, off: int = 0) -> int:
    return struct.unpack_from("<Q", b, off)[0]


class PageWalker:
    """Kernel-virtual → guest-physical through the kernel's own page tables; no vCPU stopped.

    ``phys_read`` reads guest-physical memory (e.g. ``PhysMem.read``),
    ``placement`` says where the kernel image is (it translates image and
    direct-map addresses without a walk), ``rsyms`` gives ``init_top_pgt`` and,
    when present, ``__pgtable_l5_enabled`` and ``sme_me_mask`` (cleared from
    entries: zero unless the guest runs with AMD SME, never under TCG).
    The levels are checked at once by walking ``init_top_pgt``'s own address.
    """

    def __init__(self, phys_read: Reader, placement: KernelPlacement, rsyms: RuntimeSymbols) -> None:
        self._phys = phys_read
        self._placement = placement
        image = placement.reader(phys_read)
        root_va = rsyms.resolve("init_top_pgt")
        root = placement.phys(root_va, PAGE)
        if root is None or root % PAGE:
            raise SymbolError(f"init_top_pgt at {root_va:#x} is not a page of the kernel image: the "
                              "symbols or the placement are for another kernel")
        self.root = root
        self.levels = 4
        if "__pgtable_l5_enabled" in rsyms:
            l5 = struct.unpack("<I", read_exact(image, rsyms.resolve("__pgtable_l5_enabled"), 4,
                                                "__pgtable_l5_enabled"))[0]
            if l5 not in (0, 1):
                raise SymbolError(f"__pgtable_l5_enabled reads {l5}: not the kernel the symbols describe")
            self.levels = 5 if l5 else 4
        self.me_mask = 0
        if "sme_me_mask" in rsyms:
            mask = _u64(read_exact(image, rsyms.resolve("sme_me_mask"), 8, "sme_me_mask"))
            if mask & ~_ADDR or bin(mask).count("1") > 1:
                raise SymbolError(f"sme_me_mask reads {mask:#x}: not one physical-address bit")
            self.me_mask = mask
        try:
            got: Optional[int] = self.translate(root_va)[0]
            why = f"map it to guest-physical {got:#x}, not {root:#x}"
        except SymbolError as exc:
            got, why = None, str(exc)
        if got != root:
            raise SymbolError(f"the kernel's page tables, walked as {self.levels}-level, do not map "
                              f"init_top_pgt where it is ({why}): wrong paging mode or placement")

    def translate(self, vaddr: int) -> Tuple[int, int]:
        """(guest-physical address of *vaddr*, bytes mapped contiguously from there)."""
        if not _KERNEL_HALF[self.levels] <= vaddr <= _MASK64:
            raise SymbolError(f"{vaddr:#x} is not a kernel address ({self.levels}-level paging)")
        table = self.root
        shift = 12 + 9 * self.levels
        while shift > 12:
            shift -= 9
            slot = table + 8 * ((vaddr >> shift) & 511)
            entry = _u64(read_exact(self._phys, slot, 8, f"a page-table entry for {vaddr:#x}"))
            if not entry & _PRESENT:
                raise SymbolError(f"{vaddr:#x} is not mapped (level-{(shift - 3) // 9} entry "
                                  f"{entry:#x} at guest-physical {slot:#x} not present)")
            entry &= ~self.me_mask
            if shift > 12 and entry & _PSE:
                if shift > 30:
                    raise SymbolError(f"page-table entry {entry:#x} for {vaddr:#x} has the large-page "
                                      f"bit at a level that has no large pages")
                size = 1 << shift
                off = vaddr & (size - 1)
                return (entry & _ADDR & ~(size - 1)) + off, size - off
            table = entry & _ADDR
        off = vaddr & (PAGE - 1)
        return table + off, PAGE - off

    def reader(self) -> Reader:
        """``read(vaddr, n)`` of kernel-virtual memory, page by page where not contiguous."""
        def read(vaddr: int, n: int) -> bytes:
            if not 0 <= n <= MAX_READ or not 0 <= vaddr <= _MASK64 + 1 - n:
                raise SymbolError(f"refusing a read of {n} bytes at {vaddr:#x}")
            p = self._placement.phys(vaddr, max(n, 1))
            if p is not None:
                return read_exact(self._phys, p, n, f"kernel memory at {vaddr:#x}")
            out: List[bytes] = []
            at, left = vaddr, n
            while left:
                phys, span = self.translate(at)
                k = min(left, span)
                out.append(read_exact(self._phys, phys, k, f"kernel memory at {at:#x}"))
                at += k
                left -= k
            return b"".join(out)
        return read


def sleep_target(read: Reader, stack_top: int, task: int, wakeup_fn: int
                 ) -> Optional[Tuple[int, bool]]:
    """(target, absolute) of the task's sleep in progress, or None (see :func:`sleep_expiry`).

    ``absolute``: the timer was armed in absolute mode (``hrtimer.is_rel`` 0,
    the byte after ``state``): clock_nanosleep(TIMER_ABSTIME) of a periodic
    program, whose successive targets are whole periods apart.  A relative
    sleep's target is the call time plus its length: no such evidence.
    """
    raw = _live_sleeper(read, stack_top, task, wakeup_fn)
    if raw is None:
        return None
    return struct.unpack_from("<q", raw, _SOFT)[0], raw[_STATE + 1] == 0


class SleeperWatch:
    """:func:`sleep_target` for one task, cheap enough to run faster than its period.

    Why: targets sampled at a fixed interval that happens to be k periods
    apart all differ by k periods, and their GCD says k·T.  Sampling faster
    than the period (and at jittered times) sees consecutive targets, so the
    GCD is T.  A full scan of the 16 KiB stack costs ~20 reads; while the task
    sleeps in the same call, its live sleeper is read again at the same
    guest-physical place (one read).  Any miss there scans the stack again at
    once: with ``CONFIG_RANDOMIZE_KSTACK_OFFSET`` (on in Debian's kernels) every
    syscall moves the frame, so each new sleep lies elsewhere.  (A fast path
    that waited 64 misses before rescanning saw one target in three of a 50 ms
    task, every ~150 ms, and the model learnt a 150 ms period.)  A scan that
    finds no sleep (the task runs, or sleeps some other way) is not repeated at
    once: the next ones wait 1, 2, 4 … up to ``MAX_BACKOFF`` calls, so a busy
    real-time task costs a scan every ``MAX_BACKOFF`` reads, not every read (a
    guest's FIFO hammer made the sampler 7 % of a CPU).
    """

    MAX_BACKOFF = 32

    def __init__(self, phys_read: Reader, walker: "PageWalker", stack_top: int, task: int,
                 wakeup_fn: int) -> None:
        self.phys_read, self.walker = phys_read, walker
        self.stack_top, self.task, self.wakeup_fn = stack_top, task, wakeup_fn
        self._at: Optional[int] = None        # guest-physical address of the live sleeper
        self._backoff = 0                     # calls to skip after a scan that found nothing
        self._skip = 0
        self.reads = 0
        self.scans = 0

    def target(self) -> Optional[Tuple[int, bool]]:
        """(requested wake-up, absolute?) of the sleep in progress, or None (awake)."""
        if self._at is not None:
            self.reads += 1
            raw = read_exact(self.phys_read, self._at, SLEEPER_SIZE, "an hrtimer_sleeper")
            if _live(raw, self.task) and _u64(raw, _FUNCTION) == self.wakeup_fn & _MASK64:
                return struct.unpack_from("<q", raw, _SOFT)[0], raw[_STATE + 1] == 0
            self._at = None                    # woke: its next sleep is elsewhere, scan now
        elif self._skip:
            self._skip -= 1
            return None
        self.reads += 1
        self.scans += 1
        found = _find_sleeper(self.walker.reader(), self.stack_top, self.task, self.wakeup_fn)
        if found is None:
            self._backoff = min(self.MAX_BACKOFF, max(1, 2 * self._backoff))
            self._skip = self._backoff
            return None
        self._backoff = self._skip = 0
        va, raw = found
        gpa, span = self.walker.translate(va)
        self._at = gpa if span >= SLEEPER_SIZE else None   # across a page: no fast path
        return struct.unpack_from("<q", raw, _SOFT)[0], raw[_STATE + 1] == 0


def sleep_expiry(read: Reader, stack_top: int, task: int, wakeup_fn: int) -> Optional[int]:
    """The absolute wake-up target (ns, the hrtimer's own clock) of the task at *task*, or None.

    Searches the kernel stack [stack_top - THREAD_SIZE, stack_top) for an
    8-aligned ``hrtimer_sleeper`` whose ``function`` is *wakeup_fn* (runtime
    ``hrtimer_wakeup``), whose ``task`` is *task*, whose state is ENQUEUED and
    whose ``0 < _softexpires <= expires``: the sleep in progress (stale ones
    are INACTIVE, see the module docstring).  Returns its ``_softexpires``,
    the time the task asked for.  None: not in an hrtimer sleep now, a stack
    that is not one, two live sleepers (a kernel never has them), or the
    sleeper changed between two reads (the task just woke or re-armed).
    SymbolError only for memory that cannot be read.
    """
    raw = _live_sleeper(read, stack_top, task, wakeup_fn)
    return None if raw is None else struct.unpack_from("<q", raw, _SOFT)[0]


def _live_sleeper(read: Reader, stack_top: int, task: int, wakeup_fn: int) -> Optional[bytes]:
    """The raw live ``hrtimer_sleeper`` of the task, read twice alike; None if there is none."""
    found = _find_sleeper(read, stack_top, task, wakeup_fn)
    return None if found is None else found[1]


def _find_sleeper(read: Reader, stack_top: int, task: int, wakeup_fn: int
                  ) -> Optional[Tuple[int, bytes]]:
    """(kernel-virtual address, raw bytes) of the task's live sleeper, read twice alike."""
    if stack_top % THREAD_SIZE or not _KERNEL_HALF[5] + THREAD_SIZE <= stack_top <= _MASK64:
        return None      # not the top of a kernel stack: nothing sleeps there
    bottom = stack_top - THREAD_SIZE
    stack = read_exact(read, bottom, THREAD_SIZE, f"the kernel stack below {stack_top:#x}")
    needle = struct.pack("<Q", wakeup_fn & _MASK64)
    live: List[int] = []
    at = stack.find(needle, _FUNCTION)
    while at >= 0:
        sl = at - _FUNCTION
        if at % 8 == 0 and sl + SLEEPER_SIZE <= THREAD_SIZE and _live(stack[sl:sl + SLEEPER_SIZE], task):
            live.append(sl)
        at = stack.find(needle, at + 1)
    if len(live) != 1:
        return None
    sl = live[0]
    again = read_exact(read, bottom + sl, SLEEPER_SIZE, "an hrtimer_sleeper")
    if again != stack[sl:sl + SLEEPER_SIZE]:
        return None
    return bottom + sl, again


def _live(raw: bytes, task: int) -> bool:
    expires, soft = struct.unpack_from("<qq", raw, _EXPIRES)
    return (raw[_STATE] == _ENQUEUED and _u64(raw, _TASK) == task
            and _u64(raw, _BASE) >= _KERNEL_HALF[5] and 0 < soft <= expires)


def _stack_of(read: Reader, task: int, off: int) -> Optional[int]:
    """``task->stack`` at *off* if it is a THREAD_SIZE-aligned kernel stack with its end magic."""
    got, _ = try_read(read, task + off, 8)
    if got is None:
        return None
    stack = _u64(got)
    if stack % THREAD_SIZE or not _KERNEL_HALF[5] <= stack <= _MASK64 + 1 - THREAD_SIZE:
        return None
    magic, _ = try_read(read, stack, 8)
    return stack if magic is not None and _u64(magic) == STACK_END_MAGIC else None


def discover_stack_offset(read: Reader, tasks: Sequence[int]) -> int:
    """The offset of ``void *stack`` in ``struct task_struct``, from a few real tasks.

    *tasks*: addresses of at least two task_structs (``init_task``, PID 1,
    PID 2, ...).  The one offset in the first :data:`STACK_SCAN` bytes where
    every task holds a distinct THREAD_SIZE-aligned kernel pointer to a word
    ``STACK_END_MAGIC``; SymbolError if none or several.
    """
    if len(tasks) < 2:
        raise SymbolError("need at least two tasks to find task_struct.stack")
    found = []
    for off in range(0, STACK_SCAN, 8):
        stacks = []
        for t in tasks:
            s = _stack_of(read, t, off)
            if s is None:
                break
            stacks.append(s)
        if len(stacks) == len(tasks) and len(set(stacks)) == len(stacks):
            found.append(off)
    if len(found) != 1:
        raise SymbolError(f"task_struct.stack: {len(found)} offsets in the first {STACK_SCAN} bytes "
                          f"({[hex(o) for o in found[:8]]}) point to a THREAD_SIZE-aligned stack "
                          "ending in STACK_END_MAGIC in every task: not the kernel we know")
    return found[0]


def task_stack_top(read: Reader, task: int, stack_offset: int) -> int:
    """``task->stack + THREAD_SIZE``: the top of the task's kernel stack (pt_regs just below it)."""
    stack = _stack_of(read, task, stack_offset)
    if stack is None:
        raise SymbolError(f"task at {task:#x} has no kernel stack at +{stack_offset:#x} (a task that "
                          "exited, or not a task_struct)")
    return stack + THREAD_SIZE
