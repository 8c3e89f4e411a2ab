"""GuestSymbols, the KASLR slide, the fentry check and task_struct layout discovery,
on synthetic guest memory (``FakeGuestMemory`` from test_kallsyms): a guest
kernel with KASLR, a task list with decoy list heads and decoy pid pairs.
Hostile memory may only ever produce SymbolError.
"""
from __future__ import annotations

import errno
import struct
from typing import List, Optional, Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kairos_libvirt.errors import KairosError
from kairos_libvirt.introspect import layout as lay
from kairos_libvirt.introspect.layout import TaskLayout, current_task, discover_layout, percpu_base, \
    task_ident, task_list
from kairos_libvirt.introspect.rsp.errors import RspConnectionError, RspRemoteError, RspTimeout
from kairos_libvirt.introspect.symbols import (
    ENDBR64, FENTRY_NOP, KASLR_ALIGN, KERNEL_MAP_END, KERNEL_MAP_START, LINK_TEXT, GuestSymbols,
    SymbolError, fentry_site, find_slide, read_exact, read_fault, slide_candidates,
)
from tests.unit.test_kallsyms import BANNER, FakeGuestMemory, FakeKernel, fake_kernel, sample_symbols


def symbols_of(syms=None, banner: str = BANNER) -> GuestSymbols:
    syms = sample_symbols(300) if syms is None else syms
    return GuestSymbols([n for n, _, _ in syms], [a for _, a, _ in syms], "".join(t for _, _, t in syms),
                        banner=banner, source="test table")


# --------------------------------------------------------------------------
# GuestSymbols.

def test_lookup_resolve_and_per_cpu():
    syms = symbols_of()
    assert syms.address("_text") == LINK_TEXT and "init_task" in syms and len(syms) == 300
    slide = 0x26200000
    assert syms.resolve("__x64_sys_sched_setattr", slide) == LINK_TEXT + 0x1000 + slide
    assert syms.resolve("current_task", slide) == 0x1fb80            # per-CPU offsets never slide
    rt = syms.runtime(slide)
    assert rt.resolve("init_task") == syms.address("init_task") + slide and "init_task" in rt
    assert rt.lookup("current_task").type == "A" and not rt.lookup("current_task").in_image
    sym, off = syms.symbolize(LINK_TEXT + 0x1003)
    assert (sym.name, off) == ("__x64_sys_sched_setattr", 3)
    assert syms.symbolize(0x10) is None


def test_missing_and_ambiguous_names():
    syms = symbols_of()
    with pytest.raises(SymbolError, match=r"no symbol 'nope'.*/proc/kallsyms"):
        syms.lookup("nope")
    with pytest.raises(SymbolError, match=r"2 symbols named 'dup_static'.*ambiguous"):
        syms.address("dup_static")
    assert syms.lookup("dup_mixed").type == "T"                      # the one global wins
    assert [s.type for s in syms.all("dup_mixed")] == ["t", "T"] and syms.all("nope") == []
    assert isinstance(SymbolError("x"), KairosError)


def test_slide_candidates():
    c = slide_candidates(LINK_TEXT)
    assert c[0] == 0 and all(s % KASLR_ALIGN == 0 for s in c) and len(set(c)) == len(c)
    assert all(KERNEL_MAP_START <= LINK_TEXT + s < KERNEL_MAP_END for s in c)
    assert len(c) == (KERNEL_MAP_END - KERNEL_MAP_START) // KASLR_ALIGN
    assert min(c) == KERNEL_MAP_START - LINK_TEXT and c[1] == KASLR_ALIGN


# --------------------------------------------------------------------------
# Reads.

def test_read_fault_classes():
    assert read_fault(OSError(errno.EFAULT, "x")) and read_fault(SymbolError("x"))
    assert read_fault(RspRemoteError(b"m0,1", "14"))
    assert not read_fault(RspConnectionError("gone")) and not read_fault(RspTimeout("reply", 1.0))
    assert not read_fault(ConnectionResetError()) and not read_fault(TimeoutError())
    assert not read_fault(ValueError("bug"))


def test_read_exact_refuses_short_and_odd_replies():
    with pytest.raises(SymbolError, match="asked for 8 bytes at 0x10, the reader gave 3"):
        read_exact(lambda a, n: b"abc", 0x10, 8, "x")
    with pytest.raises(SymbolError, match="the reader gave str"):
        read_exact(lambda a, n: "abcdefgh", 0x10, 8, "x")
    with pytest.raises(SymbolError, match="outside the 64-bit space"):
        read_exact(lambda a, n: bytes(n), (1 << 64) - 4, 8, "x")
    with pytest.raises(SymbolError, match="cannot read the thing .*EFAULT|cannot read the thing"):
        read_exact(FakeGuestMemory().read, 0x1000, 8, "the thing")

    def dead(a, n):
        raise RspConnectionError("gdbstub connection lost")
    with pytest.raises(RspConnectionError):
        read_exact(dead, 0x1000, 8, "x")


