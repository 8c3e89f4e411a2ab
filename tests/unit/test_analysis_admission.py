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
