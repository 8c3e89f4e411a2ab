"""Apply a reservation to one vCPU thread and read it back from the kernel."""
from __future__ import annotations

import logging
from typing import Optional

from .host import sched
from .host.sched import ThreadSched
from .model import VcpuSched

log = logging.getLogger(__name__)


def matches(k: Optional[ThreadSched], want: VcpuSched) -> bool:
    """Does the kernel's view of a thread already equal the wanted reservation?"""
    if k is None or k.policy != want.policy:
        return False
    if want.policy == "deadline":
        return (k.runtime_ns, k.deadline_ns, k.period_ns) == \
            (want.runtime_ns, want.effective_deadline_ns, want.period_ns)
    return k.priority == want.priority


def apply_thread(tid: int, want: VcpuSched) -> None:
    """Set the thread's scheduling class (the RT group budget is set before, by rtgroups)."""
    if want.policy == "deadline":
        sched.set_deadline(tid, want.runtime_ns, want.effective_deadline_ns, want.period_ns)
    else:
        assert want.priority is not None
        sched.set_rt(tid, want.policy, want.priority)
