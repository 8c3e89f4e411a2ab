"""Unit tests of bench/rtquality's pure part (bench/rtquality.d/rtqlib.py)."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir,
                                "bench", "rtquality.d"))

import rtqlib  # noqa: E402


def test_quantiles_of_a_histogram():
    h = rtqlib.Hist()
    h.add_pairs("100:98 2000:1")
    h.add_pairs("9000:1")
    assert h.n == 100
    assert h.quantile(0.5) == 100
    assert h.quantile(0.99) == 2000
    assert h.quantile(1.0) == 9000
    assert rtqlib.Hist().quantile(0.5) is None


def test_console_lines_fold_into_a_run():
    lines = [(10.0, "\x1b[0mKAIROS-GUEST READY uptime=2.5 kernel=x cpus=1"),
             (10.1, "RTQ CLOCK clocksource=hpet available=tsc,hpet clockevent=lapic hres=1"),
             (10.2, "RTQ START uptime=3.00"),
             (10.2, "RTQ CLK 3.00"), (11.3, "RTQ CLK 4.00"),
             (12.0, "RTQ STOP uptime=4.50 cyclictest_rc=0 rtapp_rc=0"),
             (12.1, "RTQ CT n=3 sum_us=300 max_us=150 skipped=0 warm_n=1 span_us=16000"),
             (12.1, "RTQ CTH 100:2 150:1"), (12.1, "RTQ CTS 150 -"),
             (12.2, "RTQ RA n=2 miss=1 slack_min_us=-50 run_max_us=600 wu_lat_max_us=90 warm_n=0"),
             (12.2, "RTQ RAH -50:1 3000:1"), (12.3, "RTQ ERR rt-app boom"), (12.4, "RTQ END")]
    g = rtqlib.parse_console(lines)
    assert g.ready == 10.0 and g.ended
    assert g.clock["clocksource"] == "hpet"
    assert g.start == (10.2, 3.0) and g.stop == (12.0, 4.5)
    assert g.ct["n"] == "3" and g.ct_hist.n == 3 and g.ct_series == [150, None]
    assert g.ra_slack.quantile(0.01) == -50
    assert g.errors == ["rt-app boom"]


def test_stopped_outside_is_the_growth_of_host_minus_guest():
    # guest stands still for 0.4 s between 2 and 3 s of host time; one mark arrives late
    pairs = [(0.0, 0.0), (1.0, 1.0), (2.0, 2.0), (3.4, 3.0), (4.4, 4.0), (5.6, 5.1), (6.4, 6.0)]
    assert abs(rtqlib.stopped_outside(pairs, 0.0, 6.4) - 0.4) < 1e-9
    assert rtqlib.stopped_outside(pairs, 0.0, 1.0) == 0.0
    assert rtqlib.stopped_outside([], 0.0, 1.0) is None


def test_server_changes_count_only_inside_the_window():
    a = ("deadline", 0, 5_000_000, 10_000_000, 10_000_000)
    b = ("deadline", 0, 2_000_000, 4_000_000, 4_000_000)
    samples = [(0.0, 0, a), (5.0, 0, b), (8.0, 0, a)]
    n, seen = rtqlib.server_changes(samples, 6.0, 10.0)
    assert n == 1
    assert {s["server"]: s["seconds"] for s in seen} == {"deadline 2ms/4ms/4ms": 2.0,
                                                         "deadline 5ms/10ms/10ms": 2.0}
    assert rtqlib.server_changes(samples, 0.0, 10.0)[0] == 2


def test_counter_delta_between_two_times():
    samples = [(1.0, {"handler_ns": 10}), (3.0, {"handler_ns": 40}), (5.0, {"handler_ns": 100})]
    assert rtqlib.counter_delta(samples, "handler_ns", 3.5, 5.0) == 60
    assert rtqlib.counter_delta(samples, "handler_ns", 0.0, 3.0) == 40  # from attach (0)
    assert rtqlib.counter_delta([], "handler_ns", 0.0, 1.0) is None
