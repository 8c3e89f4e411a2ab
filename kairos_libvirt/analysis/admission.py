"""Host admission arithmetic: will the kernel take these servers, and will it supply them?

Two questions, both answered here (the ledger asks them at every ``virsh
start`` and every regrant; there is no second copy of this arithmetic).

1. *Will the kernel admit them?*  Linux admits a SCHED_DEADLINE task when the root domain's total deadline
bandwidth stays within ``sched_rt_runtime_us / sched_rt_period_us`` (95% by
default) times its number of CPUs (``__dl_overflow`` in kernel/sched/deadline.c;
the kernel uses 20-bit fixed point, we use exact fractions).  When vCPU
servers are pinned to host CPUs we also check each CPU on its own: the
servers on it must fit under the limit, and when a server's deadline is below
its period, bandwidth alone does not guarantee that EDF on that CPU meets the
servers' deadlines, so we run the exact processor-demand test on them
(see :mod:`.schedulability`, with a dedicated CPU as supply).

2. *Will every server get its supply?*  Utilisation is necessary, not
sufficient (Documentation/scheduler/sched-deadline.rst §3.2–3.3): with
deadline < period, or with global EDF on several CPUs, a set that fits the
bandwidth limit can miss.  So each server is counted as what the kernel
really runs (see :mod:`.enforcement`): a constrained-deadline sporadic task
of execution runtime + g (the enforcement granularity: one tick without
HRTICK_DL), deadline Δ, period Π.  Servers that float over the root domain
(global EDF) pass if either sound global-EDF test passes:

* density (Goossens, Funk & Baruah 2003, for constrained deadlines as in
  Bertogna, Cirinei & Lipari 2005): Σλ ≤ m − (m − 1)·λmax, λ = C/D;
* BCL (Bertogna, Cirinei & Lipari, "Improved schedulability analysis of EDF
  on multiprocessor platforms", ECRTS 2005): for every server k,
  Σ_{i≠k} min(β_i, 1 − λ_k) < m(1 − λ_k), with β_i = W_i(D_k)/D_k the
  most work server i can do in k's window with its deadline inside it.

The kernel's per-CPU fair server (since Linux 6.12: a deadline entity of
50 ms every 1 s on every CPU) is counted as one more such task per CPU.
Servers pinned to one CPU are checked on that CPU with the exact
processor-demand test, their chunks at runtime + g.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import List, Mapping, Optional, Sequence, Tuple

from ..errors import AdmissionError, AnalysisError
from ..units import format_fraction, format_ns
from .interface import DL_MIN_RUNTIME_NS, GuestInterface
from .enforcement import EXACT, Enforcement
from .model import Task
from .schedulability import edf_schedulable
from .supply import dedicated

#: Kernel defaults: sched_rt_runtime_us = 950000, sched_rt_period_us = 1000000.
DEFAULT_LIMIT = Fraction(950_000, 1_000_000)
#: The fair server's defaults (kernel/sched/deadline.c, dl_server since Linux
#: 6.12): 50 ms of runtime every 1 s, deadline = period, on every CPU.
FAIR_SERVER_RUNTIME_NS = 50_000_000
FAIR_SERVER_PERIOD_NS = 1_000_000_000


@dataclass(frozen=True)
class Reservation:
    """One SCHED_DEADLINE server to admit; ``cpu`` is the host CPU it is pinned to, if any."""

    name: str
    runtime_ns: int
    period_ns: int
    #: None on input means "= period"; after construction it is always an int.
    deadline_ns: int = None  # type: ignore[assignment]
    cpu: Optional[int] = None

    def __post_init__(self) -> None:
        if self.deadline_ns is None:
            object.__setattr__(self, "deadline_ns", self.period_ns)
        r, d, p = self.runtime_ns, self.deadline_ns, self.period_ns
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (r, d, p)) \
                or not DL_MIN_RUNTIME_NS <= r <= d <= p:
            raise AnalysisError(f"reservation {self.name!r}: runtime {r!r}, deadline {d!r}, "
                                f"period {p!r} ns are not allowed; SCHED_DEADLINE needs "
                                f"{DL_MIN_RUNTIME_NS} <= runtime <= deadline <= period")

    @property
    def bandwidth(self) -> Fraction:
        """runtime/period, what the kernel adds to the root domain's total."""
        return Fraction(self.runtime_ns, self.period_ns)


