"""Backend ``kvm-ud``: the patched KVM catches planted UD2 traps (kmod/).

Not available until the KVM patch lands: :func:`available` probes for it,
and the agent falls back to gdbstub when it is absent.
"""
from __future__ import annotations

import os


def available() -> bool:
    """Is a KVM with the kairos #UD trap table loaded? (a module parameter it adds)."""
    return os.path.exists("/sys/module/kvm/parameters/kairos_ud")


def make(name: str, qemu_pid: int):
    from ..errors import KairosError
    raise KairosError("the kvm-ud backend is not built into this agent yet")
