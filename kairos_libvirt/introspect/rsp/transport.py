"""Byte transports for an RSP session: the abstract contract and a socket.

The session needs only ``send(bytes)``, ``recv(timeout) -> bytes`` and
``close()``, so tests replay a scripted conversation without a VM.
"""
from __future__ import annotations

import select
import socket
from typing import Optional, Protocol, Tuple, Union

from kairos_libvirt.introspect.rsp.errors import RspConnectionError

__all__ = ["Transport", "SocketTransport"]

_RECV_SIZE = 65536


class Transport(Protocol):
    """What :class:`~.session.Session` needs from a byte stream.

    ``recv`` returns at least one byte, ``b""`` when the peer closed the
    stream, and raises :class:`TimeoutError` when nothing arrived within
    ``timeout`` seconds (``None``: wait forever), or when the file
    descriptor ``wake`` became readable first (the caller's own event: it
    drains it).  Failures are :class:`RspConnectionError`.
    """

    def send(self, data: bytes) -> None: ...

    def recv(self, timeout: Optional[float], wake: Optional[int] = None) -> bytes: ...

    def close(self) -> None: ...


class SocketTransport:
    """A connected stream socket (QEMU's ``-gdb unix:PATH`` or ``tcp::PORT``).

    The socket stays blocking; ``recv`` waits with ``poll`` instead of
    toggling socket timeouts, so a timeout never leaves a half-sent packet.
    """

    def __init__(self, sock: socket.socket, peer: str) -> None:
        self._sock: Optional[socket.socket] = sock
        self.peer = peer
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN)

    @classmethod
    def connect_unix(cls, path: str, timeout: float = 5.0) -> "SocketTransport":
        return cls._connect(socket.AF_UNIX, path, f"unix:{path}", timeout)

    @classmethod
    def connect_tcp(cls, host: str, port: int, timeout: float = 5.0) -> "SocketTransport":
        return cls._connect(socket.AF_INET, (host, port), f"tcp:{host}:{port}", timeout)

    @classmethod
    def _connect(cls, family: int, address: Union[str, Tuple[str, int]], peer: str,
                 timeout: float) -> "SocketTransport":
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(address)
            sock.settimeout(None)
        except OSError as exc:
            sock.close()
            raise RspConnectionError(
                f"cannot connect to the gdbstub at {peer} (is QEMU running with -gdb, "
                "or was 'gdbserver' issued on its monitor?)", exc) from exc
        if family == socket.AF_INET:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(sock, peer)

    def _socket(self) -> socket.socket:
        if self._sock is None:
            raise RspConnectionError(f"gdbstub connection {self.peer} is closed")
        return self._sock

    def send(self, data: bytes) -> None:
        try:
            self._socket().sendall(data)
        except OSError as exc:
            raise RspConnectionError(f"cannot send to the gdbstub at {self.peer}", exc) from exc

    def recv(self, timeout: Optional[float], wake: Optional[int] = None) -> bytes:
        sock = self._socket()
        ms = None if timeout is None else max(0, int(timeout * 1000))
        if wake is None:
            ready = self._poll.poll(ms)
        else:
            p = select.poll()
            p.register(sock, select.POLLIN)
            p.register(wake, select.POLLIN)
            ready = p.poll(ms)
            if ready and all(fd == wake for fd, _ in ready):
                raise TimeoutError(f"woken while waiting for {self.peer}")
        if not ready:
            raise TimeoutError(f"nothing from {self.peer} in {timeout} s")
        try:
            return sock.recv(_RECV_SIZE)
        except OSError as exc:
            raise RspConnectionError(f"cannot read from the gdbstub at {self.peer}", exc) from exc

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            self._poll.unregister(sock)
            sock.close()
