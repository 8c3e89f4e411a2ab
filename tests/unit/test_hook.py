"""The hook's Python side with a private run/log dir (no libvirt, no kernel changes)."""
from __future__ import annotations

import json

import pytest

from kairos_libvirt import hook
from kairos_libvirt.host import proc

DECL = ("<metadata><k:realtime xmlns:k='http://kairosvm.org/xmlns/libvirt/realtime/1.0'>"
        "<k:default policy='deadline' runtime='{r}' period='10ms'/></k:realtime></metadata>")


def dom(name: str, runtime: str = "1ms", vcpus: int = 2, extra: str = "") -> bytes:
    return (f"<domain type='qemu'><name>{name}</name><uuid>u-{name}</uuid><vcpu>{vcpus}</vcpu>"
            f"{DECL.format(r=runtime)}{extra}</domain>").encode()


@pytest.fixture
def env(tmp_path, monkeypatch):
    run = tmp_path / "run"
    cfgfile = tmp_path / "kairos.yaml"
    cfgfile.write_text(f"run_dir: {run}\nlog_dir: {tmp_path / 'log'}\ncapacity_share: 0.5\n"
                       "enforcement_granularity: 0\n")
    monkeypatch.setenv("KAIROS_CONFIG", str(cfgfile))
    run.mkdir()
    (run / "dl-capacity.json").write_text(json.dumps({
        "key": {"boot_id": proc.boot_id(), "online": sorted(proc.online_cpus())},
        "capacity": "100"}))
    return run


def ledger(run) -> dict:
    return json.loads((run / "ledger.json").read_text())["domains"]


def test_prepare_admits_and_release_is_idempotent(env, capsys):
    assert hook.main(["a", "prepare", "begin", "-"], stdin=dom("a")) == 0
    assert "a" in ledger(env) and (env / "domains" / "a").is_dir()
    for _ in range(2):  # stopped end, then release end: both safe
        assert hook.main(["a", "stopped", "end", "-"]) == 0
        assert hook.main(["a", "release", "end", "-"]) == 0
    assert "a" not in ledger(env) and not (env / "domains" / "a").exists()


def test_refusal_prints_the_reason_and_reserves_nothing(env, capsys):
    n = len(proc.online_cpus())  # capacity: 0.5 per CPU; a takes all of it
    assert hook.main(["a", "prepare", "begin", "-"], stdin=dom("a", "5ms", vcpus=n)) == 0
    rc = hook.main(["b", "prepare", "begin", "-"], stdin=dom("b", "5ms", vcpus=1))
    err = capsys.readouterr().err
    assert rc == 1 and "refused by admission: root domain of 2 CPUs" in err and "domain b" in err
    assert "b" not in ledger(env) and not (env / "domains" / "b").exists()
    assert (env / "metrics" / "admission_refusals").read_text().strip() == "1"
    # libvirt then sends stopped/release for b: they must not touch a's reservation.
    assert hook.main(["b", "release", "end", "-"]) == 0
    assert "a" in ledger(env)


def test_bad_declaration_message(env, capsys):
    rc = hook.main(["c", "prepare", "begin", "-"], stdin=dom("c", "20ms"))
    assert rc == 1
    assert "kairos: domain c: <default>: runtime 20ms" in capsys.readouterr().err


def test_domain_without_declaration_is_ignored(env):
    assert hook.main(["p", "prepare", "begin", "-"],
                     stdin=b"<domain><name>p</name><vcpu>1</vcpu></domain>") == 0
    assert not (env / "ledger.json").exists() or "p" not in ledger(env)


def test_pinned_deadline_vcpu_refused(env, capsys):
    rc = hook.main(["d", "prepare", "begin", "-"], stdin=dom(
        "d", extra="<cputune><vcpupin vcpu='0' cpuset='0'/></cputune>"))
    if len(proc.online_cpus()) < 2:
        pytest.skip("needs 2 CPUs to pin to a strict subset")
    assert rc == 1 and "affinity must span" in capsys.readouterr().err


def test_bad_invocations(env, capsys):
    assert hook.main(["x"]) == 2
    assert hook.main(["../etc", "prepare", "begin", "-"], stdin=b"") == 1
    assert "refusing domain name" in capsys.readouterr().err
    assert hook.main(["x", "migrate", "begin", "-"], stdin=b"") == 0  # ops we ignore


def test_broken_config_is_reported(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "k.yaml"
    bad.write_text("capacity_share: 7\n")
    monkeypatch.setenv("KAIROS_CONFIG", str(bad))
    assert hook.main(["x", "prepare", "begin", "-"], stdin=b"") == 1
    assert "capacity_share" in capsys.readouterr().err


def test_agent_pid_without_agent(env):
    from kairos_libvirt import config
    assert hook.agent_pid(config.load(), "nobody") is None
    hook.stop_agent(config.load(), "nobody")  # nothing to stop: no error


def test_refusal_counter_failure_is_logged_not_fatal(env, capsys):
    (env / "metrics").write_text("not a directory")
    rc = hook.main(["c", "prepare", "begin", "-"], stdin=dom("c", "20ms"))
    assert rc == 1 and "runtime 20ms" in capsys.readouterr().err


def test_reconnect_records_a_running_domain_even_over_capacity(env, monkeypatch):
    spawned = []
    monkeypatch.setattr(hook, "spawn_agent", lambda cfg, name: spawned.append(name))
    n = len(proc.online_cpus())
    assert hook.main(["a", "prepare", "begin", "-"], stdin=dom("a", "5ms", vcpus=n)) == 0
    # /run/kairos lost b's entry while b kept running: record it again, even over capacity.
    assert hook.main(["b", "reconnect", "begin", "-"], stdin=dom("b", "5ms", vcpus=1)) == 0
    e = ledger(env)["b"]
    assert e["granted"] == e["vcpus"] and e["introspection"]["backend"] == "off"
    assert spawned == ["b"] and (env / "domains" / "b").is_dir()


def test_the_declared_stop_budget_reaches_the_ledger_entry(env):
    xml = dom("a").decode().replace(
        "</k:realtime>", "<k:introspection backend='gdbstub' stop-share='2%' max-stop='8ms'/>"
                         "</k:realtime>")
    assert hook.main(["a", "prepare", "begin", "-"], stdin=xml.encode()) == 0
    e = ledger(env)["a"]["introspection"]
    assert e["backend"] == "gdbstub"
    assert e["budget"]["max_stop_ns"] == 8_000_000 and e["budget"]["stop_share"] in ("1/50", "0.02")
