"""Supply a thread really got, from a trace of its times off the CPU (pure).

A trace is what a greedy thread sees of its CPU: it spins reading the clock
from 0 to ``span_ns`` and every step longer than a threshold is a *gap*
(start, end) off the CPU.  Everything else is supply.  ``bench/supply`` records
such traces for SCHED_DEADLINE threads and compares them with the supply
bound functions of :mod:`.supply` and :mod:`.enforcement`.

Least supply in a window of length t: the on-CPU time f(a) in [a, a + t] is
piecewise linear in a, with slope on(a + t) − on(a) ∈ {−1, 0, 1}.  Follow the
flat stretch of f through a least point to the right: it ends at span − t, or
where the slope turns +1.  That happens when a enters a gap (a gap's start),
or, with a already inside a gap, when a + t leaves one; then f was flat since
a entered that gap, so that gap's start is on the same stretch.  So the least
supply is reached at a = 0, a = span − t or a gap's start (the end of an
on-CPU run), and checking those starts is exact.

Gaps are of two kinds: the scheduler took the CPU away (a context switch,
which the kernel counts) or an interrupt or the hypervisor stole it while the
thread stayed current (an *interruption*).  greedy.c reads the thread's switch
count at the end of every gap, so :func:`split_flags` separates them exactly;
:func:`split_switches` (the N longest gaps, N the kernel's total) is the
fallback for traces without it.  :func:`squeeze` takes the interruptions out
of the time axis: the scheduler's time, in which the host scheduler is judged
(it neither made nor could prevent them).  Integers only (ns).
"""
from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from typing import Callable, List, Sequence, Tuple

from ..errors import AnalysisError

Gap = Tuple[int, int]


@dataclass(frozen=True)
class Trace:
    """Gaps off the CPU, sorted and disjoint, inside [0, span_ns]."""

    span_ns: int
    gaps: Tuple[Gap, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.span_ns, int) or self.span_ns <= 0:
            raise AnalysisError(f"trace span {self.span_ns!r} ns must be a positive integer")
        prev = 0
        for a, b in self.gaps:
            if not (isinstance(a, int) and isinstance(b, int) and prev <= a < b <= self.span_ns):
                raise AnalysisError(f"trace gap ({a}, {b}) is not sorted, disjoint and inside "
                                    f"[0, {self.span_ns}] ns")
            prev = b
        object.__setattr__(self, "_starts", [a for a, _ in self.gaps])
        object.__setattr__(self, "_ends", [b for _, b in self.gaps])
        acc, off = 0, [0]
        for a, b in self.gaps:
            acc += b - a
            off.append(acc)
        object.__setattr__(self, "_off", off)  # _off[i] = gap time of gaps[:i]

    @property
    def on_ns(self) -> int:
        """Total supply over the whole trace."""
        return self.span_ns - self._off[-1]  # type: ignore[attr-defined]

    @property
    def longest_gap_ns(self) -> int:
        """The longest blackout."""
        return max((b - a for a, b in self.gaps), default=0)

    def off_before(self, x: int) -> int:
        """Gap time in [0, x]."""
        i = bisect_right(self._ends, x)  # type: ignore[attr-defined]
        off = self._off[i]  # type: ignore[attr-defined]
        if i < len(self.gaps) and self.gaps[i][0] < x:
            off += x - self.gaps[i][0]
        return off

    def supply(self, a: int, b: int) -> int:
        """On-CPU time in [a, b]."""
        return (b - a) - (self.off_before(b) - self.off_before(a))

    def candidates(self, t: int) -> List[int]:
        """Window starts a (0 <= a <= span − t) among which the least supply in t lies."""
        last = self.span_ns - t
        out = {0, last}
        out.update(a for a in self._starts if a <= last)  # type: ignore[attr-defined]
        return sorted(out)

    def least_supply(self, t: int) -> Tuple[int, int]:
        """(least supply in any window of length ``t`` inside the trace, a window start)."""
        if not 0 < t <= self.span_ns:
            raise AnalysisError(f"window {t} ns must be in (0, {self.span_ns}] ns (the trace)")
        return min((self.supply(a, a + t), a) for a in self.candidates(t))

    def per_period(self, period_ns: int, phase_ns: int = 0) -> List[int]:
        """Supply in each whole period [phase + kΠ, phase + (k+1)Π) inside the trace."""
        if period_ns <= 0 or phase_ns < 0:
            raise AnalysisError(f"period {period_ns} ns and phase {phase_ns} ns: need period > 0, "
                                "phase >= 0")
        out, a = [], phase_ns
        while a + period_ns <= self.span_ns:
            out.append(self.supply(a, a + period_ns))
            a += period_ns
        return out


def split_switches(trace: Trace, switches: int) -> Tuple[Trace, Trace]:
    """(the ``switches`` longest gaps, the rest): scheduler switches vs interruptions.

    ``switches`` is the kernel's count of context switches over the trace
    (``voluntary + nonvoluntary_ctxt_switches``): a thread that was switched
    out that often has that many gaps the scheduler made; the others are
    interrupts or time the hypervisor stole while the thread stayed current,
    and those are shorter than any switch-out of a deadline thread here.
    """
    if switches < 0:
        raise AnalysisError(f"switch count {switches} must be >= 0")
    ranked = sorted(range(len(trace.gaps)), key=lambda i: (trace.gaps[i][1] - trace.gaps[i][0], i),
                    reverse=True)
    keep = set(ranked[:switches])
    sw = tuple(g for i, g in enumerate(trace.gaps) if i in keep)
    rest = tuple(g for i, g in enumerate(trace.gaps) if i not in keep)
    return Trace(trace.span_ns, sw), Trace(trace.span_ns, rest)


