from fractions import Fraction

import pytest
from hypothesis import given, strategies as st

from kairos_libvirt.errors import KairosError, UnitError
from kairos_libvirt.units import (MAX_NS, format_fraction, format_ns, parse_fraction,
                                  parse_time_ns)


@pytest.mark.parametrize("text,ns", [
    ("2ms", 2_000_000), ("500us", 500_000), ("1s", 10**9), ("1500ns", 1500),
    ("2000", 2_000_000), (" 10 ms ", 10_000_000), ("1.5ms", 1_500_000), ("0.001ms", 1000),
    ("3µs", 3000), (7, 7000), ("0", 0),
])
def test_parse_time(text, ns):
    assert parse_time_ns(text) == ns


@pytest.mark.parametrize("text,fragment", [
    ("2 min", "not a time"), ("-1ms", "not a time"), ("ms", "not a time"), ("", "not a time"),
    ("1.5ns", "whole number of nanoseconds"), ("99999999999999999s", "too large"),
    (None, "not a time"), (True, "not a time"), ("1" * 100, "not a time"), ("1e3us", "not a time"),
])
def test_parse_time_errors_name_value_and_allowed(text, fragment):
    with pytest.raises(UnitError) as exc:
        parse_time_ns(text, "runtime")
    assert fragment in str(exc.value)
    assert str(exc.value).startswith("runtime:")


@pytest.mark.parametrize("ns,text", [(2_000_000, "2ms"), (10**9, "1s"), (1500, "1500ns"),
                                     (3000, "3us"), (0, "0ns")])
def test_format_ns(ns, text):
    assert format_ns(ns) == text


@given(st.integers(min_value=0, max_value=MAX_NS))
def test_format_parse_roundtrip(ns):
    assert parse_time_ns(format_ns(ns)) == ns


@given(st.text(max_size=40))
def test_fuzz_parse_time_only_our_error(text):
    try:
        parse_time_ns(text)
    except KairosError:
        pass


@pytest.mark.parametrize("text,value", [("0.5", Fraction(1, 2)), ("50%", Fraction(1, 2)),
                                        ("1/3", Fraction(1, 3)), ("1", Fraction(1)),
                                        (0.25, Fraction(1, 4))])
def test_parse_fraction(text, value):
    assert parse_fraction(text) == value


@pytest.mark.parametrize("text", ["0", "1.5", "-0.1", "abc", "1/0", "", "150%", None])
def test_parse_fraction_errors(text):
    with pytest.raises(UnitError, match="ceiling"):
        parse_fraction(text, "ceiling")


@given(st.text(max_size=20))
def test_fuzz_parse_fraction_only_our_error(text):
    try:
        parse_fraction(text)
    except KairosError:
        pass


def test_format_fraction():
    assert format_fraction(Fraction(1, 2)) == "0.5"
    assert format_fraction(Fraction(9, 5)) == "1.8"
    assert format_fraction(Fraction(1, 3)) == "0.333333"
    assert format_fraction(Fraction(2)) == "2"
