"""``kairosvm check``: is this host ready for real-time domains?

The shape follows tuned's verify: every knob is a line that says OK, WARN or
FAIL, with the reason and, unless it is OK, the fix.  Unlike tuned, the
details are on the console (and in ``--json``), not only in a log, and a
missing knob on a host where it cannot exist (no cpufreq in a VM, no SMT) is
not a failure.

Two halves, so that tests can feed fake hosts:

- :func:`gather` is the thin, impure part: it reads ``/proc``, ``/sys``, the
  kernel command line and libvirt, and runs one SCHED_DEADLINE probe, into a
  :class:`Facts` record of plain values.
- :data:`CHECKS` are pure functions ``Facts -> Result``; :func:`evaluate`
  runs them all.

A FAIL means a real-time domain cannot start or cannot be enforced here; a
WARN means it can, with worse latency or fewer features.
"""
from __future__ import annotations

import dataclasses
import errno as _errno
import fcntl
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

OK, WARN, FAIL = "OK", "WARN", "FAIL"
#: The realtime-virtual-host profile of tuned (tuned-profiles-nfv-host / -realtime).
TUNED_PROFILE = "realtime-virtual-host"

# --------------------------------------------------------------------------
# Facts: what the gatherer found, plain values only (JSON-able).


@dataclass(frozen=True)
class DeadlineProbe:
    """Outcome of admitting a scratch thread to SCHED_DEADLINE."""

    ok: bool
    errno: Optional[int] = None
    message: str = ""
    runtime_ns: int = 0
    period_ns: int = 0


@dataclass(frozen=True)
class Facts:
    euid: int = 0
    #: Mount point of the cgroup v1 ``cpu`` controller, or None.
    cgroup_v1_cpu: Optional[str] = None
    #: ``/sys/fs/cgroup/cgroup.controllers`` exists: a cgroup v2 (unified) hierarchy.
    cgroup_v2: bool = False
    #: ``cpu.rt_runtime_us`` exists in the cpu controller (CONFIG_RT_GROUP_SCHED, v1).
    rt_group_sched: bool = False
    sched_rt_runtime_us: Optional[int] = None
    sched_rt_period_us: Optional[int] = None
    deadline: Optional[DeadlineProbe] = None
    cmdline: Optional[str] = None
    kernel_release: str = ""
    kernel_version: str = ""
    #: ``/sys/kernel/realtime`` says 1 (PREEMPT_RT kernels).
    kernel_realtime_flag: bool = False
    online_cpus: str = ""
    #: cpu -> ``scaling_governor``; empty when no cpufreq driver is loaded.
    governors: Dict[int, str] = field(default_factory=dict)
    #: ``/sys/devices/system/cpu/smt/control`` (on, off, forceoff, notsupported, ...).
    smt_control: Optional[str] = None
    smt_active: Optional[bool] = None
    libvirt_uri: str = ""
    libvirt_version: Optional[str] = None
    hypervisor_version: Optional[str] = None
    libvirt_error: Optional[str] = None
    hook_path: str = ""
    hook_installed: bool = False
    #: The interpreter the installed hook runs (``KAIROS_PYTHON=`` in it).
    hook_python: Optional[str] = None
    hook_python_ok: bool = False
    kvm_device: bool = False
    #: How the kairos KVM patch was detected, or None for a stock KVM.
    kvm_patch: Optional[str] = None
    tuned_installed: bool = False
    tuned_profile: Optional[str] = None
    #: The longest a SCHED_DEADLINE server can overrun its runtime (host/tick.py), and how
    #: that was found; None when not probed.
    enforcement_ns: Optional[int] = None
    enforcement_source: str = ""


@dataclass(frozen=True)
class Result:
    check: str
    status: str
    reason: str
    fix: str = ""


# --------------------------------------------------------------------------
# Helpers shared by the checks (pure).


def kernel_params(cmdline: str) -> Dict[str, str]:
    """Kernel command line -> {name: value}; words after ``--`` belong to init."""
    out: Dict[str, str] = {}
    for word in cmdline.split():
        if word == "--":
            break
        key, _sep, value = word.partition("=")
        out[key] = value
    return out


