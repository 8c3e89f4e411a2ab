"""The guest's real-time tasks, as the analysis sees them.

A task is a sporadic task (C, D, T) with C <= D <= T, all integer
nanoseconds.  ``scheduler`` says which guest scheduling class runs it:
``"edf"`` is SCHED_DEADLINE (EDF inside the guest), ``"fp"`` is
SCHED_FIFO/SCHED_RR (fixed priority, Linux convention 1..99, higher number
runs first).  Validation lives here so every later stage can assume sane
input and keep its ``assert``s for programming mistakes.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..errors import AnalysisError, UnitError
from ..units import format_ns, parse_time_ns

SCHEDULERS = ("edf", "fp")
#: Linux SCHED_FIFO/SCHED_RR priorities (``sched_get_priority_min/max``).
PRIORITY_MIN, PRIORITY_MAX = 1, 99
#: Fields a task may carry in TASKS.yaml.
TASK_FIELDS = ("name", "runtime", "deadline", "period", "priority", "vcpu", "scheduler")
TOP_FIELDS = ("scheduler", "vcpus", "tasks")


def _bad(task: str, what: str, value: object, allowed: str) -> AnalysisError:
    """One message shape: which task, which field, which value, what is allowed."""
    return AnalysisError(f"task {task!r}: {what} {value!r} is not allowed; {allowed}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Task:
    """One guest real-time task: WCET ``runtime_ns`` every ``period_ns``, due ``deadline_ns``.

    ``deadline_ns`` defaults to the period (implicit deadline).  ``priority``
    matters only for ``scheduler="fp"``; ``vcpu`` pins the task (None: the
    analysis picks a vCPU and says the partition is assumed).
    """

    name: str
    runtime_ns: int
    period_ns: int
    #: None on input means "= period"; after construction it is always an int.
    deadline_ns: int = None  # type: ignore[assignment]
    priority: Optional[int] = None
    vcpu: Optional[int] = None
    scheduler: str = "edf"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise AnalysisError(f"task name {self.name!r} is not allowed; use a non-empty string")
        n = self.name
        if self.deadline_ns is None:
            object.__setattr__(self, "deadline_ns", self.period_ns)
        for what in ("runtime_ns", "period_ns", "deadline_ns"):
            v = getattr(self, what)
            if not _is_int(v) or v <= 0:
                raise _bad(n, what.replace("_ns", ""), v, "use a whole number of nanoseconds > 0")
        if self.runtime_ns > self.deadline_ns:
            raise _bad(n, "runtime", format_ns(self.runtime_ns),
                       f"runtime must be <= deadline ({format_ns(self.deadline_ns)})")
        if self.deadline_ns > self.period_ns:
            raise _bad(n, "deadline", format_ns(self.deadline_ns),
                       f"deadline must be >= runtime and <= period ({format_ns(self.period_ns)})")
        if self.priority is not None and (not _is_int(self.priority)
                                          or not PRIORITY_MIN <= self.priority <= PRIORITY_MAX):
            raise _bad(n, "priority", self.priority,
                       f"use an integer {PRIORITY_MIN}..{PRIORITY_MAX} (higher runs first)")
        if self.vcpu is not None and (not _is_int(self.vcpu) or self.vcpu < 0):
            raise _bad(n, "vcpu", self.vcpu, "use a vCPU number >= 0")
        if self.scheduler not in SCHEDULERS:
            raise _bad(n, "scheduler", self.scheduler,
                       "use 'edf' (SCHED_DEADLINE) or 'fp' (SCHED_FIFO/SCHED_RR)")

    @property
    def utilisation(self) -> Fraction:
        """C/T, exact."""
        return Fraction(self.runtime_ns, self.period_ns)


@dataclass(frozen=True)
class TaskSet:
    """What TASKS.yaml declares: the default scheduler, the vCPU count, the tasks."""

    scheduler: str
    vcpus: int
    tasks: Tuple[Task, ...] = field(default_factory=tuple)


def _time(value: object, task: str, what: str) -> int:
    try:
        return parse_time_ns(value, what=f"task {task!r}: {what}")
    except UnitError as exc:
        raise AnalysisError(str(exc)) from exc


def parse_taskset(data: object, *, scheduler: Optional[str] = None) -> TaskSet:
    """Turn the mapping loaded from TASKS.yaml into a validated :class:`TaskSet`.

    ``scheduler`` (the CLI's ``--scheduler``) replaces the file's top-level
    default; a task's own ``scheduler`` key still wins, so one file can mix
    SCHED_DEADLINE and SCHED_FIFO tasks.  Times take units; a bare number is
    microseconds.
    """
    if not isinstance(data, Mapping):
        raise AnalysisError(f"the task file must be a mapping with keys {', '.join(TOP_FIELDS)}; "
                            f"got {type(data).__name__}")
    unknown = sorted(str(k) for k in data if k not in TOP_FIELDS)
    if unknown:
        raise AnalysisError(f"unknown top-level field {unknown[0]!r}; allowed: {', '.join(TOP_FIELDS)}")
    default = data.get("scheduler", "edf") if scheduler is None else scheduler
    if default not in SCHEDULERS:
        raise AnalysisError(f"scheduler {default!r} is not allowed; use 'edf' or 'fp'")
    vcpus = data.get("vcpus", 1)
    if not _is_int(vcpus) or vcpus < 1:
        raise AnalysisError(f"vcpus {vcpus!r} is not allowed; use an integer >= 1")
    raw = data.get("tasks")
    if not isinstance(raw, list) or not raw:
        raise AnalysisError(f"tasks {raw!r} is not allowed; give a non-empty list of tasks")
    tasks: List[Task] = []
    seen: Dict[str, int] = {}
    for i, item in enumerate(raw):
        tasks.append(_parse_task(item, i, default, vcpus))
        name = tasks[-1].name
        if name in seen:
            raise AnalysisError(f"task {name!r}: name is used twice (tasks #{seen[name]} and #{i}); "
                                "names must be unique")
        seen[name] = i
    return TaskSet(scheduler=default, vcpus=vcpus, tasks=tuple(tasks))


def _parse_task(item: object, index: int, default: str, vcpus: int) -> Task:
    if not isinstance(item, Mapping):
        raise AnalysisError(f"task #{index}: {item!r} is not allowed; each task is a mapping "
                            f"with {', '.join(TASK_FIELDS)}")
    name = item.get("name")
    if not isinstance(name, str) or not name.strip():
        raise AnalysisError(f"task #{index}: name {name!r} is not allowed; use a non-empty string")
    unknown = sorted(str(k) for k in item if k not in TASK_FIELDS)
    if unknown:
        raise _bad(name, "field", unknown[0], f"allowed fields: {', '.join(TASK_FIELDS)}")
    for required in ("runtime", "period"):
        if required not in item:
            raise AnalysisError(f"task {name!r}: {required} is missing; give it with a unit, e.g. '2ms'")
    kw: Dict[str, Any] = {
        "name": name,
        "runtime_ns": _time(item["runtime"], name, "runtime"),
        "period_ns": _time(item["period"], name, "period"),
        "scheduler": item.get("scheduler", default),
    }
    if item.get("deadline") is not None:
        kw["deadline_ns"] = _time(item["deadline"], name, "deadline")
    if item.get("priority") is not None:
        kw["priority"] = item["priority"]
    if item.get("vcpu") is not None:
        v = item["vcpu"]
        if not _is_int(v) or not 0 <= v < vcpus:
            raise _bad(name, "vcpu", v, f"use a vCPU number 0..{vcpus - 1} (the guest has {vcpus})")
        kw["vcpu"] = v
    for what in ("runtime_ns", "period_ns", "deadline_ns"):
        if what in kw and kw[what] == 0:
            raise _bad(name, what[:-3], item[what[:-3]], "use a time > 0")
    return Task(**kw)


def with_priorities(tasks: Sequence[Task]) -> Tuple[Task, ...]:
    """Give fp tasks deadline-monotonic priorities when none of them has one.

    Either every fp task names its priority or none does; a mix would make us
    guess how a given priority compares with an invented one.  Equal deadlines
    share a level, and more than 99 distinct deadlines share levels too; the
    analysis treats equal priority as mutual interference, so sharing is safe.
    """
    fp = [t for t in tasks if t.scheduler == "fp"]
    given = [t for t in fp if t.priority is not None]
    if len(given) == len(fp):
        return tuple(tasks)
    if given:
        missing = next(t for t in fp if t.priority is None)
        raise AnalysisError(f"task {missing.name!r}: priority is missing; give every fp task a "
                            f"priority {PRIORITY_MIN}..{PRIORITY_MAX}, or none (deadline-monotonic)")
    levels = sorted({t.deadline_ns for t in fp})  # shortest deadline first
    span = PRIORITY_MAX - PRIORITY_MIN + 1
    prio = {d: PRIORITY_MAX - (i * span) // len(levels) if len(levels) > span else PRIORITY_MAX - i
            for i, d in enumerate(levels)}
    return tuple(replace(t, priority=prio[t.deadline_ns]) if t.scheduler == "fp" else t
                 for t in tasks)
