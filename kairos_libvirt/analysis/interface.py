"""The smallest safe server per vCPU: from guest tasks to SCHED_DEADLINE parameters.

For one vCPU and a period Π we want the least budget Θ such that the tasks
are schedulable on EDP(Π, Θ, Δ).

Monotonicity (why bisection and jumping are exact): for fixed Π and Δ, any
legal schedule of a (Θ + 1)-budget server contains a legal schedule of a
Θ-budget server (drop one unit per period), so every window gets at least as
much supply and sbf never decreases in Θ.  With Δ tied to Θ (Δ = Θ + overhead,
the EDP search below) the formula shows it directly: Δ − Θ stays fixed and
the blackout Π + Δ − 2Θ shrinks.  Likewise a smaller Δ only removes legal
schedules, so sbf never decreases as Δ shrinks.  Both tests only compare
demand, which does not depend on the server, with sbf, so a schedulable Θ
stays schedulable when Θ grows or Δ shrinks.

Search: start at Θ = ⌈UΠ⌉ (necessary).  On failure the test hands back a
necessary condition the server violated (a deadline d with dbf(d) > sbf(d),
or a fixed-priority task that missed); we bisect for the least Θ that meets
that condition alone (cheap), and test again.  Every skipped Θ provably
fails, so the result is the exact minimum on the budget grid.

Period (and deadline) search: Π ranges over a geometric grid within
``period_bounds`` (plus the shortest deadline) and is then refined linearly
between the best point's neighbours; the objective is (Θ + overhead)/Π, i.e.
bandwidth plus the per-period cost of switching the vCPU, and the larger Π
wins ties.  Candidates are ranked with the quick sufficient test (see
:mod:`.schedulability`; safe budgets, maybe slightly large) and the best two
are recomputed exactly.  This is the best Π *on that grid*, not a proven
global optimum (the least bandwidth is not monotone in Π).  With the EDP model
the least Θ for a Π is reached with the tightest deadline Δ = Θ + overhead
(sbf only improves as Δ shrinks); we then bisect, with the quick test, for a
larger Δ that keeps that Θ, so the host gets a looser deadline at the least
bandwidth.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from ..errors import AnalysisError
from .demand import utilisation
from .model import Task, with_priorities
from .partition import HEURISTIC, partition
from .schedulability import Witness, Workload
from .supply import EDP

#: ``__checkparam_dl``: sched_runtime must be at least 1 << DL_SCALE ns.
DL_MIN_RUNTIME_NS = 1 << 10
#: Defaults of /proc/sys/kernel/sched_deadline_period_{min,max}_us.
DL_PERIOD_MIN_NS = 100 * 1000
DL_PERIOD_MAX_NS = (1 << 22) * 1000
MODELS = ("edp", "prm")
#: Work per EDF test while ranking candidate periods or loosening the deadline
#: (see Workload.max_work); a test that runs out only costs a little bandwidth.
SEARCH_WORK = 20_000
UNLIMITED_WORK = 1 << 62


@dataclass(frozen=True)
class ServerInterface:
    """One vCPU's server: give it ``runtime_ns`` every ``period_ns`` within ``deadline_ns``.

    ``budget_ns`` (Θ) is the supply the guest tasks need; ``runtime_ns`` adds the
    per-period switching overhead and is what goes into ``sched_attr.sched_runtime``.
    A vCPU without real-time tasks has budget 0: it needs no reservation.
    """

    vcpu: int
    budget_ns: int
    period_ns: int
    deadline_ns: int
    tasks: Tuple[str, ...]
    schedulable: bool
    overhead_ns: int = 0
    model: str = "edp"
    utilisation: Fraction = Fraction(0)
    response_times_ns: Mapping[str, int] = field(default_factory=dict)
    reason: str = ""
    #: False if some EDF test hit its work limit: the budget is safe but
    #: possibly above the minimum for this period (see Workload.max_work).
    exact: bool = True
    #: The host's enforcement granularity the server was sized for (see
    #: :mod:`.enforcement`): the chunk runtime + this fits before the deadline.
    enforcement_ns: int = 0

    @property
    def runtime_ns(self) -> int:
        """SCHED_DEADLINE runtime: Θ plus the overhead (0 when there is nothing to run)."""
        return self.budget_ns + self.overhead_ns if self.budget_ns else 0

    @property
    def bandwidth(self) -> Fraction:
        """runtime/period, exact: what the kernel's admission counts."""
        return Fraction(self.runtime_ns, self.period_ns)

    @property
    def host_density(self) -> Fraction:
        """(runtime + overrun)/deadline: what the sound host tests count (0 without a runtime)."""
        if not self.runtime_ns:
            return Fraction(0)
        return Fraction(self.runtime_ns + self.enforcement_ns, self.deadline_ns)

    @property
    def supply(self) -> EDP:
        """What the guest tasks may assume: EDP(Π, Θ, Δ) less the host's overrun."""
        return EDP(self.period_ns, self.budget_ns, self.deadline_ns, self.enforcement_ns)