def isolcpus_parts(value: str) -> Tuple[List[str], str]:
    """``isolcpus=[flag,...,]cpulist`` -> (flags, cpulist).  No flag means ``domain``."""
    flags: List[str] = []
    parts = value.split(",")
    while parts and parts[0] in ("domain", "nohz", "managed_irq"):
        flags.append(parts.pop(0))
    return flags or ["domain"], ",".join(parts)


def _errno_name(num: Optional[int]) -> str:
    return _errno.errorcode.get(num, str(num)) if num is not None else "?"


# --------------------------------------------------------------------------
# The checks: Facts -> Result, pure.


def check_cgroup(f: Facts) -> Result:
    if f.cgroup_v1_cpu:
        return Result("cgroup", OK, f"cgroup v1: cpu controller at {f.cgroup_v1_cpu}")
    if f.cgroup_v2:
        return Result("cgroup", OK, "cgroup v2 (unified hierarchy)")
    return Result("cgroup", WARN, "no cpu cgroup controller is mounted: libvirt cannot place "
                  "vCPU threads in per-vCPU cgroups",
                  "mount the cgroup v2 hierarchy at /sys/fs/cgroup (or the v1 cpu controller)")


def check_rt_group_sched(f: Facts) -> Result:
    if f.rt_group_sched:
        return Result("rt-group-sched", OK, "cpu.rt_runtime_us exists: fifo/rr declarations "
                      "get an RT group budget per vCPU")
    if f.cgroup_v2 and not f.cgroup_v1_cpu:
        why = "cgroup v2 has no RT group scheduling (no cpu.rt_runtime_us)"
    else:
        why = "the kernel has no RT group scheduling (CONFIG_RT_GROUP_SCHED: no cpu.rt_runtime_us)"
    return Result("rt-group-sched", WARN, f"{why}: fifo/rr declarations are refused at start; "
                  "deadline declarations work",
                  "declare policy 'deadline'; for fifo/rr boot a kernel with "
                  "CONFIG_RT_GROUP_SCHED=y and the cgroup v1 cpu controller")


def check_rt_runtime(f: Facts) -> Result:
    name = "sched_rt_runtime_us"
    fix = "sysctl -w kernel.sched_rt_runtime_us=950000 (and persist it in /etc/sysctl.d/)"
    rt, period = f.sched_rt_runtime_us, f.sched_rt_period_us
    if rt is None or period is None:
        return Result(name, FAIL, "/proc/sys/kernel/sched_rt_runtime_us or sched_rt_period_us "
                      "is unreadable: no real-time scheduling in this kernel?",
                      "boot a kernel with real-time scheduling (any distribution kernel has it)")
    if rt < 0:
        return Result(name, WARN, f"-1 (period {period}us): RT throttling is off; the kernel "
                      "admits SCHED_DEADLINE up to every CPU's whole time, and a runaway RT "
                      "thread can starve the host's own work", fix)
    if rt == 0:
        return Result(name, FAIL, f"0 (period {period}us): no real-time bandwidth at all; every "
                      "SCHED_DEADLINE and fifo/rr reservation is refused", fix)
    share = rt / period
    return Result(name, OK, f"{rt}/{period}: {share:.3g} of each CPU for real-time "
                  "(SCHED_DEADLINE and RT groups together)")


def check_deadline(f: Facts) -> Result:
    name = "sched-deadline"
    p = f.deadline
    if p is None:
        return Result(name, WARN, "not probed", "run 'kairosvm check' without --no-probe")
    if p.ok:
        return Result(name, OK, f"a scratch thread was admitted to SCHED_DEADLINE "
                      f"({p.runtime_ns // 1000}us every {p.period_ns // 1000}us) and exited "
                      "under it")
    why = f"sched_setattr(SCHED_DEADLINE) on a scratch thread: {_errno_name(p.errno)}"
    if p.errno == _errno.EBUSY:
        return Result(name, WARN, f"{why}: SCHED_DEADLINE works, but no deadline bandwidth is "
                      "free right now; new real-time domains will be refused",
                      "see 'kairosvm ledger' and stop or shrink a real-time domain")
    if p.errno == _errno.EPERM and f.euid != 0:
        return Result(name, FAIL, f"{why}: not root", "run 'kairosvm check' as root")
    if p.errno == _errno.EPERM:
        return Result(name, FAIL, f"{why}: a SCHED_DEADLINE thread's CPU affinity must span its "
                      "root domain, and this process's does not",
                      "run 'kairosvm check' outside taskset/cpuset restrictions; if it still "
                      "fails, the vCPU threads will fail the same way")
    return Result(name, FAIL, f"{why} ({p.message}): this kernel cannot run SCHED_DEADLINE "
                  "threads", "boot a kernel with SCHED_DEADLINE (mainline since 3.14)")


