"""Host-wide admission ledger: who holds how much real-time bandwidth.

A JSON file under ``/run/kairos`` (tmpfs: it dies with the boot, and a file
from an earlier boot is discarded by its ``boot_id``), changed only under an
exclusive ``flock`` so that concurrent ``virsh start``s admit atomically.
The ledger counts SCHED_DEADLINE servers and SCHED_FIFO/RR RT-group budgets
against one capacity: both take the same CPU time.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import time
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Dict, Iterator, List, Optional, Tuple

from . import analysis
from .analysis.enforcement import Enforcement
from .config import HostConfig
from .errors import AdmissionError, KairosError
from .host import proc
from .model import VcpuSched
from .units import format_fraction, format_ns

VERSION = 2
LEDGER = "ledger.json"
LOCK = "ledger.lock"
CAPACITY_CACHE = "dl-capacity.json"
#: A domain admitted at ``prepare`` whose QEMU never appeared (libvirt failed
#: the start without telling hooks) is dropped after this long.
PREPARED_TTL_S = 120


def sched_to_json(s: VcpuSched) -> dict:
    return {"policy": s.policy, "runtime_ns": s.runtime_ns, "period_ns": s.period_ns,
            "deadline_ns": s.deadline_ns, "priority": s.priority}


def sched_from_json(d: dict) -> VcpuSched:
    return VcpuSched(policy=d["policy"], runtime_ns=int(d["runtime_ns"]),
                     period_ns=int(d["period_ns"]), deadline_ns=d.get("deadline_ns"),
                     priority=d.get("priority"))


def _scheds_to_json(m: Dict[int, VcpuSched]) -> dict:
    return {str(k): sched_to_json(v) for k, v in sorted(m.items())}


def _scheds_from_json(d: dict) -> Dict[int, VcpuSched]:
    return {int(k): sched_from_json(v) for k, v in d.items()}


@dataclass
class IntrospectionSettings:
    """What the agent needs of ``<introspection>``: recorded by the hook at prepare."""

    backend: str
    ceilings: Dict[int, Fraction] = field(default_factory=dict)
    kernel: Optional[str] = None
    #: The declared stop budget (:func:`.introspect.budget.spec_from_json` reads it);
    #: None: the defaults.
    budget: Optional[dict] = None

    def to_json(self) -> dict:
        return {"backend": self.backend, "kernel": self.kernel, "budget": self.budget,
                "ceilings": {str(k): str(v) for k, v in sorted(self.ceilings.items())}}

    @classmethod
    def from_json(cls, d: dict) -> "IntrospectionSettings":
        return cls(backend=d.get("backend", "off"), kernel=d.get("kernel"),
                   ceilings={int(k): Fraction(v) for k, v in (d.get("ceilings") or {}).items()},
                   budget=d.get("budget"))


@dataclass
class RtGroups:
    """The RT-group cgroups a domain's fifo/rr vCPUs were given (owned by :mod:`.rtgroups`)."""

    domain_dir: str
    #: vCPU → (cpu.rt_runtime_us, cpu.rt_period_us)
    vcpus: Dict[int, Tuple[int, int]] = field(default_factory=dict)
    vcpu_dirs: Dict[int, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"domain_dir": self.domain_dir,
                "vcpus": {str(k): list(v) for k, v in sorted(self.vcpus.items())},
                "vcpu_dirs": {str(k): v for k, v in sorted(self.vcpu_dirs.items())}}

    @classmethod
    def from_json(cls, d: dict) -> "RtGroups":
        return cls(domain_dir=d["domain_dir"],
                   vcpus={int(k): (int(v[0]), int(v[1])) for k, v in d.get("vcpus", {}).items()},
                   vcpu_dirs={int(k): v for k, v in d.get("vcpu_dirs", {}).items()})


