"""What a vCPU server guarantees: supply bound functions of periodic servers.

The host runs each vCPU as a SCHED_DEADLINE task (runtime Θ, deadline Δ,
period Π): in every period it gets Θ time units before Δ.  That is the
explicit-deadline periodic (EDP) resource model of Easwaran, Anand & Lee
("Compositional analysis framework using EDP resource models", RTSS 2007);
the periodic resource model (PRM) of Shin & Lee ("Periodic resource model for
compositional real-time guarantees", RTSS 2003) is the case Δ = Π.

Worst case for the guest: the budget came as early as possible in one period
(ending at the start of the window) and as late as possible in every later
one.  The window then starts with a blackout of Π + Δ − 2Θ, followed by Θ
units of supply every Π:

    sbf(t) = 0                                   if t < Δ − Θ
           = yΘ + max(0, t − (Π + Δ − 2Θ) − yΠ)  otherwise, y = ⌊(t − (Δ − Θ)) / Π⌋

A host that enforces budgets only at its tick lets a server overrun by up
to one granularity g and takes it back later (see :mod:`.enforcement`); the
supply it guarantees is sbf(t) − g (never below 0).  ``loss`` is that g:
every function here takes it, 0 for the plain model.

Everything is integer nanoseconds; the lower linear bound is a Fraction.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from ..errors import AnalysisError


def sbf(t: int, period: int, budget: int, deadline: int, loss: int = 0) -> int:
    """Minimum supply of EDP(period, budget, deadline) in any window of length ``t``, less ``loss``."""
    off = deadline - budget
    if t < off:
        return 0
    y = (t - off) // period
    rest = t - (period + deadline - 2 * budget) - y * period
    s = y * budget + rest if rest > 0 else y * budget
    return s - loss if s > loss else 0


def sbf_inverse(x: int, period: int, budget: int, deadline: int, loss: int = 0) -> int:
    """Smallest ``t`` with ``sbf(t) >= x``: how long a window must be to surely supply ``x``.

    After the blackout B, ``k`` whole budgets take ``k`` periods and the rest
    ``r`` in (0, Θ] is supplied at the start of the next budget: B + kΠ + r.
    With a loss L the window must supply x + L of the plain model.
    """
    if x <= 0:
        return 0
    x += loss
    k = (x - 1) // budget
    return period + deadline - 2 * budget + k * period + (x - k * budget)


@dataclass(frozen=True)
class EDP:
    """Explicit-deadline periodic resource: ``budget_ns`` every ``period_ns`` within ``deadline_ns``.

    Maps one-to-one onto SCHED_DEADLINE's (runtime, deadline, period) of the vCPU.
    ``loss_ns`` is the host's enforcement granularity (:mod:`.enforcement`):
    the supply it guarantees is sbf − loss.
    """

    period_ns: int
    budget_ns: int
    deadline_ns: int
    loss_ns: int = 0

    def __post_init__(self) -> None:
        p, q, d = self.period_ns, self.budget_ns, self.deadline_ns
        if not isinstance(self.loss_ns, int) or self.loss_ns < 0:
            raise AnalysisError(f"server loss {self.loss_ns!r} ns must be integer nanoseconds >= 0")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (p, q, d)):
            raise AnalysisError(f"server ({q}, {d}, {p}): budget, deadline and period must be "
                                "integer nanoseconds")
        if not 0 < q <= d <= p:
            raise AnalysisError(f"server budget {q} ns, deadline {d} ns, period {p} ns: "
                                "need 0 < budget <= deadline <= period")

    @property
    def blackout_ns(self) -> int:
        """Longest time without supply: Π + Δ − 2Θ (with a loss: until sbf exceeds it)."""
        if self.loss_ns:
            return self.sbf_inverse(1) - 1
        return self.period_ns + self.deadline_ns - 2 * self.budget_ns

    @property
    def bandwidth(self) -> Fraction:
        """Θ/Π, exact."""
        return Fraction(self.budget_ns, self.period_ns)

    @property
    def triple(self) -> tuple:
        """(period, budget, deadline, loss) as the exact tests take them."""
        return self.period_ns, self.budget_ns, self.deadline_ns, self.loss_ns

    def sbf(self, t: int) -> int:
        """Supply bound function (see the module docstring)."""
        return sbf(t, self.period_ns, self.budget_ns, self.deadline_ns, self.loss_ns)

    def sbf_inverse(self, x: int) -> int:
        """Smallest window length that surely supplies ``x``."""
        return sbf_inverse(x, self.period_ns, self.budget_ns, self.deadline_ns, self.loss_ns)

    def lsbf(self, t: int) -> Fraction:
        """Linear lower bound (Θ/Π)(t − B) − loss, touching sbf at the bottom corners B + kΠ."""
        b = self.period_ns + self.deadline_ns - 2 * self.budget_ns
        return max(Fraction(0), self.bandwidth * (t - b) - self.loss_ns)


def prm(period_ns: int, budget_ns: int) -> EDP:
    """Shin & Lee's periodic resource: EDP with deadline = period."""
    return EDP(period_ns, budget_ns, period_ns)


def dedicated() -> EDP:
    """A whole processor: sbf(t) = t (Θ = Δ = Π, no blackout)."""
    return EDP(1, 1, 1)
