"""Guest-physical memory through QEMU's /proc/PID/mem, and the kernel found in it.

The fake boundary: a directory standing for /proc with ``PID/maps`` and a
sparse ``PID/mem`` file whose offsets are QEMU's host-virtual addresses.
"""
from __future__ import annotations

import os

import pytest

from kairos_libvirt.host import guestmem
from kairos_libvirt.host.guestmem import GuestMemError
from kairos_libvirt.introspect import symbols
from kairos_libvirt.introspect.symbols import (
    KASLR_ALIGN, KERNEL_MAP_START, LINK_TEXT, GuestSymbols, SymbolError,
)

MiB = 1 << 20
RAM = 64 * MiB
HVA = 0x7f000000  # small: the fake mem file is sparse, but bounded by the filesystem
BANNER = "Linux version 6.1.0-test (kairos@test) #1 SMP PREEMPT_DYNAMIC\n"

MAPS = f"""\
55d000000000-55d000400000 r-xp 00000000 fe:00 1 /usr/bin/qemu-system-x86_64
55d000600000-55d001600000 rw-p 00000000 00:00 0 [heap]
{HVA - 2 * MiB:x}-{HVA:x} rw-p 00000000 00:00 0
{HVA:x}-{HVA + RAM:x} rw-p 00000000 00:00 0
{HVA + RAM:x}-{HVA + RAM + 4096:x} ---p 00000000 00:00 0
7f5000000000-7f5002000000 rw-p 00000000 00:00 0
"""


def fake_proc(tmp_path, maps: str = MAPS, pid: int = 4242):
    d = tmp_path / str(pid)
    d.mkdir()
    (d / "maps").write_text(maps)
    with open(d / "mem", "wb") as f:
        f.truncate(HVA + RAM)        # sparse: zeros except what a test writes
    return str(tmp_path), pid


def poke(proc: str, pid: int, gpa: int, data: bytes) -> None:
    with open(os.path.join(proc, str(pid), "mem"), "r+b") as f:
        f.seek(HVA + gpa)
        f.write(data)


def test_parse_maps_and_find_the_ram_mapping_by_its_size():
    maps = guestmem.parse_maps(MAPS)
    assert len(maps) == 6 and maps[1].path == "[heap]"
    m = guestmem.find_ram_mapping(maps, RAM)
    assert (m.start, m.size) == (HVA, RAM)


def test_no_or_several_mappings_of_the_ram_size_are_refused():
    maps = guestmem.parse_maps(MAPS)
    with pytest.raises(GuestMemError, match="no read-write"):
        guestmem.find_ram_mapping(maps, 3 * MiB)
    twice = guestmem.parse_maps(MAPS + f"7f6000000000-{0x7f6000000000 + RAM:x} rw-p 0 00:00 0\n")
    with pytest.raises(GuestMemError, match="2 read-write"):
        guestmem.find_ram_mapping(twice, RAM)
    # a file mapping of the same size is not RAM
    filemap = guestmem.parse_maps(f"7f6000000000-{0x7f6000000000 + RAM:x} rw-p 0 fe:00 9 /var/x.img\n")
    with pytest.raises(GuestMemError):
        guestmem.find_ram_mapping(filemap, RAM)


def test_physical_reads_go_to_the_ram_mapping_and_stay_inside_it(tmp_path):
    proc, pid = fake_proc(tmp_path)
    poke(proc, pid, 0x123456, b"hello")
    with guestmem.open_guest_ram(pid, RAM, proc=proc) as mem:
        assert mem.read(0x123456, 5) == b"hello"
        assert mem.read(RAM - 4, 4) == b"\0" * 4
        assert mem.size == RAM
        with pytest.raises(GuestMemError, match="not in the guest's RAM"):
            mem.read(RAM - 2, 4)
        with pytest.raises(GuestMemError):
            mem.read(0, guestmem.MAX_READ + 1)
        assert mem.reads == 2


def test_a_missing_qemu_is_a_clear_error(tmp_path):
    with pytest.raises(GuestMemError, match="is QEMU still running"):
        guestmem.open_guest_ram(999, RAM, proc=str(tmp_path))


def test_large_guests_trust_only_the_low_two_gib_without_the_machine_map():
    assert guestmem.default_layout(512 * MiB) == [(0, 512 * MiB, 0)]
    assert guestmem.default_layout(4096 * MiB) == [(0, 0x80000000, 0)]


MTREE = """\
FlatView #0
 AS "memory", root: system
 Root memory region: system
  0000000000000000-00000000000bffff (prio 0, ram): pc.ram
  00000000000c0000-00000000000dffff (prio 1, rom): pc.rom
  00000000000e0000-00000000000fffff (prio 1, rom): pc.bios @0000000000020000
  0000000000100000-000000007fffffff (prio 0, ram): pc.ram @0000000000100000
  00000000fffc0000-00000000ffffffff (prio 0, rom): pc.bios
  0000000100000000-000000017fffffff (prio 0, ram): pc.ram @0000000080000000

FlatView #1
 AS "I/O", root: io
  0000000000000000-000000000000ffff (prio 0, ram): pc.ram
"""


