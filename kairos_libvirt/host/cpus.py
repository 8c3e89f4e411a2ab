"""CPU list parsing (pure), shared by host config and pinning checks."""
from __future__ import annotations

from ..errors import KairosError


def parse_cpulist(text: str) -> frozenset:
    """'0-3,6,^2' -> frozenset({0, 1, 3, 6}) (libvirt's and the kernel's syntax)."""
    out: set = set()
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        neg = part.startswith("^")
        body = part[1:] if neg else part
        lo, dash, hi = body.partition("-")
        try:
            ids = set(range(int(lo), int(hi) + 1)) if dash else {int(lo)}
        except ValueError:
            raise KairosError(f"CPU list {text!r}: {part!r} is not a CPU number or range "
                              "(write e.g. 0-3,6)") from None
        out = out - ids if neg else out | ids
    return frozenset(out)


def format_cpulist(cpus: frozenset) -> str:
    out, run = [], []
    for c in sorted(cpus):
        if run and c == run[-1] + 1:
            run.append(c)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [c]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)