@dataclass
class Entry:
    """One domain's hold on the host: what it declared and what it is granted now.

    ``granted`` starts as ``declared``; introspection resizes it through
    :meth:`Ledger.regrant` only, so the ledger never holds a grant its
    admission test did not pass.
    """

    uuid: str
    declared: Dict[int, VcpuSched]
    granted: Dict[int, VcpuSched]
    state: str = "prepared"            # prepared | running
    since: float = 0.0
    qemu_pid: Optional[int] = None
    introspection: Optional[IntrospectionSettings] = None
    rt: Optional[RtGroups] = None

    @property
    def bandwidth(self) -> Fraction:
        """Bandwidth held now: the granted servers (introspection may resize them)."""
        return sum((s.bandwidth for s in self.granted.values()), Fraction(0))

    def to_json(self) -> dict:
        return {"uuid": self.uuid, "state": self.state, "since": self.since,
                "qemu_pid": self.qemu_pid, "vcpus": _scheds_to_json(self.declared),
                "granted": _scheds_to_json(self.granted),
                "introspection": None if self.introspection is None else self.introspection.to_json(),
                "rt": None if self.rt is None else self.rt.to_json()}

    @classmethod
    def from_json(cls, d: dict) -> "Entry":
        declared = _scheds_from_json(d["vcpus"])
        intro, rt = d.get("introspection"), d.get("rt")
        return cls(uuid=d.get("uuid", ""), declared=declared,
                   granted=_scheds_from_json(d["granted"]) if "granted" in d else dict(declared),
                   state=d.get("state", "prepared"), since=float(d.get("since", 0)),
                   qemu_pid=d.get("qemu_pid"),
                   introspection=None if not intro else IntrospectionSettings.from_json(intro),
                   rt=None if not rt else RtGroups.from_json(rt))


@dataclass
class LedgerState:
    """The whole ledger: every domain's entry and the originals kairos must restore."""

    boot_id: str
    domains: Dict[str, Entry] = field(default_factory=dict)
    #: Originals of shared host settings (e.g. ``machine_rt``: machine's cpu.rt_*).
    saved: Dict[str, dict] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"version": VERSION, "boot_id": self.boot_id, "saved": self.saved,
                "domains": {n: e.to_json() for n, e in sorted(self.domains.items())}}

    @classmethod
    def from_json(cls, d: dict) -> "LedgerState":
        return cls(boot_id=d["boot_id"], saved=dict(d.get("saved") or {}),
                   domains={n: Entry.from_json(e) for n, e in (d.get("domains") or {}).items()})


def entry_bandwidth(entry: Entry) -> Fraction:
    """Bandwidth an entry holds now (see :attr:`Entry.bandwidth`)."""
    return entry.bandwidth


@dataclass(frozen=True)
class Capacity:
    total: Fraction          # CPUs' worth of bandwidth the ledger may hand out
    per_cpu: Fraction        # most one vCPU may take
    cpus: frozenset
    source: str              # how ``total`` was found, for messages
    #: The kernel runs a fair server (a deadline entity) on every CPU: seen as the
    #: probed capacity falling short of share × CPUs (Linux 6.12 and later).
    fair_server: bool = False


def ensure_dir(path: str, mode: int = 0o755) -> None:
    os.makedirs(path, mode=mode, exist_ok=True)
    st = os.stat(path)
    if st.st_mode & 0o022:
        os.chmod(path, mode)


