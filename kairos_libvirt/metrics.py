"""Per-domain and per-vCPU measurements, and their Prometheus exposition.

:func:`sample` reads the host once: the admission ledger, every real-time
domain's vCPU threads as the kernel sees them (``sched_getattr``, RT group
files, ``/proc/PID/task/TID/sched``) and the live state the agent publishes.
``kairosvm top`` draws it; ``kairosvm metrics`` renders it in the Prometheus
text exposition format (version 0.0.4), for node_exporter's textfile
collector (:func:`write_textfile`, atomic) or a small HTTP endpoint bound to
127.0.0.1 (:func:`make_server`).

Admission refusals are counted by the hook in a file this module defines
(:func:`count_admission_refusal`); until the hook calls it the count is 0.

Imports stay light at module level: the hook may import
:func:`count_admission_refusal`, and the hook never loads libvirt.
"""
from __future__ import annotations

import errno as _errno
import fcntl
import http.server
import math
import os
import re
import time
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Tuple

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
REFUSALS = "admission_refusals"

# --------------------------------------------------------------------------
# The admission-refusal counter (written by the hook, read here)


def refusals_path(run_dir: str) -> str:
    """``/run/kairos/metrics/admission_refusals``: one decimal integer."""
    return os.path.join(run_dir, "metrics", REFUSALS)


def count_admission_refusal(run_dir: str) -> int:
    """Add one refusal (under an exclusive flock); returns the new count."""
    path = refusals_path(run_dir)
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        n = _parse_count(os.pread(fd, 64, 0)) + 1
        data = f"{n}\n".encode()
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
        return n
    finally:
        os.close(fd)


