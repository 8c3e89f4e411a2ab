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


@dataclass
class PeriodStats:
    samples: List[int] = field(default_factory=list)
    count: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.samples.append(ns)
        if len(self.samples) > WINDOW:
            del self.samples[0]

    def period(self) -> Optional[int]:
        """The period: the smallest gap when every gap is a whole multiple of it.

        A periodic task that overruns (or is slowed by the traps themselves)
        skips wake-ups, as cyclictest does: its absolute targets then differ
        by whole multiples of the period.  Otherwise the median gap.
        """
        if not self.samples:
            return None
        m = min(self.samples)
        if m > 0 and all(abs(s - round(s / m) * m) * 100 <= m for s in self.samples):
            return m
        return self.median

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
            if t.last_target_ns is not None and 0 < target - t.last_target_ns < 10 ** 10:
                t.periods.add(target - t.last_target_ns)
            t.last_target_ns = target
        else:
            length = sleep.time.ns
            if t.last_call_ns is not None and t.last_sleep_ns is not None:
                gap = ev.time_ns - t.last_call_ns
                if 0 < gap < 10 ** 10:
                    t.periods.add(gap)
                    busy = gap - t.last_sleep_ns
                    if busy > 0:
                        t.busy.add(busy)
            t.last_call_ns, t.last_sleep_ns = ev.time_ns, length
        changed = moved or (t.periods.count <= STABLE_SAMPLES and t.demand() != before)
        if changed:
            self.version += 1
        return changed

    def rt_tasks(self) -> List[GuestTask]:
        return [t for t in self.tasks.values() if t.realtime]

    def stable(self) -> bool:
        """Every FIFO/RR task has a learnt period: periodic sampling may slow down."""
        return all(t.periods.count >= STABLE_SAMPLES for t in self.rt_tasks()
                   if t.policy in ("fifo", "rr"))
