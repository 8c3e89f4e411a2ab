"""Host admission arithmetic: limits, per-CPU sums, constrained deadlines, refusals."""
from __future__ import annotations

from fractions import Fraction

import pytest

from kairos_libvirt.analysis import (Reservation, Task, admit, check_admission, dl_bandwidth_limit,
                                     interface_for, reservations_from)
from kairos_libvirt.errors import AdmissionError, AnalysisError

MS = 1_000_000


def R(name, runtime_ms, period_ms, deadline_ms=None, cpu=None):
    d = None if deadline_ms is None else deadline_ms * MS
    return Reservation(name, runtime_ms * MS, period_ms * MS, d, cpu)


def test_limit_from_the_sysctls():
    assert dl_bandwidth_limit(950_000, 1_000_000) == Fraction(19, 20)
    assert dl_bandwidth_limit(-1, 1_000_000) is None
    with pytest.raises(AnalysisError, match="sched_rt_runtime_us 2 / sched_rt_period_us 1"):
        dl_bandwidth_limit(2, 1)


def test_admitted_within_the_root_domain():
    r = check_admission([R("a", 4, 10), R("b", 5, 10)], cpus=[0, 1])
    assert r.admitted and r.domain_total == Fraction(9, 10) and r.domain_capacity == Fraction(19, 10)
    assert r.message == "admitted: deadline bandwidth 0.9 of 1.9"


def test_refused_over_the_root_domain_names_the_numbers():
    rs = [R(n, 5, 10) for n in "abcd"]
    r = check_admission(rs, cpus=[0, 1])
    assert not r.admitted
    assert "root domain of 2 CPUs: deadline bandwidth 2 (existing 0 + requested 2) " \
           "exceeds 2 × limit 0.95 = 1.9" in r.message
    with pytest.raises(AdmissionError, match="exceeds 2 × limit 0.95 = 1.9"):
        admit(rs, cpus=[0, 1])


def test_refused_per_cpu_when_pinned():
    r = check_admission([R("vm/vcpu0", 6, 10, cpu=0), R("vm/vcpu1", 4, 10, cpu=0)],
                        cpus=[0, 1], existing={0: Fraction(1, 20)})
    assert not r.admitted
    assert ("CPU 0: deadline bandwidth 1.05 (existing 0.05 + requested 1: vm/vcpu0 0.6, "
            "vm/vcpu1 0.4) exceeds the limit 0.95") in r.message
    assert r.cpus[0].total == Fraction(21, 20) and not r.cpus[0].fits


def test_no_limit_means_the_kernel_checks_nothing_but_edf_still_must_hold():
    # Two servers with deadline = runtime = half the period on one CPU: bandwidth 1,
    # but EDF must run both in the same first 5 ms.
    rs = [R("a", 5, 10, 5, cpu=0), R("b", 5, 10, 5, cpu=0)]
    r = check_admission(rs, cpus=[0], limit=None)
    assert not r.admitted and "would miss their deadlines" in r.message
    ok = check_admission([R("a", 2, 10, 5, cpu=0), R("b", 3, 10, 5, cpu=0)], cpus=[0])
    assert ok.admitted and ok.cpus[0].deadlines_met


def test_constrained_deadlines_with_existing_load_use_density():
    rs = [R("a", 2, 10, 4, cpu=0)]
    assert check_admission(rs, cpus=[0], existing={0: Fraction(1, 2)}).admitted      # 0.5 + 0.5
    assert not check_admission(rs, cpus=[0], existing={0: Fraction(6, 10)}).admitted  # 0.6 + 0.5


def test_implicit_deadlines_over_one_are_missed():
    r = check_admission([R("a", 6, 10, cpu=0), R("b", 5, 10, cpu=0)], cpus=[0], limit=None)
    assert not r.admitted and not r.cpus[0].deadlines_met


@pytest.mark.parametrize("kw,match", [
    (dict(cpus=[]), "give the distinct CPUs"),
    (dict(cpus=[0, 0]), "give the distinct CPUs"),
    (dict(cpus=[0], existing={3: Fraction(1, 10)}), "existing load on CPU 3"),
])
def test_bad_admission_input(kw, match):
    with pytest.raises(AnalysisError, match=match):
        check_admission([R("a", 1, 10)], **kw)


def test_bad_reservations():
    with pytest.raises(AnalysisError, match="reservation 'a': cpu 5 is not allowed"):
        check_admission([R("a", 1, 10, cpu=5)], cpus=[0])
    with pytest.raises(AnalysisError, match="reservation 'x': runtime 1000"):
        Reservation("x", 1000, MS)
    with pytest.raises(AnalysisError, match="runtime <= deadline <= period"):
        R("x", 5, 10, 4)


def test_reservations_from_an_interface():
    g = interface_for([Task("a", MS, 10 * MS, vcpu=0)], vcpus=2, period_ns=MS)
    rs = reservations_from(g, prefix="vm1/", cpus={0: 3, 1: 4})
    assert len(rs) == 1  # the idle vCPU needs none
    assert rs[0].name == "vm1/vcpu0" and rs[0].cpu == 3 and rs[0].runtime_ns == g.servers[0].runtime_ns
    assert check_admission(rs, cpus=[3, 4]).admitted


