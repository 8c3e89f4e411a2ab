"""The agent's introspection: attach a backend, learn the guest's RT tasks, adapt.

Runs in a thread of the agent.  Where the backend can read guest-physical
memory from QEMU's process (gdbstub on this host), the attach stops the VM
once: symbols (the domain's vmlinuz) → wait, reading physical memory with
the VM running, until the kernel is placed and booted (its slide from
``phys_base``, :func:`.symbols.place_kernel`) → trap plan (each site's
fentry NOP verified) and task_struct layout, still with no stop → open the
backend (the one stop) → check the slide with one read → arm → run.
Otherwise (kvm-ud, or a guest whose symbols must come from its memory)
the older order runs inside the attach: symbols → KASLR slide from guest
memory → plan → layout → arm, retried with a growing interval while the
guest boots, each try within the stop budget's attach allowance.
Any failure before running is reported in the live metadata and the log,
the backend is detached, and the domain keeps its declared reservation.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Callable, Dict, List, Mapping, Optional, Tuple

from ..errors import KairosError
from ..host import proc
from ..model import VcpuSched
from . import adapt as _adapt
from .budget import Bucket
from .decode import DecodeError
from .plan import Hit, ResolvedPlan, decode_hit, resolve_plan
from .tasks import PERIOD_CONFIRM, TaskModel

log = logging.getLogger("kairosvm-agent.introspect")

#: Coalescing of model changes into analyses (issue 13): the first change after a
#: quiet spell is analysed at once (the agent wakes on it); changes within
#: COALESCE_S of an analysis wait for the end of that window and are analysed
#: together.  A guest hammering sched_setattr thus costs at most 1/COALESCE_S
#: analyses a second, and a task that starts is served within one wake-up.
COALESCE_S = 0.02
#: And a guest whose task set churns (a hostile one spawning RT processes) gets at most
#: ANALYSIS_RATE analyses a second after a burst of ANALYSIS_BURST: each may regrant
#: under the host-wide ledger lock.
ANALYSIS_RATE = 4.0
ANALYSIS_BURST = 8.0
#: clock_nanosleep is re-armed for a sampling window RESAMPLE_EVERY_S after
#: the periods are learnt, then ever more rarely while the windows confirm
#: what is believed (the interval doubles up to RESAMPLE_MAX_S; any change of
#: the model brings it back).  Why: on TCG with QEMU < 10.2 every gdbstub hit
#: also flushes the guest's translated code (docs/gdbcost.md), a cost far
#: above the stop itself; a period change without a sched_* call is rare.
RESAMPLE_EVERY_S = 10.0
RESAMPLE_MAX_S = 160.0
RESAMPLE_FOR_S = 1.0
#: Fresh samples a re-sampling window gathers before the traps go off again:
#: enough to confirm a changed period (tasks.PERIOD_CONFIRM) in one window.
RESAMPLE_SAMPLES = PERIOD_CONFIRM + 1
#: A guest booting under a small reservation (or nested) can take minutes
#: to reach its kernel; the error is in the live state meanwhile (state "waiting").
ATTACH_TIMEOUT_S = 600.0
ATTACH_RETRY_S = 2.0
#: An attach that stops the guest to find out whether it booted backs off up to this.
ATTACH_RETRY_MAX_S = 60.0
#: How often physical memory is polled for the booted kernel (no VM stop).
BOOT_POLL_S = 0.25
LAYOUT_RETRY_S = 5.0
#: The census of guest tasks (introspect/census.py), from physical memory with the
#: VM running: how often; and how many censuses in a row must miss a task that only
#: the census knows before it is forgotten (a walk racing the guest can miss one).
CENSUS_S = 1.0
CENSUS_MISSES = 2
#: While the guest has no real-time task the census runs this rarely: a task that
#: becomes RT through a sched_* call is trapped at once (its next census finds the
#: rest), and only RT tasks need their exit seen fast.  Idle, the agent then costs
#: next to nothing (issue 13: bench/introspection (c)).
CENSUS_IDLE_S = 5.0
#: How often the sleep target of each known FIFO/RR task is read from guest memory
#: (introspect/sleepers.py): the periods then need no trap at all.  Successive
#: targets are whole periods apart whatever this interval (tasks.py, "abstime").
#: Each is read faster than its period, at jittered times (sleepers.SleeperWatch
#: says why): a quarter of the shortest believed period (jittered, the reads stay
#: under half a period apart: their gaps are samples, tasks.py), at most SAMPLE_S,
#: at least SAMPLE_MIN_S, and SAMPLE_MIN_S while a task that sleeps has no period yet.
SAMPLE_S = 0.02
SAMPLE_MIN_S = 0.002
#: Once every FIFO/RR task's period is confirmed (TaskModel.stable), the sampler
#: reads only this often (jittered).  Its gaps are spans (reads more than half a
#: period apart may skip targets, tasks.py): they can only refine the period or
#: raise a doubt, which brings the fast rate back.  Sampling fast for ever cost the
#: host CPU and QEMU's mm lock (bench/rtquality d, loads 4 and 1+rt).
SAMPLE_STABLE_S = 0.25
SLEEP_KINDS = ("clock_nanosleep", "nanosleep")
#: Task keys remembered as not real-time (a bound against a guest forking without end).
MAX_NOT_RT = 4096


class NotBooted(KairosError):
    """The guest kernel is not up yet (found out without stopping the guest)."""


class _NoReader(KairosError):
    """Guest memory asked for before there is a reader (symbols must come from a file)."""


@dataclass
class Status:
    backend: str
    state: str = "starting"          # starting | running | failed | stopped
    error: Optional[str] = None
    notes: List[str] = field(default_factory=list)
    slide: Optional[int] = None
    sites: Dict[str, int] = field(default_factory=dict)


class Introspector:
    def __init__(self, backend, load_symbols: Callable[[Callable[[int, int], bytes]], object],
                 declared: Mapping[int, VcpuSched], ceilings: Mapping[int, Fraction],
                 overhead_ns: int = _adapt.DEFAULT_OVERHEAD_NS, enforcement_ns: int = 0) -> None:
        self.backend = backend
        self.load_symbols = load_symbols
        self.declared = dict(declared)
        #: The analysis, re-run per vCPU only where the vCPU's tasks changed; servers are
        #: sized for the host's enforcement granularity (analysis.enforcement).
        self._adapter = _adapt.Adapter(self.declared, ceilings, overhead_ns, enforcement_ns)
        self.model = TaskModel()
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.status = Status(backend.name)
        self.thread: Optional[threading.Thread] = None
        self.layout = None
        #: Scheduling fields of task_struct (schedlayout): RT tasks that set their
        #: policy before the attach are read from memory at their first trap.
        self.sched_layout = None
        #: Stop-free reader of kernel memory (physical, through QEMU), when the host has one.
        self._kread: Optional[Callable[[int, int], bytes]] = None
        #: Task keys read and found not real-time (their later sched_* calls are trapped).
        self._not_rt: set = set()
        self.discovered = 0
        self.census = None
        self.census_runs = 0
        self.census_errors = 0
        self._census_misses: Dict[str, int] = {}
        self._census_seen: Dict[str, int] = {}    # consecutive censuses that saw an RT task
        self._census_thread: Optional[threading.Thread] = None
        #: Periods from memory (sleepers.py): the sleep sites then stay disarmed.
        self._sampling = False
        self._wakeup_fn = 0
        self._addrs: Dict[str, int] = {}          # task key -> task_struct address
        self._last_target: Dict[str, int] = {}
        self._target_seen_at: Dict[str, int] = {}  # host ns of the last read that saw it pending
        self._watches: Dict[str, object] = {}     # task key -> sleepers.SleeperWatch
        self._walker = None
        self._phys_read: Optional[Callable[[int, int], bytes]] = None
        self.samples = 0
        self.sample_errors = 0
        self.rsyms = None
        self._analysed_version = -1
        self._adapted: Dict[int, _adapt.Adapted] = {}
        #: The model changed since the last analysis; when that analysis ran.
        self._dirty = False
        self._analysed_at = float("-inf")
        self._analyses = Bucket(ANALYSIS_RATE, ANALYSIS_BURST)
        self._sample_wake = threading.Event()
        self._file_syms = None
        #: Called (from any thread) when the model changed: the agent's wake-up.
        self.notify: Callable[[], None] = lambda: None
        #: Trap time (monotonic ns) of the event behind the latest re-analysis:
        #: the agent measures its reaction latency from it.
        self._trigger_ns: Optional[int] = None
        self._trigger_seen_ns = 0
        #: (trap, event in the model, analysis done), monotonic ns, of the guest call
        #: behind the latest analysis: the agent times its reaction's stages from it.
        self.trigger: Optional[Tuple[int, int, int]] = None
        self._sleep_sites: List[int] = []
        self._sleep_armed = True
        self._resample_at = 0.0
        self._resample_every = RESAMPLE_EVERY_S
        self._window_version: Optional[int] = None
        self._layout_at = 0.0
        self._held = False
        self._suppressed_seen = (0, 0)
        #: Server changes decided by adaptation, and flips: a change back to a
        #: server a vCPU held before with no task-set change in between (the
        #: hysteresis makes them impossible; the counter proves it).
        self.server_changes = 0
        self.server_flips = 0
        #: Per vCPU: server -> the model's structure count when the vCPU last left it.
        self._left: Dict[int, Dict[VcpuSched, int]] = {}

    # -- lifecycle -------------------------------------------------------
    def start(self) -> None:
        self.thread = threading.Thread(target=self._main, name="kairos-introspect", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        wake = getattr(self.backend, "wake", None)
        if wake is not None:
            wake()           # its loop sleeps on its events, with no timeout to notice
        if self.thread is not None:
            self.thread.join(timeout=10)

    def _main(self) -> None:
        proc.name_this_thread("kairos-intro")
        # The agent starts while the guest is still in its firmware or early
        # boot: until the kernel is up there is nothing to attach to.  Wait,
        # reading physical memory where the host allows it (no VM stop), else
        # retry the attach, detached (the VM runs) between attempts.
        deadline = time.monotonic() + ATTACH_TIMEOUT_S
        retry_s = ATTACH_RETRY_S
        budget = getattr(self.backend, "budget", None)
        while True:
            try:
                self._attach()
                break
            except NotBooted as exc:
                # Nothing stopped the guest: poll again soon.
                self._safe_close()
                wait_s, err, quiet = BOOT_POLL_S, exc, True
            except KairosError as exc:
                self._safe_close()
                wait_s, err, quiet = retry_s, exc, False
                retry_s = min(ATTACH_RETRY_MAX_S, retry_s * 2)
            self.status.error = str(err)
            out_of_attaches = budget is not None and not quiet and not budget.can_attach()
            if time.monotonic() >= deadline or self.stop_event.is_set() or out_of_attaches:
                self.status.state = "failed"
                if out_of_attaches:
                    self.status.error = (f"{err} (gave up after {budget.attaches} attach stops, "
                                         "the stop budget's attach allowance)")
                log.error("introspection (%s) unavailable: %s; the declared reservation "
                          "stays", self.backend.name, self.status.error)
                return
            if self.status.state != "waiting" or not quiet:
                log.info("introspection (%s) not ready (%s); retrying", self.backend.name, err)
            self.status.state = "waiting"
            self._reset()
            if self.stop_event.wait(wait_s):
                return
        # While held, the hold request queued for the backend thread runs first
        # in run(): it disarms whatever an attach in flight armed, then says "held".
        self.status.state = "running"
        self.status.error = None
        self.notify()
        log.info("introspection (%s) running%s: %s", self.backend.name,
                 " (held: sites stay disarmed)" if self._held else "",
                 ", ".join(f"{k}@{a:#x}" for k, a in self.status.sites.items()))
        if self.census is not None:
            self._census_thread = threading.Thread(target=self._census_loop, name="kairos-census",
                                                   daemon=True)
            self._census_thread.start()
        if self._sampling:
            threading.Thread(target=self._sample_loop, name="kairos-sampler", daemon=True).start()
        try:
            self.backend.run(self._on_hit, self.stop_event)
        except KairosError as exc:
            self.status.state, self.status.error = "failed", str(exc)
            log.error("introspection (%s) stopped: %s", self.backend.name, exc)
            self.notify()
        finally:
            self._safe_close()
            if self.status.state in ("running", "held"):
                self.status.state = "stopped"

    def _reset(self) -> None:
        self.status.sites.clear()
        self.status.notes = [n for n in self.status.notes if "falling back" in n]
        self._sleep_sites.clear()
        self.layout = None
        self.sched_layout = None
        self.census = None
        self._sampling = False
        self._kread = None
        self._not_rt.clear()

    def _safe_close(self) -> None:
        try:
            self.backend.close()
        except KairosError as exc:
            log.warning("closing the %s backend: %s", self.backend.name, exc)

    def stop_counters(self) -> Dict[str, int]:
        """The backend's stop account (introspect/budget.py) for the live state; {} without one."""
        budget = getattr(self.backend, "budget", None)
        return budget.report() if budget is not None else {}

    def _guest_memory(self):
        """The backend's stop-free physical reader, or None (noted once when the host refuses)."""
        opener = getattr(self.backend, "guest_memory", None)
        if opener is None:
            return None
        try:
            return opener()
        except KairosError as exc:
            note = f"guest memory is read through the gdbstub (the guest stops for it): {exc}"
            if note not in self.status.notes:
                self.status.notes.append(note)
            log.warning("%s", note)
            return None

    def _attach(self) -> None:
        phys = self._guest_memory()
        if phys is not None:
            syms = self._symbols_without_stop()
            if syms is not None:
                self._attach_booted(phys, syms)
                return
        self._attach_stopped()

    def _symbols_without_stop(self):
        """Symbols that need no guest memory (the domain's vmlinuz), else None.

        Loaded once: the boot wait asks four times a second, and parsing the
        table each time cost a waiting agent 13 % of a CPU (bench/scale).
        """
        if self._file_syms is not None:
            return self._file_syms

        def no_reader(addr: int, n: int) -> bytes:
            raise _NoReader(f"{addr:#x}: no guest-virtual reader before attach")
        try:
            self._file_syms = self.load_symbols(no_reader)
        except KairosError:
            return None
        return self._file_syms

    def _attach_booted(self, phys, syms) -> None:
        """Place the kernel from physical memory (VM running), then one stop to arm."""
        from .symbols import SymbolError, fentry_site, place_kernel, read_exact
        try:
            placed = place_kernel(phys.read, syms, phys.size)
        except SymbolError as exc:     # half-written memory while the kernel unpacks
            raise NotBooted(f"guest kernel not booted yet ({exc})") from exc
        if placed is None:
            raise NotBooted("guest kernel not in memory yet (its banner is not where "
                            f"{syms.source or 'the symbol table'} puts it)")
        if not placed.up:
            raise NotBooted(f"guest kernel booting (system_state {placed.state})")
        kread = placed.reader(phys.read)
        self._kread = kread
        self.status.slide = placed.slide
        self.rsyms = rsyms = syms.runtime(placed.slide)
        plan: ResolvedPlan = resolve_plan(rsyms.resolve, lambda a: fentry_site(kread, a))
        self._discover_layout(kread)
        self._start_census(phys, placed)          # memory only: before the stop
        budget = getattr(self.backend, "budget", None)
        if budget is not None and not budget.can_attach():
            raise KairosError(f"the stop budget's attach allowance ({budget.spec.attach_limit} "
                              "attach stops) is spent")
        self.backend.open()                       # the one stop
        banner = syms.banner.encode("ascii", "replace")[:32]
        at = syms.address("linux_banner") + placed.slide
        got = read_exact(self.backend.read, at, len(banner), "linux_banner through the vCPU")
        if got != banner:
            raise SymbolError(f"the vCPU's page tables do not show linux_banner at {at:#x} (found "
                              f"{got[:16]!r}): physical memory and the running kernel disagree")
        self._arm_plan(plan)
        self._check_attach_stop()

    def _start_census(self, phys, placed) -> None:
        """The census and the sleep sampler read guest memory with the VM running (kernel image,
        direct map and, through the kernel's page tables, vmalloc: the stacks).  Through the
        gdbstub they would stop the guest, so only where QEMU's RAM is readable."""
        from .census import Census
        from .sleepers import PageWalker
        self.status.notes = [n for n in self.status.notes
                             if not n.startswith(("no census", "periods from trapped"))]
        if self.layout is None or self.sched_layout is None:
            return
        try:
            self._walker, self._phys_read = PageWalker(phys.read, placed, self.rsyms), phys.read
            self.census = Census(self._walker.reader(), self.rsyms,
                                 self.layout, ncpus=max(self.declared, default=0) + 1)
        except KairosError as exc:
            note = ("no census of guest tasks (tasks set real-time before the attach are found "
                    f"at their first trap): {exc}")
            self.status.notes.append(note)
            log.warning("%s", note)
            return
        if getattr(self.backend, "cheap_traps", False):
            return      # trapped sleeps cost microseconds and give every target exactly
        try:
            self._wakeup_fn = self.rsyms.resolve("hrtimer_wakeup")
            self._sampling = True
        except KairosError as exc:
            note = f"periods from trapped sleeps (each trap stops the guest): {exc}"
            self.status.notes.append(note)
            log.warning("%s", note)

    def _attach_stopped(self) -> None:
        """The order for backends without stop-free reads: everything inside the attach stop."""
        from .symbols import fentry_site
        budget = getattr(self.backend, "budget", None)
        if budget is not None and not budget.can_attach():
            raise KairosError(f"the stop budget's attach allowance ({budget.spec.attach_limit} "
                              "attach stops) is spent")
        self.backend.open()
        read = self.backend.read
        syms = self.load_symbols(read)
        slide = syms.find_slide(read)
        self.status.slide = slide
        rsyms = syms.runtime(slide)
        self.rsyms = rsyms
        plan: ResolvedPlan = resolve_plan(rsyms.resolve, lambda a: fentry_site(read, a))
        self._check_attach_stop()
        self._arm_plan(plan)
        self._discover_layout(read)

    def _check_attach_stop(self) -> None:
        elapsed = getattr(self.backend, "attach_elapsed_ns", lambda: 0)()
        limit = self.backend.budget.spec.attach_stop_ns if hasattr(self.backend, "budget") else None
        if limit is not None and elapsed > limit:
            raise KairosError(f"attach stopped the guest {elapsed // 1_000_000} ms, over the stop "
                              f"budget's {limit // 1_000_000} ms: detached")

    def _arm_plan(self, plan: ResolvedPlan) -> None:
        self.backend.plan = plan
        self.status.notes.extend(plan.skipped)
        # With periods read from memory the sleep sites are never armed, and with the
        # census the exit site neither (a guest's short-lived processes exit every
        # second): on a TCG guest every hit flushes QEMU's translations and stalls the
        # guest for up to ~250 ms (docs/gdbcost.md).  Only the sched_* calls stay trapped.
        self._sleep_armed = not self._sampling
        quiet = self._quiet_sites(plan)
        for addr, site in plan.sites.items():
            self.status.sites[site.kind] = addr
            if site.kind in SLEEP_KINDS:
                self._sleep_sites.append(addr)
            if addr in quiet:
                continue
            if not self._held:
                self.backend.arm(addr)

    def _quiet_sites(self, plan: ResolvedPlan) -> set:
        """Sites memory reading replaces: never armed (neither at attach nor at unhold)."""
        kinds = set(SLEEP_KINDS) if self._sampling else set()
        if self.census is not None and not getattr(self.backend, "cheap_traps", False):
            kinds.add("exit")   # (a cheap exit trap forgets a task at once, not 2 censuses later)
        return {a for a, site in plan.sites.items() if site.kind in kinds}

    def _discover_layout(self, read: Callable[[int, int], bytes]) -> None:
        """task_struct offsets need init and kthreadd to exist: retry until they do."""
        from . import layout as _layout
        if not getattr(self.backend, "identifies_tasks", True) and self._kread is None:
            # Events that cannot name tasks, and no memory to count them in: the layout
            # would serve nothing (with memory, the census needs it).
            self._layout_at = float("inf")
            return
        self._layout_at = time.monotonic() + LAYOUT_RETRY_S
        self.status.notes = [n for n in self.status.notes if not n.startswith("task ids")]
        try:
            self.layout = _layout.discover_layout(read, self.rsyms)
        except KairosError as exc:
            self.status.notes.append(f"task ids unavailable (retrying): {exc}")
            return
        self._discover_sched_layout(read)

    def _discover_sched_layout(self, read: Callable[[int, int], bytes]) -> None:
        from . import schedlayout
        self.status.notes = [n for n in self.status.notes if not n.startswith("tasks set")]
        try:
            self.sched_layout = schedlayout.discover_sched_layout(self._kread or read, self.rsyms,
                                                                  self.layout)
            log.info("task_struct scheduling fields: %r", self.sched_layout)
        except KairosError as exc:
            self.status.notes.append(f"tasks set real-time before the attach stay unseen until "
                                     f"their next sched_* call: {exc}")

    # -- events (backend thread, VM stopped) ------------------------------
    def _on_hit(self, hit: Hit, read: Callable[[int, int], bytes]) -> None:
        if self.layout is None and time.monotonic() >= self._layout_at:
            self._discover_layout(self._kread or read)
        task = None
        if self.layout is not None and "gs_base" in hit.regs:
            try:
                from . import layout as _layout
                cur = _layout.current_task(read, hit.regs["gs_base"], self.rsyms)
                tid, _tgid, comm = _layout.task_ident(self._kread or read, cur, self.layout)
                hit = replace(hit, tid=tid, comm=comm)
                task = cur
            except KairosError:
                pass  # identity is a nicety; the pt_regs key still identifies the task
        try:
            ev = decode_hit(hit, read)
        except DecodeError as exc:
            self.backend.counters.rejected += 1
            self.backend.counters.last_error = str(exc)
            return
        self.backend.counters.decoded += 1
        if task is not None and ev.kind != "exit":
            self._addrs[ev.task_key] = task
        found = self._read_unknown(ev, task, read)
        with self.lock:
            # A site the backend took off meanwhile (its rate limit, or the stop
            # budget was spent) missed calls: the next gap of every task spans
            # that pause, it is no sample.
            budget = getattr(self.backend, "budget", None)
            paused = (getattr(self.backend.counters, "suppressed", 0),
                      getattr(budget, "waits", 0))
            if paused != self._suppressed_seen:
                self._suppressed_seen = paused
                # Lifecycle sites may have been off too: a sched_* call may have
                # gone unseen, so tasks found not real-time are read again.
                self._not_rt.clear()
                if not getattr(self.backend, "cheap_traps", False):
                    self.model.note_pause()
            learnt = found is not None and self.model.discover(
                ev, found.policy, found.priority or None, found.runtime_ns, found.deadline_ns,
                found.period_ns)
            if learnt:
                self.discovered += 1
                log.info("guest task %s (tid %s) runs %s since before the attach: read from its "
                         "task_struct", ev.comm, ev.tid, found.policy)
            if self.model.apply(ev) or learnt:
                if not self._dirty:
                    self._trigger_ns, self._trigger_seen_ns = hit.time_ns, time.monotonic_ns()
                self._changed()
        self._sampling_policy()

    def _read_unknown(self, ev, task: Optional[int], read: Callable[[int, int], bytes]):
        """The scheduling state of a task the model does not know, if it is real-time.

        Read once per task (the stop-free reader when the host has one): a task
        found not real-time is remembered until it exits, since any later change
        of its policy is a trapped sched_* call.  Forked children of an RT task
        inherit its policy without a call: their first trap finds them here.
        """
        if ev.kind == "exit":
            self._not_rt.discard(ev.task_key)
            return None
        if task is None or self.sched_layout is None or ev.task_key in self._not_rt:
            return None
        with self.lock:
            if self.model.knows(ev):
                return None
        from . import schedlayout
        try:
            state, self.sched_layout = schedlayout.read_sched(self._kread or read, task,
                                                              self.sched_layout)
        except KairosError as exc:
            self.backend.counters.last_error = f"task_struct of {ev.comm}: {exc}"
            return None
        if state.realtime:
            return state
        if len(self._not_rt) >= MAX_NOT_RT:
            self._not_rt.clear()
        self._not_rt.add(ev.task_key)
        return None

    # -- the census (its own thread, VM running) -------------------------------
    def _census_interval(self) -> float:
        with self.lock:
            busy = bool(self.model.rt_tasks()) or self._census_misses or self._census_seen
        return CENSUS_S if busy else CENSUS_IDLE_S

    def _census_loop(self) -> None:
        proc.name_this_thread("kairos-census")
        while not self.stop_event.wait(self._census_interval()):
            try:
                self.census_once()
            except KairosError as exc:       # the guest changed its lists while we read
                self.census_errors += 1
                log.debug("census: %s", exc)

    def census_once(self) -> bool:
        """Read every guest task; learn the RT ones no trap has shown, forget those gone.

        Returns True if the model changed.  A task is forgotten after
        CENSUS_MISSES censuses without it (a walk racing the guest can miss one).
        """
        from . import schedlayout
        from .plan import GuestEvent
        census, sl = self.census, self.sched_layout
        if census is None or sl is None:
            return False
        now = time.monotonic_ns()
        rt: Dict[str, tuple] = {}
        for ref in census.tasks():
            if ref.kthread:
                continue      # the guest kernel's own threads (migration/N...): no call of theirs is trapped either
            try:
                state, sl = schedlayout.read_sched(census.read, ref.addr, sl)
            except KairosError:
                continue
            if state.realtime:
                rt[ref.key] = (ref, state)
        self.sched_layout = sl
        self._addrs = {k: a for k, a in self._addrs.items() if k in self.model.tasks}
        self._addrs.update((k, ref.addr) for k, (ref, _) in rt.items())
        self.census_runs += 1
        changed = False
        with self.lock:
            for key in [k for k in self._census_seen if k not in rt]:
                if key not in self.model.tasks:
                    del self._census_seen[key]
            for key, (ref, state) in rt.items():
                self._census_misses.pop(key, None)
                cpu = census.cpu_of(ref.addr)
                if self.model.moved(key, cpu):
                    changed = True
                self.model.identify(key, ref.tid, ref.comm)
                ev = GuestEvent("census", key, cpu, now, tid=ref.tid, comm=ref.comm)  # type: ignore[arg-type]
                if self.model.discover(ev, state.policy, state.priority or None, state.runtime_ns,
                                       state.deadline_ns, state.period_ns):
                    changed = True
                    self.discovered += 1
                    log.debug("guest task %s (tid %d) runs %s: found by the census", ref.comm,
                              ref.tid, state.policy)
                seen = self._census_seen[key] = self._census_seen.get(key, 0) + 1
                if seen == 2:     # short-lived RT processes (a FIFO shell's `sleep 1`) stay quiet
                    log.info("guest task %s (tid %d) runs %s %s (census)", ref.comm, ref.tid,
                             state.policy, state.priority or
                             f"{state.runtime_ns}/{state.deadline_ns}/{state.period_ns} ns")
            # The kernel is the truth: a task the census finds gone or not real-time is
            # forgotten, whatever taught it (exits are not trapped when the census runs,
            # and a sched_* call may go untrapped while the sites wait for the budget).
            # The census sees every task: every process, and the threads through the
            # thread list, which is found as soon as a process has a second thread.
            for t in list(self.model.tasks.values()):
                if t.key in rt or t.key.startswith("pid:"):
                    continue
                n = self._census_misses[t.key] = self._census_misses.get(t.key, 0) + 1
                if n >= CENSUS_MISSES and self.model.forget(t.key):
                    del self._census_misses[t.key]
                    changed = True
                    announced = self._census_seen.pop(t.key, 0) >= 2
                    (log.info if announced else log.debug)(
                        "guest task %s (tid %s) is gone or no longer real-time", t.comm, t.tid)
            if changed:
                self._changed()
        return changed

    # -- the sleep sampler (its own thread, VM running) --------------------------
    def _sample_loop(self) -> None:
        import random
        proc.name_this_thread("kairos-sampler")
        while not self.stop_event.is_set():
            interval = self.sample_interval()
            if interval is None:
                # Nothing to sample: sleep until the model changes (_changed sets it).
                self._sample_wake.wait(CENSUS_S)
                self._sample_wake.clear()
                continue
            if self.stop_event.wait(interval * random.uniform(0.5, 1.5)):
                return
            try:
                self.sample_once()
            except KairosError as exc:       # a stack being freed under us
                self.sample_errors += 1
                log.debug("sleep sampler: %s", exc)

    def sample_interval(self) -> Optional[float]:
        """Seconds until the next read of the sleep targets (before jitter); None: no task."""
        with self.lock:
            tasks = [t for t in self.model.rt_tasks() if t.policy in ("fifo", "rr")]
            if not tasks:
                return None
            if any(t.observed_period_ns is None and t.key in self._last_target for t in tasks):
                return SAMPLE_MIN_S
            periods = [t.observed_period_ns for t in tasks if t.observed_period_ns]
            if periods and self.model.stable():
                return SAMPLE_STABLE_S
        if not periods:
            return SAMPLE_S
        return max(SAMPLE_MIN_S, min(SAMPLE_S, min(periods) / 4e9))

    def sample_once(self) -> int:
        """Read where each known FIFO/RR task sleeps until; feed each new absolute target.

        A periodic program advances its clock_nanosleep(TIMER_ABSTIME) target
        by whole periods, so the targets seen, however rarely, are evidence
        for its period exactly as the trapped calls were (tasks.py), with no
        trap, no stop, no flush.  Relative sleeps are not (their target is the
        call time plus the length): they are skipped.
        """
        from .decode import SleepRequest, Timespec
        from .plan import PT_REGS_SIZE, GuestEvent
        from .sleepers import SleeperWatch
        census = self.census
        if census is None or not self._sampling:
            return 0
        with self.lock:
            todo = [(t.key, t.vcpu, t.tid, t.comm, self._addrs.get(t.key))
                    for t in self.model.rt_tasks() if t.policy in ("fifo", "rr")]
        live = {k for k, *_ in todo}
        for k in [k for k in self._watches if k not in live]:
            del self._watches[k]
        for k in [k for k in self._last_target if k not in live]:
            del self._last_target[k]          # a task gone: its last target says nothing more
            self._target_seen_at.pop(k, None)
        fed = 0
        for key, vcpu, tid, comm, addr in todo:
            if addr is None or key.startswith("pid:"):
                continue
            watch = self._watches.get(key)
            if watch is None or watch.task != addr:  # type: ignore[attr-defined]
                watch = self._watches[key] = SleeperWatch(
                    self._phys_read, self._walker, int(key, 16) + PT_REGS_SIZE, addr, self._wakeup_fn)
            got = watch.target()  # type: ignore[attr-defined]
            if got is None or not got[1]:
                continue
            now = time.monotonic_ns()
            seen_at = self._target_seen_at.get(key)
            self._target_seen_at[key] = now
            if self._last_target.get(key) == got[0]:
                continue
            self._last_target[key] = got[0]
            target = got[0]
            ev = GuestEvent("sleep", key, vcpu, now, tid=tid, comm=comm,
                            sleep=SleepRequest(1, True, Timespec(target // 10**9, target % 10**9)),
                            spacing_ns=None if seen_at is None else now - seen_at)
            with self.lock:
                if self.model.apply(ev):
                    self._changed()
            fed += 1
        self.samples += fed
        return fed

    def _sampling_policy(self) -> None:
        """Learn periods, then stop paying for clock_nanosleep traps (re-sample now and then).

        Pausing and re-sampling change nothing the analysis reads (the gaps
        across a pause are spans, a moved period needs PERIOD_CONFIRM fresh
        samples): re-sampling alone never changes a server.
        """
        if getattr(self.backend, "cheap_traps", False) or self._held or self._sampling:
            return
        now = time.monotonic()
        if self._sleep_armed and self.model.stable() and self.model.rt_tasks():
            for a in self._sleep_sites:
                self.backend.disarm(a)
            self._sleep_armed = False
            if self._window_version is not None and self._window_version == self.model.version:
                self._resample_every = min(RESAMPLE_MAX_S, self._resample_every * 2)
            else:
                self._resample_every = RESAMPLE_EVERY_S
            self._resample_at = now + self._resample_every
        elif not self._sleep_armed and now >= self._resample_at:
            self._rearm_sleep(now)

    def _rearm_sleep(self, now: float) -> None:
        for a in self._sleep_sites:
            self.backend.arm(a)
        self._sleep_armed = True
        with self.lock:
            self.model.resume_sampling(fresh=RESAMPLE_SAMPLES)
            self._window_version = self.model.version
        self._resample_at = now + RESAMPLE_FOR_S

    # -- hold: no trap in the guest (before a save, snapshot or migration) ---
    def hold(self, on: bool) -> None:
        """Disarm every site (``on``) or arm them again; the model and the grants stay.

        A kvm-ud trap is a UD2 in guest memory: a saved image, a snapshot or
        a migrated guest would carry it to where no trap table catches it.
        The backend restores the original bytes in its own thread; the state
        says "held" only once every site is disarmed, so that ``kairosvm
        hold`` can wait for it.  (kvm-ud writes guest text from the vCPU's
        context: hold before libvirt pauses the domain.)
        """
        if on == self._held:
            return
        self._held = on

        def apply() -> None:
            sites = list(self.backend.plan.sites) if self.backend.plan else []
            quiet = self._quiet_sites(self.backend.plan) if self.backend.plan else set()
            try:
                for a in sites:
                    if on:
                        self.backend.disarm(a)
                    elif a not in quiet and (self._sleep_armed or a not in self._sleep_sites):
                        self.backend.arm(a)
            except KairosError as exc:
                self.status.error = f"{'hold' if on else 'resume'}: {exc}"
                log.error("introspection %s failed: %s", "hold" if on else "resume", exc)
                self._held = not on  # the agent's next look at the hold file tries again
                self.notify()
                return
            self.status.error = None
            self.status.state = "held" if on else "running"
            self.notify()                       # the agent publishes it: `kairosvm hold` waits
            log.info("introspection %s: %d sites %s", "held" if on else "resumed", len(sites),
                     "disarmed" if on else "armed")
        self.backend.request(apply)

    def tick(self) -> None:
        """Called by the agent's loop: re-arm sampling when due (through the backend)."""
        if self.status.state == "running" and not self._sleep_armed and not self._held and \
                not self._sampling and time.monotonic() >= self._resample_at:
            self.backend.request(lambda: self._rearm_sleep(time.monotonic()))
            self._resample_at = time.monotonic() + self._resample_every

    def _changed(self) -> None:
        """The model changed (caller holds self.lock): wake the agent, and the sampler."""
        self._dirty = True
        self._sample_wake.set()
        self.notify()

    # -- the agent asks ---------------------------------------------------
    def next_due(self, now: Optional[float] = None) -> Optional[float]:
        """Seconds until :meth:`adapted` has a change to analyse (0: now), None: nothing pending.

        The agent sleeps until then, or until :attr:`notify` wakes it.
        """
        now = time.monotonic() if now is None else now
        with self.lock:
            return self._due_in(now)

    def _due_in(self, now: float) -> Optional[float]:
        """The coalescing rule (caller holds self.lock): seconds until the pending change may
        be analysed, None when none is pending."""
        if not self._dirty:
            return None
        return max(0.0, self._analysed_at + COALESCE_S - now, self._analyses.wait_s(now))

    def adapted(self) -> Dict[int, _adapt.Adapted]:
        """Current per-vCPU reservations, re-analysed when the model changed (coalesced).

        Hysteresis: the analysis re-runs only when the task set changed (the
        model's version moved), and it is a function of the task set, so a
        server never changes without a task-set change.
        """
        now = time.monotonic()
        with self.lock:
            due = self._due_in(now) == 0.0
            if self._analysed_version == -1 or (due and self.model.version !=
                                                self._analysed_version):
                self._analyses.take(now)
                new = self._adapter.adapt(self.model)
                self._count_changes(self._adapted, new)
                self._adapted = new
                self._analysed_version = self.model.version
                self._analysed_at = now
                self.trigger = None if self._trigger_ns is None else (
                    self._trigger_ns, self._trigger_seen_ns, time.monotonic_ns())
                self._trigger_ns = None
            if due:
                self._dirty = False
            return dict(self._adapted)

    def _count_changes(self, old: Mapping[int, _adapt.Adapted],
                       new: Mapping[int, _adapt.Adapted]) -> None:
        """Count server changes, and flips: back to a server the vCPU left while the
        guest changed nothing of its tasks since (only beliefs moved)."""
        for vid, a in new.items():
            before = old.get(vid)
            if before is None or before.sched == a.sched:
                continue
            self.server_changes += 1
            left = self._left.setdefault(vid, {})
            left[before.sched] = self.model.structure
            if left.get(a.sched) == self.model.structure:
                self.server_flips += 1
                log.warning("vCPU %d: server flipped back to %s with no task-set change",
                            vid, a.sched)

    def adaptation_counters(self) -> Dict[str, int]:
        """For the live state (state.INTRO_COUNTERS): server changes and flips."""
        return {"server_changes": self.server_changes, "server_flips": self.server_flips,
                "census_runs": self.census_runs, "discovered": self.discovered,
                "sleep_samples": self.samples}

    def tasks_snapshot(self) -> list:
        with self.lock:
            # The guarantee the reservation in force gives each task (its last analysis).
            bound = {k: b for a in self._adapted.values() for k, b in a.bounds}
            return [dict(key=t.key, tid=t.tid, comm=t.comm, vcpu=t.vcpu, policy=t.policy,
                         priority=t.priority, runtime_ns=t.runtime_ns,
                         deadline_ns=t.deadline_ns, period_ns=t.period_ns,
                         observed_period_ns=t.observed_period_ns, origin=t.origin,
                         jitter_ns=t.periods.jitter_ns, samples=t.periods.support,
                         period_source=t.periods.source, bound_ns=bound.get(t.key))
                    for t in sorted(self.model.rt_tasks(), key=lambda x: x.key)]
