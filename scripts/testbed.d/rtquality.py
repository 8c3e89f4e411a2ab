#!/usr/bin/env python3
"""rtquality phase of the nested testbed: bench/rtquality in L1, with the kvm-ud configuration.

Issue 11's configuration e (kairos with kvm-ud introspection) needs a KVM guest under
the patched KVM, which only L1 has.  Here bench/rtquality runs in L1 exactly as on a
host, with ``--kvm`` (L2 domains ``type='kvm'``, the CPU passed through) and the
configurations that make e comparable: a (no reservation), c (kairos declared, no
introspection) and e (the same declaration + ``backend='kvm-ud'``).  The bench checks
that e's agent really ran kvm-ud (no gdbstub fallback) or reports the run as failed.

L1 is Debian's 6.1 under TCG: every absolute figure carries TCG's cost (L2's timers,
L1's vCPUs emulated), so only the comparison between configurations in one run says
something, and the table says it is nested.  libvirtd is the one libvirt.py started
(its setup, also HRTICK_DL on, runs here when the libvirt phase did not).

    rtquality.py --out /kout     in L1: OUT/rtquality/rtquality.json (the bench's own
                                 record), OUT/rtquality.txt (its output) and
                                 OUT/rtquality-phase.json (this phase: exit, time, error)
    rtquality.py --summary OUT   on the host, after L1: the bench's table (``bench/rtquality
                                 --report``, which also draws the PNG there); exit 1 if
                                 the phase did not finish

Figures are printed and recorded, never asserted.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(REPO, "bench", "rtquality")
#: What the phase runs: the three configurations, idle and one hog per L1 CPU, shorter
#: than on a host (every L2 boot costs about a minute under TCG).
ARGS = ["--kvm", "--configs", "a,c,e", "--loads", "0,1", "--warmup", "10", "--duration", "20",
        "--no-plot", "--boot-timeout", "400"]
#: The whole bench in L1: a calibration boot and six runs.
BENCH_TIMEOUT_S = 1500
T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"L1-RTQ [{time.monotonic() - T0:7.2f}] {msg}", flush=True)


def _libvirt_phase():
    """scripts/testbed.d/libvirt.py as a module (its file name hides the libvirt package)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "libvirt.py")
    spec = importlib.util.spec_from_file_location("kt_libvirt_phase", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def in_l1(out: str) -> int:
    r: dict = {"args": ARGS, "errors": []}
    path = os.path.join(out, "rtquality-phase.json")
    try:
        if not os.path.exists("/run/libvirt/libvirt-sock"):
            log("libvirtd is not up (no libvirt phase): setting it up as libvirt.py does")
            _libvirt_phase().setup(r.setdefault("setup", {}))
        res_dir = os.path.join(out, "rtquality")
        os.makedirs(res_dir, exist_ok=True)
        cmd = [sys.executable, BENCH, *ARGS, "--out", res_dir]
        log(f"running {' '.join(cmd)}")
        a = time.monotonic()
        with open(os.path.join(out, "rtquality.txt"), "w") as f:
            p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                               timeout=BENCH_TIMEOUT_S, cwd=REPO)
        r["bench_rc"], r["bench_s"] = p.returncode, round(time.monotonic() - a, 1)
        log(f"bench/rtquality exit {p.returncode} after {r['bench_s']} s")
        if p.returncode != 0:
            r["errors"].append(f"bench/rtquality exit {p.returncode} (see rtquality.txt)")
    except Exception as exc:  # the phase records what broke; the host side reports it
        r["errors"].append(f"{type(exc).__name__}: {exc}")
        r["traceback"] = traceback.format_exc()[-3000:]
        log(f"error: {exc}")
    r["t_s"] = round(time.monotonic() - T0, 1)
    with open(path, "w") as f:
        json.dump(r, f, indent=1)
    return 1 if r["errors"] else 0


def summary(out: str) -> int:
    p = lambda *a: print("testbed: rtquality:", *a, file=sys.stderr)  # noqa: E731
    try:
        with open(os.path.join(out, "rtquality-phase.json")) as f:
            r = json.load(f)
    except (OSError, ValueError) as exc:
        p(f"no phase record ({exc}); see {out}/l1-console.log")
        return 1
    p(f"bench/rtquality {' '.join(r.get('args', []))} in L1: exit {r.get('bench_rc')} after "
      f"{r.get('bench_s')} s (phase {r.get('t_s')} s)")
    j = os.path.join(out, "rtquality", "rtquality.json")
    if os.path.exists(j):
        # The table, and the PNG drawn on the host (matplotlib is not in L1's path).
        subprocess.run([sys.executable, BENCH, "--report", j], cwd=REPO)
    for e in r.get("errors", []):
        p("error:", e)
    return 1 if r.get("errors") else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--out", help="in L1: the results directory (/kout)")
    g.add_argument("--summary", metavar="OUT", help="on the host: print the phase's results")
    a = ap.parse_args()
    return summary(a.summary) if a.summary else in_l1(a.out)


if __name__ == "__main__":
    sys.exit(main())
