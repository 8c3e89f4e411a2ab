"""Real sched_setattr on threads the test creates, compared with /proc."""
from __future__ import annotations

import errno
import os
from fractions import Fraction

import pytest

from kairos_libvirt.errors import HostError
from kairos_libvirt.host import cpuset, dlprobe, proc, sched

pytestmark = pytest.mark.kernel


def proc_policy(tid: int) -> int:
    return int(proc.read_sched_stats(os.getpid(), tid)["policy"])


def test_deadline_set_and_read_back(parked):
    p = parked(1)
    tid = p.tids[0]
    sched.set_deadline(tid, 2_000_000, 8_000_000, 10_000_000)
    got = sched.get(tid)
    assert (got.policy, got.runtime_ns, got.deadline_ns, got.period_ns) == \
        ("deadline", 2_000_000, 8_000_000, 10_000_000)
    assert proc_policy(tid) == sched.SCHED_DEADLINE
    stats = proc.read_sched_stats(os.getpid(), tid)
    assert int(stats["dl.runtime"]) <= 2_000_000


def test_fifo_and_rr(parked):
    p = parked(2)
    sched.set_rt(p.tids[0], "fifo", 42)
    sched.set_rt(p.tids[1], "rr", 7)
    a, b = sched.get(p.tids[0]), sched.get(p.tids[1])
    assert (a.policy, a.priority) == ("fifo", 42)
    assert (b.policy, b.priority) == ("rr", 7)
    assert proc_policy(p.tids[0]) == sched.SCHED_FIFO
    sched.set_other(p.tids[0])
    assert sched.get(p.tids[0]).policy == "other"


def test_bad_parameters_say_what_is_allowed(parked):
    p = parked(1)
    with pytest.raises(HostError) as exc:
        sched.set_deadline(p.tids[0], 500, 10_000_000, 10_000_000)
    assert exc.value.errno == errno.EINVAL
    assert "runtime >= 1024ns" in str(exc.value)


def test_vanished_thread_is_an_outcome():
    gone = 2 ** 22 + 4321
    assert sched.try_get(gone) is None
    with pytest.raises(HostError) as exc:
        sched.set_deadline(gone, 1_000_000, 10_000_000, 10_000_000)
    assert exc.value.errno == errno.ESRCH


def test_over_capacity_is_EBUSY_and_reported(parked):
    free = dlprobe.probe_free_bandwidth()
    assert 0 < free <= len(proc.online_cpus())
    n = int(free) + 1
    p = parked(n)
    period = 100_000_000
    granted = Fraction(0)
    with pytest.raises(HostError) as exc:
        for tid in p.tids:
            runtime = min(period * 95 // 100, int((free - granted) * period))
            sched.set_deadline(tid, runtime + 1_000_000, period, period)
            granted += Fraction(runtime + 1_000_000, period)
    assert exc.value.errno == errno.EBUSY
    assert "deadline bandwidth is used up" in str(exc.value)


def test_probe_is_repeatable_and_does_not_leak():
    a = dlprobe.probe_free_bandwidth()
    b = dlprobe.probe_free_bandwidth()
    assert a == b


def test_sleeping_deadline_to_other_then_rebuild_restores_free_bandwidth(parked):
    """The kernel bug DESIGN.md §2 measured, and the repair the agent relies on."""
    before = dlprobe.probe_free_bandwidth()
    p = parked(1)
    sched.set_deadline(p.tids[0], 10_000_000, 100_000_000, 100_000_000)
    sched.set_other(p.tids[0])  # sleeping thread: bandwidth lost for good
    leaked = dlprobe.probe_free_bandwidth()
    assert cpuset.rebuild_root_domains()
    after = dlprobe.probe_free_bandwidth()
    assert after == before
    # Record what this kernel does (not asserted: a fixed kernel leaks nothing).
    print(f"free before {float(before)}, after the switch {float(leaked)}, "
          f"after rebuild {float(after)}")
