"""The host's SCHED_DEADLINE enforcement granularity: the tick, or HRTICK_DL.

Without the ``HRTICK_DL`` scheduler feature the kernel sees a server's
exhausted runtime only at the next tick, so a greedy vCPU overruns by up to
1/CONFIG_HZ (4 ms at HZ=250; DESIGN.md §2b).  The analysis models that as
:class:`kairos_libvirt.analysis.enforcement.Enforcement`; this module finds
the number on the running host:

* ``CONFIG_HZ`` from ``/proc/config.gz`` or ``/boot/config-$(uname -r)``;
* ``HRTICK_DL`` from ``/sys/kernel/debug/sched/features`` (unreadable under
  lockdown: then unknown);
* a short probe: one greedy SCHED_DEADLINE thread with a small runtime, whose
  longest on-CPU chunk minus its runtime is the overrun the kernel allowed.
  Tick enforcement shows overruns of up to a tick; HRTICK_DL tens of µs.

The result is cached per boot under the run directory, like the ledger's
probed deadline capacity.
"""
from __future__ import annotations

import gzip
import json
import os
import threading
import time
from typing import TYPE_CHECKING, List, Optional, Tuple

from ..analysis.enforcement import Enforcement, HRTICK_SLACK_NS, tick_enforcement
from ..errors import HostError, KairosError
from . import dlprobe, proc, sched

if TYPE_CHECKING:  # pragma: no cover
    from ..config import HostConfig

SCHED_FEATURES = "/sys/kernel/debug/sched/features"
CACHE = "enforcement.json"
#: The probe: 2 ms every 20.3 ms (0.1 CPU) for 0.5 s.  After every throttle
#: the next chunk is at least Π − (R + tick) ≈ 14 ms away, so gaps shorter
#: than ``_SPLIT_NS`` never join two chunks; the debt of an overrun (< a tick)
#: is repaid within two periods, so the probe sees a dozen chunks; and a
#: period that is no multiple of any tick makes the chunks start at ever
#: different points of the tick, so their overruns spread over [0, tick)
#: (with a 2 ms period and a 4 ms tick a run saw only two values).
PROBE_RUNTIME_NS = 2_000_000
PROBE_PERIOD_NS = 20_300_000
PROBE_SECONDS = 0.5
#: A step of the spin loop longer than this is time off the CPU, not ours.
_STEP_NS = 50_000
#: An off-CPU step longer than this ends a chunk (a throttle); shorter ones
#: (an interrupt, another deadline thread's preemption) do not split it.
_SPLIT_NS = 2_000_000
#: The longest tick of any CONFIG_HZ choice (HZ=100): assumed when HZ is unknown.
_SLOWEST_HZ = 100


def parse_config_hz(text: str) -> Optional[int]:
    """``CONFIG_HZ=250`` from a kernel config's text; None if absent or not a number."""
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key == "CONFIG_HZ":
            try:
                hz = int(value.strip())
            except ValueError:
                return None
            return hz if hz > 0 else None
    return None


def parse_sched_features(text: str) -> Optional[bool]:
    """True/False for ``HRTICK_DL``/``NO_HRTICK_DL`` in sched_features; None if neither."""
    words = text.split()
    if "HRTICK_DL" in words:
        return True
    if "NO_HRTICK_DL" in words:
        return False
    return None


def read_hz(paths: Optional[List[str]] = None) -> Optional[int]:
    """CONFIG_HZ of the running kernel, or None when no config is readable."""
    if paths is None:
        paths = ["/proc/config.gz", f"/boot/config-{os.uname().release}"]
    for path in paths:
        try:
            if path.endswith(".gz"):
                with gzip.open(path, "rt", errors="replace") as f:
                    text = f.read()
            else:
                with open(path, errors="replace") as f:
                    text = f.read()
        except (OSError, EOFError):
            continue
        hz = parse_config_hz(text)
        if hz is not None:
            return hz
    return None


def hrtick_dl(path: str = SCHED_FEATURES) -> Optional[bool]:
    """Is HRTICK_DL on?  None when debugfs is not there or lockdown refuses it."""
    try:
        with open(path) as f:
            return parse_sched_features(f.read())
    except OSError:
        return None


def chunks_from_steps(steps: List[Tuple[int, int]]) -> List[int]:
    """On-CPU chunks (ns) from (step start, step length) pairs of a spin loop.

    Steps up to ``_STEP_NS`` are the thread's own time (the kernel charges
    interrupts to it too); longer ones are off the CPU, and those longer
    than ``_SPLIT_NS`` end a chunk.
    """
    out, cur = [], 0
    for _, d in steps:
        if d <= _STEP_NS:
            cur += d
        elif d > _SPLIT_NS:
            if cur:
                out.append(cur)
            cur = 0
    if cur:
        out.append(cur)
    return out


