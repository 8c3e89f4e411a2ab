"""kallsyms recovery on synthetic kernel images: every layout the decoder knows,
hostile bytes (only SymbolError may escape), vmlinuz unpacking, and the cache.

``build_kallsyms`` writes tables the way ``scripts/kallsyms.c`` does (a simpler
token choice: used characters stand for themselves, free codes take the most
frequent pairs).  ``FakeGuestMemory`` is a page map with a ``read(vaddr, n)``
that faults on unmapped pages, as a gdbstub does.
"""
from __future__ import annotations

import bz2
import errno
import gzip
import lzma
import os
import random
import stat
import struct
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kairos_libvirt.introspect import kallsyms
from kairos_libvirt.introspect.kallsyms import (
    SymbolCache, decode_kallsyms_buffer, extract_vmlinux, find_text_base, load_from_memory,
    load_vmlinuz, recover_from_memory, recover_from_vmlinuz,
)
from kairos_libvirt.introspect.symbols import KERNEL_MAP_START, LINK_TEXT, GuestSymbols, SymbolError

RODATA = LINK_TEXT + 0x400000
BANNER = ("Linux version 6.1.0-99-amd64 (debian-kernel@lists.debian.org) (gcc-12 (Debian 12.2.0-14) "
          "12.2.0, GNU ld (GNU Binutils for Debian) 2.40) #1 SMP PREEMPT_DYNAMIC Debian 6.1.999-1 "
          "(2026-01-01)\n")


# --------------------------------------------------------------------------
# Synthetic tables.

Sym = Tuple[str, int, str]  # name, address, type


def sample_symbols(n: int = 1000, seed: int = 1, *, text: int = LINK_TEXT) -> List[Sym]:
    """A kernel-like table: per-CPU 'A' symbols at small offsets, then text and data."""
    rnd = random.Random(seed)
    words = ["sched", "setattr", "clock", "nanosleep", "task", "rq", "lock", "init", "sys", "x64",
             "do", "irq", "kthread", "cpu", "mm", "page", "fault", "rcu", "timer", "dl"]
    syms: List[Sym] = [("fixed_percpu_data", 0, "A"), ("__per_cpu_start", 0, "A"),
                       ("current_task", 0x1fb80, "A"), ("__per_cpu_end", 0x35000, "A"),
                       ("_text", text, "T"), ("_stext", text, "T"),
                       ("__x64_sys_sched_setattr", text + 0x1000, "T"),
                       ("linux_banner", text + 0x400100, "D"),
                       ("init_task", text + 0x600000, "D"),
                       ("__per_cpu_offset", text + 0x608000, "D"),
                       ("dup_static", text + 0x3000, "t"), ("dup_static", text + 0x3010, "t"),
                       ("dup_mixed", text + 0x3020, "t"), ("dup_mixed", text + 0x3030, "T"),
                       ("x" * 200 + "_big_rust_name", text + 0x3040, "T"),
                       ("crc32_0123456789", text + 0x3050, "t")]
    addr = text + 0x4000
    for i in range(n - len(syms)):
        name = "_".join(rnd.choice(words) for _ in range(rnd.randint(1, 4))) + f"_{i}{rnd.randint(0, 99)}"
        addr += rnd.randint(0, 64) * 16
        syms.append((name, addr, rnd.choice("TtDdbBrR")))
    syms.sort(key=lambda s: s[1])
    return syms


def _tokens(texts: Sequence[bytes]) -> List[bytes]:
    used = {c for t in texts for c in t}
    table: List[bytes] = [bytes([c]) if c in used else b"" for c in range(256)]
    free = [c for c in range(256) if c not in used]
    pairs = Counter(t[i:i + 2] for t in texts for i in range(len(t) - 1))
    for code, (pair, _) in zip(free, pairs.most_common(len(free))):
        table[code] = pair
    return table


