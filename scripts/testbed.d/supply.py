#!/usr/bin/env python3
"""Supply phase of the nested testbed: bench/supply inside L1, HRTICK_DL off, then on.

The host kernel cannot switch HRTICK_DL on (lockdown), so issue 12's delivered-supply
check runs in L1 (Debian 6.1 under TCG, no lockdown) twice, each time with
``bench/supply --table --generated --quick``:

* **off**: ``NO_HRTICK_DL`` written to /sys/kernel/debug/sched/features (the kernel's
  default): budgets enforced at the tick;
* **on**: ``HRTICK_DL``: budgets enforced by the hrtimer.

The feature is read back (``host/tick.hrtick_dl``) and recorded before each run.  The
granularity g is not given to the bench: bench/supply asks ``host/tick.enforcement`` as
it does on any host, with a fresh run directory per mode (a ``KAIROS_CONFIG`` naming
only ``run_dir``), so tick.py decides again from what L1 really has: CONFIG_HZ from
``/boot/config-$(uname -r)`` (L1 has neither that nor /proc/config.gz, so the guest
build's copy of the same kernel's config is put there when the versions match; without
it tick.py assumes HZ=100, and that is recorded too) and the feature.  Beside
it, this phase runs tick.py's own overrun probe (``measure_overrun_ns``) and records
what ``tick.decide`` makes of HZ + feature + measurement: under TCG the measured
overrun says how far the decided g is from what L1's timers really deliver.

Three ways to call it (scripts/testbed does all three with ``--supply``/``--only-supply``):

    supply.py --prebuild OUT     on the host, before L1: compile greedy.c with bench/supply's
                                 own rule (L1 then reuses the binary: no gcc under TCG)
                                 and snapshot the host's load and steal
    supply.py --out /kout --guest DIR     in L1: the two runs; OUT/supply-off.json and
                                 OUT/supply-on.json are bench/supply's JSONs,
                                 OUT/supply-{off,on}.txt its output, OUT/supply.json this
                                 phase's record (tests/nested/test_supply_in_l1.py)
    supply.py --summary OUT      on the host, after L1: print the summary; exit 1 if the
                                 phase did not finish or reported an error

Violations are measured figures: printed and recorded, never an error of the phase.
"""
from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from typing import Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
BENCH = os.path.join(REPO, "bench", "supply")
MODES = (("off", "NO_HRTICK_DL"), ("on", "HRTICK_DL"))
#: One mode's bench run (3 s per set; a TCG L1 took 55-68 s, docs/supply.md).
BENCH_TIMEOUT_S = 420
T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"L1-SUPPLY [{time.monotonic() - T0:7.2f}] {msg}", flush=True)


def load_bench():
    """bench/supply as a module (it has no .py suffix): its build rule and nothing else."""
    loader = importlib.machinery.SourceFileLoader("bench_supply", BENCH)
    spec = importlib.util.spec_from_loader("bench_supply", loader)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_supply"] = mod  # dataclasses look their module up there
    loader.exec_module(mod)
    return mod


