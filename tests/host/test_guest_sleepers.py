"""A real guest's sleep targets read from guest-physical memory while it runs (introspect/sleepers.py).

The project's test guest (Debian 6.1, KASLR on) boots under plain
``qemu-system-x86_64 -accel tcg`` with no gdbstub at all, and runs
``cyclictest -i 4000`` (one measuring thread, SCHED_FIFO 80, absolute
``clock_nanosleep``).  Everything is read through QEMU's ``/proc/PID/mem``:
the kernel is placed from physical memory, the task list walked through the
kernel's page tables, and the measuring thread found as the thread-group
sibling of the ``cyclictest`` process (threads are not on ``init_task.tasks``).
Ground truth: the guest prints cyclictest's pid and ``/proc/PID/task``.

Invariant: every two distinct targets differ by whole 4 ms periods, exactly.
Figures are printed (``pytest -s``) and kept as test properties.
"""
from __future__ import annotations

import os
import re
import struct
import subprocess
import time
from typing import Iterator, List, Optional, Set, Tuple

import pytest

from kairos_libvirt.host.guestmem import open_guest_ram
from kairos_libvirt.introspect import kallsyms
from kairos_libvirt.introspect.layout import SCAN_BYTES, TaskLayout, discover_layout, task_ident, task_list
from kairos_libvirt.introspect.sleepers import PageWalker, discover_stack_offset, sleep_expiry, task_stack_top
from kairos_libvirt.introspect.symbols import Reader, SymbolError, place_kernel, read_exact, try_read
from tests.host.test_guest_symbols import BOOT_TIMEOUT, GUEST, qemu_and_guest, serial_text, stop_qemu, wait_until

pytestmark = pytest.mark.kernel

RAM = 256 << 20
PERIOD_NS = 4_000_000
CYCLICTEST = "cyclictest -q -m -p 80 -i 4000 -t 1"
#: Once cyclictest runs, its pid and thread ids (the RUN line echoes this command: the \d+ tells them apart).
TIDS = "sleep 3; echo KAIROS-CT-TIDS $(pidof cyclictest) $(ls /proc/$(pidof cyclictest)/task)"
SAMPLES, SPAN_S = 50, 3.0


class Running:
    def __init__(self, workdir: str) -> None:
        self.serial = os.path.join(workdir, "serial.log")
        self.cache = os.path.join(workdir, "ksyms")
        self.proc: "subprocess.Popen[bytes]"

    def console(self) -> str:
        return serial_text(self.serial)


@pytest.fixture(scope="module")
def running(tmp_path_factory) -> Iterator[Running]:
    qemu = qemu_and_guest()
    g = Running(str(tmp_path_factory.mktemp("sleepers")))
    cmd = [qemu, "-accel", "tcg", "-m", str(RAM >> 20), "-smp", "1", "-display", "none", "-monitor", "none",
           "-no-reboot", "-kernel", os.path.join(GUEST, "vmlinuz"), "-initrd", os.path.join(GUEST, "initrd.img"),
           "-append", f'console=ttyS0 quiet panic=-1 kairos.heartbeat=0 kairos.run="{CYCLICTEST}" '
                      f'kairos.run="{TIDS}"',
           "-serial", f"file:{g.serial}"]
    g.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "KAIROS-CT-TIDS " in g.console().replace("KAIROS-CT-TIDS $", "")
                   or g.proc.poll() is not None, BOOT_TIMEOUT, "cyclictest's thread ids on the console")
        if g.proc.poll() is not None:
            out = g.proc.stdout.read().decode(errors="replace") if g.proc.stdout else ""
            pytest.fail(f"qemu exited with {g.proc.returncode}: {out[-2000:]}")
        yield g
    finally:
        stop_qemu(g.proc)


def thread_siblings(read: Reader, leader: int, leader_tid: int, layout: TaskLayout) -> Set[Tuple[int, int]]:
    """(task, tid) of the other threads of the process whose leader is at *leader*.

    A test helper, from kernel invariants only: ``task_struct.thread_group``
    (and ``thread_node``) are ``list_head``s whose ``next`` is the same member of
    another thread, whose ``prev`` points back at the leader's.  Any such link
    to a task with the leader's tgid and another tid is a thread of it.
    """
    raw = read_exact(read, leader, SCAN_BYTES, "the leader's task_struct")
    out: Set[Tuple[int, int]] = set()
    for off in range(0, SCAN_BYTES - 16, 8):
        nxt = struct.unpack_from("<Q", raw, off)[0]
        if nxt == leader + off or nxt < (1 << 63) + off:
            continue
        back, _ = try_read(read, nxt + 8, 8)
        if back is None or struct.unpack("<Q", back)[0] != leader + off:
            continue
        try:
            tid, tgid, _comm = task_ident(read, nxt - off, layout)
        except SymbolError:
            continue
        if tgid == leader_tid and tid != tgid:
            out.add((nxt - off, tid))
    return out