#: At or below this the overrun is the hrtimer's slack, not a tick.
FINE_ENFORCEMENT_NS = 200_000


def check_enforcement(f: Facts) -> Result:
    """SCHED_DEADLINE budget enforcement: at the tick, or at the hrtick (HRTICK_DL)."""
    name = "dl-enforcement"
    g = f.enforcement_ns
    if g is None:
        return Result(name, WARN, "not probed", "run 'kairosvm check' without --no-probe")
    if g <= FINE_ENFORCEMENT_NS:
        return Result(name, OK, f"budgets are enforced within {g // 1000}us "
                      f"({f.enforcement_source})")
    return Result(
        name, WARN,
        f"SCHED_DEADLINE notices an exhausted runtime only at the next tick: a vCPU server "
        f"can overrun by up to {g / 1e6:g} ms and then skips periods to repay it "
        f"({f.enforcement_source}). kairos sizes and admits servers for that overrun, which "
        f"costs bandwidth and leaves guest tasks due within about two ticks without any "
        f"guarantee",
        "switch HRTICK_DL on (echo HRTICK_DL > /sys/kernel/debug/sched/features; needs "
        "debugfs and no kernel lockdown; not persistent, so repeat it at boot), or boot a "
        "kernel with CONFIG_HZ=1000; then remove /run/kairos/enforcement.json (the figure "
        "is kept per boot) and restart the real-time domains")


def check_preempt(f: Facts) -> Result:
    if f.kernel_realtime_flag or "PREEMPT_RT" in f.kernel_version:
        return Result("kernel-preempt", OK, f"PREEMPT_RT kernel {f.kernel_release}")
    return Result("kernel-preempt", WARN, f"kernel {f.kernel_release} is not PREEMPT_RT: "
                  "non-preemptible kernel sections can delay a vCPU past its deadline",
                  "boot a PREEMPT_RT kernel (Debian: linux-image-rt-amd64)")


def _cmdline_check(name: str, why_missing: str, fix: str) -> Callable[[Facts], Result]:
    def check(f: Facts) -> Result:
        if f.cmdline is None:
            return Result(name, WARN, "/proc/cmdline is unreadable", fix)
        params = kernel_params(f.cmdline)
        if name not in params:
            return Result(name, WARN, f"not on the kernel command line: {why_missing}", fix)
        value = params[name]
        if name == "isolcpus":
            flags, cpus = isolcpus_parts(value)
            if "domain" in flags:
                return Result(name, WARN, f"isolcpus={value} takes CPUs {cpus} out of the "
                              "scheduler's domains: kairos runs SCHED_DEADLINE vCPUs unpinned, "
                              "so they are never balanced onto those CPUs (and pinned "
                              "SCHED_DEADLINE vCPUs are refused)",
                              f"use isolcpus=managed_irq,{cpus} with nohz_full and rcu_nocbs, "
                              "or give the RT CPUs an exclusive cpuset partition")
        return Result(name, OK, f"{name}={value}")
    check.__name__ = f"check_{name}"
    check.__doc__ = f"``{name}=`` on the kernel command line."
    return check


check_isolcpus = _cmdline_check(
    "isolcpus", "IRQs and kernel housekeeping run on every CPU, next to the RT vCPUs",
    "boot with isolcpus=managed_irq,<RT CPUs>")
check_nohz_full = _cmdline_check(
    "nohz_full", "the scheduler tick interrupts RT vCPUs every jiffy",
    "boot with nohz_full=<RT CPUs>")
