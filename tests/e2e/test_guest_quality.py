"""Introspection must not harm the guest: its invariants under host load (issue 11).

A TCG guest runs unmodified ``cyclictest -q -m -p 80 -i 4000 -t 1`` (SCHED_FIFO
80, clock_nanosleep TIMER_ABSTIME every 4 ms) while the host runs SCHED_OTHER
busy loops on every CPU, with gdbstub introspection on.  Asserted, from the
kernel (sched_getattr) and the agent's own counters, never from timings:

* the period learnt is 4 ms within 5 %, from the requested wake-ups;
* no server introspection grants has a period above the shortest guest
  task deadline;
* the server changes only with the guest's task set: no flip, and no change
  at all while the task set stays the same (re-sampling of clock_nanosleep
  included: it runs every RESAMPLE_EVERY_S).
"""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from kairos_libvirt import analysis, config, paths
from kairos_libvirt.host import proc, sched
from kairos_libvirt.introspect import runtime
from kairos_libvirt.introspect.adapt import DEFAULT_OVERHEAD_NS
from kairos_libvirt.ledger import Ledger
from kairos_libvirt.state import from_xml

from .conftest import live_state, qemu_pid, status_json, virsh, wait_until

pytestmark = pytest.mark.libvirt

BOOT_AND_ATTACH_S = 300
PERIOD_NS = 4_000_000
#: Long enough for three re-sampling rounds of clock_nanosleep.
OBSERVE_S = 3 * runtime.RESAMPLE_EVERY_S + 5
HOGS_PER_CPU = 2


def state(name):
    x = live_state(name)
    return from_xml(x) if x else None


def agent_log_tail(name, lines=40):
    try:
        with open(paths.agent_log(config.load(), name), errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError as exc:
        return f"(no agent log: {exc})"


def cyclictest_task(st):
    for t in st.tasks if st else ():
        if t["policy"] == "fifo" and t["priority"] == 80:
            return t
    return None


def shortest_deadline(tasks):
    """The shortest deadline among the guest's known RT tasks (None: none known yet)."""
    ds = [t["deadline_ns"] if t["policy"] == "deadline" else t["observed_period_ns"]
          for t in tasks]
    ds = [d for d in ds if d]
    return min(ds) if ds else None


@pytest.fixture
def host_load():
    """SCHED_OTHER busy loops, HOGS_PER_CPU per host CPU; killed (by pid) afterwards."""
    hogs = [subprocess.Popen(["sh", "-c", "while :; do :; done"], start_new_session=True)
            for _ in range(HOGS_PER_CPU * (os.cpu_count() or 1))]
    try:
        yield hogs
    finally:
        for h in hogs:
            try:
                os.killpg(h.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            h.wait(timeout=10)


def test_cyclictest_under_load_period_learnt_no_long_server_no_flip(domains, host_load):
    # cyclictest starts at boot: whether it sets its policy before the attach (under host
    # load the attach comes up to ~30 s after init) or after, the agent learns it (from its
    # task_struct at its first trap, or from its call).
    run = 'kairos.run="cyclictest -q -m -p 80 -i 4000 -t 1"'
    name = domains.define('<kairos:default policy="deadline" runtime="2ms" period="10ms"/>'
                          '<kairos:introspection backend="gdbstub" ceiling="0.6"/>',
                          vcpus=1, cmdline=run)
    virsh("start", name, check=True)
    wait_until(lambda: (state(name) and state(name).introspection
                        and state(name).introspection["state"] == "running"),
               BOOT_AND_ATTACH_S, 0.5, "introspection to run")

    # 1. The period, from the requested wake-ups, within 5 % of 4 ms.
    seen = []

    def learnt():
        t = cyclictest_task(state(name))
        if t and t["observed_period_ns"]:
            seen.append((t["observed_period_ns"], t["samples"], t.get("period_source")))
            return t if (t["samples"] or 0) >= 8 else None
        return None
    try:
        t = wait_until(learnt, BOOT_AND_ATTACH_S, 0.5, "cyclictest's period to be learnt")
    except AssertionError as e:
        raise AssertionError(f"{e}; (period, samples, source) seen: {sorted(set(seen))}; "
                             f"agent log:\n{agent_log_tail(name)}")
    assert abs(t["observed_period_ns"] - PERIOD_NS) * 20 <= PERIOD_NS, seen
    assert t["period_source"] == "abstime"
    # Every belief on the way was 4 ms too (a wrong one needs evidence it cannot have).
    assert all(abs(p - PERIOD_NS) * 20 <= PERIOD_NS for p, _, _ in seen), seen

    # The declared 2 ms/10 ms can leave the vCPU 16 ms without supply.  Where the host
    # can supply a server that meets a 4 ms task, the analysed server replaces it; on a
    # host that enforces budgets at a 4 ms tick none can (analysis/enforcement.py), and
    # the declaration stays: never worse than declared.
    tid = proc.vcpu_threads(qemu_pid(name))[0]
    g = Ledger(config.load()).enforcement().granularity_ns
    demand = analysis.Task("cyclictest", PERIOD_NS // 10, PERIOD_NS, PERIOD_NS, priority=80,
                           scheduler="fp")
    possible = analysis.interface_for([demand], vcpus=1, overhead_ns=DEFAULT_OVERHEAD_NS,
                                      enforcement_ns=g).servers[0].schedulable

    def adapted():
        st = state(name)
        return st if st.vcpus[0].source == "introspection" and st.vcpus[0].enforced else None
    if possible:
        wait_until(adapted, 60, 0.5, "the analysed server in force")

    # 2. and 3. Observe through several re-sampling rounds.
    doc0 = status_json(name)
    changes0 = doc0["introspection"]["server_changes"]
    tasks0 = {(x["key"], x["policy"], x["priority"], x["observed_period_ns"])
              for x in doc0["guest_tasks"]}
    granted = set()
    end = time.monotonic() + OBSERVE_S
    while time.monotonic() < end:
        st = state(name)
        k = sched.get(tid)
        shortest = shortest_deadline(st.tasks)
        if st.vcpus[0].source == "introspection" and k.policy == "deadline":
            granted.add((k.runtime_ns, k.deadline_ns, k.period_ns))
            assert shortest is not None and k.period_ns <= shortest, (k, st.tasks)
            assert k.runtime_ns + g <= k.deadline_ns, (k, g)  # room for the host's overrun
        if not possible:
            assert (k.runtime_ns, k.deadline_ns, k.period_ns) == (2_000_000, 10_000_000,
                                                                   10_000_000), k
        time.sleep(0.5)
    doc = status_json(name)
    intro = doc["introspection"]
    tasks1 = {(x["key"], x["policy"], x["priority"], x["observed_period_ns"])
              for x in doc["guest_tasks"]}
    assert intro["server_flips"] == 0, intro
    if tasks1 == tasks0:
        # Same task set all along (re-sampling ran meanwhile): the server never moved.
        assert intro["server_changes"] == changes0, (intro, granted)
        assert len(granted) <= 1, granted
    if possible:
        assert intro["server_changes"] >= 1, intro
        assert granted, "no introspection server was read back from the kernel"
    else:
        assert not granted and intro["server_changes"] == 0, (intro, granted)
    assert intro["hits"] > 0
