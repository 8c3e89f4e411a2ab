"""Guest-kernel symbols: the table, the KASLR slide, and the fentry trap site.

A :class:`GuestSymbols` holds the kernel's own symbol table (``kallsyms``)
with *unrandomized* addresses, as recovered by :mod:`.kallsyms` from a
``vmlinuz`` or from guest memory.  With KASLR the kernel image runs at
``address + slide`` (the slide a multiple of 2 MiB); :func:`find_slide` reads
it from guest memory by looking for the kernel's own ``linux_banner`` string
where each candidate slide would put it.  Per-CPU symbols of a zero-based
per-CPU section (``current_task`` in Linux 6.1: an offset from the GS base)
are not in the image and never slide.

:func:`fentry_site` checks that a function begins with the 5-byte NOP that
ftrace leaves in place of ``call __fentry__`` (optionally after ``endbr64``):
the only place where the trap plan may arm a trap.

Everything read from the guest is hostile: every read is bounded, and what
does not look like the kernel we know raises :class:`SymbolError` with what
was tried and how to fix it.  x86_64 only.
"""
from __future__ import annotations

import bisect
from array import array
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from kairos_libvirt.errors import KairosError

__all__ = [
    "SymbolError", "Reader", "Symbol", "GuestSymbols", "RuntimeSymbols",
    "find_slide", "slide_candidates", "fentry_site", "read_fault", "read_exact", "try_read",
    "KernelPlacement", "find_kernel_phys", "place_kernel", "SYSTEM_RUNNING",
    "KERNEL_MAP_START", "KERNEL_MAP_END", "KASLR_ALIGN", "LINK_TEXT",
    "FENTRY_NOP", "ENDBR64",
]

#: ``read(vaddr, n)``: n bytes of guest-virtual memory, or raise (see :func:`read_fault`).
Reader = Callable[[int, int], bytes]

#: x86_64 ``__START_KERNEL_map``: the kernel image (and, with KASLR, its slid
#: copy) lives in [KERNEL_MAP_START, KERNEL_MAP_END) (``KERNEL_IMAGE_SIZE`` = 1 GiB).
KERNEL_MAP_START = 0xffffffff80000000
KERNEL_MAP_END = 0xffffffffc0000000
#: ``CONFIG_PHYSICAL_ALIGN`` of x86_64 distribution kernels: KASLR moves the
#: image by multiples of it.
KASLR_ALIGN = 0x200000
#: ``_text`` of a kernel linked with the default ``CONFIG_PHYSICAL_START`` (16 MiB).
LINK_TEXT = 0xffffffff81000000

#: ``nopl 0x0(%rax,%rax,1)``: what ftrace writes over ``call __fentry__`` at boot.
FENTRY_NOP = bytes.fromhex("0f1f440000")
#: ``endbr64``, the IBT landing pad a kernel built with CONFIG_X86_KERNEL_IBT puts first.
ENDBR64 = bytes.fromhex("f30f1efa")

_MASK64 = (1 << 64) - 1
_MAX_BANNER = 512


class SymbolError(KairosError):
    """A guest-kernel symbol, table or address could not be found or trusted."""


def read_fault(exc: BaseException) -> bool:
    """True if *exc*, raised by a reader, means "this address cannot be read".

    Probing code (slide candidates, scans over holes in the kernel image)
    treats such errors as "not here" and moves on.  Anything else (the
    gdbstub connection died, a timeout, a session in the wrong state) is not
    about the address and must stop the probe at once, or a dead connection
    would be reported as "no kernel found" after hundreds of attempts.
    A reader for unreadable memory raises any :class:`KairosError` or
    :class:`OSError` other than those; the gdbstub client's ``E14`` reply is
    ``RspRemoteError``.
    """
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return False
    try:  # the gdbstub client, when present: only an "E NN" reply is about the address
        from kairos_libvirt.introspect.rsp.errors import RspError, RspRemoteError
    except ImportError:  # pragma: no cover - the rsp package ships with this one
        pass
    else:
        if isinstance(exc, RspError):
            return isinstance(exc, RspRemoteError)
    return isinstance(exc, (KairosError, OSError))


