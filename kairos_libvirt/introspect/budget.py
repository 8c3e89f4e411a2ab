"""The stop budget: how long introspection may hold the guest stopped.

A gdbstub breakpoint, an interrupt to arm or disarm a site, and the attach
itself all stop the whole VM (DESIGN.md §2: 3-4.5 ms a hit under TCG).  This
account is what keeps that from harming the guest:

- **share**: the time the VM stands stopped for us in any window of
  ``window_ns`` (1 s) is at most ``share * window_ns``;
- **max_stop_ns**: the longest single stop a trap (or an arm/disarm) may take;
- **attach**: the one stop that opens the gdbstub, verifies the slide and
  arms the sites has its own stated allowance (``attach_stop_ns`` each, at
  most ``attach_limit`` of them), since it cannot be split into 10 ms pieces.

Traps are *permitted*, not stopped: a backend asks :meth:`StopBudget.can_stop`
before it lets the guest run with sites armed (at the end of every stop, and
before it interrupts the guest to re-arm).  If one more stop of the expected
length would overrun the share in the window that stop would close, the
backend disarms and waits; the guest never waits for the budget.

The guarantee, and its one condition: a check at time *t* admits a stop only
if the stops in ``(t + d - W, t]`` plus *d* fit the share, where *d* is the
expected length of the next stop (1.5 x the longest of the recent stops,
never above ``max_stop_ns``).  Any window that the next stop closes then
holds at most the share, as long as that stop is no longer than *d*.  A stop
that runs longer shows in ``peak_window_ns`` and ``long_stops``: the account
reports what happened, it does not assume it.

Pure arithmetic with an injectable clock (ns), no I/O.
"""
from __future__ import annotations

import collections
import time
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Deque, Dict, Optional, Tuple

__all__ = ["BudgetSpec", "StopBudget", "DEFAULT_SPEC", "WINDOW_NS", "spec_from_json"]

#: The sliding window the share is measured over.
WINDOW_NS = 1_000_000_000


@dataclass(frozen=True)
class BudgetSpec:
    """What a domain allows introspection (``<introspection stop-share=… max-stop=… attach-stop=…>``).

    Defaults: 5 % of any 1 s window (the issue's bound while periods are
    learnt; the sampling policy brings steady state far lower), 10 ms per
    stop (two or three gdbstub hits under TCG), 250 ms for the attach stop,
    at most 3 attach stops per agent.
    """

    share: Fraction = Fraction(5, 100)
    max_stop_ns: int = 10_000_000
    attach_stop_ns: int = 250_000_000
    attach_limit: int = 3
    window_ns: int = WINDOW_NS
    #: What a breakpoint hit costs the guest after the stop, charged to the window as
    #: if the VM had stood stopped that much longer.  Not the admin's to set: a fact
    #: of the host (backends.hit_cost_ns: QEMU < 10.2 under TCG flushes all translated
    #: code at every hit, docs/gdbcost.md); 0 where a hit costs only its stop.
    hit_cost_ns: int = 0

    def __post_init__(self) -> None:
        assert 0 < self.share <= 1, self.share
        assert 0 < self.max_stop_ns <= self.share * self.window_ns, \
            "programming error: a single stop must fit the window's share"
        assert self.attach_stop_ns > 0 and self.attach_limit >= 1

    @property
    def window_budget_ns(self) -> int:
        """Stopped ns allowed in any window."""
        return int(self.share * self.window_ns)

    def as_json(self) -> Dict[str, object]:
        return {"stop_share": str(self.share), "max_stop_ns": self.max_stop_ns,
                "attach_stop_ns": self.attach_stop_ns, "window_ns": self.window_ns}


DEFAULT_SPEC = BudgetSpec()


def spec_from_json(d: Optional[Dict[str, object]]) -> BudgetSpec:
    """The spec :meth:`BudgetSpec.as_json` wrote (ledger entry); missing keys keep the defaults."""
    if not d:
        return DEFAULT_SPEC
    kw: Dict[str, object] = {}
    if d.get("stop_share") is not None:
        kw["share"] = Fraction(str(d["stop_share"]))
    for key in ("max_stop_ns", "attach_stop_ns", "window_ns"):
        if d.get(key) is not None:
            kw[key] = int(d[key])  # type: ignore[arg-type]
    return BudgetSpec(**kw)  # type: ignore[arg-type]