def read_admission_refusals(run_dir: str) -> int:
    """The hook's refusal count; 0 when the file does not exist (yet)."""
    try:
        fd = os.open(refusals_path(run_dir), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return 0
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        return _parse_count(os.pread(fd, 64, 0))
    finally:
        os.close(fd)


def _parse_count(data: bytes) -> int:
    text = data.decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else 0


# --------------------------------------------------------------------------
# One sample of the host


@dataclass
class VcpuSample:
    vcpu: int
    tid: Optional[int] = None
    #: The declaration, as ``status`` reports it (policy, runtime_ns, ...), or None.
    declared: Optional[dict] = None
    #: What the ledger granted (policy, runtime_ns, period_ns, deadline_ns, priority).
    reserved: Optional[dict] = None
    #: What the kernel says now: policy, priority, runtime_ns, deadline_ns, period_ns.
    policy: Optional[str] = None
    priority: Optional[int] = None
    runtime_ns: Optional[int] = None
    deadline_ns: Optional[int] = None
    period_ns: Optional[int] = None
    #: RT group of a fifo/rr vCPU: (runtime_us, period_us).
    rt_group: Optional[Tuple[int, int]] = None
    #: ``se.sum_exec_runtime``: CPU time the thread consumed, in ns.
    exec_ns: Optional[int] = None
    #: ``dl.runtime``: runtime left in the current SCHED_DEADLINE period, in ns.
    dl_runtime_ns: Optional[int] = None
    #: Throttle count, where the kernel exposes one (not every kernel does).
    nr_throttled: Optional[int] = None
    #: Guest tasks introspection found on this vCPU (None: introspection off).
    guest_tasks: Optional[int] = None
    #: Who sized the reservation in force: "declared" or "introspection" (live state).
    source: Optional[str] = None
    error: Optional[str] = None

    @property
    def reserved_bandwidth(self) -> Optional[Fraction]:
        r = self.reserved
        return Fraction(int(r["runtime_ns"]), int(r["period_ns"])) if r else None

    @property
    def enforced_bandwidth(self) -> Fraction:
        """Bandwidth the kernel enforces now: the DL server, or the RT group budget."""
        if self.policy == "deadline" and self.runtime_ns and self.period_ns:
            return Fraction(self.runtime_ns, self.period_ns)
        if self.policy in ("fifo", "rr") and self.rt_group and self.rt_group[1] > 0:
            return Fraction(max(self.rt_group[0], 0), self.rt_group[1])
        return Fraction(0)

    @property
    def in_force(self) -> bool:
        """Does the kernel enforce exactly what the ledger reserved?"""
        r = self.reserved
        if r is None or self.policy != r["policy"]:
            return False
        if r["policy"] == "deadline":
            deadline = r.get("deadline_ns") or r["period_ns"]
            return (self.runtime_ns, self.deadline_ns, self.period_ns) == \
                (r["runtime_ns"], deadline, r["period_ns"])
        return self.priority == r.get("priority") and \
            self.rt_group == (r["runtime_ns"] // 1000, r["period_ns"] // 1000)


@dataclass
class DomainSample:
    name: str
    running: bool = False
    qemu_pid: Optional[int] = None
    agent_pid: Optional[int] = None
    agent_running: bool = False
    ledger_state: Optional[str] = None
    vcpus: List[VcpuSample] = field(default_factory=list)
    #: Why part of the picture is missing (invalid declaration, libvirt gone...).
    error: Optional[str] = None
    #: The live state's introspection: backend, state, error and the counters
    #: hits, decoded, rejected, suppressed, handler_ns, evicted (state.py).
    introspection: Optional[dict] = None

    @property
    def trap_events(self) -> Optional[int]:
        """Trap events (breakpoint or #UD hits) since introspection attached."""
        i = self.introspection
        return i.get("hits") if i else None


@dataclass
class HostSample:
    monotonic: float
    wall: float
    domains: List[DomainSample] = field(default_factory=list)
    capacity_cpus: Optional[Fraction] = None
    reserved_cpus: Fraction = Fraction(0)
    admission_refusals: int = 0
    libvirt_error: Optional[str] = None


class Published(NamedTuple):
    tasks: Dict[int, int]          # guest tasks per vCPU; empty while introspection is off
    introspection: Optional[dict]  # backend, state, counters; None while off
    errors: Dict[int, str]         # per vCPU
    sources: Dict[int, str]        # per vCPU: declared | introspection


def published(xml: Optional[str]) -> Published:
    """From the agent's live state: guest tasks, introspection, errors and sources.

    Tasks and counters exist only while introspection is on (an
    ``<introspection>`` element): without it the task counts are empty, which
    the callers show as unknown ("-"), never as 0.
    """
    if not xml:
        return Published({}, None, {}, {})
    from .state import from_xml
    st = from_xml(xml)
    errors = {v.vcpu: v.error for v in st.vcpus if v.error}
    sources = {v.vcpu: v.source for v in st.vcpus}
    if st.introspection is None:
        return Published({}, None, errors, sources)
    tasks = {v.vcpu: 0 for v in st.vcpus}
    for t in st.tasks:
        vcpu = t.get("vcpu")
        if isinstance(vcpu, int):
            tasks[vcpu] = tasks.get(vcpu, 0) + 1
    return Published(tasks, dict(st.introspection), errors, sources)


def _int(text: Optional[str]) -> Optional[int]:
    if text is None or not re.fullmatch(r"\s*-?[0-9]+\s*", text):
        return None
    return int(text)


def sched_stats(pid: int, tid: int) -> Tuple[Optional[int], Optional[int], Optional[int]]:
    """(consumed ns, DL runtime left ns, throttle count) from ``/proc/PID/task/TID/sched``."""
    from .host import proc
    stats = proc.read_sched_stats(pid, tid)
    exec_ms = stats.get("se.sum_exec_runtime")
    try:
        exec_ns = round(float(exec_ms) * 1_000_000) if exec_ms is not None else None
    except ValueError:
        exec_ns = None
    throttled = stats.get("dl.nr_throttled") or stats.get("nr_throttled")
    return exec_ns, _int(stats.get("dl.runtime")), _int(throttled)


def sample_domain(cfg, name: str, conn, entry: Optional["Entry"]) -> DomainSample:
    """One domain: ``status.collect`` (kernel now) + /proc counters + live state."""
    from . import STATE_NS, spec, status, virt
    from .errors import DeclarationError, KairosError
    from .ledger import sched_to_json
    d = DomainSample(name=name, ledger_state=entry.state if entry else None)
    info, state_xml = None, None
    if conn is not None:
        try:
            dom = virt.lookup(conn, name)
            active = virt.is_active(dom)
            info = spec.parse_domain(virt.live_xml(dom) if active else virt.inactive_xml(dom))
            state_xml = virt.get_metadata(dom, STATE_NS, live=True) if active else None
        except DeclarationError as exc:
            d.error = f"invalid declaration: {exc}"
        except KairosError as exc:  # the domain vanished between list and lookup
            d.error = str(exc)
    doc = status.collect(name, info, cfg)
    d.running, d.qemu_pid = doc["running"], doc["qemu_pid"]
    d.agent_pid, d.agent_running = doc["agent"]["pid"], doc["agent"]["running"]
    granted = {str(k): sched_to_json(v) for k, v in entry.granted.items()} if entry else {}
    pub = published(state_xml)
    d.introspection = pub.introspection
    for row in doc["vcpus"]:
        v = VcpuSample(vcpu=row["vcpu"], tid=row["tid"], declared=row["declared"],
                       reserved=granted.get(str(row["vcpu"])), policy=row["policy"],
                       priority=row["priority"], runtime_ns=row["runtime_ns"],
                       deadline_ns=row["deadline_ns"], period_ns=row["period_ns"])
        g = row.get("rt_group")
        if g:
            v.rt_group = (g["runtime_us"], g["period_us"])
        if v.tid and d.qemu_pid:
            v.exec_ns, v.dl_runtime_ns, v.nr_throttled = sched_stats(d.qemu_pid, v.tid)
        v.guest_tasks = pub.tasks.get(v.vcpu)
        v.source = pub.sources.get(v.vcpu)
        v.error = pub.errors.get(v.vcpu)
        d.vcpus.append(v)
    return d


def domain_names(entries: Iterable[str], conn) -> List[str]:
    """Ledger entries plus running domains that carry our declaration."""
    names = set(entries)
    if conn is None:
        return sorted(names)
    import libvirt

    from . import DECL_NS, virt
    from .errors import KairosError
    try:
        doms = conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
    except libvirt.libvirtError:  # libvirtd went away mid-sample: the ledger's names
        return sorted(names)
    for dom in doms:
        try:
            if dom.name() not in names and virt.get_metadata(dom, DECL_NS, live=True):
                names.add(dom.name())
        except KairosError:  # the domain stopped between the list and the read
            continue
    return sorted(names)


def sample(cfg=None, only: Optional[List[str]] = None) -> HostSample:
    """Read the host once.  ``only`` restricts to these domain names."""
    from . import config as _config
    from . import virt
    from .errors import KairosError
    from .ledger import Ledger, entry_bandwidth
    cfg = cfg or _config.load()
    hs = HostSample(monotonic=time.monotonic(), wall=time.time(),
                    admission_refusals=read_admission_refusals(cfg.run_dir))
    ledger = Ledger(cfg)
    try:
        with ledger.locked() as state:
            hs.capacity_cpus = ledger.capacity(state).total
            entries = dict(state.domains)
    except (OSError, KairosError):  # not root, or /run/kairos unusable: the snapshot only
        entries = dict(ledger.read().domains)
    hs.reserved_cpus = sum((entry_bandwidth(e) for e in entries.values()), Fraction(0))
    try:
        conn = virt.connect()
    except KairosError as exc:
        conn, hs.libvirt_error = None, str(exc)
    try:
        names = domain_names(entries, conn)
        for name in names:
            if only is None or name in only:
                hs.domains.append(sample_domain(cfg, name, conn, entries.get(name)))
    finally:
        if conn is not None:
            conn.close()
    return hs


# --------------------------------------------------------------------------
# Prometheus text exposition format 0.0.4


@dataclass
class Family:
    name: str
    type: str  # gauge | counter
    help: str
    samples: List[Tuple[Dict[str, str], float]] = field(default_factory=list)

    def add(self, value: float, **labels: str) -> None:
        self.samples.append((labels, value))


def escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(v: float) -> str:
    if isinstance(v, Fraction):
        v = float(v)
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


def render_families(families: Iterable[Family]) -> str:
    out: List[str] = []
    for fam in families:
        out.append(f"# HELP {fam.name} {escape_help(fam.help)}")
        out.append(f"# TYPE {fam.name} {fam.type}")
        for labels, value in fam.samples:
            lab = ",".join(f'{k}="{escape_label(str(v))}"' for k, v in labels.items())
            out.append(f"{fam.name}{{{lab}}} {format_value(value)}" if lab
                       else f"{fam.name} {format_value(value)}")
    return "\n".join(out) + "\n"


#: The live state's introspection counters (state.INTRO_COUNTERS) as families.
INTRO_COUNTER_FAMILIES = (
    ("hits", "kairosvm_domain_trap_events_total",
     "Introspection trap events (breakpoint or #UD hits) in the domain since introspection "
     "attached."),
    ("decoded", "kairosvm_domain_trap_events_decoded_total",
     "Trap events decoded into a guest scheduling event."),
    ("rejected", "kairosvm_domain_trap_events_rejected_total",
     "Trap events that could not be decoded (bad guest memory, unknown layout)."),
    ("suppressed", "kairosvm_domain_trap_sites_suppressed_total",
     "Times a trap site was disarmed by its rate limit."),
    ("handler_ns", "kairosvm_domain_trap_handler_seconds_total",
     "Time the guest stood stopped in the trap handler: introspection's overhead."),
    ("evicted", "kairosvm_domain_guest_tasks_evicted_total",
     "Guest tasks dropped from the task model because it was full."),
    ("stopped_ns", "kairosvm_domain_introspection_stopped_seconds_total",
     "Time introspection held the guest stopped (attach, trap hits, arming), the backend's "
     "own account."),
    ("stops", "kairosvm_domain_introspection_stops_total",
     "Times introspection stopped the guest."),
    ("budget_waits", "kairosvm_domain_introspection_budget_waits_total",
     "Times trap sites were taken off because the stop budget was spent (the guest ran on)."),
    ("server_changes", "kairosvm_domain_server_changes_total",
     "Times adaptation changed a vCPU's server (each follows a change in the guest's tasks)."),
    ("server_flips", "kairosvm_domain_server_flips_total",
     "Server changes back to a server held before with no change in the guest's tasks in "
     "between (hysteresis keeps this at 0)."),
)


def families(hs: HostSample) -> List[Family]:
    """The metric families of one host sample (names ``kairosvm_*``)."""
    F = Family
    libvirt_up = F("kairosvm_libvirt_up", "gauge",
                   "1 if libvirtd answered this scrape, else 0 (domain details then come "
                   "from the ledger and the kernel only).")
    libvirt_up.add(0 if hs.libvirt_error else 1)
    capacity = F("kairosvm_capacity_cpus", "gauge",
                 "Real-time bandwidth the admission ledger may hand out, in CPUs.")
    if hs.capacity_cpus is not None:
        capacity.add(hs.capacity_cpus)
    reserved_all = F("kairosvm_reserved_cpus", "gauge",
                     "Real-time bandwidth reserved by all domains in the ledger, in CPUs.")
    reserved_all.add(hs.reserved_cpus)
    refusals = F("kairosvm_admission_refusals_total", "counter",
                 "Domain starts the hook refused at prepare (declaration, host check or "
                 "admission), since boot.")
    refusals.add(hs.admission_refusals)
    running = F("kairosvm_domain_running", "gauge", "1 if the domain's QEMU process runs.")
    agent = F("kairosvm_domain_agent_running", "gauge", "1 if the domain's kairos agent runs.")
    res_bw = F("kairosvm_vcpu_reserved_bandwidth_ratio", "gauge",
               "Bandwidth the ledger reserved for the vCPU: runtime/period, fraction of one CPU.")
    res_period = F("kairosvm_vcpu_reserved_period_seconds", "gauge",
                   "Period of the vCPU's reservation.")
    enf_bw = F("kairosvm_vcpu_enforced_bandwidth_ratio", "gauge",
               "Bandwidth the kernel enforces on the vCPU thread now (SCHED_DEADLINE server, "
               "or RT group budget for fifo/rr), fraction of one CPU; policy is the kernel's.")
    in_force = F("kairosvm_vcpu_reservation_in_force", "gauge",
                 "1 if the kernel's parameters for the vCPU thread equal the reservation.")
    cpu = F("kairosvm_vcpu_cpu_seconds_total", "counter",
            "CPU time the vCPU thread consumed (se.sum_exec_runtime).")
    thr = F("kairosvm_vcpu_throttled_total", "counter",
            "Times the vCPU thread was throttled, where the kernel exposes a count in "
            "/proc/PID/task/TID/sched.")
    tasks = F("kairosvm_vcpu_guest_tasks", "gauge",
              "Guest real-time tasks introspection found on the vCPU (absent while "
              "introspection is off).")
    intro_state = F("kairosvm_domain_introspection_state", "gauge",
                    "1 for the domain's introspection backend and its state (waiting, "
                    "running, held, failed, stopped); absent while introspection is off.")
    intro = {key: F(name, "counter", text) for key, name, text in INTRO_COUNTER_FAMILIES}
    for d in hs.domains:
        running.add(d.running, domain=d.name)
        agent.add(d.agent_running, domain=d.name)
        for v in d.vcpus:
            lab = {"domain": d.name, "vcpu": str(v.vcpu)}
            if v.reserved:
                res_bw.add(v.reserved_bandwidth, **lab, policy=v.reserved["policy"])
                res_period.add(int(v.reserved["period_ns"]) / 1e9, **lab)
                in_force.add(v.in_force, **lab)
            if v.policy is not None:
                enf_bw.add(v.enforced_bandwidth, **lab, policy=v.policy)
            if v.exec_ns is not None:
                cpu.add(v.exec_ns / 1e9, **lab)
            if v.nr_throttled is not None:
                thr.add(v.nr_throttled, **lab)
            if v.guest_tasks is not None:
                tasks.add(v.guest_tasks, **lab)
        i = d.introspection
        if i is not None:
            intro_state.add(1, domain=d.name, backend=str(i.get("backend")),
                            state=str(i.get("state")))
            for key, fam in intro.items():
                if isinstance(i.get(key), int):
                    fam.add(i[key] / 1e9 if key.endswith("_ns") else i[key], domain=d.name)
    return [libvirt_up, capacity, reserved_all, refusals, running, agent, res_bw, res_period,
            enf_bw, in_force, cpu, thr, tasks, intro_state, *intro.values()]


def render(hs: HostSample) -> str:
    return render_families(families(hs))


# --------------------------------------------------------------------------
# Outputs


def write_textfile(path: str, text: str) -> None:
    """Atomically replace ``path`` (node_exporter reads only ``*.prom`` files, so
    the temporary file, in the same directory, is never collected half-written)."""
    from .errors import KairosError
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise KairosError(f"{path}: cannot write the metrics file: {exc.strerror}") from None


def make_server(port: int, produce: Callable[[], str],
                host: str = "127.0.0.1") -> http.server.ThreadingHTTPServer:
    """An HTTP server answering ``GET /metrics`` with ``produce()``.  Loopback only."""
    from .errors import KairosError

    class Handler(http.server.BaseHTTPRequestHandler):
        server_version = "kairosvm-metrics"

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path.split("?")[0] != "/metrics":
                self._reply(404, "not found: the metrics are at /metrics\n")
                return
            try:
                body = produce()
            except KairosError as exc:
                self._reply(500, f"kairosvm metrics: {exc}\n")
                return
            self._reply(200, body, CONTENT_TYPE)

        def _reply(self, code: int, body: str, ctype: str = "text/plain; charset=utf-8") -> None:
            data = body.encode()
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, fmt: str, *args: object) -> None:
            pass  # a scrape every 15 s is not news

    try:
        return http.server.ThreadingHTTPServer((host, port), Handler)
    except OSError as exc:
        why = "already in use" if exc.errno == _errno.EADDRINUSE else exc.strerror
        raise KairosError(f"cannot listen on {host}:{port}: {why}") from None
