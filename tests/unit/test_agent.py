import io
import logging
import sys

from kairos_libvirt import agent
from kairos_libvirt.state import DomainState


def _log_line(monkeypatch, journal: bool) -> str:
    if journal:
        monkeypatch.setenv("JOURNAL_STREAM", "8:1234")
    else:
        monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    buf = io.StringIO()
    monkeypatch.setattr(sys, "stderr", buf)
    agent._setup_logging()
    logging.getLogger("kairosvm-agent").error("boom")
    return buf.getvalue()


def test_journald_gets_syslog_levels(monkeypatch):
    assert _log_line(monkeypatch, True) == "<3>kairosvm-agent: boom\n"


def test_log_file_lines_are_timestamped(monkeypatch):
    line = _log_line(monkeypatch, False)
    assert " kairosvm-agent[" in line and " ERROR boom" in line and line[:4].isdigit()


def test_reaction_percentiles():
    assert agent._percentiles([]) == {}
    p = agent._percentiles([(i * 1_000_000, i * 1000, i * 2000, i * 3000) for i in range(1, 101)])
    assert p == {"reactions": 100, "reaction_p50_us": 51_000, "reaction_p99_us": 100_000,
                 "reaction_event_p50_us": 51, "reaction_analysed_p50_us": 102,
                 "reaction_granted_p50_us": 153}


def test_counters_do_not_change_the_published_shape():
    a = DomainState(1, 2, introspection={"backend": "gdbstub", "state": "running", "hits": 1},
                    tasks=[{"key": "k", "samples": 1, "observed_period_ns": 5}])
    b = DomainState(1, 2, introspection={"backend": "gdbstub", "state": "running", "hits": 9},
                    tasks=[{"key": "k", "samples": 7, "observed_period_ns": 6}])
    assert agent._without_counters(a) == agent._without_counters(b)