# --------------------------------------------------------------------------
# KASLR slide.

@pytest.mark.parametrize("slide", [0, 0x200000, 0x26200000, 0x3e000000 - 0x2000000])
def test_find_slide(slide):
    k = fake_kernel(slide=slide, n=300)
    assert find_slide(k.mem.read, symbols_of(k.link_syms)) == slide
    assert symbols_of(k.link_syms).find_slide(k.mem.read) == slide


def test_find_slide_skips_a_partial_banner():
    k = fake_kernel(slide=0x800000, n=300)
    k.mem.map(LINK_TEXT + 0x400100 + 0x200000, BANNER.encode()[:40] + b"X\0")   # a lookalike, earlier
    assert find_slide(k.mem.read, symbols_of(k.link_syms)) == 0x800000


def test_find_slide_other_kernel():
    k = fake_kernel(slide=0x800000, n=300)
    other = symbols_of(k.link_syms, banner=BANNER.replace("6.1.999-1", "6.1.999-7"))
    with pytest.raises(SymbolError, match=r"none held the banner .*another kernel.*vmlinuz"):
        find_slide(k.mem.read, other)


def test_find_slide_nothing_readable():
    with pytest.raises(SymbolError, match=r"read 0 of \d+ .*last read error: .*cannot access memory"):
        find_slide(FakeGuestMemory().read, symbols_of())


def test_find_slide_dead_connection_propagates():
    def dead(a, n):
        raise RspTimeout("reply to m", 5.0, closed=True)
    with pytest.raises(RspTimeout):
        find_slide(dead, symbols_of())


def test_find_slide_table_without_kernel_banner_address():
    syms = [(n, (5 if n == "linux_banner" else a), t) for n, a, t in sample_symbols(300)]
    with pytest.raises(SymbolError, match="outside the kernel map"):
        find_slide(FakeGuestMemory().read, symbols_of(syms))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 511), st.binary(max_size=300)), max_size=6))
def test_fuzz_find_slide_only_symbolerror(plants):
    mem = FakeGuestMemory()
    syms = symbols_of()
    for k, data in plants:
        mem.map(syms.address("linux_banner") - 0x1000000 + k * KASLR_ALIGN, data)
    try:
        slide = find_slide(mem.read, syms)
    except SymbolError:
        return
    assert slide % KASLR_ALIGN == 0


# --------------------------------------------------------------------------
# fentry.

F = 0xffffffff81234560


@pytest.mark.parametrize("code, site", [
    (FENTRY_NOP + b"\x48\x8b\x77\x68", F),
    (ENDBR64 + FENTRY_NOP, F + 4),
])
def test_fentry_site(code, site):
    mem = FakeGuestMemory()
    mem.map(F, code)
    assert fentry_site(mem.read, F) == site


@pytest.mark.parametrize("code, why", [
    (b"\xe8\x11\x22\x33\x44\x55\x48\x89\xe5", "ftrace is tracing"),
    (ENDBR64 + b"\xe8\x11\x22\x33\x44", "ftrace is tracing"),
    (b"\x0f\x0b\x44\x00\x00\x48\x8b\x77\x68", "already armed"),
    (b"\xcc\x1f\x44\x00\x00\x48\x8b\x77\x68", "int3"),
    (b"\xe9\x00\x10\x00\x00\x90\x90\x90\x90", "jmp"),
    (b"\x55\x48\x89\xe5\x41\x57\x41\x56\x53", "CONFIG_FUNCTION_TRACER"),
    (ENDBR64 + b"\x55\x48\x89\xe5\x41", "CONFIG_FUNCTION_TRACER"),
])
def test_fentry_refusals(code, why):
    mem = FakeGuestMemory()
    mem.map(F, code)
    with pytest.raises(SymbolError, match=f"does not begin with the fentry NOP.*found {code[:2].hex(' ')}.*{why}"):
        fentry_site(mem.read, F)


def test_fentry_unreadable():
    with pytest.raises(SymbolError, match="cannot read the function entry"):
        fentry_site(FakeGuestMemory().read, F)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=9, max_size=9))
def test_fuzz_fentry_only_symbolerror(code):
    mem = FakeGuestMemory()
    mem.map(F, code)
    try:
        site = fentry_site(mem.read, F)
    except SymbolError:
        return
    assert site in (F, F + 4)


