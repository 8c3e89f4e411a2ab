"""Crashes, restarts, races and bad input: nothing lost, nothing granted, nothing left."""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import threading
import time

import pytest

from kairos_libvirt import analysis, config
from kairos_libvirt.hook import agent_pid
from kairos_libvirt.host import cgroup, proc, sched
from kairos_libvirt.ledger import Ledger
from kairos_libvirt.state import from_xml

from .conftest import (console, kairosvm, live_state, machine_rt_runtime, qemu_pid, virsh,
                       wait_until)
from .test_rt_domains import DL, enforced_state

pytestmark = pytest.mark.libvirt


def agents_for(name: str) -> list:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            argv = proc.cmdline(int(d))
            if "--worker" in argv and name in argv:
                out.append(int(d))
    return out


def test_killed_agent_comes_back_and_the_reservation_stays(domains):
    name = domains.define(DL.format(r="2ms", p="10ms"), vcpus=1)
    virsh("start", name, check=True)
    st = enforced_state(name, 1)
    cfg = config.load()
    old = agent_pid(cfg, name)
    assert old == st.agent_pid
    os.kill(old, signal.SIGKILL)
    t0 = time.monotonic()
    # The kernel keeps the reservation while no agent runs.
    assert sched.get(st.vcpus[0].tid).policy == "deadline"
    new = wait_until(lambda: (p := agent_pid(cfg, name)) not in (None, -1, old) and p, 5,
                     0.05, "a new agent")
    print(f"agent back after {time.monotonic() - t0:.2f}s")
    assert agents_for(name) == [new], "never two agents for one domain"
    wait_until(lambda: from_xml(live_state(name)).agent_pid == new, 10, what="new agent publishes")
    assert sched.get(st.vcpus[0].tid).runtime_ns == 2_000_000


def test_reconcile_restarts_a_lost_agent(domains):
    name = domains.define(DL.format(r="1ms", p="10ms"), vcpus=1)
    virsh("start", name, check=True)
    enforced_state(name, 1)
    cfg = config.load()
    # Kill the supervisor and the agent together (e.g. an OOM kill of both).
    for d in os.listdir("/proc"):
        if d.isdigit() and name in proc.cmdline(int(d)) and \
                "kairos_libvirt.agent" in " ".join(proc.cmdline(int(d))):
            os.kill(int(d), signal.SIGKILL)
    wait_until(lambda: agent_pid(cfg, name) is None, 5, what="agent gone")
    out = kairosvm("reconcile").stdout
    assert f"agents started: {name}" in out
    wait_until(lambda: agent_pid(cfg, name) not in (None, -1), 5, what="agent back")
    assert len(agents_for(name)) == 1


def test_qemu_killed_cleans_ledger_and_cgroups(domains):
    rt_groups = cgroup.rt_group_sched_available()
    body = ('<kairos:default policy="fifo" priority="20" runtime="2ms" period="10ms"/>'
            if rt_groups else DL.format(r="1ms", p="10ms"))
    before = machine_rt_runtime()
    name = domains.define(body, vcpus=1)
    virsh("start", name, check=True)
    enforced_state(name, 1)
    if rt_groups:
        assert machine_rt_runtime() > (before or 0)
    os.kill(qemu_pid(name), signal.SIGKILL)
    cfg = config.load()
    wait_until(lambda: name not in Ledger(cfg).read().domains, 15, what="ledger release")
    wait_until(lambda: agent_pid(cfg, name) is None, 10, what="agent exit")
    if rt_groups:
        assert machine_rt_runtime() == before


def _restart_libvirtd() -> None:
    pidfile = "/run/libvirtd.pid"
    with open(pidfile) as f:
        pid = int(f.read())
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not proc.pid_alive(pid), 30, what="libvirtd to exit")
    subprocess.run(["libvirtd", "-d"], check=True)
    wait_until(lambda: virsh("uri", timeout=60).returncode == 0, 60, 0.5, "libvirtd back")