@dataclass(frozen=True)
class GuestInterface:
    """Servers for all vCPUs of one guest, and what was assumed to get them."""

    servers: Tuple[ServerInterface, ...]
    model: str
    #: "pinned" (tasks named their vCPU, or there is one vCPU) or "assumed".
    partition: str
    assignment: Mapping[str, int]
    #: Fixed priorities used for fp tasks (given, or deadline-monotonic).
    priorities: Mapping[str, int]
    heuristic: str = HEURISTIC

    @property
    def schedulable(self) -> bool:
        """True only if every vCPU's server passes."""
        return all(s.schedulable for s in self.servers)

    @property
    def total_bandwidth(self) -> Fraction:
        """Σ runtime/period over the vCPUs."""
        return sum((s.bandwidth for s in self.servers), Fraction(0))

    @property
    def utilisation(self) -> Fraction:
        """Σ C/T of all tasks."""
        return sum((s.utilisation for s in self.servers), Fraction(0))


def _least(lo: int, hi: int, at: Callable[[int], Tuple[int, int, int]],
           violation: Callable[[int, int, int], Optional[Witness]]) -> Optional[int]:
    """Least k in [lo, hi] whose server ``at(k)`` passes, None if none.

    ``at`` must strengthen the supply as k grows.  Each failure's witness is a
    monotone necessary condition, so bisecting on it skips only failing k.
    """
    k = lo
    while k <= hi:
        witness = violation(*at(k))
        if witness is None:
            return k
        if not witness(*at(hi)):
            return None
        a, b = k, hi  # witness false at a, true at b
        while b - a > 1:
            m = (a + b) // 2
            if witness(*at(m)):
                b = m
            else:
                a = m
        k = b
    return None


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _budget_range(wl: Workload, period: int, max_runtime: int, overhead: int,
                  grid: int, loss: int = 0) -> Tuple[int, int]:
    """Grid indices k (Θ = k·grid) worth trying: Θ >= UΠ, runtime >= 1024 ns, runtime <= cap.

    With an enforcement granularity g the runtime is at least g: below it the
    kernel repays a tick's debt in whole budgets and the loss grows towards
    2g (:meth:`.enforcement.Enforcement.loss_ns`), so the search keeps to
    runtimes whose loss is exactly g.
    """
    u = wl.u
    lo_ns = max(1, DL_MIN_RUNTIME_NS - overhead, loss - overhead,
                _ceil_div(u.numerator * period, u.denominator))
    return _ceil_div(lo_ns, grid), (max_runtime - overhead) // grid


