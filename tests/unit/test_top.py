"""``kairosvm top``: frames rendered from fake samples, and the terminal loop
driven through a pipe and a pseudo-terminal (no libvirt)."""
from __future__ import annotations

import io
import os
import pty
import termios
from fractions import Fraction
from typing import List

import pytest

from kairos_libvirt import top
from kairos_libvirt.metrics import DomainSample, HostSample, VcpuSample

DL = {"policy": "deadline", "runtime_ns": 1_000_000, "period_ns": 10_000_000,
      "deadline_ns": 10_000_000, "priority": None}
FIFO = {"policy": "fifo", "runtime_ns": 3_000_000, "period_ns": 10_000_000,
        "deadline_ns": None, "priority": 40}


def fake_host(t: float, exec0: int = 0, hits=None, tasks=None, errors=False) -> HostSample:
    """A fake host at monotonic time ``t`` with one domain of two vCPUs."""
    v0 = VcpuSample(vcpu=0, tid=100, declared=DL, reserved=DL, policy="deadline",
                    runtime_ns=1_000_000, deadline_ns=10_000_000, period_ns=10_000_000,
                    priority=0, exec_ns=exec0, dl_runtime_ns=-361_516, guest_tasks=tasks)
    v1 = VcpuSample(vcpu=1, tid=101, declared=FIFO, reserved=FIFO, policy="fifo", priority=40,
                    rt_group=(3000, 10000), exec_ns=exec0 // 2, nr_throttled=7,
                    error="sched_setattr(tid 101): Operation not permitted" if errors else None)
    d = DomainSample(name="vm1", running=True, qemu_pid=99, agent_pid=98, agent_running=True,
                     ledger_state="running", vcpus=[v0, v1],
                     error="invalid declaration: x" if errors else None)
    if hits is not None:  # introspection on: gdbstub, 4 ms stopped per hit
        d.introspection = {"backend": "gdbstub", "state": "running", "hits": hits,
                           "handler_ns": hits * 4_000_000}
    return HostSample(monotonic=t, wall=0.0, domains=[d], capacity_cpus=Fraction(9, 5),
                      reserved_cpus=Fraction(2, 5), admission_refusals=1)


def row(lines: List[str], vcpu: int) -> List[str]:
    for ln in lines:
        cells = ln.split()
        if cells and cells[0] == str(vcpu) and len(cells) == len(top.COLUMNS) + 2:  # two-word scheds
            return cells
    raise AssertionError(f"no row for vCPU {vcpu} in {lines}")


def test_first_frame_has_no_rates():
    lines = top.render(fake_host(10.0))
    assert lines[1] == "capacity 1.8 CPU, reserved 0.4, 1 domain(s), admission refusals 1"
    assert "vm1: running (qemu 99), agent 98, ledger running" in lines
    cells = row(lines, 0)
    # vCPU TID DECLARED(2 words) ENFORCED(2 words) CPU% BUDGET% LEFT THROTTLED TASKS
    assert cells[:6] == ["0", "100", "dl", "1ms/10ms", "dl", "1ms/10ms"]
    assert cells[6:] == ["-", "-", "-362us", "-", "-"]
    assert "introspection" not in "\n".join(lines)  # off: nothing claimed


def test_rates_between_frames():
    prev = fake_host(10.0, exec0=0, hits=100)
    cur = fake_host(12.0, exec0=200_000_000, hits=160, tasks=3)  # 0.2 s CPU in 2 s
    lines = top.render(cur, prev)
    assert row(lines, 0)[6:] == ["10.0", "100", "-362us", "-", "3"]
    fifo = row(lines, 1)
    assert fifo[2:4] == ["fifo:40", "3ms/10ms"] and fifo[4:6] == ["fifo:40", "3ms/10ms"]
    assert fifo[6:] == ["5.0", "17", "-", "7", "-"]
    # 60 hits in 2 s, each 4 ms stopped: 30 traps/s, 12% of the time.
    assert "vm1: running (qemu 99), agent 98, ledger running; introspection gdbstub " \
        "running: 30 traps/s, 12.0% stopped" in lines
    first = top.render(cur)
    assert any(ln.endswith("introspection gdbstub running: - traps/s, -% stopped")
               for ln in first)


def test_a_restarted_vcpu_thread_has_no_rate():
    prev = fake_host(10.0, exec0=500)
    cur = fake_host(11.0, exec0=100)
    cur.domains[0].vcpus[0].tid = 555
    assert row(top.render(cur, prev), 0)[6] == "-"


