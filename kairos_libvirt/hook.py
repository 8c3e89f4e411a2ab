"""The libvirt QEMU hook: validate, admit, start/stop the agent, release.

libvirt runs ``/etc/libvirt/hooks/qemu.d/kairosvm NAME OP SUBOP -`` with the
domain XML on stdin, synchronously.  So this code must be quick, must never
call the libvirt API (that deadlocks libvirtd), and must leave nothing behind
when it refuses: a non-zero exit at ``prepare begin`` aborts ``virsh start``
and libvirt prints our stderr.  libvirt then sends ``stopped end`` and
``release end`` anyway, so release is idempotent and touches only what this
start reserved.
"""
from __future__ import annotations

import errno as _errno
import fcntl
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Dict, Optional

from . import config as _config
from . import paths
from .errors import AdmissionError, DeclarationError, HostError, KairosError
from .host import cgroup, proc
from .host.cpus import format_cpulist, parse_cpulist
from .ledger import IntrospectionSettings, Ledger, ensure_dir
from .model import DomainInfo, VcpuSched
from .units import format_ns

log = logging.getLogger("kairosvm-hook")
AGENT_STOP_S = 3.0


# --------------------------------------------------------------------------
# host checks done at prepare, before anything is reserved

def host_checks(info: DomainInfo, scheds: Dict[int, VcpuSched]) -> None:
    if any(s.policy in ("fifo", "rr") for s in scheds.values()) \
            and not cgroup.rt_group_sched_available():
        raise HostError("cpu.rt_runtime_us", "policy fifo/rr needs RT group scheduling but "
                        + cgroup.why_no_rt_group_sched())
    dl = {v: s for v, s in scheds.items() if s.policy == "deadline"}
    if not dl:
        return
    lo, hi = _read_sysctl("sched_deadline_period_min_us"), _read_sysctl(
        "sched_deadline_period_max_us")
    for vid, s in dl.items():
        if lo is not None and s.period_ns < lo * 1000:
            raise DeclarationError(f"<vcpu id='{vid}'>: period {format_ns(s.period_ns)} is below "
                                   f"this kernel's minimum {lo}us "
                                   "(/proc/sys/kernel/sched_deadline_period_min_us)")
        if hi is not None and s.period_ns > hi * 1000:
            raise DeclarationError(f"<vcpu id='{vid}'>: period {format_ns(s.period_ns)} is above "
                                   f"this kernel's maximum {hi}us "
                                   "(/proc/sys/kernel/sched_deadline_period_max_us)")
    online = proc.online_cpus()
    for vid in dl:
        pin = info.pinned.get(vid)
        if pin is None:
            continue
        try:
            cpus = parse_cpulist(pin)
        except KairosError:
            cpus = frozenset()
        if not online <= cpus:
            raise HostError(
                f"vCPU {vid} pinning", f"the vCPU is pinned to CPUs {pin!r}, but a "
                "SCHED_DEADLINE thread's affinity must span its whole root domain (CPUs "
                f"{format_cpulist(online)}); the kernel would refuse with EPERM",
                fix="remove <vcpupin>/<vcpu cpuset> for this vCPU, or isolate the RT CPUs in an "
                    "exclusive cpuset partition")


def _read_sysctl(name: str) -> Optional[int]:
    try:
        with open(f"/proc/sys/kernel/{name}") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------
# operations

