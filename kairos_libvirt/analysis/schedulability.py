"""Exact tests: do one vCPU's tasks meet every deadline on a given server?

Composition on one vCPU follows Linux: SCHED_DEADLINE runs above
SCHED_FIFO/RR.  So

* the DL ("edf") tasks are scheduled by EDF on the full server supply and
  pass iff dbf(t) <= sbf(t) at every absolute deadline t up to a bound L
  (Shin & Lee, RTSS 2003; Easwaran, Anand & Lee, RTSS 2007); and
* each RT ("fp") task i passes iff some t <= D_i has
  C_i + Σ_{hp} ⌈t/T_j⌉C_j + Σ_{DL} W_k(t) <= sbf(t): the DL tasks are
  higher-priority interference bounded by their workload W_k (their jobs may
  run anywhere up to their deadlines, see :func:`.demand.workload`), and
  fixed-priority tasks of equal priority count as higher priority (FIFO/RR
  ties can only delay us).  The least such t is the response time, found by
  the fixed point R = sbf⁻¹(rbf_i(R)) (response-time analysis on a supply
  bound: Shin & Lee 2003; Almeida & Pedreiras, EMSOFT 2004).

The check-point bound L for EDF (all integers; U = Σ C/T, α = Θ/Π):

* U > α: unschedulable, the demand outgrows the supply.
* U = α and Θ < Δ: unschedulable.  sbf(t) <= α(t − (Δ − Θ)) < αt, and at any
  common multiple H of the periods dbf(H) = UH = αH (D <= T), so dbf(H) > sbf(H).
* U < α: dbf(t) <= Ut + Σ(T−D)C/T and sbf(t) >= α(t − B) with blackout
  B = Π + Δ − 2Θ, so no deadline beyond
  L = ⌊(Θ·B + Π·Σ(T−D)C/T) / (Θ − Π·U)⌋ can fail.
* Any W > 0 with Σ⌈W/T⌉C <= sbf(W) is a bound too: jobs released in [0, W)
  need at most sbf(W), later ones at most dbf(t − W), and sbf is
  superadditive, so dbf(t) <= sbf(W) + sbf(t − W) <= sbf(t) for t > W by
  induction.  The hyperperiod H of the tasks qualifies iff dbf(H) <= sbf(H)
  (rbf(H) = dbf(H) = UH), so L = min(L, H) — and if dbf(H) > sbf(H) that is
  the violation.  For U = α with Θ = Δ we use the least such W, the fixed
  point W = sbf⁻¹(rbf(W)) (it exists: lcm(H, Π) satisfies the condition).

Deadlines up to L are not enumerated: we walk down from L as QPA does
(Zhang & Burns, "Schedulability analysis for real-time systems with EDF
scheduling", IEEE TC 2009).  If dbf(d) <= sbf(d) at the latest deadline
d <= t, then every t' in [sbf⁻¹(dbf(d)), t] is fine too (dbf is flat from d
to t, sbf non-decreasing), so we jump to sbf⁻¹(dbf(d)) − 1.  Each step
passes at least one deadline, so the walk ends, and it checks exactly the
condition above.

Cost: L grows like 1/(α − U).  Before walking from L we try the linear bounds
at a nearer point L' (ten longest periods): if Ut + Σ(T−D)C/T <= α(t − B)
already holds at L', it holds beyond, and only deadlines up to L' are walked
— still a proof.  Otherwise the exact walk goes on from L, within a work
limit; past it the verdict is "not proven", counted as a failure (safe).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

from .demand import utilisation
from .model import Task, with_priorities
from .supply import EDP, sbf, sbf_inverse

#: The quick test checks deadlines exactly up to this many longest DL periods.
TAIL_PERIODS = 10

#: A necessary condition the failed server violates, monotone in the supply:
#: ``witness(period, budget, deadline)`` is True for every schedulable server.
#: The interface search uses it to jump over budgets that cannot work.
#: A necessary condition on a server (period, budget, deadline[, loss]) that a failed one violated.
Witness = Callable[..., bool]


@dataclass(frozen=True)
class Verdict:
    """Outcome of one test: the verdict, why, and the FP tasks' response times."""

    schedulable: bool
    reason: str
    #: A deadline where dbf > sbf (EDF) or the task that missed (FP), if any.
    failed_at_ns: Optional[int] = None
    failed_task: Optional[str] = None
    response_times_ns: Dict[str, int] = field(default_factory=dict)