class Ledger:
    def __init__(self, cfg: HostConfig, enforcement: Optional[Enforcement] = None) -> None:
        self.cfg = cfg
        self.dir = cfg.run_dir
        self.path = os.path.join(self.dir, LEDGER)
        self._enforcement = enforcement

    # -- storage ---------------------------------------------------------
    @contextlib.contextmanager
    def locked(self) -> Iterator[LedgerState]:
        """Yield the ledger state under an exclusive lock; written back on success."""
        ensure_dir(self.dir)
        fd = os.open(os.path.join(self.dir, LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            state = self._load()
            before = json.dumps(state.to_json(), sort_keys=True)
            yield state
            after = state.to_json()
            if json.dumps(after, sort_keys=True) != before:
                self._save(after)
        finally:
            os.close(fd)

    def read(self) -> LedgerState:
        """A snapshot without the lock (for display)."""
        return self._load()

    def _load(self) -> LedgerState:
        fresh = LedgerState(boot_id=proc.boot_id())
        try:
            with open(self.path) as f:
                raw = json.load(f)
        except FileNotFoundError:
            return fresh
        except (OSError, ValueError):
            # A torn or foreign file: start over rather than refuse every start.
            return fresh
        if not isinstance(raw, dict) or raw.get("boot_id") != fresh.boot_id:
            return fresh
        try:
            return LedgerState.from_json(raw)
        except (KeyError, TypeError, ValueError, AttributeError):
            return fresh

    def _save(self, raw: dict) -> None:
        tmp = self.path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "w") as f:
            json.dump(raw, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    # -- capacity --------------------------------------------------------
    def capacity(self, state: LedgerState) -> Capacity:
        cpus = self.cfg.cpus or proc.online_cpus()
        kernel_share, kernel_source = _sysctl_share()
        if self.cfg.capacity_share is not None:
            share, source = self.cfg.capacity_share, "capacity_share in kairos.yaml"
        else:
            share, source = kernel_share, kernel_source
        total = share * len(cpus)
        probed = self._kernel_capacity(state)
        fair = False
        if probed is not None:
            # The kernel admits less than its sysctl share when its per-CPU fair
            # servers already hold deadline bandwidth (Linux 6.12+: 50 ms / 1 s).
            online = len(proc.online_cpus())
            fair = probed + Fraction(online, 100) <= kernel_share * online
            if probed < total:
                total = probed
                source += f", capped at {format_fraction(probed)} CPUs the kernel admits (probed)"
        return Capacity(total=total, per_cpu=share, cpus=frozenset(cpus), source=source,
                        fair_server=fair)

    def enforcement(self) -> Enforcement:
        """The host's enforcement granularity (see :mod:`.analysis.enforcement`)."""
        if self._enforcement is None:
            from .host import tick
            self._enforcement = tick.enforcement(self.cfg)
        return self._enforcement

    def _kernel_capacity(self, state: LedgerState) -> Optional[Fraction]:
        """The kernel's admitted deadline total, probed once per boot while nothing is held."""
        path = os.path.join(self.dir, CAPACITY_CACHE)
        key = {"boot_id": proc.boot_id(), "online": sorted(proc.online_cpus())}
        try:
            with open(path) as f:
                cached = json.load(f)
            if cached.get("key") == key:
                return Fraction(cached["capacity"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        if state.domains:
            return None  # would measure what our own domains hold
        from .host import dlprobe
        try:
            free = dlprobe.probe_free_bandwidth()
        except KairosError:
            return None
        # The kernel's fixed-point rounding admits a hair more than the share;
        # promise only whole ten-thousandths of a CPU.
        free = Fraction(math.floor(free * 10_000), 10_000)
        with open(path + ".tmp", "w") as f:
            json.dump({"key": key, "capacity": str(free)}, f)
        os.replace(path + ".tmp", path)
        return free

    # -- admission -------------------------------------------------------
    def reconcile(self, state: LedgerState, now: Optional[float] = None) -> List[str]:
        """Drop entries whose domain is gone; returns the dropped names."""
        now = time.time() if now is None else now
        dropped = []
        for name, e in list(state.domains.items()):
            if e.state == "running":
                pid = e.qemu_pid
                alive = bool(pid) and proc.pid_alive(pid) and proc.qemu_pid(name) == pid
                if not alive:
                    dropped.append(name)
            elif now - e.since > PREPARED_TTL_S and proc.qemu_pid(name) is None:
                dropped.append(name)
        for name in dropped:
            del state.domains[name]
        return dropped

    def check(self, state: LedgerState, name: str,
              grants: Dict[int, VcpuSched]) -> analysis.AdmissionReport:
        """Would the host supply every server if ``name`` held ``grants`` (others as they are)?

        One test for ``virsh start`` and for every regrant: the analysis'
        :func:`~.analysis.admission.check_admission` over every deadline server
        on the host, sized as the kernel enforces them, plus the RT-group
        budgets by bandwidth (they share the capacity but run below DL).
        """
        cap = self.capacity(state)
        servers: List[analysis.Reservation] = []
        budgets: List[analysis.Reservation] = []
        holders = dict(state.domains)
        holders[name] = Entry(uuid="", declared=grants, granted=grants)
        for n, e in sorted(holders.items()):
            for vid, s in sorted(e.granted.items()):
                r = analysis.Reservation(f"{n} vCPU {vid}", s.runtime_ns, s.period_ns,
                                         s.effective_deadline_ns)
                (servers if s.policy == "deadline" else budgets).append(r)
        return analysis.check_admission(
            servers, cpus=sorted(cap.cpus), limit=cap.per_cpu, capacity=cap.total,
            bandwidth_only=budgets, enforcement=self.enforcement(), fair_server=cap.fair_server)

    def admit(self, state: LedgerState, name: str, uuid: str,
              vcpus: Dict[int, VcpuSched]) -> Entry:
        """Reserve ``vcpus`` for domain ``name`` or raise AdmissionError with the numbers."""
        state.domains.pop(name, None)  # a domain cannot start twice: stale
        self.reconcile(state)
        report = self.check(state, name, vcpus)
        if not report.admitted:
            cap = self.capacity(state)
            want = sum((s.bandwidth for s in vcpus.values()), Fraction(0))
            used = sum((e.bandwidth for e in state.domains.values()), Fraction(0))
            holders = ", ".join(f"{n} {format_fraction(e.bandwidth)}"
                                for n, e in sorted(state.domains.items())) or "none"
            why = report.message.removeprefix("refused: ")
            enf = self.enforcement()
            raise AdmissionError(
                f"refused by admission: {why} (domain {name} needs {format_fraction(want)} CPU, "
                f"{format_fraction(max(Fraction(0), cap.total - used))} of "
                f"{format_fraction(cap.total)} is free; held by: {holders}; capacity from "
                f"{cap.source}; enforcement granularity {format_ns(enf.granularity_ns)}: "
                f"{enf.source}). Stop another RT domain, change the reservation, or raise "
                "capacity_share in /etc/kairos/kairos.yaml")
        return self.record(state, name, uuid, vcpus)

    def record(self, state: LedgerState, name: str, uuid: str,
               vcpus: Dict[int, VcpuSched]) -> Entry:
        """Write ``name``'s entry without a capacity check (``admit`` checks first)."""
        entry = Entry(uuid=uuid, declared=dict(vcpus), granted=dict(vcpus), since=time.time())
        state.domains[name] = entry
        return entry

    def mark_running(self, state: LedgerState, name: str,
                     qemu_pid: Optional[int]) -> Optional[Entry]:
        e = state.domains.get(name)
        if e is not None:
            e.state = "running"
            e.qemu_pid = qemu_pid
        return e

    def release(self, state: LedgerState, name: str) -> Optional[Entry]:
        return state.domains.pop(name, None)

    def regrant(self, state: LedgerState, name: str, vid: int, sched: VcpuSched) -> Entry:
        """Resize one vCPU's grant (introspection) or raise AdmissionError; returns the entry.

        The same test as at ``virsh start``: the host must supply every
        server, this one's new size included.
        """
        e = state.domains[name]
        trial = dict(e.granted)
        trial[vid] = sched
        report = self.check(state, name, trial)
        if not report.admitted:
            raise AdmissionError(
                f"vCPU {vid} of {name}: {sched.policy} {format_ns(sched.runtime_ns)}/"
                f"{format_ns(sched.effective_deadline_ns)}/{format_ns(sched.period_ns)} "
                f"{report.message}")
        e.granted = trial
        return e


def _sysctl_share() -> Tuple[Fraction, str]:
    """The kernel's per-CPU real-time share, and how it was found (for messages)."""
    rt = int(_read("/proc/sys/kernel/sched_rt_runtime_us"))
    period = int(_read("/proc/sys/kernel/sched_rt_period_us"))
    if rt < 0:
        return Fraction(1), "sched_rt_runtime_us = -1 (no kernel limit)"
    return Fraction(rt, period), f"sched_rt_runtime_us/sched_rt_period_us = {rt}/{period}"


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()
