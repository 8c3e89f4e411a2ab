"""Guest-value decoders against hand-packed structs, garbage and hostile values."""
from __future__ import annotations

import struct
from typing import Dict, List, Optional, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kairos_libvirt.errors import KairosError
from kairos_libvirt.introspect import decode as D
from kairos_libvirt.introspect.decode import DecodeError, SchedRequest, Timespec
from kairos_libvirt.introspect.rsp.errors import RspRemoteError

USER = 0x7FFD_0000_1000          # a user-space address
KSTACK = 0xFFFF_C900_0001_3F58   # a kernel-stack address (pt_regs live there)


def attr(size: int = 48, policy: int = D.SCHED_DEADLINE, flags: int = 0, nice: int = 0,
         prio: int = 0, runtime: int = 1_000_000, deadline: int = 5_000_000,
         period: int = 10_000_000, util: Optional[Tuple[int, int]] = None,
         tail: bytes = b"") -> bytes:
    """uapi struct sched_attr, packed by hand."""
    data = struct.pack("<IIQiIQQQ", size, policy, flags, nice, prio, runtime, deadline, period)
    if util is not None:
        data += struct.pack("<II", *util)
    return data + tail


def pt_regs(**values: int) -> bytes:
    buf = bytearray(D.PT_REGS_SIZE)
    for name, value in values.items():
        struct.pack_into("<Q", buf, D.PT_REGS_OFFSETS[name], value)
    return bytes(buf)


class Memory:
    """Guest memory as a few mapped ranges; unmapped reads fail like QEMU's E14."""

    def __init__(self) -> None:
        self.ranges: Dict[int, bytes] = {}
        self.calls: List[Tuple[int, int]] = []

    def map(self, addr: int, data: bytes) -> "Memory":
        self.ranges[addr] = data
        return self

    def read(self, addr: int, n: int) -> bytes:
        assert n <= D.MAX_READ, "decoders must bound their reads"
        self.calls.append((addr, n))
        for base, data in self.ranges.items():
            if base <= addr and addr + n <= base + len(data):
                return data[addr - base:addr - base + n]
        raise RspRemoteError(b"m%x,%x" % (addr, n), "14", raw=b"E14")


# -- struct pt_regs ----------------------------------------------------------------

def test_pt_regs_offsets_match_the_design() -> None:
    o = D.PT_REGS_OFFSETS
    assert (o["r15"], o["r10"], o["dx"], o["si"], o["di"], o["orig_ax"], o["ip"], o["sp"]) == (
        0x0, 0x38, 0x60, 0x68, 0x70, 0x78, 0x80, 0x98)
    assert D.PT_REGS_SIZE == 168 == max(o.values()) + 8
    assert len(set(o.values())) == len(o)


def test_parse_pt_regs_and_syscall_args() -> None:
    regs = D.parse_pt_regs(pt_regs(di=1, si=2, dx=3, r10=4, r8=5, r9=6, cx=99, orig_ax=314,
                                   ip=0x401000))
    assert D.syscall_args(regs) == (1, 2, 3, 4, 5, 6)   # r10, not cx, is the 4th
    assert regs["orig_ax"] == 314 and regs["ip"] == 0x401000


def test_parse_pt_regs_short() -> None:
    with pytest.raises(DecodeError, match="need 168 bytes, got 100") as exc:
        D.parse_pt_regs(bytes(100))
    assert exc.value.raw == bytes(100)


def test_read_pt_regs() -> None:
    mem = Memory().map(KSTACK, pt_regs(di=7))
    assert D.read_pt_regs(KSTACK, mem.read)["di"] == 7
    assert mem.calls == [(KSTACK, 168)]
    with pytest.raises(DecodeError, match="8-byte aligned"):
        D.read_pt_regs(KSTACK + 1, mem.read)
    with pytest.raises(DecodeError, match="NULL"):
        D.read_pt_regs(0, mem.read)
    with pytest.raises(DecodeError, match="wraps around"):
        D.read_pt_regs((1 << 64) - 8, mem.read)
    with pytest.raises(DecodeError, match="unreadable") as exc:
        D.read_pt_regs(KSTACK + 0x1000, mem.read)
    assert isinstance(exc.value.__cause__, RspRemoteError) and exc.value.addr == KSTACK + 0x1000


# -- struct sched_attr ---------------------------------------------------------------