def test_errors_libvirt_and_empty_host():
    lines = top.render(fake_host(1.0, errors=True))
    assert "  ! invalid declaration: x" in lines
    assert "  ! vCPU 1: sched_setattr(tid 101): Operation not permitted" in lines
    empty = HostSample(monotonic=0, wall=0, libvirt_error="cannot connect")
    text = "\n".join(top.render(empty))
    assert "libvirt: cannot connect (showing the ledger and the kernel only)" in text
    assert "no real-time domain" in text and "capacity ? CPU" in text


def test_width_and_height_limits():
    lines = top.render(fake_host(1.0), width=30, height=4)
    assert len(lines) == 4 and max(len(ln) for ln in lines) <= 30


@pytest.mark.parametrize("v, declared, enforced", [
    (VcpuSample(vcpu=0), "-", "-"),
    (VcpuSample(vcpu=0, declared={**DL, "deadline_ns": 5_000_000}, policy="other"),
     "dl 1ms/5ms/10ms", "other"),
    (VcpuSample(vcpu=0, declared=FIFO, policy="rr", priority=3), "fifo:40 3ms/10ms", "rr:3"),
    (VcpuSample(vcpu=0, declared=DL, policy="deadline", runtime_ns=1_540_000,
                deadline_ns=1_540_000, period_ns=15_000_000, source="introspection"),
     "dl 1ms/10ms", "dl 1540us/1540us/15ms*"),
])
def test_sched_texts(v, declared, enforced):
    assert (top.declared_text(v), top.enforced_text(v)) == (declared, enforced)


# --------------------------------------------------------------------------
# The loop


class FakeSource:
    """Fake sampler: a new fake host per call, 1 s apart."""

    def __init__(self, keys_fd=None, after: int = 1, keys: bytes = b"q",
                 interrupt: bool = False) -> None:
        self.calls, self.keys_fd, self.after, self.keys = 0, keys_fd, after, keys
        self.interrupt = interrupt

    def __call__(self) -> HostSample:
        self.calls += 1
        if self.interrupt and self.calls > self.after:
            raise KeyboardInterrupt
        if self.keys_fd is not None and self.calls == self.after:
            os.write(self.keys_fd, self.keys)
        return fake_host(float(self.calls), exec0=self.calls * 10_000_000)


def test_q_quits_the_live_view():
    r, w = os.pipe()
    out = io.StringIO()
    src = FakeSource(keys_fd=w, after=2)
    try:
        assert top.run_live(src, 0.1, out, r) == 0
    finally:
        os.close(r)
        os.close(w)
    text = out.getvalue()
    assert src.calls == 2 and text.startswith(top.ALT_ON + top.HIDE)
    assert text.count(top.HOME_CLEAR) == 2 and text.endswith(top.SHOW + top.ALT_OFF)
    assert "vm1: running" in text


def test_other_keys_do_not_quit():
    r, w = os.pipe()
    src = FakeSource(keys_fd=w, after=1, keys=b"x", interrupt=True)
    try:
        assert top.run_live(src, 0.1, io.StringIO(), r) == 0  # ended by the interrupt
    finally:
        os.close(r)
        os.close(w)
    assert src.calls == 2


def test_ctrl_c_restores_the_screen():
    out = io.StringIO()
    assert top.run_live(FakeSource(after=1, interrupt=True), 0.1, out, None) == 0
    assert out.getvalue().endswith(top.SHOW + top.ALT_OFF)


def test_stdin_at_eof_keeps_refreshing():
    r, w = os.pipe()
    os.close(w)  # EOF at once: no key can ever come
    try:
        keys, fd = top.wait_key(r, 1.0)
        assert (keys, fd) == ("", None)
        src = FakeSource(after=3, interrupt=True)
        assert top.run_live(src, 0.1, io.StringIO(), r) == 0
        assert src.calls == 4
    finally:
        os.close(r)


def test_the_terminal_mode_is_restored():
    master, slave = pty.openpty()
    try:
        before = termios.tcgetattr(slave)
        # The key comes after the switch to cbreak (which flushes pending input).
        assert top.run_live(FakeSource(keys_fd=master), 0.1, io.StringIO(), slave) == 0
        assert termios.tcgetattr(slave) == before
    finally:
        os.close(master)
        os.close(slave)


def test_once_prints_one_plain_frame():
    out = io.StringIO()
    src = FakeSource()
    assert top.run_once(src, 0.1, out) == 0
    text = out.getvalue()
    assert src.calls == 2 and "\x1b" not in text
    assert row(text.splitlines(), 0)[6] == "1.0"  # 10 ms of CPU in 1 s between the samples
