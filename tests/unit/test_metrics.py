"""Prometheus exposition (checked by a strict parser written here), the refusal
counter, the textfile and HTTP outputs, and the sampler's error paths with fakes."""
from __future__ import annotations

import json
import math
import os
import re
import socket
import threading
import urllib.error
import urllib.request
from fractions import Fraction
from typing import Dict, List, Tuple

import libvirt
import pytest

from kairos_libvirt import cli, metrics, virt
from kairos_libvirt.config import HostConfig
from kairos_libvirt.ledger import Entry
from kairos_libvirt.errors import KairosError, LibvirtError
from kairos_libvirt.host import proc
from kairos_libvirt.metrics import DomainSample, HostSample, VcpuSample

# --------------------------------------------------------------------------
# A strict parser of the text exposition format 0.0.4
# (https://prometheus.io/docs/instrumenting/exposition_formats/).

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r"[a-zA-Z_][a-zA-Z0-9_]*"
_VALUE = r"(?:[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|NaN|[+-]Inf)"
_SAMPLE = re.compile(rf"^({_NAME})(?:\{{(.*)\}})? ({_VALUE})(?: (-?[0-9]+))?$")
_LABEL_PAIR = re.compile(rf'({_LABEL})="((?:[^"\\\n]|\\[\\"n])*)"(,|$)')
TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}

Series = Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float]


class ExpositionError(AssertionError):
    pass


def _unescape(v: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "\\": "\\", '"': '"'}[m.group(1)], v)


def parse_exposition(text: str) -> Tuple[Dict[str, dict], Series]:
    """Families {name: {type, help}} and series {(name, labels): value}; raises on any
    deviation from the format (and on what Prometheus would reject at scrape)."""
    if not text.endswith("\n"):
        raise ExpositionError("the exposition must end with a line feed")
    families: Dict[str, dict] = {}
    series: Series = {}
    done: set = set()  # families whose samples are over (samples must be contiguous)
    current = None
    for n, line in enumerate(text[:-1].split("\n"), 1):
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                name = parts[2]
                if not re.fullmatch(_NAME, name):
                    raise ExpositionError(f"line {n}: bad metric name {name!r}")
                fam = families.setdefault(name, {})
                if parts[1] in fam:
                    raise ExpositionError(f"line {n}: second {parts[1]} for {name}")
                if name in done or (current == name and parts[1] == "TYPE"
                                    and fam.get("samples")):
                    raise ExpositionError(f"line {n}: {parts[1]} after samples of {name}")
                value = parts[3] if len(parts) == 4 else ""
                if parts[1] == "TYPE" and value not in TYPES:
                    raise ExpositionError(f"line {n}: unknown type {value!r}")
                if parts[1] == "HELP" and re.search(r"\\[^\\n]", value):
                    raise ExpositionError(f"line {n}: bad escape in HELP")
                fam[parts[1]] = value
                if current and current != name:
                    done.add(current)
                current = name
            continue
        if not line.strip():
            raise ExpositionError(f"line {n}: empty line")
        m = _SAMPLE.match(line)
        if not m:
            raise ExpositionError(f"line {n}: not a sample: {line!r}")
        name, labels_text, value = m.group(1), m.group(2), m.group(3)
        labels: List[Tuple[str, str]] = []
        if labels_text:
            pos = 0
            while pos < len(labels_text):
                lm = _LABEL_PAIR.match(labels_text, pos)
                if not lm:
                    raise ExpositionError(f"line {n}: bad labels {labels_text!r}")
                if lm.group(1).startswith("__"):
                    raise ExpositionError(f"line {n}: reserved label name {lm.group(1)}")
                labels.append((lm.group(1), _unescape(lm.group(2))))
                pos = lm.end()
        if len({k for k, _ in labels}) != len(labels):
            raise ExpositionError(f"line {n}: a label repeats")
        if name not in families or "TYPE" not in families[name]:
            raise ExpositionError(f"line {n}: sample of {name} without a TYPE line")
        if name in done or current != name:
            raise ExpositionError(f"line {n}: samples of {name} are not contiguous")
        key = (name, tuple(sorted(labels)))
        if key in series:
            raise ExpositionError(f"line {n}: duplicate series {key}")
        series[key] = float(value.replace("Inf", "inf"))
        families[name]["samples"] = families[name].get("samples", 0) + 1
    for name, fam in families.items():
        if "TYPE" not in fam or "HELP" not in fam:
            raise ExpositionError(f"{name}: needs both HELP and TYPE")
        if fam["TYPE"] == "counter" and not name.endswith("_total"):
            raise ExpositionError(f"{name}: a counter's name ends in _total")
    return families, series