# -- delivered supply: the host's enforcement granularity and global EDF -----------------

from kairos_libvirt.analysis.admission import bcl_test, density_test, _Sporadic  # noqa: E402
from kairos_libvirt.analysis.enforcement import Enforcement, tick_enforcement  # noqa: E402

TICK = tick_enforcement(250, None)


def S(name, runtime_ns, period_ns, deadline_ns, cpu=None):
    return Reservation(name, runtime_ns, period_ns, deadline_ns, cpu)


def test_tick_enforcement_is_one_jiffy_and_says_so():
    assert TICK.granularity_ns == 4 * MS
    assert "CONFIG_HZ=250" in TICK.source and "assumed off" in TICK.source
    assert tick_enforcement(250, True).granularity_ns < 100_000


def test_the_tables_4_5_50_servers_are_refused_by_the_global_test_and_by_the_tick():
    # The 4 ms / 5 ms / 50 ms servers: the kernel overruns them by up to a tick.
    rs = [S(f"d{i}", 4 * MS, 50 * MS, 5 * MS) for i in range(3)]
    # Utilisation 0.24 of 1.9, yet three chunks of 4 ms due within 5 ms on 2 CPUs: the
    # third misses even with exact enforcement (the table's 94 ms blackouts).
    exact = check_admission(rs, cpus=[0, 1])
    assert not exact.admitted and exact.domain_total == Fraction(6, 25)
    assert "fail the global-EDF density (GFB) and BCL tests" in exact.message
    r = check_admission(rs, cpus=[0, 1], enforcement=TICK, fair_server=True)
    assert not r.admitted
    assert "d0: runtime 4ms + the host's enforcement granularity 4ms" in r.message
    assert "deadline (and period) of at least 8ms" in r.message and "HRTICK_DL" in r.message


def test_sub_tick_servers_the_analysis_used_to_grant_are_refused():
    rs = [S("v0", 420_000, 3_952_000, 448_000), S("v1", 1_540_000, 9 * MS, 1_540_000)]
    r = check_admission(rs, cpus=[0, 1], enforcement=TICK, fair_server=True)
    assert not r.admitted and "v0: runtime 420us" in r.message and "v1: runtime 1540us" in r.message


def test_a_server_with_room_for_the_overrun_is_admitted_with_the_fair_servers():
    r = check_admission([S("v", 4 * MS, 20 * MS, 10 * MS)], cpus=[0, 1], enforcement=TICK,
                        fair_server=True)
    assert r.admitted, r.message


def test_two_dense_servers_fail_the_global_test_though_bandwidth_fits():
    # (4 + 4)/10 = 0.8 each: GFB allows 2 − 0.8 = 1.2 < 1.6 + fair servers; BCL fails too.
    rs = [S(f"v{i}", 4 * MS, 20 * MS, 10 * MS) for i in range(2)]
    assert check_admission(rs, cpus=[0, 1], fair_server=True).admitted  # exact enforcement
    r = check_admission(rs, cpus=[0, 1], enforcement=TICK, fair_server=True)
    assert not r.admitted
    assert "fail the global-EDF density (GFB) and BCL tests" in r.message
    assert "fair servers count 50 ms per 1 s" in r.message


def test_dhall_set_is_refused_by_both_global_tests():
    # Two light tasks then one heavy: global EDF runs the light ones first on both CPUs and
    # the heavy one finishes at 102 > 101.  Utilisation (1.03 of 2) would admit it.
    ts = [_Sporadic("a", 2, 100, 100), _Sporadic("b", 2, 100, 100), _Sporadic("h", 100, 101, 101)]
    assert not density_test(ts, 2) and not bcl_test(ts, 2)
    rs = [S("a", 2000, 100_000, 100_000), S("b", 2000, 100_000, 100_000), S("h", 100_000, 101_000, 101_000)]
    assert not check_admission(rs, cpus=[0, 1]).admitted


def test_light_sets_pass_the_global_tests():
    ts = [_Sporadic(n, 1, 10, 10) for n in "abcd"]
    assert density_test(ts, 2) and bcl_test(ts, 2)


def test_bcl_admits_what_density_alone_refuses():
    # GFB: 1.15 > 2 − 0.95; BCL bounds each one's interference in the other's window.
    ts = [_Sporadic("h", 95, 100, 100), _Sporadic("l", 20, 100, 100)]
    assert not density_test(ts, 2)
    assert bcl_test(ts, 2)


def test_pinned_servers_count_the_overrun_in_the_demand_test():
    rs = [S("a", 2 * MS, 10 * MS, 5 * MS, cpu=0), S("b", 2 * MS, 10 * MS, 5 * MS, cpu=0)]
    assert check_admission(rs, cpus=[0, 1]).admitted
    r = check_admission(rs, cpus=[0, 1], enforcement=Enforcement(2 * MS, "test"))
    assert not r.admitted and "CPU 0" in r.message
