"""An RSP protocol session over a byte transport: acks, one request, stops.

What the GDB manual asks of a client, and what the agent relies on:

* "Packet Acknowledgment": every packet is answered ``+`` or ``-`` until both
  sides agree on ``QStartNoAckMode``; a ``-`` means "send it again".  We send
  ``QStartNoAckMode`` only when ``qSupported`` advertises it (QEMU 7.2 does
  not, and answers it with the empty reply), so ack mode must work too.
* The protocol has no request tags, so exactly one request may be in flight;
  after a timeout a late reply could be taken for the next answer, so a
  request that times out closes the session.
* "Stop Reply Packets": after ``c``/``vCont`` the stub answers only when the
  target stops (``S``/``T``) or ends (``W``/``X``), possibly after console
  ``O`` packets.  Any byte sent to QEMU's stub while the VM runs stops it, so
  requests are refused while :attr:`Runstate.RUNNING`; ``interrupt`` (0x03)
  and :meth:`Session.wait_stop` are the only ways out.
"""
from __future__ import annotations

import enum
import functools
import logging
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, Iterable, Optional, TypeVar, Union

from kairos_libvirt.introspect.rsp.errors import (
    RspBusyError, RspConnectionError, RspProtocolError, RspRemoteError, RspTimeout,
    RspUnsupportedError, StateError)
from kairos_libvirt.introspect.rsp.framing import (
    DEFAULT_MAX_PACKET, Ack, BadPacket, Decoder, Event, Junk, Nak, Packet, encode_packet)
from kairos_libvirt.introspect.rsp.packets import (
    StopReply, check_reply, is_console_output, is_stop_reply, parse_console_output,
    parse_stop_reply, parse_supported)
from kairos_libvirt.introspect.rsp.transport import Transport

__all__ = ["Runstate", "Session", "require", "DEFAULT_FEATURES", "DEFAULT_PACKET_SIZE"]

log = logging.getLogger(__name__)

#: What we tell the stub we understand in ``qSupported`` ("General Query
#: Packets").  Not ``multiprocess+``: QEMU then wants ``D;pid`` and answers a
#: bare ``D`` with E22.
DEFAULT_FEATURES = (b"swbreak+", b"hwbreak+", b"vContSupported+")
#: Packet size assumed when the stub does not send ``PacketSize``.
DEFAULT_PACKET_SIZE = 400


class Runstate(enum.Enum):
    """Where the session is; methods check it with :func:`require`."""

    DISCONNECTED = "disconnected"
    #: Transport open, target state not known yet (before ``?``).
    CONNECTED = "connected"
    STOPPED = "stopped"
    RUNNING = "running"


F = TypeVar("F", bound=Callable[..., Any])


