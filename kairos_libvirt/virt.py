"""The libvirt boundary: connect, look up, read/write our metadata.

Never imported by the hook's code path (calling libvirt from a hook
deadlocks libvirtd); the agent and the CLI use it.
"""
from __future__ import annotations

import os
import time
from typing import Optional

import libvirt

from . import DECL_NS, DECL_PREFIX, STATE_NS, STATE_PREFIX
from .errors import LibvirtError

DEFAULT_URI = "qemu:///system"


def _quiet(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr unless a handler is registered."""


libvirt.registerErrorHandler(_quiet, None)


def uri() -> str:
    return os.environ.get("KAIROS_LIBVIRT_URI", DEFAULT_URI)


def connect(timeout_s: float = 0.0) -> libvirt.virConnect:
    """Open the libvirt connection, retrying up to ``timeout_s`` (libvirtd restarting)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return libvirt.open(uri())
        except libvirt.libvirtError as exc:
            if time.monotonic() >= deadline:
                raise LibvirtError(f"cannot connect to libvirt at {uri()} (is libvirtd "
                                   "running?)", exc) from None
            time.sleep(0.5)


def lookup(conn: libvirt.virConnect, name: str) -> libvirt.virDomain:
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError as exc:
        raise LibvirtError(f"domain {name!r} not found", exc) from None


def get_metadata(dom: libvirt.virDomain, ns: str, live: bool) -> Optional[str]:
    flags = libvirt.VIR_DOMAIN_AFFECT_LIVE if live else libvirt.VIR_DOMAIN_AFFECT_CONFIG
    try:
        return dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, ns, flags)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
            return None
        raise LibvirtError(f"reading metadata {ns} of {dom.name()}", exc) from None


def set_state(dom: libvirt.virDomain, xml: Optional[str]) -> None:
    """Publish (or with None remove) the agent's live state element."""
    try:
        dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, unqualified(xml) if xml else None,
                        STATE_PREFIX if xml else None,
                        STATE_NS, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    except libvirt.libvirtError as exc:
        raise LibvirtError(f"publishing live state of {dom.name()}", exc) from None


def set_declaration(dom: libvirt.virDomain, xml: Optional[str]) -> None:
    """Write (or with None remove) the declaration in the persistent config only."""
    try:
        dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, unqualified(xml) if xml else None,
                        DECL_PREFIX if xml else None,
                        DECL_NS, libvirt.VIR_DOMAIN_AFFECT_CONFIG)
    except libvirt.libvirtError as exc:
        raise LibvirtError(f"writing the declaration of {dom.name()}", exc) from None


def inactive_xml(dom: libvirt.virDomain) -> bytes:
    try:
        return dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE).encode()
    except libvirt.libvirtError as exc:
        raise LibvirtError(f"reading the configuration of {dom.name()}", exc) from None


def live_xml(dom: libvirt.virDomain) -> bytes:
    try:
        return dom.XMLDesc(0).encode()
    except libvirt.libvirtError as exc:
        raise LibvirtError(f"reading the live XML of {dom.name()}", exc) from None


def is_active(dom: libvirt.virDomain) -> bool:
    try:
        return bool(dom.isActive())
    except libvirt.libvirtError:
        return False


def unqualified(xml: str) -> str:
    """Drop the namespace from an element tree for ``virDomainSetMetadata``.

    libvirt adds the namespace itself from (key, uri); an element that already
    declares that prefix fails with "failed to create a new XML namespace".
    """
    from lxml import etree
    root = etree.fromstring(xml.encode(), etree.XMLParser(resolve_entities=False,
                                                          no_network=True))
    for el in root.iter():
        if isinstance(el.tag, str):
            el.tag = etree.QName(el).localname
    etree.cleanup_namespaces(root)
    return etree.tostring(root, encoding="unicode")