def _compress(text: bytes, codes: Dict[bytes, int]) -> bytes:
    out = bytearray()
    i = 0
    while i < len(text):
        if text[i:i + 2] in codes and len(text) - i >= 2:
            out.append(codes[text[i:i + 2]])
            i += 2
        else:
            out.append(codes[text[i:i + 1]])
            i += 1
    return bytes(out)


@dataclass
class Blob:
    data: bytearray
    base: int
    at: Dict[str, int] = field(default_factory=dict)   # label -> address

    def off(self, label: str) -> int:
        return self.at[label] - self.base


def build_kallsyms(syms: Sequence[Sym], *, base: int = RODATA, layout: str = "offsets-first",
                   seqs: bool = True, addressing: str = "absolute-percpu", marker_width: int = 4,
                   preamble: bytes = b"") -> Blob:
    """Tables as scripts/kallsyms.c emits them, each label 8-aligned, at *base*."""
    texts = [(t + n).encode() for n, _, t in syms]
    table = _tokens(texts)
    codes = {tok: i for i, tok in enumerate(table) if len(tok) == 1}
    codes.update({tok: i for i, tok in enumerate(table) if len(tok) == 2})
    names = bytearray()
    markers = []
    for i, text in enumerate(texts):
        if i % 256 == 0:
            markers.append(len(names))
        enc = _compress(text, codes)
        names += bytes([len(enc)]) if len(enc) < 0x80 else bytes([(len(enc) & 0x7f) | 0x80, len(enc) >> 7])
        names += enc
    n = len(syms)
    addrs = [a for _, a, _ in syms]
    if addressing == "absolute-percpu":
        rb = min(a for a in addrs if a >= KERNEL_MAP_START)
        offsets = [a if a < KERNEL_MAP_START else rb - 1 - a for a in addrs]
    else:
        rb = min(addrs)
        offsets = [a - rb - (1 << 32 if a - rb >= 1 << 31 else 0) for a in addrs]
    order = sorted(range(n), key=lambda i: texts[i][1:])
    parts = {
        "offsets": struct.pack(f"<{n}i", *offsets),
        "relative_base": struct.pack("<Q", rb),
        "num_syms": struct.pack("<I", n),
        "names": bytes(names),
        "markers": struct.pack(f"<{len(markers)}{'I' if marker_width == 4 else 'Q'}", *markers),
        "seqs_of_names": b"".join(i.to_bytes(3, "big") for i in order),
        "token_table": b"".join(t + b"\0" for t in table),
        "token_index": b"",
    }
    idx, pos = [], 0
    for t in table:
        idx.append(pos)
        pos += len(t) + 1
    parts["token_index"] = struct.pack("<256H", *idx)
    if layout == "offsets-first":
        labels = ["offsets", "relative_base", "num_syms", "names", "markers"]
        labels += ["seqs_of_names"] if seqs else []
        labels += ["token_table", "token_index"]
    else:
        labels = ["num_syms", "names", "markers", "token_table", "token_index", "offsets", "relative_base"]
        labels += ["seqs_of_names"] if seqs else []
    blob = Blob(bytearray(preamble), base)
    for label in labels:
        blob.data += bytes(-len(blob.data) % 8)
        blob.at[label] = base + len(blob.data)
        blob.data += parts[label]
    blob.data += b"\0" * 64
    return blob


def decoy() -> bytes:
    """UCS-2 text with the digits, as Linux's code page tables have: a false token-table hit."""
    return "".join(chr(c) for c in range(0x20, 0x7f)).encode("utf-16-le") + os.urandom(100)


def table_of(tables: kallsyms.KallsymsTables) -> List[Sym]:
    return list(zip(tables.names, tables.addresses, tables.types))


# --------------------------------------------------------------------------
# Guest memory.

