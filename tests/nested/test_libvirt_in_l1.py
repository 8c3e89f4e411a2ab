"""libvirtd, our hook and the real per-domain agent inside L1 (marker ``nested``).

scripts/testbed.d/libvirt.py runs in L1 after the other phases: libvirtd (no systemd) with
``kairosvm install-hook``, an L2 ``<domain type='kvm'>`` under L1's patched KVM declared deadline
1.5ms/10ms with ``<kairos:introspection backend='kvm-ud' ceiling='0.6'/>``, its guest looping
``rtprog --policy deadline --runtime 2ms --period 10ms --count 300; sleep 6; cyclictest -p 50 -i 5000
-t 1 -q -D 20; chrt -f 60 sleep 3; sleep 8``; ``virsh start``,
then ``virsh metadata ... --live`` / ``kairosvm status --json`` / ``sched_getattr`` on the vCPU
thread in L1, ``virsh destroy``, ``kairosvm ledger --json``.  It writes OUT/libvirt.json.
"""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.nested

DECLARED = {"policy": "deadline", "runtime_ns": 1_500_000, "deadline_ns": 10_000_000, "period_ns": 10_000_000}


def test_libvirt_phase_reported_no_error(lv: dict) -> None:
    assert lv["errors"] == [], "\n".join(lv["errors"])


def test_virsh_start_runs_the_hook_and_admits_the_domain(lv: dict) -> None:
    assert lv["hook_file"] and lv["domcaps_kvm"]
    assert lv["start"]["rc"] == 0, lv["start"]
    # prepare begin reserved the declared 1.5ms/10ms in the ledger before QEMU ran
    g = lv["ledger_running"]["domains"]["kt-l2"]["granted"]["0"]
    assert (g["policy"], g["runtime_ns"], g["period_ns"]) == ("deadline", 1_500_000, 10_000_000)


def test_l1_enforces_deadline_budgets_with_hrtick_and_admission_knows_it(lv: dict) -> None:
    # The fix `kairosvm check` names on a tick-enforced host, applied in L1 (no lockdown).
    assert lv["hrtick_dl"] is True, lv["hrtick_dl"]
    led = lv["ledger_running"]
    assert led["enforcement_ns"] <= 200_000 and "HRTICK_DL on" in led["enforcement"], led


def test_agent_introspects_with_kvm_ud_not_the_fallback(lv: dict) -> None:
    for i in (lv["introspection"], lv["introspection_end"], lv["status_end"]["introspection"]):
        assert i["backend"] == "kvm-ud" and i["state"] == "running" and i["error"] is None, i
        assert not any("falling back" in n or "gdbstub" in n for n in i["notes"]), i["notes"]
    e = lv["introspection_end"]
    assert e["hits"] > 0 and e["decoded"] > 0 and e["handler_ns"] == 0  # the guest never stopped
    assert e["rejected"] <= e["hits"] // 10 and e["suppressed"] == 0, e


def test_guest_deadline_task_seen_through_status(lv: dict) -> None:
    t = lv["task"]
    assert (t["policy"], t["runtime_ns"], t["deadline_ns"], t["period_ns"], t["vcpu"]) == \
        ("deadline", 2_000_000, 10_000_000, 10_000_000, 0)


def test_vcpu_thread_takes_the_analysed_interface_then_shrinks_back(lv: dict) -> None:
    g = lv["grown"]
    v, k = g["status_vcpu"], g["kernel"]
    assert v["source"] == "introspection" and v["tid"] == lv["vcpu_tid"]
    # sched_getattr on the vCPU thread in L1 is what status reports, and covers the interface
    assert (k["policy"], k["runtime_ns"], k["deadline_ns"], k["period_ns"]) == \
        ("deadline", v["runtime_ns"], v["deadline_ns"], v["period_ns"])
    i = v["interface"]
    assert k["runtime_ns"] >= i["budget_ns"] and k["period_ns"] == i["period_ns"]
    # What the kernel enforces meets rtprog's 2 ms / 10 ms on the supply the host delivers
    # (EDP less L1's enforcement overrun), with room for that overrun before the deadline.
    from kairos_libvirt import analysis
    g_ns = lv["ledger_running"]["enforcement_ns"]
    assert k["runtime_ns"] + g_ns <= k["deadline_ns"]
    assert analysis.schedulable([analysis.Task("rtprog", 2_000_000, 10_000_000)], analysis.EDP(
        k["period_ns"], k["runtime_ns"] - 20_000, k["deadline_ns"], g_ns)).schedulable
    assert k["runtime_ns"] * 10 <= k["period_ns"] * 6  # never above the 0.6 ceiling
    assert f"{k['runtime_ns']}/{k['deadline_ns']}/{k['period_ns']}" in g["chrt"]
    assert 'source="introspection"' in g["live_state"]
    b = lv["back"]
    assert b["kernel"] == DECLARED and b["status_vcpu"]["source"] == "declared" and b["tasks"] == 0
    assert "1500000/10000000/10000000" in b["chrt"]


def test_periodic_fifo_programs_are_observed_through_status(lv: dict) -> None:
    """As tests/e2e/test_introspection.py::test_periodic_fifo_programs_are_observed, with kvm-ud."""
    p = lv["periodic"]
    t = p["task"]
    # (kvm-ud events carry no task_struct: tid and comm stay unknown, see kvmud_backend)
    assert (t["policy"], t["priority"], t["vcpu"]) == ("fifo", 50, 0), t
    assert abs(t["observed_period_ns"] - 5_000_000) <= 250_000 and t["samples"] >= 8, t
    v = p["status_vcpu"]
    assert v["source"] == "introspection", v
    assert (p["kernel"]["runtime_ns"], p["kernel"]["period_ns"]) == (v["runtime_ns"], v["period_ns"])
    assert p["kernel"]["runtime_ns"] * 10 <= p["kernel"]["period_ns"] * 6  # the 0.6 ceiling
    c = lv["chrt_task"]
    assert (c["policy"], c["priority"], c["vcpu"]) == ("fifo", 60, 0), c
    assert lv["chrt_gone"]


def test_hold_disarms_every_kvm_ud_site_and_unhold_rearms(lv: dict) -> None:
    """kairosvm hold before a save or migration: kvm-ud restores the guest text (read back)."""
    h, u = lv["hold"], lv["unhold"]
    assert h["rc"] == 0 and "held: no trap armed" in h["out"] and h["state"] == "held", h
    assert h["hits"][0] == h["hits"][1], h  # 12 s of guest activity, not one trap
    assert u["rc"] == 0 and "traps armed again" in u["out"] and u["state"] == "running", u
    assert u["hits_after"] > h["hits"][1]


def test_virsh_destroy_leaves_no_ledger_entry_and_no_agent(lv: dict) -> None:
    assert lv["destroy"]["rc"] == 0, lv["destroy"]
    assert lv["ledger_after_destroy"]["domains"] == {}
    assert lv["agent_exit_s"] is not None, "the agent outlived its domain"
    assert not lv["agent_dir_after_destroy"]