def test_mtree_gives_the_ram_pieces_of_the_system_address_space():
    assert guestmem.parse_mtree_ram(MTREE) == [
        (0, 0xc0000, 0), (0x100000, 0x7ff00000, 0x100000), (0x100000000, 0x80000000, 0x80000000)]


# --------------------------------------------------------------------------
# The kernel in physical memory (symbols.place_kernel), on the fake RAM.

OFF_BANNER, OFF_STATE, OFF_PHYS_BASE, OFF_POB = 0x1161900, 0x1c36cc4, 0x1a1a010, 0x1415740


def table() -> GuestSymbols:
    names = ["_text", "linux_banner", "system_state", "phys_base", "page_offset_base",
             "__x64_sys_getpid", "_end"]
    addrs = [LINK_TEXT, LINK_TEXT + OFF_BANNER, LINK_TEXT + OFF_STATE, LINK_TEXT + OFF_PHYS_BASE,
             LINK_TEXT + OFF_POB, LINK_TEXT + 0xbe350, LINK_TEXT + 0x3430000]
    return GuestSymbols(names, addrs, "TDDDDTB", banner=BANNER, source="test table")


def boot(proc: str, pid: int, phys_text: int, slide: int, state: int,
         direct: int = 0xffff8a2c40000000) -> None:
    poke(proc, pid, phys_text + OFF_BANNER, BANNER.encode() + b"\0")
    poke(proc, pid, phys_text + OFF_STATE, state.to_bytes(4, "little"))
    phys_base = phys_text - (LINK_TEXT - KERNEL_MAP_START) - slide
    poke(proc, pid, phys_text + OFF_PHYS_BASE, (phys_base % (1 << 64)).to_bytes(8, "little"))
    poke(proc, pid, phys_text + OFF_POB, direct.to_bytes(8, "little"))
    poke(proc, pid, phys_text + 0xbe350, symbols.FENTRY_NOP)


def test_no_kernel_in_ram_yet_is_none(tmp_path):
    proc, pid = fake_proc(tmp_path)
    # the banner text elsewhere (the boot log, a compressed image's neighbours) is not the kernel
    poke(proc, pid, 0x300000 + 17, BANNER.encode() + b"\0")
    with guestmem.open_guest_ram(pid, RAM, proc=proc) as mem:
        assert symbols.find_kernel_phys(mem.read, table(), RAM) is None
        assert symbols.place_kernel(mem.read, table(), RAM) is None


@pytest.mark.parametrize("phys_text,slide", [(0x1000000, 0), (0x1600000, 0xb600000),
                                             (0x2000000, 0x800000), (0x1400000, 0x1400000)])
def test_the_kernel_is_placed_and_its_slide_read_from_phys_base(tmp_path, phys_text, slide):
    proc, pid = fake_proc(tmp_path)
    boot(proc, pid, phys_text, slide, symbols.SYSTEM_RUNNING)
    with guestmem.open_guest_ram(pid, RAM, proc=proc) as mem:
        pl = symbols.place_kernel(mem.read, table(), RAM)
        assert pl is not None and pl.up
        assert (pl.phys_text, pl.slide) == (phys_text, slide)
        read = pl.reader(mem.read)
        assert read(LINK_TEXT + OFF_BANNER + slide, 14) == b"Linux version "
        assert symbols.fentry_site(read, LINK_TEXT + 0xbe350 + slide) == LINK_TEXT + 0xbe350 + slide
        # the direct map: virtual page_offset_base + x is physical x
        assert read(0xffff8a2c40000000 + phys_text + OFF_BANNER, 5) == b"Linux"
        with pytest.raises(SymbolError, match="neither in the kernel image"):
            read(0xffffc90000000000, 8)                  # vmalloc: not from physical memory


def test_a_kernel_still_booting_is_placed_but_not_up(tmp_path):
    proc, pid = fake_proc(tmp_path)
    boot(proc, pid, 0x1600000, 0xb600000, state=1)
    with guestmem.open_guest_ram(pid, RAM, proc=proc) as mem:
        pl = symbols.place_kernel(mem.read, table(), RAM)
        assert pl is not None and not pl.up and pl.state == 1


def test_garbage_where_the_kernel_state_is_is_refused(tmp_path):
    proc, pid = fake_proc(tmp_path)
    boot(proc, pid, 0x1600000, 0, state=0xffffffff)
    with guestmem.open_guest_ram(pid, RAM, proc=proc) as mem:
        with pytest.raises(SymbolError, match="system_state"):
            symbols.place_kernel(mem.read, table(), RAM)


def test_an_unaligned_slide_is_refused(tmp_path):
    proc, pid = fake_proc(tmp_path)
    boot(proc, pid, 0x1600000, 0x1000, symbols.SYSTEM_RUNNING)
    with guestmem.open_guest_ram(pid, RAM, proc=proc) as mem:
        with pytest.raises(SymbolError, match="2 MiB-aligned"):
            symbols.place_kernel(mem.read, table(), RAM)
    assert KASLR_ALIGN == 2 * MiB
