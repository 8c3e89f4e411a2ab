"""Where a kvm-ud trap spends its time in L1's KVM: the function_graph tracer around the #UD.

Issue 13 asks for the time between the #UD and the resumed guest, split into the
record, the fetch, the ring and the eventfd.  The kernel's own function_graph tracer
(tracefs; Debian's 6.1 has it, not the function profiler) times every call below
``kairos_ud_handle_ud`` (the patch's entry from the SVM/VMX #UD intercept) with
``funcgraph-tail`` naming each closing brace, so the per-function durations parse
without tracking the call tree.  What is not in ``kairos_ud_handle_ud`` is the exit
and the entry (the floor: a CPUID exit, measured in the same L2).

The tracer costs each traced call an entry and an exit record, so durations are
inflated by about one record per function below; the split, not the sum, is the
figure.  Pure parsing in :func:`parse`; :class:`Graph` writes tracefs (L1 only).
"""
from __future__ import annotations

import os
import re
import statistics
from typing import Dict, List

ROOT_FN = "kairos_ud_handle_ud"
#: Lines with a duration: a leaf "name();" or a closing "} /* name */" (funcgraph-tail).
_LINE = re.compile(r"^\s*\d+\)\s*[+!#*@$ ]?\s*([\d.]+) us\s*\|\s*(?:([^(|]+?)\(\);|\}\s*/\*\s*(.+?)\s*\*/)")


def _name(raw: str) -> str:
    """``kairos_trap [kvm]`` and ``kairos_trap.isra.0`` are kairos_trap."""
    return raw.split(" [")[0].split(".")[0]


def parse(text: str) -> Dict[str, Dict[str, float]]:
    """Per function under the root: calls, median and mean duration (us)."""
    per: Dict[str, List[float]] = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        name = _name(m.group(2) or m.group(3))
        per.setdefault(name, []).append(float(m.group(1)))
    return {k: {"calls": len(v), "median_us": round(statistics.median(v), 2),
                "mean_us": round(statistics.fmean(v), 2)} for k, v in per.items()}


class Graph:
    """function_graph below ROOT_FN, interrupts left out, at most ``depth`` levels."""

    def __init__(self, depth: int = 5) -> None:
        self.dir = "/sys/kernel/tracing"
        if not os.path.exists(os.path.join(self.dir, "current_tracer")):
            os.makedirs(self.dir, exist_ok=True)
            os.system(f"mount -t tracefs nodev {self.dir} 2>/dev/null")
        self.depth = depth

    def _w(self, name: str, value: str) -> None:
        with open(os.path.join(self.dir, name), "w") as f:
            f.write(value)

    def start(self) -> None:
        self._w("tracing_on", "0")
        self._w("current_tracer", "nop")
        self._w("trace", "")
        self._w("buffer_size_kb", "16384")
        self._w("set_graph_function", ROOT_FN)
        self._w("max_graph_depth", str(self.depth))
        self._w("options/funcgraph-tail", "1")
        self._w("options/funcgraph-irqs", "0")
        self._w("current_tracer", "function_graph")
        self._w("tracing_on", "1")

    def stop(self) -> str:
        self._w("tracing_on", "0")
        with open(os.path.join(self.dir, "trace")) as f:
            text = f.read()
        self._w("current_tracer", "nop")
        self._w("set_graph_function", "")
        self._w("trace", "")
        return text
