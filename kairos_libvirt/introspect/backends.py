"""Choosing and building an introspection backend for a domain.

``kvm-ud`` needs the patched KVM (kmod/); without it the agent falls back to
``gdbstub`` and says so in the live metadata.  The gdbstub server is opened
and closed through libvirt's monitor passthrough (the domain is then tainted
``custom-monitor`` in libvirt's log: that is how libvirt marks it).
"""
from __future__ import annotations

import logging
import os
import stat
from typing import Callable, Optional, Tuple

from ..errors import KairosError, LibvirtError

log = logging.getLogger("kairosvm-agent.introspect")


def _hmp(dom, command: str) -> str:
    import libvirt
    import libvirt_qemu
    try:
        return libvirt_qemu.qemuMonitorCommand(
            dom, command, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
    except libvirt.libvirtError as exc:
        raise LibvirtError(f"QEMU monitor command {command.split()[0]!r}", exc) from None


def make(kind: str, name: str, dom, qemu_pid: int, domain_dir: str,
         budget: Optional[dict] = None) -> Tuple[object, Optional[str]]:
    """Return (backend, note); the note says why another backend than asked was used.

    ``budget``: the ledger entry's stop budget (``BudgetSpec.as_json``); None: the defaults.
    """
    note = None
    if kind == "kvm-ud":
        from . import kvmud_backend
        why = kvmud_backend.unavailable_reason(qemu_pid)
        if why is None:
            return kvmud_backend.make(name, qemu_pid, guest_memory=_guest_ram(dom, qemu_pid)), None
        note = f"backend kvm-ud requested but {why}: falling back to gdbstub"
        kind = "gdbstub"
    if kind != "gdbstub":
        raise KairosError(f"unknown introspection backend {kind!r}")
    if dom is None:
        raise KairosError("the gdbstub backend needs a libvirt connection, and there is none")
    from .gdbstub import GdbstubBackend

    def open_server(path: str) -> None:
        out = _hmp(dom, f"gdbserver unix:{path},server=on,wait=off")
        if "error" in out.lower() or "could not" in out.lower():
            raise KairosError(f"QEMU refused to open its gdbstub: {out.strip()}")

    def close_server() -> None:
        _hmp(dom, "gdbserver none")

    from dataclasses import replace
    from .budget import StopBudget, spec_from_json
    cost, why = hit_cost_ns(dom)
    if why:
        log.info("%s", why)
    spec = replace(spec_from_json(budget), hit_cost_ns=cost)
    return GdbstubBackend(open_server, close_server, os.path.join(domain_dir, "gdb"),
                          budget=StopBudget(spec), guest_memory=_guest_ram(dom, qemu_pid)), note


class _OpenOnce:
    """Open the guest's RAM on first use; a failure is raised once, later calls answer None.

    The agent asks at every attach; the mapping does not change while QEMU runs.
    """

    def __init__(self, opener: Callable[[], object]) -> None:
        self._opener: Optional[Callable[[], object]] = opener
        self._phys = None

    def __call__(self):
        if self._phys is None and self._opener is not None:
            opener, self._opener = self._opener, None
            self._phys = opener()
        return self._phys


def _guest_ram(dom, qemu_pid: int) -> Optional[_OpenOnce]:
    """The guest's RAM in QEMU's process, read with the VM running (host/guestmem.py).

    Under TCG and under KVM alike QEMU maps the RAM it gives the guest; None
    without a libvirt domain to ask the memory size.
    """
    if dom is None:
        return None

    def open_ram():
        import libvirt
        from ..host import guestmem
        try:
            ram = dom.maxMemory() * 1024
        except libvirt.libvirtError as exc:
            raise LibvirtError("reading the domain's memory size", exc) from None
        layout = None
        if ram >= guestmem.LOW_RAM_SAFE:   # RAM above the PCI hole: ask QEMU where it put it
            try:
                layout = guestmem.parse_mtree_ram(_hmp(dom, "info mtree -f")) or None
            except KairosError as exc:
                log.warning("guest memory map: %s; reading the low 2 GiB only", exc)
        return guestmem.open_guest_ram(qemu_pid, ram, layout)
    return _OpenOnce(open_ram)


#: Host CPU one gdbstub breakpoint hit makes a TCG guest spend re-translating its
#: code, with its clock running (bench/gdbcost on this project's hosts: 15-27 ms).
TCG_FLUSH_COST_NS = 20_000_000
#: The first QEMU whose gdbstub no longer flushes at a breakpoint stop ("gdbstub:
#: Remove tb_flush uses", qemu-devel 2025-09-24, after 10.1).
QEMU_NO_FLUSH = (10, 2)


def hit_cost_ns(dom) -> Tuple[int, Optional[str]]:
    """(what one breakpoint hit costs the guest beyond its stop, why) for this domain's QEMU.

    QEMU before 10.2 calls tb_flush() at every gdbstub stop for a breakpoint
    (gdbstub.c, gdb_vm_state_change, RUN_STATE_DEBUG): under TCG the guest
    then re-translates everything it runs (docs/gdbcost.md).  Under KVM the
    flush is a no-op.  Unknown (no libvirt answer): assume the flush.
    """
    import libvirt
    from lxml import etree
    try:
        kind = etree.fromstring(dom.XMLDesc(0)).get("type")
        v = dom.connect().getVersion()
    except (libvirt.libvirtError, etree.XMLSyntaxError):
        return TCG_FLUSH_COST_NS, "cannot tell the domain's accelerator or QEMU version: " \
            "every gdbstub hit is charged as a TCG translation flush"
    version = (v // 1_000_000, v // 1000 % 1000)
    if kind != "qemu" or version >= QEMU_NO_FLUSH:
        return 0, None
    return TCG_FLUSH_COST_NS, (f"TCG guest under QEMU {version[0]}.{version[1]}: every gdbstub hit "
                               f"flushes its translated code; the stop budget charges each hit "
                               f"{TCG_FLUSH_COST_NS // 1_000_000} ms beyond its stop")


def trusted_file(path: str) -> bool:
    """Only read files root owns and nobody else can change (a guest image may not be)."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_uid == 0 and not st.st_mode & 0o022


def symbol_loader(kernel: Optional[str]) -> Callable[[Callable[[int, int], bytes]], object]:
    """Symbols from the domain's vmlinuz when it has a trusted one, else from guest memory."""
    def load(read: Callable[[int, int], bytes]):
        from . import kallsyms
        if kernel and trusted_file(kernel):
            try:
                return kallsyms.load_vmlinuz(kernel)
            except KairosError as exc:
                # Not a kernel we can parse: guest memory is the other source.
                log.warning("symbols from %s: %s; trying guest memory", kernel, exc)
        elif kernel:
            log.warning("not reading %s: it is not a root-owned file that only root can "
                        "change; symbols come from guest memory", kernel)
        return kallsyms.load_from_memory(read)
    return load
