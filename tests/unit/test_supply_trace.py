"""The trace arithmetic of bench/supply: least supply over sliding windows, on synthetic traces."""
from __future__ import annotations

import random

import pytest

from kairos_libvirt.analysis.supply import sbf
from kairos_libvirt.analysis.trace import (Trace, compare, parse_greedy, split_flags,
                                           split_switches, squeeze, window_grid)
from kairos_libvirt.errors import AnalysisError


def brute_least(tr: Trace, t: int) -> int:
    """Least supply by trying every integer window start (small traces only)."""
    on = [1] * tr.span_ns
    for a, b in tr.gaps:
        for x in range(a, b):
            on[x] = 0
    acc = [0]
    for v in on:
        acc.append(acc[-1] + v)
    return min(acc[a + t] - acc[a] for a in range(tr.span_ns - t + 1))


def random_trace(rng: random.Random, span: int) -> Trace:
    gaps, x = [], 0
    while True:
        x += rng.randint(0, 30)
        length = rng.randint(1, 40)
        if x + length > span:
            break
        gaps.append((x, x + length))
        x += length
    return Trace(span, tuple(gaps))


def test_supply_counts_only_time_outside_gaps():
    tr = Trace(100, ((10, 20), (50, 80)))
    assert tr.on_ns == 60
    assert tr.supply(0, 100) == 60
    assert tr.supply(15, 55) == 40 - 5 - 5
    assert tr.supply(20, 50) == 30
    assert tr.longest_gap_ns == 30