class FakeGuestMemory:
    """Guest-virtual memory as pages; ``read`` faults (OSError EFAULT) outside them."""

    PAGE = 4096

    def __init__(self) -> None:
        self.pages: Dict[int, bytearray] = {}
        self.reads = 0
        self.bytes_read = 0

    def map(self, addr: int, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            a = addr + pos
            page = self.pages.setdefault(a & ~(self.PAGE - 1), bytearray(self.PAGE))
            off = a & (self.PAGE - 1)
            take = data[pos:pos + self.PAGE - off]
            page[off:off + len(take)] = take
            pos += len(take)

    def unmap(self, addr: int, size: int) -> None:
        for p in range(addr & ~(self.PAGE - 1), addr + size, self.PAGE):
            self.pages.pop(p, None)

    def write_u64(self, addr: int, value: int) -> None:
        self.map(addr, struct.pack("<Q", value & ((1 << 64) - 1)))

    def read(self, addr: int, n: int) -> bytes:
        self.reads += 1
        self.bytes_read += n
        out = bytearray()
        pos = addr
        while len(out) < n:
            page = self.pages.get(pos & ~(self.PAGE - 1))
            if page is None:
                raise OSError(errno.EFAULT, f"cannot access memory at {pos:#x}")
            off = pos & (self.PAGE - 1)
            take = page[off:off + n - len(out)]
            out += take
            pos += len(take)
        return bytes(out)


@dataclass
class FakeKernel:
    mem: FakeGuestMemory
    slide: int
    link_syms: List[Sym]

    def runtime(self, name: str) -> int:
        a = next(a for n, a, _ in self.link_syms if n == name)
        return a + self.slide if a >= KERNEL_MAP_START else a


def fake_kernel(slide: int = 0x26200000, *, n: int = 1000, mem: Optional[FakeGuestMemory] = None,
                banner: str = BANNER, **kw) -> FakeKernel:
    """A guest with KASLR: text (one page, then a hole), rodata with the banner and the
    tables (relocated, as the kernel's own relocation pass leaves them), data pages."""
    mem = mem or FakeGuestMemory()
    link = sample_symbols(n)
    rt = [(nm, a + slide if a >= KERNEL_MAP_START else a, t) for nm, a, t in link]
    text = LINK_TEXT + slide
    mem.map(text, b"\x48\x8d\x25\x51\x3f\x60\x01" + bytes(4089))            # startup_64
    mem.map(text + 0x1000, bytes.fromhex("0f1f440000") + bytes(4091))        # __x64_sys_sched_setattr
    rodata = text + 0x400000                                                 # after a 4 MiB hole
    mem.map(rodata, bytes(0x1000))
    mem.map(rodata + 0x100, banner.encode() + b"\0")
    blob = build_kallsyms(rt, base=rodata + 0x2000, preamble=decoy(), **kw)
    mem.map(blob.base, bytes(blob.data))
    mem.map(text + 0x600000, bytes(0x10000))                                 # .data
    return FakeKernel(mem, slide, link)


# --------------------------------------------------------------------------
# Decoder.

@pytest.mark.parametrize("layout", ["offsets-first", "offsets-last"])
@pytest.mark.parametrize("seqs", [True, False])
@pytest.mark.parametrize("addressing", ["absolute-percpu", "relative"])
def test_decode_every_layout(layout, seqs, addressing):
    syms = sample_symbols(1500)
    if addressing == "relative":  # no zero-based per-CPU symbols in such kernels
        syms = [s for s in syms if s[1] >= KERNEL_MAP_START]
    blob = build_kallsyms(syms, layout=layout, seqs=seqs, addressing=addressing, preamble=decoy())
    tables = decode_kallsyms_buffer(bytes(blob.data), blob.base)
    assert table_of(tables) == syms
    assert tables.layout == layout and tables.addressing == addressing
    assert tables.seqs_of_names == (seqs and layout == "offsets-first")  # >= 6.4: after the offsets
    assert tables.token_table == blob.at["token_table"] and tables.markers == blob.at["markers"]
    assert tables.names_start == blob.at["names"] and tables.offsets == blob.at["offsets"]


def test_decode_u64_markers_and_tiny_tables():
    for n in (20, 256, 257):
        syms = sample_symbols(n)
        blob = build_kallsyms(syms, marker_width=8)
        assert table_of(decode_kallsyms_buffer(bytes(blob.data), blob.base)) == syms


def test_decode_big_names_and_duplicates():
    syms = sample_symbols(600)
    tables = decode_kallsyms_buffer(bytes(build_kallsyms(syms).data), RODATA)
    big = [nm for nm in tables.names if nm.startswith("x" * 200)]
    assert big == ["x" * 200 + "_big_rust_name"]
    assert tables.names.count("dup_static") == 2


def test_decode_absolute_addresses():
    """Kernels without CONFIG_KALLSYMS_BASE_RELATIVE: u64 kallsyms_addresses right before num_syms."""
    syms = [s for s in sample_symbols(700) if s[1] >= KERNEL_MAP_START]
    blob = build_kallsyms(syms, seqs=False)
    addrs = struct.pack(f"<{len(syms)}Q", *(a for _, a, _ in syms))
    data = bytes(blob.data[:blob.off("offsets")]) + addrs + bytes(blob.data[blob.off("num_syms"):])
    tables = decode_kallsyms_buffer(data, blob.base)
    assert tables.addressing == "absolute" and table_of(tables) == syms


def test_no_tables_in_random_bytes():
    with pytest.raises(SymbolError, match="no kallsyms token table"):
        decode_kallsyms_buffer(random.Random(3).randbytes(1 << 16), RODATA)


def test_decoy_only_is_refused_with_reasons():
    with pytest.raises(SymbolError, match="not followed by a kallsyms_token_index"):
        decode_kallsyms_buffer(decoy() * 3, RODATA)


@pytest.mark.parametrize("damage, why", [
    ("num_syms", "no kallsyms_markers/kallsyms_names"),
    ("markers", "no kallsyms_markers/kallsyms_names"),
    ("token_index", "not followed by a kallsyms_token_index"),
    ("relative_base", "no kallsyms_offsets"),
])
def test_damaged_tables_are_refused(damage, why):
    syms = sample_symbols(900)
    blob = build_kallsyms(syms)
    at = blob.off(damage)
    if damage == "markers":
        blob.data[at + 4:at + 8] = struct.pack("<I", 77)   # markers[1] no longer 256 names on
    elif damage == "relative_base":
        blob.data[at:at + 8] = struct.pack("<Q", 0x1234)
    elif damage == "token_index":
        blob.data[at + 2 * 0x31:at + 2 * 0x31 + 2] = b"\xff\x7f"
    else:
        blob.data[at:at + 4] = struct.pack("<I", 5000)
    with pytest.raises(SymbolError, match=why):
        decode_kallsyms_buffer(bytes(blob.data), blob.base)


def test_unsorted_offsets_are_refused():
    syms = sample_symbols(600)
    blob = build_kallsyms(syms)
    at = blob.off("offsets") + 4 * 300
    blob.data[at:at + 4] = struct.pack("<i", -5)
    with pytest.raises(SymbolError, match="not sorted"):
        decode_kallsyms_buffer(bytes(blob.data), blob.base)


_VALID = build_kallsyms(sample_symbols(700), preamble=decoy())


_DIGITS_TAIL = b"".join(bytes([c]) + b"\0" for c in b"0123456789") + bytes(600)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_fuzz_random_bytes_only_symbolerror(data):
    try:
        decode_kallsyms_buffer(bytes(16) + data + _DIGITS_TAIL, RODATA)
    except SymbolError:
        pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(_VALID.data) - 1), st.binary(min_size=1, max_size=8)),
                min_size=1, max_size=6))
