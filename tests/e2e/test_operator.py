"""Operator commands against the real host and a real libvirtd: ``check``,
``top`` (once, and live through a pseudo-terminal), ``metrics`` (stdout,
textfile, HTTP) and ``install-units``.  Reservations stay small (1 ms every
10 ms) and every domain comes from the ``domains`` fixture, which checks that
nothing is left behind."""
from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from kairos_libvirt import check, install
from kairos_libvirt.host import cgroup

from ..unit.test_metrics import parse_exposition
from .conftest import kairosvm, status_json, virsh, wait_until

pytestmark = pytest.mark.libvirt

DL_1MS = '<kairos:default policy="deadline" runtime="1ms" period="10ms"/>'
CLI = [sys.executable, "-m", "kairos_libvirt.cli"]


def start_enforced(domains, vcpus: int = 1) -> str:
    name = domains.define(DL_1MS, vcpus=vcpus)
    virsh("start", name, check=True)

    def enforced():
        rows = status_json(name)["vcpus"]
        return len(rows) == vcpus and all(r["policy"] == "deadline" and r["tid"] for r in rows)

    wait_until(enforced, 30, 0.2, f"{name}'s vCPUs to run under SCHED_DEADLINE")
    return name


# --------------------------------------------------------------------------
# check


def test_check_reports_this_host(libvirt_env):
    res = kairosvm("check", "--json", check=False)
    doc = json.loads(res.stdout)
    results = {r["check"]: r for r in doc["results"]}
    assert res.returncode == (1 if doc["summary"]["FAIL"] else 0)
    # The session installed our hook, and libvirtd answers.
    assert results["libvirt"]["status"] == "OK"
    assert results["hook"]["status"] == "OK"
    # The probe ran on a scratch thread: admitted, or refused for want of bandwidth only.
    assert results["sched-deadline"]["status"] in ("OK", "WARN")
    facts = doc["facts"]
    with open("/proc/sys/kernel/sched_rt_runtime_us") as f:
        assert facts["sched_rt_runtime_us"] == int(f.read())
    with open("/proc/cmdline") as f:
        assert facts["cmdline"] == f.read().strip()
    assert facts["rt_group_sched"] == cgroup.rt_group_sched_available()
    assert facts["hook_installed"] is install.installed() is True
    for r in doc["results"]:
        assert r["status"] in ("OK", "WARN", "FAIL") and r["reason"]
        assert r["status"] == "OK" or r["fix"], r

    text = kairosvm("check", "--no-probe", check=False)
    assert text.returncode == res.returncode
    lines = text.stdout.splitlines()
    assert re.fullmatch(r"\d+ OK, \d+ WARN, \d+ FAIL", lines[-1])
    assert any(ln.startswith("OK    hook ") for ln in lines)
    assert any(ln.startswith("WARN  sched-deadline") and "not probed" in ln for ln in lines)


def test_real_gatherer_matches_the_kernel(libvirt_env):
    facts = check.gather(probe=False)
    assert facts.deadline is None and facts.euid == 0
    assert facts.libvirt_error is None and facts.libvirt_version
    assert facts.kvm_device == os.path.exists("/dev/kvm")
    with open("/sys/devices/system/cpu/online") as f:
        assert facts.online_cpus == f.read().strip()
    assert check.exit_code(check.evaluate(facts)) in (0, 1)


# --------------------------------------------------------------------------
# top


def test_top_once_shows_declared_and_enforced(domains):
    name = start_enforced(domains, vcpus=2)
    res = kairosvm("top", "--once", "--interval", "0.3", "--domain", name)
    lines = res.stdout.splitlines()
    assert "\x1b" not in res.stdout
    header = next(ln for ln in lines if ln.startswith(f"{name}: "))
    assert "running (qemu " in header and ", agent " in header and "ledger running" in header
    rows = [ln.split() for ln in lines if re.match(r"^\s+[01]\s+\d+\s+dl ", ln)]
    assert [r[0] for r in rows] == ["0", "1"]
    tids = {r["vcpu"]: r["tid"] for r in status_json(name)["vcpus"]}
    for r in rows:
        assert int(r[1]) == tids[int(r[0])]
        assert r[2:6] == ["dl", "1ms/10ms", "dl", "1ms/10ms"]
        assert float(r[6]) <= 15.0  # CPU% of a 10% reservation (plus rounding)
        assert r[10:] == ["-"]  # guest tasks: introspection is off


def _read_until(fd: int, pattern: str, timeout: float) -> str:
    buf = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _w, _x = select.select([fd], [], [], 0.2)
        if ready:
            chunk = os.read(fd, 65536)  # EIO here: top died; the test fails with it
            buf += chunk
            if re.search(pattern, buf.decode(errors="replace")):
                return buf.decode(errors="replace")
    raise AssertionError(f"no {pattern!r} on the terminal after {timeout}s: {buf[-2000:]!r}")