def read_exact(read: Reader, addr: int, n: int, what: str) -> bytes:
    """``read(addr, n)`` that must return exactly n bytes; faults become :class:`SymbolError`."""
    assert 0 <= n
    if not 0 <= addr <= _MASK64 - n:
        raise SymbolError(f"cannot read {what}: address {addr:#x}+{n} is outside the 64-bit space")
    try:
        data = read(addr, n)
    except BaseException as exc:
        if read_fault(exc):
            raise SymbolError(f"cannot read {what} ({n} bytes at {addr:#x}): {exc}") from exc
        raise
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) != n:
        got = len(data) if isinstance(data, (bytes, bytearray, memoryview)) else type(data).__name__
        raise SymbolError(f"cannot read {what}: asked for {n} bytes at {addr:#x}, the reader gave {got}")
    return bytes(data)


def try_read(read: Reader, addr: int, n: int) -> Tuple[Optional[bytes], Optional[BaseException]]:
    """``(bytes, None)``, or ``(None, fault)`` for memory that cannot be read here."""
    try:
        return read_exact(read, addr, n, "guest memory"), None
    except SymbolError as exc:
        return None, exc


@dataclass(frozen=True)
class Symbol:
    """One kallsyms entry: ``name``, unrandomized ``address``, ``type`` as in ``nm`` (T, t, D, ...)."""

    name: str
    address: int
    type: str

    @property
    def in_image(self) -> bool:
        """In the kernel image (so it slides with KASLR); per-CPU offsets and absolute values are not."""
        return KERNEL_MAP_START <= self.address < (1 << 64)


class GuestSymbols:
    """A guest kernel's symbol table (name → unrandomized address, type).

    ``banner`` is the kernel's ``linux_banner`` (``"Linux version ..."``),
    both the cache key and what :func:`find_slide` looks for; ``build_id``
    the GNU build id when the source had one; ``source`` says where the
    table came from (for messages).
    """

    def __init__(self, names: Sequence[str], addresses: Sequence[int], types: str, *,
                 banner: str, build_id: Optional[str] = None, source: str = "") -> None:
        assert len(names) == len(addresses) == len(types)
        self.names: List[str] = list(names)
        self.addresses = array("Q", addresses)
        self.types = types
        self.banner = banner
        self.build_id = build_id
        self.source = source
        index: Dict[str, int] = {}
        dups: Dict[str, List[int]] = {}
        for i, name in enumerate(self.names):
            j = index.setdefault(name, i)
            if j != i:
                dups.setdefault(name, [j]).append(i)
        self._index = index
        self._dups = dups
        self._sorted: Optional[List[Tuple[int, int]]] = None

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __iter__(self) -> Iterator[Symbol]:
        for i in range(len(self.names)):
            yield self._symbol(i)

    def __repr__(self) -> str:
        return f"<GuestSymbols {len(self)} symbols, {self.banner[:60].strip()!r}>"

    def _symbol(self, i: int) -> Symbol:
        return Symbol(self.names[i], self.addresses[i], self.types[i])

    def all(self, name: str) -> List[Symbol]:
        """Every symbol with this name (static functions may share one), in table order."""
        if name not in self._index:
            return []
        return [self._symbol(i) for i in self._dups.get(name, [self._index[name]])]

    def lookup(self, name: str) -> Symbol:
        """The symbol *name*; if several share it, the only global one (T, D, ...)."""
        found = self.all(name)
        if not found:
            raise SymbolError(f"guest kernel ({self.source or 'symbol table'}) has no symbol {name!r}. "
                              "Fix: check the name against the guest's /proc/kallsyms; a function "
                              "may be inlined, renamed or absent in this kernel version")
        if len(found) > 1:
            glob = [s for s in found if s.type.isupper()]
            if len(glob) != 1:
                where = ", ".join(f"{s.address:#x} ({s.type})" for s in found[:8])
                raise SymbolError(f"guest kernel has {len(found)} symbols named {name!r} ({where}): "
                                  "ambiguous. Fix: trap a uniquely named function instead")
            return glob[0]
        return found[0]

    def address(self, name: str) -> int:
        """The unrandomized address of *name*."""
        return self.lookup(name).address

    def resolve(self, name: str, slide: int) -> int:
        """The runtime address of *name* for a kernel running with this KASLR slide."""
        sym = self.lookup(name)
        return (sym.address + slide) & _MASK64 if sym.in_image else sym.address

    def runtime(self, slide: int) -> "RuntimeSymbols":
        return RuntimeSymbols(self, slide)

    def symbolize(self, address: int) -> Optional[Tuple[Symbol, int]]:
        """The symbol at or below an unrandomized image *address* and the offset into it."""
        if self._sorted is None:
            self._sorted = sorted((a, i) for i, a in enumerate(self.addresses)
                                  if a >= KERNEL_MAP_START)
        k = bisect.bisect_right(self._sorted, (address, len(self.names))) - 1
        if k < 0:
            return None
        a, i = self._sorted[k]
        return self._symbol(i), address - a

    def find_slide(self, read: Reader) -> int:
        return find_slide(read, self)


