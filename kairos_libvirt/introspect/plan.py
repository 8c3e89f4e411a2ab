"""The trap plan: which guest-kernel entry points reveal real-time behaviour,
and how to turn a hit into a guest event.  Shared by every backend (gdbstub,
kvm-ud): a backend only delivers ``Hit``s (site, vCPU, registers, a reader).

Every x86-64 syscall wrapper ``__x64_sys_*(const struct pt_regs *regs)``
starts with a 5-byte ``call __fentry__`` that ftrace turns into the NOP
``0f 1f 44 00 00`` (DESIGN.md §2): that NOP is the trap site, and a backend
resumes at site + 5 without executing anything of the guest's.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Mapping, Optional, Tuple

from . import decode
from .decode import DecodeError, Reader, SchedRequest, SleepRequest

#: x86-64 ``THREAD_SIZE`` (16 KiB; Debian kernels have no KASAN) and
#: ``sizeof(struct pt_regs)``: task_pt_regs() = stack top - sizeof(pt_regs).
THREAD_SIZE = 16 * 1024
PT_REGS_SIZE = 21 * 8


@dataclass(frozen=True)
class TrapSite:
    """One guest-kernel function to trap.

    ``kind`` selects the decoder; ``required`` sites must be found, optional
    ones (a kernel may lack them) are skipped with a note.
    """

    kind: str
    symbols: Tuple[str, ...]
    required: bool = True
    #: Bounded guest-memory fetches a kernel-side backend does at the trap
    #: (offset from a register, length, follow-pointer): DESIGN.md §3.
    fetch: Tuple[Tuple[str, int, int], ...] = ()


PLAN: Tuple[TrapSite, ...] = (
    TrapSite("sched_setattr", ("__x64_sys_sched_setattr",),
             fetch=(("rdi", 0x68, 8), ("*", 0, 56))),
    TrapSite("sched_setscheduler", ("__x64_sys_sched_setscheduler",),
             fetch=(("rdi", 0x60, 8), ("*", 0, 4))),
    TrapSite("sched_setparam", ("__x64_sys_sched_setparam",),
             fetch=(("rdi", 0x68, 8), ("*", 0, 4))),
    TrapSite("clock_nanosleep", ("__x64_sys_clock_nanosleep",),
             fetch=(("rdi", 0x60, 8), ("*", 0, 16))),
    TrapSite("nanosleep", ("__x64_sys_nanosleep",), required=False,
             fetch=(("rdi", 0x70, 8), ("*", 0, 16))),
    TrapSite("exit", ("do_exit",), required=False),
)


@dataclass(frozen=True)
class Hit:
    """A trap as a backend saw it."""

    kind: str
    vcpu: int
    regs: Mapping[str, int]      # rip, rsp, rdi, … (names as in the RSP register table)
    time_ns: int                 # host CLOCK_MONOTONIC at the trap
    tid: Optional[int] = None    # calling guest task, when the backend can tell
    comm: Optional[str] = None
    #: Cumulative time introspection stopped the VM before this hit (None:
    #: unknown).  The task model tells from it whether a gap spans a stop.
    stopped_ns: Optional[int] = None


@dataclass(frozen=True)
class GuestEvent:
    """What a hit means for the task model."""

    kind: str                    # sched | sleep | exit
    task_key: str                # stable per guest task: its pt_regs address
    vcpu: int
    time_ns: int
    tid: Optional[int] = None
    comm: Optional[str] = None
    target_pid: int = 0          # sched_*: 0 = the caller itself
    sched: Optional[SchedRequest] = None
    sleep: Optional[SleepRequest] = None
    stopped_ns: Optional[int] = None  # from the Hit
    #: Sleep targets read from memory (not trapped): host ns between the last read
    #: that saw the previous target pending and this one.  A gap is one step of the
    #: task only if no target hid between those reads (see tasks.py).
    spacing_ns: Optional[int] = None


def task_key_from_rsp(rsp: int) -> str:
    """The task's pt_regs address from any kernel stack pointer of it."""
    top = (rsp | (THREAD_SIZE - 1)) + 1
    return f"{top - PT_REGS_SIZE:#x}"


def decode_hit(hit: Hit, read: Reader) -> GuestEvent:
    """Turn a hit into an event; every guest value is hostile (DecodeError)."""
    ev = _decode(hit, read)
    return replace(ev, stopped_ns=hit.stopped_ns) if hit.stopped_ns is not None else ev


def _decode(hit: Hit, read: Reader) -> GuestEvent:
    regs = hit.regs
    if hit.kind == "exit":
        return GuestEvent("exit", task_key_from_rsp(regs["rsp"]), hit.vcpu, hit.time_ns,
                          hit.tid, hit.comm)
    # __x64_sys_*(const struct pt_regs *regs): rdi is the user context on the task's stack.
    ptregs_addr = regs["rdi"]
    key = f"{ptregs_addr:#x}"
    if task_key_from_rsp(regs["rsp"]) != key:
        raise DecodeError(hit.kind, f"rdi {ptregs_addr:#x} is not this task's pt_regs "
                          f"(stack says {task_key_from_rsp(regs['rsp'])})")
    user = decode.read_pt_regs(ptregs_addr, read)
    if hit.kind == "sched_setattr":
        pid, req = decode.decode_sched_setattr(user, read)
        return GuestEvent("sched", key, hit.vcpu, hit.time_ns, hit.tid, hit.comm, pid, req)
    if hit.kind == "sched_setscheduler":
        pid, req = decode.decode_sched_setscheduler(user, read)
        return GuestEvent("sched", key, hit.vcpu, hit.time_ns, hit.tid, hit.comm, pid, req)
    if hit.kind == "sched_setparam":
        pid, req = decode.decode_sched_setparam(user, read)
        return GuestEvent("sched", key, hit.vcpu, hit.time_ns, hit.tid, hit.comm, pid, req)
    if hit.kind == "clock_nanosleep":
        sleep = decode.decode_clock_nanosleep(user, read)
        return GuestEvent("sleep", key, hit.vcpu, hit.time_ns, hit.tid, hit.comm, sleep=sleep)
    if hit.kind == "nanosleep":
        sleep = decode.decode_nanosleep(user, read)
        return GuestEvent("sleep", key, hit.vcpu, hit.time_ns, hit.tid, hit.comm, sleep=sleep)
    raise AssertionError(f"programming error: no decoder for trap kind {hit.kind!r}")


@dataclass
class ResolvedPlan:
    """Trap sites at their runtime addresses (site = the fentry NOP)."""

    sites: Dict[int, TrapSite] = field(default_factory=dict)
    skipped: List[str] = field(default_factory=list)

    def kind_at(self, addr: int) -> Optional[str]:
        s = self.sites.get(addr)
        return s.kind if s else None


def resolve_plan(resolve: Callable[[str], int], fentry: Callable[[int], int],
                 plan: Tuple[TrapSite, ...] = PLAN) -> ResolvedPlan:
    """Find each site's fentry NOP; refuse required sites that do not match.

    ``resolve(name)`` gives a runtime address (raises KairosError if unknown),
    ``fentry(addr)`` the verified NOP address (raises if the bytes differ).
    """
    from ..errors import KairosError
    out = ResolvedPlan()
    for site in plan:
        last: Optional[Exception] = None
        for name in site.symbols:
            try:
                out.sites[fentry(resolve(name))] = site
                last = None
                break
            except KairosError as exc:
                last = exc
        if last is not None:
            if site.required:
                raise last
            out.skipped.append(f"{site.kind}: {last}")
    return out
