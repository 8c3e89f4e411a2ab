"""Times and bandwidth fractions as users write them.

Times take a unit (``ns``, ``us``, ``ms``, ``s``); a bare number is
microseconds, as in ``cpu.rt_runtime_us``.  Values are parsed exactly
(``decimal``) into integer nanoseconds: no float ever decides anything.
"""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction

from .errors import UnitError

NS_PER = {"ns": 1, "us": 1_000, "ms": 1_000_000, "s": 1_000_000_000}
#: The kernel stores times in u64 nanoseconds but refuses anything with the
#: top bit set (``__checkparam_dl``); keep every value below 2**63.
MAX_NS = (1 << 63) - 1
_TIME_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ns|us|µs|ms|s)?\s*$")
_MAX_TEXT = 64


def parse_time_ns(text: object, what: str = "time") -> int:
    """Parse ``'2ms'``, ``'500us'``, ``'1.5ms'`` or ``'2000'`` (= 2000 us) to ns.

    Raises :class:`UnitError` naming ``what``, the value and what is allowed.
    """
    if isinstance(text, bool):
        raise UnitError(f"{what}: {text!r} is not a time; use a number with a unit ns, us, ms or s")
    if isinstance(text, int):
        text = str(text)
    if not isinstance(text, str) or len(text) > _MAX_TEXT:
        shown = repr(text) if not isinstance(text, str) else repr(text[:_MAX_TEXT] + "…")
        raise UnitError(f"{what}: {shown} is not a time; use a number with a unit ns, us, ms or s "
                        "(a bare number is microseconds)")
    m = _TIME_RE.match(text)
    if not m:
        raise UnitError(f"{what}: {text!r} is not a time; use a non-negative number with a unit "
                        "ns, us, ms or s, e.g. '2ms' (a bare number is microseconds)")
    unit = (m.group(2) or "us").replace("µ", "u")
    try:
        value = Decimal(m.group(1)) * NS_PER[unit]
    except InvalidOperation as exc:  # pragma: no cover - regex excludes it
        raise UnitError(f"{what}: {text!r} is not a number") from exc
    if value != value.to_integral_value():
        raise UnitError(f"{what}: {text!r} is not a whole number of nanoseconds")
    ns = int(value)
    if ns > MAX_NS:
        raise UnitError(f"{what}: {text!r} is too large; the kernel takes at most {MAX_NS} ns")
    return ns


def format_ns(ns: int) -> str:
    """Shortest exact spelling: 2000000 -> '2ms', 1500 -> '1500ns'."""
    for unit in ("s", "ms", "us"):
        if ns and ns % NS_PER[unit] == 0:
            return f"{ns // NS_PER[unit]}{unit}"
    return f"{ns}ns"


def parse_fraction(text: object, what: str = "fraction") -> Fraction:
    """Parse a bandwidth share such as ``'0.5'``, ``'50%'`` or ``'1/2'`` exactly."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        text = str(text)
    if not isinstance(text, str) or len(text) > _MAX_TEXT:
        raise UnitError(f"{what}: {text!r} is not a fraction; write e.g. 0.5, 50% or 1/2")
    s = text.strip()
    try:
        if s.endswith("%"):
            value = Fraction(Decimal(s[:-1].strip())) / 100
        else:
            value = Fraction(s)
    except (ValueError, ZeroDivisionError, InvalidOperation) as exc:
        raise UnitError(f"{what}: {text!r} is not a fraction; write e.g. 0.5, 50% or 1/2") from exc
    if value <= 0 or value > 1:
        raise UnitError(f"{what}: {text!r} is outside (0, 1]; a share of one CPU is "
                        "greater than 0 and at most 1")
    return value


def format_fraction(value: Fraction) -> str:
    """A short decimal for display (exact when it terminates within 6 places)."""
    scaled = value * 1_000_000
    if scaled.denominator == 1:
        s = f"{Decimal(int(scaled)) / Decimal(1_000_000):f}"
        return s.rstrip("0").rstrip(".") if "." in s else s
    return f"{float(value):.6f}"