def _min_budget(wl: Workload, period: int, deadline: Optional[int], overhead: int, grid: int,
                cap_ns: Optional[int] = None, loss: int = 0) -> Optional[int]:
    """Least Θ on the grid; ``deadline=None`` ties Δ to Θ + overhead + loss (EDP search).

    ``loss`` is the host's enforcement granularity: the chunk Θ + overhead +
    loss must fit before Δ, and the guest gets sbf − loss.  ``wl.capped``
    grows if some test was not proven (then Θ may not be least).
    """
    max_runtime = (period if deadline is None else deadline) - loss
    lo, hi = _budget_range(wl, period, max_runtime, overhead, grid, loss)
    if cap_ns is not None:
        hi = min(hi, cap_ns // grid)
    if deadline is None:
        def at(k: int) -> Tuple[int, int, int, int]:
            return period, k * grid, k * grid + overhead + loss, loss
    else:
        def at(k: int) -> Tuple[int, int, int, int]:
            return period, k * grid, deadline, loss
    k = _least(lo, hi, at, wl.violation)
    return None if k is None else k * grid


def _max_deadline(wl: Workload, period: int, budget: int, overhead: int, grid: int,
                  loss: int = 0) -> int:
    """A large Δ on the grid (from Θ + overhead + loss up to Π) that keeps Θ schedulable.

    Uses the quick sufficient test (:attr:`Workload.quick`): the deadline is
    the loosest one that test proves, which is safe and cheap; the exact
    largest one may be a little larger.  Δ = Θ + overhead + loss passed the
    exact budget search, so it is the fallback.
    """
    base = budget + overhead + loss
    steps = (period - base) // grid

    def at(k: int) -> Tuple[int, int, int, int]:
        return period, budget, base + (steps - k) * grid, loss
    wl.quick, wl_work = True, wl.max_steps
    wl.set_work(SEARCH_WORK)
    try:
        k = _least(0, steps, at, wl.violation)
    finally:
        wl.quick, wl.max_steps = False, wl_work
    return base if k is None else base + (steps - k) * grid


def minimal_budget(tasks: Sequence[Task], *, period_ns: int, deadline_ns: Optional[int] = None,
                   overhead_ns: int = 0, granularity_ns: int = 1) -> Optional[int]:
    """Exact least budget Θ for EDP(period, Θ, deadline), deadline defaulting to the period.

    Θ is a multiple of ``granularity_ns``, and Θ + overhead is at least 1024 ns
    and at most the deadline (SCHED_DEADLINE's rules).  None when even
    Θ = deadline − overhead fails.  No work limit applies here, so the answer
    is always the least one; on a nanosecond grid with a huge hyperperiod and
    Θ barely above UΠ that can take long (see :class:`.schedulability.Workload`).
    """
    deadline = period_ns if deadline_ns is None else deadline_ns
    _check_server_args(period_ns, deadline, overhead_ns, granularity_ns)
    wl = Workload(tasks)
    wl.set_work(UNLIMITED_WORK)
    return _min_budget(wl, period_ns, deadline, overhead_ns, granularity_ns)


def _check_server_args(period: int, deadline: Optional[int], overhead: int, grid: int) -> None:
    for what, v in (("period_ns", period), ("overhead_ns", overhead), ("granularity_ns", grid)):
        if not isinstance(v, int) or isinstance(v, bool) or v < (0 if what == "overhead_ns" else 1):
            raise AnalysisError(f"{what} {v!r} is not allowed; use a whole number of nanoseconds"
                                f"{' >= 0' if what == 'overhead_ns' else ' > 0'}")
    if period < DL_MIN_RUNTIME_NS:
        raise AnalysisError(f"period {period} ns is not allowed; SCHED_DEADLINE needs at least "
                            f"{DL_MIN_RUNTIME_NS} ns")
    if deadline is not None and (not isinstance(deadline, int) or isinstance(deadline, bool)
                                 or not DL_MIN_RUNTIME_NS <= deadline <= period):
        raise AnalysisError(f"deadline {deadline!r} ns is not allowed; use "
                            f"{DL_MIN_RUNTIME_NS} ns <= deadline <= period ({period} ns)")


def _grid(lo: int, hi: int, n: int, grid: int, geometric: bool) -> List[int]:
    """About ``n`` periods from lo to hi (inclusive), rounded to the grid, ints only."""
    out = {lo, hi}
    if hi > lo and n > 1:
        for i in range(1, n):
            if geometric:
                # lo·(hi/lo)^(i/n) without floats: bisect the integer x with x^n ≈ lo^(n−i)·hi^i.
                target = lo ** (n - i) * hi ** i
                a, b = lo, hi
                while b - a > 1:
                    m = (a + b) // 2
                    if m ** n <= target:
                        a = m
                    else:
                        b = m
                x = a
            else:
                x = lo + (hi - lo) * i // n
            x = x // grid * grid
            if lo <= x <= hi:
                out.add(x)
    return sorted(out)


#: Candidates re-computed exactly after the ranking.
FINALISTS = 2


def _search_period(wl: Workload, lo: int, hi: int, model: str, overhead: int, grid: int,
                   steps: int, loss: int = 0) -> Optional[Tuple[int, int, bool]]:
    """Best (Π, Θ, exact) on the grid by (Θ + overhead)/Π; larger Π wins ties (fewer switches).

    Candidates are ranked with cheap budgets (a sufficient test with a work
    limit: safe, maybe a little too large); the best few are then recomputed
    exactly.
    """
    ranked: Dict[int, Optional[int]] = {}
    best: Optional[Tuple[Fraction, int]] = None

    def better(cost: Fraction, p: int, than: Optional[Tuple[Fraction, int]]) -> bool:
        return than is None or cost < than[0] or (cost == than[0] and p > than[1])

    def consider(p: int) -> None:
        nonlocal best
        if p in ranked:
            return
        cap = None
        if best is not None:
            cap = math.floor(best[0] * p) - overhead  # a larger Θ cannot win
            if cap < 1:
                ranked[p] = None
                return
        q = _min_budget(wl, p, None if model == "edp" else p, overhead, grid, cap, loss)
        ranked[p] = q
        if q is not None and better(Fraction(q + overhead, p), p, best):
            best = (Fraction(q + overhead, p), p)

    wl.set_work(SEARCH_WORK)
    wl.quick = True
    coarse = _grid(lo, hi, steps, grid, geometric=True)
    dmin = min(t.deadline_ns for t in wl.tasks) // grid * grid
    for p in coarse + ([dmin] if lo <= dmin <= hi else []):
        consider(p)
    if best is None:
        wl.set_work(wl.max_work)
        wl.quick = False
        return None
    ordered = sorted(ranked)
    i = ordered.index(best[1])
    a = ordered[i - 1] if i > 0 else lo
    b = ordered[i + 1] if i + 1 < len(ordered) else hi
    for p in _grid(a, b, max(2, steps // 2), grid, geometric=False):
        consider(p)
    wl.set_work(wl.max_work)
    wl.quick = False
    finalists = sorted(((Fraction(q + overhead, p), -p) for p, q in ranked.items() if q is not None))
    final: Optional[Tuple[Fraction, int]] = None
    found: Dict[int, Tuple[int, bool]] = {}
    for _, neg_p in finalists[:FINALISTS]:
        p = -neg_p
        before = wl.capped
        proven = ranked[p]
        assert proven is not None
        # The quick test proved ``proven`` safe (and that proof is remembered),
        # so the exact search finds it or a smaller budget.
        q = _min_budget(wl, p, None if model == "edp" else p, overhead, grid, proven, loss)
        assert q is not None and q <= proven
        found[p] = (q, wl.capped == before)
        cost = Fraction(q + overhead, p)
        if better(cost, p, final):
            final = (cost, p)
    assert final is not None
    return final[1], found[final[1]][0], found[final[1]][1]


def interface_for(tasks: Sequence[Task], *, vcpus: int, model: str = "edp",
                  period_ns: Optional[int] = None, deadline_ns: Optional[int] = None,
                  overhead_ns: int = 0,
                  period_bounds: Optional[Tuple[int, int]] = None,
                  granularity_ns: int = 1000, period_steps: int = 24,
                  enforcement_ns: int = 0) -> GuestInterface:
    """Smallest safe per-vCPU servers for ``tasks`` on a guest with ``vcpus`` vCPUs.

    * ``model``: ``"edp"`` (deadline may be below the period) or ``"prm"``
      (deadline = period).
    * ``period_ns``: fix Π; otherwise search ``period_bounds`` (default: the
      kernel's 100 µs up to the smallest task deadline on that vCPU, at most
      the kernel's ~4.19 s).  ``deadline_ns`` fixes Δ as well (EDP only; PRM
      uses Δ = Π); with EDP and no fixed Δ the loosest Δ at the least Θ is chosen.
    * ``overhead_ns``: cost of switching the vCPU once per period; it is added
      to the runtime and to the objective (Θ + overhead)/Π.
    * ``granularity_ns``: budgets, periods and deadlines are multiples of it.
      The default, whole microseconds, is finer than SCHED_DEADLINE enforces
      in practice and keeps the search fast: on a 1 ns grid the least budget
      can sit a few ns above UΠ, where the exact test must look hundreds of
      seconds ahead (results then often say ``exact=False``).
    * ``period_steps``: points of the coarse geometric period grid.
    * ``enforcement_ns``: the host's enforcement granularity g (one tick
      without HRTICK_DL, see :mod:`.enforcement`): every server leaves room
      for a chunk of runtime + g before its deadline, the guest is analysed
      on sbf − g, and among the servers that meet every deadline the search
      prefers the one the host's density test charges least, (runtime + g)/Δ,
      then the least bandwidth.
    Tasks without a vCPU are partitioned (:mod:`.partition`); fp tasks without
    priorities get deadline-monotonic ones.
    """
    if model not in MODELS:
        raise AnalysisError(f"model {model!r} is not allowed; use 'edp' or 'prm'")
    if not isinstance(vcpus, int) or isinstance(vcpus, bool) or vcpus < 1:
        raise AnalysisError(f"vcpus {vcpus!r} is not allowed; use an integer >= 1")
    if deadline_ns is not None and period_ns is None:
        raise AnalysisError(f"deadline {deadline_ns} ns given without a period; fix the period too")
    if period_ns is not None:
        _check_server_args(period_ns, deadline_ns, overhead_ns, granularity_ns)
        if model == "prm" and deadline_ns not in (None, period_ns):
            raise AnalysisError(f"deadline {deadline_ns} ns is not allowed with the prm model; "
                                "PRM has deadline = period, use --model edp")
    else:
        _check_server_args(DL_PERIOD_MIN_NS, None, overhead_ns, granularity_ns)
    if period_bounds is not None:
        lo_b, hi_b = period_bounds
        if (not all(isinstance(v, int) and not isinstance(v, bool) for v in (lo_b, hi_b))
                or not DL_MIN_RUNTIME_NS <= lo_b <= hi_b):
            raise AnalysisError(f"period bounds {period_bounds!r} are not allowed; use "
                                f"{DL_MIN_RUNTIME_NS} ns <= min <= max")
    if not isinstance(enforcement_ns, int) or isinstance(enforcement_ns, bool) or enforcement_ns < 0:
        raise AnalysisError(f"enforcement_ns {enforcement_ns!r} is not allowed; use whole "
                            "nanoseconds >= 0")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise AnalysisError(f"task {dup!r}: name is used twice; names must be unique")
    tasks = with_priorities(tasks)
    where, assumed = partition(tasks, vcpus)
    servers = []
    for v in range(vcpus):
        mine = [t for t in tasks if where[t.name] == v]
        servers.append(_server_for(v, mine, model, period_ns, deadline_ns, overhead_ns,
                                   period_bounds, granularity_ns, period_steps, enforcement_ns))
    return GuestInterface(
        servers=tuple(servers), model=model, partition="assumed" if assumed else "pinned",
        assignment=dict(where),
        priorities={t.name: t.priority for t in tasks if t.scheduler == "fp" and t.priority})


def _server_for(vcpu: int, tasks: List[Task], model: str, period: Optional[int],
                deadline: Optional[int], overhead: int, bounds: Optional[Tuple[int, int]],
                grid: int, steps: int, loss: int = 0) -> ServerInterface:
    names = tuple(t.name for t in tasks)
    u = utilisation(tasks)
    if bounds is None:
        hi = min(DL_PERIOD_MAX_NS, min((t.deadline_ns for t in tasks), default=DL_PERIOD_MIN_NS))
        lo = DL_PERIOD_MIN_NS
        bounds = (lo, max(lo, hi))
    lo, hi = _ceil_div(bounds[0], grid) * grid, bounds[1] // grid * grid
    if hi < lo:
        raise AnalysisError(f"period bounds {bounds!r} hold no multiple of the {grid} ns grid")
    if not tasks:
        p = period if period is not None else lo
        return ServerInterface(vcpu, 0, p, deadline or p, (), True, overhead, model, u, {},
                               "no real-time tasks: no reservation needed", True, loss)
    wl = Workload(tasks)
    exact = True
    found: Optional[Tuple[int, int, int]]
    if period is not None:
        if model == "prm" or deadline is not None:
            d = period if deadline is None else deadline
            q = _min_budget(wl, period, d, overhead, grid, None, loss)
            found = None if q is None else (period, q, d)
            exact = wl.capped == 0
        else:
            q = _min_budget(wl, period, None, overhead, grid, None, loss)
            exact = wl.capped == 0
            found = None if q is None else (
                period, q, _max_deadline(wl, period, q, overhead, grid, loss))
        full = (period, (deadline or period) - overhead - loss, deadline or period)
    else:
        best = _search_period(wl, lo, hi, model, overhead, grid, steps, loss)
        if best is None:
            found = None
        elif model == "prm":
            found = (best[0], best[1], best[0])
            exact = best[2]
        else:
            found = (best[0], best[1], _max_deadline(wl, best[0], best[1], overhead, grid, loss))
            exact = best[2]
            found, exact = _cheapest_for_host(wl, found, exact, lo, hi, overhead, grid,
                                                  steps, loss)
        full = (hi, hi - overhead - loss, hi)
    if found is None:
        p, q, d = full
        if q < 1 and not loss:
            q = 1
        if q < 1:
            return ServerInterface(
                vcpu, max(1, q), p, d, names, False, overhead, model, u, {},
                f"no server fits: a period of at most {p} ns (the shortest task deadline) "
                f"leaves no room for a chunk of runtime + the host's enforcement overrun "
                f"{loss} ns before its deadline; switch HRTICK_DL on (or use a kernel with a "
                "shorter tick)", exact, loss)
        verdict = wl.verdict(EDP(p, q, d, loss))
        return ServerInterface(vcpu, q, p, d, names, False, overhead, model, u, {},
                               "unschedulable even with the full budget: " + verdict.reason
                               + (f" (the host's enforcement overrun of {loss} ns per period "
                                  "counted; HRTICK_DL would remove it)" if loss else ""),
                               exact, loss)
    p, q, d = found
    verdict = wl.verdict(EDP(p, q, d, loss))
    assert verdict.schedulable, verdict.reason
    reason = verdict.reason if exact else (
        verdict.reason + "; some tests hit the work limit, so the budget is safe but may not be least")
    return ServerInterface(vcpu, q, p, d, names, True, overhead, model, u,
                           verdict.response_times_ns, reason, exact, loss)


def _cheapest_for_host(wl: Workload, found: Tuple[int, int, int], exact: bool, lo: int, hi: int,
                       overhead: int, grid: int, steps: int,
                       loss: int) -> Tuple[Tuple[int, int, int], bool]:
    """Among servers that meet every deadline, the one the host's density test charges least.

    The least-bandwidth EDP server often has a tight deadline, and its
    density (Θ + overhead + g)/Δ can then be near 1 (under tick enforcement
    always).  The best Δ = Π server (the PRM search) pays g over the whole
    period instead.  Keys: density, then bandwidth, then the larger period.
    """
    def key(p: int, q: int, d: int) -> Tuple[Fraction, Fraction, int]:
        return (Fraction(q + overhead + loss, d), Fraction(q + overhead, p), -p)

    best, best_exact = found, exact
    implicit = _search_period(wl, lo, hi, "prm", overhead, grid, steps, loss)
    if implicit is not None and key(implicit[0], implicit[1], implicit[0]) < key(*best):
        best, best_exact = (implicit[0], implicit[1], implicit[0]), implicit[2]
    # The PRM search ranks by bandwidth; with a loss the density g/Π term
    # favours longer periods, so rank the coarse grid by density as well.
    ranked: List[Tuple[Tuple[Fraction, Fraction, int], int, int]] = []
    wl.set_work(SEARCH_WORK)
    wl.quick = True
    try:
        for p in _grid(lo, hi, steps, grid, geometric=True):
            q = _min_budget(wl, p, p, overhead, grid, None, loss)
            if q is not None:
                ranked.append((key(p, q, p), p, q))
    finally:
        wl.set_work(wl.max_work)
        wl.quick = False
    ranked.sort()
    for k, p, proven in ranked[:FINALISTS]:
        if k >= key(*best):
            break
        before = wl.capped
        q = _min_budget(wl, p, p, overhead, grid, proven, loss)
        assert q is not None and q <= proven
        if key(p, q, p) < key(*best):
            best, best_exact = (p, q, p), wl.capped == before
    return best, best_exact
