"""bench/rtquality's pure part: the guest's console summary, percentiles, clocks, server changes.

No I/O here: the bench feeds it console lines with the host time they arrived
(``(host_s, line)``), sched_getattr samples and live-state samples, and gets
figures back.  Times: guest latencies in µs (what cyclictest and rt-app
print), host times in seconds (``time.monotonic()``), servers in ns.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

RTQ = re.compile(r"RTQ ([A-Z][A-Z0-9-]*)(?: (.*))?$")
KV = re.compile(r"(\w+)=(\S*)")


def kv(text: str) -> Dict[str, str]:
    """``a=1 b=x`` -> {"a": "1", "b": "x"}."""
    return dict(KV.findall(text or ""))


@dataclass
class Hist:
    """A latency histogram: quantised value (µs) -> count, with the exact max."""

    counts: Dict[int, int] = field(default_factory=dict)

    def add_pairs(self, text: str) -> None:
        for pair in text.split():
            v, _, c = pair.partition(":")
            self.counts[int(v)] = self.counts.get(int(v), 0) + int(c)

    @property
    def n(self) -> int:
        return sum(self.counts.values())

    def quantile(self, q: float) -> Optional[int]:
        """The smallest value with at least q of the samples at or below it."""
        n = self.n
        if not n:
            return None
        need, cum = q * n, 0
        for v in sorted(self.counts):
            cum += self.counts[v]
            if cum >= need:
                return v
        return max(self.counts)

    def below(self, limit: int) -> int:
        return sum(c for v, c in self.counts.items() if v < limit)


@dataclass
class GuestRun:
    """What the guest's rtq printed, and when each line reached the host."""

    clock: Dict[str, str] = field(default_factory=dict)
    begin: Dict[str, str] = field(default_factory=dict)
    start: Optional[Tuple[float, float]] = None      # (host_s, guest uptime_s)
    stop: Optional[Tuple[float, float]] = None
    stop_info: Dict[str, str] = field(default_factory=dict)
    clk: List[Tuple[float, float]] = field(default_factory=list)   # (host_s, guest uptime_s)
    ct: Dict[str, str] = field(default_factory=dict)
    ct_hist: Hist = field(default_factory=Hist)
    ct_series: List[Optional[int]] = field(default_factory=list)   # per-second max, µs
    ra: Dict[str, str] = field(default_factory=dict)
    ra_slack: Hist = field(default_factory=Hist)
    ra_wulat: Hist = field(default_factory=Hist)
    ra_series: List[Optional[int]] = field(default_factory=list)   # per-second min slack, µs
    rtapp_pload_ns: Optional[int] = None
    calib_ns: Optional[int] = None
    errors: List[str] = field(default_factory=list)
    ready: Optional[float] = None
    ended: bool = False


def _series(text: str) -> List[Optional[int]]:
    return [None if x == "-" else int(x) for x in text.split()]


def parse_console(lines: Iterable[Tuple[float, str]]) -> GuestRun:
    """Fold the console lines (with their host arrival times) into a GuestRun."""
    g = GuestRun()
    for host_s, line in lines:
        if "KAIROS-GUEST READY" in line and g.ready is None:
            g.ready = host_s
        m = RTQ.search(line.rstrip("\r\n"))
        if not m:
            continue
        key, rest = m.group(1), m.group(2) or ""
        if key == "CLOCK":
            g.clock = kv(rest)
        elif key == "BEGIN":
            g.begin = kv(rest)
        elif key == "START":
            g.start = (host_s, float(kv(rest)["uptime"]))
        elif key == "STOP":
            g.stop_info = kv(rest)
            g.stop = (host_s, float(g.stop_info["uptime"]))
        elif key == "CLK":
            g.clk.append((host_s, float(rest)))
        elif key == "CT":
            g.ct = kv(rest)
        elif key == "CTH":
            g.ct_hist.add_pairs(rest)
        elif key == "CTS":
            g.ct_series += _series(rest)
        elif key == "RA":
            g.ra = kv(rest)
        elif key == "RAH":
            g.ra_slack.add_pairs(rest)
        elif key == "RAW":
            g.ra_wulat.add_pairs(rest)
        elif key == "RAS":
            g.ra_series += _series(rest)
        elif key == "RTAPP":
            g.rtapp_pload_ns = int(kv(rest)["pload_ns"])
        elif key == "CALIB":
            g.calib_ns = int(kv(rest)["ns"])
        elif key == "ERR":
            g.errors.append(rest)
        elif key == "END":
            g.ended = True
    return g


