"""The guest task model: what the traps taught us about the guest's RT tasks (pure).

Per task: its declared parameters (sched_setattr / sched_setscheduler) and
its observed period with jitter statistics (successive absolute wake-up
targets of clock_nanosleep, or successive relative sleep calls).  A task
that goes back to SCHED_OTHER or exits leaves the model.  The model is
capped: a hostile guest creating thousands of RT tasks cannot grow the
agent's memory without bound (the least recently seen tasks go first, and
the eviction is counted).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from .decode import SchedRequest, SleepRequest
from .plan import GuestEvent

MAX_TASKS = 256
#: Periods learnt from this many samples are considered stable.
STABLE_SAMPLES = 16
#: Sliding window for jitter statistics.
WINDOW = 64
#: A FIFO/RR task declares no runtime: until one is measured, assume this
#: share of its observed period (documented; the ceiling bounds the result).
DEFAULT_FP_UTIL_PERMILLE = 100


#: A period is looked for among the minimum gap divided by 1..MAX_DIVISOR.
MAX_DIVISOR = 16
#: Gaps across a sampling pause (the clock_nanosleep trap disarmed, see
#: runtime.py) are kept apart: they only refine the period, never widen it.
MAX_SPANS = 8
#: Longest gap between two absolute targets that still says something.
MAX_SPAN_NS = 120 * 10 ** 9
#: No guest RT period shorter than this is believed (tolerant GCD floor).
MIN_PERIOD_NS = 10_000
_STALE = object()


def _fits(gap: int, period: int) -> bool:
    """``gap`` is a whole multiple of ``period`` within 1 % of the period."""
    r = gap % period
    return min(r, period - r) * 100 <= period


def _largest_divisor(base: int, gaps: List[int]) -> Optional[int]:
    """The largest base/k (k <= MAX_DIVISOR) of which every gap is a multiple."""
    for k in range(1, MAX_DIVISOR + 1):
        p = (base + k // 2) // k
        if p < MIN_PERIOD_NS:
            return None
        if all(_fits(g, p) for g in gaps):
            return p
    return None


@dataclass
class PeriodStats:
    samples: List[int] = field(default_factory=list)
    spans: List[int] = field(default_factory=list)
    count: int = 0
    _period: object = field(default=None, repr=False, compare=False)

    def add(self, ns: int) -> None:
        self.count += 1
        self.samples.append(ns)
        if len(self.samples) > WINDOW:
            del self.samples[0]
        self._period = _STALE

    def add_span(self, ns: int) -> None:
        """A gap across a sampling pause: many periods, a whole number of them."""
        self.spans.append(ns)
        if len(self.spans) > MAX_SPANS:
            del self.spans[0]
        self._period = _STALE

    def period(self) -> Optional[int]:
        """The period: the largest P of which every gap is a whole multiple.

        A periodic task that overruns skips wake-ups, as cyclictest does
        (``while (now > next) next += interval``).  Under gdbstub traps that
        cost more than the period, a TCG guest can even settle into a fixed
        cadence of k periods, so that consecutive samples all show k·T.
        Absolute targets still differ by whole multiples of T: a tolerant
        GCD (the minimum gap divided by the smallest k that explains every
        gap) recovers T, and the spans across sampling pauses (n·T for an
        arbitrary n) break a fixed cadence.  Among several explanations the
        largest period wins; when no divisor explains the gaps (a jittery
        program), the median gap; a span that fits nothing is ignored.
        Cached: computed once per new gap, not per status read.
        """
        if self._period is _STALE:
            self._period = self._estimate()
        return self._period  # type: ignore[return-value]

    def _estimate(self) -> Optional[int]:
        if not self.samples:
            return None
        base = _largest_divisor(min(self.samples), self.samples)
        if base is None:
            return self.median
        fitted = list(self.samples)
        for span in self.spans:  # a span that fits no divisor is ignored
            refined = _largest_divisor(base, fitted + [span])
            if refined is not None:
                base = refined
                fitted.append(span)
        return base

    @property
    def median(self) -> Optional[int]:
        if not self.samples:
            return None
        s = sorted(self.samples)
        return s[len(s) // 2]

    @property
    def jitter_ns(self) -> Optional[int]:
        """Max minus min over the window."""
        return max(self.samples) - min(self.samples) if self.samples else None


@dataclass
class GuestTask:
    key: str
    tid: Optional[int] = None
    comm: Optional[str] = None
    vcpu: Optional[int] = None
    policy: Optional[str] = None
    priority: Optional[int] = None
    runtime_ns: Optional[int] = None
    deadline_ns: Optional[int] = None
    period_ns: Optional[int] = None
    last_seen_ns: int = 0
    last_target_ns: Optional[int] = None     # previous absolute wake-up target
    last_call_ns: Optional[int] = None       # host time of the previous relative sleep
    last_sleep_ns: Optional[int] = None      # its length
    periods: PeriodStats = field(default_factory=PeriodStats)
    busy: PeriodStats = field(default_factory=PeriodStats)
    resumed: bool = False   # the next sleep follows a sampling pause

    @property
    def observed_period_ns(self) -> Optional[int]:
        return self.periods.period()

    @property
    def realtime(self) -> bool:
        return self.policy in ("deadline", "fifo", "rr")

    def demand(self) -> Optional[tuple]:
        """(runtime, deadline, period) for the analysis, or None if not yet known."""
        if self.policy == "deadline":
            return (self.runtime_ns, self.deadline_ns, self.period_ns)
        if self.policy in ("fifo", "rr"):
            period = self.observed_period_ns
            if period is None or self.periods.count < 2:
                return None
            runtime = self.busy.median if self.busy.samples else None
            if runtime is None or runtime <= 0:
                runtime = period * DEFAULT_FP_UTIL_PERMILLE // 1000
            runtime = max(1024, min(runtime, period))
            return (runtime, period, period)
        return None


@dataclass
class TaskModel:
    tasks: Dict[str, GuestTask] = field(default_factory=dict)
    evicted: int = 0
    events: int = 0
    rejected: int = 0
    version: int = 0        # bumps when the analysis input changes

    def _task(self, ev: GuestEvent, key: Optional[str] = None) -> GuestTask:
        key = key or ev.task_key
        t = self.tasks.get(key)
        if t is None:
            if len(self.tasks) >= MAX_TASKS:
                oldest = min(self.tasks.values(), key=lambda x: x.last_seen_ns)
                del self.tasks[oldest.key]
                self.evicted += 1
                self.version += 1
            t = self.tasks[key] = GuestTask(key)
        t.last_seen_ns = ev.time_ns
        if ev.tid is not None and key == ev.task_key:
            t.tid, t.comm = ev.tid, ev.comm
        if key == ev.task_key:
            t.vcpu = ev.vcpu
        return t

    def _target_key(self, ev: GuestEvent) -> str:
        """sched_*(pid, …): pid 0 is the caller; otherwise the known task with that tid."""
        if ev.target_pid == 0 or ev.target_pid == ev.tid:
            return ev.task_key
        for t in self.tasks.values():
            if t.tid == ev.target_pid:
                return t.key
        return f"pid:{ev.target_pid}"

    def apply(self, ev: GuestEvent) -> bool:
        """Feed one event; True if the analysis input changed."""
        self.events += 1
        if ev.kind == "exit":
            if self.tasks.pop(ev.task_key, None) is not None:
                self.version += 1
                return True
            return False
        if ev.kind == "sched":
            return self._sched(ev)
        if ev.kind == "sleep":
            return self._sleep(ev)
        raise AssertionError(f"programming error: event kind {ev.kind!r}")

    def _sched(self, ev: GuestEvent) -> bool:
        req: SchedRequest = ev.sched  # type: ignore[assignment]
        key = self._target_key(ev)
        if not (req.realtime or key in self.tasks):
            return False  # a non-RT task staying non-RT: nothing to learn
        t = self._task(ev, key)
        before = t.demand(), t.policy, t.priority
        policy = req.policy if req.policy is not None else t.policy
        if policy not in ("deadline", "fifo", "rr"):
            del self.tasks[key]
            self.version += 1
            return True
        t.policy = policy
        if not req.keep_params:
            if policy == "deadline":
                if req.policy == "deadline":
                    t.runtime_ns, t.deadline_ns, t.period_ns = \
                        req.runtime_ns, req.deadline_ns, req.period_ns
                t.priority = None
            else:
                t.priority = req.priority or t.priority
                t.runtime_ns = t.deadline_ns = t.period_ns = None
        changed = (t.demand(), t.policy, t.priority) != before
        if changed:
            self.version += 1
        return changed

    def _sleep(self, ev: GuestEvent) -> bool:
        t = self.tasks.get(ev.task_key)
        if t is None or not t.realtime:
            return False  # sleeps of non-RT tasks teach nothing
        t.last_seen_ns = ev.time_ns
        moved = t.vcpu != ev.vcpu
        t.vcpu = ev.vcpu
        sleep: SleepRequest = ev.sleep  # type: ignore[assignment]
        before = t.demand()
        if sleep.absolute:
            target = sleep.time.ns
            gap = target - t.last_target_ns if t.last_target_ns is not None else 0
            if t.resumed:
                if 0 < gap < MAX_SPAN_NS:
                    t.periods.add_span(gap)
            elif 0 < gap < 10 ** 10:
                t.periods.add(gap)
            t.last_target_ns = target
        else:
            length = sleep.time.ns
            if not t.resumed and t.last_call_ns is not None and t.last_sleep_ns is not None:
                gap = ev.time_ns - t.last_call_ns
                if 0 < gap < 10 ** 10:
                    t.periods.add(gap)
                    busy = gap - t.last_sleep_ns
                    if busy > 0:
                        t.busy.add(busy)
            t.last_call_ns, t.last_sleep_ns = ev.time_ns, length
        t.resumed = False
        changed = moved or (t.periods.count <= STABLE_SAMPLES and t.demand() != before)
        if changed:
            self.version += 1
        return changed

    def resume_sampling(self, fresh: int) -> None:
        """Sleep traps are armed again after a pause: the next gap spans it.

        ``fresh`` samples are wanted before the model counts as stable again.
        """
        for t in self.rt_tasks():
            t.resumed = True
            t.periods.count = min(t.periods.count, STABLE_SAMPLES - fresh)

    def rt_tasks(self) -> List[GuestTask]:
        return [t for t in self.tasks.values() if t.realtime]

    def stable(self) -> bool:
        """Every FIFO/RR task has a learnt period: periodic sampling may slow down."""
        return all(t.periods.count >= STABLE_SAMPLES for t in self.rt_tasks()
                   if t.policy in ("fifo", "rr"))
