"""The guest task model: what the traps taught us about the guest's RT tasks (pure).

Per task: its declared parameters (sched_setattr / sched_setscheduler) and
its observed period with the evidence behind it.  A task that goes back to
SCHED_OTHER or exits leaves the model.  The model is capped: a hostile guest
creating thousands of RT tasks cannot grow the agent's memory without bound
(the least recently seen tasks go first, and the eviction is counted).

A period is believed only on evidence (issue 11: gaps measured while the
guest stood stopped once gave a task that wakes every 4 ms servers with
periods up to 1.5 s):

* **Absolute sleeps** (clock_nanosleep TIMER_ABSTIME): the differences of the
  *requested* wake-up times, never trap times.  A periodic program advances
  its target by exactly T (skipping missed periods), so every difference is a
  whole multiple of T and their integer GCD is T exactly, whatever the stops
  did to the wake-ups (source ``"abstime"``).
* **Relative sleeps**: host time between calls, minus the time the guest
  stood stopped for its own trap (source ``"gaps"``).
* A gap that spans a stop of the guest (the backend's stop counter grew by
  more than a trap's own cost) or a pause of the sleep traps (sampling, rate
  limit) is not a sample.  An absolute one is kept as a *span*: a whole number
  of periods that may only refine the period to a divisor, never widen it.
* Targets read from memory (the sampler, not a trap) can skip some: a target
  C between the seen A and B must have been set after the last read that saw
  A pending and have expired before the read that saw B, so C - A < s, the
  spacing of those reads, and the true period is below s.  A gap of at most
  2·s is therefore a span (with s under half the gap, a hidden target needs
  three periods unseen between two reads closer than one).  A span that does
  not fit the believed period makes the model unstable again, so the sampler
  reads fast enough to confirm the change.
* A period that differs from the one believed needs ``PERIOD_CONFIRM``
  consistent samples before it is believed: single gaps never move the server.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Deque, Dict, List, Optional, Tuple

from .decode import SchedRequest, SleepRequest
from .plan import GuestEvent

MAX_TASKS = 256
#: Periods confirmed by this many samples are considered stable (sampling may pause).
STABLE_SAMPLES = 16
#: Sliding window of samples behind a belief.
WINDOW = 64
#: A FIFO/RR task declares no runtime: until one is measured, assume this
#: share of its observed period (documented; the ceiling bounds the result).
DEFAULT_FP_UTIL_PERMILLE = 100
#: Consecutive consistent samples before a period (or busy time) that differs
#: from the believed one is believed (hysteresis: no server change on one gap).
PERIOD_CONFIRM = 5
#: An exact period (the GCD of requested absolute wake-ups) is stable sooner: each
#: trap costs the guest (docs/gdbcost.md), and this many exact multiples leave no doubt.
STABLE_EXACT_SAMPLES = PERIOD_CONFIRM + 3
#: A period is looked for among the minimum gap divided by 1..MAX_DIVISOR
#: (inexact gaps only: exact ones give their GCD).
MAX_DIVISOR = 16
#: A gap fits a period when it is a whole multiple of it within this (‰ of the period).
FIT_PERMILLE = 10
#: Jittery gaps (no divisor explains them) give their median as the period
#: when every one is within this of it (‰); otherwise nothing is believed.
JITTER_PERMILLE = 100
#: A measured busy time moves the believed one when off by more than this (‰).
BUSY_PERMILLE = 250
#: Gaps across a pause or a stop are kept apart: they only refine the period.
MAX_SPANS = 8
#: Longest gap between two absolute targets that still says something.
MAX_SPAN_NS = 120 * 10 ** 9
#: Longest gap that can be a sample at all.
MAX_GAP_NS = 10 ** 10
#: No guest RT period shorter than this is believed (GCD floor).
MIN_PERIOD_NS = 10_000
#: An exact GCD is believed only if the shortest gap is at most this many
#: periods and the gaps' multiples lie close together (gaps rounded to some
#: unit would otherwise "share" it as a period).
MAX_GCD_MULTIPLE = 64
#: A trap's own stop is estimated as the median stop-counter growth between
#: consecutive hits (over this many); a task's gap spans some other stop when
#: the counter grew by more than OWN_STOP_SLACK_PERCENT of that.
OWN_STOP_WINDOW = 32
OWN_STOP_SLACK_PERCENT = 150


def _fits(gap: int, period: int, permille: int = FIT_PERMILLE) -> bool:
    """``gap`` is a whole (>= 1) multiple of ``period`` within ``permille`` ‰ of the period."""
    if gap * 1000 < period * (1000 - permille):
        return False
    r = gap % period
    return min(r, period - r) * 1000 <= period * permille


def _largest_divisor(base: int, gaps: List[int]) -> Optional[int]:
    """The largest base/k (k <= MAX_DIVISOR) of which every gap is a multiple."""
    for k in range(1, MAX_DIVISOR + 1):
        p = (base + k // 2) // k
        if p < MIN_PERIOD_NS:
            return None
        if all(_fits(g, p) for g in gaps):
            return p
    return None


def _median(xs: List[int]) -> int:
    s = sorted(xs)
    return s[len(s) // 2]


def estimate_period(samples: List[int]) -> Optional[Tuple[int, int]]:
    """(period, fit tolerance ‰) the samples are evidence for, or None.

    Exact multiples (absolute targets advanced by T) give their integer GCD,
    however many periods each gap skipped.  Otherwise a tolerant GCD (the
    minimum gap divided by the smallest k that explains every gap), else the
    median of gaps that all lie close to it (a jittery program), else nothing.
    """
    if not samples:
        return None
    g = math.gcd(*samples)
    if g >= MIN_PERIOD_NS:
        lo, hi = min(samples) // g, max(samples) // g
        # A periodic program's gaps are close multiples (1, 2, 3 periods; or 34-37
        # when starved); gaps that merely share a rounding unit spread widely.
        if lo <= MAX_GCD_MULTIPLE and hi - lo <= max(lo, MAX_DIVISOR):
            return g, FIT_PERMILLE
    p = _largest_divisor(min(samples), samples)
    if p is not None:
        return p, FIT_PERMILLE
    med = _median(samples)
    if all(abs(s - med) * 1000 <= med * JITTER_PERMILLE for s in samples):
        return med, JITTER_PERMILLE
    return None


def _refine(period: int, samples: List[int], span: int) -> Optional[int]:
    """A divisor of ``period`` that the span and every sample are whole multiples of."""
    g = math.gcd(period, span)
    if g >= MIN_PERIOD_NS and all(s % g == 0 for s in samples):
        return g
    return _largest_divisor(period, samples + [span])


@dataclass
class PeriodStats:
    """The believed period of one task and the samples behind it."""

    #: Samples consistent with the believed period (newest last).
    samples: List[int] = field(default_factory=list)
    #: Gaps across pauses or stops: whole numbers of periods (refinement only).
    spans: List[int] = field(default_factory=list)
    #: Samples that disagree with the belief, waiting for PERIOD_CONFIRM of them.
    pending: List[int] = field(default_factory=list)
    count: int = 0                   # clean samples ever
    believed: Optional[int] = None
    tolerance_permille: int = FIT_PERMILLE
    source: Optional[str] = None     # "abstime" | "gaps"
    support: int = 0                 # samples consistent with the belief since it formed
    rejected: int = 0                # gaps that spanned a stop or a pause
    proposed: Optional[int] = None   # a span's refinement, waiting for confirmation
    confirm: int = 0
    changes: int = 0                 # times the belief moved

    def add(self, ns: int, source: str) -> bool:
        """One clean sample; True if the believed period changed."""
        self.count += 1
        p = self.believed
        if p is not None and _fits(ns, p, self.tolerance_permille):
            self.pending.clear()
            self._keep(ns)
            self.support += 1
            if self.proposed is not None:
                if _fits(ns, self.proposed):
                    self.confirm += 1
                    if self.confirm >= PERIOD_CONFIRM:
                        return self._believe(self.proposed, FIT_PERMILLE, source,
                                             list(self.samples), keep_spans=True)
                else:
                    self.proposed, self.confirm = None, 0
            return False
        self.pending.append(ns)
        del self.pending[:-WINDOW]
        while len(self.pending) >= PERIOD_CONFIRM:
            found = estimate_period(self.pending)
            if found is not None:
                period, tol = found
                if p is None:  # a first belief also uses the spans seen so far
                    for span in self.spans:
                        refined = _refine(period, self.pending, span)
                        if refined is not None:
                            period, tol = refined, FIT_PERMILLE
                return self._believe(period, tol, source, list(self.pending),
                                     keep_spans=p is None)
            del self.pending[0]  # the oldest disagreeing sample explains nothing
        return False

    def add_span(self, ns: int) -> None:
        """A gap across a pause or a stop: some whole number of periods."""
        self.rejected += 1
        self.spans.append(ns)
        del self.spans[:-MAX_SPANS]
        p = self.believed
        if p is None or _fits(ns, p) or self.tolerance_permille != FIT_PERMILLE:
            return
        refined = _refine(p, self.samples, ns)
        if refined is not None and refined != p and (
                self.proposed is None or refined < self.proposed):
            self.proposed, self.confirm = refined, 0

    def _believe(self, period: int, tol: int, source: str, samples: List[int],
                 keep_spans: bool) -> bool:
        changed = period != self.believed
        self.believed, self.tolerance_permille, self.source = period, tol, source
        self.samples = samples[-WINDOW:]
        self.support = len(self.samples)
        self.pending.clear()
        self.proposed, self.confirm = None, 0
        if not keep_spans:
            self.spans.clear()
        if changed:
            self.changes += 1
        return changed

    def _keep(self, ns: int) -> None:
        self.samples.append(ns)
        del self.samples[:-WINDOW]

    def period(self) -> Optional[int]:
        """The believed period (None until PERIOD_CONFIRM consistent samples)."""
        return self.believed

    @property
    def median(self) -> Optional[int]:
        return _median(self.samples) if self.samples else None

    @property
    def jitter_ns(self) -> Optional[int]:
        """Largest distance of a sample from a whole multiple of the believed period."""
        p = self.believed
        if p is None or not self.samples:
            return None
        return max(min(s % p, p - s % p) if s >= p else p - s for s in self.samples)


@dataclass
class BusyStats:
    """Busy time per period (relative sleeps): believed with the same hysteresis."""

    samples: List[int] = field(default_factory=list)
    believed: Optional[int] = None
    off: int = 0

    def add(self, ns: int) -> bool:
        """One busy sample; True if the believed busy time changed."""
        self.samples.append(ns)
        del self.samples[:-WINDOW]
        med = _median(self.samples)
        if self.believed is None:
            if len(self.samples) < PERIOD_CONFIRM:
                return False
            self.believed = med
            return True
        if abs(med - self.believed) * 1000 <= self.believed * BUSY_PERMILLE:
            self.off = 0
            return False
        self.off += 1
        if self.off < PERIOD_CONFIRM:
            return False
        self.believed, self.off = med, 0
        return True


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
    last_stopped_ns: Optional[int] = None    # the backend's stop counter at the previous sleep
    periods: PeriodStats = field(default_factory=PeriodStats)
    busy: BusyStats = field(default_factory=BusyStats)
    resumed: bool = False   # the next sleep follows a pause of the sleep traps
    fresh_needed: int = 0   # samples wanted since the last pause before "stable" again
    #: How the model learnt the task's policy: "call" (its sched_* call trapped)
    #: or "memory" (its task_struct, read at its first trap: the policy was set
    #: before the agent attached).
    origin: str = "call"

    @property
    def observed_period_ns(self) -> Optional[int]:
        return self.periods.period()

    @property
    def realtime(self) -> bool:
        return self.policy in ("deadline", "fifo", "rr")

    def demand(self) -> Optional[tuple]:
        """(runtime, deadline, period) for the analysis, or None if not yet known.

        Only beliefs enter it (the believed period and busy time), never a
        single sample: the analysis input moves only on evidence.
        """
        if self.policy == "deadline":
            return (self.runtime_ns, self.deadline_ns, self.period_ns)
        if self.policy in ("fifo", "rr"):
            period = self.observed_period_ns
            if period is None:
                return None
            runtime = self.busy.believed
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
    #: Bumps when the analysis input changes (a task appears or vanishes, its
    #: policy or parameters change, its believed period or busy time moves, it
    #: moves to another vCPU), and only then.
    version: int = 0
    #: Bumps only on what the guest itself changed: a task appears or vanishes,
    #: its policy or parameters change, it moves to another vCPU.  Not on a
    #: belief moving.  A server that comes back with no such change is a flip.
    structure: int = 0
    _prev_stopped: Optional[int] = field(default=None, repr=False)
    _own_stops: Deque[int] = field(default_factory=lambda: deque(maxlen=OWN_STOP_WINDOW),
                                   repr=False)

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
            self.structure += 1
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

    def knows(self, ev: GuestEvent) -> bool:
        """The model already holds the task behind ``ev`` (under its key or its pid)."""
        self._claim(ev)
        return ev.task_key in self.tasks

    def _claim(self, ev: GuestEvent) -> None:
        """A task first named by pid (``sched_setattr(pid, …)`` from another task) takes
        its real key at its own first trap, so that its sleeps count."""
        if ev.tid is None or ev.task_key in self.tasks:
            return
        t = self.tasks.pop(f"pid:{ev.tid}", None)
        if t is not None:
            t.key = ev.task_key
            self.tasks[ev.task_key] = t

    def discover(self, ev: GuestEvent, policy: str, priority: Optional[int] = None,
                 runtime_ns: Optional[int] = None, deadline_ns: Optional[int] = None,
                 period_ns: Optional[int] = None) -> bool:
        """The task behind ``ev`` runs ``policy`` as its task_struct says (it set it before
        the attach); True if the analysis input changed.  A task the model knows keeps
        what its calls taught."""
        if self.knows(ev) or policy not in ("deadline", "fifo", "rr"):
            return False
        t = self._task(ev)
        t.policy, t.origin = policy, "memory"
        if policy == "deadline":
            t.runtime_ns, t.deadline_ns, t.period_ns = runtime_ns, deadline_ns, period_ns
        else:
            t.priority = priority
        self.version += 1
        return True

    def identify(self, key: str, tid: Optional[int], comm: Optional[str]) -> None:
        """The task's id and name as its task_struct has them (a census): traps that cannot
        name their task (kvm-ud) leave them unknown, and an exec renames.  The analysis
        does not read them: the version stays."""
        t = self.tasks.get(key)
        if t is not None and tid is not None:
            t.tid, t.comm = tid, comm

    def moved(self, key: str, vcpu: Optional[int]) -> bool:
        """The task now runs on ``vcpu`` as its task_struct says (a census); True if it moved."""
        t = self.tasks.get(key)
        if t is None or vcpu is None or t.vcpu == vcpu:
            return False
        t.vcpu = vcpu
        self.version += 1
        self.structure += 1
        return True

    def forget(self, key: str) -> bool:
        """The task is gone or no longer real-time, as its task_struct says (a census)."""
        if self.tasks.pop(key, None) is None:
            return False
        self.version += 1
        self.structure += 1
        return True

    def apply(self, ev: GuestEvent) -> bool:
        """Feed one event; True if the analysis input changed."""
        self.events += 1
        self._claim(ev)
        self._count_stop(ev.stopped_ns)
        if ev.kind == "exit":
            if self.tasks.pop(ev.task_key, None) is not None:
                self.version += 1
                self.structure += 1
                return True
            return False
        if ev.kind == "sched":
            return self._sched(ev)
        if ev.kind == "sleep":
            return self._sleep(ev)
        raise AssertionError(f"programming error: event kind {ev.kind!r}")

    # -- stops of the guest ------------------------------------------------
    def _count_stop(self, stopped_ns: Optional[int]) -> None:
        """Learn a trap's own stop: the counter's growth between consecutive hits."""
        if stopped_ns is None:
            return
        if self._prev_stopped is not None and stopped_ns >= self._prev_stopped:
            self._own_stops.append(stopped_ns - self._prev_stopped)
        self._prev_stopped = stopped_ns

    @property
    def own_stop_ns(self) -> Optional[int]:
        """What one trap stops the guest for (median of recent consecutive growths)."""
        return _median(list(self._own_stops)) if self._own_stops else None

    def _stop_in_gap(self, t: GuestTask, stopped_ns: Optional[int]) -> Tuple[bool, int]:
        """(does the task's gap span a stop other than its own trap's, stop time in it).

        Unknown (a backend without a stop counter): no, 0.
        """
        if stopped_ns is None or t.last_stopped_ns is None:
            return False, 0
        grew = stopped_ns - t.last_stopped_ns
        if grew < 0:
            return True, 0  # the counter went back: a new attach; nothing to trust
        own = self.own_stop_ns or 0
        return grew * 100 > own * OWN_STOP_SLACK_PERCENT, grew

    def note_pause(self) -> None:
        """The sleep traps may have missed calls (a site was disarmed for a while):
        every task's next gap spans that pause."""
        for t in self.rt_tasks():
            t.resumed = True

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
            self.structure += 1
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
            self.structure += 1
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
        stopped, stop_ns = self._stop_in_gap(t, ev.stopped_ns)
        not_a_sample = t.resumed or stopped
        if sleep.absolute:
            target = sleep.time.ns
            if t.last_target_ns is not None:
                gap = target - t.last_target_ns
                if ev.spacing_ns is not None and 2 * ev.spacing_ns >= gap:
                    not_a_sample = True   # the reads may have skipped targets: a span
                if not_a_sample:
                    if 0 < gap < MAX_SPAN_NS:
                        t.periods.add_span(gap)
                        p = t.periods.believed
                        if p is not None and not _fits(gap, p, t.periods.tolerance_permille):
                            t.fresh_needed = max(t.fresh_needed, PERIOD_CONFIRM)
                elif 0 < gap < MAX_GAP_NS:
                    t.periods.add(gap, "abstime")
                    t.fresh_needed = max(0, t.fresh_needed - 1)
            if t.last_target_ns is None or target != t.last_target_ns:
                t.last_target_ns = target  # (a restarted call repeats its target)
        else:
            length = sleep.time.ns
            if t.last_call_ns is not None and t.last_sleep_ns is not None:
                # Host time between the calls, less the guest's own trap stop.
                gap = ev.time_ns - t.last_call_ns - stop_ns
                if not_a_sample:
                    t.periods.rejected += 1
                elif 0 < gap < MAX_GAP_NS:
                    t.periods.add(gap, "gaps")
                    t.fresh_needed = max(0, t.fresh_needed - 1)
                    busy = gap - t.last_sleep_ns
                    if busy > 0:
                        t.busy.add(busy)
            t.last_call_ns, t.last_sleep_ns = ev.time_ns, length
        t.last_stopped_ns = ev.stopped_ns
        t.resumed = False
        changed = moved or t.demand() != before
        if changed:
            self.version += 1
        if moved:
            self.structure += 1
        return changed

    def resume_sampling(self, fresh: int) -> None:
        """Sleep traps are armed again after a pause: the next gap spans it.

        ``fresh`` samples are wanted before the model counts as stable again
        (they can confirm a period change: see PERIOD_CONFIRM).  Nothing the
        analysis reads changes here: re-sampling alone never moves a server.
        """
        for t in self.rt_tasks():
            t.resumed = True
            t.fresh_needed = fresh

    def rt_tasks(self) -> List[GuestTask]:
        return [t for t in self.tasks.values() if t.realtime]

    def stable(self) -> bool:
        """Every FIFO/RR task has a confirmed period: periodic sampling may slow down."""
        return all(t.observed_period_ns is not None and t.periods.support >= (
                       STABLE_EXACT_SAMPLES if t.periods.source == "abstime" else STABLE_SAMPLES)
                   and t.fresh_needed == 0
                   for t in self.rt_tasks() if t.policy in ("fifo", "rr"))
