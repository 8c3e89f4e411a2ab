"""Guest-kernel symbols against a real guest: the project's test guest (Debian 6.1,
KASLR on) booted with plain ``qemu-system-x86_64 -accel tcg`` and read through
its gdbstub with our RSP client.  Ground truth: the ``KAIROS-GUEST KSYM`` lines
the guest's /init prints from its own /proc/kallsyms.

Timings are printed (``pytest -s``) and kept as test properties.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from typing import Callable, Dict, Iterator

import pytest

from kairos_libvirt.introspect import kallsyms
from kairos_libvirt.introspect.layout import current_task, discover_layout, percpu_base, task_ident, task_list
from kairos_libvirt.introspect.rsp.client import RspClient
from kairos_libvirt.introspect.census import Census
from kairos_libvirt.introspect.plan import PT_REGS_SIZE, THREAD_SIZE
from kairos_libvirt.introspect.schedlayout import SchedState, discover_sched_layout, read_sched
from kairos_libvirt.introspect.symbols import GuestSymbols, fentry_site, find_slide
from tests.conftest import skip_or_fail

pytestmark = pytest.mark.kernel

GUEST = os.environ.get("KAIROS_GUEST_DIR", "/var/lib/kairos/guest")
KSYMS = ["__x64_sys_sched_setattr", "linux_banner", "init_task", "__x64_sys_clock_nanosleep", "_text",
         "current_task"]
BOOT_TIMEOUT = 90.0
#: Real-time programs that set their policy before anyone connects (schedlayout reads them).
#: Each prints a mark once its policy is set (the shell runs under it), then becomes "sleep".
#: (The mark carries the shell's pid: the guest's RUN line echoes the command itself.)
RT_PROGRAMS = tuple(f"chrt {how} sh -c 'echo KAIROS-RT-SET-$$; exec sleep 100000'" for how in (
    "-f 42", "-r 7", "-d --sched-runtime 2000000 --sched-deadline 5000000 --sched-period 10000000 0")) + (
    # A multi-threaded RT program: cyclictest's measuring thread runs SCHED_FIFO 80, its main thread not.
    "cyclictest -q -m -p 80 -i 4000 -t 1 & until cat /proc/$!/task/*/stat | "
    "awk '$41 == 1 {f = 1} END {exit !f}'; do sleep 0.2; done; echo KAIROS-RT-SET-$$; wait",)


def wait_until(cond: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def serial_text(path: str) -> str:
    """What the guest wrote on its serial console so far ("" before the file exists)."""
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


class Guest:
    def __init__(self, workdir: str) -> None:
        self.vmlinuz = os.path.join(GUEST, "vmlinuz")
        self.serial = os.path.join(workdir, "serial.log")
        self.gdb = os.path.join(workdir, "gdb.sock")
        self.cache = os.path.join(workdir, "ksyms")
        self.proc: "subprocess.Popen[bytes]"
        self.ksyms: Dict[str, int] = {}
        self.client: RspClient
        self.times: Dict[str, float] = {}

    def console(self) -> str:
        return serial_text(self.serial)

    def read(self, addr: int, n: int) -> bytes:
        return self.client.read_memory(addr, n)


@pytest.fixture(scope="module")
def guest(tmp_path_factory) -> Iterator[Guest]:
    qemu = qemu_and_guest()
    g = Guest(str(tmp_path_factory.mktemp("guest")))
    cmd = [qemu, "-accel", "tcg", "-m", "256", "-smp", "1", "-display", "none", "-monitor", "none",
           "-no-reboot", "-kernel", g.vmlinuz, "-initrd", os.path.join(GUEST, "initrd.img"),
           "-append", f"console=ttyS0 quiet panic=-1 kairos.heartbeat=0 kairos.ksyms={','.join(KSYMS)} "
                      + " ".join(f'kairos.run="{c}"' for c in RT_PROGRAMS),
           "-serial", f"file:{g.serial}", "-gdb", f"unix:{g.gdb},server=on,wait=off"]
    t0 = time.monotonic()
    g.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: len(re.findall(r"KAIROS-RT-SET-\d+", g.console())) == len(RT_PROGRAMS)
                   or g.proc.poll() is not None, BOOT_TIMEOUT, "the guest's RT programs to start")
        if g.proc.poll() is not None:
            out = g.proc.stdout.read().decode(errors="replace") if g.proc.stdout else ""
            pytest.fail(f"qemu exited with {g.proc.returncode}: {out[-2000:]}")
        g.times["boot to READY"] = time.monotonic() - t0
        for m in re.finditer(r"KAIROS-GUEST KSYM (\S+) ([0-9a-f]+)", g.console()):
            g.ksyms[m.group(1)] = int(m.group(2), 16)
        assert set(g.ksyms) == set(KSYMS), g.console()[-3000:]
        g.client = RspClient.connect_unix(g.gdb)     # pauses the guest: a consistent view
        try:
            yield g
        finally:
            g.client.detach()
            g.client.close()
    finally:
        stop_qemu(g.proc)
        if g.times:
            print("\nguest-symbol timings: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in g.times.items()))


def stop_qemu(p: "subprocess.Popen[bytes]") -> None:
    p.terminate()
    try:
        p.wait(10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(10)


def qemu_and_guest() -> str:
    """qemu-system-x86_64's path, once the test guest is there (else skip, or fail in CI)."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        skip_or_fail("kernel", "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    for f in ("vmlinuz", "initrd.img"):
        if not os.path.exists(os.path.join(GUEST, f)):
            skip_or_fail("kernel", f"no test guest in {GUEST} ({f} missing): run sudo guest/build")
    return qemu  # type: ignore[return-value]