# --------------------------------------------------------------------------
# task_struct layout.

TASKS, PID, COMM, CHILDREN, SIBLING = 0x890, 0x970, 0xba0, 0x990, 0x9a0
DIRECT = 0xffff888001000000
GS = 0xffff888007000000
TASK_SPAN = 0x4000


def _put(mem: FakeGuestMemory, task: int, off: int, fmt: str, *vals) -> None:
    mem.map(task + off, struct.pack(fmt, *vals))


def task_memory(names: Sequence[str] = ("init", "kthreadd", "rcu_gp", "kworker/0:0"),
                pids: Optional[List[int]] = None, current: int = 1, k: Optional[FakeKernel] = None
                ) -> tuple:
    """init_task plus processes on its tasks list, with decoys; returns (kernel, runtime syms, tasks)."""
    k = k or fake_kernel(n=300)
    rt = symbols_of(k.link_syms).runtime(k.slide)
    init = rt.resolve("init_task")
    tasks = [init] + [DIRECT + i * TASK_SPAN for i in range(1, len(names) + 1)]
    pids = pids if pids is not None else list(range(len(tasks)))
    mem = k.mem
    for t in tasks[1:]:
        mem.map(t, bytes(TASK_SPAN))
    for i, t in enumerate(tasks):
        name = ("swapper/0" if i == 0 else names[i - 1]).encode()
        mem.map(t + COMM, name + bytes(16 - len(name)))
        _put(mem, t, PID, "<ii", pids[i], pids[i])
        _put(mem, t, TASKS, "<QQ", tasks[(i + 1) % len(tasks)] + TASKS, tasks[i - 1] + TASKS)
        _put(mem, t, 0x100, "<QQ", t + 0x100, t + 0x100)                # an empty list
        _put(mem, t, 0x20, "<ii", *((0, 0), (1, 1), (7, 7), (3, 3), (4, 4))[min(i, 4)])  # decoy pids
        _put(mem, t, 0x300, "<Q", 0xdeadbeef)                           # a non-pointer
    # init_task.children: PIDs 1 and 2 linked through their sibling fields.
    _put(mem, init, CHILDREN, "<QQ", tasks[1] + SIBLING, tasks[2] + SIBLING)
    _put(mem, tasks[1], SIBLING, "<QQ", tasks[2] + SIBLING, init + CHILDREN)
    _put(mem, tasks[2], SIBLING, "<QQ", init + CHILDREN, tasks[1] + SIBLING)
    # Per-CPU: GS base of CPU 0 in __per_cpu_offset[0]; current_task there.
    mem.write_u64(rt.resolve("__per_cpu_offset"), GS)
    mem.map(GS + 0x1f000, bytes(0x1000))
    mem.write_u64(GS + rt.resolve("current_task"), tasks[current])
    return k, rt, tasks


def test_discover_layout_and_identify():
    k, rt, tasks = task_memory()
    found = discover_layout(k.mem.read, rt)
    assert found == TaskLayout(tasks=TASKS, pid=PID, tgid=PID + 4, comm=COMM)
    assert task_ident(k.mem.read, tasks[1], found) == (1, 1, "init")
    assert task_ident(k.mem.read, tasks[0], found) == (0, 0, "swapper/0")
    assert [t[1:] for t in task_list(k.mem.read, rt, found)] == [
        (0, 0, "swapper/0"), (1, 1, "init"), (2, 2, "kthreadd"), (3, 3, "rcu_gp"), (4, 4, "kworker/0:0")]
    assert percpu_base(k.mem.read, rt, 0) == GS
    assert current_task(k.mem.read, GS, rt) == tasks[1]
    assert found.span() == (PID, COMM + 16 - PID)


def test_discover_layout_with_two_tasks_only():
    k, rt, tasks = task_memory(names=("systemd", "kthreadd"))
    assert discover_layout(k.mem.read, rt).pid == PID


def test_comm_is_escaped_never_raw():
    k, rt, tasks = task_memory()
    k.mem.map(tasks[3] + COMM, b"\xff\xfeevil\x1b[2J\0" + bytes(4))
    found = discover_layout(k.mem.read, rt)
    assert task_ident(k.mem.read, tasks[3], found)[2] == "\\xff\\xfeevil\x1b[2J"


