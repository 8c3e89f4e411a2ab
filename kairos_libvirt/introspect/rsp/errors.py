"""The GDB Remote Serial Protocol branch of the one exception tree.

Every error names what failed and why; protocol errors keep the raw bytes so a
bad exchange with a gdbstub can be reported exactly.  Programming mistakes
(negative lengths, a request made re-entrantly from our own callback) are
``assert``s, not members of this tree.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Optional

from kairos_libvirt.errors import KairosError

if TYPE_CHECKING:  # pragma: no cover - import cycle guard for annotations only
    from kairos_libvirt.introspect.rsp.session import Runstate

__all__ = [
    "RspError",
    "RspProtocolError",
    "RspTimeout",
    "RspRemoteError",
    "RspUnsupportedError",
    "RspConnectionError",
    "RspBusyError",
    "StateError",
]

#: How much of a raw packet an error message quotes (the full bytes stay in ``.raw``).
_QUOTE = 96


def _quote(raw: bytes) -> str:
    text = repr(raw[:_QUOTE])
    return text + ("…" if len(raw) > _QUOTE else "")


class RspError(KairosError):
    """Root of every failure talking to a gdbstub."""


class RspProtocolError(RspError):
    """The peer sent bytes that are not valid RSP (or not valid here).

    ``raw`` holds the offending bytes as received, for the log and for tests.
    """

    def __init__(self, why: str, raw: bytes = b"") -> None:
        self.why = why
        self.raw = bytes(raw)
        msg = f"gdbstub protocol error: {why}"
        if raw:
            msg += f" (raw {_quote(self.raw)})"
        super().__init__(msg)


class RspTimeout(RspError):
    """Nothing usable arrived in time; ``pending`` says what we waited for."""

    def __init__(self, pending: str, timeout: float, *, closed: bool = False) -> None:
        self.pending = pending
        self.timeout = timeout
        self.closed = closed
        msg = f"gdbstub timeout: no {pending} within {timeout:g} s"
        if closed:
            msg += ("; the session was closed because a late reply could be taken "
                    "for the answer to the next request. Fix: reconnect; check that "
                    "QEMU is alive and that nothing else holds its gdbstub")
        super().__init__(msg)


class RspRemoteError(RspError):
    """The stub answered a request with ``E NN`` ("Standard Replies").

    The manual calls NN a hex error number, but QEMU's gdbstub writes errno
    values as decimal digits (``E14`` for EFAULT, ``E22`` for EINVAL), so
    ``code`` keeps the text and ``errno`` is its decimal reading when it is
    all digits (the hex reading otherwise).  ``text`` holds an ``E.message``.
    """

    def __init__(self, request: bytes, code: str, *, text: Optional[str] = None,
                 raw: bytes = b"") -> None:
        self.request = bytes(request)
        self.code = code
        self.text = text
        self.raw = bytes(raw)
        self.errno: Optional[int]
        if code.isdigit():
            self.errno = int(code, 10)
        else:
            try:
                self.errno = int(code, 16)
            except ValueError:
                self.errno = None
        why = f"E{code}" + (f" ({text})" if text else "")
        super().__init__(f"gdbstub refused {_quote(self.request)}: {why}")


class RspUnsupportedError(RspError):
    """The stub answered with the empty reply: it does not know this packet.

    ("Packets": "an empty response ... indicates that the packet is not
    supported").  QEMU 7.2, for instance, answers ``p``/``P`` empty until the
    client has read ``target.xml``.
    """

    def __init__(self, request: bytes, hint: str = "") -> None:
        self.request = bytes(request)
        msg = f"gdbstub does not support {_quote(self.request)}"
        if hint:
            msg += f": {hint}"
        super().__init__(msg)


class RspConnectionError(RspError):
    """The transport failed or the peer hung up; keeps the root cause in ``exc``."""

    def __init__(self, what: str, exc: Optional[BaseException] = None) -> None:
        self.what = what
        self.exc = exc
        super().__init__(f"{what}: {exc}" if exc is not None else what)


class RspBusyError(RspError):
    """A second request was made while one is outstanding (RSP has no tags).

    The protocol cannot match replies to requests, so the session allows
    exactly one request in flight.
    """

    def __init__(self, pending: bytes) -> None:
        self.pending = bytes(pending)
        super().__init__(f"gdbstub session busy: {_quote(self.pending)} is still "
                         "waiting for its reply. Fix: serialize requests on one session")


class StateError(RspError):
    """A method needs the session in another run state (as qemu.qmp's ``StateError``)."""

    def __init__(self, state: "Runstate", required: Iterable["Runstate"], what: str = "") -> None:
        self.state = state
        self.required = tuple(required)
        names = " or ".join(s.name.lower() for s in self.required)
        prefix = f"{what}: " if what else ""
        super().__init__(f"{prefix}gdbstub session is {state.name.lower()}, needs {names}")