def timed(g: Guest, what: str, fn: Callable, *args, **kw):
    t = time.monotonic()
    out = fn(*args, **kw)
    g.times[what] = time.monotonic() - t
    return out


@pytest.fixture(scope="module")
def from_vmlinuz(guest: Guest) -> GuestSymbols:
    return timed(guest, "vmlinuz recovery (cache miss)", kallsyms.load_vmlinuz, guest.vmlinuz, guest.cache)


def test_vmlinuz_symbols_and_slide_match_the_guest(guest, from_vmlinuz, record_property):
    syms = from_vmlinuz
    assert len(syms) > 50000 and syms.banner.startswith("Linux version 6.")
    assert syms.build_id and len(syms.build_id) == 40
    slide = timed(guest, "slide detection", find_slide, guest.read, syms)
    assert slide % 0x200000 == 0
    assert slide == guest.ksyms["_text"] - syms.address("_text")
    for name, want in guest.ksyms.items():
        assert syms.resolve(name, slide) == want, name
    assert syms.resolve("current_task", slide) == syms.address("current_task")  # per-CPU: not slid
    cached = timed(guest, "vmlinuz cache hit", kallsyms.load_vmlinuz, guest.vmlinuz, guest.cache)
    assert "(cached)" in cached.source and cached.names == syms.names
    assert list(cached.addresses) == list(syms.addresses) and cached.types == syms.types
    assert guest.times["vmlinuz cache hit"] < 1.0
    for k, v in guest.times.items():
        record_property(k, round(v, 3))


def test_memory_symbols_equal_vmlinuz_symbols(guest, from_vmlinuz, tmp_path):
    mem = timed(guest, "memory recovery", kallsyms.recover_from_memory, guest.read)
    assert mem.banner == from_vmlinuz.banner
    assert mem.names == from_vmlinuz.names and mem.types == from_vmlinuz.types
    assert list(mem.addresses) == list(from_vmlinuz.addresses)
    kallsyms.SymbolCache(str(tmp_path)).put(mem)
    again = timed(guest, "memory cache hit", kallsyms.load_from_memory, guest.read, str(tmp_path))
    assert "(cached)" in again.source and list(again.addresses) == list(mem.addresses)


def test_fentry_nop_at_syscall_entries(guest, from_vmlinuz):
    rt = from_vmlinuz.runtime(find_slide(guest.read, from_vmlinuz))
    for name in ("__x64_sys_sched_setattr", "__x64_sys_clock_nanosleep"):
        addr = rt.resolve(name)
        assert fentry_site(guest.read, addr) == addr   # Debian 6.1: no endbr64 in front
        assert guest.read(addr, 5) == bytes.fromhex("0f1f440000")


