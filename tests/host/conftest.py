from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
from typing import Iterator, List

import pytest

from kairos_libvirt.errors import HostError
from kairos_libvirt.host import cgroup, dlprobe, sched
from tests.conftest import skip_or_fail


@pytest.fixture(autouse=True)
def _kernel_tier():
    if os.geteuid() != 0:
        skip_or_fail("kernel", "needs root")
    try:
        sched.get(0)
    except HostError as exc:
        if exc.errno == errno.ENOSYS:
            skip_or_fail("kernel", "this kernel has no sched_getattr")
        raise


class Parked:
    """Threads that sleep until released; they *exit* under whatever policy they
    have, so no SCHED_DEADLINE bandwidth leaks (DESIGN.md §2)."""

    def __init__(self, n: int) -> None:
        self.stop = threading.Event()
        self.tids: List[int] = []
        ready = threading.Barrier(n + 1)

        def park() -> None:
            self.tids.append(threading.get_native_id())
            ready.wait()
            self.stop.wait()

        self.threads = [threading.Thread(target=park, daemon=True) for _ in range(n)]
        for t in self.threads:
            t.start()
        ready.wait()

    def release(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(5)
        dlprobe.wait_threads_gone(self.tids)
        # An exited SCHED_DEADLINE thread returns its bandwidth at its 0-lag
        # time, up to one deadline later (the tests use <= 100 ms).
        time.sleep(0.25)


@pytest.fixture
def parked() -> Iterator:
    made: List[Parked] = []

    def make(n: int = 1) -> Parked:
        p = Parked(n)
        made.append(p)
        return p

    yield make
    for p in made:
        p.release()


@pytest.fixture
def tmp_cpu_cgroup():
    """A scratch cpu cgroup v1 directory, removed afterwards (children first)."""
    mount = cgroup.cpu_v1_mount()
    if not mount or not cgroup.rt_group_sched_available():
        skip_or_fail("kernel", "no cgroup v1 cpu controller with RT group scheduling")
    path = os.path.join(mount, f"kairos-test-{os.getpid()}")
    os.mkdir(path)
    try:
        yield path
    finally:
        with contextlib.suppress(HostError):
            cgroup.zero_rt_subtree(path)
        for d in sorted((os.path.join(r, x) for r, ds, _ in os.walk(path) for x in ds),
                        key=len, reverse=True):
            os.rmdir(d)
        os.rmdir(path)
