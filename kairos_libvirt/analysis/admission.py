"""Host admission arithmetic: will the kernel, and each host CPU, take these servers?

Linux admits a SCHED_DEADLINE task when the root domain's total deadline
bandwidth stays within ``sched_rt_runtime_us / sched_rt_period_us`` (95% by
default) times its number of CPUs (``__dl_overflow`` in kernel/sched/deadline.c;
the kernel uses 20-bit fixed point, we use exact fractions).  When vCPU
servers are pinned to host CPUs we also check each CPU on its own: the
servers on it must fit under the limit, and when a server's deadline is below
its period, bandwidth alone does not guarantee that EDF on that CPU meets the
servers' deadlines, so we run the exact processor-demand test on them
(see :mod:`.schedulability`, with a dedicated CPU as supply).
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import List, Mapping, Optional, Sequence, Tuple

from ..errors import AdmissionError, AnalysisError
from ..units import format_fraction
from .interface import DL_MIN_RUNTIME_NS, GuestInterface
from .model import Task
from .schedulability import edf_schedulable
from .supply import dedicated

#: Kernel defaults: sched_rt_runtime_us = 950000, sched_rt_period_us = 1000000.
DEFAULT_LIMIT = Fraction(950_000, 1_000_000)


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
                    existing: Optional[Mapping[int, Fraction]] = None) -> AdmissionReport:
    """Would ``reservations`` be admitted on the root domain made of ``cpus``?

    ``existing`` is the deadline bandwidth already admitted per CPU; ``limit``
    None means ``sched_rt_runtime_us = -1`` (the kernel checks nothing).
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
    total = sum(existing.values(), Fraction(0)) + sum((r.bandwidth for r in reservations), Fraction(0))
    capacity = None if limit is None else limit * len(cpus)
    if capacity is not None and total > capacity:
        problems.append(
            f"root domain of {len(cpus)} CPUs: deadline bandwidth {_f(total)} (existing "
            f"{_f(sum(existing.values(), Fraction(0)))} + requested "
            f"{_f(total - sum(existing.values(), Fraction(0)))}) exceeds {len(cpus)} × limit "
            f"{_f(limit)} = {_f(capacity)}")
    loads: List[CpuLoad] = []
    for cpu in cpus:
        mine = [r for r in reservations if r.cpu == cpu]
        if not mine and cpu not in existing:
            continue
        have = existing.get(cpu, Fraction(0))
        req = tuple((r.name, r.bandwidth) for r in mine)
        tot = have + sum((bw for _, bw in req), Fraction(0))
        fits = limit is None or tot <= limit
        met = _deadlines_met(mine, have)
        loads.append(CpuLoad(cpu, have, req, limit, fits, met))
        names = ", ".join(f"{n} {_f(bw)}" for n, bw in req)
        if not fits:
            problems.append(f"CPU {cpu}: deadline bandwidth {_f(tot)} (existing {_f(have)} + "
                            f"requested {_f(tot - have)}: {names}) exceeds the limit {_f(limit)} "
                            "(sched_rt_runtime_us / sched_rt_period_us)")
        elif not met:
            problems.append(f"CPU {cpu}: the servers ({names}) fit the bandwidth limit but EDF on "
                            "this CPU would miss their deadlines (deadline below period); "
                            "raise their deadlines or move one to another CPU")
    if problems:
        return AdmissionReport(False, "refused: " + "; ".join(problems), total, capacity, tuple(loads))
    return AdmissionReport(True, f"admitted: deadline bandwidth {_f(total)}"
                                 + (f" of {_f(capacity)}" if capacity is not None else " (no limit)"),
                           total, capacity, tuple(loads))


def _deadlines_met(mine: List[Reservation], have: Fraction) -> bool:
    """Do the servers pinned to one CPU meet their own deadlines under the host's EDF?

    Implicit deadlines: bandwidth <= 1 suffices (Liu & Layland).  Constrained,
    nothing else on the CPU: exact processor-demand test.  Constrained with
    unknown existing load: the sufficient density test Σ runtime/deadline
    + existing <= 1.
    """
    if all(r.deadline_ns == r.period_ns for r in mine):
        return have + sum((r.bandwidth for r in mine), Fraction(0)) <= 1
    if have == 0:
        tasks = [Task(r.name, r.runtime_ns, r.period_ns, r.deadline_ns) for r in mine]
        return edf_schedulable(tasks, dedicated())
    density = sum((Fraction(r.runtime_ns, r.deadline_ns) for r in mine), Fraction(0))
    return have + density <= 1


def admit(reservations: Sequence[Reservation], *, cpus: Sequence[int],
          limit: Optional[Fraction] = DEFAULT_LIMIT,
          existing: Optional[Mapping[int, Fraction]] = None) -> AdmissionReport:
    """Like :func:`check_admission` but raises :class:`AdmissionError` naming the numbers."""
    report = check_admission(reservations, cpus=cpus, limit=limit, existing=existing)
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
