"""The real-time declaration: parse, validate and serialize our metadata element.

One field table per element drives both parsing and serialization, so the two
cannot drift (virtinst's XMLProperty idea).  Validation is two-layered: our own
parser gives precise messages (element, bad value, what is allowed), then the
RelaxNG schema in ``xml/kairos.rng`` catches anything structural we missed.
"""
from __future__ import annotations

import dataclasses
import os
from functools import lru_cache
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from lxml import etree

from . import DECL_NS, DECL_PREFIX
from .errors import DeclarationError, UnitError
from .model import Declaration, DomainInfo, Introspection, VcpuSched
from .units import format_fraction, format_ns, parse_fraction, parse_time_ns

__all__ = ["Declaration", "DomainInfo", "Introspection", "VcpuSched", "parse_domain",
           "parse_element", "declaration_from_xml", "to_xml", "to_element", "find_element"]

POLICIES = ("deadline", "fifo", "rr")
BACKENDS = ("off", "gdbstub", "kvm-ud")
#: ``sched_setattr`` refuses a runtime below 1 << DL_SCALE ns (kernel/sched/deadline.c).
MIN_RUNTIME_NS = 1024
PRIO_MIN, PRIO_MAX = 1, 99
#: Our element is a handful of lines; anything bigger is a mistake or an attack.
MAX_ELEMENT_BYTES = 64 * 1024
MAX_VCPUS = 4096

_Q = "{%s}" % DECL_NS


# --------------------------------------------------------------------------
# Field tables: (attribute, parse, format, dataclass field)