def test_deadline_request() -> None:
    req = D.parse_sched_attr(attr())
    assert req == SchedRequest("deadline", 0, 1_000_000, 5_000_000, 10_000_000)
    assert req.realtime and not req.keep_policy and not req.keep_params and not req.reset_on_fork


def test_deadline_period_zero_means_period_equals_deadline() -> None:
    # __checkparam_dl()/__setparam_dl(): the period defaults to the deadline.
    req = D.parse_sched_attr(attr(period=0))
    assert req.period_ns == req.deadline_ns == 5_000_000


@pytest.mark.parametrize("policy,prio,name", [(D.SCHED_FIFO, 50, "fifo"), (D.SCHED_RR, 1, "rr"),
                                              (D.SCHED_RR, 99, "rr"), (D.SCHED_OTHER, 0, "other"),
                                              (D.SCHED_BATCH, 0, "batch"), (D.SCHED_IDLE, 0, "idle")])
def test_other_policies_ignore_dl_fields(policy: int, prio: int, name: str) -> None:
    req = D.parse_sched_attr(attr(policy=policy, prio=prio))   # DL fields left as garbage
    assert req == SchedRequest(name, prio)
    assert req.realtime == (name in ("fifo", "rr"))


def test_size_zero_is_ver0() -> None:
    assert D.parse_sched_attr(attr(size=0)).policy == "deadline"


def test_nice_is_kept_raw() -> None:
    assert D.parse_sched_attr(attr(policy=D.SCHED_OTHER, nice=-100)).nice == -100


def test_util_clamps_need_ver1() -> None:
    flags = D.SCHED_FLAG_UTIL_CLAMP_MIN | D.SCHED_FLAG_UTIL_CLAMP_MAX
    req = D.parse_sched_attr(attr(size=56, flags=flags, util=(128, 1024)))
    assert (req.util_min, req.util_max) == (128, 1024)
    req = D.parse_sched_attr(attr(size=56, flags=D.SCHED_FLAG_UTIL_CLAMP_MAX, util=(5, 0xFFFFFFFF)))
    assert (req.util_min, req.util_max) == (None, -1)            # -1: reset to default
    assert D.parse_sched_attr(attr(size=56, util=(1, 2))).util_min is None   # no flag, ignored
    with pytest.raises(DecodeError, match="util clamp flags with size 48"):
        D.parse_sched_attr(attr(size=48, flags=flags))
    with pytest.raises(DecodeError, match="util_min 2000"):
        D.parse_sched_attr(attr(size=56, flags=flags, util=(2000, 1024)))
    with pytest.raises(DecodeError, match="util_min 600 > util_max 500"):
        D.parse_sched_attr(attr(size=56, flags=flags, util=(600, 500)))


def test_keep_policy_and_keep_params() -> None:
    req = D.parse_sched_attr(attr(policy=0xFFFF, flags=D.SCHED_FLAG_KEEP_POLICY, prio=0))
    assert req.policy is None and req.keep_policy
    assert (req.runtime_ns, req.deadline_ns, req.period_ns) == (1_000_000, 5_000_000, 10_000_000)
    req = D.parse_sched_attr(attr(flags=D.SCHED_FLAG_KEEP_PARAMS, prio=77, runtime=1))
    assert req == SchedRequest("deadline", flags=D.SCHED_FLAG_KEEP_PARAMS) and req.keep_params
    with pytest.raises(DecodeError, match="KEEP_PARAMS"):
        SchedRequest("fifo", 5, flags=D.SCHED_FLAG_KEEP_PARAMS)


def test_reset_on_fork_flag() -> None:
    assert D.parse_sched_attr(attr(flags=D.SCHED_FLAG_RESET_ON_FORK)).reset_on_fork


