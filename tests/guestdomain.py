"""The domain XML of the project's test guest (guest/build), for every tier.

Used by the end-to-end tier (TCG domains on the host) and by the nested
testbed's libvirt phase (a KVM domain inside L1), so that both boot the
same guest the same way.
"""
from __future__ import annotations

import os
from xml.sax.saxutils import escape

GUEST_DIR = os.environ.get("KAIROS_GUEST_DIR", "/var/lib/kairos/guest")
NS = "http://kairosvm.org/xmlns/libvirt/realtime/1.0"


def decl(body: str) -> str:
    """Wrap declaration elements in our namespaced ``<kairos:realtime>``."""
    return f"<kairos:realtime xmlns:kairos='{NS}'>{body}</kairos:realtime>"


def domain_xml(name: str, decl: str = "", vcpus: int = 2, memory_mib: int = 192,
               cmdline: str = "", extra_cputune: str = "", console: str = "",
               kind: str = "qemu", cpu: str = "") -> str:
    """A direct-kernel-boot domain of the test guest; its serial console goes to ``console``."""
    meta = f"<metadata>{decl}</metadata>" if decl else ""
    cputune = f"<cputune>{extra_cputune}</cputune>" if extra_cputune else ""
    console = console or f"/var/log/kairos/{name}.console"
    return f"""<domain type='{kind}'>
  <name>{name}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>{vcpus}</vcpu>
  {cputune}
  {meta}
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{GUEST_DIR}/vmlinuz</kernel>
    <initrd>{GUEST_DIR}/initrd.img</initrd>
    <cmdline>console=ttyS0 quiet panic=-1 {escape(cmdline)}</cmdline>
  </os>
  {cpu}
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <serial type='file'><source path='{console}'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>"""
