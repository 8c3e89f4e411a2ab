"""How the host really enforces a SCHED_DEADLINE server, and what that leaves the guest (pure).

Without the ``HRTICK_DL`` scheduler feature (off by default, and unreadable
under lockdown), the kernel notices an exhausted runtime only when it next
accounts the running task: at a context switch or at the scheduler tick.  A
greedy vCPU thread is switched out only by the tick, so it overruns its
runtime by up to one tick ``g`` (4 ms at HZ=250).  The kernel keeps the
overrun as debt (``replenish_dl_entity`` adds whole periods while the
runtime is not positive), so the average bandwidth stays right but the
supply pattern does not: with Θ below a tick the thread runs a tick, then
skips periods to repay it (measured: 1 ms / 1 ms / 7 ms went 33.9 ms
without the CPU; the EDP bound is 6 ms).

The model, for a server with runtime R, deadline Δ, period Π and an
enforcement granularity g (the worst overrun):

1. **Every chunk of execution is at most R + g long**, and k consecutive
   chunks at most kR + g (the debt is below g at every throttle).  So the
   host-level tests count a server as a constrained-deadline sporadic task
   of execution R + g, deadline Δ, period Π (density (R + g)/Δ), and its
   processor demand in a window of length L ≥ Δ as dbf(L) + g.
2. **If every chunk completes by its deadline** (the host test passes; it
   needs R + g ≤ Δ), then by the deadline of its k-th period the thread has
   consumed at least kR (the debt only carries excess), while at the start of
   a period it can have consumed at most the EDP's most plus g.  The supply
   in any window is therefore at least sbf_EDP(t) − g.
   **Corrected (bench/supply, 2026-12-01): that holds only for R ≥ g.**  The
   debt d < g left at a throttle is repaid by j = ⌊d/R⌋ + 1 budgets at the
   next replenishment (``replenish_dl_entity`` adds periods while the runtime
   is not positive), all granted at once at the next activation a = pΠ, with
   the deadline moved (j − 1) periods on.  The thread has then consumed
   pR + d, and its chunk runs jR − d + d' (d' < g the new overrun): by its
   end it has consumed (p + j)R + d', while the EDP may have consumed at most
   (p + 1)R by then.  So the thread runs ahead of the EDP's most by up to
   (j − 1)R + d' < R(⌈g/R⌉ − 1) + g, not g; and under contention EDF may
   place the following chunks as late as their deadlines allow, which turns
   that lead into a shortfall.  The lower side is unchanged (every deadline
   met, consumption 1-Lipschitz).  Hence the supply is at least

       sbf_EDP(t) − L(R),   L(R) = g + R·(⌈g/R⌉ − 1)   (= g when R ≥ g)

   A simulation of the kernel's rule (chunks placed early or as late as
   their postponed deadlines allow, overruns in [0, g)) reaches L(R) − g
   below sbf − g exactly (2/10/10 ms: 2 ms; 1/10/10 ms: 3 ms; 3/10/20 ms:
   3 ms) and never falls below sbf − L(R).  :meth:`Enforcement.loss_ns`
   is L(R); the guest analysis must use it (or keep Θ ≥ g, where it is g).

With HRTICK_DL on, g is the hrtimer's slack (tens of µs); with g = 0 the
model is the plain EDP.  docs/analysis.md has the derivation at length and
``bench/supply`` checks it against the real kernel.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import AnalysisError
from .supply import EDP, sbf

#: What an HRTICK_DL host overruns by at most: the hrtimer programmed at the
#: runtime's end fires late by its slack and the IRQ path (measured well below).
HRTICK_SLACK_NS = 50_000


@dataclass(frozen=True)
class Enforcement:
    """The host's enforcement granularity: the longest a server can overrun its runtime."""

    granularity_ns: int
    #: How it was found, for messages ("tick: CONFIG_HZ=250, HRTICK_DL off", …).
    source: str = "exact (no overrun)"

    def __post_init__(self) -> None:
        g = self.granularity_ns
        if not isinstance(g, int) or isinstance(g, bool) or g < 0:
            raise AnalysisError(f"enforcement granularity {g!r} ns is not allowed; use a whole "
                                "number of nanoseconds >= 0")

    def chunk_ns(self, runtime_ns: int) -> int:
        """Longest execution of one period's chunk: the runtime plus one overrun."""
        return runtime_ns + self.granularity_ns

    def loss_ns(self, runtime_ns: int) -> int:
        """What the guest loses against the plain EDP: g + R·(⌈g/R⌉ − 1), g when R ≥ g."""
        g = self.granularity_ns
        if g == 0 or runtime_ns >= g:
            return g
        return g + runtime_ns * (-(-g // runtime_ns) - 1)

    def suppliable(self, runtime_ns: int, deadline_ns: int) -> bool:
        """Can a chunk (runtime + overrun) fit before the deadline at all?"""
        return self.chunk_ns(runtime_ns) <= deadline_ns

    def supply(self, period_ns: int, budget_ns: int, deadline_ns: int) -> EDP:
        """The supply model the guest may assume of this server: EDP less :meth:`loss_ns`.

        Valid only when the host-level test passes (every chunk meets its deadline).
        """
        return EDP(period_ns, budget_ns, deadline_ns, self.loss_ns(budget_ns))

    def delivered_sbf(self, t: int, period_ns: int, budget_ns: int, deadline_ns: int) -> int:
        """Least supply in any window of ``t`` that the analysis assumes the host delivers."""
        return sbf(t, period_ns, budget_ns, deadline_ns, self.loss_ns(budget_ns))


#: The model of a host that enforces budgets exactly (HRTICK_DL with no slack): the plain EDP.
EXACT = Enforcement(0)


def tick_enforcement(hz: int, hrtick_dl: bool | None) -> Enforcement:
    """The granularity of a kernel with CONFIG_HZ=``hz``: one tick, or the hrtick slack.

    ``hrtick_dl`` None means unknown (debugfs unreadable): assume the default, off.
    """
    if not isinstance(hz, int) or isinstance(hz, bool) or hz <= 0:
        raise AnalysisError(f"CONFIG_HZ {hz!r} is not allowed; use a positive integer")
    if hrtick_dl:
        return Enforcement(HRTICK_SLACK_NS, f"HRTICK_DL on (CONFIG_HZ={hz})")
    state = "off" if hrtick_dl is False else "unknown, assumed off (the kernel's default)"
    return Enforcement(-(-1_000_000_000 // hz), f"tick: CONFIG_HZ={hz}, HRTICK_DL {state}")
