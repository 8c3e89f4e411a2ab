"""``kairosvm top``: a live view of every real-time domain, per vCPU.

Each frame is one :func:`kairos_libvirt.metrics.sample` of the host; rates
(CPU use, trap events per second, time stopped in the trap handler) are the
difference between two frames.
Plain ANSI (alternate screen, home + clear, one write per frame) and a
cbreak terminal so that ``q`` quits without Enter; ``--once`` prints one
frame without escape codes, for scripts and logs.

Columns per vCPU:

=========  ==============================================================
DECLARED   the declaration (``dl runtime/period``, ``dl runtime/deadline/period``,
           ``fifo:PRIO runtime/period``)
ENFORCED   what the kernel says now (``sched_getattr``, RT group files); a ``*``
           marks a reservation introspection resized (the live state's source)
CPU%       CPU time the vCPU thread used between frames, % of one CPU
BUDGET%    CPU% / the reserved bandwidth: 100 = the vCPU uses all of it
LEFT       ``dl.runtime``: runtime left in the current deadline period (negative:
           the vCPU overran its budget and is throttled until its next period)
THROTTLED  the kernel's throttle count, where ``/proc/.../sched`` has one
TASKS      guest real-time tasks introspection found on the vCPU ("-": introspection off)
=========  ==============================================================

The domain's line adds introspection, when on: its backend and state, trap
events per second, and the share of time the guest stood stopped in the trap
handler (its overhead); "-" until two frames exist.
"""
from __future__ import annotations

import os
import select
import shutil
import time
from typing import Callable, Dict, List, Optional, TextIO, Tuple

from .metrics import DomainSample, HostSample, VcpuSample
from .units import format_fraction, format_ns

ALT_ON, ALT_OFF = "\x1b[?1049h", "\x1b[?1049l"
HIDE, SHOW = "\x1b[?25l", "\x1b[?25h"
HOME_CLEAR = "\x1b[H\x1b[2J"
QUIT_KEYS = frozenset("qQ")

COLUMNS = ("vCPU", "TID", "DECLARED", "ENFORCED", "CPU%", "BUDGET%", "LEFT", "THROTTLED",
           "TASKS")
_W = 24  # DECLARED, ENFORCED
_ROW = "{:>5} {:>8}  {:<24} {:<24} {:>5} {:>7} {:>7} {:>9} {:>5}"


def _sched_text(policy: Optional[str], runtime_ns: Optional[int], deadline_ns: Optional[int],
                period_ns: Optional[int], priority: Optional[int]) -> str:
    if policy is None:
        return "-"
    if policy == "deadline":
        r, p = format_ns(runtime_ns or 0), format_ns(period_ns or 0)
        if deadline_ns and deadline_ns != period_ns:
            return f"dl {r}/{format_ns(deadline_ns)}/{p}"
        return f"dl {r}/{p}"
    if policy in ("fifo", "rr"):
        budget = f" {format_ns(runtime_ns)}/{format_ns(period_ns)}" \
            if runtime_ns is not None and period_ns else ""
        return f"{policy}:{priority}{budget}"
    return policy


def declared_text(v: VcpuSample) -> str:
    d = v.declared
    if d is None:
        return "-"
    return _sched_text(d["policy"], d["runtime_ns"], d.get("deadline_ns"), d["period_ns"],
                       d.get("priority"))


def enforced_text(v: VcpuSample) -> str:
    mark = "*" if v.source == "introspection" else ""
    if v.policy in ("fifo", "rr"):
        rt = v.rt_group
        return _sched_text(v.policy, rt[0] * 1000 if rt else None, None,
                           rt[1] * 1000 if rt else None, v.priority) + mark
    return _sched_text(v.policy, v.runtime_ns, v.deadline_ns, v.period_ns, v.priority) + mark


def cpu_percent(cur: VcpuSample, prev: Optional[VcpuSample], dt: float) -> Optional[float]:
    """CPU time of one vCPU thread between two samples, in % of one CPU."""
    if prev is None or dt <= 0 or prev.tid != cur.tid or cur.exec_ns is None \
            or prev.exec_ns is None:
        return None
    return max(cur.exec_ns - prev.exec_ns, 0) / 1e9 / dt * 100


def trap_rates(cur: DomainSample, prev: Optional[DomainSample], dt: float
               ) -> Tuple[Optional[float], Optional[float]]:
    """(trap events per second, % of time stopped in the handler) between two samples."""
    if prev is None or dt <= 0 or not cur.introspection or not prev.introspection:
        return None, None

    def delta(key: str) -> Optional[int]:
        a, b = cur.introspection.get(key), prev.introspection.get(key)  # type: ignore
        return max(a - b, 0) if isinstance(a, int) and isinstance(b, int) else None

    hits, handler = delta("hits"), delta("handler_ns")
    return (None if hits is None else hits / dt,
            None if handler is None else handler / 1e9 / dt * 100)


