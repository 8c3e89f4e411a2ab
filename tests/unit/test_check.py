"""``kairosvm check``: pure checks over fake facts, and the gatherer's error paths.

Every host here is a fake (``fake_facts``): a healthy host, changed one fact
at a time.  The real gatherer runs against this machine in
tests/e2e/test_operator.py.  The service-integration files (systemd unit,
logrotate snippet, ``install-units``) are tested at the end.
"""
from __future__ import annotations

import configparser
import dataclasses
import errno
import json
import os
import shutil
import subprocess
import sys

import pytest

from kairos_libvirt import check, cli, ops_cli
from kairos_libvirt.check import FAIL, OK, WARN, DeadlineProbe, Facts
from kairos_libvirt.errors import HostError, KairosError

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir))


def fake_facts(**changes) -> Facts:
    """A fake host with every knob right; ``changes`` break one at a time."""
    healthy = Facts(
        euid=0, cgroup_v1_cpu="/sys/fs/cgroup/cpu", cgroup_v2=False, rt_group_sched=True,
        sched_rt_runtime_us=950000, sched_rt_period_us=1000000,
        deadline=DeadlineProbe(ok=True, runtime_ns=100_000, period_ns=10_000_000),
        cmdline="BOOT_IMAGE=/vmlinuz isolcpus=managed_irq,2-3 nohz_full=2-3 rcu_nocbs=2-3",
        kernel_release="6.1.0-rt-amd64", kernel_version="#1 SMP PREEMPT_RT Debian",
        kernel_realtime_flag=True, online_cpus="0-3",
        governors={0: "performance", 1: "performance"}, smt_control="off", smt_active=False,
        libvirt_uri="qemu:///system", libvirt_version="9.0.0", hypervisor_version="QEMU 7.2.0",
        hook_path="/etc/libvirt/hooks/qemu.d/kairosvm", hook_installed=True,
        hook_python="/usr/bin/python3", hook_python_ok=True, kvm_device=True,
        kvm_patch="/sys/module/kvm/parameters/kairos_ud = Y", tuned_installed=True,
        tuned_profile="realtime-virtual-host", enforcement_ns=50_000,
        enforcement_source="HRTICK_DL on (CONFIG_HZ=250)")
    return dataclasses.replace(healthy, **changes)


def result(facts: Facts, name: str) -> check.Result:
    found = [r for r in check.evaluate(facts) if r.check == name]
    assert len(found) == 1, f"{name}: {found}"
    return found[0]


def test_a_healthy_fake_host_is_all_ok():
    results = check.evaluate(fake_facts())
    assert [r.status for r in results] == [OK] * len(results)
    assert check.exit_code(results) == 0
    assert {r.check for r in results} == {
        "libvirt", "hook", "cgroup", "rt-group-sched", "sched_rt_runtime_us", "sched-deadline",
        "dl-enforcement", "kernel-preempt", "isolcpus", "nohz_full", "rcu_nocbs", "cpufreq-governor", "smt",
        "kvm", "tuned"}


