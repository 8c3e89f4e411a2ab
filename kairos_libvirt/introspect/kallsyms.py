"""Recover a guest kernel's symbol table (kallsyms) without debug packages.

Two sources, one decoder:

* a ``vmlinuz`` (the ``<os><kernel>`` of a direct-kernel-boot domain):
  :func:`recover_from_vmlinuz` unpacks the bzImage payload (xz, gzip,
  bzip2, lzma with the standard library; zstd, lz4, lzo through their
  command-line tools) to the ELF ``vmlinux`` and decodes the kallsyms
  tables in its ``.rodata``;
* guest memory, for guests booted from their own disk:
  :func:`recover_from_memory` finds the kernel image (the first mapped
  2 MiB page of the kernel map), scans it for the token table and decodes
  the same tables through a ``read(vaddr, n)`` callback.

We decode kallsyms ourselves rather than run ``vmlinux-to-elf``: the
memory path needs the decoder anyway, and the vmlinuz path then costs
about 1.5 s (mostly xz) instead of about 15 s, with no extra dependency.

The tables, as ``scripts/kallsyms.c`` writes them (each label 8-aligned)::

    Linux <= 6.3:  offsets[N] (s32), relative_base (u64), num_syms (u32), names,
                   markers[(N+255)/256] (u32), [seqs_of_names[3N]], token_table, token_index[256] (u16)
    Linux >= 6.4:  num_syms, names, markers, token_table, token_index,
                   offsets[N], relative_base, seqs_of_names[3N]

``seqs_of_names`` arrived in 6.2 and was backported to 6.1 stable (Debian
6.1.192 has it between the markers and the token table).  ``names`` holds,
per symbol, a length (one byte, or two as a 7+7-bit number when the first
has bit 7 set: "big" names, since 6.1) and that many token indices; the
expansion's first character is the symbol type.  An offset decodes as
``relative_base + (u32)offset``, or with ``CONFIG_KALLSYMS_ABSOLUTE_PERCPU``
(x86_64 until 6.14) as the absolute value when it is >= 0 and
``relative_base - 1 - offset`` otherwise; the decoder takes the reading
under which the table is sorted by address, as kallsyms always is.

Everything found is cross-checked (token index against token table,
``num_syms`` against the names it must parse to, every 256th name against
``markers``) and every size is bounded: garbage raises :class:`SymbolError`.

Tables are cached per kernel build, keyed by the ``linux_banner`` string,
under :data:`DEFAULT_CACHE_DIR` (root-owned, 0755 directory, 0644 files).
"""
from __future__ import annotations

import base64
import bz2
import contextlib
import hashlib
import json
import logging
import lzma
import os
import shutil
import stat
import struct
import subprocess
import tempfile
import zlib
from array import array
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from kairos_libvirt.introspect.symbols import (
    KASLR_ALIGN, KERNEL_MAP_END, KERNEL_MAP_START, LINK_TEXT, GuestSymbols, Reader, SymbolError,
    try_read,
)

__all__ = [
    "KallsymsTables", "SymbolCache", "DEFAULT_CACHE_DIR",
    "extract_vmlinux", "decode_kallsyms", "decode_kallsyms_buffer",
    "recover_from_vmlinuz", "recover_from_memory", "load_vmlinuz", "load_from_memory",
    "find_text_base", "MAX_SYMS",
]

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = "/var/cache/kairos/ksyms"

#: Bounds on everything a kernel image (or a hostile guest) can make us do.
MAX_SYMS = 1 << 21                 # real kernels: 80k..300k
MAX_TOKEN = 128                    # bytes per token (real: < 40)
MAX_ENTRY = 2 + 512                # one compressed name with its length (KSYM_NAME_LEN 512)
MAX_VMLINUX = 512 << 20            # decompressed vmlinux
MAX_VMLINUZ = 256 << 20
MAX_BANNER = 512
SCAN_LIMIT = 128 << 20             # bytes of the kernel map scanned for the token table
MAX_CANDIDATES = 256               # "0\01\0...9\0" look-alikes examined before giving up
MAX_TOKEN_TABLES = 4               # valid-looking token tables searched for the other tables
MAX_MARKER_CANDIDATES = 64         # kallsyms_markers look-alikes checked per token table
READ_BUDGET = 192 << 20            # bytes a memory recovery may ask the reader for
MAX_HOLE = 16 << 20                # unreadable bytes in a row that end the scan of the image

_DIGITS = b"".join(bytes([c]) + b"\0" for c in b"0123456789")
_FORMAT = "kairos-ksyms/1"
_MASK64 = (1 << 64) - 1
_PAGE = 4096


def _align(x: int, a: int) -> int:
    return (x + a - 1) & ~(a - 1)


# --------------------------------------------------------------------------
# Address spaces the decoder reads: an ELF file's segments, or guest memory.