def test_fuzz_damaged_tables_only_symbolerror(edits):
    data = bytearray(_VALID.data)
    for at, patch in edits:
        data[at:at + len(patch)] = patch
    try:
        tables = decode_kallsyms_buffer(bytes(data[:len(_VALID.data)]), _VALID.base)
    except SymbolError:
        return
    assert len(tables.names) == len(tables.addresses) == len(tables.types)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["token_table", "names", "markers", "seqs_of_names", "offsets", "num_syms"]),
       st.integers(0, 2000), st.binary(min_size=1, max_size=16))
def test_fuzz_targeted_damage_only_symbolerror(label, off, patch):
    data = bytearray(_VALID.data)
    at = min(_VALID.off(label) + off, len(data) - len(patch))
    data[at:at + len(patch)] = patch
    try:
        decode_kallsyms_buffer(bytes(data), _VALID.base)
    except SymbolError:
        pass


# --------------------------------------------------------------------------
# vmlinuz.

def make_elf(segments: Sequence[Tuple[int, bytes]], build_id: bytes = b"\xab" * 20) -> bytes:
    """A minimal x86_64 ELF vmlinux: PT_LOAD segments plus a PT_NOTE with a GNU build id."""
    note = struct.pack("<III", 4, len(build_id), 3) + b"GNU\0" + build_id
    phnum = len(segments) + 1
    off = 64 + 56 * phnum
    phdrs = b""
    body = b""
    for vaddr, data in segments:
        phdrs += struct.pack("<IIQQQQQQ", 1, 5, off + len(body), vaddr, vaddr - 0xffffffff80000000,
                             len(data), len(data), 0x1000)
        body += data
    phdrs += struct.pack("<IIQQQQQQ", 4, 4, off + len(body), 0, 0, len(note), len(note), 4)
    body += note
    ehdr = (b"\x7fELF\x02\x01\x01" + bytes(9) + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, LINK_TEXT,
                                                             64, 0, 0, 64, 56, phnum, 64, 0, 0))
    return ehdr + phdrs + body