def split_flags(trace: Trace, switches: Sequence[int]) -> Tuple[Trace, Trace]:
    """(gaps holding a context switch, the rest), from the per-gap switch counts greedy.c reads."""
    if len(switches) != len(trace.gaps):
        raise AnalysisError(f"{len(switches)} switch counts for {len(trace.gaps)} gaps")
    sw = tuple(g for g, n in zip(trace.gaps, switches) if n > 0)
    rest = tuple(g for g, n in zip(trace.gaps, switches) if n <= 0)
    return Trace(trace.span_ns, sw), Trace(trace.span_ns, rest)


def squeeze(kept: Trace, removed: Trace) -> Trace:
    """``kept``'s gaps on a time axis from which ``removed``'s gaps are cut out.

    Both traces come from one trace split in two (their gaps are disjoint):
    the result is the trace as it would read had the removed time never
    passed, so a window of t there is t of time the scheduler had.
    """
    if kept.span_ns != removed.span_ns:
        raise AnalysisError(f"squeeze: spans {kept.span_ns} and {removed.span_ns} ns differ")
    cut = removed.span_ns - removed.on_ns
    out = []
    for a, b in kept.gaps:
        ca, cb = removed.off_before(a), removed.off_before(b)
        if cb != ca:
            raise AnalysisError(f"squeeze: gap ({a}, {b}) overlaps a removed gap")
        out.append((a - ca, b - ca))
    return Trace(kept.span_ns - cut, tuple(out))


@dataclass(frozen=True)
class Violations:
    """Where a trace's least supply fell below a model curve by more than the tolerance."""

    #: Grid points t whose least supply < model(t) − tolerance.
    points: int
    #: Candidate windows (start, t) over the whole grid below model(t) − tolerance.
    windows: int
    #: Largest shortfall model(t) − least supply(t) over the grid (may be <= 0).
    worst_ns: int
    #: The t where it happened.
    worst_t_ns: int


def compare(trace: Trace, grid: Sequence[int], model: Callable[[int], int],
            tolerance: Callable[[int], int]) -> Tuple[List[int], Violations]:
    """Least supply at every t of ``grid``, and how often it falls below the model."""
    least: List[int] = []
    points = windows = 0
    worst, worst_t = None, 0
    for t in grid:
        floor = model(t) - tolerance(t)
        starts = trace.candidates(t)
        supplies = [trace.supply(a, a + t) for a in starts]
        m = min(supplies)
        least.append(m)
        bad = sum(1 for s in supplies if s < floor)
        if bad:
            points += 1
            windows += bad
        short = model(t) - m
        if worst is None or short > worst:
            worst, worst_t = short, t
    return least, Violations(points, windows, worst if worst is not None else 0, worst_t)


def window_grid(longest_ns: int, span_ns: int, n: int = 120) -> List[int]:
    """Window lengths to check: dense up to ``longest_ns``, then geometric to span/2."""
    if longest_ns <= 0 or span_ns <= 0 or n < 4:
        raise AnalysisError(f"grid: longest {longest_ns} ns, span {span_ns} ns, n {n}: need > 0, n >= 4")
    hi = max(1, span_ns // 2)
    longest = min(longest_ns, hi)
    half = n // 2
    out = {max(1, longest * k // half) for k in range(1, half + 1)}
    if hi > longest:
        ratio = (hi / longest) ** (1.0 / (n - half))
        out.update(min(hi, int(longest * ratio ** k)) for k in range(1, n - half + 1))
    return sorted(out)


def parse_greedy(text: str) -> Tuple[dict, Trace]:
    """Header (key=int) and trace from the output of ``bench/supply.d/greedy.c``.

    Gap lines are "start end" or "start end switches cpu"; with the latter,
    the header gets ``gap_switches`` and ``gap_cpus`` (tuples, one per gap).
    """
    lines = text.splitlines()
    if not lines:
        raise AnalysisError("greedy trace is empty")
    try:
        head = {k: int(v) for k, v in (f.split("=", 1) for f in lines[0].split())}
        rows = [tuple(int(x) for x in ln.split()) for ln in lines[1:] if ln.strip()]
    except ValueError as exc:
        raise AnalysisError(f"greedy trace: not the format greedy.c writes ({exc})") from None
    widths = {len(r) for r in rows}
    if not widths <= {2} and widths != {4}:
        raise AnalysisError(f"greedy trace: gap lines of {sorted(widths)} fields; greedy.c "
                            "writes 2 or 4")
    if "span_ns" not in head or head.get("gaps") != len(rows):
        raise AnalysisError("greedy trace: header has no span_ns or its gap count is wrong "
                            "(a truncated file?)")
    if widths == {4}:
        head["gap_switches"] = tuple(r[2] for r in rows)
        head["gap_cpus"] = tuple(r[3] for r in rows)
    return head, Trace(head["span_ns"], tuple((r[0], r[1]) for r in rows))


__all__ = ["Trace", "Gap", "Violations", "split_switches", "split_flags", "squeeze", "compare",
           "window_grid", "parse_greedy"]