def test_the_strict_parser_rejects_what_prometheus_rejects():
    good = '# HELP a_total x\n# TYPE a_total counter\na_total{l="v\\"q\\\\"} 1\n'
    fams, series = parse_exposition(good)
    assert series == {("a_total", (("l", 'v"q\\'),)): 1.0}
    for bad in (good[:-1],                                       # no final newline
                good + 'a_total{l="v\\"q\\\\"} 2\n',               # duplicate series
                '# TYPE a gauge\na 1\n',                          # no HELP
                '# HELP a x\n# TYPE a gauge\na{l="x} 1\n',        # open quote
                '# HELP a x\n# TYPE a gauge\na{l="\\t"} 1\n',     # bad escape
                '# HELP a x\n# TYPE a gauge\na 1.2.3\n',          # bad value
                '# HELP a x\n# TYPE a gauge\na{l="1",l="2"} 1\n',  # repeated label
                '# HELP a x\n# TYPE a gauge\nb 1\n',              # no TYPE for b
                '# HELP a x\n# TYPE a bogus\na 1\n',              # unknown type
                '# HELP a x\n# TYPE a counter\na 1\n',            # counter without _total
                '# HELP a x\n# TYPE a gauge\na 1\n# HELP b y\n# TYPE b gauge\nb 1\na 2\n'):
        with pytest.raises(ExpositionError):
            parse_exposition(bad)


# --------------------------------------------------------------------------
# Rendering a fake sample


def fake_sample() -> HostSample:
    dl = {"policy": "deadline", "runtime_ns": 1_000_000, "period_ns": 10_000_000,
          "deadline_ns": None, "priority": None}
    fifo = {"policy": "fifo", "runtime_ns": 3_000_000, "period_ns": 10_000_000,
            "deadline_ns": None, "priority": 40}
    vm1 = DomainSample(name='vm"1\\x\n', running=True, qemu_pid=10, agent_pid=11,
                       agent_running=True, ledger_state="running", vcpus=[
        VcpuSample(vcpu=0, tid=12, reserved=dl, declared=dl, policy="deadline", priority=0,
                   runtime_ns=1_000_000, deadline_ns=10_000_000, period_ns=10_000_000,
                   exec_ns=2_500_000_000, dl_runtime_ns=-3000, guest_tasks=2),
        VcpuSample(vcpu=1, tid=13, reserved=fifo, declared=fifo, policy="fifo", priority=40,
                   rt_group=(3000, 10000), exec_ns=1, nr_throttled=4),
    ])
    vm1.introspection = {"backend": "gdbstub", "state": "running", "hits": 7, "decoded": 6,
                         "rejected": 1, "suppressed": 0, "handler_ns": 28_000_000,
                         "evicted": 0}
    vm2 = DomainSample(name="vm2", running=False, ledger_state="prepared", vcpus=[
        VcpuSample(vcpu=0, reserved=dl, declared=dl)])
    return HostSample(monotonic=1.0, wall=0.0, domains=[vm1, vm2],
                      capacity_cpus=Fraction(9, 5), reserved_cpus=Fraction(1, 2),
                      admission_refusals=3)