def _parse_prio(text: str, what: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise DeclarationError(f"{what}: {text!r} is not an integer; "
                               f"a priority is {PRIO_MIN}..{PRIO_MAX} (higher runs first)") from None
    if not PRIO_MIN <= value <= PRIO_MAX:
        raise DeclarationError(f"{what}: {value} is out of range; a Linux real-time priority is "
                               f"{PRIO_MIN}..{PRIO_MAX} (higher runs first)")
    return value


def _parse_time(text: str, what: str) -> int:
    try:
        return parse_time_ns(text, what)
    except UnitError as exc:
        raise DeclarationError(str(exc)) from None


_Field = Tuple[str, Callable[[str, str], object], Callable[[object], str], str]
SCHED_FIELDS: List[_Field] = [
    ("policy", lambda t, w: t, str, "policy"),
    ("priority", _parse_prio, str, "priority"),
    ("runtime", _parse_time, format_ns, "runtime_ns"),
    ("deadline", _parse_time, format_ns, "deadline_ns"),
    ("period", _parse_time, format_ns, "period_ns"),
]
REQUIRED = {
    "deadline": {"runtime", "period"},
    "fifo": {"priority", "runtime", "period"},
    "rr": {"priority", "runtime", "period"},
}
ALLOWED = {
    "deadline": {"policy", "runtime", "deadline", "period"},
    "fifo": {"policy", "priority", "runtime", "period"},
    "rr": {"policy", "priority", "runtime", "period"},
}


def _local(el: etree._Element) -> str:
    return etree.QName(el).localname


def _describe(el: etree._Element) -> str:
    name = _local(el)
    if name == "vcpu" and el.get("id") is not None:
        return f"<vcpu id='{el.get('id')}'>"
    return f"<{name}>"


def _parse_sched(el: etree._Element) -> VcpuSched:
    what = _describe(el)
    policy = el.get("policy")
    if policy is None:
        raise DeclarationError(f"{what}: missing attribute 'policy'; allowed: "
                               + ", ".join(POLICIES), el.sourceline)
    if policy not in POLICIES:
        raise DeclarationError(f"{what}: policy {policy!r} is not allowed; allowed: "
                               + ", ".join(POLICIES), el.sourceline)
    present = {k for k in el.attrib if k != "id"}
    extra = sorted(present - ALLOWED[policy])
    if extra:
        raise DeclarationError(f"{what}: attribute {extra[0]!r} does not apply to policy "
                               f"{policy!r}; allowed: {', '.join(sorted(ALLOWED[policy]))}",
                               el.sourceline)
    missing = sorted(REQUIRED[policy] - present)
    if missing:
        raise DeclarationError(f"{what}: policy {policy!r} needs attribute {missing[0]!r}"
                               + (" (a time such as '2ms')" if missing[0] != "priority"
                                  else f" ({PRIO_MIN}..{PRIO_MAX})"), el.sourceline)
    values: Dict[str, object] = {}
    for attr, parse, _fmt, name in SCHED_FIELDS:
        text = el.get(attr)
        if text is not None:
            try:
                values[name] = parse(text, f"{what} {attr}")
            except DeclarationError as exc:
                raise DeclarationError(str(exc), el.sourceline) from None
    sched = VcpuSched(**values)  # type: ignore[arg-type]
    _check_sched(sched, what, el.sourceline)
    return sched


def _check_sched(s: VcpuSched, what: str, line: Optional[int] = None) -> None:
    """Semantic rules the kernel (or cgroup) would enforce, said up front."""
    if s.runtime_ns < MIN_RUNTIME_NS:
        raise DeclarationError(f"{what}: runtime {format_ns(s.runtime_ns)} is below the "
                               f"kernel's minimum of {MIN_RUNTIME_NS}ns", line)
    if s.period_ns <= 0:
        raise DeclarationError(f"{what}: period {format_ns(s.period_ns)} must be positive", line)
    dl = s.effective_deadline_ns
    if s.policy == "deadline":
        if not s.runtime_ns <= dl <= s.period_ns:
            raise DeclarationError(
                f"{what}: runtime {format_ns(s.runtime_ns)}, deadline {format_ns(dl)}, period "
                f"{format_ns(s.period_ns)}: SCHED_DEADLINE needs runtime <= deadline <= period", line)
    else:
        if s.runtime_ns > s.period_ns:
            raise DeclarationError(f"{what}: runtime {format_ns(s.runtime_ns)} exceeds period "
                                   f"{format_ns(s.period_ns)}; RT bandwidth needs runtime <= period",
                                   line)
        for name, ns in (("runtime", s.runtime_ns), ("period", s.period_ns)):
            if ns % 1000:
                raise DeclarationError(f"{what}: {name} {format_ns(ns)} is not a whole number of "
                                       "microseconds; cgroup cpu.rt_* files take microseconds", line)


def _parse_introspection(el: etree._Element) -> Introspection:
    extra = sorted(set(el.attrib) - {"backend", "ceiling", "stop-share", "max-stop", "attach-stop"})
    if extra:
        raise DeclarationError(f"<introspection>: unknown attribute {extra[0]!r}; allowed: "
                               "backend, ceiling, stop-share, max-stop, attach-stop", el.sourceline)
    if len(el):
        raise DeclarationError("<introspection>: takes no child elements", el.sourceline)
    backend = el.get("backend", "off")
    if backend not in BACKENDS:
        raise DeclarationError(f"<introspection> backend {backend!r} is not allowed; allowed: "
                               + ", ".join(BACKENDS), el.sourceline)
    ceiling = None
    if el.get("ceiling") is not None:
        try:
            ceiling = parse_fraction(el.get("ceiling"), "<introspection> ceiling")
        except UnitError as exc:
            raise DeclarationError(str(exc), el.sourceline) from None
    budget = _parse_budget(el)
    return Introspection(backend=backend, ceiling=ceiling, **budget)


def _parse_budget(el: etree._Element) -> Dict[str, object]:
    """``stop-share``, ``max-stop``, ``attach-stop``: the stop budget (introspect/budget.py)."""
    from .introspect.budget import DEFAULT_SPEC, WINDOW_NS
    out: Dict[str, object] = {}
    try:
        if el.get("stop-share") is not None:
            out["stop_share"] = parse_fraction(el.get("stop-share"), "<introspection> stop-share")
        for attr, key in (("max-stop", "max_stop_ns"), ("attach-stop", "attach_stop_ns")):
            if el.get(attr) is not None:
                out[key] = parse_time_ns(el.get(attr), f"<introspection> {attr}")
    except UnitError as exc:
        raise DeclarationError(str(exc), el.sourceline) from None
    share = out.get("stop_share", DEFAULT_SPEC.share)
    if not 0 < share <= 1:  # type: ignore[operator]
        raise DeclarationError(f"<introspection> stop-share {format_fraction(share)} must be above 0 "  # type: ignore[arg-type]
                               "and at most 1 (a share of wall time, such as 5%)", el.sourceline)
    longest = out.get("max_stop_ns", DEFAULT_SPEC.max_stop_ns)
    if not 0 < longest <= share * WINDOW_NS:  # type: ignore[operator]
        raise DeclarationError(f"<introspection> max-stop {format_ns(longest)} must be positive and fit "  # type: ignore[arg-type]
                               f"the stop-share of a 1s window ({format_ns(int(share * WINDOW_NS))})",  # type: ignore[operator]
                               el.sourceline)
    if out.get("attach_stop_ns") is not None and out["attach_stop_ns"] <= 0:  # type: ignore[operator]
        raise DeclarationError("<introspection> attach-stop must be positive", el.sourceline)
    return out


def parse_element(el: etree._Element) -> Declaration:
    """Parse our ``<realtime>`` element (already located) into a Declaration."""
    if el.tag != _Q + "realtime":
        raise DeclarationError(f"expected <realtime xmlns='{DECL_NS}'>, found <{el.tag}>",
                               el.sourceline)
    if el.attrib:
        raise DeclarationError(f"<realtime>: unknown attribute {sorted(el.attrib)[0]!r}; it takes "
                               "none", el.sourceline)
    default: Optional[VcpuSched] = None
    vcpus: Dict[int, VcpuSched] = {}
    intro: Optional[Introspection] = None
    for child in el:
        if not isinstance(child.tag, str):
            continue  # comments, processing instructions
        if not child.tag.startswith(_Q):
            raise DeclarationError(f"<realtime>: element <{child.tag}> is not in namespace "
                                   f"{DECL_NS}; allowed children: default, vcpu, introspection",
                                   child.sourceline)
        name = _local(child)
        if name == "default":
            if default is not None:
                raise DeclarationError("<realtime>: more than one <default>", child.sourceline)
            if "id" in child.attrib:
                raise DeclarationError("<default>: takes no 'id'; use <vcpu id='N'> for one vCPU",
                                       child.sourceline)
            default = _parse_sched(child)
        elif name == "vcpu":
            raw = child.get("id")
            if raw is None:
                raise DeclarationError("<vcpu>: missing attribute 'id' (a vCPU number from 0); "
                                       "use <default> for all vCPUs", child.sourceline)
            try:
                vid = int(raw.strip())
            except ValueError:
                vid = -1
            if vid < 0 or vid >= MAX_VCPUS or not raw.strip().isdigit():
                raise DeclarationError(f"<vcpu> id {raw!r} is not a vCPU number; allowed: "
                                       f"0..{MAX_VCPUS - 1}", child.sourceline)
            if vid in vcpus:
                raise DeclarationError(f"<vcpu id='{vid}'>: declared twice; each vCPU may appear "
                                       "once", child.sourceline)
            vcpus[vid] = _parse_sched(child)
        elif name == "introspection":
            if intro is not None:
                raise DeclarationError("<realtime>: more than one <introspection>",
                                       child.sourceline)
            intro = _parse_introspection(child)
        else:
            raise DeclarationError(f"<realtime>: unknown element <{name}>; allowed: default, "
                                   "vcpu, introspection", child.sourceline)
        if (child.text or "").strip():
            raise DeclarationError(f"{_describe(child)}: takes no text", child.sourceline)
    if default is None and not vcpus:
        raise DeclarationError("<realtime>: declares no reservation; add <default policy=...> "
                               "or <vcpu id='N' policy=...>", el.sourceline)
    decl = Declaration(default=default, vcpus=dict(sorted(vcpus.items())),
                       introspection=intro or Introspection())
    _check_ceiling(decl)
    _schema_check(el)
    return decl


def _check_ceiling(decl: Declaration) -> None:
    c = decl.introspection.ceiling
    if c is None:
        return
    scheds = ([("<default>", decl.default)] if decl.default else []) + \
        [(f"<vcpu id='{i}'>", s) for i, s in decl.vcpus.items()]
    for what, s in scheds:
        if s.bandwidth > c:
            raise DeclarationError(
                f"<introspection> ceiling {format_fraction(c)} is below the bandwidth "
                f"{format_fraction(s.bandwidth)} declared by {what}; the ceiling must be >= every "
                "declared runtime/period")


@lru_cache(maxsize=1)
def _schema() -> etree.RelaxNG:
    here = os.path.dirname(os.path.abspath(__file__))
    for path in (os.path.join(here, "data", "kairos.rng"),
                 os.path.join(here, os.pardir, "xml", "kairos.rng")):
        if os.path.exists(path):
            return etree.RelaxNG(etree.parse(path))
    raise AssertionError("programming error: kairos.rng is not installed with the package")


def _schema_check(el: etree._Element) -> None:
    schema = _schema()
    if not schema.validate(el):
        err = schema.error_log.last_error
        raise DeclarationError(f"declaration does not match the schema xml/kairos.rng: "
                               f"{err.message if err else 'invalid'}",
                               err.line if err and err.line else None)


# --------------------------------------------------------------------------
# Domain XML

def _parser() -> etree.XMLParser:
    # Domain XML comes from libvirt or an admin's file: no entities, no network.
    return etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False,
                           remove_blank_text=False)


