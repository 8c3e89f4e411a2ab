"""The nested testbed, run once per session for every test module of tier 4 (marker ``nested``).

``run`` is OUT/result.json (the kvm-ud patch: tests/nested/test_kvmud.py), ``intro`` is
OUT/intro.json (the agent's runtime with the kvm-ud and gdbstub backends and the benchmark:
tests/nested/test_introspection.py); OUT/libvirt.json (libvirtd + hook + agent in L1) is read by
tests/nested/test_libvirt_in_l1.py through ``testbed_out``.  ``KAIROS_TESTBED_RESULT=/path/result.json`` reuses a
finished run (its intro.json next to it).
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import skip_or_fail

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def testbed_out(tmp_path_factory) -> Path:
    given = os.environ.get("KAIROS_TESTBED_RESULT")
    if given:
        return Path(given).parent
    if os.geteuid() != 0:
        skip_or_fail("nested", "the nested testbed needs root (QEMU 9p export of /, module build, apt-get)")
    out = tmp_path_factory.mktemp("testbed")
    try:
        p = subprocess.run([str(REPO / "scripts" / "testbed"), "--out", str(out)],
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        pytest.fail("scripts/testbed did not finish within 30 min")
    if p.returncode == 2:
        reason = (out / "skip-reason").read_text().strip() if (out / "skip-reason").exists() else p.stderr[-500:]
        skip_or_fail("nested", f"scripts/testbed cannot run here: {reason}")
    if not (out / "result.json").exists():
        pytest.fail(f"scripts/testbed produced no result (exit {p.returncode}):\n{p.stderr[-3000:]}")
    return out


@pytest.fixture(scope="session")
def run(testbed_out: Path) -> dict:
    r = json.loads((testbed_out / "result.json").read_text())
    r["_out"] = str(testbed_out)
    return r


def phase_result(testbed_out: Path, name: str) -> dict:
    """A testbed phase's OUT/NAME.json; a missing file fails (the phase did not finish)."""
    p = testbed_out / name
    if not p.exists():
        pytest.fail(f"the testbed wrote no {p} (see l1-console.log next to it)")
    return json.loads(p.read_text())


@pytest.fixture(scope="session")
def intro(testbed_out: Path) -> dict:
    return phase_result(testbed_out, "intro.json")


@pytest.fixture(scope="session")
def lv(testbed_out: Path) -> dict:
    return phase_result(testbed_out, "libvirt.json")