def measure_overrun_ns(runtime_ns: int = PROBE_RUNTIME_NS, period_ns: int = PROBE_PERIOD_NS,
                       seconds: float = PROBE_SECONDS) -> Tuple[int, int]:
    """(longest on-CPU chunk − runtime, number of chunks) of a greedy deadline thread.

    The thread puts itself under SCHED_DEADLINE, spins, and *exits while still
    SCHED_DEADLINE* (switching a sleeping one back would leak its bandwidth).
    The last chunk is dropped (the end of the spin cuts it), and the first
    (the thread wakes into it mid-period).  Raises HostError (EBUSY when the kernel has no bandwidth left).
    """
    out: dict = {}
    tids: List[int] = []

    def greedy() -> None:
        tids.append(threading.get_native_id())
        try:
            sched.set_deadline(0, runtime_ns, period_ns, period_ns)
        except HostError as exc:
            out["error"] = exc
            return
        # Sleep once: the chunk that straddles the switch into SCHED_DEADLINE
        # is not enforced like the rest (measured: two ticks); a wake-up
        # starts a clean period.
        time.sleep(2 * period_ns / 1e9)
        now = time.monotonic_ns
        t0 = last = now()
        end = t0 + int(seconds * 1e9)
        deltas = []
        append = deltas.append
        while last < end:
            t = now()
            append(t - last)
            last = t
        out["steps"] = deltas

    th = threading.Thread(target=greedy, name="kairos-tickprobe", daemon=True)
    th.start()
    th.join()
    dlprobe.wait_threads_gone(tids)
    time.sleep(2 * period_ns / 1e9)  # the exited thread's 0-lag timer returns its bandwidth
    if "error" in out:
        raise out["error"]
    chunks = chunks_from_steps([(0, d) for d in out["steps"]])[1:-1]
    if not chunks:
        raise HostError("SCHED_DEADLINE probe", f"no whole on-CPU chunk in {seconds} s",
                        fix="run it on a less loaded host")
    return max(chunks) - runtime_ns, len(chunks)


def decide(hz: Optional[int], hrtick: Optional[bool],
           measured: Optional[Tuple[int, int]]) -> Enforcement:
    """The granularity from what could be read and measured (pure).

    A measured overrun never lowers the granularity below what the config
    says, except that an overrun clearly below a tick (under a quarter, over
    several chunks) means HRTICK_DL is on even where debugfs is unreadable.
    A measured overrun above the config's figure raises it.
    """
    base_hz = hz if hz is not None else _SLOWEST_HZ
    tick = -(-1_000_000_000 // base_hz)
    if hrtick is None and measured is not None and measured[1] >= 3 \
            and measured[0] < tick // 4:
        g = max(HRTICK_SLACK_NS, measured[0])
        e = Enforcement(g, f"HRTICK_DL on (measured: overrun {measured[0] // 1000} us over "
                           f"{measured[1]} chunks, a tick is {tick // 1000} us)")
    else:
        e = tick_enforcement(base_hz, hrtick)
        if hz is None:
            e = Enforcement(e.granularity_ns, f"CONFIG_HZ unknown, assumed {_SLOWEST_HZ} "
                                              f"(the longest tick); {e.source}")
    if measured is not None and measured[0] > e.granularity_ns:
        e = Enforcement(measured[0], f"{e.source}; raised to the measured overrun "
                                     f"{measured[0] // 1000} us")
    elif measured is not None and "measured" not in e.source:
        e = Enforcement(e.granularity_ns, f"{e.source}; measured overrun "
                                          f"{measured[0] // 1000} us over {measured[1]} chunks")
    return e


def enforcement(cfg: Optional["HostConfig"] = None, *, measure: bool = True) -> Enforcement:
    """The running host's enforcement granularity, cached per boot in ``cfg.run_dir``
    (``enforcement_granularity`` in kairos.yaml overrides it: one rule for the
    ledger, the agents and bench/supply).

    ``measure`` False skips the probe (no deadline thread is created); the
    probe is also skipped when the features file says on or off.  A probe the
    kernel refuses (EBUSY: bandwidth used up) is not an error here: the
    config's figure stands, and the result is not cached.
    """
    if cfg is None:
        from ..config import load
        cfg = load()
    if cfg.enforcement_ns is not None:       # the admin's figure wins (kairos.yaml)
        return Enforcement(cfg.enforcement_ns, "enforcement_granularity in kairos.yaml")
    path = os.path.join(cfg.run_dir, CACHE)
    key = {"boot_id": proc.boot_id()}
    try:
        with open(path) as f:
            cached = json.load(f)
        if cached.get("key") == key and (cached.get("measured") or not measure):
            return Enforcement(int(cached["granularity_ns"]), str(cached["source"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    hz, hr = read_hz(), hrtick_dl()
    measured = None
    if measure and hr is None:
        try:
            measured = measure_overrun_ns()
        except KairosError:
            measured = None
    e = decide(hz, hr, measured)
    if measured is not None or hr is not None or not measure:
        try:
            os.makedirs(cfg.run_dir, mode=0o755, exist_ok=True)
            with open(path + ".tmp", "w") as f:
                json.dump({"key": key, "granularity_ns": e.granularity_ns, "source": e.source,
                           "measured": measured is not None or hr is not None,
                           "hz": hz, "hrtick_dl": hr,
                           "overrun_ns": measured[0] if measured else None}, f)
            os.replace(path + ".tmp", path)
        except OSError:
            pass  # a read-only run dir costs a re-probe, nothing else
    return e