class _Image:
    """Kernel-virtual memory for the decoder: ``get`` exact bytes or raise SymbolError."""

    what = "memory"

    def get(self, addr: int, n: int) -> bytes:
        raise NotImplementedError

    def get_upto(self, addr: int, n: int) -> bytes:
        """Between 1 and *n* bytes at *addr* (as many as are contiguous), or raise SymbolError."""
        raise NotImplementedError

    def find(self, pattern: bytes, start: int, end: int) -> Iterator[int]:
        raise NotImplementedError

    def u16s(self, addr: int, n: int) -> Tuple[int, ...]:
        return struct.unpack(f"<{n}H", self.get(addr, 2 * n))

    def u32(self, addr: int) -> int:
        return int.from_bytes(self.get(addr, 4), "little")

    def u64(self, addr: int) -> int:
        return int.from_bytes(self.get(addr, 8), "little")

    def cstrings(self, addr: int, count: int, maxlen: int) -> Tuple[List[bytes], int]:
        """*count* NUL-terminated strings from *addr*, each at most *maxlen* bytes; and the end."""
        out: List[bytes] = []
        buf = b""
        pos = addr  # address of buf[0]
        while len(out) < count:
            nul = buf.find(b"\0")
            if nul < 0:
                if len(buf) > maxlen:
                    raise SymbolError(f"string at {pos:#x} longer than {maxlen} bytes")
                buf += self.get_upto(pos + len(buf), _PAGE)
                continue
            if nul > maxlen:
                raise SymbolError(f"string at {pos:#x} longer than {maxlen} bytes")
            out.append(buf[:nul])
            buf = buf[nul + 1:]
            pos += nul + 1
        return out, pos


class _BufferImage(_Image):
    """ELF segments of a vmlinux held in memory: (vaddr, bytes) pairs."""

    def __init__(self, segments: Sequence[Tuple[int, bytes]], what: str = "vmlinux") -> None:
        self.segments = sorted((v, memoryview(b)) for v, b in segments)
        self.what = what

    def get(self, addr: int, n: int) -> bytes:
        for v, b in self.segments:
            if v <= addr and addr + n <= v + len(b):
                return bytes(b[addr - v:addr - v + n])
        raise SymbolError(f"{self.what} has no data at {addr:#x}+{n}")

    def get_upto(self, addr: int, n: int) -> bytes:
        for v, b in self.segments:
            if v <= addr < v + len(b):
                return bytes(b[addr - v:addr - v + n])
        raise SymbolError(f"{self.what} has no data at {addr:#x}")

    def find(self, pattern: bytes, start: int, end: int) -> Iterator[int]:
        for v, b in self.segments:
            lo, hi = max(start, v), min(end, v + len(b))
            if lo >= hi:
                continue
            data = b.obj if isinstance(b.obj, bytes) and len(b.obj) == len(b) else bytes(b)
            i = data.find(pattern, lo - v, hi - v)
            while i >= 0:
                yield v + i
                i = data.find(pattern, i + 1, hi - v)


class _ReaderImage(_Image):
    """Guest memory through ``read(vaddr, n)``, in cached blocks; unreadable pages are holes."""

    what = "guest memory"
    BLOCK = 256 << 10

    def __init__(self, read: Reader, budget: Optional[int] = None) -> None:
        self.read = read
        self.budget = READ_BUDGET if budget is None else budget
        self.spent = 0
        self.calls = 0
        self.blocks: Dict[int, Optional[bytes]] = {}   # None: read page by page
        self.pages: Dict[int, Optional[bytes]] = {}    # None: unreadable

    def _read(self, addr: int, n: int) -> Optional[bytes]:
        if self.spent + n > self.budget:
            raise SymbolError(f"gave up after reading {self.spent >> 20} MiB of guest memory "
                              "without finding a consistent kallsyms table")
        self.spent += n
        self.calls += 1
        data, _ = try_read(self.read, addr, n)
        return data

    def _block(self, base: int) -> Optional[bytes]:
        if base not in self.blocks:
            self.blocks[base] = self._read(base, self.BLOCK) if 0 <= base <= _MASK64 - self.BLOCK else None
        return self.blocks[base]

    def _page(self, addr: int) -> Optional[bytes]:
        base = addr & ~(self.BLOCK - 1)
        block = self._block(base)
        if block is not None:
            off = (addr & ~(_PAGE - 1)) - base
            return block[off:off + _PAGE]
        page = addr & ~(_PAGE - 1)
        if page not in self.pages:
            self.pages[page] = self._read(page, _PAGE)
        return self.pages[page]

    def get(self, addr: int, n: int) -> bytes:
        if not 0 <= addr <= _MASK64 - n:
            raise SymbolError(f"address {addr:#x}+{n} is outside the 64-bit space")
        out = bytearray()
        pos = addr
        while len(out) < n:
            page = self._page(pos)
            if page is None:
                raise SymbolError(f"guest memory at {pos:#x} is not readable")
            off = pos & (_PAGE - 1)
            take = page[off:off + n - len(out)]
            out += take
            pos += len(take)
        return bytes(out)

    def get_upto(self, addr: int, n: int) -> bytes:
        page = self._page(addr) if 0 <= addr <= _MASK64 else None
        if page is None:
            raise SymbolError(f"guest memory at {addr:#x} is not readable")
        off = addr & (_PAGE - 1)
        return page[off:off + n]

    def _runs(self, base: int) -> List[Tuple[int, bytes]]:
        """The readable stretches of the block at *base*.

        A block that failed as a whole is read page by page only if it looks
        like the edge of a mapped range (its first or last page, or a
        neighbour block, is readable): deep inside a hole, or past the end of
        the image, that would be 64 useless reads a block.  A mapped island
        smaller than a block and touching neither of its ends is missed; the
        kallsyms tables are hundreds of KiB.
        """
        block = self._block(base)
        if block is not None:
            return [(base, block)]
        if self._page(base) is None and self._page(base + self.BLOCK - _PAGE) is None and \
                self._block(base - self.BLOCK) is None and self._block(base + self.BLOCK) is None:
            return []
        runs: List[Tuple[int, bytes]] = []
        for page in range(base, base + self.BLOCK, _PAGE):
            data = self._page(page)
            if data is None:
                continue
            if runs and runs[-1][0] + len(runs[-1][1]) == page:
                runs[-1] = (runs[-1][0], runs[-1][1] + data)
            else:
                runs.append((page, data))
        return runs

    def find(self, pattern: bytes, start: int, end: int) -> Iterator[int]:
        """Occurrences of *pattern* in the readable parts of [start, end).

        Stops after :data:`MAX_HOLE` bytes in a row that cannot be read: the
        end of the kernel image (its own holes are smaller).
        """
        keep = len(pattern) - 1
        tail, tail_end = b"", -1
        pos = start & ~(self.BLOCK - 1)
        hole = 0
        while pos < end:
            runs = self._runs(pos)
            hole = 0 if runs else hole + self.BLOCK
            if hole >= MAX_HOLE:
                return
            for at, data in runs:
                if at != tail_end:
                    tail = b""
                buf = tail + data
                base = at - len(tail)
                i = buf.find(pattern)
                while i >= 0:
                    if start <= base + i < end:
                        yield base + i
                    i = buf.find(pattern, i + 1)
                tail, tail_end = (buf[-keep:] if keep else b""), at + len(data)
            pos += self.BLOCK


