"""Kernel page walks and hrtimer sleepers read from guest-physical memory (introspect/sleepers.py).

The fake boundary is guest RAM: sparse 4 KiB pages, zeros where nothing was
written, GuestMemError beyond its end (as host/guestmem.PhysMem).  On it we
build x86_64 page tables (4- and 5-level, 4 KiB/2 MiB/1 GiB pages), a kernel
image, a direct map, vmalloc'd kernel stacks of scattered pages, and
hrtimer_sleepers laid out as Linux 6.1 lays them.  Hostile tables and stacks
may only ever produce SymbolError or None.
"""
from __future__ import annotations

import struct
from typing import Dict, Iterator, List

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kairos_libvirt.host.guestmem import GuestMemError
from kairos_libvirt.introspect.plan import PT_REGS_SIZE, THREAD_SIZE, task_key_from_rsp
from kairos_libvirt.introspect.sleepers import (
    SLEEPER_SIZE, STACK_END_MAGIC, PageWalker, SleeperWatch, discover_stack_offset, sleep_expiry,
    task_stack_top,
)
from kairos_libvirt.introspect.symbols import (
    LINK_TEXT, GuestSymbols, KernelPlacement, SymbolError,
)

PAGE = 4096
MiB, GiB = 1 << 20, 1 << 30
RAM = 64 * MiB
PHYS_TEXT = 0x1000000
SLIDE = 0x2a00000
IMAGE = 8 * MiB
DIRECT = 0xffff8a2c40000000
VMALLOC = 0xffffc90000000000
# Offsets of the fake kernel's symbols from _text.
OFF = {"_text": 0, "init_top_pgt": 0x10000, "__pgtable_l5_enabled": 0x20000, "sme_me_mask": 0x20010,
       "hrtimer_wakeup": 0x155160, "init_task": 0x30000, "_end": IMAGE}
WAKEUP = LINK_TEXT + SLIDE + OFF["hrtimer_wakeup"]
MS = 1_000_000