def host_snapshot() -> dict:
    """Load average and the steal of all CPUs (/proc/stat, ms) of the machine this runs on."""
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return {"t": time.time(), "loadavg": [float(x) for x in load],
            "steal_ms": int(fields[8]) * 1000 // os.sysconf("SC_CLK_TCK")}


# -- host side ---------------------------------------------------------------
def prebuild(out: str) -> int:
    exe = load_bench().build_greedy()
    snap = host_snapshot()
    with open(os.path.join(out, "supply-host.json"), "w") as f:
        json.dump({"greedy": exe, "greedy_mtime": os.stat(exe).st_mtime, "before": snap}, f, indent=1)
    print(f"testbed: supply: greedy prebuilt on the host: {exe}", file=sys.stderr)
    return 0


def ms(ns: Optional[int]) -> str:
    return "-" if ns is None else f"{ns / 1e6:.2f}"


def set_rows(report: dict) -> List[dict]:
    """Per set: the host test's verdict, violations vs the aware model, worst blackout vs bound."""
    rows = []
    for s in report.get("sets", []):
        servers = s.get("servers", [])
        worst = max(servers, key=lambda r: r["longest_blackout_ns"] / max(1, r["aware_blackout_ns"]),
                    default=None)
        rows.append({
            "label": s["label"], "accepted": s["accepted"], "kernel_refused": s["kernel_refused"],
            "servers": len(servers),
            "violating_servers": sum(1 for r in servers if r["violations_aware"]["points"]),
            "points_below_aware": sum(r["violations_aware"]["points"] for r in servers),
            "windows_below_aware": sum(r["violations_aware"]["windows"] for r in servers),
            "worst_shortfall_aware_ns": max((r["violations_aware"]["worst_ns"] for r in servers),
                                            default=None),
            "points_below_edp": sum(r["violations_edp"]["points"] for r in servers),
            "worst_server": worst and f"{worst['name']} {worst['server']}",
            "worst_blackout_ns": worst and worst["longest_blackout_ns"],
            "worst_aware_bound_ns": worst and worst["aware_blackout_ns"],
            "worst_edp_bound_ns": worst and worst["edp_blackout_ns"],
        })
    return rows


def summary(out: str) -> int:
    path = os.path.join(out, "supply.json")
    try:
        with open(path) as f:
            r = json.load(f)
    except (OSError, ValueError) as exc:
        print(f"testbed: supply: no phase record ({exc}); see {out}/l1-console.log", file=sys.stderr)
        return 1
    host: Dict = {}
    try:
        with open(os.path.join(out, "supply-host.json")) as f:
            host = json.load(f)
        host["after"] = host_snapshot()
        with open(os.path.join(out, "supply-host.json"), "w") as f:
            json.dump(host, f, indent=1)
    except (OSError, ValueError):
        pass
    p = lambda *a: print("testbed: supply:", *a, file=sys.stderr)  # noqa: E731
    p(f"L1 kernel {r.get('kernel')}, {r.get('cpus')} CPUs, clocksource {r.get('clocksource')}, "
      f"CONFIG_HZ {r.get('hz')} ({r.get('kconfig')}); greedy {r.get('greedy')}; phase {r.get('t_s')} s")
    if host.get("before") and host.get("after"):
        b, a = host["before"], host["after"]
        p(f"host during L1: steal {a['steal_ms'] - b['steal_ms']} ms (all CPUs) over "
          f"{a['t'] - b['t']:.0f} s, load {b['loadavg'][0]} -> {a['loadavg'][0]}")
    for m in r.get("modes", []):
        e, d = m.get("enforcement") or {}, m.get("decided_with_probe") or {}
        p(f"[{m['mode']}] HRTICK_DL read back {m.get('hrtick_dl')}; bench g = "
          f"{ms(e.get('granularity_ns'))} ms ({e.get('source')}); tick.py probe: overrun "
          f"{ms(m.get('probe_overrun_ns'))} ms over {m.get('probe_chunks')} chunks -> "
          f"{ms(d.get('granularity_ns'))} ms; bench {m.get('bench_s')} s, exit {m.get('bench_rc')}")
        for s in m.get("sets", []):
            verdict = {True: "accepted", False: "refused", None: "n/a"}[s["accepted"]]
            if s["kernel_refused"]:
                p(f"[{m['mode']}]   {s['label']}: host test {verdict}; kernel refused: {s['kernel_refused']}")
                continue
            p(f"[{m['mode']}]   {s['label']}: host test {verdict}; below aware model "
              f"{s['points_below_aware']} points / {s['windows_below_aware']} windows "
              f"({s['violating_servers']}/{s['servers']} servers), below plain EDP "
              f"{s['points_below_edp']}; worst blackout {ms(s['worst_blackout_ns'])} ms vs aware "
              f"bound {ms(s['worst_aware_bound_ns'])} (EDP {ms(s['worst_edp_bound_ns'])}) "
              f"[{s['worst_server']}]")
        sm = m.get("summary") or {}
        if sm:
            p(f"[{m['mode']}] accepted sets {sm.get('accepted_sets')}, points below the aware "
              f"model {sm.get('accepted_points_below_aware')}; other sets {sm.get('other_sets')}, "
              f"points below EDP {sm.get('other_points_below_edp')}")
    for e in r.get("errors", []):
        p("error:", e)
    return 1 if r.get("errors") else 0


# -- L1 side -------------------------------------------------------------------
def ensure_kconfig(guest: Optional[str]) -> str:
    """Make CONFIG_HZ readable for tick.py: the guest build's config of this very kernel."""
    from kairos_libvirt.host import tick
    rel = os.uname().release
    if tick.read_hz() is not None:
        return "the kernel's own /proc/config.gz or /boot config"
    if not guest:
        return "none (no --guest): tick.py assumes the longest tick"
    try:
        with open(os.path.join(guest, "manifest.json")) as f:
            kernel = json.load(f)["kernel"]
    except (OSError, ValueError, KeyError) as exc:
        return f"none ({guest}/manifest.json: {exc}): tick.py assumes the longest tick"
    src = os.path.join(guest, "config")
    if kernel != rel or not os.path.exists(src):
        return f"none (guest build has {kernel}, L1 runs {rel}): tick.py assumes the longest tick"
    os.makedirs("/boot", exist_ok=True)  # the overlay's tmpfs upper layer: L1 only
    shutil.copy(src, f"/boot/config-{rel}")
    return f"{src} (guest/build's copy of linux-image-{kernel}'s config), as /boot/config-{rel}"


def set_feature(word: str) -> Optional[bool]:
    from kairos_libvirt.host import tick
    if not os.path.exists(tick.SCHED_FEATURES):
        subprocess.run(["mount", "-t", "debugfs", "none", "/sys/kernel/debug"], capture_output=True)
    with open(tick.SCHED_FEATURES, "w") as f:
        f.write(word)
    return tick.hrtick_dl()


def run_mode(out: str, mode: str, word: str, hz: Optional[int], r: dict) -> dict:
    from kairos_libvirt.config import load
    from kairos_libvirt.host import tick
    m: dict = {"mode": mode, "wrote": word}
    r["modes"].append(m)
    m["hrtick_dl"] = set_feature(word)
    log(f"[{mode}] wrote {word}; HRTICK_DL read back {m['hrtick_dl']}")
    if m["hrtick_dl"] is not (mode == "on"):
        raise RuntimeError(f"[{mode}] HRTICK_DL read back {m['hrtick_dl']} after writing {word}")
    # A fresh run directory: tick.py decides again (its cache is per boot, not per feature).
    base = f"/tmp/kt-supply-{mode}"
    os.makedirs(os.path.join(base, "run"), exist_ok=True)
    cfgp = os.path.join(base, "kairos.yaml")
    with open(cfgp, "w") as f:
        f.write(f"run_dir: {base}/run\n")
    env = dict(os.environ, KAIROS_CONFIG=cfgp)
    os.environ["KAIROS_CONFIG"] = cfgp
    e = tick.enforcement(load(cfgp))
    m["enforcement"] = {"granularity_ns": e.granularity_ns, "source": e.source}
    try:
        overrun, chunks = tick.measure_overrun_ns()
        m["probe_overrun_ns"], m["probe_chunks"] = overrun, chunks
        d = tick.decide(hz, m["hrtick_dl"], (overrun, chunks))
        m["decided_with_probe"] = {"granularity_ns": d.granularity_ns, "source": d.source}
    except Exception as exc:  # noqa: BLE001 - a refused probe is a figure, not the phase's failure
        m["probe_error"] = f"{type(exc).__name__}: {exc}"
    log(f"[{mode}] tick.py: g {e.granularity_ns} ns ({e.source}); probe {m.get('probe_overrun_ns')} ns "
        f"over {m.get('probe_chunks')} chunks {m.get('probe_error', '')}")
    jpath = os.path.join(out, f"supply-{mode}.json")
    cmd = [sys.executable, BENCH, "--table", "--generated", "--quick", "--no-png", "--json", jpath]
    m["command"] = " ".join(cmd[1:])
    a = time.monotonic()
    with open(os.path.join(out, f"supply-{mode}.txt"), "w") as txt:
        try:
            p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=txt, stderr=subprocess.STDOUT,
                               env=env, timeout=BENCH_TIMEOUT_S, cwd=REPO)
            m["bench_rc"] = p.returncode
        except subprocess.TimeoutExpired:
            m["bench_rc"] = "timeout"
    m["bench_s"] = round(time.monotonic() - a, 1)
    log(f"[{mode}] bench/supply exit {m['bench_rc']} after {m['bench_s']} s")
    if m["bench_rc"] != 0:
        raise RuntimeError(f"[{mode}] bench/supply exit {m['bench_rc']} (see supply-{mode}.txt)")
    with open(jpath) as f:
        report = json.load(f)
    m["bench_enforcement"] = report["enforcement"]
    if report["enforcement"]["granularity_ns"] != e.granularity_ns:
        raise RuntimeError(f"[{mode}] bench/supply used g = {report['enforcement']} while tick.py "
                           f"decided {m['enforcement']}")
    m["sets"] = set_rows(report)
    m["summary"] = report.get("summary")
    m["free_before"], m["free_after"] = report.get("free_before"), report.get("free_after")
    return m