def make_bzimage(payload: bytes, setup_sects: int = 4) -> bytes:
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1f1] = setup_sects
    setup[0x202:0x206] = b"HdrS"
    setup[0x206:0x208] = struct.pack("<H", 0x20f)
    struct.pack_into("<II", setup, 0x248, 0x100, len(payload))
    return bytes(setup) + bytes(0x100) + payload


def synthetic_vmlinux(n: int = 800) -> Tuple[bytes, List[Sym]]:
    syms = sample_symbols(n)
    rodata = bytearray(0x2000)
    rodata[0x100:0x100 + len(BANNER) + 1] = BANNER.encode() + b"\0"
    blob = build_kallsyms(syms, base=RODATA + len(rodata), preamble=b"")
    text = b"\x48\x8d\x25" + bytes(0x2000 - 3)
    return make_elf([(LINK_TEXT, text), (RODATA, bytes(rodata) + bytes(blob.data))]), syms


@pytest.fixture(scope="module")
def vmlinux() -> Tuple[bytes, List[Sym]]:
    return synthetic_vmlinux()


@pytest.mark.parametrize("compress", ["xz", "gzip", "bzip2", "lzma"])
def test_recover_from_bzimage(tmp_path, vmlinux, compress):
    elf, syms = vmlinux
    packed = {"xz": lambda d: lzma.compress(d, check=lzma.CHECK_CRC32),
              "gzip": gzip.compress, "bzip2": bz2.compress,
              "lzma": lambda d: lzma.compress(d, format=lzma.FORMAT_ALONE)}[compress](elf)
    path = tmp_path / "vmlinuz"
    path.write_bytes(make_bzimage(packed + struct.pack("<I", len(elf))))
    got = recover_from_vmlinuz(str(path))
    assert [(s.name, s.address, s.type) for s in got] == syms
    assert got.banner == BANNER and got.build_id == "ab" * 20 and str(path) in got.source


def test_recover_from_plain_elf_and_headerless_stream(tmp_path, vmlinux):
    elf, syms = vmlinux
    (tmp_path / "vmlinux").write_bytes(elf)
    assert len(recover_from_vmlinuz(str(tmp_path / "vmlinux"))) == len(syms)
    (tmp_path / "raw").write_bytes(b"junk" * 100 + gzip.compress(elf))
    assert len(recover_from_vmlinuz(str(tmp_path / "raw"))) == len(syms)


