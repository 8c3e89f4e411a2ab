"""The declaration: parse, validate (precise messages), serialize."""
from __future__ import annotations

import glob
import os
from fractions import Fraction

import pytest
from hypothesis import given, settings, strategies as st

from kairos_libvirt import DECL_NS, spec
from kairos_libvirt.errors import DeclarationError, KairosError
from kairos_libvirt.spec import Declaration, Introspection, VcpuSched

ROOT = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir)


def elem(body: str) -> str:
    return f'<kairos:realtime xmlns:kairos="{DECL_NS}">{body}</kairos:realtime>'


def domain(body: str, vcpus: str = "<vcpu>2</vcpu>", extra: str = "") -> bytes:
    return (f"<domain type='qemu'><name>t</name><uuid>u</uuid>{vcpus}"
            f"<metadata>{elem(body)}</metadata>{extra}</domain>").encode()


def test_examples_are_valid():
    files = glob.glob(os.path.join(ROOT, "xml", "examples", "*.xml"))
    assert len(files) >= 3
    for f in files:
        with open(f, "rb") as fh:
            assert spec.declaration_from_xml(fh.read())


def test_default_and_override():
    info = spec.parse_domain(domain(
        '<kairos:default policy="deadline" runtime="2ms" period="10ms"/>'
        '<kairos:vcpu id="1" policy="fifo" priority="50" runtime="5ms" period="10ms"/>'
        '<kairos:introspection backend="gdbstub" ceiling="0.6"/>'))
    d = info.declaration
    r = d.resolve(info.vcpus_max)
    assert r[0] == VcpuSched("deadline", 2_000_000, 10_000_000)
    assert r[0].effective_deadline_ns == 10_000_000
    assert r[1] == VcpuSched("fifo", 5_000_000, 10_000_000, priority=50)
    assert d.introspection == Introspection("gdbstub", Fraction(3, 5))
    assert d.ceiling_for(r[0]) == Fraction(3, 5)


def test_ceiling_defaults_to_declared_bandwidth():
    d = spec.declaration_from_xml(elem('<kairos:default policy="deadline" runtime="2ms" '
                                       'period="10ms"/>'))
    assert d.introspection.backend == "off"
    assert d.ceiling_for(d.default) == Fraction(1, 5)


def test_micro_sign_is_accepted_by_parser_and_schema():
    d = spec.declaration_from_xml(elem('<kairos:default policy="deadline" runtime="500µs" '
                                       'period="10ms"/>'))
    assert d.default.runtime_ns == 500_000


def test_bare_numbers_are_microseconds():
    d = spec.declaration_from_xml(elem('<kairos:default policy="deadline" runtime="2000" '
                                       'deadline="5000" period="10000"/>'))
    assert (d.default.runtime_ns, d.default.deadline_ns, d.default.period_ns) == \
        (2_000_000, 5_000_000, 10_000_000)