class Workload:
    """One vCPU's tasks, pre-digested (ints in tuples) for many tests against servers."""

    #: Work (check points × DL tasks) one EDF test may spend.  The walk is
    #: pseudo-polynomial: it grows like 1/(α − U) when the bandwidth barely
    #: exceeds the utilisation and the hyperperiod is huge.  Past the limit the
    #: verdict is "not proven" and the server counts as failing, so results stay
    #: safe but may not be minimal (the interface then says ``exact=False``).
    max_work = 300_000
    max_witnesses = 32

    def __init__(self, tasks: Sequence[Task]) -> None:
        tasks = with_priorities(tasks)
        self.tasks: Tuple[Task, ...] = tuple(tasks)
        dl = [t for t in tasks if t.scheduler == "edf"]
        fp = [t for t in tasks if t.scheduler == "fp"]
        self.dl: Tuple[Tuple[int, int, int], ...] = tuple(
            (t.runtime_ns, t.deadline_ns, t.period_ns) for t in dl)
        self.dl_e = tuple((c, t - d, t) for c, d, t in self.dl)  # (C, T − D, T)
        self.dl_u = utilisation(dl)
        self.dl_slack = sum((Fraction((t.period_ns - t.deadline_ns) * t.runtime_ns, t.period_ns)
                             for t in dl), Fraction(0))
        self.dl_dmin = min((t.deadline_ns for t in dl), default=0)
        self.dl_tmax = max((t.period_ns for t in dl), default=0)
        self.dl_h = math.lcm(*(t.period_ns for t in dl)) if dl else 0
        self.dl_dbf_h = sum(self.dl_h // t.period_ns * t.runtime_ns for t in dl)
        #: Deadlines (with their demand) that made some server fail, newest first.
        self.edf_witnesses: List[Tuple[int, int]] = []
        #: Servers the DL tasks passed on (a proof does not expire).
        self.edf_passed: Set[Tuple[int, int, int]] = set()
        #: Tests that hit ``max_steps`` (their verdict is a conservative "no").
        self.capped = 0
        self.max_steps = 0
        self.set_work(self.max_work)
        #: Beyond :meth:`tail_for` the linear bounds often already prove the test,
        #: and then only the deadlines below it are walked.  When they do not, the
        #: exact test walks on from the full bound; with ``quick`` set it gives up
        #: instead (a *sufficient* test: cheap, safe, may reject a schedulable
        #: server).  The interface search ranks candidate periods with it.
        self.quick = False
        self.u = utilisation(tasks)
        # Higher priority first: a failing high-priority task is found cheaply.
        fp.sort(key=lambda t: (-(t.priority or 0), t.deadline_ns, t.name))
        self.fp: List[Tuple[str, int, int, Tuple[Tuple[int, int], ...]]] = []
        for t in fp:
            hp = tuple((o.runtime_ns, o.period_ns) for o in fp
                       if o is not t and (o.priority or 0) >= (t.priority or 0))
            self.fp.append((t.name, t.runtime_ns, t.deadline_ns, hp))

    def set_work(self, work: int) -> None:
        """Let each EDF test visit about ``work`` / (number of DL tasks) check points."""
        self.max_steps = max(100, work // max(1, len(self.dl)))

    # -- EDF (SCHED_DEADLINE tasks) ------------------------------------------------
    def edf_bound(self, p: int, q: int, d: int, l: int = 0) -> Optional[int]:
        """Largest deadline that needs checking, or None if the DL tasks cannot fit at all.

        With a loss l the linear supply bound is α(t − B) − l, so the bound
        grows by Πl/(Θ − ΠU); U = α can never pass (dbf(H) = αH > sbf(H) − l).
        """
        if not self.dl:
            return 0
        un, ud = self.dl_u.numerator, self.dl_u.denominator
        lhs, rhs = q * ud, p * un  # compares α = q/p with U
        if lhs < rhs or (lhs == rhs and (q < d or l > 0)):
            return None
        if lhs > rhs:
            sn, sd = self.dl_slack.numerator, self.dl_slack.denominator
            blackout = p + d - 2 * q
            bound = ((q * blackout * sd + p * l * sd + p * sn) * ud) // ((lhs - rhs) * sd)
        else:
            # U = α with Θ = Δ: the first W > 0 with rbf(W) <= sbf(W).
            w = sbf_inverse(sum(c for c, _, _ in self.dl), p, q, d)
            while True:
                r = sum(-(-w // t) * c for c, _, t in self.dl)
                w2 = sbf_inverse(r, p, q, d)
                if w2 <= w:
                    break
                w = w2
            bound = w
        # The hyperperiod H is another W: rbf(H) = UH = dbf(H).  If dbf(H) > sbf(H)
        # the test fails there anyway, and the bound above stays valid.  sbf − l
        # is superadditive too (sbf(a + b) − l >= (sbf(a) − l) + (sbf(b) − l)).
        if self.dl_h < bound and self.dl_dbf_h <= sbf(self.dl_h, p, q, d, l):
            bound = self.dl_h
        return bound

    def edf_violation(self, p: int, q: int, d: int, l: int = 0) -> Optional[Tuple[int, int]]:
        """``None`` if the DL tasks pass, else ``(deadline, demand)`` with demand > sbf(deadline).

        ``(-1, -1)`` means a utilisation failure (U > α, or U = α with Θ < Δ);
        ``(-2, -2)`` means not proven within ``max_steps`` check points (see :attr:`max_work`);
        ``(-3, -3)`` means the linear tail of the quick test failed (see :attr:`quick`).
        """
        if not self.dl:
            return None
        # Deadlines that failed for earlier servers first: dbf there does not
        # depend on the server, so each is a cheap necessary condition.
        for at, demand in self.edf_witnesses:
            if sbf(at, p, q, d, l) < demand:
                return (at, demand)
        bound = self.edf_bound(p, q, d, l)
        if bound is None:
            return (-1, -1)
        if self.dl_h <= bound and self.dl_dbf_h > sbf(self.dl_h, p, q, d, l):
            return self._remember(self.dl_h, self.dl_dbf_h)
        if (p, q, d, l) in self.edf_passed:
            return None
        tail = self.tail_for(p)
        if bound > tail:
            if self.tail_ok(p, q, d, l):
                # The linear bounds cover every deadline beyond ``tail``; only the
                # short walk below it is left (a proof either way).
                bound = tail
            elif self.quick:
                return (-3, -3)
        found = self._walk(p, q, d, l, bound)
        if found is None:
            self.edf_passed.add((p, q, d, l))
        elif found == (-2, -2):
            self.capped += 1
        return found

    def tail_for(self, p: int) -> int:
        """Where the quick test switches from exact check points to the linear bounds."""
        return TAIL_PERIODS * self.dl_tmax + p

    def tail_ok(self, p: int, q: int, d: int, l: int = 0) -> bool:
        """dbf(t) <= Ut + Σ(T−D)C/T <= (Θ/Π)(t − B) − l <= sbf(t) for every t >= tail_for(p)?

        Both lines are straight and U < α (checked before), so checking at
        the tail point covers everything beyond it.
        """
        tail = self.tail_for(p)
        return Fraction(q, p) * (tail - (p + d - 2 * q)) - l >= self.dl_u * tail + self.dl_slack

    def _walk(self, p: int, q: int, d: int, l: int, bound: int) -> Tuple[int, int]:
        """QPA-style walk down from ``bound``: a violation, (-2, -2) out of work, or None."""
        dl_e, dmin = self.dl_e, self.dl_dmin
        off, blackout = d - q, p + d - 2 * q
        t = bound
        steps = self.max_steps
        while t >= dmin:
            steps -= 1
            if steps < 0:
                return (-2, -2)
            # dbf(t) and the latest deadline <= t in one pass.  With e = T − D,
            # ⌊(t − D)/T⌋ + 1 = ⌊(t + e)/T⌋ >= 0 for every t >= 0 (D <= T), so no
            # branch is needed; that job's deadline is j·T − e.
            h = 0
            last = 0
            for c, e, tt in dl_e:
                j = (t + e) // tt
                h += j * c
                x = j * tt - e
                if x > last:
                    last = x
            # sbf(last), inlined for speed
            if last < off:
                s = 0
            else:
                y = (last - off) // p
                rest = last - blackout - y * p
                s = y * q + rest if rest > 0 else y * q
            if h + l > s:
                return self._remember(last, h)
            k = (h + l - 1) // q
            t = blackout + k * p + (h + l - k * q) - 1  # sbf⁻¹(h) − 1
        return None  # type: ignore[return-value]

    def _remember(self, at: int, demand: int) -> Tuple[int, int]:
        w = self.edf_witnesses
        if (at, demand) not in w:
            w.insert(0, (at, demand))
            del w[self.max_witnesses:]
        return (at, demand)

    # -- fixed priority (SCHED_FIFO/RR tasks) --------------------------------------
    def fp_response(self, i: int, p: int, q: int, d: int, l: int = 0) -> Optional[int]:
        """Worst-case response time of fp task ``i`` (index into ``self.fp``), None if > D."""
        _, c_i, d_i, hp = self.fp[i]
        dl = self.dl
        r = sbf_inverse(c_i + sum(c for c, _ in hp), p, q, d, l)
        while r <= d_i:
            demand = c_i
            for c, t in hp:
                demand += -(-r // t) * c
            for c, dd, t in dl:
                x = r + dd - c
                n = x // t
                w = n * c + min(c, x - n * t)
                demand += w if w < r else r
            r2 = sbf_inverse(demand, p, q, d, l)
            if r2 <= r:
                return r
            r = r2
        return None

    # -- both ------------------------------------------------------------------------
    def violation(self, p: int, q: int, d: int, l: int = 0) -> Optional[Witness]:
        """None if schedulable on EDP(p, q, d) less l; else a necessary condition it violates."""
        un, ud = self.u.numerator, self.u.denominator
        if q * ud < p * un:
            return lambda p2, q2, d2, l2=0: q2 * ud >= p2 * un
        bad = self.edf_violation(p, q, d, l)
        if bad == (-1, -1):
            dn, dd = self.dl_u.numerator, self.dl_u.denominator
            return lambda p2, q2, d2, l2=0: q2 * dd > p2 * dn or (q2 == d2 and l2 == 0
                                                                  and q2 * dd >= p2 * dn)
        if bad == (-2, -2):
            # Not proven.  The walk is about proportional to 1/(α − U) (and to the
            # blackout), so ask for twice the spare bandwidth, or for half the
            # slack Δ − Θ when only the deadline moves; such a server is at least
            # as strong, and the next test is about twice as cheap.
            dn, dd = self.dl_u.numerator, self.dl_u.denominator
            spare = 2 * q * dd - p * dn  # α2 >= 2α − U  ⇔  q2·p·dd >= (2q·dd − p·dn)·p2

            def stronger(p2: int, q2: int, d2: int, l2: int = 0) -> bool:
                if p2 == p and q2 == q:
                    return d2 - q2 <= (d - q) // 2
                return q2 * p * dd >= spare * p2 and (q2 * p > q * p2)
            return stronger
        if bad == (-3, -3):
            return self.tail_ok
        if bad is not None:
            at, demand = bad
            return lambda p2, q2, d2, l2=0: sbf(at, p2, q2, d2, l2) >= demand
        for i in range(len(self.fp)):
            if self.fp_response(i, p, q, d, l) is None:
                def task_passes(p2: int, q2: int, d2: int, l2: int = 0, i: int = i) -> bool:
                    return self.fp_response(i, p2, q2, d2, l2) is not None
                return task_passes
        return None

    def verdict(self, supply: EDP) -> Verdict:
        """A readable verdict for one server."""
        p, q, d, l = supply.triple
        if self.u > supply.bandwidth:
            return Verdict(False, f"utilisation {self.u} exceeds the server bandwidth {supply.bandwidth}")
        bad = self.edf_violation(p, q, d, l)
        if bad == (-1, -1):
            return Verdict(False, f"SCHED_DEADLINE utilisation {self.dl_u} equals the bandwidth "
                                  f"{supply.bandwidth} but the budget is below the deadline "
                                  "(or the host's enforcement overrun takes some back)")
        if bad == (-2, -2):
            return Verdict(False, f"EDF test not proven within {self.max_steps} check points "
                                  "(bandwidth too close to the utilisation); counted as failing")
        if bad is not None:
            return Verdict(False, f"EDF demand {bad[1]} ns exceeds the supply {supply.sbf(bad[0])} ns "
                                  f"in a window of {bad[0]} ns", failed_at_ns=bad[0])
        times: Dict[str, int] = {}
        for i, (name, _, d_i, _) in enumerate(self.fp):
            r = self.fp_response(i, p, q, d, l)
            if r is None:
                return Verdict(False, f"fixed-priority task {name!r} misses its deadline {d_i} ns",
                               failed_task=name, response_times_ns=times)
            times[name] = r
        return Verdict(True, "every deadline is met", response_times_ns=times)


def schedulable(tasks: Sequence[Task], supply: EDP) -> Verdict:
    """Do ``tasks`` (DL above RT, as in Linux) meet every deadline on ``supply``?"""
    return Workload(tasks).verdict(supply)


def edf_schedulable(tasks: Sequence[Task], supply: EDP) -> bool:
    """Exact EDF test: dbf(t) <= sbf(t) at every deadline up to :func:`check_bound`.

    Every task is treated as an EDF (SCHED_DEADLINE) task.
    """
    return Workload([replace(t, scheduler="edf") for t in tasks]).edf_violation(
        *supply.triple) is None


def check_bound(tasks: Sequence[Task], supply: EDP) -> Optional[int]:
    """The last deadline the EDF test looks at; None when the tasks cannot fit (U > α, or U = α with Θ < Δ)."""
    return Workload([replace(t, scheduler="edf") for t in tasks]).edf_bound(*supply.triple)


def fp_response_times(tasks: Sequence[Task], supply: EDP) -> Dict[str, Optional[int]]:
    """Worst-case response time of every task under fixed priority (None: misses its deadline).

    Every task is treated as SCHED_FIFO/RR; missing priorities become
    deadline-monotonic (see :func:`.model.with_priorities`).
    """
    wl = Workload([replace(t, scheduler="fp") for t in tasks])
    return {name: wl.fp_response(i, *supply.triple) for i, (name, _, _, _) in enumerate(wl.fp)}