@pytest.mark.parametrize("data,why", [
    (attr(size=47), "size 47 is outside 48..4096 (E2BIG)"),
    (attr(size=4097), "size 4097"),
    (attr(size=0xFFFFFFFF), "size 4294967295"),
    (attr(policy=4), "unknown policy 4"),
    (attr(policy=0xFFFFFFFF), "negative policy -1"),
    (attr(flags=0x80), "unknown sched_flags bits 0x80"),
    (attr(flags=1 << 63), "unknown sched_flags"),
    (attr(policy=D.SCHED_FIFO, prio=0), "needs a priority in 1..99"),
    (attr(policy=D.SCHED_FIFO, prio=100), "priority 100 is outside 0..99"),
    (attr(policy=D.SCHED_RR, prio=0xFFFFFFFF), "outside 0..99"),
    (attr(policy=D.SCHED_OTHER, prio=5), "takes priority 0, got 5"),
    (attr(prio=1), "SCHED_DEADLINE takes priority 0"),
    (attr(runtime=6_000_000), "runtime 6000000 ns > deadline 5000000 ns"),
    (attr(deadline=20_000_000), "deadline 20000000 ns > period 10000000 ns"),
    (attr(runtime=20_000_000, deadline=20_000_000), "deadline 20000000 ns > period"),
    (attr(deadline=0), "deadline is 0"),
    (attr(runtime=1023), "runtime 1023 ns is below 1024 ns"),
    (attr(runtime=0), "runtime 0 ns"),
    (attr(deadline=1 << 63, period=0), "bit 63"),
    (attr(period=(1 << 64) - 1), "bit 63"),
    (attr(size=56, util=(0, 0), tail=b"")[:50], "need 56 bytes"),
    (attr(size=64, util=(0, 0), tail=b"\0" * 7 + b"\1"), "non-zero bytes past the known fields"),
    (b"\x30\0\0\0" + bytes(20), "need 48 bytes, got 24"),
])
def test_sched_attr_refusals(data: bytes, why: str) -> None:
    with pytest.raises(DecodeError) as exc:
        D.parse_sched_attr(data)
    assert why in str(exc.value)
    assert exc.value.raw is not None


def test_decode_sched_attr_follows_the_pointer() -> None:
    mem = Memory().map(USER, attr())
    assert D.decode_sched_attr(USER, mem.read).policy == "deadline"
    assert mem.calls == [(USER, 48)]


def test_decode_sched_attr_ver1_and_zero_tail() -> None:
    data = attr(size=200, flags=D.SCHED_FLAG_UTIL_CLAMP_MIN, util=(10, 0), tail=bytes(144))
    mem = Memory().map(USER, data)
    assert D.decode_sched_attr(USER, mem.read).util_min == 10
    assert mem.calls == [(USER, 48), (USER + 48, 152)]


def test_decode_sched_attr_hostile_tail() -> None:
    data = attr(size=4096, util=(0, 0), tail=bytes(4030) + b"\x01" + bytes(9))
    mem = Memory().map(USER, data)
    with pytest.raises(DecodeError, match="non-zero bytes"):
        D.decode_sched_attr(USER, mem.read)
    assert all(n <= D.MAX_READ for _, n in mem.calls)


def test_decode_sched_attr_huge_size_reads_nothing_more() -> None:
    mem = Memory().map(USER, attr(size=1 << 31))
    with pytest.raises(DecodeError, match="E2BIG"):
        D.decode_sched_attr(USER, mem.read)
    assert mem.calls == [(USER, 48)]


def test_decode_sched_attr_tail_unmapped() -> None:
    mem = Memory().map(USER, attr(size=56))
    with pytest.raises(DecodeError, match="unreadable") as exc:
        D.decode_sched_attr(USER, mem.read)
    assert exc.value.addr == USER + 48


@pytest.mark.parametrize("addr,why", [
    (0, "NULL pointer"),
    (0xFFFF_8880_0000_0000, "not a user-space address"),
    (D.USER_ADDR_LIMIT - 47, "not a user-space address"),
    (USER + 0x10000, "unreadable"),
])
def test_decode_sched_attr_bad_pointers(addr: int, why: str) -> None:
    mem = Memory().map(USER, attr()).map(0xFFFF_8880_0000_0000, attr())
    with pytest.raises(DecodeError, match=why) as exc:
        D.decode_sched_attr(addr, mem.read)
    assert exc.value.addr == addr


def test_decode_sched_attr_user_limit_can_be_raised_for_la57() -> None:
    high = 1 << 50
    mem = Memory().map(high, attr())
    with pytest.raises(DecodeError, match="user-space"):
        D.decode_sched_attr(high, mem.read)
    assert D.decode_sched_attr(high, mem.read, user_limit=(1 << 56) - 4096).policy == "deadline"


class Boom(Exception):
    pass


