"""The ``kvm-ud`` backend, low level: the uAPI of ``kmod/kairos_ud.h`` from Python.

What the patched KVM offers (see ``kmod/kairos_ud.h`` and ``kmod/README.md``):
a per-VM table of guest-kernel trap sites (5-byte fentry NOPs ``0f 1f 44 00 00``),
armed and disarmed by the kernel on a vCPU thread of the VM (one byte becomes
``0x0b``: UD2); a #UD at an armed site is recorded as a fixed-size 512-byte
event in a per-VM ring (mmap of an anon fd) plus an eventfd, the site is
skipped and the guest resumes without an exit to userspace.

This module mirrors the C structures (``ctypes`` for the ioctl arguments,
``struct`` for the ring), finds QEMU's VM file descriptor (the one whose
``/proc/PID/fd`` link reads ``anon_inode:kvm-vm``) and copies it with
``pidfd_open(2)`` + ``pidfd_getfd(2)`` (root, or ptrace rights over QEMU), and
decodes events into :class:`KvmUdEvent`.  It imports nothing from the rest of
the project but the exception tree: the nested testbed runs it inside the L1
guest with only the standard library.

Decoding what the guest handed over (``struct sched_attr`` and friends) is
:mod:`kairos_libvirt.introspect.decode`'s job; :meth:`KvmUdEvent.fetched`
returns the raw bytes of each fetch step for it.
"""
from __future__ import annotations

import ctypes
import errno as _errno
import fcntl
import mmap
import os
import platform
import select
import struct
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from kairos_libvirt.errors import KairosError

from .symbols import ENDBR64, FENTRY_NOP

__all__ = [
    "KvmUdError", "API_VERSION", "PARAM_PATH", "MAX_TRAPS", "MAX_FETCH", "DATA_MAX", "PEEK_MAX",
    "NOP5", "ARMED5", "ENDBR64", "BASE_PREV", "REGISTERS", "EVENT_SIZE", "RING_MAGIC",
    "OP_ARM", "OP_DISARM", "OP_PEEK", "KAIROS_UD_SETUP", "KAIROS_UD_SET_TRAPS", "KAIROS_UD_CTL",
    "Fetch", "Trap", "KvmUdEvent", "RingCounters", "SetupArgs", "TrapsArgs", "CtlArgs", "TrapStruct",
    "FetchStruct", "encode_traps", "decode_event", "parse_ring_header", "patched_kvm_loaded",
    "api_version", "find_vm_fds", "find_vm_fd", "pidfd_getfd", "open_vm_fd", "KvmUd",
    "sched_setattr_fetch", "RING_HEAD_OFFSET", "RING_TAIL_OFFSET", "RING_TRAP_HITS_OFFSET",
]


class KvmUdError(KairosError):
    """A kvm-ud operation failed: ``what`` failed, ``why``; ``errno`` when the kernel said so."""

    def __init__(self, what: str, why: str, errno: Optional[int] = None,
                 fix: Optional[str] = None) -> None:
        self.what, self.why, self.errno, self.fix = what, why, errno, fix
        msg = f"{what}: {why}"
        if fix:
            msg += f". Fix: {fix}"
        super().__init__(msg)


# -- constants of kmod/kairos_ud.h -------------------------------------------

API_VERSION = 2
PARAM_PATH = "/sys/module/kvm/parameters/kairos_ud"
MAX_TRAPS = 64
MAX_FETCH = 4
DATA_MAX = 384
PEEK_MAX = 64
SITE_LEN = 5
#: The kernel arms only a site holding the fentry NOP (after an optional
#: ENDBR64): the very bytes symbols.fentry_site checks before the agent arms.
NOP5 = FENTRY_NOP
ARMED5 = bytes((0x0F, 0x0B, 0x44, 0x00, 0x00))
BASE_PREV = 16
#: KVM's register numbering (``enum kvm_reg``), the ``base`` of a fetch step.
REGISTERS: Dict[str, int] = {
    "rax": 0, "rcx": 1, "rdx": 2, "rbx": 3, "rsp": 4, "rbp": 5, "rsi": 6, "rdi": 7,
    "r8": 8, "r9": 9, "r10": 10, "r11": 11, "r12": 12, "r13": 13, "r14": 14, "r15": 15,
}
OP_ARM, OP_DISARM, OP_PEEK = 1, 2, 3
RING_MAGIC = 0x3144554B
EVENT_SIZE = 512
EV_FETCH_FAULT = 0x1
DEFAULT_TIMEOUT_MS = 2000

KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    # include/uapi/asm-generic/ioctl.h: dir << 30 | size << 16 | type << 8 | nr
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


_IOC_WRITE, _IOC_READ = 1, 2


# -- ioctl argument structures (ctypes, layout checked below) -----------------

class FetchStruct(ctypes.Structure):
    """``struct kairos_ud_fetch``"""
    _fields_ = [("base", ctypes.c_uint8), ("flags", ctypes.c_uint8),
                ("len", ctypes.c_uint16), ("offset", ctypes.c_int32)]


class TrapStruct(ctypes.Structure):
    """``struct kairos_ud_trap``"""
    _fields_ = [("gva", ctypes.c_uint64), ("id", ctypes.c_uint32), ("nfetch", ctypes.c_uint32),
                ("fetch", FetchStruct * MAX_FETCH)]


class SetupArgs(ctypes.Structure):
    """``struct kairos_ud_setup``"""
    _fields_ = [("eventfd", ctypes.c_int32), ("nr_events", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("ring_fd", ctypes.c_int32),
                ("ring_size", ctypes.c_uint64), ("api_version", ctypes.c_uint32),
                ("pad", ctypes.c_uint32)]


class TrapsArgs(ctypes.Structure):
    """``struct kairos_ud_traps``"""
    _fields_ = [("nr", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("rate", ctypes.c_uint32),
                ("burst", ctypes.c_uint32), ("traps", ctypes.c_uint64)]


class CtlArgs(ctypes.Structure):
    """``struct kairos_ud_ctl``"""
    _fields_ = [("op", ctypes.c_uint32), ("index", ctypes.c_uint32), ("gva", ctypes.c_uint64),
                ("len", ctypes.c_uint32), ("vcpu", ctypes.c_uint32),
                ("timeout_ms", ctypes.c_uint32), ("result", ctypes.c_int32),
                ("gpa", ctypes.c_uint64), ("bytes", ctypes.c_uint8 * PEEK_MAX)]


assert ctypes.sizeof(FetchStruct) == 8
assert ctypes.sizeof(TrapStruct) == 48
assert ctypes.sizeof(SetupArgs) == 32
assert ctypes.sizeof(TrapsArgs) == 24
assert ctypes.sizeof(CtlArgs) == 104

KAIROS_UD_SETUP = _ioc(_IOC_READ | _IOC_WRITE, 0xE8, ctypes.sizeof(SetupArgs))
KAIROS_UD_SET_TRAPS = _ioc(_IOC_WRITE, 0xE9, ctypes.sizeof(TrapsArgs))
KAIROS_UD_CTL = _ioc(_IOC_READ | _IOC_WRITE, 0xEA, ctypes.sizeof(CtlArgs))

# -- the ring (struct, little-endian x86_64) ----------------------------------

#: ``struct kairos_ud_ring`` up to armed_mask, then head at 72, tail at 128, trap_hits at 256.
_RING_HDR = struct.Struct("<IHHII7Q")
RING_HEAD_OFFSET = 72
RING_TAIL_OFFSET = 128
RING_TRAP_HITS_OFFSET = 256
_U64 = struct.Struct("<Q")
#: ``struct kairos_ud_event`` (512 bytes, API 2).
_EVENT = struct.Struct("<6Q8QIIHBBHH384s")
assert _RING_HDR.size == RING_HEAD_OFFSET
assert _EVENT.size == EVENT_SIZE


@dataclass(frozen=True)
class Fetch:
    """One fetch step: ``len`` bytes at ``base + offset``; ``base`` a register name or ``"prev"``
    (the u64 in the first 8 bytes the previous step copied)."""
    base: str
    offset: int
    len: int

    def encode(self) -> Tuple[int, int, int]:
        if self.base == "prev":
            b = BASE_PREV
        elif self.base in REGISTERS:
            b = REGISTERS[self.base]
        else:
            raise KvmUdError("fetch step", f"unknown base {self.base!r}",
                             fix=f"use one of {', '.join(REGISTERS)} or 'prev'")
        if not 1 <= self.len <= DATA_MAX:
            raise KvmUdError("fetch step", f"len {self.len} not in 1..{DATA_MAX}")
        if not -2**31 <= self.offset < 2**31:
            raise KvmUdError("fetch step", f"offset {self.offset:#x} does not fit in 32 bits")
        return b, self.len, self.offset


@dataclass(frozen=True)
class Trap:
    """A trap site: the guest-virtual address of a 5-byte fentry NOP, a cookie, a fetch list."""
    gva: int
    id: int = 0
    fetch: Tuple[Fetch, ...] = ()


def sched_setattr_fetch() -> Tuple[Fetch, ...]:
    """At ``__x64_sys_sched_setattr`` entry, ``rdi`` is ``struct pt_regs *``; ``si`` (the user
    pointer to ``struct sched_attr``) is at +0x68: copy that pointer, then 48 bytes
    (``SCHED_ATTR_SIZE_VER0``) at it."""
    return (Fetch("rdi", 0x68, 8), Fetch("prev", 0, 48))


def encode_traps(traps: Sequence[Trap]) -> "ctypes.Array[TrapStruct]":
    """The C array for KAIROS_UD_SET_TRAPS; refuses what the kernel would refuse."""
    if len(traps) > MAX_TRAPS:
        raise KvmUdError("trap table", f"{len(traps)} traps, at most {MAX_TRAPS}")
    arr = (TrapStruct * max(len(traps), 1))()
    seen = set()
    for i, t in enumerate(traps):
        if not 0 <= t.gva < 2**64:
            raise KvmUdError("trap table", f"trap {i}: address {t.gva:#x} out of range")
        if t.gva in seen:
            raise KvmUdError("trap table", f"trap {i}: address {t.gva:#x} twice")
        seen.add(t.gva)
        if len(t.fetch) > MAX_FETCH:
            raise KvmUdError("trap table", f"trap {i}: {len(t.fetch)} fetch steps, at most {MAX_FETCH}")
        total = 0
        arr[i].gva, arr[i].id, arr[i].nfetch = t.gva, t.id & 0xFFFFFFFF, len(t.fetch)
        for j, f in enumerate(t.fetch):
            base, n, off = f.encode()
            if base == BASE_PREV and (j == 0 or t.fetch[j - 1].len < 8):
                raise KvmUdError("trap table", f"trap {i} step {j}: 'prev' needs a previous step of 8+ bytes")
            total += n
            arr[i].fetch[j].base, arr[i].fetch[j].len, arr[i].fetch[j].offset = base, n, off
        if total > DATA_MAX:
            raise KvmUdError("trap table", f"trap {i}: fetch list copies {total} bytes, at most {DATA_MAX}")
    return arr


@dataclass(frozen=True)
class KvmUdEvent:
    """``struct kairos_ud_event``, decoded."""
    seq: int
    host_ns: int
    guest_tsc: int
    rip: int
    cr3: int
    rflags: int
    regs: Dict[str, int]
    vcpu: int
    trap_id: int
    trap_index: int
    cpl: int
    fetch_status: int
    flags: int
    data: bytes = field(repr=False)

    @property
    def fetch_ok(self) -> bool:
        return self.fetch_status == 0

    def fetched(self, steps: Sequence[Fetch]) -> List[bytes]:
        """``data`` cut into one bytes object per fetch step (as far as the fetch got)."""
        out, at = [], 0
        for s in steps:
            if at + s.len > len(self.data):
                break
            out.append(self.data[at:at + s.len])
            at += s.len
        return out


_EVENT_REGS = ("rdi", "rsi", "rdx", "r10", "r8", "r9", "rax", "rsp")


def decode_event(raw: bytes) -> KvmUdEvent:
    """Decode one 512-byte ring slot (data is cut to ``data_len``; a bogus length is an error)."""
    if len(raw) != EVENT_SIZE:
        raise KvmUdError("event", f"{len(raw)} bytes, expected {EVENT_SIZE}")
    v = _EVENT.unpack(raw)
    seq, host_ns, guest_tsc, rip, cr3, rflags = v[0:6]
    regs = dict(zip(_EVENT_REGS, v[6:14]))
    vcpu, trap_id, trap_index, cpl, fetch_status, data_len, flags, data = v[14:22]
    if data_len > DATA_MAX:
        raise KvmUdError("event", f"data_len {data_len} > {DATA_MAX}")
    return KvmUdEvent(seq=seq, host_ns=host_ns, guest_tsc=guest_tsc, rip=rip, cr3=cr3,
                      rflags=rflags, regs=regs, vcpu=vcpu, trap_id=trap_id, trap_index=trap_index,
                      cpl=cpl, fetch_status=fetch_status, flags=flags, data=bytes(data[:data_len]))


@dataclass(frozen=True)
class RingCounters:
    """The ring header's counters (written by the kernel)."""
    nr_events: int
    hits: int
    recorded: int
    rate_dropped: int
    overflow: int
    fetch_faults: int
    stale: int
    armed_mask: int
    head: int
    tail: int
    trap_hits: Tuple[int, ...]


def parse_ring_header(buf: bytes) -> Tuple[int, int, RingCounters]:
    """(event_size, data_offset, counters) from the first page of the ring; checks the magic."""
    if len(buf) < RING_TRAP_HITS_OFFSET + 8 * MAX_TRAPS:
        raise KvmUdError("ring", f"header of {len(buf)} bytes is too short")
    (magic, version, event_size, nr, data_offset, hits, recorded, rate_dropped, overflow,
     fetch_faults, stale, armed) = _RING_HDR.unpack_from(buf, 0)
    if magic != RING_MAGIC:
        raise KvmUdError("ring", f"bad magic {magic:#x}", fix="is the kvm module the kairos-patched one?")
    if version != API_VERSION or event_size != EVENT_SIZE:
        raise KvmUdError("ring", f"version {version} event size {event_size}, expected "
                         f"{API_VERSION}/{EVENT_SIZE}", fix="rebuild the module and this package together")
    if nr == 0 or nr & (nr - 1):
        raise KvmUdError("ring", f"nr_events {nr} is not a power of two")
    head = _U64.unpack_from(buf, RING_HEAD_OFFSET)[0]
    tail = _U64.unpack_from(buf, RING_TAIL_OFFSET)[0]
    trap_hits = struct.unpack_from(f"<{MAX_TRAPS}Q", buf, RING_TRAP_HITS_OFFSET)
    return event_size, data_offset, RingCounters(nr, hits, recorded, rate_dropped, overflow,
                                                 fetch_faults, stale, armed, head, tail, trap_hits)


# -- probes -------------------------------------------------------------------

def api_version(path: str = PARAM_PATH) -> Optional[int]:
    """The patched KVM's API version (``/sys/module/kvm/parameters/kairos_ud``), None if absent."""
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def patched_kvm_loaded(path: str = PARAM_PATH) -> bool:
    """Cheap probe for ``kairosvm check``: the loaded kvm module is the kairos-patched one
    with the API this package speaks."""
    return api_version(path) == API_VERSION


# -- getting QEMU's VM fd -----------------------------------------------------

_SYS_PIDFD_OPEN = {"x86_64": 434, "aarch64": 434}
_SYS_PIDFD_GETFD = {"x86_64": 438, "aarch64": 438}
_libc = None


def _syscall(nr_table: Dict[str, int], *args: int) -> int:
    global _libc
    machine = platform.machine()
    if machine not in nr_table:
        raise KvmUdError("syscall", f"no syscall number known for {machine}")
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.syscall.restype = ctypes.c_long
    r = _libc.syscall(ctypes.c_long(nr_table[machine]), *[ctypes.c_long(a) for a in args])
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r


def find_vm_fds(pid: int, proc: str = "/proc") -> List[int]:
    """Numbers of the fds of process ``pid`` that are KVM VMs (``anon_inode:kvm-vm``)."""
    d = f"{proc}/{pid}/fd"
    try:
        names = os.listdir(d)
    except OSError as e:
        raise KvmUdError(f"fds of pid {pid}", e.strerror or str(e), e.errno,
                         fix="is QEMU running, and are we root?") from e
    out = []
    for n in names:
        try:
            if os.readlink(f"{d}/{n}") == "anon_inode:kvm-vm":
                out.append(int(n))
        except (OSError, ValueError):
            continue        # closed meanwhile
    return sorted(out)


def find_vm_fd(pid: int, proc: str = "/proc") -> int:
    fds = find_vm_fds(pid, proc)
    if not fds:
        raise KvmUdError(f"VM fd of pid {pid}", "no fd links to anon_inode:kvm-vm",
                         fix="the process is not a QEMU running a KVM guest (TCG has no VM fd)")
    if len(fds) > 1:
        raise KvmUdError(f"VM fd of pid {pid}", f"{len(fds)} KVM VMs in one process: {fds}")
    return fds[0]


def pidfd_getfd(pid: int, target_fd: int) -> int:
    """A copy of fd ``target_fd`` of process ``pid`` (``pidfd_open`` + ``pidfd_getfd``, Linux 5.6+)."""
    try:
        pidfd = os.pidfd_open(pid) if hasattr(os, "pidfd_open") else _syscall(_SYS_PIDFD_OPEN, pid, 0)
    except OSError as e:
        raise KvmUdError(f"pidfd_open({pid})", e.strerror, e.errno) from e
    try:
        fd = _syscall(_SYS_PIDFD_GETFD, pidfd, target_fd, 0)
    except OSError as e:
        raise KvmUdError(f"pidfd_getfd({pid}, {target_fd})", e.strerror, e.errno,
                         fix="run as root (needs ptrace rights over QEMU)" if e.errno == _errno.EPERM
                         else None) from e
    finally:
        os.close(pidfd)
    os.set_inheritable(fd, False)
    return fd


def open_vm_fd(pid: int) -> int:
    """Our own copy of QEMU ``pid``'s KVM VM fd."""
    return pidfd_getfd(pid, find_vm_fd(pid))


# -- the backend --------------------------------------------------------------

class KvmUd:
    """One VM's kvm-ud state, through a VM fd (ours: closed by :meth:`close`).

    ``KvmUd.attach(qemu_pid)`` gets the fd, sets the ring up (an eventfd of our
    own, ``nr_events`` slots) and maps it.  Then :meth:`set_traps`, :meth:`arm`
    / :meth:`disarm` / :meth:`peek` (each runs on a vCPU thread of the VM, up to
    ``timeout_ms``), :meth:`wait` and :meth:`read_events`.
    """

    def __init__(self, vm_fd: int, nr_events: int = 1024, eventfd: bool = True) -> None:
        self.vm_fd = vm_fd
        self.efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) if eventfd else -1
        a = SetupArgs(eventfd=self.efd, nr_events=nr_events)
        try:
            self._ioctl("KAIROS_UD_SETUP", KAIROS_UD_SETUP, a)
        except BaseException:
            if self.efd >= 0:
                os.close(self.efd)
            raise
        if a.api_version != API_VERSION:
            raise KvmUdError("KAIROS_UD_SETUP", f"kernel API {a.api_version}, this package {API_VERSION}")
        self.ring_fd = a.ring_fd
        self.ring_size = a.ring_size
        self.ring = mmap.mmap(self.ring_fd, self.ring_size, mmap.MAP_SHARED,
                              mmap.PROT_READ | mmap.PROT_WRITE)
        self.event_size, self.data_offset, c = parse_ring_header(self.ring[:4096])
        self.nr_events = c.nr_events
        self.traps: List[Trap] = []

    @classmethod
    def attach(cls, qemu_pid: int, **kw) -> "KvmUd":
        fd = open_vm_fd(qemu_pid)
        try:
            return cls(fd, **kw)
        except BaseException:
            os.close(fd)
            raise

    def _ioctl(self, name: str, req: int, arg: ctypes.Structure) -> None:
        try:
            fcntl.ioctl(self.vm_fd, req, arg, True)
        except OSError as e:
            fix = None
            if e.errno in (_errno.ENOTTY, _errno.EINVAL) and name == "KAIROS_UD_SETUP" and not patched_kvm_loaded():
                fix = "load the kairos-patched kvm modules (kmod/README.md)"
            elif e.errno == _errno.ETIMEDOUT:
                fix = "the vCPU thread did not run (is the VM paused?)"
            elif e.errno == _errno.EBADMSG:
                fix = "the site does not hold the expected bytes (wrong address or KASLR slide?)"
            raise KvmUdError(name, e.strerror or str(e), e.errno, fix) from e

    def set_traps(self, traps: Sequence[Trap], rate: int = 0, burst: int = 0) -> None:
        arr = encode_traps(traps)
        a = TrapsArgs(nr=len(traps), rate=rate, burst=burst, traps=ctypes.addressof(arr))
        self._ioctl("KAIROS_UD_SET_TRAPS", KAIROS_UD_SET_TRAPS, a)
        self.traps = list(traps)

    def _ctl(self, op: int, index: int = 0, gva: int = 0, length: int = 0, vcpu: int = 0,
             timeout_ms: int = DEFAULT_TIMEOUT_MS) -> CtlArgs:
        c = CtlArgs(op=op, index=index, gva=gva, len=length, vcpu=vcpu, timeout_ms=timeout_ms)
        name = {OP_ARM: "arm", OP_DISARM: "disarm", OP_PEEK: "peek"}[op]
        self._ioctl(f"KAIROS_UD_CTL {name}", KAIROS_UD_CTL, c)
        return c

    def arm(self, index: int, **kw) -> bytes:
        """Arm trap ``index``; returns the site's 5 bytes afterwards (``ARMED5``)."""
        return bytes(self._ctl(OP_ARM, index=index, **kw).bytes[:SITE_LEN])

    def disarm(self, index: int, **kw) -> bytes:
        """Disarm trap ``index``; returns the site's 5 bytes afterwards (``NOP5``)."""
        return bytes(self._ctl(OP_DISARM, index=index, **kw).bytes[:SITE_LEN])

    def peek(self, gva: int, length: int, **kw) -> Tuple[bytes, int]:
        """(bytes, gpa) of guest-virtual memory, read by the kernel on a vCPU thread."""
        if not 1 <= length <= PEEK_MAX:
            raise KvmUdError("peek", f"length {length} not in 1..{PEEK_MAX}")
        c = self._ctl(OP_PEEK, gva=gva, length=length, **kw)
        return bytes(c.bytes[:length]), c.gpa

    def site_gpa(self, index: int, **kw) -> int:
        return self.peek(self.traps[index].gva, SITE_LEN, **kw)[1]

    def counters(self) -> RingCounters:
        return parse_ring_header(self.ring[:4096])[2]

    def wait(self, timeout: Optional[float]) -> int:
        """Wait for the eventfd; returns how many events were signalled since the last wait (0 on timeout)."""
        if self.efd < 0:
            raise KvmUdError("wait", "set up without an eventfd")
        r, _, _ = select.select([self.efd], [], [], timeout)
        if not r:
            return 0
        try:
            return os.eventfd_read(self.efd)
        except BlockingIOError:
            return 0

    def read_events(self, limit: Optional[int] = None) -> List[KvmUdEvent]:
        """Consume the events in the ring ([tail, head)), oldest first."""
        head = _U64.unpack_from(self.ring, RING_HEAD_OFFSET)[0]
        tail = _U64.unpack_from(self.ring, RING_TAIL_OFFSET)[0]
        if head - tail > self.nr_events:
            raise KvmUdError("ring", f"head {head} tail {tail}: more than {self.nr_events} pending")
        if limit is not None:
            head = min(head, tail + limit)
        out = []
        for seq in range(tail, head):
            at = self.data_offset + (seq % self.nr_events) * self.event_size
            ev = decode_event(self.ring[at:at + self.event_size])
            if ev.seq != seq:
                raise KvmUdError("ring", f"slot for seq {seq} holds seq {ev.seq}")
            out.append(ev)
        _U64.pack_into(self.ring, RING_TAIL_OFFSET, head)
        return out

    def skip_to_head(self) -> int:
        """Drop every pending event (a torn ring, or events nobody will model); returns how many."""
        head = _U64.unpack_from(self.ring, RING_HEAD_OFFSET)[0]
        tail = _U64.unpack_from(self.ring, RING_TAIL_OFFSET)[0]
        _U64.pack_into(self.ring, RING_TAIL_OFFSET, head)
        return max(0, min(head - tail, self.nr_events)) if head >= tail else 0

    def events(self, timeout: Optional[float] = None) -> Iterator[KvmUdEvent]:
        """Events as they come, until ``timeout`` seconds pass with none."""
        while True:
            evs = self.read_events()
            if not evs and not self.wait(timeout):
                evs = self.read_events()
                if not evs:
                    return
            yield from evs

    def close(self) -> None:
        for attr in ("ring",):
            m = getattr(self, attr, None)
            if m is not None:
                try:
                    m.close()
                except BufferError:
                    pass
                setattr(self, attr, None)
        for attr in ("ring_fd", "efd", "vm_fd"):
            fd = getattr(self, attr, -1)
            if fd is not None and fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
                setattr(self, attr, -1)

    def __enter__(self) -> "KvmUd":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