BAD = [
    # (body or full xml, message fragment)
    ('<kairos:default runtime="2ms" period="10ms"/>', "missing attribute 'policy'"),
    ('<kairos:default policy="idle" runtime="2ms" period="10ms"/>', "policy 'idle' is not allowed"),
    ('<kairos:default policy="deadline" period="10ms"/>', "needs attribute 'runtime'"),
    ('<kairos:default policy="fifo" runtime="2ms" period="10ms"/>', "needs attribute 'priority'"),
    ('<kairos:default policy="deadline" runtime="2 min" period="10ms"/>', "'2 min' is not a time"),
    ('<kairos:default policy="deadline" runtime="-2ms" period="10ms"/>', "is not a time"),
    ('<kairos:default policy="deadline" runtime="0" period="10ms"/>', "below the kernel's minimum"),
    ('<kairos:default policy="deadline" runtime="1000ns" period="10ms"/>', "minimum of 1024ns"),
    ('<kairos:default policy="deadline" runtime="2ms" period="0"/>', "must be positive"),
    ('<kairos:default policy="deadline" runtime="2ms" period="99999999999999999999s"/>',
     "too large"),
    ('<kairos:default policy="deadline" runtime="20ms" period="10ms"/>',
     "runtime <= deadline <= period"),
    ('<kairos:default policy="deadline" runtime="2ms" deadline="1ms" period="10ms"/>',
     "runtime <= deadline <= period"),
    ('<kairos:default policy="deadline" runtime="2ms" deadline="20ms" period="10ms"/>',
     "runtime <= deadline <= period"),
    ('<kairos:default policy="fifo" priority="0" runtime="2ms" period="10ms"/>',
     "1..99"),
    ('<kairos:default policy="fifo" priority="100" runtime="2ms" period="10ms"/>',
     "100 is out of range"),
    ('<kairos:default policy="rr" priority="high" runtime="2ms" period="10ms"/>',
     "'high' is not an integer"),
    ('<kairos:default policy="fifo" priority="5" runtime="20ms" period="10ms"/>',
     "exceeds period"),
    ('<kairos:default policy="fifo" priority="5" runtime="1500ns" period="10ms"/>',
     "whole number of microseconds"),
    ('<kairos:default policy="fifo" priority="5" deadline="5ms" runtime="2ms" period="10ms"/>',
     "'deadline' does not apply to policy 'fifo'"),
    ('<kairos:default policy="deadline" priority="5" runtime="2ms" period="10ms"/>',
     "'priority' does not apply"),
    ('<kairos:vcpu policy="deadline" runtime="2ms" period="10ms"/>', "missing attribute 'id'"),
    ('<kairos:vcpu id="-1" policy="deadline" runtime="2ms" period="10ms"/>', "not a vCPU number"),
    ('<kairos:vcpu id="x" policy="deadline" runtime="2ms" period="10ms"/>', "not a vCPU number"),
    ('<kairos:vcpu id="0" policy="deadline" runtime="2ms" period="10ms"/>'
     '<kairos:vcpu id="0" policy="deadline" runtime="2ms" period="10ms"/>', "declared twice"),
    ('', "declares no reservation"),
    ('<kairos:bogus/>', "unknown element <bogus>"),
    ('<other xmlns="urn:x"/>', "not in namespace"),
    ('<kairos:default policy="deadline" runtime="2ms" period="10ms"/>'
     '<kairos:introspection backend="ebpf"/>', "backend 'ebpf' is not allowed"),
    ('<kairos:default policy="deadline" runtime="5ms" period="10ms"/>'
     '<kairos:introspection ceiling="0.4"/>', "ceiling 0.4 is below the bandwidth 0.5"),
    ('<kairos:default policy="deadline" runtime="1ms" period="10ms"/>'
     '<kairos:introspection ceiling="2"/>', "outside (0, 1]"),
    ('<kairos:default policy="deadline" runtime="1ms" period="10ms"/>'
     '<kairos:introspection mode="x"/>', "unknown attribute 'mode'"),
    ('<kairos:default policy="deadline" runtime="1ms" period="10ms"/>'
     '<kairos:default policy="deadline" runtime="1ms" period="10ms"/>', "more than one <default>"),
    ('<kairos:default policy="deadline" runtime="1ms" period="10ms">text</kairos:default>',
     "takes no text"),
]


@pytest.mark.parametrize("body,fragment", BAD)
def test_bad_declarations_have_precise_messages(body, fragment):
    with pytest.raises(DeclarationError) as exc:
        spec.parse_domain(domain(body))
    assert fragment in str(exc.value)


def test_vcpu_id_out_of_range():
    with pytest.raises(DeclarationError, match=r"has 2 vCPU\(s\); allowed ids: 0..1"):
        spec.parse_domain(domain('<kairos:vcpu id="2" policy="deadline" runtime="2ms" '
                                 'period="10ms"/>'))


def test_wrong_namespace_is_refused_not_ignored():
    xml = (b"<domain><name>t</name><metadata><realtime xmlns='http://kairosvm.org/xmlns/libvirt/"
           b"realtime/0.9'/></metadata></domain>")
    with pytest.raises(DeclarationError, match="does not know"):
        spec.parse_domain(xml)


def test_unrelated_metadata_is_ignored():
    xml = b"<domain><name>t</name><metadata><app xmlns='urn:x'/></metadata></domain>"
    assert spec.parse_domain(xml).declaration is None


def test_two_elements_refused():
    one = elem('<kairos:default policy="deadline" runtime="1ms" period="10ms"/>')
    xml = f"<domain><name>t</name><metadata>{one}{one}</metadata></domain>".encode()
    with pytest.raises(DeclarationError, match="more than one <realtime>"):
        spec.parse_domain(xml)