@pytest.mark.parametrize("changes, name, status, words", [
    (dict(cgroup_v1_cpu=None, cgroup_v2=True), "cgroup", OK, "cgroup v2"),
    (dict(cgroup_v1_cpu=None, cgroup_v2=False), "cgroup", WARN, "no cpu cgroup"),
    (dict(rt_group_sched=False, cgroup_v1_cpu=None, cgroup_v2=True), "rt-group-sched", WARN,
     "cgroup v2 has no RT group"),
    (dict(rt_group_sched=False), "rt-group-sched", WARN, "CONFIG_RT_GROUP_SCHED"),
    (dict(sched_rt_runtime_us=None), "sched_rt_runtime_us", FAIL, "unreadable"),
    (dict(sched_rt_runtime_us=-1), "sched_rt_runtime_us", WARN, "RT throttling is off"),
    (dict(sched_rt_runtime_us=0), "sched_rt_runtime_us", FAIL, "no real-time bandwidth"),
    (dict(deadline=None), "sched-deadline", WARN, "not probed"),
    (dict(enforcement_ns=None), "dl-enforcement", WARN, "not probed"),
    (dict(enforcement_ns=4_000_000, enforcement_source="tick: CONFIG_HZ=250, HRTICK_DL off"),
     "dl-enforcement", WARN, "overrun by up to 4 ms"),
    (dict(deadline=DeadlineProbe(ok=False, errno=errno.EBUSY)), "sched-deadline", WARN,
     "no deadline bandwidth is free"),
    (dict(deadline=DeadlineProbe(ok=False, errno=errno.EPERM), euid=1000), "sched-deadline",
     FAIL, "not root"),
    (dict(deadline=DeadlineProbe(ok=False, errno=errno.EPERM)), "sched-deadline", FAIL,
     "affinity must span"),
    (dict(deadline=DeadlineProbe(ok=False, errno=errno.EINVAL, message="Invalid argument")),
     "sched-deadline", FAIL, "cannot run SCHED_DEADLINE"),
    (dict(kernel_realtime_flag=False, kernel_version="#1 SMP PREEMPT_DYNAMIC"),
     "kernel-preempt", WARN, "not PREEMPT_RT"),
    (dict(cmdline="quiet"), "isolcpus", WARN, "not on the kernel command line"),
    (dict(cmdline="isolcpus=2-3"), "isolcpus", WARN, "out of the scheduler's domains"),
    (dict(cmdline="isolcpus=domain,managed_irq,2-3"), "isolcpus", WARN, "CPUs 2-3"),
    (dict(cmdline=None), "isolcpus", WARN, "unreadable"),
    (dict(cmdline="quiet"), "nohz_full", WARN, "scheduler tick"),
    (dict(cmdline="quiet -- rcu_nocbs=1"), "rcu_nocbs", WARN, "RCU callbacks"),
    (dict(governors={}), "cpufreq-governor", OK, "no cpufreq driver"),
    (dict(governors={0: "performance", 1: "powersave"}), "cpufreq-governor", WARN,
     "cpu1 powersave"),
    (dict(governors={i: "schedutil" for i in range(10)}), "cpufreq-governor", WARN,
     "(+2 more)"),
    (dict(smt_control=None), "smt", OK, "no SMT control"),
    (dict(smt_control="notsupported"), "smt", OK, "no SMT"),
    (dict(smt_control="on", smt_active=True), "smt", WARN, "siblings share"),
    (dict(smt_control="on", smt_active=False), "smt", OK, "no sibling active"),
    (dict(libvirt_error="cannot connect"), "libvirt", FAIL, "cannot connect"),
    (dict(hook_installed=False), "hook", FAIL, "not installed"),
    (dict(hook_python="/gone/python", hook_python_ok=False), "hook", FAIL, "/gone/python"),
    (dict(kvm_device=False), "kvm", WARN, "TCG only"),
    (dict(kvm_patch=None), "kvm", WARN, "stock KVM: introspection uses the gdbstub fallback"),
    (dict(tuned_profile="balanced"), "tuned", WARN, "active profile: balanced"),
    (dict(tuned_profile=None), "tuned", WARN, "active profile: none"),
])
def test_each_knob(changes, name, status, words):
    r = result(fake_facts(**changes), name)
    assert (r.status, words in r.reason) == (status, True), r
    if status != OK:
        assert r.fix, f"{name}: a {status} needs a fix"


def test_tuned_line_only_where_tuned_is_installed():
    assert "tuned" not in {r.check for r in check.evaluate(fake_facts(tuned_installed=False))}


def test_text_report_and_exit_code():
    results = check.evaluate(fake_facts(hook_installed=False, smt_control="on", smt_active=True))
    text = check.render_text(results)
    assert check.exit_code(results) == 1
    lines = text.splitlines()
    hook = next(i for i, ln in enumerate(lines) if ln.startswith("FAIL  hook"))
    assert "fix: kairosvm install-hook" in lines[hook + 1]
    assert lines[-1] == f"{len(results) - 2} OK, 1 WARN, 1 FAIL"
    assert not any("fix:" in ln for ln in lines if ln.startswith("OK"))


def test_json_has_results_summary_and_facts():
    facts = fake_facts(kvm_patch=None)
    doc = json.loads(json.dumps(check.to_json(facts, check.evaluate(facts))))
    assert doc["summary"] == {"OK": 14, "WARN": 1, "FAIL": 0}
    kvm = next(r for r in doc["results"] if r["check"] == "kvm")
    assert kvm["status"] == "WARN" and kvm["fix"]
    assert doc["facts"]["deadline"]["ok"] is True and doc["facts"]["governors"]["0"] == \
        "performance"


def test_kernel_params_stop_at_init_arguments():
    p = check.kernel_params("ro isolcpus=1 nohz_full=1 -- rcu_nocbs=1 init-arg")
    assert p == {"ro": "", "isolcpus": "1", "nohz_full": "1"}


