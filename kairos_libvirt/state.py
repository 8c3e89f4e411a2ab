"""The live state the agent publishes in ``<metadata>`` (second namespace).

``virsh metadata DOM http://kairosvm.org/xmlns/libvirt/realtime-state/1.0``::

    <state agent-pid="812" qemu-pid="790" updated="2026-11-24T21:03:00Z">
      <vcpu id="0" tid="801" source="declared" policy="deadline" priority="0"
            runtime="2000000ns" deadline="10000000ns" period="10000000ns"
            enforced="2026-11-24T21:02:58Z"/>
      <vcpu id="1" tid="802" source="declared" policy="other" error="sched_setattr(tid 802): …"/>
    </state>

Parameters are what ``sched_getattr`` returned, never the declaration.
"""
from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from lxml import etree

from . import STATE_NS, STATE_PREFIX

_Q = "{%s}" % STATE_NS


def utcnow() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class VcpuState:
    vcpu: int
    tid: Optional[int] = None
    policy: Optional[str] = None
    priority: Optional[int] = None
    runtime_ns: Optional[int] = None
    deadline_ns: Optional[int] = None
    period_ns: Optional[int] = None
    enforced: Optional[str] = None
    source: str = "declared"
    error: Optional[str] = None
    #: The analysis's server for this vCPU: (budget_ns, period_ns, deadline_ns).
    interface: Optional[Tuple[int, int, int]] = None
    note: Optional[str] = None


#: Guest task fields, in order: (attribute, key, is a time in ns).
TASK_FIELDS = (("key", "key", False), ("tid", "tid", False), ("comm", "comm", False),
               ("vcpu", "vcpu", False), ("policy", "policy", False),
               ("priority", "priority", False), ("runtime", "runtime_ns", True),
               ("deadline", "deadline_ns", True), ("period", "period_ns", True),
               ("observed-period", "observed_period_ns", True), ("jitter", "jitter_ns", True),
               ("samples", "samples", False), ("period-source", "period_source", False),
               ("learnt-from", "origin", False), ("bound", "bound_ns", True))
INTRO_COUNTERS = ("hits", "decoded", "rejected", "suppressed", "handler_ns", "evicted",
                  "reactions", "reaction_p50_us", "reaction_p99_us", "reaction_event_p50_us",
                  "reaction_analysed_p50_us", "reaction_granted_p50_us",
                  "server_changes", "server_flips",
                  "stopped_ns", "stops", "longest_stop_ns", "peak_window_ns", "long_stops",
                  "attach_stops", "attach_longest_ns", "budget_waits", "budget_wait_ns",
                  "budget_window_ns", "budget_max_stop_ns", "budget_hit_cost_ns", "charged_ns",
                  "census_runs", "discovered", "sleep_samples")


@dataclass
class DomainState:
    agent_pid: Optional[int]
    qemu_pid: Optional[int]
    vcpus: List[VcpuState] = field(default_factory=list)
    updated: Optional[str] = None
    errors: List[str] = field(default_factory=list)
    #: backend, state, error, notes, slide and INTRO_COUNTERS; None when off.
    introspection: Optional[Dict[str, object]] = None
    tasks: List[Dict[str, object]] = field(default_factory=list)


_TIME_ATTRS = (("runtime", "runtime_ns"), ("deadline", "deadline_ns"), ("period", "period_ns"))