def main_l1(out: str, guest: Optional[str]) -> int:
    from kairos_libvirt.host import proc, tick
    r: dict = {"errors": [], "modes": [], "kernel": os.uname().release}
    try:
        r["cpus"] = len(proc.online_cpus())
        # What L1's clocks are: greedy.c reads CLOCK_MONOTONIC at every step (vDSO with the
        # TSC; a syscall and an emulated MMIO read with the HPET), and the kernel charges
        # runtime on sched_clock.
        with open("/sys/devices/system/clocksource/clocksource0/current_clocksource") as f:
            r["clocksource"] = f.read().strip()
        with open("/proc/cmdline") as f:
            r["cmdline"] = f.read().strip()
        r["kconfig"] = ensure_kconfig(guest)
        r["hz"] = tick.read_hz()
        exe = os.path.join(REPO, ".venv", "lib", "kairos-bench", "greedy")
        src = os.path.join(REPO, "bench", "supply.d", "greedy.c")
        fresh = os.path.exists(exe) and os.stat(exe).st_mtime >= os.stat(src).st_mtime
        r["greedy"] = "prebuilt on the host, reused" if fresh else "compiled in L1 by bench/supply"
        log(f"kernel {r['kernel']}, CONFIG_HZ {r['hz']} from {r['kconfig']}; greedy {r['greedy']}")
        for mode, word in MODES:
            run_mode(out, mode, word, r["hz"], r)
    except Exception as exc:  # noqa: BLE001 - every failure goes into the record
        r["errors"].append(f"{type(exc).__name__}: {exc}")
        traceback.print_exc()
    finally:
        r["t_s"] = round(time.monotonic() - T0, 1)
        with open(os.path.join(out, "supply.json"), "w") as f:
            json.dump(r, f, indent=1, sort_keys=True, default=str)
    log(f"done, errors {r['errors']}")
    return 1 if r["errors"] else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="results directory (in L1: the share, /kout)")
    ap.add_argument("--guest", help="guest/build's output directory (manifest.json, config)")
    ap.add_argument("--prebuild", metavar="OUT", help="host side, before L1")
    ap.add_argument("--summary", metavar="OUT", help="host side, after L1")
    a = ap.parse_args()
    if a.prebuild:
        return prebuild(a.prebuild)
    if a.summary:
        return summary(a.summary)
    if not a.out:
        ap.error("give --out (in L1), --prebuild OUT or --summary OUT")
    return main_l1(a.out, a.guest)


if __name__ == "__main__":
    sys.exit(main())
