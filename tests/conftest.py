"""Test tiers and honest skips.

Markers: ``kernel`` (root + SCHED_DEADLINE), ``libvirt`` (a running libvirtd
with the project's guest), ``nested`` (the nested-KVM testbed, explicit).
A tier that cannot run here is skipped with the reason; ``KAIROS_REQUIRE``
(e.g. ``kernel,libvirt``, as CI sets it) turns those skips into failures.
"""
from __future__ import annotations

import os

import pytest


def required() -> set:
    return {t.strip() for t in os.environ.get("KAIROS_REQUIRE", "").split(",") if t.strip()}


def skip_or_fail(tier: str, reason: str) -> None:
    if tier in required():
        pytest.fail(f"tier {tier!r} is required (KAIROS_REQUIRE) but cannot run: {reason}")
    pytest.skip(reason)
