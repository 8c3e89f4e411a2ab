"""One exception tree; every message says what failed, why, and how to fix it.

Programming mistakes are ``assert``s, not members of this tree.
"""
from __future__ import annotations

from typing import Optional


class KairosError(Exception):
    """Root of every error a user of kairos-libvirt can act on."""


class UnitError(KairosError, ValueError):
    """A time or bandwidth value that cannot be understood."""


class DeclarationError(KairosError):
    """The real-time declaration in a domain's XML (or YAML) is invalid.

    ``line`` is the source line when lxml knows it.
    """

    def __init__(self, message: str, line: Optional[int] = None) -> None:
        self.line = line
        super().__init__(f"{message} (line {line})" if line else message)


class AdmissionError(KairosError):
    """The host cannot grant the requested real-time bandwidth."""


class HostError(KairosError):
    """A kernel knob (syscall, cgroup file, /proc) refused or is unsuitable.

    Carries the knob, its current value, the wanted value and a fix.
    """

    def __init__(self, knob: str, why: str, *, current: Optional[str] = None,
                 wanted: Optional[str] = None, fix: Optional[str] = None,
                 errno: Optional[int] = None) -> None:
        self.knob, self.why, self.current, self.wanted, self.fix = knob, why, current, wanted, fix
        self.errno = errno
        parts = [f"{knob}: {why}"]
        if current is not None:
            parts.append(f"current {current}")
        if wanted is not None:
            parts.append(f"wanted {wanted}")
        msg = "; ".join(parts)
        if fix:
            msg += f". Fix: {fix}"
        super().__init__(msg)


class LibvirtError(KairosError):
    """A libvirt call failed; keeps the root cause in ``exc``."""

    def __init__(self, what: str, exc: Optional[BaseException] = None) -> None:
        self.exc = exc
        super().__init__(f"{what}: {exc}" if exc is not None else what)


class AgentError(KairosError):
    """The per-domain agent could not attach or enforce."""


class AnalysisError(KairosError):
    """Task set or analysis parameters are invalid."""
