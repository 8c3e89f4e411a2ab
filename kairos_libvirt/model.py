"""The declaration's data model: plain dataclasses, no XML (cheap to import in the hook)."""
from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Dict, Mapping, Optional


@dataclass(frozen=True)
class VcpuSched:
    """A reservation for one vCPU thread.

    ``deadline``: SCHED_DEADLINE (runtime, deadline, period).
    ``fifo``/``rr``: a Linux priority plus an RT-group bandwidth
    (``cpu.rt_runtime_us``/``cpu.rt_period_us``) bounding the vCPU.
    """

    policy: str
    runtime_ns: int
    period_ns: int
    deadline_ns: Optional[int] = None
    priority: Optional[int] = None

    @property
    def effective_deadline_ns(self) -> int:
        return self.deadline_ns if self.deadline_ns is not None else self.period_ns

    @property
    def bandwidth(self) -> Fraction:
        return Fraction(self.runtime_ns, self.period_ns)


@dataclass(frozen=True)
class Introspection:
    backend: str = "off"
    #: Most bandwidth per vCPU introspection may grant; None = the declared one.
    ceiling: Optional[Fraction] = None
    #: The stop budget (introspect/budget.py): share of any 1 s window the guest
    #: may stand stopped, longest trap stop, longest attach stop; None = default.
    stop_share: Optional[Fraction] = None
    max_stop_ns: Optional[int] = None
    attach_stop_ns: Optional[int] = None

    def budget_json(self) -> Dict[str, object]:
        """The stop budget as the ledger entry keeps it (introspect.budget.spec_from_json)."""
        out: Dict[str, object] = {}
        if self.stop_share is not None:
            out["stop_share"] = str(self.stop_share)
        if self.max_stop_ns is not None:
            out["max_stop_ns"] = self.max_stop_ns
        if self.attach_stop_ns is not None:
            out["attach_stop_ns"] = self.attach_stop_ns
        return out


@dataclass(frozen=True)
class Declaration:
    default: Optional[VcpuSched] = None
    vcpus: Mapping[int, VcpuSched] = field(default_factory=dict)
    introspection: Introspection = field(default_factory=Introspection)

    def resolve(self, nvcpus: int) -> Dict[int, VcpuSched]:
        """Per-vCPU reservation for a domain with ``nvcpus`` vCPUs."""
        out: Dict[int, VcpuSched] = {}
        if self.default is not None:
            out = {i: self.default for i in range(nvcpus)}
        out.update({i: s for i, s in self.vcpus.items() if i < nvcpus})
        return dict(sorted(out.items()))

    def ceiling_for(self, sched: VcpuSched) -> Fraction:
        c = self.introspection.ceiling
        return c if c is not None else sched.bandwidth

    @property
    def policies(self) -> set:
        scheds = list(self.vcpus.values()) + ([self.default] if self.default else [])
        return {s.policy for s in scheds}


@dataclass(frozen=True)
class DomainInfo:
    """What the hook needs from libvirt's domain XML."""

    name: str
    uuid: str
    domain_type: str
    vcpus_max: int
    vcpus_current: int
    declaration: Optional[Declaration]
    #: vCPU id -> cpuset text, from <vcpu cpuset=> and <cputune><vcpupin>.
    pinned: Mapping[int, str] = field(default_factory=dict)
    #: vCPU ids that libvirt's own <cputune><vcpusched> already schedules.
    libvirt_vcpusched: frozenset = frozenset()
    #: <os><kernel> of a direct-kernel-boot domain (guest symbols come from it).
    kernel: Optional[str] = None