def parse_xml(data: bytes, what: str = "domain XML") -> etree._Element:
    try:
        return etree.fromstring(data, _parser())
    except etree.XMLSyntaxError as exc:
        raise DeclarationError(f"{what} is not well-formed XML: {exc.msg}", exc.lineno) from None
    except ValueError as exc:  # e.g. unicode strings with an encoding declaration
        raise DeclarationError(f"{what} cannot be parsed: {exc}") from None


def find_element(domain: etree._Element) -> Optional[etree._Element]:
    """Our element under ``<metadata>``, or None.  Two of them is an error."""
    found = domain.findall("metadata/" + _Q + "realtime")
    for child in domain.findall("metadata/*"):
        # A near miss (old version, typo) must not silently start a non-RT VM.
        ns = etree.QName(child).namespace or ""
        if ns != DECL_NS and "kairosvm.org" in ns.lower() and "realtime-state" not in ns:
            raise DeclarationError(f"<metadata>: element <{etree.QName(child).localname}> is in "
                                   f"namespace {ns!r}, which kairos-libvirt does not know; the "
                                   f"declaration's namespace is {DECL_NS}", child.sourceline)
    if len(found) > 1:
        raise DeclarationError("<metadata> holds more than one <realtime> element of "
                               f"{DECL_NS}", found[1].sourceline)
    if not found:
        return None
    el = found[0]
    size = len(etree.tostring(el))
    if size > MAX_ELEMENT_BYTES:
        raise DeclarationError(f"<realtime> element is {size} bytes; at most "
                               f"{MAX_ELEMENT_BYTES} are allowed", el.sourceline)
    return el