def require(*states: Runstate) -> Callable[[F], F]:
    """Refuse a method with :class:`StateError` unless the session is in ``states``."""

    def deco(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            if self.state not in states:
                raise StateError(self.state, states, fn.__name__)
            return fn(self, *args, **kwargs)
        return wrapper  # type: ignore[return-value]
    return deco


def _show(payload: bytes) -> str:
    text = payload[:48].decode("ascii", "backslashreplace")
    return repr(text + ("…" if len(payload) > 48 else ""))


class Session:
    """One RSP conversation.  Not thread-safe: give it one owner.

    ``on_console`` receives the decoded text of ``O`` packets; without it the
    text goes to the debug log.
    """

    def __init__(self, transport: Transport, *, timeout: float = 5.0,
                 max_retransmits: int = 3,
                 on_console: Optional[Callable[[bytes], None]] = None,
                 max_packet: int = DEFAULT_MAX_PACKET,
                 clock: Callable[[], float] = time.monotonic) -> None:
        assert timeout > 0 and max_retransmits >= 0
        self.transport: Optional[Transport] = transport
        self.timeout = timeout
        self.max_retransmits = max_retransmits
        self.on_console = on_console
        self.state = Runstate.CONNECTED
        self.ack_mode = True
        self.features: Dict[str, Union[bool, None, str]] = {}
        self.packet_size = DEFAULT_PACKET_SIZE
        #: The last stop reply seen (``?``, or the end of a resume).
        self.stop: Optional[StopReply] = None
        self._clock = clock
        self._decoder = Decoder(max_packet)
        self._events: Deque[Event] = deque()
        self._pending: Optional[bytes] = None
        self._resumed_with: bytes = b""
        self._last_frame: Optional[bytes] = None
        self._naks = 0
        self._bad = 0

    # -- link layer -------------------------------------------------------

    def _write(self, data: bytes) -> None:
        assert self.transport is not None
        try:
            self.transport.send(data)
        except RspConnectionError:
            self._lost()
            raise

    def _send_frame(self, payload: bytes) -> None:
        frame = encode_packet(payload)
        self._last_frame = frame
        self._naks = 0
        self._bad = 0
        log.debug("rsp -> %s", _show(payload))
        self._write(frame)

    def _next_event(self, deadline: Optional[float], waiting_for: str, timeout: Optional[float],
                    wake: Optional[int] = None) -> Event:
        while not self._events:
            assert self.transport is not None, "a closed session is DISCONNECTED"
            remaining = None if deadline is None else deadline - self._clock()
            if remaining is not None and remaining <= 0:
                raise RspTimeout(waiting_for, timeout or 0.0)
            try:
                data = self.transport.recv(remaining, wake)
            except TimeoutError:
                raise RspTimeout(waiting_for, timeout or 0.0) from None
            except RspConnectionError:
                self._lost()
                raise
            if not data:
                partial = self._decoder.partial
                self._lost()
                what = f"gdbstub closed the connection while we waited for {waiting_for}"
                if partial:
                    raise RspProtocolError(what + " (inside a frame)", partial)
                raise RspConnectionError(what)
            self._events.extend(self._decoder.feed(data))
        return self._events.popleft()

    def _link(self, ev: Event) -> Optional[Packet]:
        """Handle acks, NAKs, noise and bad frames; return a packet to act on."""
        if isinstance(ev, Packet):
            if self.ack_mode:
                self._write(b"+")
            if ev.notification:
                # "Notification Packets" only come in non-stop mode, which we never enable.
                log.debug("rsp: ignoring notification %s", _show(ev.payload))
                return None
            log.debug("rsp <- %s", _show(ev.payload))
            return ev
        if isinstance(ev, Ack):
            return None
        if isinstance(ev, Nak):
            if not self.ack_mode or self._last_frame is None:
                log.debug("rsp: ignoring a '-' in no-ack mode")
                return None
            self._naks += 1
            if self._naks > self.max_retransmits:
                raise RspProtocolError(
                    f"the stub rejected our packet {self._naks} times (line noise or a "
                    "broken stub)", self._last_frame)
            log.debug("rsp: NAK, retransmitting (%d)", self._naks)
            self._write(self._last_frame)
            return None
        if isinstance(ev, BadPacket):
            if not self.ack_mode:
                raise ev.error()
            self._bad += 1
            if self._bad > self.max_retransmits:
                raise ev.error()
            log.debug("rsp: bad frame (%s), sending '-'", ev.why)
            self._write(b"-")
            return None
        if isinstance(ev, Junk):
            log.debug("rsp: ignoring %d bytes outside a frame: %r", len(ev.raw), ev.raw[:32])
            return None
        log.debug("rsp: ignoring %r from the stub", ev)  # an Interrupt: stubs never send one
        return None

    def _console(self, payload: bytes) -> None:
        text = parse_console_output(payload)
        if self.on_console is not None:
            self.on_console(text)
        else:
            log.debug("rsp console: %r", text)

    def _lost(self) -> None:
        self.state = Runstate.DISCONNECTED
        transport, self.transport = self.transport, None
        if transport is not None:
            transport.close()

    # -- requests ---------------------------------------------------------

    @require(Runstate.CONNECTED, Runstate.STOPPED)
    def request(self, payload: bytes, *, timeout: Optional[float] = None) -> bytes:
        """Send one packet and return the payload of its reply.

        Console ``O`` packets are routed on the way; error replies are left
        to the caller (see :func:`.packets.check_reply`).
        """
        if self._pending is not None:
            raise RspBusyError(self._pending)
        timeout = self.timeout if timeout is None else timeout
        self._pending = payload
        try:
            self._send_frame(payload)
            deadline = self._clock() + timeout
            while True:
                pkt = self._link(self._next_event(deadline, f"reply to {_show(payload)}", timeout))
                if pkt is None:
                    continue
                if is_console_output(pkt.payload):
                    self._console(pkt.payload)
                    continue
                if payload != b"?" and self._unsolicited_stop(pkt.payload, payload):
                    continue
                return pkt.payload
        except RspTimeout as exc:
            self._lost()
            raise RspTimeout(exc.pending, exc.timeout, closed=True) from None
        finally:
            self._pending = None

    def _unsolicited_stop(self, reply: bytes, request: bytes) -> bool:
        """Route a stop reply that is not the answer to ``request``.

        QEMU stops the VM when a client connects but sends that ``T02`` only
        in front of the answer to the first packet (seen with QEMU 7.2:
        ``$T02thread:01;#04+$PacketSize=...``).  No request we send through
        :meth:`request` except ``?`` is answered with a stop reply.
        """
        if not is_stop_reply(reply):
            return False
        try:
            stop = parse_stop_reply(reply)
        except RspProtocolError:
            return False  # it only looked like one; let the caller judge it
        log.debug("rsp: unsolicited stop %s while waiting for %s", _show(reply), _show(request))
        self._stopped(stop)
        if not stop.stopped:
            raise RspConnectionError(f"the target ended ({_show(reply)}) while we waited for "
                                     f"the reply to {_show(request)}")
        return True

    @require(Runstate.CONNECTED)
    def handshake(self, features: Iterable[bytes] = DEFAULT_FEATURES, *,
                  no_ack: bool = True) -> Dict[str, Union[bool, None, str]]:
        """``qSupported`` negotiation, then ``QStartNoAckMode`` if offered.

        Returns the stub's features.  Like GDB, we first send a ``+`` to
        acknowledge anything the stub sent before we connected.
        """
        self._write(b"+")
        request = b"qSupported:" + b";".join(features)
        reply = self.request(request)
        if reply:
            self.features = parse_supported(check_reply(request, reply))
        size = self.features.get("PacketSize")
        if isinstance(size, str):
            try:
                self.packet_size = int(size, 16)
            except ValueError:
                raise RspProtocolError("PacketSize is not a hex number", reply) from None
            if self.packet_size < 64:
                raise RspProtocolError(f"PacketSize {self.packet_size} is too small to use", reply)
        if no_ack and self.features.get("QStartNoAckMode") is True:
            answer = self.request(b"QStartNoAckMode")
            if answer == b"OK":
                # The OK was still acknowledged above; from here on neither side acks.
                self.ack_mode = False
            elif answer:
                check_reply(b"QStartNoAckMode", answer)
                raise RspProtocolError("unexpected reply to QStartNoAckMode", answer)
        return self.features

    @require(Runstate.CONNECTED, Runstate.STOPPED)
    def halt_reason(self) -> StopReply:
        """``?`` ("Packets"): why the target is halted; QEMU pauses the VM on attach."""
        reply = self.request(b"?")
        stop = parse_stop_reply(check_reply(b"?", reply))
        self._stopped(stop)
        return stop

    def _stopped(self, stop: StopReply) -> None:
        self.stop = stop
        if stop.stopped:
            self.state = Runstate.STOPPED
        else:
            # W/X: the target is gone (QEMU exits after sending W).
            self._lost()

    # -- execution ----------------------------------------------------------

    @require(Runstate.STOPPED)
    def resume(self, payload: bytes) -> None:
        """Send a resume packet (``c``, ``vCont;c``, ``s``...); no reply until it stops.

        In ack mode we wait for the ``+`` so a lost packet is retransmitted
        now and not discovered as a missing stop much later.
        """
        self._send_frame(payload)
        self.state = Runstate.RUNNING
        self._resumed_with = payload
        self.stop = None
        if not self.ack_mode:
            return
        deadline = self._clock() + self.timeout
        while True:
            try:
                ev = self._next_event(deadline, f"acknowledgment of {_show(payload)}", self.timeout)
            except RspTimeout as exc:
                self._lost()
                raise RspTimeout(exc.pending, exc.timeout, closed=True) from None
            if isinstance(ev, Ack):
                return
            if isinstance(ev, (Packet, BadPacket)):
                # A reply before the '+' implies it; leave it for wait_stop.
                self._events.appendleft(ev)
                return
            self._link(ev)

    @require(Runstate.RUNNING)
    def interrupt(self) -> None:
        """Send the out-of-band 0x03 ("Interrupts"); then :meth:`wait_stop`.

        If the target stopped on its own meanwhile, QEMU ignores the byte and
        the stop already on its way is the one :meth:`wait_stop` returns.
        """
        log.debug("rsp -> ^C")
        self._write(b"\x03")

    @require(Runstate.RUNNING)
    def wait_stop(self, timeout: Optional[float] = None, wake: Optional[int] = None) -> StopReply:
        """Wait for the stop reply to the last resume ("Stop Reply Packets").

        ``timeout=None`` uses the session timeout; on :class:`RspTimeout` the
        target keeps running and the session stays usable (call
        :meth:`interrupt`).  A readable ``wake`` fd ends the wait the same way
        (the caller's own work is due).  ``W``/``X`` close the session.
        """
        timeout = self.timeout if timeout is None else timeout
        deadline = self._clock() + timeout
        waiting_for = f"stop reply after {_show(self._resumed_with)}"
        while True:
            pkt = self._link(self._next_event(deadline, waiting_for, timeout, wake))
            if pkt is None:
                continue
            payload = pkt.payload
            if is_console_output(payload):
                self._console(payload)
                continue
            if is_stop_reply(payload):
                try:
                    stop = parse_stop_reply(payload)
                except RspProtocolError:
                    # It looked like a stop: assume the target stopped so the caller
                    # can still inspect it or detach.
                    self.state = Runstate.STOPPED
                    raise
                self._stopped(stop)
                return stop
            if not payload or payload[:1] == b"E":
                try:
                    check_reply(self._resumed_with, payload)
                except (RspRemoteError, RspUnsupportedError):
                    # The resume itself was refused: the target never ran.
                    self.state = Runstate.STOPPED
                    raise
            raise RspProtocolError(f"unexpected packet while waiting for {waiting_for}", pkt.raw)

    # -- teardown -----------------------------------------------------------

    def close(self) -> None:
        """Drop the transport without a word to the stub (see ``detach``)."""
        self._lost()