def test_render_is_valid_exposition_with_every_family():
    fams, series = parse_exposition(metrics.render(fake_sample()))
    assert all(name.startswith("kairosvm_") for name in fams)
    assert set(fams) == {f.name for f in metrics.families(HostSample(0, 0))}
    d1 = (("domain", 'vm"1\\x\n'),)

    def get(name, *labels):
        return series[(name, tuple(sorted(d1 + labels)))]

    assert series[("kairosvm_capacity_cpus", ())] == 1.8
    assert series[("kairosvm_admission_refusals_total", ())] == 3
    assert series[("kairosvm_libvirt_up", ())] == 1
    assert get("kairosvm_vcpu_reserved_bandwidth_ratio", ("policy", "deadline"),
               ("vcpu", "0")) == 0.1
    assert get("kairosvm_vcpu_enforced_bandwidth_ratio", ("policy", "fifo"),
               ("vcpu", "1")) == 0.3
    assert get("kairosvm_vcpu_reservation_in_force", ("vcpu", "0")) == 1
    assert get("kairosvm_vcpu_reservation_in_force", ("vcpu", "1")) == 1
    assert get("kairosvm_vcpu_cpu_seconds_total", ("vcpu", "0")) == 2.5
    assert get("kairosvm_vcpu_throttled_total", ("vcpu", "1")) == 4
    assert get("kairosvm_vcpu_guest_tasks", ("vcpu", "0")) == 2
    assert series[("kairosvm_domain_trap_events_total", d1)] == 7
    assert series[("kairosvm_domain_trap_events_rejected_total", d1)] == 1
    assert series[("kairosvm_domain_trap_handler_seconds_total", d1)] == 0.028
    assert get("kairosvm_domain_introspection_state", ("backend", "gdbstub"),
               ("state", "running")) == 1
    # Unknown stays absent, never a made-up 0.
    assert (("kairosvm_vcpu_throttled_total", tuple(sorted(d1 + (("vcpu", "0"),))))
            not in series)
    assert ("kairosvm_vcpu_guest_tasks", (("domain", "vm2"), ("vcpu", "0"))) not in series
    assert ("kairosvm_domain_trap_events_total", (("domain", "vm2"),)) not in series
    assert series[("kairosvm_domain_running", (("domain", "vm2"),))] == 0
    assert series[("kairosvm_vcpu_reservation_in_force", (("domain", "vm2"), ("vcpu", "0")))] \
        == 0


def test_render_without_capacity_or_libvirt():
    hs = HostSample(monotonic=0, wall=0, libvirt_error="down")
    fams, series = parse_exposition(metrics.render(hs))
    assert series[("kairosvm_libvirt_up", ())] == 0
    assert ("kairosvm_capacity_cpus", ()) not in series
    assert fams["kairosvm_capacity_cpus"]["TYPE"] == "gauge"


@pytest.mark.parametrize("value, text", [
    (True, "1"), (False, "0"), (3, "3"), (Fraction(1, 4), "0.25"), (0.1, "0.1"),
    (float("nan"), "NaN"), (math.inf, "+Inf"), (-math.inf, "-Inf")])
def test_values(value, text):
    assert metrics.format_value(value) == text


def test_in_force_needs_the_kernel_to_match_the_reservation():
    dl = {"policy": "deadline", "runtime_ns": 1000, "period_ns": 10000, "deadline_ns": 5000}
    v = VcpuSample(vcpu=0, reserved=dl, policy="deadline", runtime_ns=1000, deadline_ns=5000,
                   period_ns=10000)
    assert v.in_force
    v.deadline_ns = 10000
    assert not v.in_force
    v.policy = "other"
    assert not v.in_force and v.enforced_bandwidth == 0
    assert not VcpuSample(vcpu=0, policy="deadline").in_force  # nothing reserved


# --------------------------------------------------------------------------
# The admission-refusal counter


def test_refusal_counter_counts_and_reads(tmp_path):
    run = str(tmp_path)
    assert metrics.read_admission_refusals(run) == 0  # the hook never wrote it
    assert [metrics.count_admission_refusal(run) for _ in range(3)] == [1, 2, 3]
    assert metrics.read_admission_refusals(run) == 3
    assert open(metrics.refusals_path(run)).read() == "3\n"


def test_refusal_counter_survives_garbage(tmp_path):
    path = metrics.refusals_path(str(tmp_path))
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as f:
        f.write("lots\n")
    assert metrics.read_admission_refusals(str(tmp_path)) == 0
    assert metrics.count_admission_refusal(str(tmp_path)) == 1