def _cpuset_text(text: Optional[str]) -> Optional[str]:
    return text.strip() if text and text.strip() else None


def parse_domain(data: bytes, declaration: bool = True) -> DomainInfo:
    """Parse libvirt domain XML and validate our declaration against it.

    With ``declaration=False`` our element is ignored (to replace a broken one).
    """
    root = parse_xml(data)
    if root.tag != "domain":
        raise DeclarationError(f"expected a libvirt <domain>, found <{root.tag}>", root.sourceline)
    name = (root.findtext("name") or "").strip()
    vcpu_el = root.find("vcpu")
    try:
        vmax = int((vcpu_el.text or "1").strip()) if vcpu_el is not None else 1
        vcur = int(vcpu_el.get("current", vmax)) if vcpu_el is not None else vmax
    except ValueError:
        raise DeclarationError("<vcpu> of the domain is not an integer",
                               vcpu_el.sourceline if vcpu_el is not None else None) from None
    pinned: Dict[int, str] = {}
    if vcpu_el is not None and _cpuset_text(vcpu_el.get("cpuset")):
        pinned = {i: vcpu_el.get("cpuset").strip() for i in range(vmax)}
    for pin in root.findall("cputune/vcpupin"):
        try:
            pinned[int(pin.get("vcpu", "-1"))] = pin.get("cpuset", "").strip()
        except ValueError:
            continue  # libvirt validated its own element
    vsched: set = set()
    for vs in root.findall("cputune/vcpusched"):
        vsched |= _libvirt_id_set(vs.get("vcpus", ""), vmax)
    el = find_element(root) if declaration else None
    decl = parse_element(el) if el is not None else None
    info = DomainInfo(name=name, uuid=(root.findtext("uuid") or "").strip(),
                      domain_type=root.get("type", ""), vcpus_max=vmax, vcpus_current=vcur,
                      declaration=decl, pinned=pinned, libvirt_vcpusched=frozenset(vsched),
                      kernel=(root.findtext("os/kernel") or "").strip() or None)
    if decl is not None:
        check_against_domain(decl, info)
    return info


