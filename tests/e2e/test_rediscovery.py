"""A guest RT task that set its policy before the agent could trap it is still learnt.

The agent learns RT tasks from their sched_* calls; a task that made that call
before the attach (a guest booting under host load is attached tens of
seconds after init started its programs) is found by the census of the guest's
task list (introspect/census.py, read from memory with the VM running) and its
task_struct (introspect/schedlayout.py).  Made deterministic with ``kairosvm
hold``: while held no site is armed, so unmodified cyclictest sets SCHED_FIFO
80 unseen; the guest says so from its own /proc; then unhold.
"""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from kairos_libvirt.state import from_xml

from .conftest import console, live_state, virsh, wait_until

pytestmark = pytest.mark.libvirt

BOOT_AND_ATTACH_S = 300
PERIOD_NS = 4_000_000

#: cyclictest in the background; the shell waits until one of its threads runs
#: SCHED_FIFO (field 41 of /proc/PID/task/TID/stat is the policy) and prints a mark.
RUN = ('kairos.run="cyclictest -q -m -p 80 -i 4000 -t 1 & '
       "until cat /proc/$!/task/*/stat | awk '$41 == 1 {f = 1} END {exit !f}'; do sleep 0.2; done; "
       'echo KAIROS-CT-FIFO-$$; wait"')


def state(name):
    x = live_state(name)
    return from_xml(x) if x else None


def cli(*args):
    return subprocess.run([sys.executable, "-m", "kairos_libvirt.cli", *args],
                          capture_output=True, text=True, timeout=BOOT_AND_ATTACH_S + 30)


def test_task_set_fifo_while_no_trap_was_armed_is_found_by_the_census(domains):
    name = domains.define('<kairos:default policy="deadline" runtime="2ms" period="10ms"/>'
                          '<kairos:introspection backend="gdbstub" ceiling="0.6"/>',
                          vcpus=1, cmdline=RUN)
    virsh("start", name, check=True)
    res = cli("hold", name, "--timeout", str(BOOT_AND_ATTACH_S))
    assert res.returncode == 0 and "held: no trap armed" in res.stdout, res
    wait_until(lambda: re.search(r"KAIROS-CT-FIFO-\d+", console(name)), BOOT_AND_ATTACH_S, 0.5,
               "cyclictest to run SCHED_FIFO in the guest")
    hits = state(name).introspection["hits"]

    # Its sched_setscheduler call went unseen (held), yet the census of the guest's
    # task list, read from memory with the VM running, finds the measuring thread.
    def found():
        for t in state(name).tasks:
            if t["policy"] == "fifo" and t["priority"] == 80:
                return t
        return None
    t = wait_until(found, 60, 0.5, "the census to find cyclictest's thread")
    assert t["origin"] == "memory" and t["comm"] == "cyclictest" and t["tid"]
    assert state(name).introspection["hits"] == hits == 0      # no trap was needed
    res = cli("unhold", name)
    assert res.returncode == 0 and "traps armed again" in res.stdout, res

    def learnt():
        for t in state(name).tasks:
            if t["policy"] == "fifo" and (t["samples"] or 0) >= 8:
                return t
        return None
    t = wait_until(learnt, BOOT_AND_ATTACH_S, 0.5, "cyclictest learnt from its task_struct")
    assert t["priority"] == 80 and t["origin"] == "memory" and t["comm"] == "cyclictest"
    assert abs(t["observed_period_ns"] - PERIOD_NS) * 20 <= PERIOD_NS, t
    assert t["period_source"] == "abstime"
    out = cli("status", name).stdout
    assert "set before the attach (read from its task_struct)" in out, out