def dl_bandwidth_limit(rt_runtime_us: int, rt_period_us: int) -> Optional[Fraction]:
    """Per-CPU deadline bandwidth limit from the two sysctls; None when runtime is -1 (no limit)."""
    if rt_runtime_us == -1:
        return None
    if rt_period_us <= 0 or not 0 <= rt_runtime_us <= rt_period_us:
        raise AnalysisError(f"sched_rt_runtime_us {rt_runtime_us} / sched_rt_period_us "
                            f"{rt_period_us} is not allowed; need 0 <= runtime <= period, period > 0")
    return Fraction(rt_runtime_us, rt_period_us)


@dataclass(frozen=True)
class CpuLoad:
    """One host CPU: what is already there, what we add, and whether it fits."""

    cpu: int
    existing: Fraction
    requested: Tuple[Tuple[str, Fraction], ...]
    limit: Optional[Fraction]
    fits: bool
    deadlines_met: bool

    @property
    def total(self) -> Fraction:
        """existing + requested bandwidth."""
        return self.existing + sum((bw for _, bw in self.requested), Fraction(0))


@dataclass(frozen=True)
class AdmissionReport:
    """The verdict and the numbers behind it."""

    admitted: bool
    message: str
    domain_total: Fraction
    domain_capacity: Optional[Fraction]
    cpus: Tuple[CpuLoad, ...]


def _f(x: Optional[Fraction]) -> str:
    return "none" if x is None else format_fraction(x)


def check_admission(reservations: Sequence[Reservation], *, cpus: Sequence[int],
                    limit: Optional[Fraction] = DEFAULT_LIMIT,
                    existing: Optional[Mapping[int, Fraction]] = None,
                    enforcement: Enforcement = EXACT, fair_server: bool = False,
                    capacity: Optional[Fraction] = None,
                    bandwidth_only: Sequence[Reservation] = ()) -> AdmissionReport:
    """Would ``reservations`` be admitted on the root domain made of ``cpus``, and supplied?

    ``existing`` is the deadline bandwidth already admitted per CPU by
    others we know only by bandwidth; ``limit`` None means
    ``sched_rt_runtime_us = -1`` (the kernel checks nothing).  ``capacity``
    overrides limit × CPUs when the ledger probed what the kernel really
    admits.  ``enforcement`` is the host's granularity (see the module
    docstring); ``fair_server`` counts the kernel's per-CPU fair server.
    ``bandwidth_only`` are reservations that hold the same capacity but are
    not deadline servers (RT-group budgets of fifo/rr vCPUs, which run below
    SCHED_DEADLINE): counted by bandwidth only.
    """
    cpus = list(cpus)
    if not cpus or len(set(cpus)) != len(cpus):
        raise AnalysisError(f"cpus {cpus!r} is not allowed; give the distinct CPUs of the root domain")
    existing = dict(existing or {})
    for cpu in existing:
        if cpu not in cpus:
            raise AnalysisError(f"existing load on CPU {cpu} is outside the CPUs {cpus}")
    for r in reservations:
        if r.cpu is not None and r.cpu not in cpus:
            raise AnalysisError(f"reservation {r.name!r}: cpu {r.cpu} is not allowed; use one of {cpus}")
    problems: List[str] = []
    g = enforcement.granularity_ns
    other_bandwidth = sum((r.bandwidth for r in bandwidth_only), Fraction(0))
    total = (sum(existing.values(), Fraction(0)) + other_bandwidth
             + sum((r.bandwidth for r in reservations), Fraction(0)))
    for r in list(reservations) + list(bandwidth_only):
        if limit is not None and r.bandwidth > limit:
            problems.append(f"{r.name} asks for {_f(r.bandwidth)} of a CPU (runtime "
                            f"{format_ns(r.runtime_ns)} / period {format_ns(r.period_ns)}) but one "
                            f"CPU offers at most {_f(limit)}")
    if capacity is None:
        capacity = None if limit is None else limit * len(cpus)
        cap_text = f"{len(cpus)} × limit {_f(limit)} = {_f(capacity)}"
    else:
        cap_text = f"the capacity {_f(capacity)}"
    if capacity is not None and total > capacity:
        problems.append(
            f"root domain of {len(cpus)} CPUs: deadline bandwidth {_f(total)} (existing "
            f"{_f(sum(existing.values(), Fraction(0)) + other_bandwidth)} + requested "
            f"{_f(total - sum(existing.values(), Fraction(0)) - other_bandwidth)}) exceeds "
            f"{cap_text}")
    for r in reservations:
        if not enforcement.suppliable(r.runtime_ns, r.deadline_ns):
            problems.append(
                f"{r.name}: runtime {format_ns(r.runtime_ns)} + the host's enforcement "
                f"granularity {format_ns(g)} ({enforcement.source}) = "
                f"{format_ns(enforcement.chunk_ns(r.runtime_ns))} exceeds its deadline "
                f"{format_ns(r.deadline_ns)}: the kernel would overrun it and then skip whole "
                f"periods; use a deadline (and period) of at least "
                f"{format_ns(enforcement.chunk_ns(r.runtime_ns))}, or switch HRTICK_DL on")
    floating = [r for r in reservations if r.cpu is None]
    if floating and not problems:
        verdict = global_edf_verdict(floating, len(cpus), enforcement, fair_server)
        if verdict is not None:
            problems.append(verdict)
    loads: List[CpuLoad] = []
    for cpu in cpus:
        mine = [r for r in reservations if r.cpu == cpu]
        if not mine and cpu not in existing:
            continue
        have = existing.get(cpu, Fraction(0))
        req = tuple((r.name, r.bandwidth) for r in mine)
        tot = have + sum((bw for _, bw in req), Fraction(0))
        fits = limit is None or tot <= limit
        met = _deadlines_met(mine, have, enforcement, fair_server)
        loads.append(CpuLoad(cpu, have, req, limit, fits, met))
        names = ", ".join(f"{n} {_f(bw)}" for n, bw in req)
        if not fits:
            problems.append(f"CPU {cpu}: deadline bandwidth {_f(tot)} (existing {_f(have)} + "
                            f"requested {_f(tot - have)}: {names}) exceeds the limit {_f(limit)} "
                            "(sched_rt_runtime_us / sched_rt_period_us)")
        elif not met:
            problems.append(f"CPU {cpu}: the servers ({names}) fit the bandwidth limit but EDF on "
                            "this CPU would miss their deadlines (deadline below period, or the "
                            f"overrun of {format_ns(g)} per period); raise their deadlines or move "
                            "one to another CPU")
    if problems:
        return AdmissionReport(False, "refused: " + "; ".join(problems), total, capacity, tuple(loads))
    return AdmissionReport(True, f"admitted: deadline bandwidth {_f(total)}"
                                 + (f" of {_f(capacity)}" if capacity is not None else " (no limit)"),
                           total, capacity, tuple(loads))