# --------------------------------------------------------------------------
# The decoder.

@dataclass
class KallsymsTables:
    """A decoded kallsyms table and where its parts were found (addresses as read)."""

    names: List[str]
    addresses: List[int]
    types: str
    token_table: int
    token_index: int
    markers: int
    names_start: int
    num_syms_addr: int
    offsets: int
    relative_base: int
    layout: str      # "offsets-first" (<= 6.3) or "offsets-last" (>= 6.4) or "absolute"
    addressing: str  # "absolute-percpu", "relative" or "absolute"
    seqs_of_names: bool  # kallsyms_seqs_of_names sits between the markers and the token table


def _expand(names_blob: bytes, start: int, count: int, tokens: Sequence[bytes],
            markers: Sequence[int]) -> Tuple[List[str], str, int]:
    """Expand *count* compressed names from offset *start*; check markers every 256."""
    names: List[str] = []
    types: List[str] = []
    pos = start
    end = len(names_blob)
    join = b"".join
    tok = tokens.__getitem__
    for i in range(count):
        if i & 0xff == 0 and markers[i >> 8] != pos - start:
            raise SymbolError(f"name {i} is at offset {pos - start}, kallsyms_markers says "
                              f"{markers[i >> 8]}")
        if pos >= end:
            raise SymbolError(f"names end after {i} of {count} symbols")
        n = names_blob[pos]
        pos += 1
        if n & 0x80:
            if pos >= end:
                raise SymbolError(f"name {i}: truncated length")
            n = (n & 0x7f) | (names_blob[pos] << 7)
            pos += 1
        if n == 0 or n > MAX_ENTRY or pos + n > end:
            raise SymbolError(f"name {i}: bad compressed length {n}")
        text = join(map(tok, names_blob[pos:pos + n]))
        pos += n
        if len(text) < 2 or len(text) > 2 * MAX_ENTRY:
            raise SymbolError(f"name {i}: expands to {len(text)} bytes")
        s = text.decode("ascii")
        types.append(s[0])
        names.append(s[1:])
    return names, "".join(types), pos


def _tail_end(blob: bytes, pos: int, count: int) -> Optional[int]:
    """Where *count* length-prefixed entries starting at *pos* end, or None if they do not fit."""
    end = len(blob)
    for _ in range(count):
        if pos >= end:
            return None
        n = blob[pos]
        pos += 1
        if n & 0x80:
            if pos >= end:
                return None
            n = (n & 0x7f) | (blob[pos] << 7)
            pos += 1
        if n == 0 or n > MAX_ENTRY:
            return None
        pos += n
    return pos if pos <= end else None


def _token_tables(img: _Image, digits: int) -> Tuple[int, int, List[bytes], int]:
    """Token table start, token index address, the 256 tokens and the index end, from the "0" token."""
    _, end = img.cstrings(digits, 256 - 0x30, MAX_TOKEN)
    last = None
    for a in (8, 4, 2):
        index_at = _align(end, a)
        if index_at == last:
            continue
        last = index_at
        try:
            idx = img.u16s(index_at, 256)
        except SymbolError:
            continue
        if idx[0] != 0 or idx[0x30] > digits or any(idx[i] >= idx[i + 1] for i in range(0x30, 255)):
            continue
        start = digits - idx[0x30]
        tokens, tend = img.cstrings(start, 256, MAX_TOKEN)
        if tend != end:
            continue
        off = 0
        ok = True
        for i, t in enumerate(tokens):
            if idx[i] != off or any(c < 0x21 or c > 0x7e for c in t):
                ok = False
                break
            off += len(t) + 1
        if ok and all(tokens[0x30 + d] == b"%d" % d for d in range(10)):
            return start, index_at, tokens, index_at + 512
    raise SymbolError(f"digits at {digits:#x} are not followed by a kallsyms_token_index")


def _readable_from(img: _Image, lo: int, hi: int) -> int:
    """The lowest address a >= lo with [a, hi) readable, walking down page by page."""
    a = hi
    while a > lo:
        p = max(lo, (a - 1) & ~(_PAGE - 1))
        try:
            img.get(p, a - p)
        except SymbolError:
            break
        a = p
    return a