def test_task_layout_and_current_task(guest, from_vmlinuz, record_property):
    rt = from_vmlinuz.runtime(find_slide(guest.read, from_vmlinuz))
    layout = timed(guest, "task layout discovery", discover_layout, guest.read, rt)
    print(f"\ntask_struct offsets: {layout}")
    tasks = task_list(guest.read, rt, layout)
    idents = {tid: comm for _, tid, tgid, comm in tasks if tid == tgid}
    assert idents[0] == "swapper/0" and idents[1] == "init" and idents[2] == "kthreadd"
    assert any(comm == "acpid" for comm in idents.values())       # started by /init before READY
    init_addr = next(t for t, tid, _, _ in tasks if tid == 1)
    assert task_ident(guest.read, init_addr, layout) == (1, 1, "init")
    regs = guest.client.read_registers()
    base0 = percpu_base(guest.read, rt, 0)
    # The per-CPU base is in GS in the kernel, or in KERNEL_GS_BASE while user
    # mode runs (and in the entry code before swapgs, even at CPL 0).
    assert base0 in (regs["gs_base"], regs["k_gs_base"]), {k: hex(v) for k, v in regs.items()}
    cur = current_task(guest.read, base0, rt)
    tid, tgid, comm = task_ident(guest.read, cur, layout)
    assert cur in {t for t, _, _, _ in tasks} or comm.startswith("swapper/") or tid != tgid
    record_property("task_layout", repr(layout))


def test_policies_set_before_the_attach_read_from_task_structs(guest, from_vmlinuz, record_property):
    rt = from_vmlinuz.runtime(find_slide(guest.read, from_vmlinuz))
    layout = discover_layout(guest.read, rt)
    sl = timed(guest, "sched layout discovery", discover_sched_layout, guest.read, rt, layout)
    print(f"\ntask_struct scheduling offsets: {sl}")
    states, by_tid = {}, {}
    for t, tid, _tgid, comm in task_list(guest.read, rt, layout):
        by_tid[tid] = read_sched(guest.read, t, sl)[0]
        states.setdefault(comm, []).append(by_tid[tid])
    assert by_tid[1] == SchedState("other") and by_tid[2] == SchedState("other")
    assert SchedState("fifo", 99) in states["migration/0"]
    assert sorted((s for s in states["sleep"] if s.realtime), key=repr) == sorted(
        [SchedState("fifo", 42), SchedState("rr", 7),
         SchedState("deadline", runtime_ns=2_000_000, deadline_ns=5_000_000, period_ns=10_000_000)],
        key=repr), states["sleep"]
    assert sl.dl is not None
    record_property("sched_layout", repr(sl))


def test_census_finds_threads_and_their_trap_keys(guest, from_vmlinuz, record_property):
    rt = from_vmlinuz.runtime(find_slide(guest.read, from_vmlinuz))
    layout = discover_layout(guest.read, rt)
    sl = discover_sched_layout(guest.read, rt, layout)
    census = Census(guest.read, rt, layout)
    tasks = timed(guest, "census", census.tasks)
    assert census.thread_off is not None
    procs = {tid for _, tid, _, _ in task_list(guest.read, rt, layout)}
    cyc = [t for t in tasks if t.comm == "cyclictest"]
    assert len(cyc) == 2 and len({t.tgid for t in cyc}) == 1, cyc   # main thread + measuring thread
    assert not any(t.kthread for t in cyc) and all(t.kthread for t in tasks if t.comm == "kthreadd")
    assert all(t.kthread for t in tasks if t.comm.startswith("migration/"))
    (thread,) = [t for t in cyc if t.tid != t.tgid]
    assert thread.tid not in procs                                   # only the census sees it
    assert read_sched(guest.read, thread.addr, sl)[0] == SchedState("fifo", 80)
    # Its key is where its pt_regs sit: the top of its 16 KiB stack.
    key = int(thread.key, 16)
    assert (key + PT_REGS_SIZE) % THREAD_SIZE == 0 and len({t.key for t in tasks}) == len(tasks)
    print(f"\ncensus: {len(tasks)} tasks, {len(procs)} processes, thread list at "
          f"{census.thread_off:#x}, stack at {census.stack_off:#x}")
    record_property("census_tasks", len(tasks))
