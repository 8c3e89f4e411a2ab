"""Admission arithmetic and ledger file handling (a private run dir, no kernel changes)."""
from __future__ import annotations

import json
import multiprocessing
from fractions import Fraction

import pytest

from kairos_libvirt.config import HostConfig
from kairos_libvirt.errors import AdmissionError
from kairos_libvirt.ledger import Ledger, entry_bandwidth
from kairos_libvirt.spec import VcpuSched


@pytest.fixture
def ledger(tmp_path):
    cfg = HostConfig(cpus=frozenset({0, 1}), capacity_share=Fraction(1, 2), run_dir=str(tmp_path),
                     enforcement_ns=0)
    lg = Ledger(cfg)
    # Pretend the kernel admits everything the share allows (no probe in unit tests).
    with open(tmp_path / "dl-capacity.json", "w") as f:
        from kairos_libvirt.host import proc
        json.dump({"key": {"boot_id": proc.boot_id(), "online": sorted(proc.online_cpus())},
                   "capacity": "100"}, f)
    return lg


def dl(runtime_ms, period_ms=10):
    return VcpuSched("deadline", runtime_ms * 1_000_000, period_ms * 1_000_000)


def test_capacity_from_config(ledger):
    with ledger.locked() as st:
        cap = ledger.capacity(st)
    assert cap.total == 1 and cap.per_cpu == Fraction(1, 2)
    assert "capacity_share" in cap.source


def test_admit_until_full_then_refuse_with_numbers(ledger):
    with ledger.locked() as st:
        ledger.admit(st, "a", "u1", {0: dl(3), 1: dl(3)})  # prepared, QEMU not yet up
    with ledger.locked() as st:
        with pytest.raises(AdmissionError) as exc:
            ledger.admit(st, "b", "u2", {0: dl(3), 1: dl(3)})
    msg = str(exc.value)
    assert "needs 0.6 CPU, 0.4 of 1 is free" in msg and "held by: a 0.6" in msg
    assert "deadline bandwidth 1.2 (existing 0 + requested 1.2) exceeds the capacity 1" in msg
    assert "b" not in ledger.read().domains


def test_per_vcpu_limit(ledger):
    with ledger.locked() as st:
        with pytest.raises(AdmissionError, match="one CPU offers at most 0.5"):
            ledger.admit(st, "a", "u", {0: dl(6)})


def test_release_is_idempotent(ledger):
    with ledger.locked() as st:
        ledger.admit(st, "a", "u", {0: dl(1)})
    with ledger.locked() as st:
        assert ledger.release(st, "a") is not None
        assert ledger.release(st, "a") is None
    assert ledger.read().domains == {}


def test_stale_entries_are_dropped(ledger, tmp_path):
    with ledger.locked() as st:
        for name in ("dead", "old", "new"):
            ledger.admit(st, name, "u", {0: dl(1)})
        ledger.mark_running(st, "dead", 2 ** 22 + 12345)  # QEMU gone
        st.domains["old"].since = 0  # prepared long ago, QEMU never came
        dropped = ledger.reconcile(st)
    assert sorted(dropped) == ["dead", "old"]
    assert list(ledger.read().domains) == ["new"]


def test_ledger_from_previous_boot_is_discarded(ledger, tmp_path):
    with ledger.locked() as st:
        ledger.admit(st, "a", "u", {0: dl(1)})
    data = json.loads((tmp_path / "ledger.json").read_text())
    data["boot_id"] = "another-boot"
    (tmp_path / "ledger.json").write_text(json.dumps(data))
    assert ledger.read().domains == {}


def test_torn_file_starts_over(ledger, tmp_path):
    (tmp_path / "ledger.json").write_text("{not json")
    assert ledger.read().domains == {}


def test_regrant_never_over_capacity(ledger):
    with ledger.locked() as st:
        ledger.admit(st, "a", "u", {0: dl(2)})
        ledger.regrant(st, "a", 0, dl(4))
        assert entry_bandwidth(st.domains["a"]) == Fraction(2, 5)
        ledger.admit(st, "b", "u", {0: dl(5)})
        with pytest.raises(AdmissionError, match="exceed"):
            ledger.regrant(st, "a", 0, dl(5, 8))


def _admit_one(args):
    run_dir, name = args
    lg = Ledger(HostConfig(cpus=frozenset({0, 1}), capacity_share=Fraction(1, 2),
                           run_dir=run_dir, enforcement_ns=0))
    try:
        with lg.locked() as st:
            lg.admit(st, name, "u", {0: dl(3)})
        return True
    except AdmissionError:
        return False


def test_concurrent_admissions_are_atomic(ledger, tmp_path):
    names = [(str(tmp_path), f"d{i}") for i in range(8)]
    with multiprocessing.get_context("spawn").Pool(8) as pool:
        results = pool.map(_admit_one, names)
    # capacity 1.0, each 0.3: exactly three fit whatever the interleaving.
    assert sum(results) == 3
    assert len(ledger.read().domains) == 3
