"""A hostile guest against the introspection: nothing above the ceiling, bounded agent.

The guest hammers sched_setattr, passes garbage pointers and sizes, claims
a whole CPU (runtime = period = 1 s) and creates thousands of short-lived
RT tasks, all at once.  Another RT domain runs beside it.
"""
from __future__ import annotations

import time

import pytest

from kairos_libvirt import config
from kairos_libvirt.hook import agent_pid
from kairos_libvirt.host import proc, sched

from .conftest import console, qemu_pid, virsh, wait_until
from .test_introspection import running_introspection, state
from .test_rt_domains import DL, enforced_state

pytestmark = pytest.mark.libvirt

CEILING = (2, 5)   # 0.4
WATCH_S = 60


def cpu_s(pid: int) -> float:
    """The agent's utime + stime, seconds; fails if the agent is gone."""
    s = proc.cpu_seconds(pid)
    assert s is not None, f"the agent (pid {pid}) is gone"
    return s


def rss_kib(pid: int) -> int:
    """The agent's RSS in KiB, 0 if it has none (a zombie); fails if the agent is gone."""
    kib = proc.rss_kib(pid)
    assert kib is not None or proc.cpu_seconds(pid) is not None, f"the agent (pid {pid}) is gone"
    return kib or 0


def test_hostile_guest_gets_nothing_above_the_ceiling(domains):
    runs = " ".join(f'kairos.run="sleep 3; {cmd}"' for cmd in (
        "rtprog --policy other --hammer 100000",
        # (in a loop: a single run may end before the agent attaches)
        "while :; do rtprog --garbage 200; sleep 1; done",
        "while :; do rtprog --policy deadline --runtime 1s --period 1s --count 2; "
        "rtprog --policy deadline --runtime 900ms --period 1s --count 2; done",
        "rtprog --spawn 10000",
    ))
    bystander = domains.define(DL.format(r="1ms", p="20ms"), vcpus=1)
    virsh("start", bystander, check=True)
    by_before = enforced_state(bystander, 1).vcpus[0]
    name = domains.define('<kairos:default policy="deadline" runtime="3ms" period="10ms"/>'
                          '<kairos:introspection backend="gdbstub" ceiling="0.4"/>',
                          vcpus=1, cmdline=runs)
    virsh("start", name, check=True)
    running_introspection(name)
    wait_until(lambda: "KAIROS-GUEST RUN 4" in console(name), 120, 0.5, "the hostile programs")
    apid = agent_pid(config.load(), name)
    tid = proc.vcpu_threads(qemu_pid(name))[0]
    t0, c0 = time.monotonic(), cpu_s(apid)
    worst = 0.0
    max_rss = 0
    max_tasks = 0
    while time.monotonic() - t0 < WATCH_S:
        k = sched.get(tid)
        worst = max(worst, k.runtime_ns / k.period_ns)
        assert k.runtime_ns * CEILING[1] <= k.period_ns * CEILING[0], \
            f"granted {k.runtime_ns}/{k.period_ns} above the ceiling 0.4"
        max_rss = max(max_rss, rss_kib(apid))
        st = state(name)
        if st:
            max_tasks = max(max_tasks, len(st.tasks))
        time.sleep(0.2)
    cpu = (cpu_s(apid) - c0) / (time.monotonic() - t0)
    st = state(name)
    i = st.introspection
    print(f"\nhostile guest, {WATCH_S}s: agent CPU {cpu:.1%} of one core, RSS max "
          f"{max_rss // 1024} MiB, tasks in model max {max_tasks}, traps {i['hits']} "
          f"(rejected {i['rejected']}, rate-limited {i['suppressed']}, evicted "
          f"{i['evicted']}), worst grant {worst:.3f} CPU")
    assert i["state"] == "running" and i["rejected"] > 0   # garbage seen and refused
    assert cpu < 0.5, f"agent used {cpu:.0%} of a core"
    assert max_rss < 200 * 1024
    assert max_tasks <= 256
    assert agent_pid(config.load(), name) == apid        # never crashed
    # The guest kept running, and the other domain's reservation did not move.
    before = console(name).count("KAIROS-GUEST ALIVE")
    wait_until(lambda: console(name).count("KAIROS-GUEST ALIVE") > before, 30, 0.5,
               "the hostile guest's heartbeat")
    by_now = enforced_state(bystander, 1).vcpus[0]
    k = sched.get(by_now.tid)
    assert (k.runtime_ns, k.period_ns) == (by_before.runtime_ns, by_before.period_ns)