class FakeRam:
    """Guest-physical memory: sparse pages; beyond RAM a fault, as PhysMem raises it."""

    def __init__(self, size: int = RAM) -> None:
        self.size = size
        self.pages: Dict[int, bytearray] = {}

    def page(self, pfn: int) -> bytearray:
        return self.pages.setdefault(pfn, bytearray(PAGE))

    def write(self, gpa: int, data: bytes) -> None:
        assert 0 <= gpa and gpa + len(data) <= self.size
        for i in range(0, len(data)):
            self.page((gpa + i) // PAGE)[(gpa + i) % PAGE] = data[i]

    def u64(self, gpa: int, v: int) -> None:
        self.write(gpa, struct.pack("<Q", v & ((1 << 64) - 1)))

    def read(self, gpa: int, n: int) -> bytes:
        if gpa < 0 or gpa + n > self.size:
            raise GuestMemError(f"guest-physical {gpa:#x}+{n} is not in the guest's RAM")
        out = bytearray()
        at = gpa
        while at < gpa + n:
            k = min(gpa + n - at, PAGE - at % PAGE)
            p = self.pages.get(at // PAGE)
            out += p[at % PAGE:at % PAGE + k] if p is not None else bytes(k)
            at += k
        return bytes(out)


P, RW, PS, NX = 1, 2, 1 << 7, 1 << 63
SOFT_BITS = 0x7ff0000000000000     # software / protection-key bits 52..62


class Kernel:
    """A fake guest kernel in FakeRam: image, page tables, direct map, vmalloc stacks."""

    def __init__(self, levels: int = 4, l5_symbol: bool = True, me_bit: int = 0,
                 flags: int = P | RW | NX | SOFT_BITS) -> None:
        self.ram = FakeRam()
        self.levels = levels
        self.me = me_bit
        self.flags = flags
        self.next_free = 0x3000000            # page-table and stack pages come from here
        self.root = PHYS_TEXT + OFF["init_top_pgt"]
        self.placement = KernelPlacement(PHYS_TEXT, SLIDE, LINK_TEXT, LINK_TEXT + IMAGE, RAM, DIRECT, 3)
        names = [n for n in OFF if l5_symbol or n != "__pgtable_l5_enabled"]
        self.symbols = GuestSymbols(names, [LINK_TEXT + OFF[n] for n in names],
                                    "".join("T" if n.endswith("text") or n == "hrtimer_wakeup" else "D"
                                            for n in names), banner="Linux version 6.1.0-fake\n")
        self.rsyms = self.symbols.runtime(SLIDE)
        self.ram.write(PHYS_TEXT + OFF["__pgtable_l5_enabled"], struct.pack("<I", int(levels == 5)))
        self.ram.u64(PHYS_TEXT + OFF["sme_me_mask"], me_bit)
        for off in range(0, IMAGE, 2 * MiB):           # the image: 2 MiB pages, as head_64.S maps it
            self.map(LINK_TEXT + SLIDE + off, PHYS_TEXT + off, 2 * MiB)
        self.map(DIRECT, 0, GiB)                       # the direct map: one 1 GiB page

    def alloc(self) -> int:
        pa = self.next_free
        self.next_free += PAGE
        return pa

    def entry(self, pa: int, extra: int = 0) -> int:
        return pa | self.flags | self.me | extra

    def map(self, va: int, pa: int, size: int = PAGE) -> None:
        """Map [va, va + size) to pa, making the tables on the way."""
        leaf = {PAGE: 12, 2 * MiB: 21, GiB: 30}[size]
        table = self.root
        for shift in range(12 + 9 * (self.levels - 1), leaf, -9):
            slot = table + 8 * ((va >> shift) & 511)
            e = struct.unpack("<Q", self.ram.read(slot, 8))[0]
            if not e & P:
                e = self.entry(self.alloc())
                self.ram.u64(slot, e)
            table = e & 0x000ffffffffff000 & ~self.me
        self.ram.u64(table + 8 * ((va >> leaf) & 511), self.entry(pa, PS if size > PAGE else 0))

    def slot(self, va: int, level: int) -> int:
        """Guest-physical address of the level-`level` entry for va (1 = PTE)."""
        table = self.root
        for shift in range(12 + 9 * (self.levels - 1), 12 + 9 * (level - 1), -9):
            e = struct.unpack("<Q", self.ram.read(table + 8 * ((va >> shift) & 511), 8))[0]
            table = e & 0x000ffffffffff000 & ~self.me
        return table + 8 * ((va >> (12 + 9 * (level - 1))) & 511)

    def stack(self, index: int) -> int:
        """A vmalloc'd THREAD_SIZE stack of scattered, out-of-order pages; returns its base."""
        base = VMALLOC + 0x100000 + index * 2 * THREAD_SIZE      # a guard gap between stacks
        pages = [self.alloc() for _ in range(THREAD_SIZE // PAGE)]
        for i, pa in enumerate(reversed(pages)):
            self.alloc()                                          # not contiguous either way
            self.map(base + i * PAGE, pa)
        self.vwrite(base, struct.pack("<Q", STACK_END_MAGIC))
        return base

    def vwrite(self, va: int, data: bytes) -> None:
        w = self.walker()
        for i in range(len(data)):
            pa, _ = w.translate(va + i)
            self.ram.write(pa, data[i:i + 1])

    def walker(self) -> PageWalker:
        return PageWalker(self.ram.read, self.placement, self.rsyms)


def sleeper(expires: int, soft: int, task: int, state: int = 1, fn: int = WAKEUP,
            base: int = 0xffff888007c1e180) -> bytes:
    """struct hrtimer_sleeper (Linux 6.1): rb_node, expires, _softexpires, function, base, state.., task."""
    rb = struct.pack("<QQQ", 0xffff888003a1b2c1, 0, 0)
    return rb + struct.pack("<qqQQBBBBxxxxQ", expires, soft, fn, base, state, 0, 0, 1, task)


TASK = 0xffff888003a40000


# --------------------------------------------------------------------------
# The page walker.

@pytest.mark.parametrize("levels", [4, 5])
def test_image_direct_map_and_vmalloc_translate(levels):
    k = Kernel(levels)
    w = k.walker()
    assert w.levels == levels and w.root == k.root
    # the image (2 MiB pages), the direct map (1 GiB page), a 4 KiB vmalloc page
    va = LINK_TEXT + SLIDE + 0x123456
    assert w.translate(va) == (PHYS_TEXT + 0x123456, 2 * MiB - 0x123456)
    assert w.translate(DIRECT + 0x2345678) == (0x2345678, GiB - 0x2345678)
    base = k.stack(0)
    pa0, span = w.translate(base + 8)
    assert span == PAGE - 8 and pa0 % PAGE == 8
    # the stack's pages are scattered: a read across them is stitched page by page
    k.vwrite(base + PAGE - 4, b"ABCDEFGH")
    read = w.reader()
    assert read(base + PAGE - 4, 8) == b"ABCDEFGH"
    assert read(base, 8) == struct.pack("<Q", STACK_END_MAGIC)
    assert len(read(base, THREAD_SIZE)) == THREAD_SIZE
    assert w.translate(base + PAGE)[0] != pa0 - 8 + PAGE        # not physically contiguous
    # the image and the direct map read through the placement, no walk
    k.ram.write(PHYS_TEXT + 0x40000, b"kernel")
    assert read(LINK_TEXT + SLIDE + 0x40000, 6) == b"kernel" == read(DIRECT + PHYS_TEXT + 0x40000, 6)


def test_large_pages_ignore_the_pat_bit_and_flag_bits():
    k = Kernel()
    k.map(VMALLOC + 4 * GiB, 0x200000, 2 * MiB)
    slot = k.slot(VMALLOC + 4 * GiB, 2)
    e = struct.unpack("<Q", k.ram.read(slot, 8))[0]
    k.ram.u64(slot, e | (1 << 12))                 # PAT on a large page is bit 12
    assert k.walker().translate(VMALLOC + 4 * GiB + 0x1234) == (0x201234, 2 * MiB - 0x1234)
    k.map(VMALLOC + 8 * GiB, 0, GiB)
    assert k.walker().translate(VMALLOC + 8 * GiB + 0x3000000)[0] == 0x3000000


def test_the_memory_encryption_bit_is_cleared_from_entries():
    k = Kernel(me_bit=1 << 47)
    base = k.stack(0)
    w = k.walker()
    assert w.me_mask == 1 << 47
    assert w.reader()(base, 8) == struct.pack("<Q", STACK_END_MAGIC)


def test_four_levels_without_the_l5_symbol_and_validation_of_the_mode():
    k = Kernel(4, l5_symbol=False)
    assert k.walker().levels == 4
    five = Kernel(5, l5_symbol=False)          # the symbol missing on a 5-level kernel: caught
    with pytest.raises(SymbolError, match="4-level.*init_top_pgt"):
        five.walker()
    liar = Kernel(4)
    liar.ram.write(PHYS_TEXT + OFF["__pgtable_l5_enabled"], struct.pack("<I", 1))
    with pytest.raises(SymbolError, match="5-level|not mapped"):
        liar.walker()


@pytest.mark.parametrize("sym,raw,match", [
    ("__pgtable_l5_enabled", struct.pack("<I", 7), "__pgtable_l5_enabled reads 7"),
    ("sme_me_mask", struct.pack("<Q", 0x3 << 40), "sme_me_mask"),
    ("sme_me_mask", struct.pack("<Q", 1 << 63), "sme_me_mask"),
])
def test_garbage_in_the_paging_symbols_is_refused(sym, raw, match):
    k = Kernel()
    k.ram.write(PHYS_TEXT + OFF[sym], raw)
    with pytest.raises(SymbolError, match=match):
        k.walker()


def test_a_placement_that_does_not_hold_init_top_pgt_is_refused():
    k = Kernel()
    k.placement = KernelPlacement(PHYS_TEXT, SLIDE, LINK_TEXT, LINK_TEXT + 0x1000, RAM, DIRECT, 3)
    with pytest.raises(SymbolError, match="init_top_pgt"):
        k.walker()


def test_unmapped_user_outside_ram_and_bad_large_pages_are_symbol_errors():
    k = Kernel()
    base = k.stack(0)
    w = k.walker()
    read = w.reader()
    with pytest.raises(SymbolError, match="not mapped"):
        read(base - PAGE, 8)                                  # the guard page below a stack
    with pytest.raises(SymbolError, match="not mapped"):
        read(base + THREAD_SIZE - 4, 8)                       # crossing into the guard above
    with pytest.raises(SymbolError, match="not a kernel address"):
        read(0x7ffd00000000, 8)
    with pytest.raises(SymbolError, match="refusing"):
        read(base, 1 << 30)
    with pytest.raises(SymbolError, match="refusing"):
        read((1 << 64) - 4, 8)
    k.ram.u64(k.slot(base, 1), k.entry(RAM + 0x5000))          # a PTE beyond the guest's RAM
    with pytest.raises(SymbolError, match="not in the guest's RAM"):
        read(base, 8)
    e = struct.unpack("<Q", k.ram.read(k.slot(base, 4), 8))[0]
    k.ram.u64(k.slot(base, 4), e | PS)                          # PS in a PML4 entry: reserved
    with pytest.raises(SymbolError, match="no large pages"):
        read(base, 8)
    assert read(LINK_TEXT + SLIDE, 4) == bytes(4)               # the image still reads


# --------------------------------------------------------------------------
# Sleepers on a kernel stack.

def stacked(k: Kernel, *frames) -> int:
    """A stack with sleepers at the given offsets from its base; returns its top."""
    base = k.stack(0)
    for off, raw in frames:
        k.vwrite(base + off, raw)
    return base + THREAD_SIZE


LIVE_AT = THREAD_SIZE - PT_REGS_SIZE - 0x1a8          # hrtimer_nanosleep's frame, near the top
STALE_AT = THREAD_SIZE - PT_REGS_SIZE - 0x5f0


def test_the_live_sleeper_gives_the_requested_target():
    k = Kernel()
    target = 123_456 * 4 * MS
    top = stacked(k, (LIVE_AT, sleeper(target, target, TASK)))
    read = k.walker().reader()
    assert sleep_expiry(read, top, TASK, WAKEUP) == target
    assert task_key_from_rsp(top - 0x200) == f"{top - PT_REGS_SIZE:#x}"   # the model's key of this task


def test_softexpires_is_returned_when_slack_is_added():
    k = Kernel()
    target = 7_000 * MS
    top = stacked(k, (LIVE_AT, sleeper(target + 50_000, target, TASK)))
    assert sleep_expiry(k.walker().reader(), top, TASK, WAKEUP) == target


def test_stale_sleepers_lower_on_the_stack_are_ignored():
    k = Kernel()
    live = 9_000 * MS
    top = stacked(k,
                  (STALE_AT, sleeper(8_000 * MS, 8_000 * MS, 0, state=0)),        # expired: task NULL
                  (STALE_AT - 0x300, sleeper(7_000 * MS, 7_000 * MS, TASK, state=0)),  # signal: cancelled
                  (LIVE_AT, sleeper(live, live, TASK)))
    assert sleep_expiry(k.walker().reader(), top, TASK, WAKEUP) == live


@pytest.mark.parametrize("frames", [
    [],                                                                   # not sleeping
    [(STALE_AT, sleeper(8 * MS, 8 * MS, 0, state=0))],                    # woke up: only a stale one
    [(STALE_AT, sleeper(8 * MS, 8 * MS, TASK, state=0))],                 # interrupted by a signal
    [(LIVE_AT, sleeper(8 * MS, 8 * MS, TASK + 0x40))],                    # another task's sleeper
    [(LIVE_AT, sleeper(8 * MS, 8 * MS, TASK, fn=WAKEUP + 0x10))],         # another timer function
    [(LIVE_AT, sleeper(8 * MS, 9 * MS, TASK))],                           # expires < _softexpires
    [(LIVE_AT, sleeper(0, 0, TASK))],                                     # not a time
    [(LIVE_AT, sleeper(8 * MS, 8 * MS, TASK, base=0x1000))],              # base not a kernel pointer
    [(LIVE_AT, sleeper(8 * MS, 8 * MS, TASK)), (STALE_AT, sleeper(4 * MS, 4 * MS, TASK))],  # two live
    [(LIVE_AT + 4, sleeper(8 * MS, 8 * MS, TASK))],                       # not 8-aligned
    [(THREAD_SIZE - SLEEPER_SIZE + 8, sleeper(8 * MS, 8 * MS, TASK)[:SLEEPER_SIZE - 8])],  # cut at the top
])
def test_no_live_sleeper_is_none(frames):
    k = Kernel()
    top = stacked(k, *frames)
    assert sleep_expiry(k.walker().reader(), top, TASK, WAKEUP) is None


def test_a_sleeper_across_a_page_boundary_is_read_whole():
    k = Kernel()
    at = 2 * PAGE - 40                      # function pointer on one page, expires on the previous
    top = stacked(k, (at, sleeper(44 * MS, 44 * MS, TASK)))
    assert sleep_expiry(k.walker().reader(), top, TASK, WAKEUP) == 44 * MS


def test_a_sleeper_that_changes_between_reads_is_not_believed():
    k = Kernel()
    top = stacked(k, (LIVE_AT, sleeper(12 * MS, 12 * MS, TASK)))
    read = k.walker().reader()
    calls = []

    def racing(va: int, n: int) -> bytes:
        out = read(va, n)
        calls.append(n)
        if n == THREAD_SIZE:                # the task wakes and sleeps again right after our scan
            k.vwrite(top - THREAD_SIZE + LIVE_AT, sleeper(16 * MS, 16 * MS, TASK))
        return out

    assert sleep_expiry(racing, top, TASK, WAKEUP) is None
    assert calls == [THREAD_SIZE, SLEEPER_SIZE]
    assert sleep_expiry(read, top, TASK, WAKEUP) == 16 * MS


def test_the_watch_follows_a_sleeper_that_moves_with_each_syscall():
    """CONFIG_RANDOMIZE_KSTACK_OFFSET (Debian) moves every syscall's frame: each new sleep
    lies elsewhere on the stack, and the watch must find it at its next read (a watch
    that waited 64 misses saw one target in three of a 50 ms task)."""
    k = Kernel()
    base = k.stack(0)
    top = base + THREAD_SIZE
    w = k.walker()
    watch = SleeperWatch(k.ram.read, w, top, TASK, WAKEUP)
    at = LIVE_AT
    k.vwrite(base + at, sleeper(50 * MS, 50 * MS, TASK))
    assert watch.target() == (50 * MS, True)
    assert watch.target() == (50 * MS, True) and watch.scans == 1     # the fast path
    for i in range(2, 6):
        k.vwrite(base + at, sleeper(50 * MS, 50 * MS, 0, state=0))    # woke: INACTIVE
        at -= 0x40 * i                                                # the next frame moved
        k.vwrite(base + at, sleeper(i * 50 * MS, i * 50 * MS, TASK))
        assert watch.target() == (i * 50 * MS, True)
    assert watch.scans == 5
    k.vwrite(base + at, sleeper(5 * 50 * MS, 5 * 50 * MS, 0, state=0))
    assert watch.target() is None                                     # awake


def test_a_task_that_does_not_sleep_costs_a_scan_only_now_and_then():
    """A FIFO task that runs (or sleeps otherwise) has no live sleeper: the scans back off
    to one in MAX_BACKOFF calls (a full scan at every 2 ms read was 7 % of a CPU), and a
    sleep that begins is still found within MAX_BACKOFF + 1 calls."""
    k = Kernel()
    base = k.stack(0)
    watch = SleeperWatch(k.ram.read, k.walker(), base + THREAD_SIZE, TASK, WAKEUP)
    for _ in range(200):
        assert watch.target() is None
    assert watch.scans <= 6 + 200 // SleeperWatch.MAX_BACKOFF
    k.vwrite(base + LIVE_AT, sleeper(8 * MS, 8 * MS, TASK))
    got = [watch.target() for _ in range(SleeperWatch.MAX_BACKOFF + 1)]
    assert (8 * MS, True) in got


def test_an_unreadable_stack_is_a_symbol_error_and_a_misaligned_top_none():
    k = Kernel()
    read = k.walker().reader()
    with pytest.raises(SymbolError, match="not mapped"):
        sleep_expiry(read, VMALLOC + 0x4000000, TASK, WAKEUP)
    assert sleep_expiry(read, VMALLOC + 0x4000000 + 8, TASK, WAKEUP) is None
    assert sleep_expiry(read, 0x7ffd00004000, TASK, WAKEUP) is None


# --------------------------------------------------------------------------
# task_struct.stack.

STACK_OFF = 0x20


def tasks_with_stacks(k: Kernel, n: int) -> List[int]:
    tasks = []
    shared = k.stack(50)
    for i in range(n):
        t = DIRECT + 0x800000 + i * 0x4000
        stack = k.stack(i)
        k.ram.u64(t - DIRECT + STACK_OFF, stack)
        # decoys: an aligned stack pointer without the magic, and one shared by every task
        k.ram.u64(t - DIRECT + 0x48, stack + THREAD_SIZE)
        k.ram.u64(t - DIRECT + 0x60, shared)
        tasks.append(t)
    return tasks


def test_the_stack_offset_is_found_and_gives_the_stack_top():
    k = Kernel()
    tasks = tasks_with_stacks(k, 3)
    read = k.walker().reader()
    assert discover_stack_offset(read, tasks) == STACK_OFF
    top = task_stack_top(read, tasks[1], STACK_OFF)
    assert top == VMALLOC + 0x100000 + 2 * THREAD_SIZE + THREAD_SIZE
    k.vwrite(top - THREAD_SIZE + LIVE_AT, sleeper(20 * MS, 20 * MS, tasks[1]))
    assert sleep_expiry(read, top, tasks[1], WAKEUP) == 20 * MS


def test_no_stack_offset_is_a_symbol_error():
    k = Kernel()
    tasks = tasks_with_stacks(k, 2)
    read = k.walker().reader()
    with pytest.raises(SymbolError, match="two tasks"):
        discover_stack_offset(read, tasks[:1])
    k.ram.u64(tasks[1] - DIRECT + STACK_OFF, 0)
    with pytest.raises(SymbolError, match="0 offsets"):
        discover_stack_offset(read, tasks)
    with pytest.raises(SymbolError, match="no kernel stack"):
        task_stack_top(read, tasks[1], STACK_OFF)
    with pytest.raises(SymbolError, match="no kernel stack"):
        task_stack_top(read, DIRECT + RAM + 0x1000, STACK_OFF)     # beyond RAM in the direct map


# --------------------------------------------------------------------------
# Hostile memory: only SymbolError or None.

def _hostile_entries(k: Kernel) -> st.SearchStrategy:
    pages = [k.root, k.next_free - PAGE, k.next_free - 8 * PAGE, 0x3000000, RAM - PAGE, RAM, 0]
    flags = st.integers(0, (1 << 12) - 1) | st.sampled_from([P, P | PS, P | RW | NX])
    pointer = st.builds(lambda pa, f, hi: pa | f | hi, st.sampled_from(pages), flags,
                        st.sampled_from([0, NX, SOFT_BITS, 1 << 51]))
    return pointer | st.integers(0, (1 << 64) - 1)


FUZZ_KERNEL = Kernel()
FUZZ_STACK = FUZZ_KERNEL.stack(0)
FUZZ_PRISTINE = {pfn: bytes(p) for pfn, p in FUZZ_KERNEL.ram.pages.items()}


@pytest.fixture
def fuzz_kernel() -> Iterator[Kernel]:
    yield FUZZ_KERNEL
    FUZZ_KERNEL.ram.pages = {pfn: bytearray(p) for pfn, p in FUZZ_PRISTINE.items()}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_hostile_page_tables_give_bytes_or_symbol_error(fuzz_kernel, data):
    k = fuzz_kernel
    k.ram.pages = {pfn: bytearray(p) for pfn, p in FUZZ_PRISTINE.items()}
    w = k.walker()                                  # the guest rewrites its tables after we attached
    table_pages = sorted(set(p // PAGE for p in [k.slot(FUZZ_STACK, lvl) for lvl in (1, 2, 3, 4)]))
    for _ in range(data.draw(st.integers(1, 12))):
        pfn = data.draw(st.sampled_from(table_pages + [k.root // PAGE]))
        idx = data.draw(st.integers(0, 511) | st.sampled_from([(FUZZ_STACK >> s) & 511 for s in (12, 21, 30, 39)]))
        k.ram.u64(pfn * PAGE + 8 * idx, data.draw(_hostile_entries(k)))
    va = data.draw(st.sampled_from([FUZZ_STACK, FUZZ_STACK + PAGE - 3, VMALLOC, DIRECT, 0xff00000000000000])
                   | st.integers(0, (1 << 64) - 1))
    n = data.draw(st.integers(0, 3 * PAGE))
    try:
        got = w.reader()(va, n)
    except SymbolError:
        pass
    else:
        assert len(got) == n
    try:
        r = sleep_expiry(w.reader(), FUZZ_STACK + THREAD_SIZE, TASK, WAKEUP)
    except SymbolError:
        pass
    else:
        assert r is None


@settings(max_examples=200, deadline=None)
@given(words=st.lists(st.tuples(st.integers(0, THREAD_SIZE // 8 - 1),
                                st.sampled_from([WAKEUP, TASK, 1, 0, 4 * MS, 0xffff888000000000])
                                | st.integers(0, (1 << 64) - 1)), max_size=300),
       seed=st.sampled_from([None, LIVE_AT, 0, THREAD_SIZE - SLEEPER_SIZE]))
def test_hostile_stacks_give_an_int_or_none(words, seed):
    stack = bytearray(THREAD_SIZE)
    if seed is not None:
        stack[seed:seed + SLEEPER_SIZE] = sleeper(8 * MS, 8 * MS, TASK)
    for i, v in words:
        struct.pack_into("<Q", stack, 8 * i, v)
    top = VMALLOC + 2 * THREAD_SIZE

    def read(va: int, n: int) -> bytes:
        off = va - (top - THREAD_SIZE)
        if not 0 <= off <= THREAD_SIZE - n:
            raise SymbolError("outside the fake stack")
        return bytes(stack[off:off + n])

    r = sleep_expiry(read, top, TASK, WAKEUP)
    assert r is None or (isinstance(r, int) and r > 0)
    if seed == LIVE_AT and not words:
        assert r == 8 * MS