def test_not_a_kernel(tmp_path):
    (tmp_path / "x").write_bytes(b"#!/bin/sh\necho hello\n" * 100)
    with pytest.raises(SymbolError, match=r"no kernel ELF image found in .*/x.*is it a Linux x86_64 kernel"):
        recover_from_vmlinuz(str(tmp_path / "x"))


def test_missing_file(tmp_path):
    with pytest.raises(SymbolError, match="cannot read kernel image .*nope.*<os><kernel>"):
        recover_from_vmlinuz(str(tmp_path / "nope"))


def test_elf_without_kallsyms(tmp_path):
    (tmp_path / "k").write_bytes(make_elf([(LINK_TEXT, bytes(0x3000))]))
    with pytest.raises(SymbolError, match="no kallsyms found in .*CONFIG_KALLSYMS"):
        recover_from_vmlinuz(str(tmp_path / "k"))


def test_broken_compressed_payload(tmp_path, vmlinux):
    elf, _ = vmlinux
    packed = bytearray(lzma.compress(elf))
    packed[200:260] = bytes(60)
    (tmp_path / "k").write_bytes(make_bzimage(bytes(packed)))
    with pytest.raises(SymbolError, match="xz at .*: "):
        recover_from_vmlinuz(str(tmp_path / "k"))


def test_unknown_bzimage_compression(tmp_path):
    (tmp_path / "k").write_bytes(make_bzimage(b"\x00\x11\x22\x33" * 64))
    with pytest.raises(SymbolError, match="unknown compression"):
        recover_from_vmlinuz(str(tmp_path / "k"))


@pytest.mark.skipif(not kallsyms.shutil.which("zstd"), reason="no zstd tool here")
def test_recover_zstd_through_the_tool(tmp_path, vmlinux):
    import subprocess
    elf, syms = vmlinux
    packed = subprocess.run(["zstd", "-q", "-c"], input=elf, stdout=subprocess.PIPE, check=True).stdout
    (tmp_path / "k").write_bytes(make_bzimage(packed + struct.pack("<I", len(elf))))
    assert len(recover_from_vmlinuz(str(tmp_path / "k"))) == len(syms)


def test_missing_decompression_tool(monkeypatch):
    monkeypatch.setattr(kallsyms.shutil, "which", lambda name: None)
    with pytest.raises(SymbolError, match="zstd-compressed and the 'zstd' tool is not installed.*apt-get"):
        kallsyms._decompress("zstd", b"\x28\xb5\x2f\xfd" + bytes(20))


def test_decompression_bomb_is_bounded(monkeypatch):
    monkeypatch.setattr(kallsyms, "MAX_VMLINUX", 1 << 16)
    for kind, packed in (("gzip", gzip.compress(bytes(1 << 20))), ("xz", lzma.compress(bytes(1 << 20))),
                         ("bzip2", bz2.compress(bytes(1 << 20)))):
        with pytest.raises(SymbolError, match="larger than"):
            kallsyms._decompress(kind, packed)


@pytest.mark.parametrize("bad", [
    b"\x7fELF" + bytes(60),                                         # not x86_64
    b"\x7fELF\x02\x01" + bytes(10) + struct.pack("<HH", 2, 62) + bytes(44),  # no segments
])
def test_bad_elf(tmp_path, bad):
    (tmp_path / "k").write_bytes(bad)
    with pytest.raises(SymbolError):
        recover_from_vmlinuz(str(tmp_path / "k"))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2048))
def test_fuzz_extract_only_symbolerror(data):
    for blob in (data, b"\x7fELF" + data, make_bzimage(data), b"\x1f\x8b\x08" + data, b"\xfd7zXZ\x00" + data):
        try:
            elf = extract_vmlinux(blob)
            kallsyms._elf_segments(elf, "fuzz")
        except SymbolError:
            pass


# --------------------------------------------------------------------------
# Guest memory.

def test_recover_from_memory_unslides():
    k = fake_kernel()
    got = recover_from_memory(k.mem.read)
    assert [(s.name, s.address, s.type) for s in got] == k.link_syms
    assert got.banner == BANNER and "guest memory" in got.source
    assert find_text_base(k.mem.read) == LINK_TEXT + k.slide