def _num(x: Optional[float], fmt: str = "{:.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def vcpu_row(v: VcpuSample, prev: Optional[VcpuSample], dt: float) -> str:
    cpu = cpu_percent(v, prev, dt)
    bw = v.reserved_bandwidth
    budget = cpu / float(bw * 100) * 100 if cpu is not None and bw else None
    left = f"{v.dl_runtime_ns / 1000:.0f}us" \
        if v.policy == "deadline" and v.dl_runtime_ns is not None else "-"
    return _ROW.format(v.vcpu, v.tid or "-", declared_text(v)[:_W], enforced_text(v)[:_W],
                       _num(cpu), _num(budget, "{:.0f}"), left,
                       "-" if v.nr_throttled is None else v.nr_throttled,
                       "-" if v.guest_tasks is None else v.guest_tasks)


def domain_header(d: DomainSample, prev: Optional[DomainSample] = None, dt: float = 0.0
                  ) -> str:
    state = f"running (qemu {d.qemu_pid})" if d.running else "not running"
    agent = f"agent {d.agent_pid}" if d.agent_running and d.agent_pid else \
        ("agent starting" if d.agent_running else "no agent")
    line = f"{d.name}: {state}, {agent}, ledger {d.ledger_state or '-'}"
    i = d.introspection
    if i:
        per_s, stopped = trap_rates(d, prev, dt)
        line += (f"; introspection {i.get('backend')} {i.get('state')}: "
                 f"{_num(per_s, '{:.0f}')} traps/s, {_num(stopped, '{:.1f}')}% stopped")
    return line


def render(cur: HostSample, prev: Optional[HostSample] = None, width: int = 120,
           height: int = 0, interval: Optional[float] = None) -> List[str]:
    """One frame as lines (pure: tests feed it fake samples)."""
    clock = time.strftime("%H:%M:%S", time.localtime(cur.wall))
    cap = format_fraction(cur.capacity_cpus) if cur.capacity_cpus is not None else "?"
    lines = [f"kairosvm top  {clock}"
             + (f"  every {interval:g}s, q quits" if interval else ""),
             f"capacity {cap} CPU, reserved {format_fraction(cur.reserved_cpus)}, "
             f"{len(cur.domains)} domain(s), admission refusals {cur.admission_refusals}"]
    if cur.libvirt_error:
        lines.append(f"libvirt: {cur.libvirt_error} (showing the ledger and the kernel only)")
    if not cur.domains:
        lines.append("")
        lines.append("no real-time domain: the ledger is empty and no running domain "
                     "declares <kairos:realtime>")
    dt = cur.monotonic - prev.monotonic if prev else 0.0
    before: Dict[Tuple[str, int], VcpuSample] = {}
    prev_domains: Dict[str, DomainSample] = {}
    if prev:
        before = {(d.name, v.vcpu): v for d in prev.domains for v in d.vcpus}
        prev_domains = {d.name: d for d in prev.domains}
    for d in cur.domains:
        lines.append("")
        lines.append(domain_header(d, prev_domains.get(d.name), dt))
        if d.error:
            lines.append(f"  ! {d.error}")
        lines.append(_ROW.format(*COLUMNS))
        for v in d.vcpus:
            lines.append(vcpu_row(v, before.get((d.name, v.vcpu)), dt))
            if v.error:
                lines.append(f"  ! vCPU {v.vcpu}: {v.error}")
    lines = [ln[:width] for ln in lines]
    return lines[:height] if height > 0 else lines


# --------------------------------------------------------------------------
# The terminal loop


def wait_key(fd: Optional[int], timeout: float) -> Tuple[str, Optional[int]]:
    """Wait up to ``timeout`` for input on ``fd``: (keys read, fd still usable or None)."""
    if fd is None:
        time.sleep(timeout)
        return "", None
    ready, _w, _x = select.select([fd], [], [], timeout)
    if not ready:
        return "", fd
    data = os.read(fd, 64)
    if not data:  # EOF: no more keys will come; keep refreshing
        return "", None
    return data.decode(errors="replace"), fd


def run_once(sample_fn: Callable[[], HostSample], interval: float, out: TextIO) -> int:
    first = sample_fn()
    time.sleep(interval)
    width = shutil.get_terminal_size((200, 50)).columns if out.isatty() else 1000
    out.write("\n".join(render(sample_fn(), first, width)) + "\n")
    out.flush()
    return 0


def run_live(sample_fn: Callable[[], HostSample], interval: float, out: TextIO,
             fd: Optional[int]) -> int:
    """Refresh every ``interval`` s until ``q`` (or Ctrl-C).  ``fd``: keys, or None."""
    import termios
    import tty
    tty_fd, old = fd, None
    if fd is not None and os.isatty(fd):
        old = termios.tcgetattr(fd)
        tty.setcbreak(fd)
    out.write(ALT_ON + HIDE)
    prev: Optional[HostSample] = None
    try:
        while True:
            cur = sample_fn()
            size = shutil.get_terminal_size((120, 40))
            lines = render(cur, prev, size.columns, size.lines, interval)
            out.write(HOME_CLEAR + "\n".join(lines))
            out.flush()
            prev = cur
            deadline = time.monotonic() + interval
            while True:
                keys, fd = wait_key(fd, max(deadline - time.monotonic(), 0.0))
                if QUIT_KEYS & set(keys):
                    return 0
                if time.monotonic() >= deadline:
                    break
    except KeyboardInterrupt:
        return 0
    finally:
        out.write(SHOW + ALT_OFF)
        out.flush()
        if old is not None:
            termios.tcsetattr(tty_fd, termios.TCSADRAIN, old)
