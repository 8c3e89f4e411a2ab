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
from dataclasses import dataclass
from fractions import Fraction
from typing import Dict, Iterator, Optional

from .config import HostConfig
from .errors import AdmissionError, KairosError
from .host import proc
from .model import VcpuSched
from .units import format_fraction, format_ns

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


def entry_bandwidth(entry: dict) -> Fraction:
    """Bandwidth an entry holds now: its granted servers (introspection may resize them)."""
    return sum((Fraction(v["runtime_ns"], v["period_ns"])
                for v in entry.get("granted", entry["vcpus"]).values()), Fraction(0))


@dataclass(frozen=True)
class Capacity:
    total: Fraction          # CPUs' worth of bandwidth the ledger may hand out
    per_cpu: Fraction        # most one vCPU may take
    cpus: frozenset
    source: str              # how ``total`` was found, for messages


def ensure_dir(path: str, mode: int = 0o755) -> None:
    os.makedirs(path, mode=mode, exist_ok=True)
    st = os.stat(path)
    if st.st_mode & 0o022:
        os.chmod(path, mode)


class Ledger:
    def __init__(self, cfg: HostConfig) -> None:
        self.cfg = cfg
        self.dir = cfg.run_dir
        self.path = os.path.join(self.dir, LEDGER)

    # -- storage ---------------------------------------------------------
    @contextlib.contextmanager
    def locked(self) -> Iterator[dict]:
        """Yield the ledger state under an exclusive lock; written back on success."""
        ensure_dir(self.dir)
        fd = os.open(os.path.join(self.dir, LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            state = self._load()
            before = json.dumps(state, sort_keys=True)
            yield state
            if json.dumps(state, sort_keys=True) != before:
                self._save(state)
        finally:
            os.close(fd)

    def read(self) -> dict:
        """A snapshot without the lock (for display)."""
        return self._load()

    def _fresh(self) -> dict:
        return {"version": 1, "boot_id": proc.boot_id(), "domains": {}, "saved": {}}

    def _load(self) -> dict:
        try:
            with open(self.path) as f:
                state = json.load(f)
        except FileNotFoundError:
            return self._fresh()
        except (OSError, ValueError):
            # A torn or foreign file: start over rather than refuse every start.
            return self._fresh()
        if not isinstance(state, dict) or state.get("boot_id") != proc.boot_id():
            return self._fresh()
        state.setdefault("domains", {})
        state.setdefault("saved", {})
        return state

    def _save(self, state: dict) -> None:
        tmp = self.path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "w") as f:
            json.dump(state, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    # -- capacity --------------------------------------------------------
    def capacity(self, state: dict) -> Capacity:
        cpus = self.cfg.cpus or proc.online_cpus()
        if self.cfg.capacity_share is not None:
            share, source = self.cfg.capacity_share, "capacity_share in kairos.yaml"
        else:
            rt = int(_read("/proc/sys/kernel/sched_rt_runtime_us"))
            period = int(_read("/proc/sys/kernel/sched_rt_period_us"))
            if rt < 0:
                share = Fraction(1)
                source = "sched_rt_runtime_us = -1 (no kernel limit)"
            else:
                share = Fraction(rt, period)
                source = f"sched_rt_runtime_us/sched_rt_period_us = {rt}/{period}"
        total = share * len(cpus)
        probed = self._kernel_capacity(state)
        if probed is not None and probed < total:
            total = probed
            source += f", capped at {format_fraction(probed)} CPUs the kernel admits (probed)"
        return Capacity(total=total, per_cpu=share, cpus=frozenset(cpus), source=source)

    def _kernel_capacity(self, state: dict) -> Optional[Fraction]:
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
        if state["domains"]:
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
    def reconcile(self, state: dict, now: Optional[float] = None) -> list:
        """Drop entries whose domain is gone; returns the dropped names."""
        now = time.time() if now is None else now
        dropped = []
        for name, e in list(state["domains"].items()):
            pid = e.get("qemu_pid")
            if e.get("state") == "running":
                alive = bool(pid) and proc.pid_alive(pid) and proc.qemu_pid(name) == pid
                if not alive:
                    dropped.append(name)
            elif now - e.get("since", 0) > PREPARED_TTL_S and proc.qemu_pid(name) is None:
                dropped.append(name)
        for name in dropped:
            del state["domains"][name]
        return dropped

    def admit(self, state: dict, name: str, uuid: str,
              vcpus: Dict[int, VcpuSched]) -> dict:
        """Reserve ``vcpus`` for domain ``name`` or raise AdmissionError with the numbers."""
        state["domains"].pop(name, None)  # a domain cannot start twice: stale
        self.reconcile(state)
        cap = self.capacity(state)
        for vid, s in vcpus.items():
            if s.bandwidth > cap.per_cpu:
                raise AdmissionError(
                    f"vCPU {vid} asks for {format_fraction(s.bandwidth)} of a CPU "
                    f"(runtime {format_ns(s.runtime_ns)} / period {format_ns(s.period_ns)}) but "
                    f"one CPU offers at most {format_fraction(cap.per_cpu)} ({cap.source})")
        want = sum((s.bandwidth for s in vcpus.values()), Fraction(0))
        used = sum((entry_bandwidth(e) for e in state["domains"].values()), Fraction(0))
        if used + want > cap.total:
            holders = ", ".join(f"{n} {format_fraction(entry_bandwidth(e))}"
                                for n, e in sorted(state["domains"].items())) or "none"
            raise AdmissionError(
                f"not enough real-time capacity: domain {name} needs "
                f"{format_fraction(want)} CPU, {format_fraction(cap.total - used)} of "
                f"{format_fraction(cap.total)} is free (held by: {holders}; capacity from "
                f"{cap.source}). Stop another RT domain, shrink the reservation, or raise "
                "capacity_share in /etc/kairos/kairos.yaml")
        return self.record(state, name, uuid, vcpus)

    def record(self, state: dict, name: str, uuid: str, vcpus: Dict[int, VcpuSched]) -> dict:
        """Write ``name``'s entry without a capacity check (``admit`` checks first)."""
        entry = {"uuid": uuid, "state": "prepared", "since": time.time(), "qemu_pid": None,
                 "vcpus": {str(k): sched_to_json(v) for k, v in vcpus.items()}}
        entry["granted"] = dict(entry["vcpus"])
        state["domains"][name] = entry
        return entry

    def mark_running(self, state: dict, name: str, qemu_pid: Optional[int]) -> Optional[dict]:
        e = state["domains"].get(name)
        if e is not None:
            e["state"] = "running"
            e["qemu_pid"] = qemu_pid
        return e

    def release(self, state: dict, name: str) -> Optional[dict]:
        return state["domains"].pop(name, None)

    def regrant(self, state: dict, name: str, vid: int, sched: VcpuSched) -> None:
        """Resize one vCPU's grant (introspection) or raise AdmissionError; never over capacity."""
        e = state["domains"][name]
        old = e["granted"].get(str(vid))
        trial = dict(e["granted"])
        trial[str(vid)] = sched_to_json(sched)
        cap = self.capacity(state)
        used = sum((entry_bandwidth(x) for n, x in state["domains"].items() if n != name),
                   Fraction(0))
        mine = sum((Fraction(v["runtime_ns"], v["period_ns"]) for v in trial.values()),
                   Fraction(0))
        if used + mine > cap.total:
            raise AdmissionError(
                f"vCPU {vid} of {name}: growing to {format_fraction(sched.bandwidth)} would exceed "
                f"the host's real-time capacity {format_fraction(cap.total)}")
        e["granted"] = trial
        assert old is None or isinstance(old, dict)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()
