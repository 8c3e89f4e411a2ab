"""The per-domain agent: enforce the admitted reservation on the vCPU threads,
read it back from the kernel, and publish it as live metadata.

Started detached by the hook at ``started``/``reconnect``; one per domain
(an exclusive flock on ``/run/kairos/domains/NAME/agent.lock``).  It never
reverts the kernel state when it exits: the reservation belongs to the running
domain, and the kernel keeps it even if the agent is killed.

It sleeps on its event sources (host/wake.py): QEMU's exit, a change in the
guest's task model (introspection wakes it; the first change acts at once,
later ones are coalesced), ``kairosvm hold``; and every RECHECK_S it reads the
kernel back and re-reads the ledger.  The host-wide ledger lock is taken only
for a real regrant.
"""
from __future__ import annotations

import argparse
import collections
import errno as _errno
import fcntl
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Dict, Optional

from . import config as _config
from . import enforce, paths, rtgroups
from .errors import HostError, KairosError
from .host import cgroup, cpuset, proc, sched, wake
from .ledger import Entry, Ledger, ensure_dir
from .model import VcpuSched
from .state import DomainState, VcpuState, to_xml, utcnow

log = logging.getLogger("kairosvm-agent")

#: The periodic re-check (kernel state read back, ledger re-read, counters published):
#: everything else wakes the agent when it happens (host/wake.py).
RECHECK_S = 2.0
TASKS_PUBLISH_S = 0.2
QEMU_WAIT_S = 30.0
RETRY_S = 10
REACTIONS_KEPT = 1024
#: A reaction slower than this is logged with its stages (the gdbstub target of
#: issue 13 is a p99 of 20 ms): where an outlier spent its time, per case.
SLOW_REACTION_NS = 20_000_000


