"""The agent's event sources, as file descriptors one ``select`` waits on (issue 13).

The agent sleeps until something happens instead of polling:

- **QEMU exits**: a pidfd (``pidfd_open``) becomes readable when the process
  is gone, with no pid-reuse race (the pid file could name a new process).
- **Its own threads** (introspection traps, census, sampler): a self-pipe;
  :meth:`Wakeup.set` is safe from any thread and from signal handlers.
- **Commands** (``kairosvm hold``/``unhold``): a root-only datagram socket in
  the domain's run directory; any datagram means "look again".  A socket,
  not a signal: a stale pid file never makes the CLI signal another process.

Part of the OS boundary: nothing else opens pidfds or these sockets.
"""
from __future__ import annotations

import errno
import os
import select
import socket
from typing import List, Optional

__all__ = ["Wakeup", "poke"]


class Wakeup:
    """What the agent waits on; :meth:`wait` says what happened."""

    def __init__(self, control_path: Optional[str] = None) -> None:
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._pidfd: Optional[int] = None
        self._pid: Optional[int] = None
        self._sock: Optional[socket.socket] = None
        self.control_path = control_path
        if control_path is not None:
            try:
                os.unlink(control_path)
            except FileNotFoundError:
                pass
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            old = os.umask(0o177)             # root only, from the first instant
            try:
                s.bind(control_path)
            finally:
                os.umask(old)
            s.setblocking(False)
            self._sock = s

    def watch_process(self, pid: int) -> bool:
        """Wake when ``pid`` exits; False if it is already gone.

        Without pidfds (old kernels) :meth:`wait` reports the exit within
        its timeout by probing the pid (the caller bounds the timeout).
        """
        self._pid = pid
        try:
            self._pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return False
        except (AttributeError, OSError) as exc:
            if isinstance(exc, OSError) and exc.errno not in (errno.ENOSYS, errno.EINVAL):
                raise
            self._pidfd = None
        return True

    def set(self) -> None:
        """Wake :meth:`wait` (any thread, signal handlers too)."""
        try:
            os.write(self._w, b"x")
        except BlockingIOError:
            pass        # a wake-up is already pending

    def wait(self, timeout: Optional[float]) -> List[str]:
        """Sleep until an event or ``timeout`` s; the events: ``"exit"``, ``"wake"``, ``"control"``."""
        fds = [self._r] + [fd for fd in (self._pidfd, self._sock.fileno() if self._sock else None)
                           if fd is not None]
        ready, _, _ = select.select(fds, [], [], None if timeout is None else max(0.0, timeout))
        out = []
        if self._r in ready:
            try:
                while os.read(self._r, 512):
                    pass
            except BlockingIOError:
                pass
            out.append("wake")
        if self._sock is not None and self._sock.fileno() in ready:
            try:
                while self._sock.recv(64):
                    pass
            except BlockingIOError:
                pass
            out.append("control")
        if self._pidfd is not None and self._pidfd in ready:
            out.append("exit")
        elif self._pidfd is None and self._pid is not None:
            from .proc import pid_alive
            if not pid_alive(self._pid):
                out.append("exit")
        return out

    @property
    def watches_exit(self) -> bool:
        """True when an exit wakes :meth:`wait` at once (a pidfd), False when only probed."""
        return self._pidfd is not None

    def close(self) -> None:
        for fd in (self._r, self._w, self._pidfd):
            if fd is not None and fd >= 0:
                os.close(fd)
        self._r = self._w = -1
        self._pidfd = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            try:
                os.unlink(self.control_path)   # type: ignore[arg-type]
            except OSError:
                pass


def poke(control_path: str) -> bool:
    """Tell the agent listening at ``control_path`` to look again; False if none listens.

    Best effort: the agent also looks at its periodic re-check.
    """
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        s.sendto(b"look", control_path)
        return True
    except OSError:
        return False
    finally:
        s.close()