check_rcu_nocbs = _cmdline_check(
    "rcu_nocbs", "RCU callbacks run on the RT CPUs",
    "boot with rcu_nocbs=<RT CPUs>")


def check_governor(f: Facts) -> Result:
    name = "cpufreq-governor"
    if not f.governors:
        return Result(name, OK, "no cpufreq driver: the OS does not scale CPU frequency here")
    slow = {c: g for c, g in sorted(f.governors.items()) if g != "performance"}
    if not slow:
        return Result(name, OK, f"performance on all {len(f.governors)} CPUs")
    listed = ", ".join(f"cpu{c} {g}" for c, g in list(slow.items())[:8])
    more = f" (+{len(slow) - 8} more)" if len(slow) > 8 else ""
    return Result(name, WARN, f"{listed}{more}: a reservation buys less work at a lower "
                  "frequency, and frequency changes add latency",
                  "cpupower frequency-set -g performance (tuned realtime-virtual-host does it)")


def check_smt(f: Facts) -> Result:
    c = f.smt_control
    if c is None:
        return Result("smt", OK, "no SMT control in sysfs: no hardware threads to share")
    if c in ("notsupported", "notimplemented"):
        return Result("smt", OK, f"{c}: the CPUs have no SMT")
    if c in ("off", "forceoff") or not f.smt_active:
        return Result("smt", OK, f"SMT is {c}" + ("" if f.smt_active is None else
                                                   ", no sibling active"))
    return Result("smt", WARN, "SMT is on: hyperthread siblings share execution units, so a "
                  "sibling's load slows an RT vCPU within its reservation",
                  "echo off > /sys/devices/system/cpu/smt/control (or boot with nosmt), or keep "
                  "the RT CPUs' siblings idle")


def check_libvirt(f: Facts) -> Result:
    if f.libvirt_error is not None:
        return Result("libvirt", FAIL, f"{f.libvirt_uri}: {f.libvirt_error}",
                      "start libvirtd (systemctl start libvirtd, or scripts/setup-host)")
    hv = f" (hypervisor {f.hypervisor_version})" if f.hypervisor_version else ""
    return Result("libvirt", OK, f"libvirt {f.libvirt_version} at {f.libvirt_uri}{hv}")


def check_hook(f: Facts) -> Result:
    if not f.hook_installed:
        return Result("hook", FAIL, f"{f.hook_path} is not installed: 'virsh start' would "
                      "neither admit nor enforce any declaration", "kairosvm install-hook")
    if not f.hook_python_ok:
        return Result("hook", FAIL, f"{f.hook_path} runs {f.hook_python or '(no interpreter)'}, "
                      "which is not an executable: every real-time domain would fail to start",
                      "run 'kairosvm install-hook' from the installation you want to use")
    return Result("hook", OK, f"{f.hook_path} (python {f.hook_python})")


def check_kvm(f: Facts) -> Result:
    if not f.kvm_device:
        return Result("kvm", WARN, "no /dev/kvm: domains run under TCG only, and the kvm-ud "
                      "introspection backend is unavailable",
                      "enable virtualization in the firmware and load kvm_intel or kvm_amd")
    if f.kvm_patch is None:
        return Result("kvm", WARN, "stock KVM: introspection uses the gdbstub fallback",
                      "build and load the kairos KVM patch (kmod/) for the kvm-ud backend")
    return Result("kvm", OK, f"kairos KVM patch loaded ({f.kvm_patch}): kvm-ud introspection")


def check_tuned(f: Facts) -> Optional[Result]:
    """Only where tuned is installed: its absence is no problem."""
    if not f.tuned_installed:
        return None
    if f.tuned_profile and TUNED_PROFILE in f.tuned_profile.split():
        return Result("tuned", OK, f"active profile: {f.tuned_profile}")
    return Result("tuned", WARN, f"active profile: {f.tuned_profile or 'none'}; "
                  f"{TUNED_PROFILE} isolates CPUs and tunes the host for RT guests",
                  f"tuned-adm profile {TUNED_PROFILE} (package tuned-profiles-nfv-host or "
                  "tuned-profiles-realtime), then reboot")