def _libvirt_id_set(text: str, vmax: int) -> set:
    """Parse libvirt's '0-3,^2' id lists (only to detect overlap)."""
    out: set = set()
    for part in text.split(","):
        part = part.strip()
        neg = part.startswith("^")
        part = part.lstrip("^")
        try:
            lo, _, hi = part.partition("-")
            ids = set(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            continue
        out = out - ids if neg else out | ids
    return {i for i in out if i < vmax}


def check_against_domain(decl: Declaration, info: DomainInfo) -> None:
    for vid in decl.vcpus:
        if vid >= info.vcpus_max:
            raise DeclarationError(
                f"<vcpu id='{vid}'>: the domain has {info.vcpus_max} vCPU(s); allowed ids: "
                f"0..{info.vcpus_max - 1}")
    resolved = decl.resolve(info.vcpus_max)
    clash = sorted(set(resolved) & info.libvirt_vcpusched)
    if clash:
        raise DeclarationError(
            f"vCPU {clash[0]} is scheduled both by libvirt's <cputune><vcpusched> and by the "
            "kairos declaration; remove one of them")


# --------------------------------------------------------------------------
# Serialization

def _sched_attrs(s: VcpuSched) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for attr, _parse, fmt, name in SCHED_FIELDS:
        value = getattr(s, name)
        if value is not None:
            out[attr] = fmt(value)
    return out


def to_element(decl: Declaration, prefix: str = DECL_PREFIX) -> etree._Element:
    nsmap = {prefix: DECL_NS}
    root = etree.Element(_Q + "realtime", nsmap=nsmap)
    if decl.default is not None:
        etree.SubElement(root, _Q + "default", _sched_attrs(decl.default))
    for vid, s in decl.vcpus.items():
        attrs = {"id": str(vid)}
        attrs.update(_sched_attrs(s))
        etree.SubElement(root, _Q + "vcpu", attrs)
    intro = decl.introspection
    if intro != Introspection():
        attrs = {"backend": intro.backend}
        if intro.ceiling is not None:
            attrs["ceiling"] = format_fraction(intro.ceiling) if (intro.ceiling * 10**6).denominator == 1 \
                else f"{intro.ceiling.numerator}/{intro.ceiling.denominator}"
        if intro.stop_share is not None:
            attrs["stop-share"] = format_fraction(intro.stop_share) if \
                (intro.stop_share * 10**6).denominator == 1 else \
                f"{intro.stop_share.numerator}/{intro.stop_share.denominator}"
        for attr, value in (("max-stop", intro.max_stop_ns), ("attach-stop", intro.attach_stop_ns)):
            if value is not None:
                attrs[attr] = format_ns(value)
        etree.SubElement(root, _Q + "introspection", attrs)
    return root


def to_xml(decl: Declaration, prefix: str = DECL_PREFIX) -> str:
    return etree.tostring(to_element(decl, prefix), pretty_print=True, encoding="unicode")


def declaration_from_xml(text: str | bytes) -> Declaration:
    """Parse a standalone ``<realtime>`` element, or a domain XML holding one."""
    data = text.encode() if isinstance(text, str) else text
    root = parse_xml(data, "declaration")
    if root.tag == "domain":
        el = find_element(root)
        if el is None:
            raise DeclarationError(f"domain XML has no <realtime xmlns='{DECL_NS}'> in <metadata>")
        return parse_element(el)
    return parse_element(root)


def replace(decl: Declaration, **changes: object) -> Declaration:
    return dataclasses.replace(decl, **changes)


def iter_scheds(decl: Declaration) -> Iterable[Tuple[str, VcpuSched]]:
    if decl.default:
        yield "default", decl.default
    for vid, s in decl.vcpus.items():
        yield f"vcpu {vid}", s