def test_cyclictest_targets_are_whole_periods_apart(running, record_property):
    m = re.search(r"KAIROS-CT-TIDS (\d+)((?: \d+)+)", running.console())
    assert m, running.console()[-3000:]
    pid, tids = int(m.group(1)), {int(t) for t in m.group(2).split()}
    assert pid in tids and len(tids) == 2, m.group(0)          # -t 1: the main thread and one measuring thread

    syms = kallsyms.load_vmlinuz(os.path.join(GUEST, "vmlinuz"), running.cache)
    with open_guest_ram(running.proc.pid, RAM) as mem:
        placed = place_kernel(mem.read, syms, mem.size)
        assert placed is not None and placed.up and placed.direct_map is not None
        rt = syms.runtime(placed.slide)
        walker = PageWalker(mem.read, placed, rt)
        read = walker.reader()
        layout = discover_layout(read, rt)
        tasks = task_list(read, rt, layout)
        by_tid = {tid: t for t, tid, tgid, _ in tasks}
        leader = by_tid[pid]
        assert [c for t, tid, _, c in tasks if tid == pid] == ["cyclictest"]
        siblings = thread_siblings(read, leader, pid, layout)
        assert {tid for _, tid in siblings} == tids - {pid}, siblings
        (thread, thread_tid), = siblings

        stack_off = discover_stack_offset(read, [by_tid[0], by_tid[1], by_tid[2], leader])
        top = task_stack_top(read, thread, stack_off)
        assert top - 16384 != task_stack_top(read, leader, stack_off) - 16384
        wakeup = rt.resolve("hrtimer_wakeup")

        seen: List[Optional[int]] = []
        wrong_task: List[Optional[int]] = []
        t0 = time.monotonic()
        slack: List[int] = []           # expires - _softexpires of the sleeper found, when still there
        for i in range(SAMPLES):
            seen.append(sleep_expiry(read, top, thread, wakeup))
            if seen[-1] is not None:
                stack = read(top - 16384, 16384)
                at = stack.find(struct.pack("<qQ", seen[-1], wakeup))     # _softexpires, function
                if at >= 8 and at % 8 == 0:
                    slack.append(struct.unpack_from("<q", stack, at - 8)[0] - seen[-1])
            wrong_task.append(sleep_expiry(read, top, leader, wakeup))
            time.sleep(max(0.0, t0 + (i + 1) * SPAN_S / SAMPLES - time.monotonic()))
        took = time.monotonic() - t0
        leader_sleep = sleep_expiry(read, task_stack_top(read, leader, stack_off), leader, wakeup)
        reads, nbytes = mem.reads, mem.bytes

    got = [e for e in seen if e is not None]
    distinct = sorted(set(got))
    diffs = [b - a for a, b in zip(distinct, distinct[1:])]
    print(f"\nsleepers: levels={walker.levels} slide={placed.slide:#x} stack offset {stack_off:#x}; "
          f"thread tid {thread_tid} stack top {top:#x}; {len(got)}/{SAMPLES} samples asleep in {took:.2f} s, "
          f"{len(distinct)} distinct targets {distinct[0] if distinct else None}..{distinct[-1] if distinct else None} ns; "
          f"differences / 4 ms: {[d / PERIOD_NS for d in diffs]}; leader's target {leader_sleep}; "
          f"{reads} physical reads, {nbytes} bytes; slack seen {sorted(set(slack))} ns in {len(slack)} re-reads")
    record_property("sleepers_samples_asleep", len(got))
    record_property("sleepers_distinct_targets", len(distinct))
    record_property("sleepers_differences_ns", diffs)

    assert wrong_task == [None] * SAMPLES                   # the sleeper names its own task
    assert got == sorted(got)                               # a periodic thread's targets only move forward
    assert len(distinct) >= 10, seen                        # it sleeps most of each 4 ms period
    assert all(d % PERIOD_NS == 0 for d in diffs), diffs     # exact: TIMER_ABSTIME targets
    # An RT task has no timer slack (__setscheduler_params): expires is the target too.
    assert slack and set(slack) == {0}, slack
