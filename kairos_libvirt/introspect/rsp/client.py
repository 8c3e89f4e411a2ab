"""A small synchronous gdbstub client: what the gdbstub backend needs, no more.

Registers, memory, software breakpoints, continue, interrupt, stop replies,
and ``P`` to move RIP past a 5-byte fentry NOP so one trap costs one VM stop
instead of the two that a single-step needs (DESIGN §2, gdbstub).

Packets from the GDB manual's "Packets" section: ``g``, ``G``, ``p``, ``P``,
``m``, ``M``, ``Z0``/``z0``, ``Z1``/``z1``, ``c``, ``vCont``, ``Hg``, ``D``,
``qXfer:features:read``.
"""
from __future__ import annotations

import logging
from typing import Callable, Dict, FrozenSet, Optional, Type, TypeVar, Union

from kairos_libvirt.introspect.rsp.errors import (
    RspError, RspProtocolError, RspRemoteError, RspUnsupportedError)
from kairos_libvirt.introspect.rsp.framing import from_hex, to_hex
from kairos_libvirt.introspect.rsp.packets import StopReply, ThreadId, check_reply
from kairos_libvirt.introspect.rsp.registers import (
    X86_64, Register, RegisterTable, parse_target_description)
from kairos_libvirt.introspect.rsp.session import DEFAULT_FEATURES, Runstate, Session, require
from kairos_libvirt.introspect.rsp.transport import SocketTransport, Transport

__all__ = ["RspClient"]

log = logging.getLogger(__name__)

C = TypeVar("C", bound="RspClient")

_ADDR_LIMIT = 1 << 64
#: Bytes of packet overhead we keep free ($, #, checksum, command and numbers).
_M_OVERHEAD = 48
#: A target description larger than this is not one.
_MAX_XML = 1 << 20


