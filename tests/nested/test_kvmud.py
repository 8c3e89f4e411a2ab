"""The kvm-ud KVM patch in the nested testbed (tier 4, marker ``nested``).

One ``scripts/testbed`` cycle per session (the ``run`` fixture of conftest.py ; about 35 s once the modules are
built, the first build adds about 1.5 min): L1 runs Debian's 6.1 kernel under
TCG with the kairos-patched kvm/kvm-amd, L2 is the project's guest under KVM
in L1, and the driver in L1 uses ``kairos_libvirt.introspect.kvmud``.  These
tests assert on its ``result.json``.

``KAIROS_TESTBED_RESULT=/path/result.json`` reuses a finished run instead.
A machine that cannot run the testbed (not root, no QEMU, no SVM emulation,
module build failure) skips with the reason; ``KAIROS_REQUIRE=nested`` makes
that a failure.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from kairos_libvirt.introspect.kvmud import API_VERSION
from tests.conftest import skip_or_fail

pytestmark = pytest.mark.nested

REPO = Path(__file__).resolve().parents[2]
NOP5 = "0f1f440000"
ARMED5 = "0f0b440000"
EBADMSG = 74


def test_driver_reported_no_error(run: dict) -> None:
    assert run["errors"] == [], "\n".join(run["errors"])


def test_l1_runs_the_patched_kvm_without_next_rip(run: dict) -> None:
    assert run["patched_kvm_loaded"] and run["kairos_ud_api"] == API_VERSION
    # TCG's SVM has no NRIP save: the skip over the 5-byte site cannot come from the hardware
    assert run["kvm_amd"]["nrips"] == "0"
    assert run["kvm_amd"]["nested"] == "1"


def test_l2_ran_under_kvm(run: dict) -> None:
    assert run["l2_hypervisor"] == "KVM"


def test_sites_are_fentry_nops_armed_by_one_byte(run: dict) -> None:
    for name in ("sched_setattr", "getpid"):
        s = run["sites"][name]
        assert int(s["gva"], 16) == int(run["ksyms"][f"__x64_sys_{name}"], 16)
        assert s["before"] == NOP5
        assert s["armed"] == ARMED5 and s["peek_armed"] == ARMED5


def test_arm_refuses_a_site_without_the_nop(run: dict) -> None:
    assert isinstance(run["arm_mismatch"], dict), "arming getpid+1 was accepted"
    assert run["arm_mismatch"]["errno"] == EBADMSG


def test_sched_setattr_events_decode_to_2ms_10ms(run: dict) -> None:
    c = run["capture"]
    # rtprog --policy deadline (1 call) + --hammer 100
    assert c["setattr_events"] >= 101
    assert c["setattr_decoded_distinct"] == [json.dumps(
        {"deadline_ns": 10_000_000, "error": None, "period_ns": 10_000_000, "policy": "deadline",
         "runtime_ns": 2_000_000}, sort_keys=True)]
    first = c["setattr_decoded_first"][0]
    assert int(first["rip"], 16) == int(run["sites"]["sched_setattr"]["gva"], 16)
    assert first["cpl"] == 0 and first["vcpu"] in (0, 1)
    assert int(first["ptr"], 16) < 2**47          # the user pointer from pt_regs->si
    assert int(first["rdi"], 16) >= 2**63          # pt_regs on the kernel stack
    assert c["rtprog_errors"] == []


def test_getpid_events_every_call_recorded(run: dict) -> None:
    c = run["capture"]
    assert c["getpid_events"] >= 4000              # two loops of 2000, one pinned to each vCPU
    assert set(c["getpid_vcpus"]) == {"0", "1"} and min(c["getpid_vcpus"].values()) >= 2000
    assert c["getpid_rips"] == [run["sites"]["getpid"]["gva"]] and c["getpid_cpl"] == [0]
    assert c["seq_contiguous"] and c["host_ns_monotonic_per_vcpu"]
    assert c["hits"] == c["recorded"] == c["events"]
    assert c["overflow"] == c["rate_dropped"] == c["fetch_faults"] == 0


def test_unarmed_ud2_in_l2_user_program_still_gets_sigill(run: dict) -> None:
    assert run["ud2_rc"] == 132


def test_disarm_restores_the_nop(run: dict) -> None:
    d = run["disarm"]
    assert d["returned"] == d["peek"] == NOP5
    assert d["again"] == NOP5                       # disarming twice is harmless
    assert run["bench"]["hits_while_disarmed"] == 0


def test_vm_shutdown_restores_armed_sites(run: dict) -> None:
    s = run["shutdown"]
    # L2's RAM is a shared file in L1: armed bytes are visible there before, restored after QEMU exits
    assert s["armed_mask_before"] == 0b11
    assert s["file_before"] == {"sched_setattr": ARMED5, "getpid": ARMED5}
    assert s["qemu_rc"] == 0
    assert s["file_after"] == {"sched_setattr": NOP5, "getpid": NOP5}
    assert s["counters_after_exit"]["armed_mask"] == 0


def test_rate_limit_skips_without_recording(run: dict) -> None:
    r = run["ratelimit"]
    assert r["rtprog_done"], "the getpid loop did not finish under the rate limit"
    assert r["hits"] >= 3000
    assert r["recorded"] + r["rate_dropped"] == r["hits"]
    # a full bucket of 10, then 100/s; slack for the time around the loop
    assert r["recorded"] <= r["burst"] + r["rate"] * (r["seconds"] + 1)
    assert r["rate_dropped"] > 0


def test_arm_disarm_while_the_guest_calls_the_site(run: dict) -> None:
    t = run["toggle"]
    assert t["toggles"] >= 3, "too few arm/disarm cycles to mean anything"
    assert t["rtprog_done"] and not t["guest_oops"]
    assert t["armed_after"] == ARMED5
    assert t["hits"] > 0                           # it trapped in the armed windows


def test_traps_stay_in_the_kernel(run: dict) -> None:
    """Over the armed getpid loop, L1's KVM saw one exit per call but no userspace exits
    (I/O, MMIO) and no instruction emulation in proportion: the #UD was handled in the kernel."""
    b = run["bench"]
    st = b["kvm_stats_armed"]
    if not st:
        skip_or_fail("nested", "no debugfs KVM counters in L1")
    assert st["exits"] >= b["calls"]
    # the #UD path through userspace or the emulator would count one per call; timers etc. make some
    assert st["io_exits"] + st["mmio_exits"] < b["calls"] // 2
    assert st["insn_emulation"] < b["calls"] // 2


def test_op_on_a_paused_vm_times_out_and_is_cancelled(run: dict) -> None:
    p = run["paused"]
    assert p.get("errno") == 110, p               # ETIMEDOUT: nothing was done
    assert 250 <= p["waited_ms"] < 2000
    assert p["peek_after_cont"] == ARMED5         # and the next op works once the VM runs


def test_bench_figures(run: dict) -> None:
    b = run["bench"]
    assert b["events_while_armed"] >= b["calls"] and b["overflow"] == 0
    assert b["armed_ns_per_call"] > b["disarmed_ns_per_call"] > 0
    print(f"\nkvm-ud getpid x{b['calls']}: armed {b['armed_ns_per_call']} ns/call, "
          f"disarmed {b['disarmed_ns_per_call']} ns/call, ratio {b['ratio']} (nested: L1 under TCG)")


def test_l1_kernel_stayed_clean(run: dict) -> None:
    dmesg = Path(run["_out"], "l1-dmesg.txt").read_text()
    for bad in ("WARNING: CPU", "BUG:", "Call Trace", "general protection"):
        assert bad not in dmesg, f"{bad!r} in L1's dmesg"
    assert "kairos_ud: VM" in dmesg and "restored 2 armed site(s) at teardown, 0 could not be" in dmesg