def test_refusal_counter_under_concurrency(tmp_path):
    threads = [threading.Thread(target=lambda: [metrics.count_admission_refusal(str(tmp_path))
                                                for _ in range(25)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert metrics.read_admission_refusals(str(tmp_path)) == 100


# --------------------------------------------------------------------------
# Outputs


def test_textfile_is_replaced_atomically(tmp_path):
    path = tmp_path / "kairosvm.prom"
    path.write_text("old\n")
    metrics.write_textfile(str(path), "new\n")
    assert path.read_text() == "new\n" and oct(path.stat().st_mode & 0o777) == "0o644"
    assert [p.name for p in tmp_path.iterdir()] == ["kairosvm.prom"]


def test_textfile_error_names_the_file(tmp_path):
    with pytest.raises(KairosError, match="nodir/x.prom: cannot write the metrics file"):
        metrics.write_textfile(str(tmp_path / "nodir" / "x.prom"), "x\n")


def test_textfile_error_after_the_temporary_file_exists(tmp_path):
    target = tmp_path / "x.prom"
    target.mkdir()  # os.replace of a file onto a directory fails
    with pytest.raises(KairosError, match="cannot write the metrics file"):
        metrics.write_textfile(str(target), "x\n")
    assert [p.name for p in tmp_path.iterdir()] == ["x.prom"]  # no temporary left


def _get(url: str) -> Tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


@pytest.fixture
def server():
    state = {"fail": False}

    def produce() -> str:
        if state["fail"]:
            raise KairosError("the ledger is unreadable")
        return metrics.render(fake_sample())

    srv = metrics.make_server(0, produce)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv, state
    srv.shutdown()
    srv.server_close()


def test_http_endpoint(server):
    srv, state = server
    host, port = srv.server_address[:2]
    assert host == "127.0.0.1"
    code, ctype, body = _get(f"http://127.0.0.1:{port}/metrics")
    assert code == 200 and ctype == metrics.CONTENT_TYPE
    parse_exposition(body)
    assert _get(f"http://127.0.0.1:{port}/")[0] == 404
    state["fail"] = True
    code, _ctype, body = _get(f"http://127.0.0.1:{port}/metrics")
    assert code == 500 and "the ledger is unreadable" in body


def test_http_port_in_use():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(KairosError, match=r"cannot listen on 127.0.0.1:\d+: already in use"):
            metrics.make_server(s.getsockname()[1], lambda: "")


def test_serve_stops_cleanly_on_ctrl_c(monkeypatch, capsys, tmp_path):
    class FakeServer:
        server_address = ("127.0.0.1", 4242)
        closed = False

        def serve_forever(self):
            raise KeyboardInterrupt

        def server_close(self):
            FakeServer.closed = True

    monkeypatch.setattr(metrics, "make_server", lambda port, produce: FakeServer())
    monkeypatch.setenv("KAIROS_CONFIG", str(tmp_path / "none.yaml"))
    assert cli.main(["metrics", "--serve", "--port", "4242"]) == 0
    assert FakeServer.closed and "http://127.0.0.1:4242/metrics" in capsys.readouterr().out


# --------------------------------------------------------------------------
# The sampler, with fakes for libvirt and /proc


def test_published_tasks_counters_and_errors():
    from kairos_libvirt.state import DomainState, VcpuState, to_xml
    st = DomainState(agent_pid=1, qemu_pid=2, vcpus=[
        VcpuState(vcpu=0, tid=10), VcpuState(vcpu=1, tid=11, error="EPERM"),
        VcpuState(vcpu=2, tid=12)])
    off = metrics.published(to_xml(st))  # introspection off: no task counts at all
    assert (off.tasks, off.introspection, off.errors) == ({}, None, {1: "EPERM"})
    st.vcpus[0].source = "introspection"
    st.introspection = {"backend": "gdbstub", "state": "running", "hits": 9, "handler_ns": 5}
    st.tasks = [{"key": "a", "tid": 100, "comm": "rt", "vcpu": 1, "policy": "fifo"},
                {"key": "b", "tid": 101, "comm": "rt", "vcpu": 1, "policy": "fifo"},
                {"key": "c", "comm": "lost"}]
    tasks, intro, errors, sources = metrics.published(to_xml(st))
    assert tasks == {0: 0, 1: 2, 2: 0} and errors == {1: "EPERM"}
    assert sources == {0: "introspection", 1: "declared", 2: "declared"}
    assert (intro["hits"], intro["handler_ns"], intro["state"]) == (9, 5, "running")
    assert metrics.published(None) == ({}, None, {}, {})


@pytest.mark.parametrize("text, value", [("12", 12), (" -3 ", -3), ("--3", None),
                                         ("1.5", None), (None, None)])
def test_int(text, value):
    assert metrics._int(text) == value


def test_sched_stats_with_fake_proc(monkeypatch):
    fake = {"se.sum_exec_runtime": "25.079674", "dl.runtime": "167843", "nr_throttled": "5"}
    monkeypatch.setattr(proc, "read_sched_stats", lambda pid, tid: fake)
    assert metrics.sched_stats(1, 2) == (25_079_674, 167_843, 5)
    fake["se.sum_exec_runtime"] = "n/a"
    assert metrics.sched_stats(1, 2)[0] is None


class FakeDomain:
    def __init__(self, name, xml="<domain/>", meta_error=None, active=True):
        self._name, self.xml, self.meta_error, self.active = name, xml, meta_error, active

    def name(self):
        return self._name

    def isActive(self):  # noqa: N802 (libvirt's name)
        return self.active

    def XMLDesc(self, flags=0):  # noqa: N802
        return self.xml

    def metadata(self, kind, uri, flags):
        if self.meta_error:
            raise self.meta_error
        return "<realtime/>"


class FakeConn:
    def __init__(self, doms=(), list_error=None):
        self.doms, self.list_error = list(doms), list_error

    def listAllDomains(self, flags):  # noqa: N802
        if self.list_error:
            raise self.list_error
        return self.doms

    def lookupByName(self, name):  # noqa: N802
        for d in self.doms:
            if d.name() == name:
                return d
        raise libvirt.libvirtError(f"Domain not found: {name}")

    def close(self):
        pass


def test_domain_names_from_ledger_and_declaring_domains():
    gone = libvirt.libvirtError("gone")
    conn = FakeConn([FakeDomain("a"), FakeDomain("b", meta_error=gone)])
    assert metrics.domain_names(["z"], conn) == ["a", "z"]  # b vanished mid-list
    assert metrics.domain_names(["z"], None) == ["z"]
    assert metrics.domain_names(["z"], FakeConn(list_error=gone)) == ["z"]


@pytest.fixture
def cfg(tmp_path):
    return HostConfig(run_dir=str(tmp_path / "run"), log_dir=str(tmp_path / "log"), enforcement_ns=0)


def test_sample_domain_that_vanished_from_libvirt(cfg):
    d = metrics.sample_domain(cfg, "kt-nosuch-domain", FakeConn(), None)
    assert "domain 'kt-nosuch-domain' not found" in d.error and not d.running and not d.vcpus


def test_sample_domain_with_an_invalid_declaration(cfg):
    xml = ("<domain type='qemu'><name>bad</name><vcpu>1</vcpu><metadata>"
           "<k:realtime xmlns:k='http://kairosvm.org/xmlns/libvirt/realtime/1.0'>"
           "<k:default policy='deadline' runtime='20ms' period='10ms'/></k:realtime>"
           "</metadata></domain>")
    entry = Entry(uuid="u", declared={}, granted={}, state="running")
    d = metrics.sample_domain(cfg, "bad", FakeConn([FakeDomain("bad", xml)]), entry)
    assert d.error.startswith("invalid declaration: ") and d.ledger_state == "running"


def test_sample_without_libvirt_and_without_a_writable_run_dir(monkeypatch):
    def fake_connect(timeout_s=0.0):
        raise LibvirtError("cannot connect to libvirt at fake:///", None)

    monkeypatch.setattr(virt, "connect", fake_connect)
    # /proc refuses mkdir: the ledger lock cannot be taken; the snapshot still reads.
    hs = metrics.sample(HostConfig(run_dir="/proc/kairos-no-such-dir"))
    assert hs.capacity_cpus is None and hs.domains == [] and hs.reserved_cpus == 0
    assert "cannot connect" in hs.libvirt_error
    assert parse_exposition(metrics.render(hs))[1][("kairosvm_libvirt_up", ())] == 0


def test_cli_metrics_textfile_and_stdout(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(metrics, "sample", lambda cfg, only=None: fake_sample())
    monkeypatch.setenv("KAIROS_CONFIG", str(tmp_path / "none.yaml"))
    assert cli.main(["metrics"]) == 0
    parse_exposition(capsys.readouterr().out)
    path = tmp_path / "k.prom"
    assert cli.main(["metrics", "--textfile", str(path)]) == 0
    assert capsys.readouterr().out == ""
    parse_exposition(path.read_text())
    assert json.dumps(metrics.render(fake_sample())) == json.dumps(path.read_text())