CHECKS: List[Callable[[Facts], Optional[Result]]] = [
    check_libvirt, check_hook, check_cgroup, check_rt_group_sched, check_rt_runtime,
    check_deadline, check_enforcement, check_preempt, check_isolcpus, check_nohz_full, check_rcu_nocbs,
    check_governor, check_smt, check_kvm, check_tuned,
]


def evaluate(facts: Facts) -> List[Result]:
    return [r for r in (c(facts) for c in CHECKS) if r is not None]


def exit_code(results: List[Result]) -> int:
    return 1 if any(r.status == FAIL for r in results) else 0


def summary(results: List[Result]) -> Dict[str, int]:
    return {s: sum(1 for r in results if r.status == s) for s in (OK, WARN, FAIL)}


def render_text(results: List[Result]) -> str:
    width = max((len(r.check) for r in results), default=10) + 2
    lines = []
    for r in results:
        lines.append(f"{r.status:<5} {r.check:<{width}}{r.reason}")
        if r.fix and r.status != OK:
            lines.append(f"{'':<5} {'':<{width}}fix: {r.fix}")
    s = summary(results)
    lines.append(f"{s[OK]} OK, {s[WARN]} WARN, {s[FAIL]} FAIL")
    return "\n".join(lines)


def to_json(facts: Facts, results: List[Result]) -> dict:
    return {"results": [dataclasses.asdict(r) for r in results],
            "summary": summary(results),
            "facts": dataclasses.asdict(facts)}


# --------------------------------------------------------------------------
# The gatherer: thin reads of the host, no decisions.

#: A module parameter the kairos KVM patch may export (kmod/ decides).
KVM_PATCH_PARAM = "/sys/module/kvm/parameters/kairos_ud"
#: ``KVM_CHECK_EXTENSION`` number of the kairos #UD trap capability; None until
#: kmod/'s uAPI header defines one.
KVM_CAP_KAIROS_UD: Optional[int] = None
KVM_CHECK_EXTENSION = 0xAE03  # _IO(KVMIO, 0x03)


def probe_kvm_patch(param: str = KVM_PATCH_PARAM, dev: str = "/dev/kvm",
                    cap: Optional[int] = None) -> Optional[str]:
    """How the kairos KVM patch shows itself, or None for a stock KVM.

    Kept small on purpose: the KVM-patch work owns the marker and adjusts it.
    """
    cap = KVM_CAP_KAIROS_UD if cap is None else cap
    if os.path.exists(param):
        value = read_text(param)
        return f"{param} = {value.strip() if value else '?'}"
    if cap is None:
        return None
    try:
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        got = fcntl.ioctl(fd, KVM_CHECK_EXTENSION, cap)
    except OSError:  # ENOTTY: not a KVM device; EINVAL: unknown capability
        return None
    finally:
        os.close(fd)
    return f"{dev}: KVM_CHECK_EXTENSION({cap}) = {got}" if got > 0 else None


def read_text(path: str) -> Optional[str]:
    try:
        with open(path) as fh:
            return fh.read()
    except OSError:
        return None


def _read_int(path: str) -> Optional[int]:
    text = read_text(path)
    try:
        return int(text.strip()) if text is not None else None
    except ValueError:
        return None


def probe_deadline(runtime_ns: int = 100_000, period_ns: int = 10_000_000) -> DeadlineProbe:
    """Admit a scratch thread to SCHED_DEADLINE; it exits under it.

    The thread sets itself (it is running, not sleeping) and then exits, which
    returns the bandwidth at its 0-lag time; switching a sleeping DEADLINE
    thread back to SCHED_OTHER would leak it (DESIGN.md section 2).
    """
    from .errors import HostError
    from .host import dlprobe, sched
    out: Dict[str, object] = {}

    def body() -> None:
        out["tid"] = threading.get_native_id()
        try:
            sched.set_deadline(threading.get_native_id(), runtime_ns, period_ns, period_ns)
        except HostError as exc:
            out["error"] = exc

    t = threading.Thread(target=body, name="kairos-check-dl", daemon=True)
    t.start()
    t.join(5)
    dlprobe.wait_threads_gone([int(out.get("tid", 0))])
    exc = out.get("error")
    if exc is None:
        time.sleep(2 * period_ns / 1e9)  # let the exited thread's 0-lag timer fire
        return DeadlineProbe(ok=True, runtime_ns=runtime_ns, period_ns=period_ns)
    assert isinstance(exc, HostError)
    return DeadlineProbe(ok=False, errno=exc.errno, message=exc.why, runtime_ns=runtime_ns,
                         period_ns=period_ns)