class Agent:
    def __init__(self, name: str, cfg: _config.HostConfig) -> None:
        self.name = name
        self.cfg = cfg
        self.ledger = Ledger(cfg)
        self.stop = threading.Event()
        self.enforced_at: Dict[int, str] = {}
        self.errors: Dict[int, str] = {}
        self.retry_at: Dict[int, float] = {}
        self.published: Optional[str] = None
        self.dom = None
        self.reconnect_at = 0.0
        self.intro = None            # introspect.runtime.Introspector, when declared
        self.intro_status: Optional[dict] = None
        self.adapted: Dict[int, object] = {}
        self.last_publish = 0.0
        self._published_shape: Optional[str] = None
        #: vCPU -> trap time of the guest call that led to its pending change.
        #: vCPU -> (trap, event, analysed, granted) monotonic ns of its pending change.
        self.pending_trigger: Dict[int, tuple] = {}
        #: (total, event, analysed, granted) ns from the trap, per reaction.
        self.reactions: "collections.deque[tuple]" = collections.deque(maxlen=REACTIONS_KEPT)
        #: The grants as last read from (or written to) the ledger, and the servers admission
        #: refused since: the host-wide ledger lock is taken only for a real regrant (issue 13).
        self.grants: Dict[int, VcpuSched] = {}
        self.refused: Dict[int, object] = {}
        #: What the loop sleeps on: QEMU's exit, the introspection threads, kairosvm hold.
        self.wake: Optional[wake.Wakeup] = None

    def request_stop(self) -> None:
        """Stop the loop (signal handlers, tests)."""
        self.stop.set()
        if self.wake is not None:
            self.wake.set()

    # -- lifecycle -------------------------------------------------------
    def run(self) -> int:
        entry = self.ledger.read().domains.get(self.name)
        if entry is None:
            log.info("domain %s holds no reservation in the ledger; nothing to do", self.name)
            return 0
        wanted = dict(entry.granted)
        self.grants = dict(wanted)
        log.info("agent for %s: %s", self.name,
                 ", ".join(f"vCPU {k} {_describe(v)}" for k, v in wanted.items()))
        pid = self._wait_qemu()
        if pid is None:
            log.info("QEMU of %s is not running; exiting", self.name)
            return 0
        with self.ledger.locked() as state:
            if self.ledger.mark_running(state, self.name, pid) is None:
                log.info("ledger entry of %s released meanwhile; exiting", self.name)
                return 0
        self._connect()
        self.wake = wake.Wakeup(paths.control_socket(self.cfg, self.name))
        try:
            if not self.wake.watch_process(pid):
                log.info("QEMU %s of %s is gone; exiting", pid, self.name)
                return 0
            if entry.introspection is not None and entry.introspection.backend != "off":
                self._start_introspection(entry, pid)
            self._loop(pid)
        finally:
            if self.intro is not None:
                self.intro.stop()
            self.wake.close()
        return 0

    def _loop(self, pid: int) -> None:
        """Sleep until an event (host/wake.py) or the next re-check; act on what changed.

        Idle, the agent wakes every RECHECK_S only.  A guest call that changes
        the task model wakes it at once; the introspector coalesces what
        follows (runtime.COALESCE_S), and the ledger lock is taken only for a
        real regrant.
        """
        assert self.wake is not None
        last_check = last_step = float("-inf")
        published = None
        while not self.stop.is_set():
            now = time.monotonic()
            recheck = now - last_check >= RECHECK_S
            if self.intro is not None and recheck:
                self._look_at_hold()
            regranted = self._adapt() if self.intro is not None else None
            # What the live state shows beyond the servers: introspection's state and the
            # guest's task set (a task found or gone is published at once, at most every
            # TASKS_PUBLISH_S while the guest churns).
            shown = (self.intro.status.state, self.intro.model.structure) \
                if self.intro is not None else None
            news = shown != published and (published is None or shown[0] != published[0]
                                           or now - last_step >= TASKS_PUBLISH_S)
            if regranted is not None or recheck or news:
                if regranted is None and recheck:
                    entry = self.ledger.read().domains.get(self.name)
                    if entry is None:
                        log.info("ledger entry of %s released; exiting", self.name)
                        return
                    self.grants = dict(entry.granted)
                    self.refused.clear()   # capacity may have freed: try refused servers again
                if recheck:
                    last_check = now
                # self.grants: what the ledger holds (re-read above, or written by _adapt)
                self.step(pid, dict(self.grants))
                published, last_step = shown, now
            timeout = RECHECK_S - (time.monotonic() - last_check)
            due = self.intro.next_due() if self.intro is not None else None
            if due is not None:
                timeout = min(timeout, due)
            if shown != published:
                timeout = min(timeout, max(0.0, last_step + TASKS_PUBLISH_S - time.monotonic()))
            if not self.wake.watches_exit:
                timeout = min(timeout, 0.5)    # no pidfd: QEMU's exit is probed
            events = self.wake.wait(timeout)
            if "exit" in events:
                log.info("QEMU %s of %s is gone; exiting", pid, self.name)
                return
            if "control" in events and self.intro is not None:
                self._look_at_hold()

    def _look_at_hold(self) -> None:
        """The hold file says what the admin wants; hold() is idempotent and retries a failure."""
        self.intro.hold(os.path.exists(paths.hold_file(self.cfg, self.name)))

    # -- introspection ---------------------------------------------------
    def _start_introspection(self, entry: Entry, pid: int) -> None:
        from .introspect import backends
        from .introspect.runtime import Introspector
        intro_cfg = entry.introspection
        assert intro_cfg is not None
        try:
            backend, note = backends.make(intro_cfg.backend, self.name, self.dom, pid,
                                          paths.domain_dir(self.cfg, self.name),
                                          budget=intro_cfg.budget)
        except KairosError as exc:
            log.error("introspection unavailable: %s; the declared reservation stays", exc)
            self.intro_status = {"backend": intro_cfg.backend, "state": "failed",
                                 "error": str(exc), "notes": []}
            return
        self.intro = Introspector(backend, backends.symbol_loader(intro_cfg.kernel),
                                  dict(entry.declared), dict(intro_cfg.ceilings),
                                  enforcement_ns=self.ledger.enforcement().granularity_ns)
        if note:
            self.intro.status.notes.append(note)
            log.warning("%s", note)
        if self.wake is not None:
            self.intro.notify = self.wake.set
        self.intro.start()

    def _adapt(self) -> Optional[Entry]:
        """Resize grants to what the analysis wants; the updated entry when the ledger changed."""
        from .errors import AdmissionError
        self.intro.tick()
        adapted = self.intro.adapted()
        # Nothing new for the ledger: no lock (the capped annotations of refused servers stay).
        if all(self.grants.get(v) == a.sched or getattr(self.refused.get(v), "sched", None) == a.sched
               for v, a in adapted.items()):
            self.adapted = {v: self.refused.get(v, a) if self.grants.get(v) != a.sched else a
                            for v, a in adapted.items()}
            return None
        self.adapted = adapted
        changed: Optional[Entry] = None
        regranted: list = []
        with self.ledger.locked() as state:
            e = state.domains.get(self.name)
            if e is None:
                return None
            for vid, a in adapted.items():
                if e.granted.get(vid) == a.sched:
                    continue
                try:
                    changed = self.ledger.regrant(state, self.name, vid, a.sched)
                    if self.intro.trigger is not None:
                        regranted.append(vid)
                    log.info("vCPU %d: %s reservation %s%s", vid, a.source, _describe(a.sched),
                             f" ({a.note})" if a.note else "")
                except AdmissionError as exc:
                    log.warning("vCPU %d: %s reservation %s refused by admission; the current "
                                "grant stays: %s", vid, a.source, _describe(a.sched), exc)
                    self.errors.pop(vid, None)
                    self.adapted[vid] = type(a)(a.vcpu, a.sched, a.source, a.budget_ns,
                                                a.period_ns, a.deadline_ns, True,
                                                f"capped by host capacity: {exc}", a.tasks)
                    self.refused[vid] = self.adapted[vid]
            e = state.domains.get(self.name)
            if e is not None:
                self.grants = dict(e.granted)
        granted_ns = time.monotonic_ns()       # the ledger written, the lock released
        for vid in regranted:
            self.pending_trigger[vid] = (*self.intro.trigger, granted_ns)
        return changed

    def _wait_qemu(self) -> Optional[int]:
        deadline = time.monotonic() + QEMU_WAIT_S
        while not self.stop.is_set() and time.monotonic() < deadline:
            pid = proc.qemu_pid(self.name)
            if pid is not None and proc.vcpu_threads(pid):
                return pid
            self.stop.wait(0.1)
        return None

    def _connect(self, timeout_s: float = 30) -> None:
        try:
            from . import virt
            conn = virt.connect(timeout_s=timeout_s)
            self.dom = virt.lookup(conn, self.name)
            log.info("connected to libvirt (%s)", virt.uri())
        except KairosError as exc:
            log.error("cannot publish live state: %s", exc)
            self.dom = None
            self.reconnect_at = time.monotonic() + 2.0

    # -- one pass --------------------------------------------------------
    def step(self, pid: int, wanted: Dict[int, VcpuSched]) -> DomainState:
        """Enforce what is missing, read everything back, publish if it changed."""
        tids = proc.vcpu_threads(pid)
        rt_vcpus = {v: s for v, s in wanted.items() if s.policy in ("fifo", "rr")}
        if rt_vcpus:
            self._ensure_rt_groups(pid, tids, rt_vcpus)
        st = DomainState(agent_pid=os.getpid(), qemu_pid=pid)
        for vid, want in sorted(wanted.items()):
            vs = VcpuState(vcpu=vid)
            tid = tids.get(vid)
            if tid is None:
                vs.error = f"vCPU {vid} has no thread (offline vCPU?)"
                st.vcpus.append(vs)
                continue
            vs.tid = tid
            k = sched.try_get(tid)
            due = vid not in self.errors or time.monotonic() >= self.retry_at.get(vid, 0.0)
            if not enforce.matches(k, want) and due:
                try:
                    self._apply(vid, tid, want)
                    self.enforced_at[vid] = utcnow()
                    trigger = self.pending_trigger.pop(vid, None)
                    if trigger is not None:
                        # From the guest's call (the trap) to the kernel holding the change,
                        # and the stages on the way: event in the model, analysed, granted.
                        trap = trigger[0]
                        r = (time.monotonic_ns() - trap, *(t - trap for t in trigger[1:]))
                        self.reactions.append(r)
                        if r[0] > SLOW_REACTION_NS:
                            log.info("vCPU %d: slow reaction %.1f ms from the guest's call: "
                                     "event in the model at %.1f, analysed at %.1f, granted at "
                                     "%.1f ms", vid, *(x / 1e6 for x in r))
                    log.info("vCPU %d (tid %d): enforced %s", vid, tid, _describe(want))
                    self.errors.pop(vid, None)
                except KairosError as exc:
                    self.errors[vid] = str(exc)
                    self.retry_at[vid] = time.monotonic() + RETRY_S
                    log.error("vCPU %d (tid %d): %s (retry in %ds)", vid, tid, exc, RETRY_S)
                k = sched.try_get(tid)
            elif enforce.matches(k, want) and vid not in self.enforced_at:
                self.enforced_at[vid] = utcnow()  # already in force (agent restarted)
            if k is not None:
                vs.policy, vs.priority = k.policy, k.priority
                if k.policy == "deadline":
                    vs.runtime_ns, vs.deadline_ns, vs.period_ns = \
                        k.runtime_ns, k.deadline_ns, k.period_ns
            if enforce.matches(k, want):
                vs.enforced = self.enforced_at.get(vid)
            if want.policy in ("fifo", "rr") and vs.error is None:
                self._read_rt_group(pid, tid, vs)
            vs.error = vs.error or self.errors.get(vid)
            a = self.adapted.get(vid)
            if a is not None:
                vs.source = a.source
                vs.note = a.note or None
                if a.budget_ns:
                    vs.interface = (a.budget_ns, a.period_ns, a.deadline_ns)
            if vs.error is None and not enforce.matches(k, want):
                vs.error = "kernel state differs from the reservation (changed by someone else?)"
                log.warning("vCPU %d (tid %d): kernel has %s; will re-enforce", vid, tid, k)
            st.vcpus.append(vs)
        if self.intro is not None:
            i, c = self.intro.status, self.intro.backend.counters
            st.introspection = {"backend": i.backend, "state": i.state, "error": i.error,
                                "notes": list(i.notes), "slide": i.slide, "hits": c.hits,
                                "decoded": c.decoded, "rejected": c.rejected,
                                "suppressed": c.suppressed, "handler_ns": c.handler_ns,
                                "evicted": self.intro.model.evicted,
                                **self.intro.adaptation_counters(),
                                **self.intro.stop_counters(),
                                **_percentiles(self.reactions)}
            st.tasks = self.intro.tasks_snapshot()
        elif self.intro_status is not None:
            st.introspection = dict(self.intro_status)
        self._publish(st)
        return st

    def _apply(self, vid: int, tid: int, want: VcpuSched) -> None:
        """Apply; on EBUSY for bandwidth the ledger did admit, repair the kernel's
        deadline accounting once (root-domain rebuild, host/cpuset.py) and retry."""
        try:
            enforce.apply_thread(tid, want)
        except HostError as exc:
            if exc.errno != _errno.EBUSY or want.policy != "deadline":
                raise
            log.warning("vCPU %d: kernel refused admitted bandwidth (EBUSY); its deadline "
                        "accounting looks stale: rebuilding root domains and retrying", vid)
            if not cpuset.rebuild_root_domains():
                raise
            enforce.apply_thread(tid, want)

    def _ensure_rt_groups(self, pid: int, tids: Dict[int, int],
                          rt_vcpus: Dict[int, VcpuSched]) -> None:
        groups = {}
        for vid, s in rt_vcpus.items():
            tid = tids.get(vid)
            d = cgroup.thread_cpu_cgroup(pid, tid) if tid else None
            if d is None:
                continue
            want = (s.runtime_ns // 1000, s.period_ns // 1000)
            try:
                if cgroup.read_rt(d) == want:
                    continue
            except KairosError:
                pass
            groups[vid] = (d, *want)
        if not groups:
            return
        domain_dirs = {os.path.dirname(d) for d, _r, _p in groups.values()}
        if len(domain_dirs) != 1:
            for vid in groups:
                self.errors[vid] = f"vCPU threads of {self.name} are not in one domain cgroup"
            return
        try:
            with self.ledger.locked() as state:
                entry = state.domains.get(self.name)
                if entry is None:
                    return
                merged = {}
                if entry.rt is not None:
                    merged = {v: (entry.rt.vcpu_dirs.get(v), r, p)
                              for v, (r, p) in entry.rt.vcpus.items()}
                merged = {v: x for v, x in merged.items() if x[0]}
                merged.update(groups)
                rtgroups.apply_domain(state, self.name, domain_dirs.pop(), merged)
            for vid, (d, r, p) in groups.items():
                log.info("vCPU %d: RT group %s = %dus / %dus", vid, d, r, p)
        except KairosError as exc:
            for vid in groups:
                self.errors[vid] = str(exc)
            log.error("RT group bandwidth for %s: %s", self.name, exc)

    def _read_rt_group(self, pid: int, tid: int, vs: VcpuState) -> None:
        d = cgroup.thread_cpu_cgroup(pid, tid)
        if d is None:
            return
        try:
            r, p = cgroup.read_rt(d)
        except KairosError as exc:
            vs.error = str(exc)
            return
        vs.runtime_ns, vs.period_ns = r * 1000, p * 1000

    def _publish(self, st: DomainState) -> None:
        body = to_xml(st)
        if body == self.published:
            return
        # Counters alone change at every trap: publish those at most every 2 s.
        shape = to_xml(_without_counters(st))
        if self.published is not None and shape == self._published_shape and \
                time.monotonic() - self.last_publish < RECHECK_S:
            return
        st.updated = utcnow()
        if self.dom is None and time.monotonic() >= self.reconnect_at:
            self._connect(timeout_s=0)
        if self.dom is None:
            return
        from . import virt
        try:
            virt.set_state(self.dom, to_xml(st))
            self.published = body
            self._published_shape = shape
            self.last_publish = time.monotonic()
        except KairosError as exc:
            # libvirtd restarted (or is restarting): reconnect and republish.
            log.warning("%s; will reconnect to libvirt", exc)
            self.dom = None
            self.reconnect_at = time.monotonic() + 1.0


def _percentiles(xs) -> Dict[str, int]:
    """Reaction latency figures for the live state (microseconds): trap -> the kernel holds
    the new server (p50, p99), and the median of each stage on the way (issue 13)."""
    if not xs:
        return {}
    n = len(xs)

    def q(i: int, frac: float) -> int:
        s = sorted(x[i] for x in xs)
        return s[min(n - 1, int(n * frac))] // 1000
    return {"reactions": n, "reaction_p50_us": q(0, 0.5), "reaction_p99_us": q(0, 0.99),
            "reaction_event_p50_us": q(1, 0.5), "reaction_analysed_p50_us": q(2, 0.5),
            "reaction_granted_p50_us": q(3, 0.5)}


def _without_counters(st: DomainState) -> DomainState:
    import dataclasses
    from .state import INTRO_COUNTERS
    intro = None
    if st.introspection is not None:
        intro = {k: v for k, v in st.introspection.items() if k not in INTRO_COUNTERS}
    tasks = [{k: v for k, v in t.items() if k not in ("samples", "jitter_ns",
                                                         "observed_period_ns")}
             for t in st.tasks]
    return dataclasses.replace(st, introspection=intro, tasks=tasks)


def _describe(s: VcpuSched) -> str:
    if s.policy == "deadline":
        return (f"SCHED_DEADLINE runtime={s.runtime_ns}ns deadline={s.effective_deadline_ns}ns "
                f"period={s.period_ns}ns")
    return (f"SCHED_{s.policy.upper()} priority {s.priority}, RT group "
            f"{s.runtime_ns // 1000}us/{s.period_ns // 1000}us")


def _lock_single(cfg: _config.HostConfig, name: str) -> Optional[int]:
    """Exclusive per-domain lock: never two agents for one domain."""
    ensure_dir(paths.domain_dir(cfg, name))
    fd = os.open(paths.agent_lock_file(cfg, name), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (_errno.EWOULDBLOCK, _errno.EAGAIN):
            return None
        raise
    return fd


def _worker(name: str, cfg: _config.HostConfig) -> int:
    fd = _lock_single(cfg, name)
    if fd is None:
        log.info("an agent for %s already runs; exiting", name)
        return 0
    pidfile = paths.agent_pid_file(cfg, name)
    _write_pid(pidfile)
    agent = Agent(name, cfg)
    signal.signal(signal.SIGTERM, lambda *_: agent.request_stop())
    signal.signal(signal.SIGINT, lambda *_: agent.request_stop())
    try:
        return agent.run()
    except KairosError as exc:
        log.error("%s", exc)
        return 1
    finally:
        _remove_pid(pidfile)
        log.info("agent for %s stopped", name)


def _write_pid(path: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(path + ".tmp", path)


def _remove_pid(path: str) -> None:
    try:
        with open(path) as f:
            if f.read().strip() == str(os.getpid()):
                os.unlink(path)
    except OSError:
        pass


RESTART_DELAY_S = 0.2
MAX_RESTARTS_PER_MIN = 20


def _supervise(name: str, cfg: _config.HostConfig) -> int:
    """Keep one worker running while the domain runs: a killed agent is back in
    well under a second, and the kernel keeps the reservation meanwhile."""
    ensure_dir(paths.domain_dir(cfg, name))
    lock = os.path.join(paths.domain_dir(cfg, name), "supervisor.lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        log.info("a supervisor for %s already runs; exiting", name)
        return 0
    pidfile = paths.supervisor_pid_file(cfg, name)
    _write_pid(pidfile)
    stop = threading.Event()
    child: Dict[str, Optional[subprocess.Popen]] = {"p": None}

    def on_term(*_: object) -> None:
        stop.set()
        p = child["p"]
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    restarts: list = []
    try:
        while not stop.is_set():
            child["p"] = subprocess.Popen([sys.executable, "-m", "kairos_libvirt.agent",
                                           "--worker", name], close_fds=True)
            rc = child["p"].wait()
            if stop.is_set() or rc == 0:
                return 0
            if proc.qemu_pid(name) is None or \
                    name not in Ledger(cfg).read().domains:
                return 0
            now = time.monotonic()
            restarts = [t for t in restarts if now - t < 60] + [now]
            if len(restarts) > MAX_RESTARTS_PER_MIN:
                log.error("agent for %s died %d times in a minute; giving up (see this log; "
                          "'kairosvm reconcile' starts it again)", name, len(restarts))
                return 1
            log.warning("agent for %s exited with %s; restarting", name, rc)
            stop.wait(RESTART_DELAY_S)
        return 0
    finally:
        _remove_pid(pidfile)


_SYSLOG_PRIO = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
                logging.CRITICAL: 2}


class _JournalPrio(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.prio = _SYSLOG_PRIO.get(record.levelno, 6)
        return True


def _setup_logging() -> None:
    """Under systemd (JOURNAL_STREAM set) journald gets real levels and adds its own
    timestamps; elsewhere, timestamped lines for /var/log/kairos/NAME.log."""
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.addFilter(_JournalPrio())
        handler.setFormatter(logging.Formatter("<%(prio)d>%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(prog="kairosvm-agent",
                                 description="Per-domain real-time agent (started by the hook).")
    ap.add_argument("domain")
    ap.add_argument("--worker", action="store_true",
                    help="run the agent itself (default: supervise one that does)")
    args = ap.parse_args(argv)
    _setup_logging()
    if not paths.valid_name(args.domain):
        log.error("invalid domain name %r", args.domain)
        return 2
    try:
        cfg = _config.load()
        if args.worker:
            return _worker(args.domain, cfg)
        return _supervise(args.domain, cfg)
    except KairosError as exc:
        log.error("%s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
