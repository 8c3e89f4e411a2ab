"""Register tables: names, GDB register numbers and byte offsets in ``g``.

GDB numbers registers in the order of the target description ("Target
Descriptions"); ``g`` ("Packets") returns them back to back in that order, in
target byte order, and ``p n``/``P n=r`` address one by number.
:data:`X86_64` is QEMU's ``gdb-xml/i386-64bit.xml`` as QEMU 7.2 serves it
(66 registers, 608 bytes of ``g``; checked against a live stub: ``p10`` is
rip, ``p11`` eflags (4 bytes), ``p1d`` cr3, ``p21``..``p28`` are 10-byte x87
registers).  A client that can read the stub's own description uses that
instead (see :func:`parse_target_description`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Literal, Optional, Tuple

from kairos_libvirt.introspect.rsp.errors import RspProtocolError

__all__ = ["Register", "RegisterTable", "X86_64", "parse_target_description"]


@dataclass(frozen=True)
class Register:
    name: str
    regnum: int
    bitsize: int
    #: Byte offset of this register in a ``g`` reply.
    offset: int

    @property
    def size(self) -> int:
        return self.bitsize // 8


class RegisterTable:
    """Registers by name and number, with their offsets in ``g``."""

    def __init__(self, regs: Iterable[Tuple[str, int, Optional[int]]], *,
                 architecture: str = "",
                 byteorder: Literal["little", "big"] = "little") -> None:
        """``regs`` are (name, bitsize, regnum or None = previous + 1) in document order."""
        self.architecture = architecture
        self.byteorder = byteorder
        self._by_name: Dict[str, Register] = {}
        self._by_num: Dict[int, Register] = {}
        numbered: List[Tuple[int, str, int]] = []
        nxt = 0
        for name, bitsize, regnum in regs:
            num = nxt if regnum is None else regnum
            nxt = num + 1
            numbered.append((num, name, bitsize))
        offset = 0
        for num, name, bitsize in sorted(numbered):
            if bitsize <= 0 or bitsize % 8:
                raise RspProtocolError(f"register {name!r} has an unusable bitsize {bitsize}")
            if name in self._by_name or num in self._by_num:
                raise RspProtocolError(f"register {name!r} (number {num}) is described twice")
            reg = Register(name, num, bitsize, offset)
            offset += reg.size
            self._by_name[name] = reg
            self._by_num[num] = reg
        self.g_size = offset

    def __getitem__(self, name: str) -> Register:
        return self._by_name[name]

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[Register]:
        """Registers in register-number order (the ``g`` order)."""
        return iter(sorted(self._by_name.values(), key=lambda r: r.regnum))

    def __len__(self) -> int:
        return len(self._by_name)

    def by_number(self, regnum: int) -> Optional[Register]:
        return self._by_num.get(regnum)

    @property
    def names(self) -> List[str]:
        return [r.name for r in self]


def _x86_64_spec() -> List[Tuple[str, int, Optional[int]]]:
    gprs = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp"] + [f"r{i}" for i in range(8, 16)]
    spec: List[Tuple[str, int, Optional[int]]] = [(n, 64, None) for n in gprs]
    spec += [("rip", 64, None), ("eflags", 32, None)]
    spec += [(n, 32, None) for n in ("cs", "ss", "ds", "es", "fs", "gs")]
    spec += [(n, 64, None) for n in ("fs_base", "gs_base", "k_gs_base")]
    spec += [(n, 64, None) for n in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer")]
    spec += [(f"st{i}", 80, None) for i in range(8)]
    spec += [(n, 32, None) for n in ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop")]
    spec += [(f"xmm{i}", 128, None) for i in range(16)]
    spec += [("mxcsr", 32, None)]
    return spec


#: QEMU's x86_64 system-emulation register layout (rax=0 ... rip=16, eflags=17,
#: cs..gs=18..23, fs_base/gs_base/k_gs_base=24..26, cr0/cr2/cr3/cr4/cr8/efer=27..32).
X86_64 = RegisterTable(_x86_64_spec(), architecture="i386:x86-64")

_COMMENT = re.compile(rb"<!--.*?-->", re.S)
_TAG = re.compile(rb"<(reg|xi:include|architecture)\b([^>]*)>(?:([^<]*)</architecture>)?")
_ATTR = re.compile(rb"""([A-Za-z_:][-\w:.]*)\s*=\s*(?:"([^"]*)"|'([^']*)')""")
_MAX_DOCS = 16


def _attrs(text: bytes) -> Dict[str, str]:
    return {m.group(1).decode("ascii", "replace"): (m.group(2) if m.group(2) is not None
                                                    else m.group(3)).decode("utf-8", "replace")
            for m in _ATTR.finditer(text)}


def parse_target_description(fetch: Callable[[str], bytes], annex: str = "target.xml") -> RegisterTable:
    """Build a table from a stub's target description ("Target Descriptions").

    ``fetch(annex)`` returns one XML document (``qXfer:features:read``).  We
    scan tags instead of using an XML parser because QEMU's ``target.xml``
    uses the ``xi:`` prefix without declaring it, which a namespace-aware
    parser rejects; comments are dropped first (QEMU comments out the
    ``*_base`` segment registers).  Includes are followed in document order.
    """
    regs: List[Tuple[str, int, Optional[int]]] = []
    arch = ""
    seen: List[str] = []

    def walk(name: str, depth: int) -> None:
        nonlocal arch
        if depth > 4 or len(seen) >= _MAX_DOCS:
            raise RspProtocolError(f"target description includes nest too deep at {name!r}")
        seen.append(name)
        doc = _COMMENT.sub(b"", fetch(name))
        for m in _TAG.finditer(doc):
            tag = m.group(1)
            attrs = _attrs(m.group(2))
            if tag == b"architecture":
                arch = (m.group(3) or b"").decode("ascii", "replace").strip()
            elif tag == b"xi:include":
                href = attrs.get("href", "")
                if not href or href in seen:
                    raise RspProtocolError(f"bad or repeated include {href!r} in {name!r}", m.group(0))
                walk(href, depth + 1)
            else:
                try:
                    bitsize = int(attrs["bitsize"])
                    regnum = int(attrs["regnum"]) if "regnum" in attrs else None
                    regs.append((attrs["name"], bitsize, regnum))
                except (KeyError, ValueError):
                    raise RspProtocolError(f"unusable <reg> in {name!r}", m.group(0)) from None

    walk(annex, 0)
    if not regs:
        raise RspProtocolError(f"target description {annex!r} lists no registers")
    return RegisterTable(regs, architecture=arch)

