#!/usr/bin/env python3
"""libvirt phase of the nested testbed: libvirtd + our hook + the real per-domain agent inside L1.

Runs in L1 (chroot on the host's / under a tmpfs overlay) after the other phases:

1. a clean libvirt state in L1 (tmpfs over /run, /var/lib/libvirt, /var/cache/libvirt, /var/log/libvirt,
   /var/log/kairos, /etc/libvirt/qemu: nothing of the host's daemon or domains is seen), user/group
   libvirt-qemu, qemu.conf with user/group root and no security driver; ``virtlogd -d; libvirtd -d``;
   ``kairosvm install-hook`` (writes the hook, SIGHUPs libvirtd);
2. defines an L2 ``<domain type='kvm'>`` (the project's guest, 1 vCPU) declared deadline 1.5ms/10ms with
   ``<kairos:introspection backend='kvm-ud' ceiling='0.6'/>``, its init looping
   ``rtprog --policy deadline --runtime 2ms --period 10ms --count 300; sleep 6`` then, as the gdbstub
   e2e tests, ``cyclictest -p 50 -i 5000`` for 20 s and ``chrt -f 60 sleep 3``; ``virsh start``;
3. through ``virsh metadata ... --live`` and ``kairosvm status --json``: introspection kvm-ud running (no
   fallback note), the 2ms/10ms task, the vCPU thread's SCHED_DEADLINE (sched_getattr in L1) becoming
   the analysed interface (source=introspection), cyclictest's observed period 5 ms, chrt's FIFO 60 task
   found and gone, and the vCPU shrinking back to 1.5ms/10ms when no program runs;
4. ``kairosvm hold`` (every site disarmed, read back by the kernel; no trap for 12 s) and ``unhold``;
5. ``virsh destroy``: no ledger entry left (``kairosvm ledger --json``), the agent gone.

Writes OUT/libvirt.json; tests/nested/test_libvirt_in_l1.py asserts on it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VENV = os.environ.get("KT_VENV", os.path.join(REPO, ".venv"))
KAIROSVM = os.path.join(VENV, "bin", "kairosvm")
STATE_NS = "http://kairosvm.org/xmlns/libvirt/realtime-state/1.0"
NAME = "kt-l2"
CONSOLE = "/var/log/kt-l2.console"
#: One loop, the programs one after the other (a DL task and cyclictest on one vCPU together need
#: more than the 0.6 ceiling): rtprog's SCHED_DEADLINE task, then, as tests/e2e/test_introspection.py,
#: unmodified cyclictest (absolute 5 ms wake-ups) and util-linux chrt; the sleeps are windows with no
#: RT task (the reservation shrinks back to the declaration).
PROG = ("while :; do rtprog --policy deadline --runtime 2ms --period 10ms --count 300; sleep 6; "
        "cyclictest -p 50 -i 5000 -t 1 -q -D 20; chrt -f 60 sleep 3; sleep 8; done")

sys.path.insert(0, REPO)
from kairos_libvirt.host import proc, sched  # noqa: E402
from tests.guestdomain import decl, domain_xml  # noqa: E402
from kairos_libvirt.state import from_xml  # noqa: E402

T0 = time.monotonic()


def t() -> float:
    return round(time.monotonic() - T0, 2)


def log(msg: str) -> None:
    print(f"L1-LIBVIRT [{t():7.2f}] {msg}", flush=True)


def sh(*cmd: str, check: bool = False, timeout: float = 120) -> subprocess.CompletedProcess:
    p = subprocess.run(list(cmd), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {p.returncode}: {(p.stderr or p.stdout).strip()[-800:]}")
    return p


def wait(pred, timeout: float, what: str, interval: float = 0.3):
    end = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > end:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def l2_domain_xml() -> str:
    return domain_xml(NAME, decl("<kairos:default policy='deadline' runtime='1500us' period='10ms'/>"
                                 "<kairos:introspection backend='kvm-ud' ceiling='0.6'/>"),
                      vcpus=1, memory_mib=256, kind="kvm", console=CONSOLE,
                      cmdline=f'kairos.heartbeat=0 kairos.run="{PROG}"',
                      cpu="<cpu mode='host-passthrough'><feature policy='disable' name='xsave'/></cpu>")


def setup(r: dict) -> None:
    # Nothing of the host's daemon state: the host's / is the overlay's lower layer, /run included.
    for d in ("/run", "/var/lib/libvirt", "/var/cache/libvirt", "/var/log/libvirt", "/var/log/kairos",
              "/etc/libvirt/qemu"):
        os.makedirs(d, exist_ok=True)
        sh("mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", d, check=True)
    os.makedirs("/run/libvirt", exist_ok=True)
    os.makedirs("/run/lock", exist_ok=True)
    # L1 has no lockdown: switch HRTICK_DL on, the fix `kairosvm check` names, so that
    # SCHED_DEADLINE enforces budgets with the hrtimer instead of the 4 ms tick and the
    # analysis sizes servers for a small overrun (host/tick.py reads the feature back).
    feats = "/sys/kernel/debug/sched/features"
    if not os.path.exists(feats):
        sh("mount", "-t", "debugfs", "none", "/sys/kernel/debug")
    try:
        with open(feats, "w") as f:
            f.write("HRTICK_DL")
        with open(feats) as f:
            r["hrtick_dl"] = "HRTICK_DL" in f.read().split()
    except OSError as exc:
        r["hrtick_dl"] = f"not switched on: {exc}"
    log(f"HRTICK_DL: {r['hrtick_dl']}")
    if sh("getent", "group", "libvirt-qemu").returncode != 0:
        sh("groupadd", "-r", "libvirt-qemu", check=True)
    if sh("getent", "passwd", "libvirt-qemu").returncode != 0:
        sh("useradd", "-r", "-g", "libvirt-qemu", "-d", "/var/lib/libvirt", "-s", "/usr/sbin/nologin",
           "libvirt-qemu", check=True)
    with open("/etc/libvirt/qemu.conf", "w") as f:
        # namespaces = []: no private /dev for QEMU (in L1 it would lack /dev/kvm)
        f.write('user = "root"\ngroup = "root"\nsecurity_driver = "none"\nnamespaces = []\n')
    # No network or storage autostart of the host's definitions either.
    for d in ("/etc/libvirt/qemu/networks/autostart", "/etc/libvirt/storage/autostart"):
        if os.path.isdir(d):
            sh("mount", "-t", "tmpfs", "tmpfs", d)
    a = time.monotonic()
    sh("virtlogd", "-d", check=True)
    sh("libvirtd", "-d", check=True)
    wait(lambda: os.path.exists("/run/libvirt/libvirt-sock"), 60, "libvirtd's socket")
    p = sh("virsh", "-q", "version", "--daemon", timeout=600)
    r["first_virsh_s"] = round(time.monotonic() - a, 1)
    r["libvirt_version"] = p.stdout.strip()
    log(f"libvirtd up, first virsh after {r['first_virsh_s']} s: {p.stdout.strip()} {p.stderr.strip()[-300:]}")
    caps = sh("virsh", "domcapabilities", "--virttype", "kvm", timeout=300)
    r["domcaps_kvm"] = caps.returncode == 0
    p = sh(KAIROSVM, "install-hook", check=True)
    r["install_hook"] = (p.stdout + p.stderr).strip()[-400:]
    r["hook_file"] = os.path.exists("/etc/libvirt/hooks/qemu.d/kairosvm")
    log(f"install-hook: {r['install_hook']}")


def live_state() -> str:
    p = sh("virsh", "metadata", NAME, STATE_NS, "--live")
    return p.stdout if p.returncode == 0 else ""


def status() -> dict:
    p = sh(KAIROSVM, "status", NAME, "--json")
    try:
        return json.loads(p.stdout)
    except ValueError:
        return {}


def intro_of(xml: str) -> dict:
    """The live state's <introspection> (state.from_xml: backend, state, counters, error, notes)."""
    if not xml.strip():
        return {}
    st = from_xml(xml)
    return dict(st.introspection or {})


