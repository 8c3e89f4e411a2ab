#!/usr/bin/env python3
"""The demo's narrator: what kairos does for the demo domain's guest, printed as it happens.

scripts/demo starts the domain (xml/examples/domain-demo.xml); this follows it
from outside, through what any admin has: ``kairosvm status`` (the kernel's
values read back with sched_getattr, and the agent's live state) and the
guest's serial console.  It prints each step of the loop once, when it
happens: the declaration, the reservation in force, introspection attached,
the guest task learnt (policy, period and the evidence), the analysed server
and the guarantee it gives that task, the guest's own measured latency next
to that bound, and the server going back to the declaration when the task
ends.  Exit 0 once the story is complete (a latency above the bound is
printed as such: the demo shows, the benches measure); 1 with the step that
did not come.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from typing import Any, Dict, Optional

from kairos_libvirt import STATE_NS, spec, status, virt
from kairos_libvirt.units import format_ns

T0 = time.monotonic()
#: How long each step may take before the demo says which one did not come.
STEP_TIMEOUT_S = {"enforce": 10, "boot": 120, "attach": 120, "start": 60, "task": 30, "period": 30,
                  "server": 30, "latency": 60, "back": 30}


def say(msg: str) -> None:
    print(f"[{time.monotonic() - T0:5.1f} s] {msg}", flush=True)


def ms(ns: Optional[int]) -> str:
    return "-" if ns is None else f"{ns / 1e6:.3g} ms"


def server(policy: Optional[str], runtime: Optional[int], deadline: Optional[int],
           period: Optional[int]) -> str:
    if policy != "deadline":
        return str(policy)
    dl = "" if deadline in (None, period) else f", deadline {ms(deadline)}"
    return f"SCHED_DEADLINE {ms(runtime)} every {ms(period)}{dl}"


class Domain:
    def __init__(self, name: str, console: str) -> None:
        self.name, self.console = name, console
        self.conn = virt.connect(timeout_s=30)
        self.dom = virt.lookup(self.conn, name)
        self.info = spec.parse_domain(virt.live_xml(self.dom))

    def doc(self) -> Dict[str, Any]:
        live = virt.get_metadata(self.dom, STATE_NS, live=True)
        return status.collect(self.name, self.info, live=live)

    def text(self) -> str:
        try:
            with open(self.console, errors="replace") as f:
                return f.read()
        except OSError:
            return ""


def wait(step: str, pred, d: Domain):
    deadline = time.monotonic() + STEP_TIMEOUT_S[step]
    while True:
        got = pred()
        if got:
            return got
        if not virt.is_active(d.dom):
            raise SystemExit(f"scripts/demo: the domain stopped while waiting for: {step}")
        if time.monotonic() > deadline:
            raise SystemExit(f"scripts/demo: no '{step}' within {STEP_TIMEOUT_S[step]} s "
                             f"(see `kairosvm status {d.name}` and /var/log/kairos/{d.name}.log)")
        time.sleep(0.2)


def cyclictest(doc: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    return next((t for t in doc.get("guest_tasks") or [] if t.get("comm") == "cyclictest"), None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("name")
    ap.add_argument("--console", required=True)
    a = ap.parse_args()
    d = Domain(a.name, a.console)

    doc = d.doc()
    decl = doc["vcpus"][0]["declared"]
    # The agent enforces within a moment of the start: read the kernel once it has.
    v = wait("enforce", lambda: (lambda v: v if v["policy"] == decl["policy"] else None)(
        d.doc()["vcpus"][0]), d)
    intro = d.info.declaration.introspection if d.info.declaration else None
    ceiling = f", ceiling {float(intro.ceiling):g} of a CPU" if intro and intro.ceiling else ""
    say(f"declared by the admin: {server(decl['policy'], decl['runtime_ns'], decl['deadline_ns'], decl['period_ns'])} "
        f"on vCPU 0; introspection {intro.backend if intro else 'off'}{ceiling}")
    say(f"the kernel enforces on the vCPU thread (tid {v['tid']}, read back with sched_getattr): "
        f"{server(v['policy'], v['runtime_ns'], v['deadline_ns'], v['period_ns'])}")

    wait("boot", lambda: "KAIROS-GUEST READY" in d.text(), d)
    say("the guest has booted (its console: KAIROS-GUEST READY)")
    i = wait("attach", lambda: (lambda x: x if x and x.get("state") in ("running", "failed", "error")
                                else None)(d.doc().get("introspection")), d)
    if i.get("state") != "running":
        raise SystemExit(f"scripts/demo: introspection {i.get('state')}: {i.get('error')}")
    say(f"introspection attached ({i.get('backend')}): the guest kernel's sched_setattr, "
        f"sched_setscheduler and exit are watched; its sleeps are read from its memory")

    wait("start", lambda: "DEMO-START" in d.text(), d)
    say("the guest starts unmodified cyclictest -p 80 -i 50000 (SCHED_FIFO 80, wakes every "
        "50 ms); kairos is not told")
    t = wait("task", lambda: cyclictest(d.doc()), d)
    how = ("its sched_setscheduler call was trapped" if t.get("origin") == "call"
           else "found in its task_struct by the census")
    say(f"guest task learnt: {t['comm']} (guest tid {t['tid']}) SCHED_{str(t['policy']).upper()} "
        f"{t['priority']} on vCPU {t['vcpu']}: {how}")
    t = wait("period", lambda: (lambda x: x if x and x.get("observed_period_ns") else None)(
        cyclictest(d.doc())), d)
    say(f"its period, learnt from its absolute wake-ups read in guest memory: "
        f"{ms(t['observed_period_ns'])} ({t['samples']} consecutive samples, jitter "
        f"{ms(t['jitter_ns'])}; source {t['period_source']})")

    def adapted():
        doc = d.doc()
        v = doc["vcpus"][0]
        t = cyclictest(doc)
        return (doc, v, t) if v["source"] == "introspection" and t and t.get("bound_ns") else None
    doc, v, t = wait("server", adapted, d)
    f = v.get("interface") or {}
    say(f"analysed server for vCPU 0: budget {ms(f.get('budget_ns'))} every {ms(f.get('period_ns'))}"
        f" (hierarchical analysis of the learnt task, its run time assumed 10 % of its period: "
        f"a FIFO task declares none)")
    say(f"the kernel enforces now: {server(v['policy'], v['runtime_ns'], v['deadline_ns'], v['period_ns'])}"
        f" (never above the ceiling, admitted by the host's test)")
    say(f"guarantee: cyclictest responds within {ms(t['bound_ns'])} of each wake-up, its deadline "
        f"being {ms(t['observed_period_ns'])}")
    bound = t["bound_ns"]

    m = wait("latency", lambda: re.search(
        r"T: 0 \(\s*\d+\) P:\s*\d+ I:\s*\d+ C:\s*(\d+) Min:\s*(\d+) Act:\s*\d+ Avg:\s*(\d+) Max:\s*(\d+)",
        d.text()), d)
    cycles, lo, avg, mx = (int(x) for x in m.groups())
    verdict = "within" if mx * 1000 <= bound else "ABOVE"
    say(f"the guest measured (cyclictest, {cycles} wake-ups): latency min {lo} us, avg {avg} us, "
        f"max {mx} us: {verdict} the {ms(bound)} bound")

    def back():
        doc = d.doc()
        v = doc["vcpus"][0]
        return v if v["source"] == "declared" and not cyclictest(doc) and \
            v["runtime_ns"] == decl["runtime_ns"] and v["period_ns"] == decl["period_ns"] else None
    v = wait("back", back, d)
    say(f"cyclictest has exited: the task is forgotten and the kernel enforces the declaration "
        f"again: {server(v['policy'], v['runtime_ns'], v['deadline_ns'], v['period_ns'])}")
    i = d.doc().get("introspection") or {}
    say(f"the guest stood stopped by introspection {ms(i.get('stopped_ns'))} in all "
        f"({i.get('stops')} stops, the longest {ms(i.get('longest_stop_ns'))}); "
        f"{i.get('server_changes')} server changes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