def test_current_task_pcpu_hot_and_refusals():
    k, rt, tasks = task_memory()
    link = [(("pcpu_hot" if n == "current_task" else n), a, t) for n, a, t in k.link_syms]
    hot = symbols_of(link).runtime(k.slide)
    assert current_task(k.mem.read, GS, hot) == tasks[1]
    with pytest.raises(SymbolError, match="user mode.*KERNEL_GS_BASE"):
        current_task(k.mem.read, 0x7f0000001000, rt)
    neither = symbols_of([s for s in k.link_syms if s[0] != "current_task"]).runtime(k.slide)
    with pytest.raises(SymbolError, match="neither current_task nor pcpu_hot"):
        current_task(k.mem.read, GS, neither)
    k.mem.write_u64(GS + 0x1fb80, 0x1234)
    with pytest.raises(SymbolError, match="not a task pointer"):
        current_task(k.mem.read, GS, rt)
    with pytest.raises(SymbolError, match="cannot read current_task"):
        current_task(k.mem.read, GS + 0x100000, rt)
    with pytest.raises(SymbolError, match="out of range"):
        percpu_base(k.mem.read, rt, 100000)


def test_no_swapper():
    k, rt, tasks = task_memory()
    k.mem.map(tasks[0] + COMM, b"idle\0" + bytes(11))
    with pytest.raises(SymbolError, match="no task name 'swapper/0'.*slide"):
        discover_layout(k.mem.read, rt)


def test_guest_still_booting():
    k = fake_kernel(n=300)
    rt = symbols_of(k.link_syms).runtime(k.slide)
    init = rt.resolve("init_task")
    k.mem.map(init + COMM, b"swapper/0\0" + bytes(6))
    _put(k.mem, init, TASKS, "<QQ", init + TASKS, init + TASKS)
    with pytest.raises(SymbolError, match="wait until the guest has started init"):
        discover_layout(k.mem.read, rt)


def test_wrong_pids_are_refused():
    k, rt, tasks = task_memory(pids=[0, 1, 5, 6, 7])
    with pytest.raises(SymbolError, match="no offset holds pids 0, 1, 2"):
        discover_layout(k.mem.read, rt)


def test_ambiguous_pid_offset():
    k, rt, tasks = task_memory()
    for i, t in enumerate(tasks):
        _put(k.mem, t, 0x40, "<ii", i, i)
    with pytest.raises(SymbolError, match="ambiguous"):
        discover_layout(k.mem.read, rt)


def test_task_list_loop_and_garbage():
    k, rt, tasks = task_memory()
    found = discover_layout(k.mem.read, rt)
    _put(k.mem, tasks[4], TASKS, "<Q", tasks[2] + TASKS)               # a cycle that skips the head
    with pytest.raises(SymbolError, match="longer than 50"):
        task_list(k.mem.read, rt, found, limit=50)
    _put(k.mem, tasks[4], TASKS, "<Q", 0x1000)
    with pytest.raises(SymbolError, match="not a kernel pointer"):
        task_list(k.mem.read, rt, found)
    _put(k.mem, tasks[3], PID, "<ii", -5, 9)
    with pytest.raises(SymbolError, match="pid -5, tgid 9"):
        task_ident(k.mem.read, tasks[3], found)
    with pytest.raises(SymbolError, match="not a kernel address"):
        task_ident(k.mem.read, 0x400000, found)


def test_task_walk_hits_garbage_link():
    k, rt, tasks = task_memory()
    _put(k.mem, tasks[1], TASKS, "<Q", 0x1234)                          # PID 1's next is garbage
    with pytest.raises(SymbolError, match="not a kernel pointer|only 2 tasks|cannot find"):
        discover_layout(k.mem.read, rt)


_BASE = task_memory()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, TASK_SPAN - 1), st.binary(min_size=1, max_size=16)),
                min_size=1, max_size=10))
def test_fuzz_layout_only_symbolerror(edits):
    k, rt, tasks = _BASE
    mem = FakeGuestMemory()
    mem.pages = {a: bytearray(p) for a, p in k.mem.pages.items()}
    for i, off, patch in edits:
        mem.map(tasks[i] + off, patch)
    try:
        found = discover_layout(mem.read, rt)
        task_list(mem.read, rt, found, limit=100)
        current_task(mem.read, GS, rt)
    except SymbolError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0x300, max_size=0x300))
def test_fuzz_task_ident_only_symbolerror(raw):
    mem = FakeGuestMemory()
    mem.map(DIRECT + PID - 0x100, raw)
    layout = TaskLayout(tasks=TASKS, pid=PID, tgid=PID + 4, comm=COMM)
    try:
        tid, tgid, comm = task_ident(mem.read, DIRECT, layout)
    except SymbolError:
        return
    assert 0 <= tid < lay.PID_MAX_LIMIT and 0 <= tgid < lay.PID_MAX_LIMIT and isinstance(comm, str)