def to_xml(st: DomainState) -> str:
    root = etree.Element(_Q + "state", nsmap={STATE_PREFIX: STATE_NS})
    for key, value in (("agent-pid", st.agent_pid), ("qemu-pid", st.qemu_pid),
                       ("updated", st.updated)):
        if value is not None:
            root.set(key, str(value))
    for v in st.vcpus:
        el = etree.SubElement(root, _Q + "vcpu", {"id": str(v.vcpu), "source": v.source})
        for key, value in (("tid", v.tid), ("policy", v.policy), ("priority", v.priority)):
            if value is not None:
                el.set(key, str(value))
        for attr, name in _TIME_ATTRS:
            value = getattr(v, name)
            if value is not None:
                el.set(attr, f"{value}ns")
        if v.enforced:
            el.set("enforced", v.enforced)
        if v.error:
            el.set("error", v.error)
        if v.note:
            el.set("note", v.note)
        if v.interface:
            b, p, d = v.interface
            etree.SubElement(el, _Q + "interface", {"budget": f"{b}ns", "period": f"{p}ns",
                                                    "deadline": f"{d}ns"})
    for msg in st.errors:
        etree.SubElement(root, _Q + "error").text = msg
    if st.introspection is not None:
        i = st.introspection
        el = etree.SubElement(root, _Q + "introspection",
                              {"backend": str(i.get("backend")), "state": str(i.get("state"))})
        if i.get("slide") is not None:
            el.set("slide", f"{i['slide']:#x}")
        for key in INTRO_COUNTERS:
            if i.get(key) is not None:
                el.set(key.replace("_", "-"), str(i[key]))
        if i.get("error"):
            etree.SubElement(el, _Q + "error").text = str(i["error"])
        for note in i.get("notes") or ():
            etree.SubElement(el, _Q + "note").text = str(note)
    for t in st.tasks:
        el = etree.SubElement(root, _Q + "task")
        for attr, key, is_ns in TASK_FIELDS:
            value = t.get(key)
            if value is not None:
                el.set(attr, f"{value}ns" if is_ns else str(value))
    return etree.tostring(root, encoding="unicode")


def from_xml(text: str) -> DomainState:
    root = etree.fromstring(text.encode(), etree.XMLParser(resolve_entities=False,
                                                           no_network=True))
    def _int(el: etree._Element, key: str) -> Optional[int]:
        v = el.get(key)
        return int(v) if v is not None else None

    def _ns(el: etree._Element, key: str) -> Optional[int]:
        v = el.get(key)
        return int(v[:-2]) if v is not None and v.endswith("ns") else None

    st = DomainState(agent_pid=_int(root, "agent-pid"), qemu_pid=_int(root, "qemu-pid"),
                     updated=root.get("updated"))
    # libvirt hands the element back qualified (API) or not (`virsh metadata`).
    def children(tag: str) -> list:
        return [el for el in root if isinstance(el.tag, str) and etree.QName(el).localname == tag]

    def sub(el: etree._Element, tag: str) -> list:
        return [c for c in el if isinstance(c.tag, str) and etree.QName(c).localname == tag]

    for el in children("vcpu"):
        iface = None
        for i in sub(el, "interface"):
            iface = (_ns(i, "budget"), _ns(i, "period"), _ns(i, "deadline"))
        st.vcpus.append(VcpuState(vcpu=int(el.get("id")), tid=_int(el, "tid"),
                                  policy=el.get("policy"), priority=_int(el, "priority"),
                                  runtime_ns=_ns(el, "runtime"), deadline_ns=_ns(el, "deadline"),
                                  period_ns=_ns(el, "period"), enforced=el.get("enforced"),
                                  source=el.get("source", "declared"), error=el.get("error"),
                                  interface=iface, note=el.get("note")))
    st.errors = [e.text or "" for e in children("error")]
    for el in children("introspection"):
        intro: Dict[str, object] = {"backend": el.get("backend"), "state": el.get("state")}
        if el.get("slide"):
            intro["slide"] = int(el.get("slide"), 16)
        for key in INTRO_COUNTERS:
            if el.get(key.replace("_", "-")) is not None:
                intro[key] = int(el.get(key.replace("_", "-")))
        errs = sub(el, "error")
        intro["error"] = errs[0].text if errs else None
        intro["notes"] = [n.text or "" for n in sub(el, "note")]
        st.introspection = intro
    for el in children("task"):
        t: Dict[str, object] = {}
        for attr, key, is_ns in TASK_FIELDS:
            v = el.get(attr)
            if v is None:
                t[key] = None
            elif is_ns:
                t[key] = int(v[:-2]) if v.endswith("ns") else None
            elif key in ("tid", "vcpu", "priority", "samples"):
                t[key] = int(v)
            else:
                t[key] = v
        st.tasks.append(t)
    return st


def as_dict(st: DomainState) -> Dict[int, VcpuState]:
    return {v.vcpu: v for v in st.vcpus}
