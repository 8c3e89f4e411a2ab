"""The task model and TASKS.yaml parsing: every bad value names task, field, value and the rule."""
from __future__ import annotations

import pytest

from kairos_libvirt.analysis import Task, parse_taskset, with_priorities
from kairos_libvirt.errors import AnalysisError

OK = {"name": "a", "runtime": "1ms", "period": "2ms"}


def with_task(**fields):
    task = dict(OK)
    task.update(fields)
    return {"tasks": [{k: v for k, v in task.items() if v is not None}]}


def test_parse_a_full_task_set():
    ts = parse_taskset({"scheduler": "fp", "vcpus": 2, "tasks": [
        {"name": "a", "runtime": "200us", "period": "1ms", "priority": 50, "vcpu": 1},
        {"name": "b", "runtime": 500, "deadline": "4ms", "period": "5ms", "scheduler": "edf"},
    ]})
    assert ts.scheduler == "fp" and ts.vcpus == 2
    a, b = ts.tasks
    assert (a.runtime_ns, a.period_ns, a.deadline_ns, a.priority, a.vcpu, a.scheduler) == \
        (200_000, 1_000_000, 1_000_000, 50, 1, "fp")
    # a bare number is microseconds; a task's own scheduler wins over the default
    assert (b.runtime_ns, b.deadline_ns, b.scheduler) == (500_000, 4_000_000, "edf")


def test_cli_scheduler_replaces_the_file_default_only():
    data = {"scheduler": "edf", "tasks": [dict(OK), dict(OK, name="b", scheduler="edf")]}
    ts = parse_taskset(data, scheduler="fp")
    assert [t.scheduler for t in ts.tasks] == ["fp", "edf"]


def test_defaults():
    ts = parse_taskset({"tasks": [OK]})
    assert ts.scheduler == "edf" and ts.vcpus == 1 and ts.tasks[0].deadline_ns == 2_000_000


@pytest.mark.parametrize("data,match", [
    ([1, 2], "must be a mapping"),
    ({"tasks": [OK], "bogus": 1}, "unknown top-level field 'bogus'"),
    ({"scheduler": "rm", "tasks": [OK]}, "scheduler 'rm' is not allowed; use 'edf' or 'fp'"),
    ({"vcpus": 0, "tasks": [OK]}, "vcpus 0 is not allowed"),
    ({"vcpus": "2", "tasks": [OK]}, "vcpus '2' is not allowed"),
    ({"tasks": []}, "give a non-empty list"),
    ({}, "tasks None is not allowed"),
    ({"tasks": ["x"]}, "task #0: 'x' is not allowed; each task is a mapping"),
    ({"tasks": [{"runtime": "1ms", "period": "2ms"}]}, "task #0: name None"),
    (with_task(prio=3), "task 'a': field 'prio' is not allowed; allowed fields: name"),
    (with_task(runtime=None), "task 'a': runtime is missing"),
    (with_task(runtime="1 parsec"), "task 'a': runtime: '1 parsec' is not a time"),
    (with_task(runtime=True), "task 'a': runtime: True is not a time"),
    (with_task(period="1.5ns"), "task 'a': period: '1.5ns' is not a whole number"),
    (with_task(runtime="0"), "task 'a': runtime '0' is not allowed; use a time > 0"),
    (with_task(deadline="0ms"), "task 'a': deadline '0ms' is not allowed"),
    (with_task(runtime="3ms"), r"task 'a': runtime '3ms' is not allowed; runtime must be <= deadline \(2ms\)"),
    (with_task(deadline="3ms"), r"task 'a': deadline '3ms' is not allowed; deadline must be >= runtime and <= period \(2ms\)"),
    (with_task(priority=100), r"task 'a': priority 100 is not allowed; use an integer 1..99"),
    (with_task(priority="high"), "task 'a': priority 'high' is not allowed"),
    (with_task(vcpu=2), r"task 'a': vcpu 2 is not allowed; use a vCPU number 0..0"),
    (with_task(vcpu=-1), "task 'a': vcpu -1 is not allowed"),
    (with_task(scheduler="cfs"), "task 'a': scheduler 'cfs' is not allowed"),
    ({"tasks": [OK, OK]}, "task 'a': name is used twice"),
])
def test_bad_task_files_name_the_problem(data, match):
    with pytest.raises(AnalysisError, match=match):
        parse_taskset(data)


@pytest.mark.parametrize("kw,match", [
    (dict(name=""), "task name ''"),
    (dict(runtime_ns=1.5), "runtime 1.5"),
    (dict(period_ns=0), "period 0"),
    (dict(vcpu=True), "vcpu True"),
])
def test_task_validates_itself(kw, match):
    args = dict(name="a", runtime_ns=1, period_ns=2)
    args.update(kw)
    with pytest.raises(AnalysisError, match=match):
        Task(**args)


def test_task_utilisation_and_defaults():
    t = Task("a", 1, 4)
    assert t.deadline_ns == 4 and t.scheduler == "edf" and t.utilisation == 0.25


def test_given_priorities_are_kept_and_missing_ones_all_or_none():
    a = Task("a", 1, 4, priority=7, scheduler="fp")
    assert with_priorities([a]) == (a,)
    with pytest.raises(AnalysisError, match="'b': priority is missing"):
        with_priorities([a, Task("b", 1, 4, scheduler="fp")])
    # edf tasks never need one
    e = Task("e", 1, 4)
    assert with_priorities([a, e]) == (a, e)