def _marker_candidates(img: _Image, token_table: int, lowest: int
                       ) -> Iterator[Tuple[int, int, List[int], int, int]]:
    """(markers address, width, markers, N low, N high) candidates, nearest the token table first.

    Markers are 0, then strictly increasing sizes of 256 names each; after
    them comes either the token table (no seqs_of_names) or 3N bytes of
    seqs_of_names, then the token table, each 8-aligned.
    """
    floor = max(lowest, token_table - (3 * MAX_SYMS + 8 * (MAX_SYMS // 256) + 64))
    run = 8 * (MAX_SYMS // 256 + 2)  # the longest markers array, in bytes
    step = 64 << 10
    hi = token_table & ~7
    while hi > floor:
        lo = max(floor, hi - step) & ~7
        top = min(token_table, hi + run)
        try:
            chunk = img.get(lo, top - lo)
            last = False
        except SymbolError:
            lo = _align(_readable_from(img, lo, top), 8)
            if lo >= hi:
                return
            chunk = img.get(lo, top - lo)
            last = True
        for x in range(hi - 8, lo - 1, -8):
            off = x - lo
            for width in (4, 8):
                if chunk[off:off + width] != bytes(width):
                    continue
                fmt = "<I" if width == 4 else "<Q"
                markers = [0]
                p = off + width
                while p + width <= len(chunk) and len(markers) <= MAX_SYMS // 256:
                    v = struct.unpack_from(fmt, chunk, p)[0]
                    if not 2 * 256 <= v - markers[-1] <= 256 * MAX_ENTRY:
                        break
                    markers.append(v)
                    p += width
                for m in range(len(markers), 0, -1):
                    gap = token_table - _align(x + width * m, 8)
                    nlo, nhi = 256 * (m - 1) + 1, 256 * m
                    if gap == 0:
                        yield x, width, markers[:m], nlo, nhi
                    elif gap > 0:
                        slo, shi = max(nlo, -(-(gap - 7) // 3)), min(nhi, gap // 3)
                        if slo <= shi:
                            yield x, width, markers[:m], slo, shi
        if last:
            return
        hi = lo


def _find_names(img: _Image, markers_at: int, markers: List[int], nlo: int, nhi: int, lowest: int
                ) -> Optional[Tuple[int, int, bytes, int]]:
    """(names start, num_syms, names bytes, names end) consistent with the markers, or None.

    ``num_syms`` (u32, then 4 bytes of padding or a zero high half) sits
    right before the names; the names from the last marker on must end
    where the markers begin (give or take the 8-byte alignment).
    """
    last = markers[-1]
    top = (markers_at - last - 1) & ~7
    lo = max(markers_at - last - 256 * MAX_ENTRY - 16, lowest)
    lo = _align(lo, 8)
    if top - 8 < lo:
        return None
    try:
        window = img.get(lo, markers_at - lo)
    except SymbolError:
        lo = _align(_readable_from(img, lo, markers_at), 8)
        if top - 8 < lo:
            return None
        window = img.get(lo, markers_at - lo)
    for s in range(top, lo + 7, -8):
        n, pad = struct.unpack_from("<II", window, s - 8 - lo)
        if not (nlo <= n <= nhi and pad == 0):
            continue
        tail = _tail_end(window, s - lo + last, n - 256 * (len(markers) - 1))
        if tail is None or not markers_at - 8 < lo + tail <= markers_at:
            continue
        if window[tail:].strip(b"\0"):
            continue
        return s, n, window[s - lo:tail], lo + tail
    return None


def _addresses(img: _Image, names_start: int, n: int, index_end: int
               ) -> Tuple[List[int], int, int, str, str]:
    """(addresses, offsets address, relative base, layout, addressing), sorted as kallsyms is."""
    tried = []
    layouts = []
    rb_first = names_start - 16
    layouts.append(("offsets-first", rb_first - _align(4 * n, 8), rb_first))
    off_last = _align(index_end, 8)
    layouts.append(("offsets-last", off_last, _align(off_last + 4 * n, 8)))
    for layout, offsets_at, rb_at in layouts:
        try:
            rb = img.u64(rb_at)
            raw = img.get(offsets_at, 4 * n)
        except SymbolError as exc:
            tried.append(f"{layout}: {exc}")
            continue
        if not KERNEL_MAP_START <= rb <= _MASK64:
            tried.append(f"{layout}: relative base {rb:#x} is not a kernel address")
            continue
        offs = array("i")
        offs.frombytes(raw)
        if struct.pack("<i", 1) != array("i", [1]).tobytes():  # pragma: no cover - big-endian host
            offs.byteswap()
        neg = sum(1 for o in offs if o < 0)
        modes = ["absolute-percpu", "relative"] if neg * 2 > n else ["relative", "absolute-percpu"]
        for mode in modes:
            if mode == "relative":
                addrs = [(rb + (o & 0xffffffff)) & _MASK64 for o in offs]
            else:
                addrs = [o if o >= 0 else (rb - 1 - o) & _MASK64 for o in offs]
            if all(addrs[i] <= addrs[i + 1] for i in range(n - 1)) and \
                    sum(1 for a in addrs if a >= KERNEL_MAP_START) * 2 > n:
                return addrs, offsets_at, rb, layout, mode
            tried.append(f"{layout}/{mode}: addresses not sorted")
    # Kernels without CONFIG_KALLSYMS_BASE_RELATIVE: kallsyms_addresses (u64) before num_syms.
    at = names_start - 8 - 8 * n
    try:
        addrs = list(struct.unpack(f"<{n}Q", img.get(at, 8 * n)))
        if all(addrs[i] <= addrs[i + 1] for i in range(n - 1)) and \
                sum(1 for a in addrs if a >= KERNEL_MAP_START) * 2 > n:
            return addrs, at, 0, "absolute", "absolute"
        tried.append("kallsyms_addresses: not sorted")
    except SymbolError as exc:
        tried.append(f"kallsyms_addresses: {exc}")
    raise SymbolError("no kallsyms_offsets/kallsyms_addresses array fits: " + "; ".join(tried))


def _decode_at(img: _Image, tokens_found: Tuple[int, int, List[bytes], int], lowest: int) -> KallsymsTables:
    token_table, token_index, tokens, index_end = tokens_found
    found = None
    tried = 0
    for markers_at, width, markers, nlo, nhi in _marker_candidates(img, token_table, lowest):
        tried += 1
        if tried > MAX_MARKER_CANDIDATES:
            break
        found = _find_names(img, markers_at, markers, nlo, nhi, lowest)
        if found is not None:
            break
    if found is None:
        raise SymbolError(f"token table at {token_table:#x} has no kallsyms_markers/kallsyms_names "
                          f"before it ({tried} candidates checked)")
    names_start, n, blob, names_end = found
    names, types, _ = _expand(blob, 0, n, tokens, markers)
    addrs, offsets_at, rb, layout, mode = _addresses(img, names_start, n, index_end)
    return KallsymsTables(names, addrs, types, token_table, token_index, markers_at, names_start,
                          names_start - 8, offsets_at, rb, layout, mode,
                          _align(markers_at + width * len(markers), 8) != token_table)


def decode_kallsyms(img: _Image, start: int, end: int) -> KallsymsTables:
    """Find and decode the kallsyms tables in ``[start, end)`` of *img*."""
    errors: List[str] = []
    tables = 0
    for count, digits in enumerate(img.find(_DIGITS, start, end)):
        if count >= MAX_CANDIDATES or tables >= MAX_TOKEN_TABLES:
            errors.append(f"stopped after {count} look-alikes")
            break
        try:
            found = _token_tables(img, digits)
        except SymbolError as exc:
            errors.append(f"{digits:#x}: {exc}")
            continue
        tables += 1
        try:
            return _decode_at(img, found, start)
        except SymbolError as exc:
            errors.append(f"{digits:#x}: {exc}")
    if not errors:
        raise SymbolError(f"no kallsyms token table in {img.what} {start:#x}..{end:#x}")
    raise SymbolError(f"no consistent kallsyms tables in {img.what} {start:#x}..{end:#x}: "
                      + "; ".join(errors[:6]) + (" ..." if len(errors) > 6 else ""))


def decode_kallsyms_buffer(data: bytes, base: int) -> KallsymsTables:
    """Decode kallsyms from a flat image *data* mapped at *base* (tests, raw dumps)."""
    return decode_kallsyms(_BufferImage([(base, data)], "buffer"), base, base + len(data))


# --------------------------------------------------------------------------
# vmlinuz → vmlinux (ELF).

_MAGICS = [
    ("xz", b"\xfd7zXZ\x00"),
    ("gzip", b"\x1f\x8b\x08"),
    ("zstd", b"\x28\xb5\x2f\xfd"),
    ("bzip2", b"BZh"),
    ("lzma", b"\x5d\x00\x00"),
    ("lz4", b"\x02\x21\x4c\x18"),
    ("lzo", b"\x89LZO"),
]
_TOOLS = {"zstd": ["zstd", "-dcq"], "lz4": ["lz4", "-dcq"], "lzo": ["lzop", "-dcq"]}


def _decompress(kind: str, data: bytes) -> bytes:
    if kind in ("xz", "lzma"):
        d = lzma.LZMADecompressor(lzma.FORMAT_XZ if kind == "xz" else lzma.FORMAT_ALONE)
        out = d.decompress(data, MAX_VMLINUX)
        if not d.eof and d.needs_input is False:
            raise SymbolError(f"decompressed kernel larger than {MAX_VMLINUX >> 20} MiB")
        return out
    if kind == "gzip":
        z = zlib.decompressobj(16 + zlib.MAX_WBITS)
        out = z.decompress(data, MAX_VMLINUX)
        if z.unconsumed_tail:
            raise SymbolError(f"decompressed kernel larger than {MAX_VMLINUX >> 20} MiB")
        return out
    if kind == "bzip2":
        b = bz2.BZ2Decompressor()
        out = b.decompress(data, MAX_VMLINUX)
        if not b.eof and b.needs_input is False:
            raise SymbolError(f"decompressed kernel larger than {MAX_VMLINUX >> 20} MiB")
        return out
    tool = _TOOLS[kind]
    if shutil.which(tool[0]) is None:
        raise SymbolError(f"the kernel is {kind}-compressed and the {tool[0]!r} tool is not installed. "
                          f"Fix: apt-get install {'lzop' if kind == 'lzo' else tool[0]}")
    # The kernel appends the uncompressed size (4 bytes): a stream decoder
    # may call that trailing garbage, so take what came out and check it below.
    proc = subprocess.run(tool, input=data, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          check=False, timeout=120)
    if not proc.stdout:
        raise SymbolError(f"{tool[0]} could not decompress the kernel: "
                          f"{proc.stderr.decode(errors='replace').strip()[:200]}")
    return proc.stdout[:MAX_VMLINUX]


def extract_vmlinux(data: bytes, what: str = "vmlinuz") -> bytes:
    """The ELF vmlinux inside a bzImage (or *data* itself if it is an ELF already)."""
    if data[:4] == b"\x7fELF":
        return data
    tried: List[str] = []
    spots: List[Tuple[str, int]] = []
    if len(data) > 0x250 and data[0x202:0x206] == b"HdrS":
        # Documentation/x86/boot.rst: setup_sects at 0x1f1, payload_offset/length at 0x248.
        setup = (data[0x1f1] or 4) + 1
        off, length = struct.unpack_from("<II", data, 0x248)
        start = setup * 512 + off
        if off and 0 < length <= len(data) - start:
            for kind, magic in _MAGICS:
                if data.startswith(magic, start):
                    spots.append((kind, start))
            if not spots:
                tried.append(f"bzImage payload at {start:#x} has an unknown compression "
                             f"(starts {data[start:start + 6].hex()})")
    if not spots:  # no boot header: look for compressed streams, as extract-vmlinux does
        for kind, magic in _MAGICS:
            i = data.find(magic)
            hits = 0
            while i >= 0 and hits < 8:
                spots.append((kind, i))
                hits += 1
                i = data.find(magic, i + 1)
    for kind, at in spots:
        try:
            out = _decompress(kind, data[at:])
        except (lzma.LZMAError, zlib.error, OSError, EOFError, ValueError, subprocess.SubprocessError,
                SymbolError) as exc:
            tried.append(f"{kind} at {at:#x}: {exc}")
            continue
        if out[:4] == b"\x7fELF":
            return out
        tried.append(f"{kind} at {at:#x}: not an ELF file inside")
    raise SymbolError(f"no kernel ELF image found in {what}: "
                      + ("; ".join(tried[:5]) if tried else "no bzImage header and no compressed stream")
                      + ". Fix: is it a Linux x86_64 kernel image (bzImage or vmlinux)?")


def _elf_segments(elf: bytes, what: str) -> Tuple[List[Tuple[int, bytes]], Optional[str]]:
    """PT_LOAD segments in the kernel map, and the GNU build id."""
    if len(elf) < 64 or elf[4] != 2 or elf[5] != 1 or struct.unpack_from("<H", elf, 18)[0] != 62:
        raise SymbolError(f"{what} is not a little-endian x86_64 ELF kernel")
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    if phentsize < 56 or phnum > 64 or phoff + phnum * phentsize > len(elf):
        raise SymbolError(f"{what}: bad ELF program header table")
    segs: List[Tuple[int, bytes]] = []
    build_id = None
    for i in range(phnum):
        p_type, _, p_off, p_vaddr, _, p_filesz = struct.unpack_from("<IIQQQQ", elf, phoff + i * phentsize)
        if p_off + p_filesz > len(elf):
            raise SymbolError(f"{what}: ELF segment {i} runs past the end of the file")
        if p_type == 1 and p_filesz and p_vaddr >= KERNEL_MAP_START:
            segs.append((p_vaddr, elf[p_off:p_off + p_filesz]))
        elif p_type == 4:
            build_id = build_id or _gnu_build_id(elf[p_off:p_off + p_filesz])
    if not segs:
        raise SymbolError(f"{what}: no loadable segment in the kernel map")
    return segs, build_id


def _gnu_build_id(notes: bytes) -> Optional[str]:
    pos = 0
    for _ in range(256):
        if pos + 12 > len(notes):
            return None
        namesz, descsz, ntype = struct.unpack_from("<III", notes, pos)
        name_at = pos + 12
        desc_at = name_at + _align(namesz, 4)
        pos = desc_at + _align(descsz, 4)
        if pos > len(notes):
            return None
        if ntype == 3 and notes[name_at:name_at + namesz] == b"GNU\0":
            return notes[desc_at:desc_at + descsz].hex()
    return None


def _read_banner(img: _Image, addr: int) -> str:
    (raw,), _ = img.cstrings(addr, 1, MAX_BANNER)
    if not raw.startswith(b"Linux version ") or any(c < 0x20 and c != 0x0a or c > 0x7e for c in raw):
        raise SymbolError(f"linux_banner at {addr:#x} is not a Linux banner: {raw[:40]!r}")
    return raw.decode("ascii")


def _symbols(tables: KallsymsTables, banner: str, build_id: Optional[str], source: str,
             delta: int = 0) -> GuestSymbols:
    addrs = tables.addresses
    if delta:
        addrs = [a - delta if a >= KERNEL_MAP_START else a for a in addrs]
    return GuestSymbols(tables.names, addrs, tables.types, banner=banner, build_id=build_id, source=source)


def recover_from_vmlinuz(path: str) -> GuestSymbols:
    """The symbol table of the kernel image at *path* (bzImage or ELF vmlinux). No cache."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_VMLINUZ + 1)
    except OSError as exc:
        raise SymbolError(f"cannot read kernel image {path}: {exc.strerror}. Fix: check the "
                          "domain's <os><kernel> path") from exc
    if len(data) > MAX_VMLINUZ:
        raise SymbolError(f"{path} is larger than {MAX_VMLINUZ >> 20} MiB: not a kernel image")
    elf = extract_vmlinux(data, path)
    segs, build_id = _elf_segments(elf, path)
    img = _BufferImage(segs, path)
    lo = min(v for v, _ in segs)
    hi = max(v + len(b) for v, b in segs)
    try:
        tables = decode_kallsyms(img, lo, hi)
    except SymbolError as exc:
        raise SymbolError(f"no kallsyms found in {path} ({exc}). Fix: is it a Linux kernel image "
                          "built with CONFIG_KALLSYMS?") from exc
    banner = _banner_of(tables, img, path)
    return _symbols(tables, banner, build_id, f"vmlinuz {path}")


def _banner_of(tables: KallsymsTables, img: _Image, what: str) -> str:
    try:
        at = tables.addresses[tables.names.index("linux_banner")]
    except ValueError:
        raise SymbolError(f"kallsyms of {what} has no linux_banner") from None
    return _read_banner(img, at)


def find_text_base(read: Reader) -> int:
    """The runtime ``_text``: the first readable 2 MiB-aligned page of the kernel map.

    At boot, ``cleanup_highmap()`` unmaps the kernel map below ``_text``.
    """
    last: Optional[BaseException] = None
    for addr in range(KERNEL_MAP_START, KERNEL_MAP_END, KASLR_ALIGN):
        data, fault = try_read(read, addr, 1)
        if data is not None:
            return addr
        last = fault
    raise SymbolError("no readable kernel image in guest memory 0xffffffff80000000..0xffffffffc0000000 "
                      f"(last error: {last}). Fix: stop the vCPU in kernel mode, or with a kernel page "
                      "table loaded (CR3), before reading; is the guest a Linux x86_64 kernel?")


def recover_from_memory(read: Reader, *, text_base: Optional[int] = None) -> GuestSymbols:
    """The symbol table of the running guest kernel, from its own kallsyms tables. No cache.

    Addresses are returned unrandomized, as if ``_text`` were at
    :data:`LINK_TEXT` (the x86_64 default): consistent with :func:`find_slide`.
    """
    img = _ReaderImage(read)
    if text_base is None:
        text_base = find_text_base(read)
    end = min(KERNEL_MAP_END, text_base + SCAN_LIMIT)
    try:
        tables = decode_kallsyms(img, text_base, end)
    except SymbolError as exc:
        raise SymbolError(f"no kallsyms found in guest memory from {text_base:#x} ({exc}). Fix: is the "
                          "guest kernel built with CONFIG_KALLSYMS? Otherwise give its vmlinuz") from exc
    banner = _banner_of(tables, img, "guest memory")
    try:
        text = tables.addresses[tables.names.index("_text")]
    except ValueError:
        text = text_base
    delta = text - LINK_TEXT
    if delta % KASLR_ALIGN:
        raise SymbolError(f"guest _text at {text:#x} is not 2 MiB aligned: not an x86_64 KASLR kernel")
    log.debug("kallsyms from memory: %d symbols, %d reads, %d KiB", len(tables.names), img.calls,
              img.spent >> 10)
    return _symbols(tables, banner, None, f"guest memory (text at {text:#x})", delta)


# --------------------------------------------------------------------------
# Cache per kernel build.

class SymbolCache:
    """``DIR/<sha256(banner)>.ksyms``: a JSON header line, then a JSON payload line.

    ``DIR/image-<sha256(vmlinuz)>.ref`` maps a kernel file to its banner key.
    The directory is created 0755 and files 0644; a directory or file that
    is not owned by us (or root) or that others can write is not trusted.
    """

    def __init__(self, directory: str = DEFAULT_CACHE_DIR) -> None:
        self.dir = directory

    @staticmethod
    def key(banner: str) -> str:
        return hashlib.sha256(banner.encode("ascii", "replace")).hexdigest()

    def _trusted(self, st: os.stat_result) -> bool:
        return st.st_uid in (0, os.geteuid()) and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)

    def _dir_ok(self, create: bool) -> bool:
        try:
            if create and not os.path.isdir(self.dir):
                os.makedirs(self.dir, mode=0o755, exist_ok=True)
                os.chmod(self.dir, 0o755)
            st = os.lstat(self.dir)
        except OSError as exc:
            if create:
                log.warning("symbol cache %s unusable: %s", self.dir, exc)
            return False
        if not stat.S_ISDIR(st.st_mode) or not self._trusted(st):
            log.warning("symbol cache %s is not a directory owned by root and writable only by it; "
                        "not using it", self.dir)
            return False
        return True

    def _read(self, name: str, limit: int, *, head: bool = False) -> Optional[bytes]:
        """The file's bytes (or its first *limit* bytes with *head*), if we trust it."""
        path = os.path.join(self.dir, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            return None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode) or not self._trusted(st) or \
                    (st.st_size > limit and not head):
                log.warning("symbol cache file %s is not trusted (owner, mode or size); ignoring it", path)
                return None
            return f.read(limit)

    def _write(self, name: str, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o644)
            os.replace(tmp, os.path.join(self.dir, name))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def entries(self) -> List[Dict[str, Any]]:
        """The header of every entry (newest first, at most 64)."""
        if not self._dir_ok(create=False):
            return []
        try:
            names = [n for n in os.listdir(self.dir) if n.endswith(".ksyms")]
        except OSError:
            return []
        names.sort(key=lambda n: _mtime(os.path.join(self.dir, n)), reverse=True)
        out = []
        for n in names[:64]:
            head = _parse_header(self._read(n, 4096, head=True))
            if head is not None:
                head["_file"] = n
                out.append(head)
        return out

    def get(self, key: str) -> Optional[GuestSymbols]:
        if not self._dir_ok(create=False):
            return None
        raw = self._read(key + ".ksyms", 64 << 20)
        if raw is None:
            return None
        syms = _parse_entry(raw)
        if syms is None:
            log.warning("symbol cache entry %s is damaged; recovering again", key)
        elif self.key(syms.banner) != key:
            log.warning("symbol cache entry %s has another banner; ignoring it", key)
            return None
        return syms

    def get_image(self, image_sha256: str) -> Optional[GuestSymbols]:
        raw = self._read(f"image-{image_sha256}.ref", 128) if self._dir_ok(create=False) else None
        if raw is None:
            return None
        key = raw.decode("ascii", "replace").strip()
        return self.get(key) if len(key) == 64 and all(c in "0123456789abcdef" for c in key) else None

    def put(self, syms: GuestSymbols, *, image_sha256: Optional[str] = None) -> Optional[str]:
        """Store *syms*; returns the key, or None if the cache is not usable (logged)."""
        if not self._dir_ok(create=True):
            return None
        key = self.key(syms.banner)
        try:
            self._write(key + ".ksyms", _format_entry(syms))
            if image_sha256:
                self._write(f"image-{image_sha256}.ref", key.encode() + b"\n")
        except OSError as exc:
            log.warning("cannot write the symbol cache in %s: %s", self.dir, exc)
            return None
        return key


def _mtime(path: str) -> float:
    try:
        return os.lstat(path).st_mtime
    except OSError:
        return 0.0


def _format_entry(syms: GuestSymbols) -> bytes:
    def addr(name: str) -> Optional[int]:
        return syms.address(name) if name in syms else None
    head = {"format": _FORMAT, "banner": syms.banner, "build_id": syms.build_id, "source": syms.source,
            "count": len(syms), "text": addr("_text"), "linux_banner": addr("linux_banner")}
    addrs = array("Q", syms.addresses)
    body = {"names": "\n".join(syms.names), "types": syms.types,
            "addresses": base64.b64encode(addrs.tobytes()).decode("ascii")}
    return (json.dumps(head, sort_keys=True) + "\n" + json.dumps(body) + "\n").encode("ascii")


def _parse_header(raw: Optional[bytes]) -> Optional[Dict[str, Any]]:
    if not raw:
        return None
    line = raw.split(b"\n", 1)[0]
    try:
        head = json.loads(line)
    except ValueError:
        return None
    if not isinstance(head, dict) or head.get("format") != _FORMAT or not isinstance(head.get("banner"), str):
        return None
    for k in ("text", "linux_banner", "count"):
        if not isinstance(head.get(k), int):
            return None
    return head


def _parse_entry(raw: bytes) -> Optional[GuestSymbols]:
    head = _parse_header(raw)
    parts = raw.split(b"\n")
    if head is None or len(parts) < 2:
        return None
    try:
        body = json.loads(parts[1])
        names = body["names"].split("\n")
        types = body["types"]
        addrs = array("Q")
        addrs.frombytes(base64.b64decode(body["addresses"], validate=True))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    if not isinstance(types, str) or not len(names) == len(types) == len(addrs) == head["count"]:
        return None
    bid = head.get("build_id")
    return GuestSymbols(names, addrs, types, banner=head["banner"],
                        build_id=bid if isinstance(bid, str) else None,
                        source=str(head.get("source", "")) + " (cached)")


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as exc:
        raise SymbolError(f"cannot read kernel image {path}: {exc.strerror}. Fix: check the "
                          "domain's <os><kernel> path") from exc
    return h.hexdigest()


def load_vmlinuz(path: str, cache_dir: Optional[str] = DEFAULT_CACHE_DIR) -> GuestSymbols:
    """:func:`recover_from_vmlinuz`, through the cache (*cache_dir* None: no cache)."""
    if cache_dir is None:
        return recover_from_vmlinuz(path)
    cache = SymbolCache(cache_dir)
    digest = _file_sha256(path)
    syms = cache.get_image(digest)
    if syms is None:
        syms = recover_from_vmlinuz(path)
        cache.put(syms, image_sha256=digest)
    return syms


def load_from_memory(read: Reader, cache_dir: Optional[str] = DEFAULT_CACHE_DIR) -> GuestSymbols:
    """:func:`recover_from_memory`, through the cache.

    A cached table is used when its banner is found in guest memory where
    that table puts ``linux_banner`` for the slide implied by the runtime
    ``_text`` (one read per cached kernel).
    """
    text_base = find_text_base(read)
    cache = SymbolCache(cache_dir) if cache_dir is not None else None
    if cache is not None:
        for head in cache.entries():
            banner = head["banner"].encode("ascii", "replace") + b"\0"
            slide = text_base - head["text"]
            at = head["linux_banner"] + slide
            if slide % KASLR_ALIGN or not KERNEL_MAP_START <= at < KERNEL_MAP_END:
                continue
            got, _ = try_read(read, at, len(banner))
            if got == banner:
                syms = cache.get(head["_file"][:-len(".ksyms")])
                if syms is not None:
                    return syms
    syms = recover_from_memory(read, text_base=text_base)
    if cache is not None:
        cache.put(syms)
    return syms

