"""GDB Remote Serial Protocol client for QEMU's gdbstub, in three layers.

``framing`` (pure: ``$…#cs``, escapes, run-length), ``session`` (acks, one
outstanding request, stop-reply and ``O`` routing, run state) and ``client``
(a synchronous facade).  ``errors`` holds the :class:`RspError` branch of the
project's one exception tree.
"""
from kairos_libvirt.introspect.rsp.client import RspClient
from kairos_libvirt.introspect.rsp.errors import (
    RspBusyError, RspConnectionError, RspError, RspProtocolError, RspRemoteError, RspTimeout,
    RspUnsupportedError, StateError)
from kairos_libvirt.introspect.rsp.packets import StopReply, ThreadId
from kairos_libvirt.introspect.rsp.registers import X86_64, Register, RegisterTable
from kairos_libvirt.introspect.rsp.session import Runstate, Session
from kairos_libvirt.introspect.rsp.transport import SocketTransport, Transport

__all__ = [
    "RspClient", "Session", "Runstate", "StopReply", "ThreadId",
    "Register", "RegisterTable", "X86_64", "SocketTransport", "Transport",
    "RspError", "RspProtocolError", "RspTimeout", "RspRemoteError", "RspUnsupportedError",
    "RspConnectionError", "RspBusyError", "StateError",
]
