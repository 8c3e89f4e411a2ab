"""Parsers for the replies we route: stop replies, ``qSupported``, ``E NN``.

Pure functions over unescaped payloads (see :mod:`.framing`).  Malformed
input raises :class:`RspProtocolError` with the raw payload.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, Optional, Union

from kairos_libvirt.introspect.rsp.errors import (
    RspProtocolError, RspRemoteError, RspUnsupportedError)
from kairos_libvirt.introspect.rsp.framing import from_hex, hex_int

__all__ = [
    "ThreadId", "StopReply", "parse_thread_id", "parse_stop_reply", "is_stop_reply",
    "is_console_output", "parse_console_output", "parse_supported", "check_reply",
    "SIGINT", "SIGTRAP",
]

#: GDB signal numbers ("Signals" appendix) that QEMU's stub reports.
SIGINT = 2
SIGTRAP = 5

#: Stop reasons from "Stop Reply Packets" that carry no register number.
_REASONS = frozenset({
    "watch", "rwatch", "awatch", "syscall_entry", "syscall_return", "library",
    "replaylog", "swbreak", "hwbreak", "fork", "vfork", "vforkdone", "exec",
    "clone", "create",
})
_ERROR = re.compile(rb"E([0-9A-Fa-f]{2})\Z")


@dataclass(frozen=True)
class ThreadId:
    """A thread-id ("Packets": ``pPID.TID`` with multiprocess, else ``TID``).

    ``-1`` means all threads, ``0`` any thread.  QEMU numbers vCPUs from 1.
    """

    tid: int
    pid: Optional[int] = None

    def encode(self) -> bytes:
        def num(v: int) -> bytes:
            return b"-1" if v == -1 else b"%x" % v
        return (b"p" + num(self.pid) + b"." if self.pid is not None else b"") + num(self.tid)


def _thread_num(text: bytes, raw: bytes) -> int:
    if text == b"-1":
        return -1
    try:
        return hex_int(text)
    except RspProtocolError:
        raise RspProtocolError("malformed thread-id", raw) from None


def parse_thread_id(text: bytes) -> ThreadId:
    """Parse ``TID``, ``pPID`` or ``pPID.TID`` (hex, or ``-1``)."""
    if text.startswith(b"p"):
        pid_text, dot, tid_text = text[1:].partition(b".")
        pid = _thread_num(pid_text, text)
        return ThreadId(_thread_num(tid_text, text) if dot else -1, pid)
    return ThreadId(_thread_num(text, text))


@dataclass(frozen=True)
class StopReply:
    """A parsed stop reply ("Stop Reply Packets": ``S``, ``T``, ``W``, ``X``).

    ``kind`` is ``"signal"`` (S/T: the target stopped), ``"exited"`` (W) or
    ``"terminated"`` (X).  ``registers`` maps register numbers to their raw
    bytes in target order, as the stub sent them with ``T``; ``reason`` is the
    stop reason keyword (``swbreak``, ``hwbreak``, ``watch``...) and
    ``reason_value`` its argument.
    """

    kind: str
    raw: bytes
    signal: Optional[int] = None
    exit_status: Optional[int] = None
    thread: Optional[ThreadId] = None
    core: Optional[int] = None
    reason: Optional[str] = None
    reason_value: bytes = b""
    registers: Dict[int, bytes] = field(default_factory=dict)
    pid: Optional[int] = None

    @property
    def stopped(self) -> bool:
        """True if the target is stopped and can be inspected (S/T)."""
        return self.kind == "signal"

    @property
    def is_breakpoint(self) -> bool:
        """A trap: SIGTRAP, or an explicit ``swbreak``/``hwbreak`` reason.

        QEMU 7.2 reports breakpoints as plain ``T05`` without a reason.
        """
        return self.kind == "signal" and (
            self.reason in ("swbreak", "hwbreak") or self.signal == SIGTRAP)


def is_stop_reply(payload: bytes) -> bool:
    """Cheap routing test: does this payload look like a stop reply?"""
    return payload[:1] in (b"S", b"T", b"W", b"X") and len(payload) >= 3


def _signal(payload: bytes) -> int:
    try:
        return hex_int(payload[1:3])
    except RspProtocolError:
        raise RspProtocolError("stop reply without a two-digit signal number", payload) from None


def parse_stop_reply(payload: bytes) -> StopReply:
    """Parse ``S AA``, ``T AA n1:r1;...``, ``W AA[;process:pid]``, ``X AA[;process:pid]``."""
    kind = payload[:1]
    if kind not in (b"S", b"T", b"W", b"X") or len(payload) < 3:
        raise RspProtocolError("not a stop reply", payload)
    code = _signal(payload)
    if kind in (b"W", b"X"):
        pid = None
        rest = payload[3:]
        if rest:
            key, _, value = rest.lstrip(b";").partition(b":")
            if key != b"process":
                raise RspProtocolError("unexpected field after exit status", payload)
            pid = _thread_num(value, payload)
        if kind == b"W":
            return StopReply("exited", payload, exit_status=code, pid=pid)
        return StopReply("terminated", payload, signal=code, pid=pid)
    if kind == b"S":
        if len(payload) != 3:
            raise RspProtocolError("trailing bytes after an S stop reply", payload)
        return StopReply("signal", payload, signal=code)
    thread = None
    core = None
    reason = None
    reason_value = b""
    registers: Dict[int, bytes] = {}
    for pair in payload[3:].split(b";"):
        if not pair:
            continue
        key, colon, value = pair.partition(b":")
        if not colon:
            raise RspProtocolError("stop reply field without ':'", payload)
        name = key.decode("ascii", "replace")
        if key == b"thread":
            thread = parse_thread_id(value)
        elif key == b"core":
            core = hex_int(value) if value else None
        elif name in _REASONS:
            reason = name
            reason_value = value
        elif key and all(c in b"0123456789abcdefABCDEF" for c in key):
            try:
                registers[int(key, 16)] = from_hex(value)
            except RspProtocolError:
                raise RspProtocolError("malformed register value in stop reply", payload) from None
        # "Otherwise, GDB should ignore this n:r pair" (Stop Reply Packets).
    return StopReply("signal", payload, signal=code, thread=thread, core=core,
                     reason=reason, reason_value=reason_value, registers=registers)


def is_console_output(payload: bytes) -> bool:
    """``O XX...``: hex-encoded console output ("Stop Reply Packets"), not ``OK``."""
    return (len(payload) >= 3 and payload[:1] == b"O" and len(payload) % 2 == 1
            and all(c in b"0123456789abcdefABCDEF" for c in payload[1:]))


def parse_console_output(payload: bytes) -> bytes:
    return from_hex(payload[1:])


def parse_supported(payload: bytes) -> Dict[str, Union[bool, None, str]]:
    """Parse a ``qSupported`` reply into name -> True/False/None('?')/value.

    ``PacketSize`` stays a string (hex); see :func:`packet_size`.
    """
    features: Dict[str, Union[bool, None, str]] = {}
    for item in payload.split(b";"):
        if not item:
            continue
        text = item.decode("ascii", "replace")
        if "=" in text:
            name, _, value = text.partition("=")
            features[name] = value
        elif text[-1] in "+-?":
            features[text[:-1]] = {"+": True, "-": False, "?": None}[text[-1]]
        else:
            raise RspProtocolError("malformed qSupported feature", payload)
    return features


def check_reply(request: bytes, payload: bytes, *, hint: str = "") -> bytes:
    """Raise for the standard error replies ("Standard Replies"), else return ``payload``.

    ``E NN`` -> :class:`RspRemoteError`; ``E.text`` likewise; the empty reply ->
    :class:`RspUnsupportedError`.
    """
    if not payload:
        raise RspUnsupportedError(request, hint)
    if payload[:1] == b"E":
        m = _ERROR.match(payload)
        if m:
            raise RspRemoteError(request, m.group(1).decode("ascii"), raw=payload)
        if payload[1:2] == b".":
            raise RspRemoteError(request, "", text=payload[2:].decode("utf-8", "replace"),
                                 raw=payload)
    return payload
