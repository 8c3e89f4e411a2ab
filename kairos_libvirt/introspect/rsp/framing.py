"""Bytes <-> GDB Remote Serial Protocol frames.  Pure: no I/O, no clock.

The GDB manual, "Overview": a packet is ``$packet-data#checksum`` where the
checksum is the sum of the data bytes as sent, modulo 256, as two hex digits.
Inside the data, ``}`` escapes the next byte (sent XOR 0x20), and a response
may be run-length encoded: ``X*c`` repeats ``X`` ``ord(c) - 29`` more times.
"Packet Acknowledgment": ``+``/``-`` acknowledge a packet; "Interrupts": a
lone 0x03 byte asks a running target to stop.  "Notification Packets" start
with ``%`` instead of ``$``.

:class:`Decoder` is incremental because a socket read can split a frame
anywhere; it never raises on bad input (a bad checksum must become a NAK in
ack mode, not an exception), it reports :class:`BadPacket` events instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Union

from kairos_libvirt.introspect.rsp.errors import RspProtocolError

__all__ = [
    "Packet", "Ack", "Nak", "Interrupt", "BadPacket", "Junk", "Event",
    "ACK", "NAK", "INTERRUPT",
    "checksum", "escape", "unescape", "expand", "encode_packet",
    "to_hex", "from_hex", "hex_int", "Decoder", "DEFAULT_MAX_PACKET",
]

_START = ord("$")
_NOTIFY = ord("%")
_END = ord("#")
_ESC = ord("}")
_RLE = ord("*")
_ACK = ord("+")
_NAK = ord("-")
_INTR = 0x03
#: Bytes that must be escaped in anything we send ("Overview": ``#``, ``$``
#: and ``}`` always; ``*`` too so it cannot be read as a run-length marker).
_MUST_ESCAPE = frozenset(b"#$}*")
_HEX = frozenset(b"0123456789abcdefABCDEF")
#: Largest packet body the decoder buffers.  QEMU's stub never sends more than
#: 4 KiB; the cap only stops a broken peer from growing our memory forever.
DEFAULT_MAX_PACKET = 1 << 20


@dataclass(frozen=True)
class Packet:
    """A well-formed packet; ``payload`` is unescaped and run-length expanded."""

    payload: bytes
    raw: bytes
    notification: bool = False


@dataclass(frozen=True)
class Ack:
    """``+``: the peer received our last packet intact."""


@dataclass(frozen=True)
class Nak:
    """``-``: the peer asks us to retransmit our last packet."""


@dataclass(frozen=True)
class Interrupt:
    """A lone 0x03 (a stub never sends one; a fake stub in tests receives them)."""


@dataclass(frozen=True)
class BadPacket:
    """A frame that failed its checksum or could not be decoded.

    In ack mode the session answers with ``-``; in no-ack mode it is an error.
    """

    raw: bytes
    why: str

    def error(self) -> RspProtocolError:
        return RspProtocolError(self.why, self.raw)


@dataclass(frozen=True)
class Junk:
    """Bytes outside any frame (line noise, a stray newline); reported, not fatal."""

    raw: bytes


Event = Union[Packet, Ack, Nak, Interrupt, BadPacket, Junk]

ACK = Ack()
NAK = Nak()
INTERRUPT = Interrupt()


def checksum(data: bytes) -> int:
    """The "Overview" checksum: sum of the bytes as sent, modulo 256."""
    return sum(data) & 0xFF


def escape(data: bytes) -> bytes:
    """Escape ``#``, ``$``, ``}`` and ``*`` as ``}`` + (byte XOR 0x20).

    Used for every packet we send, so binary payloads (``X``, ``vFile``)
    need no separate treatment.
    """
    if not any(b in _MUST_ESCAPE for b in data):
        return bytes(data)
    out = bytearray()
    for b in data:
        if b in _MUST_ESCAPE:
            out.append(_ESC)
            out.append(b ^ 0x20)
        else:
            out.append(b)
    return bytes(out)


def unescape(data: bytes) -> bytes:
    """Undo :func:`escape` only (no run-length expansion), for binary fields."""
    out = bytearray()
    it = iter(range(len(data)))
    for i in it:
        b = data[i]
        if b == _ESC:
            if i + 1 >= len(data):
                raise RspProtocolError("escape character '}' at the end of the data", data)
            out.append(data[i + 1] ^ 0x20)
            next(it)
        else:
            out.append(b)
    return bytes(out)


def expand(data: bytes) -> bytes:
    """Unescape and run-length expand a packet body in one pass, as GDB does.

    A repeat copies the last *decoded* byte; the count byte that follows ``*``
    is literal (never escaped) and must be printable and not ``#`` or ``$``
    ("Overview").  Raises :class:`RspProtocolError` keeping ``data``.
    """
    if _ESC not in data and _RLE not in data:
        return bytes(data)
    out = bytearray()
    i = 0
    n = len(data)
    while i < n:
        b = data[i]
        if b == _ESC:
            if i + 1 >= n:
                raise RspProtocolError("escape character '}' at the end of the packet", data)
            out.append(data[i + 1] ^ 0x20)
            i += 2
        elif b == _RLE:
            if not out:
                raise RspProtocolError("run-length marker '*' with nothing to repeat", data)
            if i + 1 >= n:
                raise RspProtocolError("run-length marker '*' without a count", data)
            c = data[i + 1]
            if c < 32 or c > 126 or c in (_START, _END):
                raise RspProtocolError(f"invalid run-length count byte 0x{c:02x}", data)
            out += bytes((out[-1],)) * (c - 29)
            i += 2
        else:
            out.append(b)
            i += 1
    return bytes(out)


def encode_packet(payload: bytes) -> bytes:
    """Frame ``payload`` as ``$escaped#cs``; we never run-length encode."""
    body = escape(payload)
    return b"$" + body + b"#" + b"%02x" % checksum(body)


