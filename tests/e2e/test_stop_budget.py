"""The stop budget end to end: a real TCG guest, gdbstub introspection, unmodified cyclictest.

Invariants from the backend's own account (the live state's introspection
counters), never timings: the attach stopped the booting guest once (the
kernel was found up from physical memory, with the VM running), the busiest
1 s window of trap stops held at most the budget, and once the budget was
spent the traps waited while the guest ran on.
"""
from __future__ import annotations

import pytest

from kairos_libvirt.introspect import backends
from kairos_libvirt.state import from_xml

from .conftest import live_state, status_json, virsh, wait_until

pytestmark = pytest.mark.libvirt

BOOT_AND_ATTACH_S = 150


def qemu_version():
    import libvirt
    v = libvirt.open("qemu:///system").getVersion()
    return (v // 1_000_000, v // 1000 % 1000)


def intro(name):
    x = live_state(name)
    st = from_xml(x) if x else None
    return st.introspection if st and st.introspection else None


def test_attach_stops_the_booting_guest_once_and_traps_keep_to_the_budget(domains):
    # cyclictest wakes every 2 ms: its period is read from memory, its sleeps are never
    # trapped.  The budget is spent by a guest loop that starts RT processes as fast as
    # it can: each chrt is a sched_setscheduler hit and an exit hit, each charged its
    # stop plus what a hit costs a TCG guest after it (budget_hit_cost_ns).
    runs = ('kairos.run="sleep 2; cyclictest -p 50 -i 2000 -t 1 -q -D 600" '
            'kairos.run="sleep 2; while :; do chrt -f 10 true; done"')
    decl = ('<kairos:default policy="deadline" runtime="4ms" period="10ms"/>'
            '<kairos:introspection backend="gdbstub" ceiling="0.6"/>')
    name = domains.define(decl, vcpus=1, cmdline=runs)
    virsh("start", name, check=True)
    i = wait_until(lambda: (lambda x: x if x and x["state"] == "running" else None)(intro(name)),
                   BOOT_AND_ATTACH_S, 0.5, f"introspection of {name} to run")
    # The kernel was waited for without stopping the guest: one attach stop, no retries.
    assert i["attach_stops"] == 1, i
    assert not any("read through the gdbstub" in n for n in i["notes"]), i["notes"]

    # The guest's periodic task hits the traps; the budget runs out and traps wait.
    i = wait_until(lambda: (lambda x: x if x and (x.get("budget_waits") or 0) >= 2 else None)(
        intro(name)), 60, 0.5, "the stop budget to take the traps off at least twice")
    assert i["hits"] > 0 and i["stops"] > i["attach_stops"]
    assert i["peak_window_ns"] <= i["budget_window_ns"], i
    cost = backends.TCG_FLUSH_COST_NS if qemu_version() < backends.QEMU_NO_FLUSH else 0
    assert i["budget_hit_cost_ns"] == cost, i        # a TCG domain: the flush after each hit
    assert i["charged_ns"] > 0 and i["charged_ns"] % cost == 0, i
    assert i["stopped_ns"] >= i["attach_longest_ns"]
    # The guest ran on meanwhile: cyclictest keeps running and the agent still says running.
    assert intro(name)["state"] == "running"

    # status JSON reports the same account
    doc = status_json(name)["introspection"]
    for key in ("stopped_ns", "stops", "peak_window_ns", "budget_window_ns", "attach_stops"):
        assert isinstance(doc[key], int), (key, doc)
    assert doc["attach_stops"] == 1
    assert doc["peak_window_ns"] <= doc["budget_window_ns"]
