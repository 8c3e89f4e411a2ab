"""Fakes shared by unit tests (named as such: they stand for a boundary).

``FakeGuestMemory`` stands for a guest's virtual address space: a dict of
bytes.  A read of an unmapped byte raises what the real reader raises
there (``fault``), so that each backend's error path is exercised.
"""
from __future__ import annotations

from typing import Callable, Dict

from kairos_libvirt.errors import KairosError


class FakeGuestMemory:
    def __init__(self, fault: Callable[[int], Exception] =
                 lambda addr: KairosError(f"fake: unmapped {addr:#x}")) -> None:
        self.bytes: Dict[int, int] = {}
        self.fault = fault

    def put(self, addr: int, data: bytes) -> None:
        for i, b in enumerate(data):
            self.bytes[addr + i] = b

    def read(self, addr: int, n: int) -> bytes:
        try:
            return bytes(self.bytes[addr + i] for i in range(n))
        except KeyError:
            raise self.fault(addr) from None
