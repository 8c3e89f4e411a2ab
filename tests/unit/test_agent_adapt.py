"""The agent takes the host-wide ledger lock only for a real regrant (issue 13): a poll that
changes nothing, or asks again for a server admission refused, does not lock.  The ledger
here is a fake named as such (it counts lock acquisitions); its rules are tested in test_ledger.
"""
from __future__ import annotations

import contextlib
from types import SimpleNamespace

from kairos_libvirt.agent import Agent
from kairos_libvirt.config import HostConfig
from kairos_libvirt.errors import AdmissionError
from kairos_libvirt.introspect.adapt import Adapted
from kairos_libvirt.model import VcpuSched

DECL = VcpuSched("deadline", 2_000_000, 10_000_000)
BIG = VcpuSched("deadline", 4_000_000, 8_000_000)


class FakeLedger:
    """Counts ``locked()``; ``regrant`` grants, or refuses while ``full``."""

    def __init__(self, granted):
        self.locks = 0
        self.full = False
        self.entry = SimpleNamespace(granted=dict(granted))

    @contextlib.contextmanager
    def locked(self):
        self.locks += 1
        yield SimpleNamespace(domains={"d": self.entry})

    def regrant(self, state, name, vid, sched):
        if self.full:
            raise AdmissionError("refused by admission: no room (test)")
        self.entry.granted[vid] = sched
        return self.entry


class FakeIntro:
    trigger = None

    def __init__(self, sched):
        self.sched = sched

    def tick(self):
        pass

    def adapted(self):
        return {0: Adapted(0, self.sched, "introspection" if self.sched != DECL else "declared")}


def agent(tmp_path, sched):
    a = Agent("d", HostConfig(run_dir=str(tmp_path), enforcement_ns=0))
    a.ledger = FakeLedger({0: DECL})
    a.grants = {0: DECL}
    a.intro = FakeIntro(sched)
    return a


def test_no_lock_while_the_analysis_wants_what_is_granted(tmp_path):
    a = agent(tmp_path, DECL)
    for _ in range(100):
        assert a._adapt() is None
    assert a.ledger.locks == 0


def test_one_lock_per_regrant(tmp_path):
    a = agent(tmp_path, DECL)
    a.intro.sched = BIG
    assert a._adapt().granted[0] == BIG and a.ledger.locks == 1
    for _ in range(10):
        assert a._adapt() is None
    assert a.ledger.locks == 1 and a.grants[0] == BIG


def test_a_refused_server_is_not_asked_again_every_poll(tmp_path):
    a = agent(tmp_path, DECL)
    a.ledger.full = True
    a.intro.sched = BIG
    assert a._adapt() is None and a.ledger.locks == 1
    assert a.adapted[0].capped and "capped by host capacity" in a.adapted[0].note
    for _ in range(10):
        a._adapt()
    assert a.ledger.locks == 1 and a.adapted[0].capped     # the annotation stays
    a.refused.clear()                                      # what the periodic re-check does
    a.ledger.full = False
    assert a._adapt().granted[0] == BIG and a.ledger.locks == 2
