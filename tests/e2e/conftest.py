"""End-to-end tier: a real libvirtd, real TCG guests, our hook and agent.

Every domain a test makes is destroyed and undefined afterwards, and a
teardown check fails the test if anything of kairos is left: an agent, a
``/run/kairos/domains/NAME`` directory, a ledger entry, or libvirt's
``machine`` cgroup not back at its original RT runtime.
"""
from __future__ import annotations

import fcntl
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Callable, Dict, Iterator, List, Optional

import pytest

from kairos_libvirt import STATE_NS, config, install
from kairos_libvirt.hook import agent_pid
from kairos_libvirt.host import cgroup, proc
from kairos_libvirt.ledger import Ledger
from tests.conftest import skip_or_fail
from tests.guestdomain import GUEST_DIR, decl, domain_xml  # noqa: F401 (re-exported)

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir))
CONSOLE_DIR = "/var/log/kairos"
_counter = itertools.count()
_SESSION_LOCK: Optional[int] = None


def virsh(*args: str, check: bool = False, timeout: float = 120,
          input: Optional[str] = None) -> subprocess.CompletedProcess:
    res = subprocess.run(["virsh", "-q", "-c", "qemu:///system", *args], capture_output=True,
                         text=True, timeout=timeout, input=input)
    if check and res.returncode != 0:
        raise AssertionError(f"virsh {' '.join(args)} failed: {res.stderr.strip()}")
    return res


def kairosvm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "kairos_libvirt.cli", *args],
                         capture_output=True, text=True, timeout=120)
    if check and res.returncode != 0:
        raise AssertionError(f"kairosvm {' '.join(args)} failed ({res.returncode}): "
                             f"{res.stderr.strip()}")
    return res


def wait_until(pred: Callable[[], object], timeout: float = 30, interval: float = 0.1,
               what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def libvirt_env() -> Dict[str, str]:
    if os.geteuid() != 0:
        skip_or_fail("libvirt", "needs root")
    if not shutil.which("virsh"):
        skip_or_fail("libvirt", "virsh is not installed (run scripts/setup-host)")
    if virsh("uri", timeout=60).returncode != 0:
        skip_or_fail("libvirt", "libvirtd is not running (run scripts/setup-host)")
    for f in ("vmlinuz", "initrd.img"):
        if not os.path.exists(os.path.join(GUEST_DIR, f)):
            skip_or_fail("libvirt", f"the test guest is not built: {GUEST_DIR}/{f} (run guest/build)")
    # One end-to-end session at a time on a host: they share libvirtd, the
    # ledger and the CPUs' real-time capacity.  The lock dies with the process.
    global _SESSION_LOCK
    _SESSION_LOCK = os.open("/run/kairos-e2e.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(_SESSION_LOCK, fcntl.LOCK_EX)
    cfg = config.load()
    install.install(cfg)  # this checkout's hook, pointing at this interpreter
    os.makedirs(CONSOLE_DIR, exist_ok=True)
    return {"guest": GUEST_DIR}


def machine_rt_runtime() -> Optional[int]:
    mount = cgroup.cpu_v1_mount()
    if not mount or not os.path.exists(os.path.join(mount, "machine", "cpu.rt_runtime_us")):
        return None
    return cgroup.read_rt(os.path.join(mount, "machine"))[0]


def assert_no_residue(name: str, machine_rt_before: Optional[int]) -> None:
    cfg = config.load()
    wait_until(lambda: agent_pid(cfg, name) is None, 10, what=f"agent of {name} to exit")
    assert not os.path.exists(os.path.join(cfg.run_dir, "domains", name)), \
        f"/run/kairos/domains/{name} left behind"
    assert name not in Ledger(cfg).read().domains, f"ledger entry of {name} left behind"
    assert not [p for p in _agent_pids() if name in " ".join(proc.cmdline(p))], \
        f"an agent process for {name} is still running"
    if machine_rt_before is not None and not Ledger(cfg).read().domains:
        assert machine_rt_runtime() == machine_rt_before, "machine cpu.rt_runtime_us not restored"


def _agent_pids() -> List[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit() and "kairos_libvirt.agent" in " ".join(proc.cmdline(int(d))):
            out.append(int(d))
    return out


class Domains:
    """Factory for test domains; cleans them up and checks for residue."""

    def __init__(self, test_name: str) -> None:
        self.names: List[str] = []
        self.prefix = "kt-" + "".join(c if c.isalnum() else "-" for c in test_name)[:24]

    def define(self, decl_body: str = "", **kw) -> str:
        name = f"{self.prefix}-{next(_counter)}"
        xml = domain_xml(name, decl(decl_body) if decl_body else "", **kw)
        path = f"/tmp/{name}.xml"
        with open(path, "w") as f:
            f.write(xml)
        virsh("define", path, check=True)
        self.names.append(name)
        return name

    def cleanup(self) -> None:
        for name in self.names:
            virsh("destroy", name)
            virsh("undefine", name)


def _tail(path: str, lines: int) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except FileNotFoundError:
        return "(none)\n"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed e2e test shows its domains' agent logs and consoles (CI keeps nothing else)."""
    outcome = yield
    rep = outcome.get_result()
    d = getattr(item, "_kairos_domains", None)
    if rep.when == "call" and rep.failed and d is not None:
        cfg = config.load()
        for name in d.names:
            rep.sections.append((f"agent log of {name} (last 40 lines)",
                                 _tail(os.path.join(cfg.log_dir, f"{name}.log"), 40)))
            rep.sections.append((f"console of {name} (last 15 lines)",
                                 _tail(os.path.join(CONSOLE_DIR, f"{name}.console"), 15)))


@pytest.fixture
def domains(libvirt_env, request) -> Iterator[Domains]:
    before = machine_rt_runtime()
    d = Domains(request.node.name)
    request.node._kairos_domains = d
    try:
        yield d
    finally:
        d.cleanup()
    for name in d.names:
        assert_no_residue(name, before)


def live_state(name: str) -> Optional[str]:
    res = virsh("metadata", name, STATE_NS, "--live")
    return res.stdout if res.returncode == 0 else None


def status_json(name: str) -> dict:
    return json.loads(kairosvm("status", name, "--json").stdout)


def qemu_pid(name: str) -> int:
    return wait_until(lambda: proc.qemu_pid(name), 10, what=f"QEMU of {name}")


def console(name: str) -> str:
    try:
        with open(os.path.join(CONSOLE_DIR, f"{name}.console"), errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""
