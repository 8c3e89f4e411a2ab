"""Hierarchical schedulability analysis: guest tasks -> the smallest safe per-vCPU server.

Pure: no I/O, no ``os``/``ctypes``/``libvirt``/``lxml``; times are integer
nanoseconds and every schedulability decision uses integers (bandwidths are
exact :class:`fractions.Fraction`).  The agent's single call is::

    iface = interface_for(tasks, vcpus=2, model="edp", overhead_ns=5_000)
    for s in iface.servers:   # ServerInterface(vcpu, budget_ns, period_ns, deadline_ns, ...)
        ...                   # sched_setattr(runtime=s.runtime_ns, deadline=s.deadline_ns,
                              #               period=s.period_ns)

See docs/analysis.md for the model, the formulas and their sources.
"""
from __future__ import annotations

from .admission import (AdmissionReport, CpuLoad, Reservation, admit, check_admission,
                        dl_bandwidth_limit, reservations_from)
from .demand import dbf, last_deadline, rbf, utilisation, workload
from .interface import (DL_MIN_RUNTIME_NS, DL_PERIOD_MAX_NS, DL_PERIOD_MIN_NS, GuestInterface,
                        ServerInterface, interface_for, minimal_budget)
from .model import Task, TaskSet, parse_taskset, with_priorities
from .partition import HEURISTIC, partition
from .schedulability import (Verdict, check_bound, edf_schedulable, fp_response_times,
                             schedulable)
from .supply import EDP, dedicated, prm, sbf, sbf_inverse

__all__ = [
    # task model
    "Task", "TaskSet", "parse_taskset", "with_priorities",
    # demand and supply
    "dbf", "rbf", "workload", "last_deadline", "utilisation",
    "EDP", "prm", "dedicated", "sbf", "sbf_inverse",
    # exact tests
    "Verdict", "schedulable", "edf_schedulable", "fp_response_times", "check_bound",
    # minimal interfaces (the agent's entry point is interface_for)
    "interface_for", "minimal_budget", "GuestInterface", "ServerInterface",
    "DL_MIN_RUNTIME_NS", "DL_PERIOD_MIN_NS", "DL_PERIOD_MAX_NS",
    # partitioning of unpinned tasks
    "partition", "HEURISTIC",
    # host admission arithmetic
    "Reservation", "CpuLoad", "AdmissionReport", "check_admission", "admit",
    "dl_bandwidth_limit", "reservations_from",
]