def prepare(cfg: _config.HostConfig, name: str, xml: bytes) -> None:
    from . import rtgroups
    from .spec import parse_domain  # lxml: only on the paths that parse XML
    info = parse_domain(xml)
    ledger = Ledger(cfg)
    if info.declaration is None:
        return
    scheds = info.declaration.resolve(info.vcpus_max)
    host_checks(info, scheds)
    with ledger.locked() as state:
        stale = ledger.release(state, name)
        if stale:
            log.warning("%s: dropping a stale ledger entry", name)
            rtgroups.release_domain(state, name, stale)
        rt = {v: (s.runtime_ns // 1000, s.period_ns // 1000) for v, s in scheds.items()
              if s.policy in ("fifo", "rr")}
        if rt:
            mount = cgroup.cpu_v1_mount()
            assert mount is not None  # host_checks refused otherwise
            rtgroups.check_headroom(state, os.path.join(mount, "machine"), rt)
        entry = ledger.admit(state, name, info.uuid, scheds)
        entry.introspection = _introspection_entry(info, scheds)
        ensure_dir(paths.domain_dir(cfg, name))
    log.info("%s: admitted %s", name, ", ".join(
        f"vCPU {v} {s.policy} {format_ns(s.runtime_ns)}/{format_ns(s.period_ns)}"
        for v, s in scheds.items()))


def _introspection_entry(info: DomainInfo, scheds: Dict[int, VcpuSched]) -> IntrospectionSettings:
    """What the agent needs of ``<introspection>``, kept in the ledger entry."""
    decl = info.declaration
    assert decl is not None
    return IntrospectionSettings(backend=decl.introspection.backend,
                                 ceilings={v: decl.ceiling_for(s) for v, s in scheds.items()},
                                 kernel=info.kernel,
                                 budget=decl.introspection.budget_json() or None)


def reconnect(cfg: _config.HostConfig, name: str, xml: bytes) -> None:
    """libvirtd restarted while the domain runs: the agent must run."""
    from .spec import parse_domain
    ledger = Ledger(cfg)
    with ledger.locked() as state:
        if name not in state.domains:
            info = parse_domain(xml)
            if info.declaration is None:
                return
            # /run/kairos was lost while the domain kept running: record it again.
            scheds = info.declaration.resolve(info.vcpus_max)
            try:
                entry = ledger.admit(state, name, info.uuid, scheds)
            except AdmissionError as exc:
                # It runs already: record it anyway, and say so.
                log.error("%s: running domain re-recorded over capacity: %s", name, exc)
                entry = ledger.record(state, name, info.uuid, scheds)
            entry.introspection = _introspection_entry(info, scheds)
            ensure_dir(paths.domain_dir(cfg, name))
        ledger.mark_running(state, name, proc.qemu_pid(name))
    spawn_agent(cfg, name)


def release(cfg: _config.HostConfig, name: str) -> None:
    from . import rtgroups
    stop_agent(cfg, name)
    ledger = Ledger(cfg)
    with ledger.locked() as state:
        entry = state.domains.get(name)
        if entry is not None:
            try:
                rtgroups.release_domain(state, name, entry)
            finally:
                ledger.release(state, name)
            log.info("%s: released", name)
    shutil.rmtree(paths.domain_dir(cfg, name), ignore_errors=True)


def reconcile_host(cfg: _config.HostConfig) -> Dict[str, list]:
    """Bring the host back to the ledger's truth (after crashes, kill -9, lost hooks):
    drop entries whose QEMU is gone and undo their RT groups; start missing agents."""
    from . import rtgroups
    ledger = Ledger(cfg)
    dropped, started_agents = [], []
    with ledger.locked() as state:
        before = dict(state.domains)
        dropped = ledger.reconcile(state)
        for name in dropped:
            rtgroups.release_domain(state, name, before[name])
        running = [n for n, e in state.domains.items() if e.state == "running"]
    for name in dropped:
        stop_agent(cfg, name)
        shutil.rmtree(paths.domain_dir(cfg, name), ignore_errors=True)
    for name in running:
        if agent_pid(cfg, name) is None and proc.qemu_pid(name) is not None:
            spawn_agent(cfg, name)
            started_agents.append(name)
    return {"dropped": dropped, "agents_started": started_agents}


# --------------------------------------------------------------------------
# the agent process

def agent_pid(cfg: _config.HostConfig, name: str) -> Optional[int]:
    """Pid of the running agent, or None.  Running = holds its flock."""
    lock = paths.agent_lock_file(cfg, name)
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (_errno.EWOULDBLOCK, _errno.EAGAIN):
                raise
        else:
            return None  # nobody holds it
    finally:
        os.close(fd)
    try:
        with open(paths.agent_pid_file(cfg, name)) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return -1  # starting up: holds the lock, pid file not yet written
    return pid if proc.pid_alive(pid) else None


def spawn_agent(cfg: _config.HostConfig, name: str) -> None:
    if agent_pid(cfg, name) is not None:
        return
    ensure_dir(cfg.log_dir)
    ensure_dir(paths.domain_dir(cfg, name))
    if os.path.isdir("/run/systemd/system") and shutil.which("systemctl") and \
            os.path.exists("/etc/systemd/system/kairosvm-agent@.service"):
        unit = subprocess.run(["systemd-escape", "--template=kairosvm-agent@.service", name],
                              capture_output=True, text=True, check=False).stdout.strip()
        subprocess.run(["systemctl", "start", "--no-block", unit or f"kairosvm-agent@{name}.service"],
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=False)
        return
    logfd = os.open(paths.agent_log(cfg, name),
                    os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        # Fully detached: own session, no inherited fd (libvirt waits for the
        # hook's pipes to close), stdio to the agent's log.
        subprocess.Popen([sys.executable, "-m", "kairos_libvirt.agent", name],
                         stdin=subprocess.DEVNULL, stdout=logfd, stderr=logfd, close_fds=True,
                         start_new_session=True, cwd="/")
    finally:
        os.close(logfd)
    log.info("%s: agent started", name)


def _is_agent(pid: int, name: str) -> bool:
    """Never signal a stranger: a pid file may outlive its process and the pid be reused."""
    argv = proc.cmdline(pid)
    text = " ".join(argv)
    return ("kairos_libvirt.agent" in text or "kairosvm-agent" in text) and name in argv


def _read_pid(path: str) -> Optional[int]:
    try:
        with open(path) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return None
    return pid if pid > 0 and proc.pid_alive(pid) else None


def stop_agent(cfg: _config.HostConfig, name: str, timeout_s: float = AGENT_STOP_S) -> None:
    """Stop the supervisor first (so it restarts nothing), then the agent."""
    pids = [p for p in (_read_pid(paths.supervisor_pid_file(cfg, name)), agent_pid(cfg, name))
            if p is not None and p > 0 and _is_agent(p, name)]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(proc.pid_alive(p) for p in pids):
        time.sleep(0.05)
    for pid in pids:
        if proc.pid_alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# --------------------------------------------------------------------------

def _setup_logging(cfg: _config.HostConfig) -> None:
    try:
        ensure_dir(cfg.log_dir)
        handler: logging.Handler = logging.FileHandler(os.path.join(cfg.log_dir, "hook.log"))
    except OSError:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s hook[%(process)d] %(levelname)s "
                                           "%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)


def main(argv: Optional[list] = None, stdin: Optional[bytes] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 3:
        print("usage: qemu-hook NAME OP SUBOP [EXTRA]", file=sys.stderr)
        return 2
    name, op, subop = argv[:3]
    try:
        cfg = _config.load()
    except KairosError as exc:
        print(f"kairos: {exc}", file=sys.stderr)
        return 1
    _setup_logging(cfg)
    if not paths.valid_name(name):
        print(f"kairos: refusing domain name {name!r}", file=sys.stderr)
        return 1
    try:
        if (op, subop) == ("prepare", "begin"):
            xml = sys.stdin.buffer.read() if stdin is None else stdin
            prepare(cfg, name, xml)
        # "started begin" never reaches Python: hooks/qemu spawns the agent itself
        # (one interpreter less in virsh start), and the agent marks the entry running.
        elif op in ("stopped", "release") and subop == "end":
            release(cfg, name)
        elif (op, subop) == ("reconnect", "begin"):
            xml = sys.stdin.buffer.read() if stdin is None else stdin
            reconnect(cfg, name, xml)
    except KairosError as exc:
        log.error("%s %s %s: %s", name, op, subop, exc)
        print(f"kairos: domain {name}: {exc}", file=sys.stderr)
        if (op, subop) == ("prepare", "begin"):
            from .metrics import count_admission_refusal
            try:
                count_admission_refusal(cfg.run_dir)
            except OSError as err:
                log.warning("cannot count the refusal: %s", err)
        if op in ("stopped", "release"):
            return 0  # nothing to abort any more; logged
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