@pytest.mark.parametrize("reader,why", [
    (lambda a, n: (_ for _ in ()).throw(OSError(5, "Input/output error")), "unreadable"),
    (lambda a, n: (_ for _ in ()).throw(KairosError("gdbstub gone")), "gdbstub gone"),
    (lambda a, n: b"\0" * (n - 1), "short read: asked for 48 bytes, got 47"),
    (lambda a, n: b"\0" * (n + 1), "short read"),
    (lambda a, n: None, "got NoneType"),
])
def test_reader_failures_become_decode_errors(reader: D.Reader, why: str) -> None:
    with pytest.raises(DecodeError, match=why):
        D.decode_sched_attr(USER, reader)


def test_reader_bugs_are_not_swallowed() -> None:
    def reader(addr: int, n: int) -> bytes:
        raise Boom()
    with pytest.raises(Boom):
        D.decode_sched_attr(USER, reader)


def test_sched_request_direct_validation() -> None:
    with pytest.raises(DecodeError, match="unknown policy 'edf'"):
        SchedRequest("edf")
    with pytest.raises(DecodeError, match="only apply to SCHED_DEADLINE"):
        SchedRequest("fifo", 10, runtime_ns=5)
    with pytest.raises(DecodeError, match="priority -1"):
        SchedRequest(None, -1)
    assert SchedRequest(None, 0, 1, 2, 3).keep_policy   # current policy unknown: kept as given


# -- struct sched_param and sched_setscheduler -------------------------------------------

def test_sched_param() -> None:
    assert D.parse_sched_param(struct.pack("<i", 42)) == 42
    for bad in (-1, 100, -(1 << 31)):
        with pytest.raises(DecodeError, match="outside 0..99"):
            D.parse_sched_param(struct.pack("<i", bad))
    with pytest.raises(DecodeError, match="need 4 bytes"):
        D.parse_sched_param(b"\0\0")
    mem = Memory().map(USER, struct.pack("<i", 7))
    assert D.decode_sched_param(USER, mem.read) == 7
    with pytest.raises(DecodeError, match="NULL"):
        D.decode_sched_param(0, mem.read)


def test_sched_request_from_setscheduler() -> None:
    assert D.sched_request_from_setscheduler(D.SCHED_FIFO, 10) == SchedRequest("fifo", 10)
    req = D.sched_request_from_setscheduler(D.SCHED_RR | D.SCHED_RESET_ON_FORK, 3)
    assert req.policy == "rr" and req.reset_on_fork
    for policy in (D.SCHED_DEADLINE, 4, -1, 7 | D.SCHED_RESET_ON_FORK):
        with pytest.raises(DecodeError, match="not accepted"):
            D.sched_request_from_setscheduler(policy, 0)
    with pytest.raises(DecodeError, match="priority 0"):
        D.sched_request_from_setscheduler(D.SCHED_OTHER, 5)


# -- struct __kernel_timespec ----------------------------------------------------------------

def test_timespec() -> None:
    ts = D.parse_timespec(struct.pack("<qq", 2, 500))
    assert ts == Timespec(2, 500) and ts.ns == 2_000_000_500
    assert D.parse_timespec(struct.pack("<qq", 0, 999_999_999)).ns == 999_999_999
    huge = D.parse_timespec(struct.pack("<qq", (1 << 63) - 1, 0))
    assert huge.ns == ((1 << 63) - 1) * 10**9            # not clamped
    for sec, nsec, why in [(0, -1, "tv_nsec -1"), (0, 10**9, "tv_nsec 1000000000"),
                           (-1, 0, "tv_sec -1"), (0, -(1 << 63), "outside 0..999999999")]:
        with pytest.raises(DecodeError, match=why):
            D.parse_timespec(struct.pack("<qq", sec, nsec))
    with pytest.raises(DecodeError, match="need 16 bytes"):
        D.parse_timespec(bytes(8))
    mem = Memory().map(USER, struct.pack("<qq", 0, 2_000_000))
    assert D.decode_timespec(USER, mem.read).ns == 2_000_000


# -- whole syscalls --------------------------------------------------------------------------

def test_decode_sched_setattr() -> None:
    mem = Memory().map(USER, attr())
    regs = D.parse_pt_regs(pt_regs(di=0, si=USER, dx=0))
    pid, req = D.decode_sched_setattr(regs, mem.read)
    assert pid == 0 and req.policy == "deadline"
    # pid_t is the low 32 bits of the register
    regs = D.parse_pt_regs(pt_regs(di=0xDEAD_0000_0000_0005, si=USER))
    assert D.decode_sched_setattr(regs, mem.read)[0] == 5
    with pytest.raises(DecodeError, match="pid -1 is negative"):
        D.decode_sched_setattr(D.parse_pt_regs(pt_regs(di=0xFFFFFFFF, si=USER)), mem.read)
    with pytest.raises(DecodeError, match="flags argument 0x1 is not 0"):
        D.decode_sched_setattr(D.parse_pt_regs(pt_regs(si=USER, dx=1)), mem.read)
    with pytest.raises(DecodeError, match="NULL"):
        D.decode_sched_setattr(D.parse_pt_regs(pt_regs()), mem.read)


