"""Guest physical memory read from QEMU's process, without stopping the VM.

QEMU maps the guest's RAM into its own address space (the ``pc.ram``
memory backend: an anonymous, memfd or hugetlbfs mapping exactly the size of
the domain's memory, seen in ``/proc/PID/maps``).  Root reads it through
``/proc/PID/mem`` with ``pread``: no gdbstub, no vCPU stop, no QEMU change.
The gdbstub stays for what needs a stopped vCPU: breakpoints, registers, and
reads through a task's page tables.

Guest-physical layout of x86 ``pc`` and ``q35`` machines: RAM below the PCI
hole is identity-mapped from guest-physical 0; with more than 2.75 GiB
(q35) or 3.5 GiB (pc) the rest sits above 4 GiB.  Without the machine's own
memory map (:func:`parse_mtree_ram`, from HMP ``info mtree -f``) we only
trust the low 2 GiB of a large guest: both machines keep at least that much
below the hole.

Part of the OS boundary (``/proc``): nothing else reads QEMU's memory.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from ..errors import KairosError

__all__ = ["GuestMemError", "Mapping", "RamRegion", "PhysMem", "parse_maps", "find_ram_mapping",
           "parse_mtree_ram", "default_layout", "open_guest_ram", "LOW_RAM_SAFE"]

#: Below this much RAM both ``pc`` and ``q35`` put all of it at guest-physical 0.
LOW_RAM_SAFE = 0xb0000000
#: What both machines keep below the PCI hole whatever the size.
LOW_RAM_MIN = 0x80000000
#: One read is bounded (a hostile guest chooses the addresses we follow).
MAX_READ = 16 << 20


class GuestMemError(KairosError):
    """Guest physical memory cannot be found or read through QEMU's process."""


@dataclass(frozen=True)
class Mapping:
    """One line of ``/proc/PID/maps``."""

    start: int
    end: int
    perms: str
    path: str

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class RamRegion:
    """Guest-physical [gpa, gpa + size) is host-virtual [hva, hva + size) in QEMU."""

    gpa: int
    size: int
    hva: int


_MAPS = re.compile(r"^([0-9a-f]+)-([0-9a-f]+)\s+(\S{4})\s+\S+\s+\S+\s+\d+\s*(.*)$")


def parse_maps(text: str) -> List[Mapping]:
    out = []
    for line in text.splitlines():
        m = _MAPS.match(line)
        if m:
            out.append(Mapping(int(m.group(1), 16), int(m.group(2), 16), m.group(3),
                               m.group(4).strip()))
    return out


def _ram_like(m: Mapping) -> bool:
    """Anonymous, memfd or hugetlbfs, readable and writable (QEMU's RAM backends)."""
    if not m.perms.startswith("rw"):
        return False
    return m.path == "" or m.path.startswith("/memfd:") or "hugepages" in m.path \
        or m.path.startswith("/dev/shm/")


def find_ram_mapping(maps: Sequence[Mapping], ram_bytes: int) -> Mapping:
    """The one RAM-like mapping of exactly ``ram_bytes``; refuse none or several."""
    found = [m for m in maps if m.size == ram_bytes and _ram_like(m)]
    if len(found) == 1:
        return found[0]
    what = "no" if not found else f"{len(found)}"
    raise GuestMemError(f"QEMU has {what} read-write anonymous mapping(s) of exactly "
                        f"{ram_bytes >> 20} MiB (the domain's memory) in /proc/PID/maps: cannot "
                        "tell which is the guest's RAM. Fix: none needed, introspection then reads "
                        "guest memory through the gdbstub (the guest stops for it)")


_MTREE = re.compile(r"^\s*([0-9a-f]+)-([0-9a-f]+)\s+\(prio [-\d]+, (?:ram|rom)\):\s+(\S+)"
                    r"(?:\s+@([0-9a-f]+))?")