@pytest.mark.parametrize("layout", ["offsets-first", "offsets-last"])
def test_recover_from_memory_layouts_and_zero_slide(layout):
    k = fake_kernel(slide=0, layout=layout)
    got = recover_from_memory(k.mem.read)
    assert [(s.name, s.address, s.type) for s in got] == k.link_syms


def test_no_kernel_in_memory():
    mem = FakeGuestMemory()
    mem.map(0xffff888000000000, bytes(4096))
    with pytest.raises(SymbolError, match="no readable kernel image.*cannot access memory.*kernel mode"):
        find_text_base(mem.read)


def test_kernel_without_kallsyms_in_memory():
    mem = FakeGuestMemory()
    mem.map(LINK_TEXT + 0x400000, os.urandom(1 << 16))
    with pytest.raises(SymbolError, match="no kallsyms found in guest memory.*CONFIG_KALLSYMS"):
        recover_from_memory(mem.read)


def test_memory_read_budget(monkeypatch):
    k = fake_kernel()
    monkeypatch.setattr(kallsyms, "READ_BUDGET", 1 << 20)
    with pytest.raises(SymbolError, match="gave up after reading"):
        recover_from_memory(k.mem.read)


def test_dead_connection_is_not_a_missing_kernel():
    def read(addr, n):
        raise ConnectionResetError("gdbstub went away")
    with pytest.raises(ConnectionResetError):
        find_text_base(read)


def test_short_reads_are_faults():
    k = fake_kernel()

    def short(addr, n):
        return k.mem.read(addr, n)[:-1] if n > 1 else k.mem.read(addr, n)
    with pytest.raises(SymbolError, match="no kallsyms found"):
        recover_from_memory(short)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 0x6000), st.binary(min_size=1, max_size=64)), max_size=8),
       st.integers(0, 3))
def test_fuzz_hostile_guest_memory_only_symbolerror(edits, unmapped):
    k = fake_kernel(n=600)
    blob_at = LINK_TEXT + k.slide + 0x400000 + 0x2000
    for off, patch in edits:
        k.mem.map(blob_at + off * 3, patch)
    if unmapped:
        k.mem.unmap(blob_at + unmapped * 0x2000, 0x1000)
    try:
        recover_from_memory(k.mem.read)
    except SymbolError:
        pass


# --------------------------------------------------------------------------
# Cache.

def small_symbols(banner: str = BANNER) -> GuestSymbols:
    syms = sample_symbols(300)
    return GuestSymbols([n for n, _, _ in syms], [a for _, a, _ in syms], "".join(t for _, _, t in syms),
                        banner=banner, build_id="ab" * 20, source="test")


def test_cache_roundtrip_and_modes(tmp_path):
    d = tmp_path / "cache" / "ksyms"
    cache = SymbolCache(str(d))
    syms = small_symbols()
    key = cache.put(syms, image_sha256="0" * 64)
    assert key == SymbolCache.key(BANNER)
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o755
    for f in os.listdir(d):
        assert stat.S_IMODE(os.stat(d / f).st_mode) == 0o644
    got = cache.get(key)
    assert [tuple(vars(s).values()) for s in got] == [tuple(vars(s).values()) for s in syms]
    assert got.banner == BANNER and got.build_id == "ab" * 20 and "(cached)" in got.source
    assert cache.get_image("0" * 64) is not None and cache.get_image("1" * 64) is None
    assert [e["banner"] for e in cache.entries()] == [BANNER]


def test_cache_refuses_untrusted_dir_and_files(tmp_path, caplog):
    d = tmp_path / "c"
    cache = SymbolCache(str(d))
    key = cache.put(small_symbols())
    os.chmod(d / f"{key}.ksyms", 0o666)
    assert cache.get(key) is None and "not trusted" in caplog.text
    os.chmod(d / f"{key}.ksyms", 0o644)
    os.chmod(d, 0o777)
    assert cache.get(key) is None and cache.entries() == [] and cache.put(small_symbols()) is None
    assert "not using it" in caplog.text
    os.chmod(d, 0o755)
    os.rename(d / f"{key}.ksyms", d / "real")
    os.symlink(d / "real", d / f"{key}.ksyms")
    assert cache.get(key) is None


