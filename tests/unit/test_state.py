from kairos_libvirt import STATE_NS
from kairos_libvirt.state import DomainState, VcpuState, from_xml, to_xml
from kairos_libvirt.virt import unqualified


def sample() -> DomainState:
    return DomainState(agent_pid=10, qemu_pid=9, updated="2026-11-24T00:00:00Z", vcpus=[
        VcpuState(0, tid=11, policy="deadline", priority=0, runtime_ns=2_000_000,
                  deadline_ns=10_000_000, period_ns=10_000_000, enforced="2026-11-24T00:00:00Z"),
        VcpuState(1, tid=12, policy="other", error="sched_setattr(tid 12): busy")],
        errors=["symbols not found"])


def test_round_trip_qualified():
    st = sample()
    xml = to_xml(st)
    assert STATE_NS in xml and 'runtime="2000000ns"' in xml
    assert from_xml(xml) == st


def test_round_trip_as_virsh_prints_it():
    # `virsh metadata` prints the element without its namespace.
    st = sample()
    assert from_xml(unqualified(to_xml(st))) == st
    assert "xmlns" not in unqualified(to_xml(st))
