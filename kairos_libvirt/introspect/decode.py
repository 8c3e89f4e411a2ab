"""Decoders for guest-kernel values seen at a trap: ``struct pt_regs``,
``struct sched_attr``, ``struct sched_param``, ``struct __kernel_timespec``.

Every guest value is hostile.  Each function takes the bytes it was given
(and, where a pointer has to be followed, a ``read(addr, n) -> bytes``
callback for guest-virtual memory), bounds every read, and raises
:class:`DecodeError` with the reason instead of guessing.  Nothing is
clamped: a request the guest kernel would refuse (``EINVAL``, ``E2BIG``,
``EFAULT``) is refused here too, with the kernel's reason, so the agent never
models a change that did not happen.  The rules follow Linux 6.1
(``kernel/sched/core.c``: ``sched_copy_attr()``, ``__sched_setscheduler()``;
``kernel/sched/deadline.c``: ``__checkparam_dl()``); x86_64 only.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Optional, Tuple

from kairos_libvirt.errors import KairosError

__all__ = [
    "DecodeError", "Reader", "SchedRequest", "Timespec", "SleepRequest",
    "SCHED_OTHER", "SCHED_FIFO", "SCHED_RR", "SCHED_BATCH", "SCHED_IDLE", "SCHED_DEADLINE",
    "SCHED_RESET_ON_FORK", "SCHED_FLAG_RESET_ON_FORK", "SCHED_FLAG_RECLAIM",
    "SCHED_FLAG_DL_OVERRUN", "SCHED_FLAG_KEEP_POLICY", "SCHED_FLAG_KEEP_PARAMS",
    "SCHED_FLAG_UTIL_CLAMP_MIN", "SCHED_FLAG_UTIL_CLAMP_MAX", "SCHED_FLAG_ALL",
    "SCHED_ATTR_SIZE_VER0", "SCHED_ATTR_SIZE_VER1", "SCHED_ATTR_SIZE_MAX",
    "POLICY_NAMES", "POLICY_NUMBERS",
    "PT_REGS_OFFSETS", "PT_REGS_SIZE", "USER_ADDR_LIMIT", "MAX_READ",
    "parse_pt_regs", "read_pt_regs", "syscall_args",
    "parse_sched_attr", "decode_sched_attr", "parse_sched_param", "decode_sched_param",
    "sched_request_from_setscheduler",
    "parse_timespec", "decode_timespec",
    "decode_sched_setattr", "decode_sched_setscheduler", "decode_sched_setparam",
    "decode_clock_nanosleep", "decode_nanosleep",
]

#: ``read(addr, n)``: n bytes of guest-virtual memory at addr, or raise.
Reader = Callable[[int, int], bytes]

# include/uapi/linux/sched.h
SCHED_OTHER = 0
SCHED_FIFO = 1
SCHED_RR = 2
SCHED_BATCH = 3
SCHED_IDLE = 5
SCHED_DEADLINE = 6
#: Or-ed into the policy of sched_setscheduler().
SCHED_RESET_ON_FORK = 0x40000000
SCHED_FLAG_RESET_ON_FORK = 0x01
SCHED_FLAG_RECLAIM = 0x02
SCHED_FLAG_DL_OVERRUN = 0x04
SCHED_FLAG_KEEP_POLICY = 0x08
SCHED_FLAG_KEEP_PARAMS = 0x10
SCHED_FLAG_UTIL_CLAMP_MIN = 0x20
SCHED_FLAG_UTIL_CLAMP_MAX = 0x40
SCHED_FLAG_ALL = 0x7F
#: uapi ``struct sched_attr`` sizes: VER0 without, VER1 with the util clamps.
SCHED_ATTR_SIZE_VER0 = 48
SCHED_ATTR_SIZE_VER1 = 56
#: sched_copy_attr() refuses a size above PAGE_SIZE with E2BIG.
SCHED_ATTR_SIZE_MAX = 4096

POLICY_NAMES: Dict[int, str] = {
    SCHED_OTHER: "other", SCHED_FIFO: "fifo", SCHED_RR: "rr",
    SCHED_BATCH: "batch", SCHED_IDLE: "idle", SCHED_DEADLINE: "deadline",
}
POLICY_NUMBERS: Dict[str, int] = {v: k for k, v in POLICY_NAMES.items()}

_MAX_RT_PRIO = 100
#: DL_SCALE in kernel/sched/sched.h: runtimes below 2**10 ns are refused.
_DL_MIN_RUNTIME = 1 << 10
_DL_MSB = 1 << 63
#: SCHED_CAPACITY_SCALE: util clamps are 0..1024 (or -1, "reset").
_UCLAMP_MAX = 1024
_NSEC_PER_SEC = 1_000_000_000

#: x86_64 ``struct pt_regs`` (arch/x86/include/asm/ptrace.h), byte offsets.
PT_REGS_OFFSETS: Dict[str, int] = {
    "r15": 0x00, "r14": 0x08, "r13": 0x10, "r12": 0x18, "bp": 0x20, "bx": 0x28,
    "r11": 0x30, "r10": 0x38, "r9": 0x40, "r8": 0x48, "ax": 0x50, "cx": 0x58,
    "dx": 0x60, "si": 0x68, "di": 0x70, "orig_ax": 0x78, "ip": 0x80, "cs": 0x88,
    "flags": 0x90, "sp": 0x98, "ss": 0xA0,
}
PT_REGS_SIZE = 0xA8
#: x86_64 syscall arguments in pt_regs: di, si, dx, r10 (not cx), r8, r9.
_SYSCALL_ARG_REGS = ("di", "si", "dx", "r10", "r8", "r9")
#: TASK_SIZE_MAX with 4-level paging: copy_from_user() fails with EFAULT at or
#: above it.  Pass ``user_limit=(1 << 56) - 4096`` for a guest with LA57.
USER_ADDR_LIMIT = (1 << 47) - 4096
#: No decoder asks the reader for more than this at once.
MAX_READ = 4096


class DecodeError(KairosError):
    """A guest value that cannot be decoded, or that the guest kernel would refuse.

    ``addr`` is the guest address involved (if any) and ``raw`` the bytes
    that were decoded (if any).
    """

    def __init__(self, what: str, why: str, *, addr: Optional[int] = None,
                 raw: Optional[bytes] = None) -> None:
        self.what = what
        self.why = why
        self.addr = addr
        self.raw = raw
        where = f" at {addr:#x}" if addr is not None else ""
        super().__init__(f"cannot decode {what}{where}: {why}")


# -- bounded guest reads -----------------------------------------------------

def _read(read: Reader, what: str, addr: int, n: int, *, user_limit: Optional[int]) -> bytes:
    """Follow a guest pointer: checks NULL, range and the reader's answer."""
    assert 0 < n <= MAX_READ
    if addr == 0:
        raise DecodeError(what, "NULL pointer (the guest kernel answers EFAULT or EINVAL)", addr=0)
    limit = (1 << 64) if user_limit is None else user_limit
    if addr < 0 or addr + n > limit:
        why = ("pointer is not a user-space address (the guest kernel answers EFAULT)"
               if user_limit is not None else "pointer wraps around the address space")
        raise DecodeError(what, why, addr=addr)
    try:
        data = read(addr, n)
    except (KairosError, OSError) as exc:
        raise DecodeError(what, f"guest memory unreadable ({exc})", addr=addr) from exc
    if not isinstance(data, (bytes, bytearray)) or len(data) != n:
        got = len(data) if isinstance(data, (bytes, bytearray)) else type(data).__name__
        raise DecodeError(what, f"short read: asked for {n} bytes, got {got}", addr=addr)
    return bytes(data)