def _wait_exit(pid: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got, status = os.waitpid(pid, os.WNOHANG)
        if got:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("kairosvm top did not quit")


def test_top_live_in_a_terminal_quits_on_q(domains):
    name = start_enforced(domains)
    env = dict(os.environ, COLUMNS="160", LINES="40", TERM="xterm")
    pid, fd = pty.fork()
    if pid == 0:  # the child: kairosvm top on the pseudo-terminal
        os.execve(sys.executable, CLI + ["top", "--interval", "0.2"], env)
    try:
        screen = _read_until(fd, rf"{re.escape(name)}: running.*?\n.*?\n\s+0\s+\d+\s+"
                                 r"dl 1ms/10ms\s+dl 1ms/10ms\s+[\d.-]+", 30)
        assert "\x1b[?1049h" in screen  # alternate screen
        # A second frame comes with a CPU% (a number, not "-") once two samples exist.
        _read_until(fd, r"\n\s+0\s+\d+\s+dl 1ms/10ms\s+dl 1ms/10ms\s+\d+\.\d", 10)
        os.write(fd, b"q")
        assert _wait_exit(pid, 10) == 0
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):  # already reaped above
            pass
        os.close(fd)


# --------------------------------------------------------------------------
# metrics


def _series(text: str) -> dict:
    return parse_exposition(text)[1]


def test_metrics_stdout_textfile_and_loopback_http(domains, tmp_path):
    name = start_enforced(domains)
    lab = (("domain", name), ("vcpu", "0"))
    series = _series(kairosvm("metrics").stdout)
    assert series[("kairosvm_libvirt_up", ())] == 1
    assert series[("kairosvm_domain_running", (("domain", name),))] == 1
    assert series[("kairosvm_domain_agent_running", (("domain", name),))] == 1
    assert series[("kairosvm_vcpu_reserved_bandwidth_ratio",
                   (("domain", name), ("policy", "deadline"), ("vcpu", "0")))] == 0.1
    assert series[("kairosvm_vcpu_enforced_bandwidth_ratio",
                   (("domain", name), ("policy", "deadline"), ("vcpu", "0")))] == 0.1
    assert series[("kairosvm_vcpu_reservation_in_force", lab)] == 1
    assert series[("kairosvm_vcpu_reserved_period_seconds", lab)] == 0.01
    assert series[("kairosvm_vcpu_cpu_seconds_total", lab)] > 0
    assert series[("kairosvm_admission_refusals_total", ())] >= 0
    assert series[("kairosvm_reserved_cpus", ())] >= 0.1

    path = tmp_path / "kairosvm.prom"
    kairosvm("metrics", "--textfile", str(path))
    assert ("kairosvm_vcpu_reservation_in_force", lab) in _series(path.read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kairosvm.prom"]

    proc = subprocess.Popen(CLI + ["metrics", "--serve", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()
        m = re.search(r"serving http://(127\.0\.0\.1):(\d+)/metrics", first)
        assert m, first + proc.stderr.read()
        port = int(m.group(2))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
            assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            assert _series(r.read().decode())[("kairosvm_vcpu_reservation_in_force", lab)] == 1
        # Bound to loopback only: the listening socket's local address is 127.0.0.1.
        with open("/proc/net/tcp") as f:
            listen = [ln.split()[1] for ln in f.readlines()[1:] if ln.split()[3] == "0A"]
        assert f"0100007F:{port:04X}" in listen
        assert not any(a.endswith(f":{port:04X}") and a != f"0100007F:{port:04X}"
                       for a in listen)
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0


def test_metrics_after_the_domain_stops(domains):
    name = start_enforced(domains)
    assert ("kairosvm_domain_running", (("domain", name),)) in _series(kairosvm("metrics").stdout)
    virsh("destroy", name, check=True)  # the hook releases the ledger before this returns
    series = _series(kairosvm("metrics").stdout)
    # Gone from the ledger and from libvirt's running list: no series left for it.
    assert not [k for k in series if dict(k[1]).get("domain") == name]


# --------------------------------------------------------------------------
# install-units


def test_install_units_into_a_root(libvirt_env, tmp_path):
    (tmp_path / "etc/systemd/system").mkdir(parents=True)
    res = kairosvm("install-units", "--root", str(tmp_path))
    assert f"{tmp_path}/etc/systemd/system/kairosvm-agent@.service: installed" in res.stdout
    assert "etc/logrotate.d does not exist; no logrotate here" in res.stdout
    unit = (tmp_path / "etc/systemd/system/kairosvm-agent@.service").read_text()
    agent = os.path.join(os.path.dirname(sys.executable), "kairosvm-agent")
    assert f"\nExecStart={agent} --worker %I\n" in unit
    # The agent the unit names really is this checkout's agent, and takes --worker.
    out = subprocess.run([agent, "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "kairosvm-agent" in out.stdout and "--worker" in out.stdout