#: Recent stop lengths the expected length of the next stop is taken from.
_RECENT = 16
#: Margin on the longest recent stop (TCG hits vary by about 1.5x: 3-4.5 ms).
_MARGIN = Fraction(3, 2)


class StopBudget:
    """The backend's own account of the VM's stops, and the gate on the next one."""

    def __init__(self, spec: BudgetSpec = DEFAULT_SPEC,
                 clock: Callable[[], int] = time.monotonic_ns) -> None:
        self.spec = spec
        self.clock = clock
        #: (start_ns, end_ns, is_attach) of the stops that may still fall in a window.
        self._stops: Deque[Tuple[int, int, bool]] = collections.deque()
        self._recent: Deque[int] = collections.deque(maxlen=_RECENT)
        self._open: Optional[Tuple[int, str]] = None
        self.total_ns = 0            # every stop, attach included
        self.stops = 0
        self.longest_ns = 0          # longest stop other than an attach
        self.peak_window_ns = 0      # most stopped ns in any window, attach stops excluded
        self.long_stops = 0          # stops longer than max_stop_ns (attach: attach_stop_ns)
        self.attaches = 0
        self.attach_longest_ns = 0
        self.charged_ns = 0          # hit costs charged beyond the stops (spec.hit_cost_ns)
        self.waits = 0               # times armed sites were taken off to wait for the budget
        self.wait_ns = 0             # time sites stood off for the budget
        self._waiting_since: Optional[int] = None

    # -- recording -------------------------------------------------------
    def begin(self, kind: str = "trap", now: Optional[int] = None) -> int:
        """The VM stopped for us now (a hit seen, an interrupt sent, the gdbstub attached)."""
        t = self.clock() if now is None else now
        if self._open is None:
            self._open = (t, kind)
        return self._open[0]

    @property
    def stopped(self) -> bool:
        return self._open is not None

    def stopped_for(self, now: Optional[int] = None) -> int:
        """How long the open stop has lasted (0: the VM runs)."""
        if self._open is None:
            return 0
        return (self.clock() if now is None else now) - self._open[0]

    def end(self, now: Optional[int] = None) -> int:
        """The VM runs again; returns the stop's length (0 if no stop was open)."""
        if self._open is None:
            return 0
        start, kind = self._open
        self._open = None
        return self.record(start, self.clock() if now is None else now, kind)

    def record(self, start_ns: int, end_ns: int, kind: str = "trap") -> int:
        """Account one stop [start_ns, end_ns); returns its length."""
        assert end_ns >= start_ns, (start_ns, end_ns)
        d = end_ns - start_ns
        self.total_ns += d
        self.stops += 1
        if kind == "attach":
            self.attaches += 1
            self.attach_longest_ns = max(self.attach_longest_ns, d)
            if d > self.spec.attach_stop_ns:
                self.long_stops += 1
        else:
            self.longest_ns = max(self.longest_ns, d)
            self._recent.append(d)
            if d > self.spec.max_stop_ns:
                self.long_stops += 1
        charge = self.spec.hit_cost_ns if kind == "trap" else 0
        self.charged_ns += charge
        self._stops.append((start_ns, end_ns + charge, kind == "attach"))
        self._forget(end_ns)
        if kind != "attach":
            # The busiest window ends at the end of some stop: this one's is checked now.
            self.peak_window_ns = max(self.peak_window_ns,
                                      self.stopped_in(end_ns - self.spec.window_ns, end_ns,
                                                      attach=False))
        return d

    def _forget(self, now: int) -> None:
        lo = now - 2 * self.spec.window_ns
        while self._stops and self._stops[0][1] <= lo:
            self._stops.popleft()

    def stopped_in(self, lo: int, hi: int, attach: bool = True) -> int:
        """Stopped ns inside [lo, hi] (the open stop counts up to hi); ``attach``: include attach stops."""
        total = 0
        for s, e, is_attach in self._stops:
            if is_attach and not attach:
                continue
            total += max(0, min(e, hi) - max(s, lo))
        if self._open is not None and (attach or self._open[1] != "attach"):
            total += max(0, hi - max(self._open[0], lo))
        return total

    # -- the gate --------------------------------------------------------
    @property
    def expected_stop_ns(self) -> int:
        """The length the next stop itself is reserved for."""
        if not self._recent:
            return self.spec.max_stop_ns
        return min(self.spec.max_stop_ns, int(max(self._recent) * _MARGIN))

    @property
    def expected_ns(self) -> int:
        """What the next hit is reserved for: its stop and the cost after it."""
        return self.expected_stop_ns + self.spec.hit_cost_ns

    def _reserve(self, n: int, hits: Optional[int]) -> int:
        """``n`` stops, ``hits`` of them breakpoint hits (default: all)."""
        return n * self.expected_stop_ns + (n if hits is None else hits) * self.spec.hit_cost_ns

    def can_stop(self, n: int = 1, now: Optional[int] = None, hits: Optional[int] = None) -> bool:
        """May the guest run with traps armed (``n`` stops of the expected length ahead)?

        Checked while the VM is stopped (the open stop counts) or running.
        Attach stops count here too: traps wait until an attach left the window.
        """
        t = self.clock() if now is None else now
        d = self._reserve(n, hits)
        return self.stopped_in(t + d - self.spec.window_ns, t) + d <= self.spec.window_budget_ns

    def wait_left_ns(self, n: int = 1, now: Optional[int] = None) -> int:
        """How long until :meth:`can_stop` surely holds if nothing else stops the VM (0: now).

        An upper bound: the first time a whole recorded stop has left the window.
        """
        t = self.clock() if now is None else now
        if self.can_stop(n, t):
            return 0
        d = n * self.expected_ns
        # The sum only falls as stops slide out of the window: try each stop end.
        for _s, e, _a in sorted(self._stops, key=lambda x: x[1]):
            later = e + self.spec.window_ns - d
            if later > t and self.can_stop(n, later):
                return later - t
        return self.spec.window_ns

    def can_attach(self) -> bool:
        """One more attach stop within the stated allowance?"""
        return self.attaches < self.spec.attach_limit

    # -- waiting ---------------------------------------------------------
    def start_wait(self, now: Optional[int] = None) -> None:
        """Sites went off for the budget."""
        if self._waiting_since is None:
            self._waiting_since = self.clock() if now is None else now
            self.waits += 1

    def stop_wait(self, now: Optional[int] = None) -> None:
        if self._waiting_since is not None:
            self.wait_ns += (self.clock() if now is None else now) - self._waiting_since
            self._waiting_since = None

    @property
    def waiting(self) -> bool:
        return self._waiting_since is not None

    def report(self) -> Dict[str, int]:
        """The counters for the live state (all ints, ns).

        A stop still open counts (the agent may publish while the guest stands
        stopped for the attach): what the guest has lost so far, not what is closed.
        """
        open_attach = int(self.stopped and self._open[1] == "attach")
        return {"stopped_ns": self.total_ns + max(0, self.stopped_for()),
                "stops": self.stops + self.stopped,
                "longest_stop_ns": self.longest_ns, "peak_window_ns": self.peak_window_ns,
                "long_stops": self.long_stops, "attach_stops": self.attaches + open_attach,
                "attach_longest_ns": self.attach_longest_ns, "budget_waits": self.waits,
                "budget_wait_ns": self.wait_ns + (self.clock() - self._waiting_since
                                                  if self._waiting_since is not None else 0),
                "budget_window_ns": self.spec.window_budget_ns,
                "budget_max_stop_ns": self.spec.max_stop_ns,
                "budget_hit_cost_ns": self.spec.hit_cost_ns, "charged_ns": self.charged_ns}


@dataclass
class Bucket:
    """Token bucket: ``rate`` hits/s sustained, ``burst`` at once."""

    rate: float
    burst: float
    tokens: float = 0.0
    stamp: float = 0.0

    def _refill(self, now: float) -> None:
        if self.stamp == 0.0:
            self.tokens, self.stamp = self.burst, now
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_s(self, now: float) -> float:
        """Seconds until a token is there (0: now); takes none."""
        self._refill(now)
        return 0.0 if self.tokens >= 1.0 else (1.0 - self.tokens) / self.rate

    def take(self, now: float) -> bool:
        self._refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False