@pytest.mark.skipif(os.path.isdir("/run/systemd/system"), reason="restarts libvirtd by hand")
def test_libvirtd_restart_keeps_agents_and_reservations(domains):
    name = domains.define(DL.format(r="2ms", p="10ms"), vcpus=1)
    virsh("start", name, check=True)
    st = enforced_state(name, 1)
    cfg = config.load()
    _restart_libvirtd()
    assert virsh("domstate", name).stdout.strip() == "running"
    assert sched.get(st.vcpus[0].tid).runtime_ns == 2_000_000
    wait_until(lambda: agent_pid(cfg, name) not in (None, -1), 10, what="agent after restart")
    # The agent reconnects to the new libvirtd: a change shows up in the live state.
    sched.set_deadline(st.vcpus[0].tid, 3_000_000, 10_000_000, 10_000_000)
    wait_until(lambda: (x := live_state(name)) and from_xml(x).updated != st.updated
               and from_xml(x).vcpus[0].runtime_ns == 2_000_000, 20, 0.2,
               "the agent to re-enforce and republish through the new libvirtd")


def test_concurrent_starts_admit_exactly_what_fits(domains):
    cfg = config.load()
    with Ledger(cfg).locked() as st:
        cap = Ledger(cfg).capacity(st)
    per = 1  # ms per 20 ms: (1 + a 4 ms tick overrun)/20 each, a handful fit the host test
    enf = Ledger(cfg).enforcement()

    def admitted(n: int) -> bool:
        rs = [analysis.Reservation(f"s{i}", per * 1_000_000, 20_000_000) for i in range(n)]
        return analysis.check_admission(rs, cpus=sorted(cap.cpus), limit=cap.per_cpu,
                                        capacity=cap.total, enforcement=enf,
                                        fair_server=cap.fair_server).admitted
    fits = max(n for n in range(9) if n == 0 or admitted(n))
    assert 2 <= fits < 8, fits  # the test needs some admitted and some refused
    names = [domains.define(DL.format(r=f"{per}ms", p="20ms"), vcpus=1, memory_mib=128)
             for _ in range(8)]
    results = {}

    def start(n: str) -> None:
        results[n] = virsh("start", n)

    threads = [threading.Thread(target=start, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ok = [n for n, r in results.items() if r.returncode == 0]
    refused = [n for n, r in results.items() if r.returncode != 0]
    assert len(ok) == fits, {n: r.stderr for n, r in results.items()}
    for n in refused:
        assert "refused by admission:" in results[n].stderr
    ledger = Ledger(cfg).read().domains
    assert sorted(n for n in ledger if n in names) == sorted(ok)
    # ...and the ledger matches what the kernel enforces.
    for n in ok:
        st = enforced_state(n, 1)
        k = sched.get(st.vcpus[0].tid)
        assert (k.policy, k.runtime_ns) == ("deadline", per * 1_000_000)


BAD_DECLS = [
    ("<realtime xmlns='http://kairosvm.org/xmlns/libvirt/realtime/2.0'/>", "does not know"),
    ("<k:realtime xmlns:k='http://kairosvm.org/xmlns/libvirt/realtime/1.0'>"
     "<k:default policy='deadline' period='10ms'/></k:realtime>", "needs attribute 'runtime'"),
    ("<k:realtime xmlns:k='http://kairosvm.org/xmlns/libvirt/realtime/1.0'>"
     "<k:default policy='deadline' runtime='2 fortnights' period='10ms'/></k:realtime>",
     "is not a time"),
    ("<k:realtime xmlns:k='http://kairosvm.org/xmlns/libvirt/realtime/1.0'>"
     "<k:default policy='deadline' runtime='0' period='10ms'/></k:realtime>", "minimum of 1024ns"),
    ("<k:realtime xmlns:k='http://kairosvm.org/xmlns/libvirt/realtime/1.0'>"
     "<k:default policy='deadline' runtime='1ms' period='18446744073709551616ns'/></k:realtime>",
     "too large"),
    ("<k:realtime xmlns:k='http://kairosvm.org/xmlns/libvirt/realtime/1.0'>"
     "<k:vcpu id='5' policy='deadline' runtime='1ms' period='10ms'/></k:realtime>",
     "allowed ids: 0..0"),
    ("<k:realtime xmlns:k='http://kairosvm.org/xmlns/libvirt/realtime/1.0'>"
     "<k:vcpu id='0' policy='deadline' runtime='1ms' period='10ms'/>"
     "<k:vcpu id='0' policy='deadline' runtime='1ms' period='10ms'/></k:realtime>",
     "declared twice"),
    ("<k:realtime xmlns:k='http://kairosvm.org/xmlns/libvirt/realtime/1.0'>"
     "<k:default policy='fifo' priority='0' runtime='1ms' period='10ms'/></k:realtime>", "1..99"),
    ("<k:realtime xmlns:k='http://kairosvm.org/xmlns/libvirt/realtime/1.0'>"
     "<k:default policy='fifo' priority='100' runtime='1ms' period='10ms'/></k:realtime>",
     "1..99"),
    ("<k:realtime xmlns:k='http://kairosvm.org/xmlns/libvirt/realtime/1.0'>"
     "<k:default policy='deadline' runtime='1ms' period='5s'/></k:realtime>",
     "sched_deadline_period_max_us"),
    ("<k:realtime xmlns:k='http://kairosvm.org/xmlns/libvirt/realtime/1.0'><k:default "
     "policy='deadline' runtime='1ms' period='10ms'/><!--" + "x" * 300_000 + "--></k:realtime>",
     "at most 65536 are allowed"),
]


@pytest.mark.parametrize("meta,fragment", BAD_DECLS, ids=[f"bad{i}" for i in range(len(BAD_DECLS))])
def test_bad_declarations_refused_at_start(domains, meta, fragment):
    name = domains.define("", vcpus=1)
    xml = virsh("dumpxml", name, "--inactive", check=True).stdout
    xml = xml.replace("</name>", f"</name><metadata>{meta}</metadata>", 1)
    path = f"/tmp/{name}.xml"
    with open(path, "w") as f:
        f.write(xml)
    virsh("define", path, check=True)
    res = virsh("start", name)
    assert res.returncode != 0
    assert fragment in res.stderr, res.stderr
    assert virsh("domstate", name).stdout.strip() == "shut off"


def test_shutdown_and_undefine_tear_down(domains):
    name = domains.define(DL.format(r="5ms", p="10ms"), vcpus=1)
    virsh("start", name, check=True)
    enforced_state(name, 1)
    wait_until(lambda: "KAIROS-GUEST READY" in console(name), 90, 0.5, "guest ready for ACPI")
    virsh("shutdown", name, check=True)
    wait_until(lambda: virsh("domstate", name).stdout.strip() == "shut off", 60, 0.5,
               "ACPI shutdown")
    cfg = config.load()
    wait_until(lambda: name not in Ledger(cfg).read().domains, 10, what="release")
    # A running domain undefined, then destroyed: released as well.
    virsh("start", name, check=True)
    enforced_state(name, 1)
    virsh("undefine", name, check=True)
    virsh("destroy", name, check=True)
    wait_until(lambda: name not in Ledger(cfg).read().domains, 10, what="release")


def test_run_and_log_files_are_not_world_writable(domains):
    name = domains.define(DL.format(r="1ms", p="10ms"), vcpus=1)
    virsh("start", name, check=True)
    enforced_state(name, 1)
    cfg = config.load()
    for top in (cfg.run_dir, cfg.log_dir):
        for root, dirs, files in os.walk(top):
            for p in [root] + [os.path.join(root, f) for f in files]:
                st = os.lstat(p)
                assert not st.st_mode & stat.S_IWOTH, f"{p} is world-writable"
                assert st.st_uid == 0, f"{p} is not owned by root"