def test_huge_element_refused():
    pad = "<!--" + "x" * (spec.MAX_ELEMENT_BYTES) + "-->"
    with pytest.raises(DeclarationError, match="bytes; at most"):
        spec.parse_domain(domain(pad + '<kairos:default policy="deadline" runtime="1ms" '
                                       'period="10ms"/>'))


def test_invalid_utf8_and_garbage():
    with pytest.raises(DeclarationError, match="not well-formed"):
        spec.parse_domain(b"<domain><name>\xff\xfe</name></domain>")
    with pytest.raises(DeclarationError, match="not well-formed"):
        spec.parse_domain(b"<domain>")
    with pytest.raises(DeclarationError, match="expected a libvirt <domain>"):
        spec.parse_domain(b"<network/>")


def test_libvirt_vcpusched_clash():
    with pytest.raises(DeclarationError, match="vcpusched"):
        spec.parse_domain(domain('<kairos:default policy="deadline" runtime="1ms" period="10ms"/>',
                                 extra="<cputune><vcpusched vcpus='0-1' scheduler='fifo' "
                                       "priority='1'/></cputune>"))


def test_pinning_is_recorded():
    info = spec.parse_domain(domain('<kairos:default policy="deadline" runtime="1ms" '
                                    'period="10ms"/>',
                                    extra="<cputune><vcpupin vcpu='1' cpuset='1'/></cputune>"))
    assert info.pinned == {1: "1"}
    info = spec.parse_domain(domain('<kairos:default policy="deadline" runtime="1ms" '
                                    'period="10ms"/>', vcpus="<vcpu cpuset='0'>2</vcpu>"))
    assert info.pinned == {0: "0", 1: "0"}


def test_entities_are_not_expanded():
    xml = (b'<!DOCTYPE d [<!ENTITY e SYSTEM "file:///etc/passwd">]>'
           b"<domain><name>&e;</name></domain>")
    info = spec.parse_domain(xml)
    assert "root" not in info.name


def test_schema_catches_what_the_parser_does_not_check():
    # A text node in <realtime> itself passes our walker but not RelaxNG.
    with pytest.raises(DeclarationError, match="schema"):
        spec.declaration_from_xml(elem('oops<kairos:default policy="deadline" runtime="1ms" '
                                       'period="10ms"/>'))


def test_every_field_round_trips():
    """Like virtinst's test_checkprops: every field of the table is exercised."""
    decl = Declaration(
        default=VcpuSched("deadline", 1_500_000, 10_000_000, deadline_ns=5_000_000),
        vcpus={1: VcpuSched("rr", 2_000_000, 10_000_000, priority=42)},
        introspection=Introspection("kvm-ud", Fraction(1, 3)))
    xml = spec.to_xml(decl)
    for attr, *_ in spec.SCHED_FIELDS:
        assert f'{attr}="' in xml
    assert spec.declaration_from_xml(xml) == decl
    assert 'ceiling="1/3"' in xml


times = st.sampled_from(["1ms", "2ms", "10ms", "500us", "5000", "1s", "1024ns", "-1", "x", "0"])
attrs = st.fixed_dictionaries({}, optional={
    "policy": st.sampled_from(["deadline", "fifo", "rr", "other", ""]),
    "runtime": times, "deadline": times, "period": times,
    "priority": st.sampled_from(["0", "1", "50", "99", "100", "x"]),
    "id": st.sampled_from(["0", "1", "5", "-1", "a"])})


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["default", "vcpu", "introspection", "junk"]), attrs),
                max_size=4))
def test_fuzz_only_our_error_escapes(children):
    body = "".join(f'<kairos:{tag} ' + " ".join(f'{k}="{v}"' for k, v in a.items()) + "/>"
                   for tag, a in children)
    try:
        info = spec.parse_domain(domain(body))
    except KairosError:
        return
    for s in info.declaration.resolve(info.vcpus_max).values():
        assert 1024 <= s.runtime_ns <= s.effective_deadline_ns <= s.period_ns


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_bytes_only_our_error_escapes(data):
    try:
        spec.parse_domain(data)
    except KairosError:
        pass