def parse_mtree_ram(text: str, block: str = "pc.ram") -> List[Tuple[int, int, int]]:
    """``(gpa, size, offset in block)`` of ``block`` in the first flat view of HMP ``info mtree -f``.

    The first flat view is the system memory address space; later ones
    (I/O, per-CPU) repeat it or are not RAM.
    """
    out: List[Tuple[int, int, int]] = []
    views = 0
    for line in text.splitlines():
        if line.startswith("FlatView"):
            views += 1
            if views > 1:
                break
            continue
        m = _MTREE.match(line)
        if m and m.group(3) == block:
            lo, hi = int(m.group(1), 16), int(m.group(2), 16)
            off = int(m.group(4), 16) if m.group(4) else 0
            if out and out[-1][0] + out[-1][1] == lo and out[-1][2] + out[-1][1] == off:
                out[-1] = (out[-1][0], out[-1][1] + hi + 1 - lo, out[-1][2])
            else:
                out.append((lo, hi + 1 - lo, off))
    return out


def default_layout(ram_bytes: int) -> List[Tuple[int, int, int]]:
    """The guest-physical placement we can be sure of without the machine's memory map."""
    return [(0, ram_bytes if ram_bytes < LOW_RAM_SAFE else LOW_RAM_MIN, 0)]


class PhysMem:
    """``read(gpa, n)`` of guest-physical memory through ``/proc/PID/mem``; the VM keeps running.

    A read that leaves a RAM region raises :class:`GuestMemError`; so does a
    QEMU that exited (the guest is gone: nothing to read).
    """

    def __init__(self, pid: int, regions: Sequence[RamRegion], path: Optional[str] = None) -> None:
        self.pid = pid
        self.regions = sorted(regions, key=lambda r: r.gpa)
        self.path = path or f"/proc/{pid}/mem"
        try:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise GuestMemError(f"cannot open {self.path}: {exc.strerror}. Fix: the agent runs "
                                "as root, and QEMU must still run") from exc
        self.reads = 0
        self.bytes = 0

    @property
    def size(self) -> int:
        """Highest guest-physical address + 1 covered by a region."""
        return max((r.gpa + r.size for r in self.regions), default=0)

    def _region(self, gpa: int, n: int) -> RamRegion:
        for r in self.regions:
            if r.gpa <= gpa and gpa + n <= r.gpa + r.size:
                return r
        raise GuestMemError(f"guest-physical {gpa:#x}+{n} is not in the guest's RAM as mapped "
                            "in QEMU")

    def read(self, gpa: int, n: int) -> bytes:
        if not 0 <= n <= MAX_READ or gpa < 0:
            raise GuestMemError(f"refusing a guest-physical read of {n} bytes at {gpa:#x}")
        r = self._region(gpa, n)
        try:
            data = os.pread(self.fd, n, r.hva + gpa - r.gpa)
        except OSError as exc:
            raise GuestMemError(f"reading guest-physical {gpa:#x}+{n} from {self.path}: "
                                f"{exc.strerror}") from exc
        if len(data) != n:
            raise GuestMemError(f"short read of guest-physical {gpa:#x}+{n} from {self.path} "
                                f"({len(data)} bytes): QEMU exited?")
        self.reads += 1
        self.bytes += n
        return data

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "PhysMem":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_guest_ram(pid: int, ram_bytes: int, layout: Optional[Sequence[Tuple[int, int, int]]] = None,
                   proc: str = "/proc") -> PhysMem:
    """The guest's RAM of QEMU ``pid`` (``ram_bytes``: the domain's memory).

    ``layout``: ``(gpa, size, offset)`` pieces of the RAM block, from
    :func:`parse_mtree_ram`; default :func:`default_layout`.
    """
    try:
        with open(f"{proc}/{pid}/maps") as f:
            maps = parse_maps(f.read())
    except OSError as exc:
        raise GuestMemError(f"cannot read {proc}/{pid}/maps: {exc.strerror}. Fix: is QEMU "
                            "still running?") from exc
    m = find_ram_mapping(maps, ram_bytes)
    pieces = list(layout) if layout else default_layout(ram_bytes)
    regions = [RamRegion(gpa, size, m.start + off) for gpa, size, off in pieces
               if off + size <= m.size]
    if not regions:
        raise GuestMemError(f"the memory map of the guest does not fit its {ram_bytes >> 20} MiB "
                            "RAM mapping in QEMU")
    return PhysMem(pid, regions, f"{proc}/{pid}/mem")
