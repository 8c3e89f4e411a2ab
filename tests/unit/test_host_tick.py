"""Parsing the kernel config and sched_features, and choosing the granularity (pure parts of host/tick)."""
from __future__ import annotations

import gzip

import pytest

from kairos_libvirt.host import tick


def test_config_hz_is_read_from_the_config_text():
    text = "# CONFIG_HZ_100 is not set\nCONFIG_HZ_250=y\nCONFIG_HZ=250\nCONFIG_SCHED_HRTICK=y\n"
    assert tick.parse_config_hz(text) == 250
    assert tick.parse_config_hz("CONFIG_HZ_1000=y\nCONFIG_HZ=1000\n") == 1000


def test_config_without_hz_or_with_garbage_is_unknown():
    assert tick.parse_config_hz("CONFIG_HZ_250=y\n") is None  # the choice, not the value
    assert tick.parse_config_hz("CONFIG_HZ=fast\n") is None
    assert tick.parse_config_hz("CONFIG_HZ=0\n") is None
    assert tick.parse_config_hz("") is None


def test_read_hz_tries_each_file_gzip_or_plain(tmp_path):
    gz = tmp_path / "config.gz"
    with gzip.open(gz, "wt") as f:
        f.write("CONFIG_HZ=300\n")
    plain = tmp_path / "config-6.1"
    plain.write_text("CONFIG_HZ=100\n")
    missing = str(tmp_path / "nope.gz")
    assert tick.read_hz([missing, str(gz), str(plain)]) == 300
    assert tick.read_hz([missing, str(plain)]) == 100
    assert tick.read_hz([missing]) is None
    broken = tmp_path / "broken.gz"
    broken.write_bytes(b"not gzip")
    assert tick.read_hz([str(broken), str(plain)]) == 100


def test_sched_features_words():
    on = "GENTLE_FAIR_SLEEPERS START_DEBIT HRTICK HRTICK_DL DOUBLE_TICK"
    off = "GENTLE_FAIR_SLEEPERS NO_HRTICK NO_HRTICK_DL DOUBLE_TICK"
    assert tick.parse_sched_features(on) is True
    assert tick.parse_sched_features(off) is False
    assert tick.parse_sched_features("HRTICK NO_DOUBLE_TICK") is None  # HRTICK alone is CFS's


def test_hrtick_dl_unreadable_is_unknown(tmp_path):
    assert tick.hrtick_dl(str(tmp_path / "features")) is None
    f = tmp_path / "features"
    f.write_text("NO_HRTICK NO_HRTICK_DL\n")
    assert tick.hrtick_dl(str(f)) is False


def test_chunks_split_only_at_long_steps():
    us = 1000
    steps = [(0, 10 * us)] * 10 + [(0, 300 * us)] + [(0, 10 * us)] * 5 + [(0, 5_000 * us)] \
        + [(0, 20 * us)] * 3
    # the 300 us step is off the CPU but does not end the chunk; the 5 ms one does
    assert tick.chunks_from_steps(steps) == [150 * us, 60 * us]


def test_decide_from_config_and_measurement():
    tick_ns = 4_000_000
    e = tick.decide(250, False, None)
    assert e.granularity_ns == tick_ns and "HRTICK_DL off" in e.source
    e = tick.decide(250, True, None)
    assert e.granularity_ns < tick_ns and "HRTICK_DL on" in e.source
    # unreadable features, but the probe's overruns are far below a tick: HRTICK_DL is on
    e = tick.decide(250, None, (30_000, 12))
    assert e.granularity_ns == max(30_000, tick.HRTICK_SLACK_NS) and "measured" in e.source
    # overruns of most of a tick: tick enforcement
    e = tick.decide(250, None, (3_400_000, 14))
    assert e.granularity_ns == tick_ns and "3400 us" in e.source
    # too few chunks to conclude anything below a tick
    assert tick.decide(250, None, (30_000, 1)).granularity_ns == tick_ns
    # a measured overrun beyond the configured tick raises the granularity
    e = tick.decide(250, None, (4_700_000, 14))
    assert e.granularity_ns == 4_700_000 and "raised" in e.source
    # no config: assume the longest tick (HZ=100)
    e = tick.decide(None, None, None)
    assert e.granularity_ns == 10_000_000 and "unknown" in e.source


def test_the_admins_granularity_wins_for_every_caller(tmp_path, monkeypatch):
    from kairos_libvirt.config import HostConfig
    from kairos_libvirt.ledger import Ledger
    monkeypatch.setattr(tick, "measure_overrun_ns", lambda *a, **k: pytest.fail("no probe"))
    cfg = HostConfig(run_dir=str(tmp_path), enforcement_ns=250_000)
    got = tick.enforcement(cfg)
    assert (got.granularity_ns, got.source) == (250_000, "enforcement_granularity in kairos.yaml")
    assert Ledger(cfg).enforcement() == got      # the ledger and bench/supply: one figure