@pytest.mark.parametrize("value, flags, cpus", [
    ("2-3", ["domain"], "2-3"),
    ("managed_irq,2-3,5", ["managed_irq"], "2-3,5"),
    ("nohz,domain,1", ["nohz", "domain"], "1"),
])
def test_isolcpus_flags(value, flags, cpus):
    assert check.isolcpus_parts(value) == (flags, cpus)


def test_cli_exit_code_follows_fail(monkeypatch, capsys):
    monkeypatch.setattr(check, "gather", lambda probe: fake_facts(libvirt_error="down"))
    assert cli.main(["check", "--no-probe"]) == 1
    assert "FAIL  libvirt" in capsys.readouterr().out
    monkeypatch.setattr(check, "gather", lambda probe: fake_facts())
    assert cli.main(["check", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["summary"]["FAIL"] == 0


# --------------------------------------------------------------------------
# The gatherer's small pieces (their error paths, with fake inputs)

def test_read_text_and_int_of_missing_or_garbage(tmp_path):
    assert check.read_text(str(tmp_path / "missing")) is None
    (tmp_path / "garbage").write_text("yes\n")
    assert check._read_int(str(tmp_path / "garbage")) is None
    (tmp_path / "n").write_text(" 42\n")
    assert check._read_int(str(tmp_path / "n")) == 42


def test_kvm_patch_marker_param(tmp_path):
    param = tmp_path / "kairos_ud"
    assert check.probe_kvm_patch(str(param), dev="/dev/null") is None
    param.write_text("Y\n")
    assert check.probe_kvm_patch(str(param)) == f"{param} = Y"


def test_kvm_patch_capability_probe_errors(tmp_path):
    missing = str(tmp_path / "none")
    # os.open fails (a directory cannot be opened read-write).
    assert check.probe_kvm_patch(missing, dev=str(tmp_path), cap=240) is None
    # The ioctl fails: /dev/null is no KVM device (ENOTTY).
    assert check.probe_kvm_patch(missing, dev="/dev/null", cap=240) is None


def test_kvm_patch_capability_probe_positive(tmp_path, monkeypatch):
    monkeypatch.setattr(check.fcntl, "ioctl", lambda fd, req, arg: 1)  # a fake patched KVM
    got = check.probe_kvm_patch(str(tmp_path / "none"), dev="/dev/null", cap=240)
    assert got == "/dev/null: KVM_CHECK_EXTENSION(240) = 1"


def test_deadline_probe_reports_the_kernel_refusal(monkeypatch):
    from kairos_libvirt.host import sched

    def fake_set_deadline(tid, runtime, deadline, period):
        raise HostError("sched_setattr", "Device or resource busy", errno=errno.EBUSY)

    monkeypatch.setattr(sched, "set_deadline", fake_set_deadline)
    p = check.probe_deadline()
    assert (p.ok, p.errno, p.message) == (False, errno.EBUSY, "Device or resource busy")


def test_libvirt_facts_when_libvirtd_is_unreachable(monkeypatch):
    monkeypatch.setenv("KAIROS_LIBVIRT_URI", "qemu+unix:///system?socket=/nonexistent/sock")
    facts = check._libvirt_facts()
    assert "cannot connect to libvirt" in facts["libvirt_error"]
    assert facts["libvirt_uri"].startswith("qemu+unix")


def test_hook_python_from_the_installed_hook():
    assert check._hook_python("#!/bin/sh\nKAIROS_PYTHON=/opt/venv/bin/python\n") == \
        "/opt/venv/bin/python"
    assert check._hook_python("KAIROS_PYTHON=${KAIROS_PYTHON:-python3}\n") is None
    assert check._hook_python(None) is None


def test_governors_from_a_fake_sysfs(tmp_path):
    for cpu, gov in ((0, "performance"), (1, "powersave")):
        d = tmp_path / f"cpu{cpu}" / "cpufreq"
        d.mkdir(parents=True)
        (d / "scaling_governor").write_text(gov + "\n")
    (tmp_path / "cpu2").mkdir()  # no cpufreq for this one
    (tmp_path / "cpuidle").mkdir()
    assert check._governors(str(tmp_path)) == {0: "performance", 1: "powersave"}


# --------------------------------------------------------------------------
# Service integration: systemd unit, logrotate snippet, install-units

def unit_ini(text: str) -> configparser.ConfigParser:
    ini = configparser.ConfigParser(strict=True, interpolation=None)
    ini.optionxform = str  # systemd keys are case-sensitive
    ini.read_string(text)
    return ini


def test_shipped_unit_parses_and_runs_the_agent_per_domain():
    with open(os.path.join(ROOT, "systemd", ops_cli.UNIT_NAME)) as f:
        ini = unit_ini(f.read())
    svc = ini["Service"]
    # systemd supervises: the unit runs the worker, not the agent's own supervisor.
    assert svc["ExecStart"] == f"{ops_cli.SHIPPED_AGENT} --worker %I"
    assert svc["Restart"] == "on-failure" and svc["Type"] == "simple"
    assert svc["StandardError"] == "journal" and "KillMode" not in svc  # whole cgroup
    assert "%I" in ini["Unit"]["Description"]


def test_install_units_points_exec_start_at_the_installed_agent(tmp_path, capsys):
    for d in ("etc/systemd/system", "etc/logrotate.d"):
        (tmp_path / d).mkdir(parents=True)
    assert cli.main(["install-units", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count(": installed") == 2
    unit = (tmp_path / "etc/systemd/system" / ops_cli.UNIT_NAME).read_text()
    exec_start = unit_ini(unit)["Service"]["ExecStart"].split()
    agent = os.path.join(os.path.dirname(sys.executable), "kairosvm-agent")
    assert exec_start == [agent, "--worker", "%I"] and os.access(agent, os.X_OK)
    rot = (tmp_path / "etc/logrotate.d/kairosvm").read_text()
    assert "/var/log/kairos/*.log {" in rot
    # Again: nothing to do.
    assert cli.main(["install-units", "--root", str(tmp_path)]) == 0
    assert capsys.readouterr().out.count(": up to date") == 2


def test_install_units_says_why_it_skips(tmp_path, capsys):
    assert cli.main(["install-units", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "does not exist; no systemd here: the hook forks the agent itself" in out
    assert "no logrotate here" in out
    assert not list(tmp_path.rglob("*"))


def test_install_units_refuses_a_missing_agent(tmp_path, capsys):
    assert cli.main(["install-units", "--root", str(tmp_path),
                     "--agent", str(tmp_path / "nope")]) == 1
    assert "is not an executable" in capsys.readouterr().err


def test_install_units_without_the_source_tree(monkeypatch):
    monkeypatch.setattr(ops_cli, "UNIT_NAME", "missing@.service")
    with pytest.raises(KairosError, match="needs the systemd/ directory"):
        ops_cli.units_dir()


def test_units_from_an_installed_prefix(monkeypatch, tmp_path):
    shared = tmp_path / "share" / "kairos-libvirt" / "systemd"
    shared.mkdir(parents=True)
    (shared / ops_cli.UNIT_NAME).write_text("[Service]\n")
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    monkeypatch.setattr(ops_cli, "__file__", str(tmp_path / "lib" / "kairos_libvirt" / "x.py"))
    assert ops_cli.units_dir() == str(shared)


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not "
                    "installed (the INI tests above still run)")
def test_rendered_unit_passes_systemd_analyze_verify(tmp_path):
    with open(os.path.join(ROOT, "systemd", ops_cli.UNIT_NAME)) as f:
        text = ops_cli.render_unit(f.read(), ops_cli.installed_agent())
    path = tmp_path / "kairosvm-agent@vm1.service"
    path.write_text(text)
    res = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True,
                         text=True, timeout=60)
    # verify exits 0 on unknown keys but says so on stderr: both must be clean.
    assert res.returncode == 0 and str(path) not in res.stderr, res.stderr


def test_logrotate_snippet_shape():
    with open(os.path.join(ROOT, "systemd", ops_cli.LOGROTATE_NAME)) as f:
        lines = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    assert lines[0] == "/var/log/kairos/*.log {" and lines[-1] == "}"
    body = set(lines[1:-1])
    assert {"copytruncate", "missingok", "notifempty", "compress"} <= body


@pytest.mark.parametrize("argv, message", [
    (["top", "--interval", "fast"], "is not a number of seconds"),
    (["top", "--interval", "0.01"], "allowed 0.1 to 3600"),
    (["metrics", "--serve", "--port", "http"], "is not a port number"),
    (["metrics", "--serve", "--port", "70000"], "a port is 0..65535"),
])
def test_operator_option_errors(argv, message, capsys):
    with pytest.raises(SystemExit):
        cli.main(argv)
    assert message in capsys.readouterr().err


def test_tick_enforcement_names_both_fixes():
    r = result(fake_facts(enforcement_ns=4_000_000, enforcement_source="tick"), "dl-enforcement")
    assert "echo HRTICK_DL > /sys/kernel/debug/sched/features" in r.fix
    assert "CONFIG_HZ=1000" in r.fix and "enforcement.json" in r.fix