def to_hex(data: bytes) -> bytes:
    """Bytes as lower-case hex digits (the ``m``/``M``/``g``/``P`` encoding)."""
    return data.hex().encode("ascii")


def from_hex(text: bytes) -> bytes:
    """Strict hex decoding: an odd length or a non-hex digit is a protocol error."""
    if len(text) % 2 or not all(c in _HEX for c in text):
        raise RspProtocolError("expected an even number of hex digits", text)
    return bytes.fromhex(text.decode("ascii"))


def hex_int(text: bytes) -> int:
    """A non-empty hex number such as an address, a thread id or a signal."""
    if not text or not all(c in _HEX for c in text):
        raise RspProtocolError("expected a hex number", text)
    return int(text, 16)


_IDLE, _BODY, _CS = range(3)


class Decoder:
    """Incremental frame decoder: ``feed(bytes) -> list[Event]``.

    Keeps at most ``max_packet`` body bytes; a longer frame is reported once
    as :class:`BadPacket` and skipped up to its checksum.
    """

    def __init__(self, max_packet: int = DEFAULT_MAX_PACKET) -> None:
        assert max_packet > 0
        self.max_packet = max_packet
        self._state = _IDLE
        self._start = _START
        self._body = bytearray()
        self._cs = bytearray()
        self._discarding = False
        self._junk = bytearray()

    @property
    def partial(self) -> bytes:
        """Bytes of an unfinished frame (for an error when the peer hangs up)."""
        if self._state == _IDLE:
            return bytes(self._junk)
        return bytes((self._start,)) + bytes(self._body) + (
            b"#" + bytes(self._cs) if self._state == _CS else b"")

    def _flush_junk(self, events: List[Event]) -> None:
        if self._junk:
            events.append(Junk(bytes(self._junk)))
            self._junk.clear()

    def _begin(self, start: int) -> None:
        self._state = _BODY
        self._start = start
        self._body.clear()
        self._cs.clear()
        self._discarding = False

    def feed(self, data: bytes) -> List[Event]:
        events: List[Event] = []
        i = 0
        n = len(data)
        while i < n:
            if self._state == _IDLE:
                b = data[i]
                i += 1
                if b == _START or b == _NOTIFY:
                    self._flush_junk(events)
                    self._begin(b)
                elif b == _ACK:
                    self._flush_junk(events)
                    events.append(ACK)
                elif b == _NAK:
                    self._flush_junk(events)
                    events.append(NAK)
                elif b == _INTR:
                    self._flush_junk(events)
                    events.append(INTERRUPT)
                else:
                    self._junk.append(b)
            elif self._state == _BODY:
                end = data.find(b"#", i)
                restart = data.find(b"$", i, end if end >= 0 else n)
                stop = restart if restart >= 0 else end
                chunk = data[i:stop if stop >= 0 else n]
                if not self._discarding:
                    if len(self._body) + len(chunk) > self.max_packet:
                        events.append(BadPacket(
                            (bytes((self._start,)) + bytes(self._body) + chunk)[:self.max_packet + 1],
                            f"packet longer than {self.max_packet} bytes"))
                        self._discarding = True
                        self._body.clear()
                    else:
                        self._body += chunk
                if stop < 0:
                    i = n
                elif restart >= 0:
                    # GDB's read_frame treats '$' inside a frame as a restart.
                    if not self._discarding:
                        events.append(BadPacket(bytes((self._start,)) + bytes(self._body),
                                                "new packet started before '#'"))
                    self._begin(_START)
                    i = restart + 1
                else:
                    self._state = _CS
                    i = end + 1
            else:  # _CS
                take = min(2 - len(self._cs), n - i)
                self._cs += data[i:i + take]
                i += take
                if len(self._cs) == 2:
                    if not self._discarding:
                        events.append(self._finish())
                    self._state = _IDLE
        self._flush_junk(events)
        return events

    def _finish(self) -> Event:
        body = bytes(self._body)
        raw = bytes((self._start,)) + body + b"#" + bytes(self._cs)
        cs = bytes(self._cs)
        if not all(c in _HEX for c in cs):
            return BadPacket(raw, f"checksum {cs!r} is not two hex digits")
        want = int(cs, 16)
        got = checksum(body)
        if want != got:
            return BadPacket(raw, f"checksum mismatch: frame says {want:02x}, data sums to {got:02x}")
        try:
            payload = expand(body)
        except RspProtocolError as exc:
            return BadPacket(raw, exc.why)
        return Packet(payload, raw, notification=self._start == _NOTIFY)