def kernel(tid: int) -> dict:
    k = sched.get(tid)
    return {"policy": k.policy, "runtime_ns": k.runtime_ns, "deadline_ns": k.deadline_ns, "period_ns": k.period_ns}


def run(r: dict) -> None:
    setup(r)
    with open("/tmp/kt-l2.xml", "w") as f:
        f.write(l2_domain_xml())
    sh("virsh", "define", "/tmp/kt-l2.xml", check=True)
    a = time.monotonic()
    p = sh("virsh", "start", NAME, timeout=300)
    r["start"] = {"rc": p.returncode, "s": round(time.monotonic() - a, 1), "err": p.stderr.strip()[-800:]}
    log(f"virsh start: {r['start']}")
    if p.returncode != 0:
        raise RuntimeError(f"virsh start failed: {p.stderr.strip()[-800:]}")
    qpid = wait(lambda: proc.qemu_pid(NAME), 20, "QEMU's pid")
    tid = wait(lambda: proc.vcpu_threads(qpid).get(0), 20, "the vCPU thread")
    r["vcpu_tid"] = tid
    r["kernel_at_start"] = kernel(tid)
    r["ledger_running"] = json.loads(sh(KAIROSVM, "ledger", "--json").stdout or "{}")

    def running():
        x = live_state()
        i = intro_of(x)
        return (x, i) if i.get("state") in ("running", "error", "failed") else None
    try:
        x, i = wait(running, 240, "introspection to run", 1)
    finally:
        r["live_state_first"] = live_state()[-3000:]
    r["introspection"] = i
    if i.get("state") != "running":
        try:
            n = os.path.getsize(CONSOLE)
        except OSError:
            n = -1
        raise RuntimeError(f"introspection {i.get('state')}: {i.get('error')} (L2 console {n} bytes so far)")
    r["introspection_s"] = round(time.monotonic() - a, 1)
    log(f"introspection {i} after {r['introspection_s']} s")
    doc = status()
    r["status_first"] = doc

    def task():
        d = status()
        for tk in d.get("guest_tasks", []):
            if tk.get("policy") == "deadline":
                return d, tk
        return None
    d, tk = wait(task, 180, "the guest's deadline task", 0.5)
    r["task"] = {k: tk.get(k) for k in ("policy", "runtime_ns", "deadline_ns", "period_ns", "vcpu", "comm")}
    r["task_s"] = round(time.monotonic() - a, 1)
    log(f"task {r['task']} after {r['task_s']} s")

    def grown():
        d = status()
        v = (d.get("vcpus") or [{}])[0]
        dl = any(tk.get("policy") == "deadline" for tk in d.get("guest_tasks", []))
        if dl and v.get("source") == "introspection" and v.get("interface"):
            k = kernel(tid)
            # more bandwidth than the declared 1.5 ms / 10 ms (the analysed server may have
            # a shorter period, and so a smaller runtime)
            if k["policy"] == "deadline" and k["runtime_ns"] * 10_000_000 > 1_500_000 * k["period_ns"]:
                return d, v, k
        return None
    # rtprog runs 3 s of every 40: the next round if this one is missed
    d, v, k = wait(grown, 60, "the vCPU to take the analysed interface", 0.2)
    r["grown"] = {"status_vcpu": v, "kernel": k, "chrt": sh("chrt", "-p", str(tid)).stdout.strip(),
                  "live_state": live_state()[-3000:]}
    log(f"grown: {k} interface {v.get('interface')}")

    seen = r["periodic_seen"] = []

    def periodic():
        d = status()
        for tk in d.get("guest_tasks", []):
            if tk.get("policy") == "fifo" and tk.get("priority") == 50:
                got = [tk.get(f) for f in ("observed_period_ns", "jitter_ns", "samples", "vcpu")]
                if got not in seen:
                    seen.append(got)
                if (tk.get("samples") or 0) >= 8 and abs((tk.get("observed_period_ns") or 0) - 5_000_000) <= 250_000:
                    return d, tk
        return None
    # cyclictest starts after rtprog's 300 periods: with HRTICK_DL on in L1 the agent grants
    # short-period servers, and under TCG each of L1's replenishments costs hundreds of µs
    # (docs/supply.md, nested), so a starved rtprog can take two minutes: wait for it.
    d, tk = wait(periodic, 300, "cyclictest's 5 ms period", 0.5)
    r["periodic"] = {"task": tk, "status_vcpu": (d.get("vcpus") or [{}])[0], "kernel": kernel(tid),
                     "s": round(time.monotonic() - a, 1)}
    log(f"periodic: {tk}")

    def chrt_task(present: bool):
        def ok():
            d = status()
            seen = [tk for tk in d.get("guest_tasks", []) if tk.get("priority") == 60]
            return (seen or [True])[0] if bool(seen) == present else None
        return ok
    r["chrt_task"] = wait(chrt_task(True), 90, "chrt's FIFO 60 task", 0.3)
    wait(chrt_task(False), 30, "chrt's task to leave the model", 0.3)
    r["chrt_gone"] = True
    log(f"chrt: {r['chrt_task']}")

    def back():
        d = status()
        v = (d.get("vcpus") or [{}])[0]
        if v.get("source") == "declared" and not d.get("guest_tasks"):
            k = kernel(tid)
            if k["runtime_ns"] == 1_500_000:
                return d, v, k
        return None
    d, v, k = wait(back, 120, "the programs to exit and the reservation to shrink back", 0.2)
    r["back"] = {"status_vcpu": v, "kernel": k, "chrt": sh("chrt", "-p", str(tid)).stdout.strip(),
                 "tasks": len(d.get("guest_tasks", []))}
    log(f"back: {k}")
    hold_phase(r)
    x = live_state()
    r["introspection_end"] = intro_of(x)
    r["status_end"] = status()
    a = time.monotonic()
    p = sh("virsh", "destroy", NAME, timeout=120)
    r["destroy"] = {"rc": p.returncode, "s": round(time.monotonic() - a, 1), "err": p.stderr.strip()[-400:]}
    apid = (r["status_end"].get("agent") or {}).get("pid")
    r["agent_pid"] = apid

    def agent_gone():
        return not apid or not os.path.exists(f"/proc/{apid}") or \
            open(f"/proc/{apid}/stat").read().split(") ")[1][0] == "Z"
    try:
        wait(agent_gone, 40, "the agent to exit", 0.2)
        r["agent_exit_s"] = round(time.monotonic() - a, 1)
    except TimeoutError:
        r["agent_exit_s"] = None
    led = json.loads(sh(KAIROSVM, "ledger", "--json").stdout or "{}")
    r["ledger_after_destroy"] = led
    r["agent_dir_after_destroy"] = os.path.exists(f"/run/kairos/domains/{NAME}")
    log(f"destroy {r['destroy']}, ledger {led}")