def _libvirt_facts() -> Dict[str, object]:
    from . import virt
    from .errors import KairosError
    out: Dict[str, object] = {"libvirt_uri": virt.uri()}
    try:
        conn = virt.connect()
    except KairosError as exc:
        out["libvirt_error"] = str(exc)
        return out
    try:
        out["libvirt_version"] = _version(conn.getLibVersion())
        out["hypervisor_version"] = f"{conn.getType()} {_version(conn.getVersion())}"
    finally:
        conn.close()
    return out


def _version(n: int) -> str:
    return f"{n // 1_000_000}.{n // 1000 % 1000}.{n % 1000}"


def _hook_python(text: Optional[str]) -> Optional[str]:
    for line in (text or "").splitlines():
        if line.startswith("KAIROS_PYTHON="):
            value = line.split("=", 1)[1].strip().strip("'\"")
            return None if value.startswith("${") else value
    return None


def _governors(base: str = "/sys/devices/system/cpu") -> Dict[int, str]:
    out: Dict[int, str] = {}
    for name in os.listdir(base):
        if name.startswith("cpu") and name[3:].isdigit():
            gov = read_text(os.path.join(base, name, "cpufreq", "scaling_governor"))
            if gov is not None:
                out[int(name[3:])] = gov.strip()
    return dict(sorted(out.items()))


def _enforcement_facts(probe: bool) -> Dict[str, object]:
    from . import config
    from .errors import KairosError
    from .host import tick
    try:
        e = tick.enforcement(config.load(), measure=probe)
    except (KairosError, OSError):
        return {}
    return {"enforcement_ns": e.granularity_ns, "enforcement_source": e.source}


def gather(probe: bool = True) -> Facts:
    """Read the host.  ``probe`` runs the SCHED_DEADLINE scratch-thread probe."""
    from . import install
    from .host import cgroup
    mount = cgroup.cpu_v1_mount()
    hook_text = read_text(install.hook_path())
    hook_python = _hook_python(hook_text)
    smt_active = _read_int("/sys/devices/system/cpu/smt/active")
    tuned_profile = read_text("/etc/tuned/active_profile")
    facts = Facts(
        euid=os.geteuid(),
        cgroup_v1_cpu=mount,
        cgroup_v2=os.path.exists("/sys/fs/cgroup/cgroup.controllers"),
        rt_group_sched=cgroup.rt_group_sched_available(),
        sched_rt_runtime_us=_read_int("/proc/sys/kernel/sched_rt_runtime_us"),
        sched_rt_period_us=_read_int("/proc/sys/kernel/sched_rt_period_us"),
        deadline=probe_deadline() if probe else None,
        **_enforcement_facts(probe),  # type: ignore[arg-type]
        cmdline=(read_text("/proc/cmdline") or "").strip() or None,
        kernel_release=os.uname().release,
        kernel_version=os.uname().version,
        kernel_realtime_flag=_read_int("/sys/kernel/realtime") == 1,
        online_cpus=(read_text("/sys/devices/system/cpu/online") or "").strip(),
        governors=_governors(),
        smt_control=(read_text("/sys/devices/system/cpu/smt/control") or "").strip() or None,
        smt_active=None if smt_active is None else bool(smt_active),
        hook_path=install.hook_path(),
        hook_installed=install.installed(),
        hook_python=hook_python,
        hook_python_ok=bool(hook_python) and os.access(hook_python, os.X_OK),
        kvm_device=os.path.exists("/dev/kvm"),
        kvm_patch=probe_kvm_patch(),
        tuned_installed=bool(shutil.which("tuned-adm") or shutil.which("tuned")),
        tuned_profile=tuned_profile.strip() if tuned_profile else None,
        **_libvirt_facts(),  # type: ignore[arg-type]
    )
    return facts
