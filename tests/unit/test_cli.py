"""kairosvm commands that need no libvirt: validate, declare's merge logic, parser."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from fractions import Fraction

import pytest

from kairos_libvirt import cli
from kairos_libvirt.errors import DeclarationError
from kairos_libvirt.spec import VcpuSched

ROOT = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir)


def ns(**kw) -> argparse.Namespace:
    base = dict(all=False, vcpu=None, policy=None, runtime=None, deadline=None, period=None,
                priority=None, introspection=None, ceiling=None)
    base.update(kw)
    return argparse.Namespace(**base)


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kairos_libvirt.cli", *args],
                          capture_output=True, text=True, cwd=ROOT)


def test_declare_all_then_override_one_vcpu():
    d = cli.build_declaration(None, ns(all=True, policy="deadline", runtime="2ms",
                                       period="10ms"), 2)
    assert d.default == VcpuSched("deadline", 2_000_000, 10_000_000)
    d = cli.build_declaration(d, ns(vcpu=[1], policy="fifo", runtime="3ms", period="10ms",
                                    priority=20), 2)
    assert d.default is not None and d.vcpus[1].priority == 20
    d = cli.build_declaration(d, ns(introspection="gdbstub", ceiling="40%"), 2)
    assert d.introspection.backend == "gdbstub" and d.introspection.ceiling == Fraction(2, 5)
    assert d.vcpus[1].policy == "fifo"  # untouched by an introspection-only change


@pytest.mark.parametrize("kw,fragment", [
    (dict(all=True), "--policy is required"),
    (dict(all=True, policy="deadline", period="10ms"), "needs --runtime"),
    (dict(all=True, policy="fifo", runtime="1ms", period="10ms"), "needs --priority"),
    (dict(all=True, policy="fifo", runtime="1ms", period="10ms", priority=120), "1..99"),
    (dict(all=True, policy="fifo", runtime="1ms", period="10ms", priority=5, deadline="2ms"),
     "--deadline does not apply"),
    (dict(all=True, policy="deadline", runtime="1ms", period="10ms", priority=5),
     "--priority does not apply"),
    (dict(all=True, policy="deadline", runtime="1 hour", period="10ms"), "not a time"),
    (dict(all=True, policy="deadline", runtime="20ms", period="10ms"), "runtime <= deadline"),
    (dict(vcpu=[3], policy="deadline", runtime="1ms", period="10ms"), "allowed: 0..1"),
    (dict(all=True, policy="deadline", runtime="5ms", period="10ms", ceiling="0.2"),
     "ceiling 0.2 is below"),
    (dict(all=True, policy="deadline", runtime="1ms", period="10ms", ceiling="lots"),
     "not a fraction"),
    (dict(introspection="gdbstub"), "nothing to declare"),
])
def test_declare_errors(kw, fragment):
    with pytest.raises(DeclarationError, match=fragment):
        cli.build_declaration(None, ns(**kw), 2)


def test_validate_command(tmp_path):
    ok = run("validate", os.path.join(ROOT, "xml", "examples", "mixed-per-vcpu.xml"))
    assert ok.returncode == 0 and "valid" in ok.stdout and "fifo priority 50" in ok.stdout
    bad = tmp_path / "bad.xml"
    bad.write_text("<domain><name>x</name><vcpu>1</vcpu><metadata><k:realtime xmlns:k="
                   "'http://kairosvm.org/xmlns/libvirt/realtime/1.0'><k:vcpu id='3' "
                   "policy='deadline' runtime='1ms' period='10ms'/></k:realtime></metadata>"
                   "</domain>")
    res = run("validate", str(bad))
    assert res.returncode == 1 and "allowed ids: 0..0" in res.stderr
    none = tmp_path / "plain.xml"
    none.write_text("<domain><name>x</name></domain>")
    res = run("validate", str(none))
    assert res.returncode == 1 and "has no <realtime" in res.stderr
    res = run("validate", str(tmp_path / "missing.xml"))
    assert res.returncode == 2 and "No such file" in res.stderr
    assert "Traceback" not in res.stderr


def test_remove_takes_no_other_option():
    res = run("declare", "x", "--remove", "--all")
    assert res.returncode == 2 and "--remove takes no other" in res.stderr


def test_help_lists_commands():
    out = run("--help").stdout
    for c in ("validate", "declare", "status", "ledger", "install-hook", "uninstall-hook",
              "analyze", "check", "top", "metrics", "reconcile"):
        assert c in out


def test_analyze_through_kairosvm(tmp_path):
    import json
    f = tmp_path / "tasks.yaml"
    f.write_text("scheduler: edf\nvcpus: 1\ntasks:\n  - {name: a, runtime: 2ms, period: 10ms}\n")
    res = run("analyze", str(f), "--period", "10ms", "--model", "prm", "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["schedulable"] and doc["vcpus"][0]["period_us"] == 10000
    # PRM with period 10ms for C=2ms,T=10ms: the exact minimal budget (blackout 2(Π-Θ)).
    assert doc["vcpus"][0]["budget_us"] == 6000