def test_decode_sched_setscheduler_and_setparam() -> None:
    mem = Memory().map(USER, struct.pack("<i", 20))
    regs = D.parse_pt_regs(pt_regs(di=42, si=D.SCHED_FIFO | D.SCHED_RESET_ON_FORK, dx=USER))
    pid, req = D.decode_sched_setscheduler(regs, mem.read)
    assert pid == 42 and req == SchedRequest("fifo", 20, flags=D.SCHED_FLAG_RESET_ON_FORK)
    with pytest.raises(DecodeError, match="policy -1 is negative"):
        D.decode_sched_setscheduler(D.parse_pt_regs(pt_regs(si=0xFFFFFFFF, dx=USER)), mem.read)
    pid, req = D.decode_sched_setparam(D.parse_pt_regs(pt_regs(di=7, si=USER)), mem.read)
    assert pid == 7 and req == SchedRequest(None, 20)
    with pytest.raises(DecodeError, match="pid -2"):
        D.decode_sched_setparam(D.parse_pt_regs(pt_regs(di=0xFFFFFFFE, si=USER)), mem.read)


def test_decode_clock_nanosleep_and_nanosleep() -> None:
    mem = Memory().map(USER, struct.pack("<qq", 1, 5))
    req = D.decode_clock_nanosleep(D.parse_pt_regs(pt_regs(di=1, si=1, dx=USER)), mem.read)
    assert req == D.SleepRequest(1, True, Timespec(1, 5))
    req = D.decode_clock_nanosleep(D.parse_pt_regs(pt_regs(di=0, si=0, dx=USER)), mem.read)
    assert not req.absolute and req.clock_id == 0
    for clock in (3, 4, 0xFFFFFFFA, 12):
        with pytest.raises(DecodeError, match="not one this decoder models"):
            D.decode_clock_nanosleep(D.parse_pt_regs(pt_regs(di=clock, dx=USER)), mem.read)
    assert D.decode_nanosleep(D.parse_pt_regs(pt_regs(di=USER)), mem.read).time.ns == 1_000_000_005


# -- properties ------------------------------------------------------------------------------------

@settings(max_examples=400, deadline=None)
@given(st.binary(min_size=0, max_size=120))
def test_parse_sched_attr_garbage_raises_only_decode_error(data: bytes) -> None:
    try:
        req = D.parse_sched_attr(data)
    except DecodeError:
        return
    assert req.policy in D.POLICY_NUMBERS or req.policy is None
    if req.policy == "deadline" and not req.keep_params:
        assert 1024 <= req.runtime_ns <= req.deadline_ns <= req.period_ns < 1 << 63


@settings(max_examples=300, deadline=None)
@given(st.integers(0, (1 << 64) - 1), st.binary(max_size=300), st.integers(0, 2**32 - 1))
def test_decode_sched_attr_hostile_memory(addr: int, memory: bytes, size: int) -> None:
    mem = Memory().map(USER, struct.pack("<I", size) + memory)
    for pointer in (addr, USER):
        try:
            D.decode_sched_attr(pointer, mem.read)
        except DecodeError:
            pass
    assert all(n <= D.MAX_READ for _, n in mem.calls)


@settings(max_examples=200, deadline=None)
@given(st.integers(1024, 1 << 40), st.integers(0, 1 << 40), st.integers(0, 1 << 40))
def test_valid_deadline_roundtrip(runtime: int, extra_d: int, extra_p: int) -> None:
    deadline = runtime + extra_d
    period = deadline + extra_p
    req = D.parse_sched_attr(attr(runtime=runtime, deadline=deadline, period=period))
    assert (req.runtime_ns, req.deadline_ns, req.period_ns) == (runtime, deadline, period)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=16, max_size=16))
def test_timespec_garbage(data: bytes) -> None:
    try:
        ts = D.parse_timespec(data)
    except DecodeError:
        return
    assert ts.sec >= 0 and 0 <= ts.nsec < 10**9