def _need(what: str, data: bytes, n: int) -> None:
    if len(data) < n:
        raise DecodeError(what, f"need {n} bytes, got {len(data)}", raw=bytes(data))


def _s32(value: int) -> int:
    """A C ``int`` argument from a 64-bit register: the low 32 bits, signed."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value


# -- struct pt_regs ----------------------------------------------------------

def parse_pt_regs(data: bytes) -> Dict[str, int]:
    """x86_64 ``struct pt_regs`` (168 bytes) -> field name -> unsigned value."""
    _need("struct pt_regs", data, PT_REGS_SIZE)
    return {name: struct.unpack_from("<Q", data, off)[0] for name, off in PT_REGS_OFFSETS.items()}


def read_pt_regs(addr: int, read: Reader) -> Dict[str, int]:
    """Follow the ``const struct pt_regs *regs`` of ``__x64_sys_*`` (in rdi at entry).

    It lives on the guest kernel stack, so no user-space limit applies.
    """
    if addr % 8:
        raise DecodeError("struct pt_regs", "pointer is not 8-byte aligned", addr=addr)
    return parse_pt_regs(_read(read, "struct pt_regs", addr, PT_REGS_SIZE, user_limit=None))


def syscall_args(regs: Mapping[str, int]) -> Tuple[int, ...]:
    """The six syscall arguments (di, si, dx, r10, r8, r9) from parsed pt_regs."""
    return tuple(regs[name] for name in _SYSCALL_ARG_REGS)


# -- scheduling requests ---------------------------------------------------------

@dataclass(frozen=True)
class SchedRequest:
    """A scheduling change a guest task asked for, validated as the kernel would.

    ``policy`` is one of deadline|fifo|rr|other|batch|idle, or ``None`` when
    the call keeps the current policy (sched_setparam(), or sched_setattr()
    with ``SCHED_FLAG_KEEP_POLICY``).  With ``SCHED_FLAG_KEEP_PARAMS`` the
    kernel ignores the parameters given, so they are reported as 0.  The DL
    parameters are 0 for policies other than deadline (the kernel ignores
    them); with policy ``None`` they are kept as given, for the consumer to
    check against the task's current policy.  ``period_ns`` is the effective period: the kernel uses the
    deadline when the period given is 0.  ``nice`` is the raw value: the
    kernel clamps it to -20..19, we leave that to the consumer.
    """

    policy: Optional[str]
    priority: int = 0
    runtime_ns: int = 0
    deadline_ns: int = 0
    period_ns: int = 0
    flags: int = 0
    nice: int = 0
    util_min: Optional[int] = None
    util_max: Optional[int] = None

    def __post_init__(self) -> None:
        def bad(why: str) -> DecodeError:
            return DecodeError("scheduling request", why)

        if self.policy is not None and self.policy not in POLICY_NUMBERS:
            raise bad(f"unknown policy {self.policy!r}")
        if self.flags & ~SCHED_FLAG_ALL:
            raise bad(f"unknown sched_flags bits {self.flags & ~SCHED_FLAG_ALL:#x} (EINVAL)")
        for name in ("util_min", "util_max"):
            value = getattr(self, name)
            if value is not None and not -1 <= value <= _UCLAMP_MAX:
                raise bad(f"{name} {value} is outside 0..{_UCLAMP_MAX} (EINVAL)")
        if (self.util_min is not None and self.util_max is not None
                and self.util_min >= 0 and self.util_max >= 0 and self.util_min > self.util_max):
            raise bad(f"util_min {self.util_min} > util_max {self.util_max} (EINVAL)")
        if self.keep_params:
            if self.priority or self.runtime_ns or self.deadline_ns or self.period_ns:
                raise bad("parameters given although SCHED_FLAG_KEEP_PARAMS keeps the current ones")
            return
        if not 0 <= self.priority < _MAX_RT_PRIO:
            raise bad(f"priority {self.priority} is outside 0..{_MAX_RT_PRIO - 1} (EINVAL)")
        if self.policy in ("fifo", "rr"):
            if self.priority == 0:
                raise bad(f"SCHED_{self.policy.upper()} needs a priority in 1..99 (EINVAL)")
        elif self.policy is not None and self.priority != 0:
            raise bad(f"SCHED_{self.policy.upper()} takes priority 0, got {self.priority} (EINVAL)")
        if self.policy == "deadline":
            self._check_dl()
        elif self.policy is not None and (self.runtime_ns or self.deadline_ns or self.period_ns):
            raise bad("runtime/deadline/period only apply to SCHED_DEADLINE")

    def _check_dl(self) -> None:
        def bad(why: str) -> DecodeError:
            return DecodeError("SCHED_DEADLINE parameters", why + " (__checkparam_dl: EINVAL)")

        if self.deadline_ns <= 0:
            raise bad("deadline is 0")
        if self.runtime_ns < _DL_MIN_RUNTIME:
            raise bad(f"runtime {self.runtime_ns} ns is below {_DL_MIN_RUNTIME} ns")
        if self.deadline_ns >= _DL_MSB or self.period_ns >= _DL_MSB:
            raise bad("deadline or period has bit 63 set")
        if self.runtime_ns > self.deadline_ns:
            raise bad(f"runtime {self.runtime_ns} ns > deadline {self.deadline_ns} ns")
        if self.deadline_ns > self.period_ns:
            raise bad(f"deadline {self.deadline_ns} ns > period {self.period_ns} ns")

    @property
    def keep_policy(self) -> bool:
        return self.policy is None

    @property
    def keep_params(self) -> bool:
        return bool(self.flags & SCHED_FLAG_KEEP_PARAMS)

    @property
    def reset_on_fork(self) -> bool:
        return bool(self.flags & SCHED_FLAG_RESET_ON_FORK)

    @property
    def realtime(self) -> bool:
        """deadline, fifo or rr: the policies the host has to reserve for."""
        return self.policy in ("deadline", "fifo", "rr")


_SCHED_ATTR = struct.Struct("<IIQiIQQQ")      # VER0: 48 bytes
_UTIL = struct.Struct("<II")                   # VER1 adds util_min, util_max


def parse_sched_attr(data: bytes) -> SchedRequest:
    """Decode uapi ``struct sched_attr`` from the bytes at the user pointer::

        struct sched_attr {
            __u32 size; __u32 sched_policy; __u64 sched_flags;
            __s32 sched_nice; __u32 sched_priority;
            __u64 sched_runtime; __u64 sched_deadline; __u64 sched_period;
            __u32 sched_util_min; __u32 sched_util_max;   /* VER1, size 56 */
        };

    ``size`` 0 means VER0 (an ABI quirk of sched_copy_attr()); sizes below
    48 or above 4096 are E2BIG.  Bytes past the fields we know must be zero
    (E2BIG otherwise); those present in ``data`` are checked, use
    :func:`decode_sched_attr` to read them all.
    """
    what = "struct sched_attr"
    _need(what, data, SCHED_ATTR_SIZE_VER0)
    (size, policy, flags, nice, priority, runtime, deadline, period) = _SCHED_ATTR.unpack_from(data)
    raw = bytes(data[:max(SCHED_ATTR_SIZE_VER0, min(len(data), size))])
    if size == 0:
        size = SCHED_ATTR_SIZE_VER0
    if not SCHED_ATTR_SIZE_VER0 <= size <= SCHED_ATTR_SIZE_MAX:
        raise DecodeError(what, f"size {size} is outside {SCHED_ATTR_SIZE_VER0}.."
                          f"{SCHED_ATTR_SIZE_MAX} (E2BIG)", raw=raw)
    util_min = util_max = None
    if size >= SCHED_ATTR_SIZE_VER1:
        _need(what, data, SCHED_ATTR_SIZE_VER1)
        umin, umax = _UTIL.unpack_from(data, SCHED_ATTR_SIZE_VER0)
        util_min = -1 if umin == 0xFFFFFFFF else umin
        util_max = -1 if umax == 0xFFFFFFFF else umax
        tail = data[SCHED_ATTR_SIZE_VER1:size]
        if any(tail):
            raise DecodeError(what, "non-zero bytes past the known fields (E2BIG)", raw=raw)
    elif flags & (SCHED_FLAG_UTIL_CLAMP_MIN | SCHED_FLAG_UTIL_CLAMP_MAX):
        raise DecodeError(what, f"util clamp flags with size {size} < "
                          f"{SCHED_ATTR_SIZE_VER1} (EINVAL)", raw=raw)
    if policy >= 0x80000000:
        raise DecodeError(what, f"negative policy {policy - (1 << 32)} (EINVAL)", raw=raw)
    keep_policy = bool(flags & SCHED_FLAG_KEEP_POLICY)
    if not keep_policy and policy not in POLICY_NAMES:
        raise DecodeError(what, f"unknown policy {policy} (EINVAL)", raw=raw)
    name = None if keep_policy else POLICY_NAMES[policy]
    if not flags & SCHED_FLAG_UTIL_CLAMP_MIN:
        util_min = None
    if not flags & SCHED_FLAG_UTIL_CLAMP_MAX:
        util_max = None
    try:
        if flags & SCHED_FLAG_KEEP_PARAMS:
            return SchedRequest(name, flags=flags, util_min=util_min, util_max=util_max)
        if name not in ("deadline", None):
            runtime = deadline = period = 0
        elif period == 0:
            period = deadline
        return SchedRequest(name, priority, runtime, deadline, period, flags, nice,
                            util_min, util_max)
    except DecodeError as exc:
        raise DecodeError(what, exc.why, raw=raw) from None


def decode_sched_attr(addr: int, read: Reader, *,
                      user_limit: Optional[int] = USER_ADDR_LIMIT) -> SchedRequest:
    """Follow ``struct sched_attr __user *uattr``: 48 bytes, then what ``size`` says.

    Sizes above 48 take one more read of ``size - 48`` bytes (at most 4048):
    the util clamps and the tail that must be zero.
    """
    what = "struct sched_attr"
    head = _read(read, what, addr, SCHED_ATTR_SIZE_VER0, user_limit=user_limit)
    size = struct.unpack_from("<I", head)[0] or SCHED_ATTR_SIZE_VER0
    if not SCHED_ATTR_SIZE_VER0 <= size <= SCHED_ATTR_SIZE_MAX:
        return parse_sched_attr(head)  # raises with the reason
    data = head
    if size > SCHED_ATTR_SIZE_VER0:
        data += _read(read, what, addr + SCHED_ATTR_SIZE_VER0, size - SCHED_ATTR_SIZE_VER0,
                      user_limit=user_limit)
    return parse_sched_attr(data)


def parse_sched_param(data: bytes) -> int:
    """``struct sched_param { int sched_priority; }`` -> the priority (0..99)."""
    _need("struct sched_param", data, 4)
    priority: int = struct.unpack_from("<i", data)[0]
    if not 0 <= priority < _MAX_RT_PRIO:
        raise DecodeError("struct sched_param", f"priority {priority} is outside 0..99 (EINVAL)",
                          raw=bytes(data[:4]))
    return priority


def decode_sched_param(addr: int, read: Reader, *,
                       user_limit: Optional[int] = USER_ADDR_LIMIT) -> int:
    """Follow ``struct sched_param __user *param`` (sched_setscheduler/sched_setparam)."""
    return parse_sched_param(_read(read, "struct sched_param", addr, 4, user_limit=user_limit))


def sched_request_from_setscheduler(policy: int, priority: int) -> SchedRequest:
    """sched_setscheduler(pid, policy, param): policy may carry SCHED_RESET_ON_FORK.

    SCHED_DEADLINE cannot be set this way (the kernel has no DL parameters
    to take): EINVAL.
    """
    flags = 0
    if policy >= 0 and policy & SCHED_RESET_ON_FORK:
        flags = SCHED_FLAG_RESET_ON_FORK
        policy &= ~SCHED_RESET_ON_FORK
    if policy not in POLICY_NAMES or policy == SCHED_DEADLINE:
        raise DecodeError("sched_setscheduler policy", f"policy {policy} is not accepted (EINVAL)")
    return SchedRequest(POLICY_NAMES[policy], priority, flags=flags)


# -- time ------------------------------------------------------------------------

@dataclass(frozen=True)
class Timespec:
    """``struct __kernel_timespec { __s64 tv_sec; long long tv_nsec; }`` (16 bytes)."""

    sec: int
    nsec: int

    @property
    def ns(self) -> int:
        return self.sec * _NSEC_PER_SEC + self.nsec


_TIMESPEC = struct.Struct("<qq")


def parse_timespec(data: bytes) -> Timespec:
    """Decode and validate as timespec64_valid() does for nanosleep: sec >= 0, 0 <= nsec < 1e9."""
    what = "struct __kernel_timespec"
    _need(what, data, _TIMESPEC.size)
    sec, nsec = _TIMESPEC.unpack_from(data)
    raw = bytes(data[:_TIMESPEC.size])
    if sec < 0:
        raise DecodeError(what, f"tv_sec {sec} is negative (EINVAL)", raw=raw)
    if not 0 <= nsec < _NSEC_PER_SEC:
        raise DecodeError(what, f"tv_nsec {nsec} is outside 0..999999999 (EINVAL)", raw=raw)
    return Timespec(sec, nsec)


def decode_timespec(addr: int, read: Reader, *,
                    user_limit: Optional[int] = USER_ADDR_LIMIT) -> Timespec:
    return parse_timespec(_read(read, "struct __kernel_timespec", addr, _TIMESPEC.size,
                                user_limit=user_limit))


@dataclass(frozen=True)
class SleepRequest:
    """clock_nanosleep()/nanosleep(): which clock, absolute or relative, until when."""

    clock_id: int
    absolute: bool
    time: Timespec


# TIMER_ABSTIME and the clocks clock_nanosleep() accepts (CLOCK_THREAD_CPUTIME_ID: EINVAL).
_TIMER_ABSTIME = 1
_SLEEP_CLOCKS = {0: "CLOCK_REALTIME", 1: "CLOCK_MONOTONIC", 2: "CLOCK_PROCESS_CPUTIME_ID",
                 7: "CLOCK_BOOTTIME", 8: "CLOCK_REALTIME_ALARM", 9: "CLOCK_BOOTTIME_ALARM",
                 11: "CLOCK_TAI"}


# -- whole syscalls from pt_regs -----------------------------------------------

def _pid(value: int, syscall: str) -> int:
    pid = _s32(value)
    if pid < 0:
        raise DecodeError(syscall, f"pid {pid} is negative (EINVAL)")
    return pid


def decode_sched_setattr(regs: Mapping[str, int], read: Reader, *,
                         user_limit: Optional[int] = USER_ADDR_LIMIT) -> Tuple[int, SchedRequest]:
    """``sched_setattr(pid_t pid, struct sched_attr __user *uattr, unsigned int flags)``.

    Returns (pid, request); pid 0 is the calling thread.
    """
    pid_arg, uattr, flags = syscall_args(regs)[:3]
    pid = _pid(pid_arg, "sched_setattr")
    if flags & 0xFFFFFFFF:
        raise DecodeError("sched_setattr", f"flags argument {flags & 0xFFFFFFFF:#x} is not 0 (EINVAL)")
    return pid, decode_sched_attr(uattr, read, user_limit=user_limit)


def decode_sched_setscheduler(regs: Mapping[str, int], read: Reader, *,
                              user_limit: Optional[int] = USER_ADDR_LIMIT
                              ) -> Tuple[int, SchedRequest]:
    """``sched_setscheduler(pid_t pid, int policy, struct sched_param __user *param)``."""
    pid_arg, policy, param = syscall_args(regs)[:3]
    pid = _pid(pid_arg, "sched_setscheduler")
    policy = _s32(policy)
    if policy < 0:
        raise DecodeError("sched_setscheduler", f"policy {policy} is negative (EINVAL)")
    return pid, sched_request_from_setscheduler(policy, decode_sched_param(param, read, user_limit=user_limit))


def decode_sched_setparam(regs: Mapping[str, int], read: Reader, *,
                          user_limit: Optional[int] = USER_ADDR_LIMIT) -> Tuple[int, SchedRequest]:
    """``sched_setparam(pid_t pid, struct sched_param __user *param)``: policy unchanged."""
    pid_arg, param = syscall_args(regs)[:2]
    pid = _pid(pid_arg, "sched_setparam")
    return pid, SchedRequest(None, decode_sched_param(param, read, user_limit=user_limit))


def decode_clock_nanosleep(regs: Mapping[str, int], read: Reader, *,
                           user_limit: Optional[int] = USER_ADDR_LIMIT) -> SleepRequest:
    """``clock_nanosleep(clockid_t, int flags, const struct __kernel_timespec __user *rqtp, rmtp)``."""
    clock_arg, flags, rqtp = syscall_args(regs)[:3]
    clock_id = _s32(clock_arg)
    if clock_id not in _SLEEP_CLOCKS:
        raise DecodeError("clock_nanosleep", f"clock {clock_id} is not one this decoder models "
                          "(the kernel refuses most others with EINVAL or EOPNOTSUPP; "
                          "CPU-time clocks of other processes are left out)")
    return SleepRequest(clock_id, bool(_s32(flags) & _TIMER_ABSTIME), decode_timespec(rqtp, read, user_limit=user_limit))


def decode_nanosleep(regs: Mapping[str, int], read: Reader, *,
                     user_limit: Optional[int] = USER_ADDR_LIMIT) -> SleepRequest:
    """``nanosleep(const struct __kernel_timespec __user *rqtp, rmtp)``: relative, CLOCK_MONOTONIC."""
    return SleepRequest(1, False, decode_timespec(syscall_args(regs)[0], read, user_limit=user_limit))
