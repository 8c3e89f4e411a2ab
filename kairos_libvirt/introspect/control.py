"""Requests for a backend's own thread (arm, disarm, re-sample), and its wake-up.

Both backends own their connection to the VM (the gdbstub socket, the
VM ioctls) from one thread; other threads hand it work through this queue.
The queue carries a self-pipe that backend thread sleeps on with its other
event source (the gdbstub socket, kvm-ud's eventfd), so that an idle backend
needs no timeout to notice a request or the agent's stop (issue 13: a
0.2 s poll was most of an idle agent's CPU).
"""
from __future__ import annotations

import os
import queue
import weakref
from typing import Callable

#: Longest a backend thread sleeps with nothing due: only a bound on a lost
#: wake-up; every real event (trap, request, stop) wakes it at once.
IDLE_CHECK_S = 10.0


class ControlQueue:
    def __init__(self) -> None:
        self._q: "queue.Queue[Callable[[], None]]" = queue.Queue()
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # The backend (and this queue) lives as long as the agent, across re-attaches.
        weakref.finalize(self, _close_fds, self._r, self._w)

    def fileno(self) -> int:
        """Readable once something was put or :meth:`wake` was called (until :meth:`clear`)."""
        return self._r

    def put(self, op: Callable[[], None]) -> None:
        self._q.put(op)
        self.wake()

    def wake(self) -> None:
        """Wake the backend thread with no work (the agent stops, a timer changed)."""
        try:
            os.write(self._w, b"x")
        except BlockingIOError:
            pass           # full: it is awake already

    def clear(self) -> None:
        """Drain the wake-ups (the backend thread is awake now)."""
        try:
            while os.read(self._r, 4096):
                pass
        except BlockingIOError:
            pass

    def empty(self) -> bool:
        return self._q.empty()

    def run_pending(self) -> None:
        """Run every queued request, in order, in the calling (backend) thread."""
        self.clear()
        while True:
            try:
                op = self._q.get_nowait()
            except queue.Empty:
                return
            op()


def _close_fds(*fds: int) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