@dataclass(frozen=True)
class _Sporadic:
    """A server as the host runs it: chunks of ``c`` within ``d``, every ``t`` (ns)."""

    name: str
    c: int
    d: int
    t: int

    @property
    def density(self) -> Fraction:
        return Fraction(self.c, self.d)


def _host_tasks(servers: Sequence[Reservation], m: int, enforcement: Enforcement,
                fair_server: bool) -> List[_Sporadic]:
    out = [_Sporadic(r.name, enforcement.chunk_ns(r.runtime_ns), r.deadline_ns, r.period_ns)
           for r in servers]
    if fair_server:
        out += [_Sporadic(f"fair server of CPU {i}",
                          enforcement.chunk_ns(FAIR_SERVER_RUNTIME_NS),
                          FAIR_SERVER_PERIOD_NS, FAIR_SERVER_PERIOD_NS) for i in range(m)]
    return out


def density_test(tasks: Sequence[_Sporadic], m: int) -> bool:
    """GFB for constrained deadlines: Σλ ≤ m − (m − 1)·λmax (sound for global EDF)."""
    if any(x.c > x.d for x in tasks):
        return False
    lam = [x.density for x in tasks]
    return sum(lam, Fraction(0)) <= m - (m - 1) * max(lam, default=Fraction(0))


def bcl_test(tasks: Sequence[_Sporadic], m: int) -> bool:
    """Bertogna, Cirinei & Lipari (ECRTS 2005), Theorem 7: sound for global EDF.

    For each task k: the work of i in k's window [r, r + D_k] with its
    deadline inside it is at most W_i = N·C_i + min(C_i, max(0, D_k − N·T_i)),
    N = ⌊(D_k − D_i)/T_i⌋ + 1 (its last job's deadline at the window's end);
    k meets its deadline if Σ_{i≠k} min(W_i/D_k, 1 − λ_k) < m(1 − λ_k), or
    equality holds and some 0 < W_i/D_k ≤ 1 − λ_k.
    """
    for k, tk in enumerate(tasks):
        if tk.c > tk.d:
            return False
        room = 1 - tk.density
        acc = Fraction(0)
        small = False
        for i, ti in enumerate(tasks):
            if i == k:
                continue
            n = (tk.d - ti.d) // ti.t + 1 if tk.d >= ti.d else 0
            w = n * ti.c + min(ti.c, max(0, tk.d - n * ti.t))
            beta = Fraction(w, tk.d)
            acc += min(beta, room)
            small = small or 0 < beta <= room
        if not (acc < m * room or (acc == m * room and small)):
            return False
    return True