def test_least_supply_matches_brute_force_on_random_traces():
    rng = random.Random(7)
    for _ in range(60):
        tr = random_trace(rng, rng.randint(50, 400))
        for t in sorted({1, 2, 5, 17, tr.span_ns // 3 or 1, tr.span_ns // 2 or 1, tr.span_ns}):
            got, start = tr.least_supply(t)
            assert got == brute_least(tr, t), (tr, t)
            assert tr.supply(start, start + t) == got


def test_worst_window_is_not_the_one_at_the_longest_gap():
    # the worst window of 30 is [50, 80] (a short gap, then the long one), not
    # the one starting at the long gap, nor one at the trace's ends
    tr = Trace(200, ((50, 52), (60, 80), (150, 160)))
    got, start = tr.least_supply(30)
    assert (got, start) == (brute_least(tr, 30), 50) == (8, 50)


def test_periodic_trace_meets_its_own_edp_bound_exactly():
    # greedy EDP(period 10, budget 3, deadline 10), worst legal pattern: budget
    # early in one period, late in the next: blackout 10 + 10 - 2*3 = 14
    gaps = ((3, 17), (20, 27), (30, 37), (40, 47))
    tr = Trace(50, gaps)
    for t in range(1, 40):
        assert tr.least_supply(t)[0] >= sbf(t, 10, 3, 10)
    assert tr.least_supply(14)[0] == 0 == sbf(14, 10, 3, 10)


def test_compare_counts_points_and_windows_below_the_model():
    tr = Trace(100, ((10, 40),))
    least, v = compare(tr, [10, 30, 50], lambda t: t // 2, lambda t: 0)
    assert least == [0, 0, 20]
    # t=10: model 5, windows inside the gap have 0; t=30: model 15, the window
    # [10,40] has 0; t=50: model 25, windows covering the whole gap have 20
    assert v.points == 3
    assert v.worst_ns == 15 and v.worst_t_ns == 30
    _, none = compare(tr, [10, 30, 50], lambda t: t // 2, lambda t: 100)
    assert none.points == none.windows == 0


def test_split_switches_keeps_the_longest_gaps():
    tr = Trace(1000, ((10, 12), (100, 400), (500, 503), (600, 900)))
    sw, irq = split_switches(tr, 2)
    assert sw.gaps == ((100, 400), (600, 900))
    assert irq.gaps == ((10, 12), (500, 503))
    assert split_switches(tr, 9)[0] == tr


def test_bad_traces_are_refused():
    with pytest.raises(AnalysisError):
        Trace(100, ((20, 30), (25, 40)))
    with pytest.raises(AnalysisError):
        Trace(100, ((90, 120),))
    with pytest.raises(AnalysisError):
        Trace(100, ()).least_supply(101)


def test_parse_greedy_output():
    text = ("runtime_ns=1 deadline_ns=2 period_ns=3 span_ns=100 gap_ns=5 gaps=2 overflow=0 "
            "small_n=0 small_sum_ns=0 small_max_ns=0 exec_ns=50 voluntary=0 involuntary=1\n"
            "10 20\n30 40\n")
    head, tr = parse_greedy(text)
    assert head["exec_ns"] == 50 and tr.gaps == ((10, 20), (30, 40))
    with pytest.raises(AnalysisError):
        parse_greedy(text.rsplit("\n", 2)[0])  # truncated: gap count wrong


def test_window_grid_is_sorted_and_bounded():
    g = window_grid(30_000_000, 10_000_000_000, 100)
    assert g == sorted(set(g)) and g[0] > 0 and g[-1] <= 5_000_000_000
    assert 30_000_000 in g


def test_parse_greedy_per_gap_switches_and_split():
    text = ("span_ns=100 gaps=3 exec_ns=50 voluntary=0 involuntary=1\n"
            "10 20 0 1\n30 60 1 0\n70 72 0 0\n")
    head, tr = parse_greedy(text)
    assert head["gap_switches"] == (0, 1, 0) and head["gap_cpus"] == (1, 0, 0)
    sw, irq = split_flags(tr, head["gap_switches"])
    assert sw.gaps == ((30, 60),) and irq.gaps == ((10, 20), (70, 72))
    with pytest.raises(AnalysisError):
        split_flags(tr, (1,))
    with pytest.raises(AnalysisError):
        parse_greedy("span_ns=100 gaps=2\n10 20 0 1\n30 40\n")  # mixed widths


def test_squeeze_cuts_interruptions_out_of_the_time_axis():
    sw = Trace(100, ((30, 60),))
    irq = Trace(100, ((10, 20), (70, 72)))
    s = squeeze(sw, irq)
    assert s.span_ns == 88 and s.gaps == ((20, 50),)
    assert s.on_ns == sw.on_ns - 12  # the interruptions are neither time nor supply
    with pytest.raises(AnalysisError):
        squeeze(Trace(100, ((15, 40),)), irq)  # overlaps a removed gap



def _tick_enforced(R: int, D: int, P: int, g: int, span: int, rng: random.Random) -> Trace:
    """The kernel's rule for a greedy server under tick enforcement (replenish_dl_entity):
    overrun d in [0, g) at each throttle, debt repaid by whole budgets at the next
    activation with the deadline moved on; chunks placed early or as late as that
    (postponed) deadline allows, as EDF under contention may."""
    runtime, dl, act, free, chunks = R, D, 0, 0, []
    while act < span:
        d = rng.choice([0, g - 1, rng.randrange(g)])
        c = runtime + d
        start = max(act, free, dl - c if rng.random() < 0.5 else act)
        chunks.append((start, start + c))
        free = start + c
        runtime, nxt = -d, dl - D + P
        while runtime <= 0:
            dl, runtime = dl + P, runtime + R
        act = nxt
    gaps, last = [], 0
    for a, b in chunks:
        if a > last and a < span:
            gaps.append((last, a))
        last = b
    return Trace(span, tuple(gaps))


@pytest.mark.parametrize("R,D,P", [(2, 10, 10), (1, 10, 10), (3, 10, 20), (4, 10, 20), (8, 20, 40)])
def test_tick_enforced_server_keeps_sbf_less_its_loss(R, D, P):
    from kairos_libvirt.analysis.enforcement import Enforcement
    k = 100  # units of 10 us: g = 4 ms
    R, D, P, g = R * k, D * k, P * k, 4 * k
    enf = Enforcement(g)
    tr = _tick_enforced(R, D, P, g, 150 * P, random.Random(R + D + P))
    below_g = max(sbf(t, P, R, D, g) - tr.least_supply(t)[0] for t in range(1, 25 * P, 23))
    worst = max(enf.delivered_sbf(t, P, R, D) - tr.least_supply(t)[0] for t in range(1, 25 * P, 23))
    assert worst <= 0
    assert enf.loss_ns(R) == g + R * (-(-g // R) - 1)
    if R < g:  # the debt repaid in whole budgets runs ahead of the EDP by more than g
        assert below_g > 0