def marks(g: GuestRun) -> List[Tuple[float, float]]:
    """Every (host_s, guest_s) pair the guest printed, in order."""
    out = ([g.start] if g.start else []) + g.clk + ([g.stop] if g.stop else [])
    return sorted(out)


def offset_at(pairs: Sequence[Tuple[float, float]], host_s: float, span_s: float = 3.0
              ) -> Optional[float]:
    """Host minus guest clock near ``host_s``: the smallest offset of the marks within
    ``span_s`` of it.  A mark reaches the host late, never early (the guest reads its clock,
    then prints), so the minimum is the best estimate."""
    near = [h - gs for h, gs in pairs if abs(h - host_s) <= span_s]
    return min(near) if near else None


def stopped_outside(pairs: Sequence[Tuple[float, float]], t0: float, t1: float
                    ) -> Optional[float]:
    """Seconds the guest's clock stood still between host times t0 and t1 (the VM was
    stopped: under TCG guest time freezes with the VM, but runs on while its vCPU thread
    merely waits for the CPU).  Estimated from the marks at each end."""
    a = offset_at([p for p in pairs if p[0] >= t0 - 0.5], t0)
    b = offset_at([p for p in pairs if p[0] <= t1 + 0.5], t1)
    if a is None or b is None:
        return None
    return max(0.0, b - a)


def host_time_of_guest(pairs: Sequence[Tuple[float, float]], guest_s: float) -> Optional[float]:
    """Host arrival time of the first mark at or after guest time ``guest_s``."""
    for h, gs in pairs:
        if gs >= guest_s:
            return h
    return None


Server = Tuple[str, int, int, int, int]    # policy, priority, runtime_ns, deadline_ns, period_ns


def server_changes(samples: Sequence[Tuple[float, int, Server]], t0: float, t1: float
                   ) -> Tuple[int, List[Dict[str, object]]]:
    """Changes of any vCPU's (policy, priority, runtime, deadline, period) in [t0, t1),
    and every server seen there with the seconds it was in force (from the 20 ms polls)."""
    last: Dict[int, Server] = {}
    since: Dict[int, float] = {}
    held: Dict[Tuple[int, Server], float] = {}
    changes = 0
    for t, vcpu, srv in samples:
        prev = last.get(vcpu)
        if prev is not None and prev != srv:
            if t0 <= t < t1:
                changes += 1
            a, b = max(since[vcpu], t0), min(t, t1)
            if b > a:
                held[(vcpu, prev)] = held.get((vcpu, prev), 0.0) + b - a
            since[vcpu] = t
        elif prev is None:
            since[vcpu] = t
        last[vcpu] = srv
    for vcpu, srv in last.items():
        a, b = max(since[vcpu], t0), t1
        if b > a:
            held[(vcpu, srv)] = held.get((vcpu, srv), 0.0) + b - a
    seen = [{"vcpu": v, "server": fmt_server(s), "seconds": round(d, 2)}
            for (v, s), d in sorted(held.items(), key=lambda kv_: -kv_[1])]
    return changes, seen


def fmt_ns(ns: int) -> str:
    if ns >= 1_000_000 and ns % 1000 == 0:
        return f"{ns / 1e6:g}ms"
    if ns >= 1000:
        return f"{ns / 1e3:g}us"
    return f"{ns}ns"


def fmt_server(s: Server) -> str:
    policy, prio, runtime, deadline, period = s
    if policy == "deadline":
        return f"deadline {fmt_ns(runtime)}/{fmt_ns(deadline)}/{fmt_ns(period)}"
    if policy in ("fifo", "rr"):
        return f"{policy} {prio}"
    return policy


def counter_delta(samples: Sequence[Tuple[float, Dict[str, object]]], key: str, t0: float,
                  t1: float) -> Optional[float]:
    """Growth of a cumulative live-state counter between host times t0 and t1 (the last
    sample at or before each; the first sample if none is before t0)."""
    def at(t: float) -> Optional[float]:
        best = None
        for ts, d in samples:
            if ts <= t and d.get(key) is not None:
                best = float(d[key])  # type: ignore[arg-type]
        return best
    if not samples:
        return None
    a = at(t0)
    if a is None:
        a = 0.0  # counters start at 0 when introspection attaches
    b = at(t1)
    return None if b is None else max(0.0, b - a)
