"""The enforcement probe on the real kernel: a sane overrun, and no deadline bandwidth lost."""
from __future__ import annotations

import pytest

from kairos_libvirt.analysis.enforcement import Enforcement
from kairos_libvirt.config import HostConfig
from kairos_libvirt.host import dlprobe, tick

pytestmark = pytest.mark.kernel


def test_probe_overrun_is_sane_and_leaks_no_bandwidth():
    before = dlprobe.probe_free_bandwidth()
    overrun, chunks = tick.measure_overrun_ns()
    after = dlprobe.probe_free_bandwidth()
    assert after == before  # the probe thread exited while SCHED_DEADLINE
    assert chunks >= 3
    hz = tick.read_hz()
    # the kernel never lets a greedy thread run past its runtime by more than a
    # tick plus interrupt noise, and never stops it early by more than noise
    limit = (1_000_000_000 // hz if hz else 10_000_000) + 2_000_000
    assert -200_000 < overrun < limit, (overrun, chunks)


def test_enforcement_is_cached_per_boot(tmp_path):
    cfg = HostConfig(run_dir=str(tmp_path))
    first = tick.enforcement(cfg)
    assert isinstance(first, Enforcement) and first.granularity_ns > 0
    assert (tmp_path / tick.CACHE).exists()
    free = dlprobe.probe_free_bandwidth()
    again = tick.enforcement(cfg)  # from the cache: no probe
    assert again == first
    assert dlprobe.probe_free_bandwidth() == free


def test_without_probe_the_config_decides(tmp_path):
    e = tick.enforcement(HostConfig(run_dir=str(tmp_path)), measure=False)
    hz, hr = tick.read_hz(), tick.hrtick_dl()
    assert e == tick.decide(hz, hr, None)
