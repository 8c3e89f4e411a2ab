"""Requests for a backend's own thread (arm, disarm, re-sample).

Both backends own their connection to the VM (the gdbstub socket, the
VM ioctls) from one thread; other threads hand it work through this queue.
"""
from __future__ import annotations

import queue
from typing import Callable


class ControlQueue:
    def __init__(self) -> None:
        self._q: "queue.Queue[Callable[[], None]]" = queue.Queue()

    def put(self, op: Callable[[], None]) -> None:
        self._q.put(op)

    def empty(self) -> bool:
        return self._q.empty()

    def run_pending(self) -> None:
        """Run every queued request, in order, in the calling (backend) thread."""
        while True:
            try:
                op = self._q.get_nowait()
            except queue.Empty:
                return
            op()
