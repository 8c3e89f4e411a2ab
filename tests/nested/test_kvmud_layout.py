"""kvmud.py against kmod/kairos_ud.h: structure layouts, ioctl numbers, event and ring decoding.

Tier 1 (no marker): pure, plus one check that compiles the C header with gcc
(skipped without gcc) so the Python mirror and the uAPI cannot drift apart.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from kairos_libvirt.errors import KairosError
from kairos_libvirt.introspect import kvmud
from kairos_libvirt.introspect.decode import decode_sched_attr, parse_sched_attr
from kairos_libvirt.introspect.kvmud import (
    ARMED5, BASE_PREV, EVENT_SIZE, NOP5, CtlArgs, Fetch, KvmUdError, SetupArgs, Trap, TrapsArgs,
    TrapStruct, decode_event, encode_traps, parse_ring_header, sched_setattr_fetch)

HEADER = Path(__file__).resolve().parents[2] / "kmod" / "kairos_ud.h"

C_PROBE = r"""
#include <stdio.h>
#include <stddef.h>
#include "kairos_ud.h"
#define S(t) printf(#t " %zu\n", sizeof(struct t))
#define O(t, f) printf(#t "." #f " %zu\n", offsetof(struct t, f))
int main(void) {
    S(kairos_ud_fetch); S(kairos_ud_trap); S(kairos_ud_setup); S(kairos_ud_traps);
    S(kairos_ud_ctl); S(kairos_ud_event);
    O(kairos_ud_trap, fetch); O(kairos_ud_setup, ring_size); O(kairos_ud_setup, api_version);
    O(kairos_ud_traps, traps); O(kairos_ud_ctl, result); O(kairos_ud_ctl, gpa); O(kairos_ud_ctl, bytes);
    O(kairos_ud_ring, head); O(kairos_ud_ring, tail); O(kairos_ud_ring, trap_hits);
    O(kairos_ud_ring, armed_mask); O(kairos_ud_ring, stale);
    O(kairos_ud_event, rip); O(kairos_ud_event, rdi); O(kairos_ud_event, rsp);
    O(kairos_ud_event, vcpu_id); O(kairos_ud_event, trap_index); O(kairos_ud_event, data_len);
    O(kairos_ud_event, data);
    printf("SETUP %lu\nSET_TRAPS %lu\nCTL %lu\n", (unsigned long)KAIROS_UD_SETUP,
           (unsigned long)KAIROS_UD_SET_TRAPS, (unsigned long)KAIROS_UD_CTL);
    printf("API %d\nMAGIC %u\nPREV %d\n", KAIROS_UD_API_VERSION, KAIROS_UD_RING_MAGIC, KAIROS_UD_BASE_PREV);
    return 0;
}
"""


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory) -> dict:
    if not shutil.which("gcc"):
        pytest.skip("no gcc to compile kmod/kairos_ud.h")
    d = tmp_path_factory.mktemp("kud")
    (d / "probe.c").write_text(C_PROBE)
    subprocess.run(["gcc", "-Wall", "-Werror", "-I", str(HEADER.parent), "-o", str(d / "probe"),
                    str(d / "probe.c")], check=True)
    out = subprocess.run([str(d / "probe")], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


def test_struct_sizes_match_the_header(c_layout: dict) -> None:
    assert c_layout["kairos_ud_fetch"] == ctypes.sizeof(kvmud.FetchStruct) == 8
    assert c_layout["kairos_ud_trap"] == ctypes.sizeof(TrapStruct) == 48
    assert c_layout["kairos_ud_setup"] == ctypes.sizeof(SetupArgs) == 32
    assert c_layout["kairos_ud_traps"] == ctypes.sizeof(TrapsArgs) == 24
    assert c_layout["kairos_ud_ctl"] == ctypes.sizeof(CtlArgs) == 104
    assert c_layout["kairos_ud_event"] == EVENT_SIZE == 512


def test_field_offsets_match_the_header(c_layout: dict) -> None:
    assert c_layout["kairos_ud_trap.fetch"] == TrapStruct.fetch.offset
    assert c_layout["kairos_ud_setup.ring_size"] == SetupArgs.ring_size.offset
    assert c_layout["kairos_ud_setup.api_version"] == SetupArgs.api_version.offset
    assert c_layout["kairos_ud_traps.traps"] == TrapsArgs.traps.offset
    assert c_layout["kairos_ud_ctl.result"] == CtlArgs.result.offset
    assert c_layout["kairos_ud_ctl.gpa"] == CtlArgs.gpa.offset
    assert c_layout["kairos_ud_ctl.bytes"] == CtlArgs.bytes.offset
    assert c_layout["kairos_ud_ring.head"] == kvmud.RING_HEAD_OFFSET
    assert c_layout["kairos_ud_ring.tail"] == kvmud.RING_TAIL_OFFSET
    assert c_layout["kairos_ud_ring.trap_hits"] == kvmud.RING_TRAP_HITS_OFFSET
    assert c_layout["kairos_ud_ring.armed_mask"] == 64
    assert c_layout["kairos_ud_event.rip"] == 24
    assert c_layout["kairos_ud_event.rdi"] == 48
    assert c_layout["kairos_ud_event.rsp"] == 104
    assert c_layout["kairos_ud_event.vcpu_id"] == 112
    assert c_layout["kairos_ud_event.trap_index"] == 120
    assert c_layout["kairos_ud_event.data_len"] == 124
    assert c_layout["kairos_ud_event.data"] == 128  # offset


def test_ioctl_numbers_and_constants_match_the_header(c_layout: dict) -> None:
    assert c_layout["SETUP"] == kvmud.KAIROS_UD_SETUP
    assert c_layout["SET_TRAPS"] == kvmud.KAIROS_UD_SET_TRAPS
    assert c_layout["CTL"] == kvmud.KAIROS_UD_CTL
    assert c_layout["API"] == kvmud.API_VERSION
    assert c_layout["MAGIC"] == kvmud.RING_MAGIC
    assert c_layout["PREV"] == BASE_PREV


def test_ioctl_numbers_are_in_kvmio_space_and_free() -> None:
    # _IOWR(0xAE, 0xe8, 32): dir 3, size 32, type 0xAE, nr 0xe8
    assert kvmud.KAIROS_UD_SETUP == (3 << 30) | (32 << 16) | (0xAE << 8) | 0xE8
    assert kvmud.KAIROS_UD_SET_TRAPS == (1 << 30) | (24 << 16) | (0xAE << 8) | 0xE9
    assert kvmud.KAIROS_UD_CTL == (3 << 30) | (104 << 16) | (0xAE << 8) | 0xEA
    # KVM_CREATE_DEVICE and the device-attr ioctls own 0xe0..0xe3
    for n in (kvmud.KAIROS_UD_SETUP, kvmud.KAIROS_UD_SET_TRAPS, kvmud.KAIROS_UD_CTL):
        assert (n & 0xFF) >= 0xE8


def test_site_patterns_differ_in_one_byte() -> None:
    assert NOP5 == bytes.fromhex("0f1f440000") and ARMED5 == bytes.fromhex("0f0b440000")
    assert [i for i in range(5) if NOP5[i] != ARMED5[i]] == [1]


# -- trap tables ---------------------------------------------------------------

def test_encode_sched_setattr_trap() -> None:
    arr = encode_traps([Trap(0xFFFFFFFF81234560, id=7, fetch=sched_setattr_fetch()),
                        Trap(0xFFFFFFFF81000000, id=8)])
    raw = bytes(arr)
    assert len(raw) == 96
    gva, tid, nfetch = struct.unpack_from("<QII", raw, 0)
    assert (gva, tid, nfetch) == (0xFFFFFFFF81234560, 7, 2)
    assert struct.unpack_from("<BBHi", raw, 16) == (7, 0, 8, 0x68)         # rdi + 0x68, 8 bytes
    assert struct.unpack_from("<BBHi", raw, 24) == (BASE_PREV, 0, 48, 0)   # 48 bytes at that pointer
    assert struct.unpack_from("<QII", raw, 48) == (0xFFFFFFFF81000000, 8, 0)


@pytest.mark.parametrize("traps, why", [
    ([Trap(1), Trap(1)], "twice"),
    ([Trap(1, fetch=(Fetch("prev", 0, 8),))], "previous step"),
    ([Trap(1, fetch=(Fetch("rdi", 0, 4), Fetch("prev", 0, 8)))], "previous step"),
    ([Trap(1, fetch=(Fetch("rip", 0, 8),))], "unknown base"),
    ([Trap(1, fetch=(Fetch("rdi", 0, 0),))], "len 0"),
    ([Trap(1, fetch=(Fetch("rdi", 0, 200), Fetch("rsi", 0, 200)))], "copies 400 bytes"),
    ([Trap(1, fetch=(Fetch("rdi", 2**31, 8),))], "32 bits"),
    ([Trap(1, fetch=tuple(Fetch("rdi", 0, 8) for _ in range(5)))], "fetch steps"),
    ([Trap(i) for i in range(65)], "at most 64"),
])
def test_encode_refuses_what_the_kernel_refuses(traps, why) -> None:
    with pytest.raises(KvmUdError, match=why) as ei:
        encode_traps(traps)
    assert isinstance(ei.value, KairosError)


# -- events ----------------------------------------------------------------------

SCHED_ATTR_2MS_10MS = struct.pack("<IIQiIQQQ", 48, 6, 0, 0, 0, 2_000_000, 10_000_000, 10_000_000)


def make_event(seq=5, data=b"", **kw) -> bytes:
    regs = [kw.get(r, 0) for r in ("rdi", "rsi", "rdx", "r10", "r8", "r9", "rax", "rsp")]
    return struct.pack("<6Q8QIIHBBHH384s", seq, kw.get("host_ns", 123), kw.get("tsc", 456),
                       kw.get("rip", 0xFFFFFFFF81234560), kw.get("cr3", 0x1000), 0x246, *regs,
                       kw.get("vcpu", 1), kw.get("trap_id", 7), kw.get("index", 0), 0,
                       kw.get("fetch_status", 0), len(data), kw.get("flags", 0), data)


def test_decode_event_and_its_sched_attr() -> None:
    ptr = 0x7FFC12345678
    raw = make_event(data=struct.pack("<Q", ptr) + SCHED_ATTR_2MS_10MS, rdi=0xFFFFC90000123F58, vcpu=1)
    ev = decode_event(raw)
    assert ev.seq == 5 and ev.rip == 0xFFFFFFFF81234560 and ev.vcpu == 1 and ev.trap_id == 7
    assert ev.regs["rdi"] == 0xFFFFC90000123F58 and ev.fetch_ok
    p, attr = ev.fetched(sched_setattr_fetch())
    assert struct.unpack("<Q", p)[0] == ptr
    a = parse_sched_attr(attr)
    assert (a.policy, a.runtime_ns, a.deadline_ns, a.period_ns) == ("deadline", 2_000_000, 10_000_000, 10_000_000)


def test_decode_event_through_the_project_decoder() -> None:
    # decode.py follows the user pointer with a read(addr, n) callback: serve it from the event
    ptr = 0x7FFC12345678
    ev = decode_event(make_event(data=struct.pack("<Q", ptr) + SCHED_ATTR_2MS_10MS))
    p, attr = ev.fetched(sched_setattr_fetch())

    def read(addr: int, n: int) -> bytes:
        assert addr == struct.unpack("<Q", p)[0] and n <= len(attr)
        return attr[:n]

    req = decode_sched_attr(struct.unpack("<Q", p)[0], read)
    assert (req.policy, req.runtime_ns, req.period_ns) == ("deadline", 2_000_000, 10_000_000)


def test_decode_event_partial_fetch() -> None:
    ev = decode_event(make_event(data=b"\x01" * 8, fetch_status=2, flags=1))
    assert not ev.fetch_ok and ev.fetch_status == 2
    assert ev.fetched(sched_setattr_fetch()) == [b"\x01" * 8]


def test_decode_event_refuses_bad_sizes() -> None:
    with pytest.raises(KvmUdError, match="expected 512"):
        decode_event(b"\0" * 255)
    raw = bytearray(make_event())
    struct.pack_into("<H", raw, 124, 385)
    with pytest.raises(KvmUdError, match="data_len 385"):
        decode_event(bytes(raw))


# -- ring header -------------------------------------------------------------------

def make_header(**kw) -> bytearray:
    buf = bytearray(4096)
    struct.pack_into("<IHHII7Q", buf, 0, kw.get("magic", kvmud.RING_MAGIC), kw.get("version", kvmud.API_VERSION),
                     kw.get("event_size", 512), kw.get("nr", 64), 4096, 10, 8, 1, 1, 0, 0, 0b11)
    struct.pack_into("<Q", buf, 72, kw.get("head", 8))
    struct.pack_into("<Q", buf, 128, kw.get("tail", 3))
    struct.pack_into("<QQ", buf, 256, 6, 4)
    return buf


def test_parse_ring_header() -> None:
    size, off, c = parse_ring_header(bytes(make_header()))
    assert (size, off) == (512, 4096)
    assert (c.nr_events, c.hits, c.recorded, c.rate_dropped, c.overflow) == (64, 10, 8, 1, 1)
    assert (c.armed_mask, c.head, c.tail, c.trap_hits[:3]) == (3, 8, 3, (6, 4, 0))


@pytest.mark.parametrize("kw, why", [({"magic": 0}, "magic"), ({"version": 1}, "version"),
                                     ({"event_size": 128}, "event size"), ({"nr": 48}, "power of two")])
def test_parse_ring_header_refuses(kw, why) -> None:
    with pytest.raises(KvmUdError, match=why):
        parse_ring_header(bytes(make_header(**kw)))


class FakeRing(kvmud.KvmUd):
    """read_events() over a bytearray instead of an mmap (no kernel)."""

    def __init__(self, buf: bytearray) -> None:   # noqa: D107 - no ioctl
        self.ring = buf
        self.event_size, self.data_offset, c = parse_ring_header(bytes(buf[:4096]))
        self.nr_events = c.nr_events


def test_read_events_consumes_and_wraps() -> None:
    nr = 16
    buf = make_header(nr=nr, head=0, tail=0) + bytearray(nr * 512)
    r = FakeRing(buf)
    for seq in range(20, 30):     # wraps the 16 slots
        at = 4096 + (seq % nr) * 512
        buf[at:at + 512] = make_event(seq=seq, data=bytes([seq]))
    struct.pack_into("<Q", buf, 128, 20)
    struct.pack_into("<Q", buf, 72, 30)
    evs = r.read_events(limit=4)
    assert [e.seq for e in evs] == [20, 21, 22, 23]
    evs = r.read_events()
    assert [e.seq for e in evs] == list(range(24, 30)) and evs[-1].data == bytes([29])
    assert struct.unpack_from("<Q", buf, 128)[0] == 30
    assert r.read_events() == []


def test_read_events_detects_a_torn_slot() -> None:
    buf = make_header(nr=16, head=1, tail=0) + bytearray(16 * 512)
    buf[4096:4096 + 512] = make_event(seq=99)
    with pytest.raises(KvmUdError, match="holds seq 99"):
        FakeRing(buf).read_events()


# -- probes and fds -------------------------------------------------------------------

def test_patched_kvm_loaded_probe(tmp_path: Path) -> None:
    p = tmp_path / "kairos_ud"
    assert not kvmud.patched_kvm_loaded(str(p))
    p.write_text("2\n")
    assert kvmud.patched_kvm_loaded(str(p)) and kvmud.api_version(str(p)) == 2
    p.write_text("1\n")     # API 1 had 256-byte events: not ours
    assert not kvmud.patched_kvm_loaded(str(p))
    p.write_text("junk\n")
    assert kvmud.api_version(str(p)) is None


def test_find_vm_fds_reads_fd_links(tmp_path: Path) -> None:
    fd = tmp_path / "4242" / "fd"
    fd.mkdir(parents=True)
    os.symlink("anon_inode:kvm-vm", fd / "11")
    os.symlink("anon_inode:kvm-vcpu:0", fd / "12")
    os.symlink("/dev/kvm", fd / "10")
    assert kvmud.find_vm_fds(4242, proc=str(tmp_path)) == [11]
    assert kvmud.find_vm_fd(4242, proc=str(tmp_path)) == 11
    os.symlink("anon_inode:kvm-vm", fd / "13")
    with pytest.raises(KvmUdError, match="2 KVM VMs"):
        kvmud.find_vm_fd(4242, proc=str(tmp_path))


def test_find_vm_fd_explains_a_tcg_qemu(tmp_path: Path) -> None:
    (tmp_path / "7" / "fd").mkdir(parents=True)
    with pytest.raises(KvmUdError, match="TCG has no VM fd"):
        kvmud.find_vm_fd(7, proc=str(tmp_path))
    with pytest.raises(KvmUdError, match="is QEMU running"):
        kvmud.find_vm_fds(8, proc=str(tmp_path))


def test_pidfd_getfd_copies_our_own_fd() -> None:
    r, w = os.pipe()
    try:
        try:
            fd = kvmud.pidfd_getfd(os.getpid(), w)
        except KvmUdError as e:
            pytest.skip(f"pidfd_getfd unavailable here: {e}")
        os.write(fd, b"x")
        assert os.read(r, 1) == b"x"
        os.close(fd)
    finally:
        os.close(r)
        os.close(w)


def test_setup_on_a_non_kvm_fd_is_a_clear_error(tmp_path: Path) -> None:
    with open(tmp_path / "f", "w+") as f:
        with pytest.raises(KvmUdError, match="KAIROS_UD_SETUP") as ei:
            kvmud.KvmUd(os.dup(f.fileno()))
    assert ei.value.errno == 25                     # ENOTTY: not a KVM VM fd
    if not kvmud.patched_kvm_loaded():
        assert "load the kairos-patched kvm modules" in str(ei.value)