def test_cache_damaged_entries(tmp_path, caplog):
    d = tmp_path / "c"
    cache = SymbolCache(str(d))
    key = cache.put(small_symbols())
    path = d / f"{key}.ksyms"
    raw = path.read_bytes()
    path.write_bytes(raw[:len(raw) // 2])
    assert cache.get(key) is None and "damaged" in caplog.text
    other = SymbolCache.key("Linux version other\n")
    path.write_bytes(raw)
    os.rename(path, d / f"{other}.ksyms")
    assert cache.get(other) is None and "another banner" in caplog.text
    (d / ("image-" + "2" * 64 + ".ref")).write_bytes(b"../../etc/passwd\n")
    assert cache.get_image("2" * 64) is None


def test_cache_unwritable(tmp_path, caplog):
    (tmp_path / "file").write_bytes(b"")
    assert SymbolCache(str(tmp_path / "file" / "sub")).put(small_symbols()) is None
    assert "unusable" in caplog.text


def test_cache_write_error(tmp_path, monkeypatch, caplog):
    cache = SymbolCache(str(tmp_path / "c"))

    def fail(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(kallsyms.os, "replace", fail)
    assert cache.put(small_symbols()) is None
    assert "cannot write the symbol cache" in caplog.text and os.listdir(tmp_path / "c") == []


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.binary(max_size=600))
def test_fuzz_cache_entry_parse(head, body):
    for raw in (head + b"\n" + body,
                b'{"format": "kairos-ksyms/1", "banner": "b", "text": 1, "linux_banner": 2, "count": 1}\n'
                + body):
        got = kallsyms._parse_entry(raw)
        assert got is None or isinstance(got, GuestSymbols)


def test_load_vmlinuz_uses_cache(tmp_path, vmlinux, monkeypatch):
    elf, syms = vmlinux
    (tmp_path / "vmlinuz").write_bytes(make_bzimage(lzma.compress(elf)))
    calls = []
    real = kallsyms.recover_from_vmlinuz
    monkeypatch.setattr(kallsyms, "recover_from_vmlinuz", lambda p: calls.append(p) or real(p))
    a = load_vmlinuz(str(tmp_path / "vmlinuz"), str(tmp_path / "cache"))
    b = load_vmlinuz(str(tmp_path / "vmlinuz"), str(tmp_path / "cache"))
    assert len(calls) == 1 and a.names == b.names and list(a.addresses) == list(b.addresses)
    assert len(load_vmlinuz(str(tmp_path / "vmlinuz"), None)) == len(syms) and len(calls) == 2
    with pytest.raises(SymbolError, match="cannot read kernel image"):
        load_vmlinuz(str(tmp_path / "nope"), str(tmp_path / "cache"))


def test_load_from_memory_uses_cache(tmp_path):
    k = fake_kernel()
    first = load_from_memory(k.mem.read, str(tmp_path))
    reads = k.mem.reads
    # Same kernel, another boot (another slide): one banner read per cached kernel.
    k2 = fake_kernel(slide=0x10000000)
    second = load_from_memory(k2.mem.read, str(tmp_path))
    assert list(second.addresses) == list(first.addresses) and "(cached)" in second.source
    assert k2.mem.bytes_read < 64 * 1024 < k.mem.bytes_read and reads > 0
    # Another kernel with the same _text: the banner differs, so no false hit.
    k3 = fake_kernel(banner=BANNER.replace("6.1.999-1", "6.1.999-2"))
    third = load_from_memory(k3.mem.read, str(tmp_path))
    assert "(cached)" not in third.source and third.banner != first.banner
    assert len(load_from_memory(k3.mem.read, None)) == len(third)