class RspClient:
    """Synchronous client over a :class:`Session`; see :meth:`connect_unix`.

    Every method that talks to the target needs it stopped; while it runs,
    only :meth:`wait_stop`, :meth:`interrupt` and :meth:`close` apply.
    """

    def __init__(self, session: Session, registers: RegisterTable = X86_64) -> None:
        self.session = session
        self.registers = registers
        #: Actions from ``vCont?``; empty when the stub has no ``vCont``.
        self.vcont_actions: FrozenSet[str] = frozenset()
        self._p_supported = True
        self._P_supported = True

    # -- connecting ---------------------------------------------------------

    @classmethod
    def connect_unix(cls: Type[C], path: str, *, timeout: float = 5.0, no_ack: bool = True,
                     on_console: Optional[Callable[[bytes], None]] = None) -> C:
        """Connect to ``-gdb unix:PATH,server=on`` (or HMP ``gdbserver unix:PATH``).

        Attaching pauses the VM; :meth:`detach` resumes it.
        """
        return cls.attach(SocketTransport.connect_unix(path, timeout), timeout=timeout,
                          no_ack=no_ack, on_console=on_console)

    @classmethod
    def connect_tcp(cls: Type[C], host: str, port: int, *, timeout: float = 5.0,
                    no_ack: bool = True,
                    on_console: Optional[Callable[[bytes], None]] = None) -> C:
        return cls.attach(SocketTransport.connect_tcp(host, port, timeout), timeout=timeout,
                          no_ack=no_ack, on_console=on_console)

    @classmethod
    def attach(cls: Type[C], transport: Transport, *, timeout: float = 5.0, no_ack: bool = True,
               on_console: Optional[Callable[[bytes], None]] = None) -> C:
        """Handshake on an open transport; closes it if the handshake fails."""
        client = cls(Session(transport, timeout=timeout, on_console=on_console))
        try:
            client._start(no_ack)
        except BaseException:
            client._release()
            raise
        return client

    def _release(self) -> None:
        """Best effort after a failed start: QEMU paused the VM when we connected
        and keeps it paused after a plain close (measured with QEMU 7.2), so
        try ``D`` to resume it, then close."""
        try:
            if self.state in (Runstate.CONNECTED, Runstate.STOPPED):
                self.session.request(b"D", timeout=1.0)
        except RspError as exc:
            log.warning("gdbstub: could not detach after a failed start (%s); the VM may "
                        "stay paused until a debugger detaches", exc)
        finally:
            self.session.close()

    def _start(self, no_ack: bool) -> None:
        features = self.session.handshake(DEFAULT_FEATURES, no_ack=no_ack)
        if features.get("qXfer:features:read") is True:
            # Besides giving us the real layout, reading target.xml is what makes
            # QEMU (7.2) answer p/P at all: before it, both get the empty reply.
            try:
                self.registers = parse_target_description(self.read_feature)
            except (RspRemoteError, RspUnsupportedError, RspProtocolError) as exc:
                log.warning("gdbstub target description unusable (%s); using the built-in "
                            "%s table", exc, self.registers.architecture)
        reply = self.session.request(b"vCont?")
        if reply.startswith(b"vCont"):
            self.vcont_actions = frozenset(
                a.decode("ascii", "replace") for a in reply[len(b"vCont"):].split(b";") if a)
        self.session.halt_reason()

    @require(Runstate.CONNECTED, Runstate.STOPPED)
    def read_feature(self, annex: str) -> bytes:
        """``qXfer:features:read:ANNEX:offset,length`` until the ``l`` chunk."""
        out = bytearray()
        length = max(16, (self.session.packet_size - 16) // 2)
        while True:
            req = b"qXfer:features:read:%s:%x,%x" % (annex.encode("ascii"), len(out), length)
            reply = check_reply(req, self.session.request(req))
            mark, data = reply[:1], reply[1:]
            if mark not in (b"m", b"l"):
                raise RspProtocolError(f"unexpected reply reading {annex!r}", reply)
            out += data
            if len(out) > _MAX_XML:
                raise RspProtocolError(f"{annex!r} is larger than {_MAX_XML} bytes", reply)
            if mark == b"l":
                return bytes(out)
            if not data:
                raise RspProtocolError(f"empty 'm' chunk reading {annex!r}", reply)

    # -- state -------------------------------------------------------------

    @property
    def state(self) -> Runstate:
        return self.session.state

    @property
    def stop(self) -> Optional[StopReply]:
        """The last stop reply (after connect, :meth:`wait_stop` or :meth:`interrupt`)."""
        return self.session.stop

    @property
    def architecture(self) -> str:
        return self.registers.architecture

    def _register(self, name: str) -> Register:
        if name not in self.registers:
            raise RspUnsupportedError(
                b"register " + name.encode("utf-8", "replace"),
                f"not in this target's description ({', '.join(self.registers.names[:24])}...)")
        return self.registers[name]

    # -- registers -----------------------------------------------------------

    @require(Runstate.STOPPED)
    def read_registers_raw(self) -> bytes:
        """The ``g`` reply as hex text (target byte order, ``x`` = unavailable)."""
        reply = check_reply(b"g", self.session.request(b"g"))
        if len(reply) % 2:
            raise RspProtocolError("odd-length 'g' reply", reply)
        return reply

    def read_registers(self) -> Dict[str, int]:
        """All registers in ``g``, by name; unavailable ones (``xx``) are left out."""
        return self._parse_g(self.read_registers_raw())

    def _parse_g(self, reply: bytes) -> Dict[str, int]:
        values: Dict[str, int] = {}
        for reg in self.registers:
            start, end = reg.offset * 2, (reg.offset + reg.size) * 2
            if end > len(reply):
                break
            text = reply[start:end]
            if b"x" in text:
                continue
            values[reg.name] = int.from_bytes(from_hex(text), self.registers.byteorder)
        return values

    @require(Runstate.STOPPED)
    def read_register(self, name: str) -> int:
        """One register with ``p n``; falls back to ``g`` if the stub has no ``p``."""
        reg = self._register(name)
        if self._p_supported:
            req = b"p%x" % reg.regnum
            reply = self.session.request(req)
            if reply:
                check_reply(req, reply)
                if b"x" in reply:
                    raise RspUnsupportedError(req, f"the stub reports {name} as unavailable")
                data = from_hex(reply)
                if len(data) != reg.size:
                    raise RspProtocolError(f"{name} is {reg.size} bytes, the stub sent {len(data)}",
                                           reply)
                return int.from_bytes(data, self.registers.byteorder)
            self._p_supported = False
            log.debug("gdbstub has no 'p'; reading registers with 'g'")
        values = self.read_registers()
        if name not in values:
            raise RspUnsupportedError(b"g", f"{name} is not in the stub's 'g' reply")
        return values[name]

    @require(Runstate.STOPPED)
    def set_register(self, name: str, value: int) -> None:
        """Write one register with ``P n=r``; falls back to ``g`` + ``G``.

        The backend uses this to resume at site + 5 after a trap at a 5-byte
        fentry NOP, which avoids the single-step (and the second VM stop)
        that GDB would do.
        """
        reg = self._register(name)
        assert 0 <= value < (1 << reg.bitsize), f"{value:#x} does not fit {name}"
        data = value.to_bytes(reg.size, self.registers.byteorder)
        if self._P_supported:
            req = b"P%x=" % reg.regnum + to_hex(data)
            reply = self.session.request(req)
            if reply:
                if check_reply(req, reply) != b"OK":
                    raise RspProtocolError(f"unexpected reply to P ({name})", reply)
                return
            self._P_supported = False
            log.debug("gdbstub has no 'P'; writing registers with 'G'")
        regs = bytearray(self.read_registers_raw())
        start, end = reg.offset * 2, (reg.offset + reg.size) * 2
        if end > len(regs):
            raise RspUnsupportedError(b"G", f"{name} is not in the stub's 'g' reply")
        regs[start:end] = to_hex(data)
        req = b"G" + bytes(regs)
        if check_reply(req, self.session.request(req)) != b"OK":
            raise RspProtocolError(f"unexpected reply to G ({name})", req[:64])

    @require(Runstate.STOPPED)
    def select_thread(self, thread: Union[ThreadId, int]) -> None:
        """``Hg`` ("Packets"): which vCPU ``g``/``p``/``m`` refer to (QEMU numbers from 1).

        After a stop QEMU already selects the vCPU that stopped.
        """
        tid = thread if isinstance(thread, ThreadId) else ThreadId(thread)
        req = b"Hg" + tid.encode()
        if check_reply(req, self.session.request(req)) != b"OK":
            raise RspProtocolError("unexpected reply to Hg", req)

    # -- memory ---------------------------------------------------------------

    @property
    def max_read(self) -> int:
        """Largest ``m`` per packet: its hex reply must fit the stub's PacketSize."""
        return max(1, (self.session.packet_size - 16) // 2)

    @property
    def max_write(self) -> int:
        return max(1, (self.session.packet_size - _M_OVERHEAD) // 2)

    @require(Runstate.STOPPED)
    def read_memory(self, addr: int, length: int) -> bytes:
        """Guest-virtual memory with ``m addr,length``, chunked by packet size.

        Unmapped memory is :class:`RspRemoteError` (QEMU: ``E14``, EFAULT).
        A short chunk is accepted and the rest asked for ("Packets", ``m``).
        """
        assert 0 <= addr and 0 <= length and addr + length <= _ADDR_LIMIT
        out = bytearray()
        while len(out) < length:
            n = min(self.max_read, length - len(out))
            req = b"m%x,%x" % (addr + len(out), n)
            data = from_hex(check_reply(req, self.session.request(req)))
            if len(data) > n:
                raise RspProtocolError(f"asked for {n} bytes, the stub sent {len(data)}", req)
            out += data
        return bytes(out)

    @require(Runstate.STOPPED)
    def write_memory(self, addr: int, data: bytes) -> None:
        """``M addr,length:XX...``, chunked by packet size."""
        assert 0 <= addr and addr + len(data) <= _ADDR_LIMIT
        done = 0
        while done < len(data):
            chunk = data[done:done + self.max_write]
            req = b"M%x,%x:" % (addr + done, len(chunk)) + to_hex(chunk)
            if check_reply(req, self.session.request(req)) != b"OK":
                raise RspProtocolError("unexpected reply to M", req[:64])
            done += len(chunk)

    # -- breakpoints ----------------------------------------------------------

    def _point(self, kind_packet: bytes, addr: int, kind: int) -> None:
        assert 0 <= addr < _ADDR_LIMIT and kind > 0
        req = b"%s,%x,%x" % (kind_packet, addr, kind)
        reply = check_reply(req, self.session.request(req),
                            hint="this stub cannot plant that kind of breakpoint")
        if reply != b"OK":
            raise RspProtocolError(f"unexpected reply to {kind_packet.decode()}", reply)

    @require(Runstate.STOPPED)
    def insert_breakpoint(self, addr: int, kind: int = 1) -> None:
        """``Z0,addr,kind``: a software breakpoint (kind = 1 byte on x86)."""
        self._point(b"Z0", addr, kind)

    @require(Runstate.STOPPED)
    def remove_breakpoint(self, addr: int, kind: int = 1) -> None:
        """``z0,addr,kind``."""
        self._point(b"z0", addr, kind)

    @require(Runstate.STOPPED)
    def insert_hw_breakpoint(self, addr: int, kind: int = 1) -> None:
        """``Z1,addr,kind``: a hardware breakpoint (no guest memory changes)."""
        self._point(b"Z1", addr, kind)

    @require(Runstate.STOPPED)
    def remove_hw_breakpoint(self, addr: int, kind: int = 1) -> None:
        """``z1,addr,kind``."""
        self._point(b"z1", addr, kind)

    # -- execution ------------------------------------------------------------

    @require(Runstate.STOPPED)
    def cont(self) -> None:
        """Resume every vCPU: ``vCont;c`` when offered, else ``c``."""
        self.session.resume(b"vCont;c" if "c" in self.vcont_actions else b"c")

    @require(Runstate.RUNNING)
    def wait_stop(self, timeout: Optional[float] = None, wake: Optional[int] = None) -> StopReply:
        """Block until the target stops; :class:`RspTimeout` (also when ``wake`` is
        readable first) leaves it running."""
        return self.session.wait_stop(timeout, wake)

    @require(Runstate.RUNNING)
    def interrupt(self, timeout: Optional[float] = None) -> StopReply:
        """Stop a running target (0x03) and return the stop reply (QEMU: ``T02``)."""
        self.session.interrupt()
        return self.session.wait_stop(timeout)

    # -- teardown -------------------------------------------------------------

    def detach(self) -> None:
        """``D``: QEMU removes our breakpoints and resumes the VM; then close.

        A running target is interrupted first (a packet sent to QEMU while
        the VM runs would stop it anyway, without the stop being consumed).
        """
        if self.state is Runstate.DISCONNECTED:
            return
        try:
            if self.state is Runstate.RUNNING:
                self.interrupt()
            if self.state in (Runstate.CONNECTED, Runstate.STOPPED):
                if check_reply(b"D", self.session.request(b"D")) != b"OK":
                    raise RspProtocolError("unexpected reply to D", b"D")
        finally:
            self.session.close()

    def close(self) -> None:
        """Drop the connection without ``D``: QEMU 7.2 then leaves the VM paused
        if it was stopped (measured), so prefer :meth:`detach`."""
        self.session.close()

    def __enter__(self: C) -> C:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.detach()
        except RspError as err:
            log.warning("gdbstub detach failed, connection closed anyway: %s", err)
