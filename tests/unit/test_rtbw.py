from hypothesis import given, strategies as st

from kairos_libvirt.rtbw import BW_SHIFT, parent_runtime_us, to_ratio


def test_to_ratio_matches_kernel_fixed_point():
    # kernel/sched/core.c to_ratio(): (runtime << BW_SHIFT) / period, in ns.
    assert to_ratio(10_000, 3_000) == (3_000_000 << 20) // 10_000_000 == 314572
    assert to_ratio(1_000_000, 1_000_000) == 1 << BW_SHIFT
    assert to_ratio(0, 5) == 0


def test_parent_covers_children_minimally():
    kids = [(3000, 10000), (3000, 10000)]
    r = parent_runtime_us(kids)
    assert r == 599999  # 2 * 314572 fits exactly at 599999us per second
    assert to_ratio(1_000_000, r) >= sum(to_ratio(p, c) for c, p in kids)
    assert to_ratio(1_000_000, r - 1) < sum(to_ratio(p, c) for c, p in kids)
    assert parent_runtime_us([]) == 0


@given(st.lists(st.tuples(st.integers(1, 100_000), st.integers(1, 1_000_000)), max_size=8))
def test_parent_runtime_is_the_smallest_cover(kids):
    kids = [(min(r, p), p) for r, p in kids]
    need = sum(to_ratio(p, r) for r, p in kids)
    r = parent_runtime_us(kids)
    assert to_ratio(1_000_000, r) >= need
    if r:
        assert to_ratio(1_000_000, r - 1) < need
