"""RT group bandwidth on a scratch cpu cgroup: parent first, errors explained."""
from __future__ import annotations

import errno
import os

import pytest

from kairos_libvirt import rtbw
from kairos_libvirt.errors import HostError
from kairos_libvirt.host import cgroup, sched

pytestmark = pytest.mark.kernel


def test_parent_first_then_child(tmp_cpu_cgroup):
    parent = tmp_cpu_cgroup
    child = os.path.join(parent, "vcpu0")
    os.mkdir(child)
    runtime = rtbw.parent_runtime_us([(3000, 10000)])
    cgroup.set_rt(parent, runtime, rtbw.PARENT_PERIOD_US)
    cgroup.set_rt(child, 3000, 10000)
    assert cgroup.read_rt(child) == (3000, 10000)
    assert cgroup.read_rt(parent) == (runtime, 1_000_000)
    assert cgroup.other_rt_users(parent, exclude="") == {child: (3000, 10000)}


def test_child_above_parent_is_refused_with_a_fix(tmp_cpu_cgroup):
    child = os.path.join(tmp_cpu_cgroup, "vcpu0")
    os.mkdir(child)
    with pytest.raises(HostError) as exc:
        cgroup.set_rt(child, 3000, 10000)  # parent still has 0
    assert exc.value.errno in (errno.EINVAL, errno.EBUSY)
    assert "parent first" in str(exc.value) and "wanted 3000" in str(exc.value)


def test_fifo_in_a_zero_group_is_eperm(tmp_cpu_cgroup, parked):
    p = parked(1)
    with open(os.path.join(tmp_cpu_cgroup, "tasks"), "w") as f:
        f.write(str(p.tids[0]))
    with pytest.raises(HostError) as exc:
        sched.set_rt(p.tids[0], "fifo", 10)
    assert exc.value.errno == errno.EPERM
    # Give the group a budget and it works; then move the thread back out.
    cgroup.set_rt(tmp_cpu_cgroup, 10000, 1_000_000)
    sched.set_rt(p.tids[0], "fifo", 10)
    assert sched.get(p.tids[0]).policy == "fifo"
    assert cgroup.thread_cpu_cgroup(os.getpid(), p.tids[0]) == tmp_cpu_cgroup
    sched.set_other(p.tids[0])
    with open(os.path.join(cgroup.cpu_v1_mount(), "tasks"), "w") as f:
        f.write(str(p.tids[0]))


def test_zero_and_remove_subtree(tmp_cpu_cgroup):
    child = os.path.join(tmp_cpu_cgroup, "leftover")
    os.mkdir(child)
    cgroup.set_rt(tmp_cpu_cgroup, 200000, 1_000_000)
    cgroup.set_rt(child, 1000, 10000)
    cgroup.zero_rt_subtree(tmp_cpu_cgroup)
    assert cgroup.read_rt(child)[0] == 0 and cgroup.read_rt(tmp_cpu_cgroup)[0] == 0
    cgroup.remove_empty_subtree(child)
    assert not os.path.exists(child)


def test_read_missing_group_is_a_host_error():
    with pytest.raises(HostError, match="No such file"):
        cgroup.read_rt("/sys/fs/cgroup/cpu/does-not-exist")