def global_edf_verdict(servers: Sequence[Reservation], m: int, enforcement: Enforcement,
                       fair_server: bool) -> Optional[str]:
    """None when a sound global-EDF test proves every server meets its deadlines; else why not."""
    tasks = _host_tasks(servers, m, enforcement, fair_server)
    if m == 1:
        ok = edf_schedulable([Task(x.name, x.c, x.t, x.d) for x in tasks], dedicated())
        test = "the processor-demand test"
    else:
        ok = density_test(tasks, m) or bcl_test(tasks, m)
        test = "the global-EDF density (GFB) and BCL tests"
    if ok:
        return None
    lam = [x.density for x in tasks]
    worst = max(tasks, key=lambda x: x.density)
    return (f"{len(servers)} server(s) floating over {m} CPUs fail {test}: density "
            f"Σ(runtime + {format_ns(enforcement.granularity_ns)} overrun)/deadline = "
            f"{_f(sum(lam, Fraction(0)))}, largest {_f(worst.density)} ({worst.name}), "
            f"the density bound allows {_f(m - (m - 1) * max(lam))}"
            + ("; the kernel's fair servers count 50 ms per 1 s per CPU" if fair_server else "")
            + ". Stop another RT domain, lengthen the deadlines (deadline = period is the "
              "cheapest), or switch HRTICK_DL on to drop the overrun")


def host_density(runtime_ns: int, deadline_ns: int, enforcement: Enforcement) -> Fraction:
    """What one server costs under the global tests: (runtime + overrun)/deadline."""
    return Fraction(enforcement.chunk_ns(runtime_ns), deadline_ns)


def _deadlines_met(mine: List[Reservation], have: Fraction, enforcement: Enforcement = EXACT,
                   fair_server: bool = False) -> bool:
    """Do the servers pinned to one CPU meet their own deadlines under the host's EDF?

    Implicit deadlines: bandwidth <= 1 suffices (Liu & Layland).  Constrained,
    nothing else on the CPU: exact processor-demand test.  Constrained with
    unknown existing load: the sufficient density test Σ runtime/deadline
    + existing <= 1.
    """
    if not mine:
        return True
    tasks = _host_tasks(mine, 1, enforcement, fair_server)
    if any(x.c > x.d for x in tasks):
        return False
    if all(x.d == x.t for x in tasks):
        return have + sum((Fraction(x.c, x.t) for x in tasks), Fraction(0)) <= 1
    if have == 0:
        return edf_schedulable([Task(x.name, x.c, x.t, x.d) for x in tasks], dedicated())
    return have + sum((x.density for x in tasks), Fraction(0)) <= 1


def admit(reservations: Sequence[Reservation], *, cpus: Sequence[int],
          limit: Optional[Fraction] = DEFAULT_LIMIT,
          existing: Optional[Mapping[int, Fraction]] = None,
          enforcement: Enforcement = EXACT, fair_server: bool = False,
          capacity: Optional[Fraction] = None,
          bandwidth_only: Sequence[Reservation] = ()) -> AdmissionReport:
    """Like :func:`check_admission` but raises :class:`AdmissionError` naming the numbers."""
    report = check_admission(reservations, cpus=cpus, limit=limit, existing=existing,
                             enforcement=enforcement, fair_server=fair_server, capacity=capacity,
                             bandwidth_only=bandwidth_only)
    if not report.admitted:
        raise AdmissionError(report.message)
    return report


def reservations_from(interface: GuestInterface, *, prefix: str = "",
                      cpus: Optional[Mapping[int, int]] = None) -> List[Reservation]:
    """Reservations for the vCPUs of a :class:`.interface.GuestInterface` that need one.

    ``cpus`` maps vCPU -> host CPU when the vCPUs are pinned.
    """
    out: List[Reservation] = []
    for s in interface.servers:
        if s.runtime_ns:
            out.append(Reservation(f"{prefix}vcpu{s.vcpu}", s.runtime_ns, s.period_ns, s.deadline_ns,
                                   None if cpus is None else cpus.get(s.vcpu)))
    return out