def hold_phase(r: dict) -> None:
    """kairosvm hold / unhold with kvm-ud: the kernel reads every site back restored, no trap fires."""
    def hits() -> int:
        return int(intro_of(live_state()).get("hits") or 0)
    p = sh(KAIROSVM, "hold", NAME, "--timeout", "60", timeout=120)
    h = r["hold"] = {"rc": p.returncode, "out": p.stdout.strip(), "err": p.stderr.strip()[-600:],
                     "state": intro_of(live_state()).get("state")}
    log(f"hold: {h}")
    if p.returncode != 0:
        raise RuntimeError(f"kairosvm hold failed: {p.stderr.strip()[-600:]}")
    time.sleep(3)           # counters are republished every 2 s
    h1 = hits()
    time.sleep(12)          # the guest's loop calls clock_nanosleep (shell sleeps) all along
    h["hits"] = [h1, hits()]
    p = sh(KAIROSVM, "unhold", NAME, "--timeout", "60", timeout=120)
    u = r["unhold"] = {"rc": p.returncode, "out": p.stdout.strip(), "err": p.stderr.strip()[-600:]}
    if p.returncode != 0:
        raise RuntimeError(f"kairosvm unhold failed: {p.stderr.strip()[-600:]}")
    u["hits_after"] = wait(lambda: hits() > h["hits"][1] and hits(), 60, "traps to fire after unhold", 0.5)
    u["state"] = intro_of(live_state()).get("state")
    log(f"unhold: {u}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    r: dict = {"errors": []}
    try:
        run(r)
    except Exception as exc:  # noqa: BLE001 - every failure goes into the result
        r["errors"].append(f"{type(exc).__name__}: {exc}")
        traceback.print_exc()
    finally:
        for f, key in ((CONSOLE, "l2_console_tail"), (f"/var/log/kairos/{NAME}.log", "agent_log_tail"),
                       (f"/var/log/libvirt/qemu/{NAME}.log", "qemu_log_tail")):
            try:
                r[key] = open(f, errors="replace").read()[-4000:]
            except OSError:
                pass
        sh("virsh", "destroy", NAME)
        r["t_s"] = t()
        with open(os.path.join(a.out, "libvirt.json"), "w") as f:
            json.dump(r, f, indent=1, sort_keys=True, default=str)
    log(f"done, errors {r['errors']}")
    return 1 if r["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
