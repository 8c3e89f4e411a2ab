"""``kairosvm analyze TASKS.yaml``: the smallest safe vCPU servers for a guest's tasks.

TASKS.yaml::

    scheduler: edf          # default class of the tasks: edf (SCHED_DEADLINE) or fp (SCHED_FIFO/RR)
    vcpus: 2
    tasks:
      - {name: ctrl, runtime: 200us, period: 1ms}
      - {name: io,   runtime: 1ms, deadline: 4ms, period: 5ms, vcpu: 1}
      - {name: log,  runtime: 2ms, period: 20ms, scheduler: fp, priority: 10}

Times take units (ns, us, ms, s); a bare number is microseconds.  Budgets,
periods and deadlines are searched in whole microseconds, so ``budget_us``
is the exact least whole-microsecond budget.  Exit status: 0 schedulable,
1 not schedulable, 2 bad input.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict, Optional, Sequence

import yaml

from . import analysis
from .analysis.model import SCHEDULERS
from .errors import AnalysisError, KairosError
from .units import format_fraction, format_ns, parse_time_ns

US = 1000  # ns: the CLI's grid
DESCRIPTION = ("Compute, per vCPU, the smallest SCHED_DEADLINE server (budget, period, deadline) "
               "that provably meets every deadline of the guest's real-time tasks.")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``analyze`` subcommand on an argparse subparsers object."""
    parser = subparsers.add_parser(
        "analyze", help="compute the smallest safe SCHED_DEADLINE server per vCPU",
        description=DESCRIPTION,
        epilog="Exit status: 0 schedulable, 1 not schedulable, 2 bad input.")
    _configure(parser)
    return parser


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("tasks", metavar="TASKS.yaml", help="the guest's real-time tasks")
    parser.add_argument("--scheduler", choices=SCHEDULERS,
                        help="default class of the tasks (replaces the file's 'scheduler'; a "
                             "task's own 'scheduler' still wins)")
    parser.add_argument("--model", choices=("prm", "edp"), default="edp",
                        help="supply model: edp lets the deadline drop below the period "
                             "(default), prm keeps deadline = period")
    parser.add_argument("--period", metavar="P",
                        help="fix the server period (e.g. 1ms); budget_us is then the least "
                             "whole-microsecond budget for it")
    parser.add_argument("--deadline", metavar="D",
                        help="fix the server deadline too (edp; needs --period).  Without it "
                             "prm uses the period and edp picks a loose deadline that keeps "
                             "the least budget")
    parser.add_argument("--overhead", metavar="O", default="0",
                        help="cost of switching a vCPU, added once per period (default 0)")
    parser.add_argument("--period-min", metavar="P", help="lower end of the period search (default 100us)")
    parser.add_argument("--period-max", metavar="P",
                        help="upper end of the period search (default: the vCPU's shortest deadline)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _us_time(text: Optional[str], what: str) -> Optional[int]:
    """A CLI time in ns that must be whole microseconds (the output is in µs)."""
    if text is None:
        return None
    ns = parse_time_ns(text, what=what)
    if ns % US:
        raise AnalysisError(f"{what} {text!r} is not allowed; the analysis works in whole "
                            "microseconds, e.g. '1500us'")
    return ns


def _err(message: str) -> None:
    print(f"kairosvm analyze: {message}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    """Analyse ``args.tasks``; print the result; return the exit status (0, 1 or 2)."""
    try:
        with open(args.tasks, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        _err(f"{args.tasks}: cannot read the task file: {exc.strerror or exc}")
        return 2
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        _err(f"{args.tasks}: not valid YAML: {exc}")
        return 2
    try:
        taskset = analysis.parse_taskset(data, scheduler=args.scheduler)
        lo, hi = _us_time(args.period_min, "--period-min"), _us_time(args.period_max, "--period-max")
        bounds = None
        if lo is not None or hi is not None:
            bounds = (lo if lo is not None else analysis.DL_PERIOD_MIN_NS,
                      hi if hi is not None else analysis.DL_PERIOD_MAX_NS)
        iface = analysis.interface_for(
            taskset.tasks, vcpus=taskset.vcpus, model=args.model,
            period_ns=_us_time(args.period, "--period"),
            deadline_ns=_us_time(args.deadline, "--deadline"),
            overhead_ns=_us_time(args.overhead, "--overhead") or 0,
            period_bounds=bounds, granularity_ns=US)
    except KairosError as exc:
        _err(f"{args.tasks}: {exc}")
        return 2
    if args.json:
        print(json.dumps(_as_json(iface, taskset)))
    else:
        print(_as_table(iface, taskset))
    return 0 if iface.schedulable else 1


def _as_json(iface: analysis.GuestInterface, taskset: analysis.TaskSet) -> Dict[str, Any]:
    return {
        "vcpus": [{
            "vcpu": s.vcpu,
            "period_us": s.period_ns // US,
            "budget_us": s.budget_ns // US,
            "deadline_us": s.deadline_ns // US,
            "runtime_us": s.runtime_ns // US,
            "bandwidth": float(s.bandwidth),
            "bandwidth_exact": str(s.bandwidth),
            "utilisation": float(s.utilisation),
            "tasks": list(s.tasks),
            "schedulable": s.schedulable,
            "response_times_ns": dict(s.response_times_ns),
            "reason": s.reason,
        } for s in iface.servers],
        "total_bandwidth": float(iface.total_bandwidth),
        "utilisation": float(iface.utilisation),
        "schedulable": iface.schedulable,
        "model": iface.model,
        "scheduler": taskset.scheduler,
        "partition": iface.partition,
        "heuristic": iface.heuristic,
        "priorities": dict(iface.priorities),
    }


def _as_table(iface: analysis.GuestInterface, taskset: analysis.TaskSet) -> str:
    head = (f"model {iface.model}, scheduler {taskset.scheduler}, {len(iface.servers)} vCPU(s), "
            f"partition {iface.partition}")
    if iface.partition == "assumed":
        head += f" ({iface.heuristic}; pin the tasks in the guest accordingly)"
    rows = [("vCPU", "period", "budget", "deadline", "bandwidth", "utilisation", "tasks")]
    for s in iface.servers:
        rows.append((str(s.vcpu), format_ns(s.period_ns), format_ns(s.budget_ns) if s.budget_ns else "0",
                     format_ns(s.deadline_ns), format_fraction(s.bandwidth),
                     format_fraction(s.utilisation), ", ".join(s.tasks) or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = [head] + ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows]
    for s in iface.servers:
        if not s.schedulable:
            lines.append(f"vCPU {s.vcpu}: NOT schedulable: {s.reason}")
    if iface.priorities:
        lines.append("fp priorities: " + ", ".join(f"{n}={p}" for n, p in sorted(iface.priorities.items())))
    lines.append(f"total bandwidth {format_fraction(iface.total_bandwidth)} for utilisation "
                 f"{format_fraction(iface.utilisation)}: "
                 + ("schedulable" if iface.schedulable else "NOT schedulable"))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Standalone entry point: ``python -m kairos_libvirt.analyze_cli TASKS.yaml ...``."""
    parser = argparse.ArgumentParser(prog="kairosvm analyze", description=DESCRIPTION)
    _configure(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