class RuntimeSymbols:
    """A :class:`GuestSymbols` bound to the slide of one running guest."""

    def __init__(self, symbols: GuestSymbols, slide: int) -> None:
        assert slide % KASLR_ALIGN == 0
        self.symbols = symbols
        self.slide = slide

    def resolve(self, name: str) -> int:
        """Runtime address of *name* (per-CPU offsets are returned unchanged)."""
        return self.symbols.resolve(name, self.slide)

    def lookup(self, name: str) -> Symbol:
        return self.symbols.lookup(name)

    def __contains__(self, name: object) -> bool:
        return name in self.symbols

    def __repr__(self) -> str:
        return f"<RuntimeSymbols slide={self.slide:#x} {self.symbols!r}>"


def slide_candidates(link_address: int) -> List[int]:
    """Every 2 MiB-aligned slide that keeps *link_address* inside the kernel map.

    Zero first (``nokaslr``), then upwards (x86_64 KASLR only moves the image
    up from its link address), then downwards.
    """
    lo = -((link_address - KERNEL_MAP_START) // KASLR_ALIGN)
    hi = (KERNEL_MAP_END - 1 - link_address) // KASLR_ALIGN
    ks = [0] if lo <= 0 <= hi else []
    ks += list(range(max(1, lo), hi + 1)) + list(range(min(-1, hi), lo - 1, -1))
    return [k * KASLR_ALIGN for k in ks]


def find_slide(read: Reader, symbols: GuestSymbols) -> int:
    """The KASLR slide of the running guest kernel described by *symbols*.

    For each 2 MiB-aligned candidate, reads where ``linux_banner`` would be
    and compares it with the banner of the table (including its NUL).  The
    first match wins; a kernel built differently from the table matches none.
    """
    banner = symbols.banner.encode("ascii", "replace") + b"\0"
    link = symbols.address("linux_banner")
    if not KERNEL_MAP_START <= link < KERNEL_MAP_END:
        raise SymbolError(f"linux_banner at {link:#x} is outside the kernel map: the symbol table is not "
                          "an x86_64 kernel's")
    head = banner[:32]
    tried = 0
    last: Optional[BaseException] = None
    readable = 0
    for slide in slide_candidates(link):
        tried += 1
        got, fault = try_read(read, link + slide, len(head))
        if got is None:
            last = fault
            continue
        readable += 1
        if got != head:
            continue
        full, fault = try_read(read, link + slide, len(banner))
        if full == banner:
            return slide
    why = (f"read {readable} of {tried} candidate addresses, none held the banner "
           f"{symbols.banner.strip()[:80]!r}")
    if readable == 0 and last is not None:
        why += f"; last read error: {last}"
    raise SymbolError(f"cannot find the KASLR slide of the guest kernel: {why}. Fix: the guest runs "
                      "another kernel than the symbol table describes "
                      f"({symbols.source or 'unknown source'}): give the domain's own vmlinuz, or "
                      "recover the symbols from guest memory")


def fentry_site(read: Reader, addr: int) -> int:
    """The address of the 5-byte fentry NOP at the start of the function at *addr*.

    Accepts ``nopl 0x0(%rax,%rax,1)`` (``0f 1f 44 00 00``) at *addr*, or
    right after an ``endbr64`` (``f3 0f 1e fa``); refuses anything else with
    what it found.
    """
    code = read_exact(read, addr, len(ENDBR64) + len(FENTRY_NOP), f"the function entry at {addr:#x}")
    if code.startswith(FENTRY_NOP):
        return addr
    if code.startswith(ENDBR64) and code[len(ENDBR64):] == FENTRY_NOP:
        return addr + len(ENDBR64)
    body = code[len(ENDBR64):] if code.startswith(ENDBR64) else code
    if body[:1] == b"\xe8":
        hint = ("a 'call' (e8): ftrace is tracing this function right now, or the kernel was "
                "built without dynamic ftrace. Fix: stop the tracer in the guest")
    elif body[:2] == b"\x0f\x0b":
        hint = "ud2 (0f 0b): a trap is already armed here. Fix: disarm it first"
    elif body[:1] == b"\xcc":
        hint = "int3 (cc): a debugger breakpoint or ftrace in mid-update is here. Fix: retry, or remove it"
    elif body[:1] in (b"\xe9", b"\xeb"):
        hint = "a jmp: ftrace or a live patch redirects this function. Fix: choose another trap site"
    else:
        hint = ("no fentry NOP: the kernel was built without CONFIG_FUNCTION_TRACER, or the address is "
                "not a function start. Fix: use a function listed in the guest's "
                "/sys/kernel/tracing/available_filter_functions")
    raise SymbolError(f"function at {addr:#x} does not begin with the fentry NOP 0f 1f 44 00 00 "
                      f"(found {code.hex(' ')}): {hint}")



# --------------------------------------------------------------------------
# The kernel in guest-physical memory: found, placed and read with no VM stop.

#: ``enum system_states`` (include/linux/kernel.h): BOOTING, SCHEDULING,
#: FREEING_INITMEM, RUNNING, ...  From RUNNING on, init has been started and
#: every boot-time change to the kernel text (ftrace's NOPs) is done.
SYSTEM_RUNNING = 3
_SYSTEM_STATE_MAX = 7            # SYSTEM_SUSPEND: anything above is not the enum


def _link_text(symbols: GuestSymbols) -> int:
    return symbols.address("_text") if "_text" in symbols else LINK_TEXT


def find_kernel_phys(phys_read: Reader, symbols: GuestSymbols, ram_bytes: int) -> Optional[int]:
    """Guest-physical ``_text`` of the kernel *symbols* describe, or None if it is not in RAM (yet).

    The image is decompressed to a 2 MiB-aligned physical address (physical
    KASLR), so ``linux_banner`` lies at ``_text + (linux_banner - _text)``
    for one 2 MiB step: one short read per step, no VM stop.  The boot
    loader's copy (compressed) and the log buffer's copy (elsewhere) cannot
    match at that offset with the NUL after it.
    """
    banner = symbols.banner.encode("ascii", "replace") + b"\0"
    off = symbols.address("linux_banner") - _link_text(symbols)
    if not 0 <= off < KERNEL_MAP_END - KERNEL_MAP_START:
        raise SymbolError(f"linux_banner is {off:#x} from _text: the symbol table is not an x86_64 kernel's")
    head = banner[:32]
    for base in range(0, max(0, ram_bytes - off - len(banner)) + 1, KASLR_ALIGN):
        got, fault = try_read(phys_read, base + off, len(head))
        if got == head:
            full, _ = try_read(phys_read, base + off, len(banner))
            if full == banner:
                return base
    return None


@dataclass(frozen=True)
class KernelPlacement:
    """Where the running guest kernel is: physically, virtually (slide), and how far it booted.

    ``phys_text`` is the guest-physical ``_text``, ``slide`` the virtual
    KASLR slide, ``direct_map`` the runtime ``page_offset_base`` (None when
    unknown), ``state`` the kernel's ``system_state`` (None without the
    symbol).  :meth:`reader` reads kernel-image and direct-map addresses
    from physical memory: guest-virtual reads with no vCPU stopped.
    """

    phys_text: int
    slide: int
    text: int
    end: int
    ram_bytes: int
    direct_map: Optional[int] = None
    state: Optional[int] = None

    @property
    def up(self) -> bool:
        """The kernel finished booting (or we cannot tell and it is placed)."""
        return self.state is None or self.state >= SYSTEM_RUNNING

    def phys(self, vaddr: int, n: int = 1) -> Optional[int]:
        """Guest-physical address of kernel-virtual *vaddr* (None: not image nor direct map)."""
        lo = self.text + self.slide
        if lo <= vaddr and vaddr + n <= self.end + self.slide:
            return self.phys_text + vaddr - lo
        if self.direct_map is not None and self.direct_map <= vaddr and \
                vaddr + n <= self.direct_map + self.ram_bytes:
            return vaddr - self.direct_map
        return None

    def reader(self, phys_read: Reader) -> Reader:
        def read(vaddr: int, n: int) -> bytes:
            p = self.phys(vaddr, max(n, 1))
            if p is None:
                raise SymbolError(f"{vaddr:#x}+{n} is neither in the kernel image nor in the direct "
                                  "map: not readable from physical memory")
            return phys_read(p, n)
        return read


def place_kernel(phys_read: Reader, symbols: GuestSymbols, ram_bytes: int) -> Optional[KernelPlacement]:
    """The running kernel's placement from guest-physical memory alone, or None if not there yet.

    The virtual slide comes from the kernel's own ``phys_base``, which
    ``__startup_64()`` sets to ``phys(_text) - (virt(_text) - __START_KERNEL_map)``
    before anything else runs (arch/x86/kernel/head64.c), so
    ``slide = phys(_text) - (_text - __START_KERNEL_map) - phys_base``.  It
    is believed only once ``system_state`` says the kernel booted (before
    that, ``phys_base`` may still be its link-time 0), and it must be 2 MiB
    aligned and keep the image in the kernel map; anything else is not the
    kernel the table describes (SymbolError).
    """
    phys_text = find_kernel_phys(phys_read, symbols, ram_bytes)
    if phys_text is None:
        return None
    text = _link_text(symbols)
    end = symbols.address("_end") if "_end" in symbols else text + (KERNEL_MAP_END - text)

    def sym_u(name: str, size: int) -> Optional[int]:
        if name not in symbols:
            return None
        p = phys_text + symbols.address(name) - text
        raw = read_exact(phys_read, p, size, f"{name} (guest-physical {p:#x})")
        return int.from_bytes(raw, "little")

    state = sym_u("system_state", 4)
    if state is not None and state > _SYSTEM_STATE_MAX:
        raise SymbolError(f"system_state of the guest kernel reads {state}: not the kernel the symbol "
                          f"table describes ({symbols.source or 'unknown source'})")
    if state is not None and state < SYSTEM_RUNNING:
        return KernelPlacement(phys_text, 0, text, end, ram_bytes, None, state)
    phys_base = sym_u("phys_base", 8)
    if phys_base is None:
        raise SymbolError("the guest kernel's symbol table has no phys_base: cannot tell its KASLR slide "
                          "from physical memory")
    slide = (phys_text - (text - KERNEL_MAP_START) - phys_base + (1 << 63)) % (1 << 64) - (1 << 63)
    if slide % KASLR_ALIGN or not KERNEL_MAP_START <= text + slide < KERNEL_MAP_END:
        raise SymbolError(f"phys_base {phys_base:#x} with _text at guest-physical {phys_text:#x} gives the "
                          f"slide {slide:#x}: not a 2 MiB-aligned slide inside the kernel map")
    direct = sym_u("page_offset_base", 8)
    if direct is not None and (direct % (1 << 30) or direct < (1 << 63)):
        direct = None   # not a kernel-half, 1 GiB-aligned base: do not translate through it
    return KernelPlacement(phys_text, slide, text, end, ram_bytes, direct, state)
