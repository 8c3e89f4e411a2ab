"""``python -m kairos_libvirt.analyze_cli`` (``kairosvm analyze``) through a subprocess."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kairos_libvirt import analyze_cli
from kairos_libvirt.analysis import EDP, Task, minimal_budget, schedulable

ROOT = Path(__file__).resolve().parents[2]
MS, US = 1_000_000, 1_000

THREE = """\
scheduler: edf
vcpus: 1
tasks:
  - {name: a, runtime: 1ms, period: 4ms}
  - {name: b, runtime: 2ms, period: 6ms}
  - {name: c, runtime: 3ms, period: 8ms}
"""


def cli(*args: str, text: str = THREE, tmp_path: Path) -> subprocess.CompletedProcess:
    f = tmp_path / "tasks.yaml"
    f.write_text(text)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    argv = [a if a != "TASKS" else str(f) for a in args]
    return subprocess.run([sys.executable, "-m", "kairos_libvirt.analyze_cli", *argv],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)


def test_json_contract(tmp_path):
    r = cli("TASKS", "--json", tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert {"vcpus", "total_bandwidth", "schedulable"} <= set(out)
    assert out["schedulable"] is True and out["partition"] == "pinned" and out["model"] == "edp"
    (v,) = out["vcpus"]
    assert {"vcpu", "period_us", "budget_us", "deadline_us", "bandwidth", "tasks"} <= set(v)
    assert v["vcpu"] == 0 and v["tasks"] == ["a", "b", "c"]
    for k in ("period_us", "budget_us", "deadline_us"):
        assert isinstance(v[k], int)
    assert v["budget_us"] <= v["deadline_us"] <= v["period_us"]
    assert isinstance(v["bandwidth"], float) and out["total_bandwidth"] == v["bandwidth"]
    assert v["bandwidth"] == v["budget_us"] / v["period_us"]


def test_fixed_period_gives_the_exact_least_whole_microsecond_budget(tmp_path):
    r = cli("TASKS", "--json", "--model", "prm", "--period", "1ms", tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    v = json.loads(r.stdout)["vcpus"][0]
    assert v["period_us"] == v["deadline_us"] == 1000
    tasks = [Task("a", MS, 4 * MS), Task("b", 2 * MS, 6 * MS), Task("c", 3 * MS, 8 * MS)]
    assert v["budget_us"] * US == minimal_budget(tasks, period_ns=MS, granularity_ns=US)
    q = v["budget_us"] * US
    assert not schedulable(tasks, EDP(MS, q - US, MS)).schedulable


def test_fixed_period_and_deadline(tmp_path):
    r = cli("TASKS", "--json", "--period", "1000", "--deadline", "990us", tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    v = json.loads(r.stdout)["vcpus"][0]
    assert (v["period_us"], v["deadline_us"]) == (1000, 990)
    tasks = [Task("a", MS, 4 * MS), Task("b", 2 * MS, 6 * MS), Task("c", 3 * MS, 8 * MS)]
    assert v["budget_us"] * US == minimal_budget(tasks, period_ns=MS, deadline_ns=990 * US,
                                                 granularity_ns=US)


def test_unschedulable_exits_1(tmp_path):
    text = "tasks:\n  - {name: a, runtime: 3ms, period: 4ms}\n  - {name: b, runtime: 2ms, period: 4ms}\n"
    r = cli("TASKS", "--json", "--period", "1ms", text=text, tmp_path=tmp_path)
    assert r.returncode == 1
    out = json.loads(r.stdout)
    assert out["schedulable"] is False and out["vcpus"][0]["schedulable"] is False
    r = cli("TASKS", text=text, tmp_path=tmp_path)
    assert r.returncode == 1 and "NOT schedulable" in r.stdout


def test_table_output(tmp_path):
    text = THREE.replace("vcpus: 1", "vcpus: 2") + "  - {name: d, runtime: 1ms, period: 10ms, scheduler: fp}\n"
    r = cli("TASKS", "--overhead", "10us", tmp_path=tmp_path, text=text)
    assert r.returncode == 0, r.stderr
    assert "partition assumed (worst-fit decreasing by utilisation" in r.stdout
    assert "vCPU  period" in r.stdout and "fp priorities: d=99" in r.stdout
    assert "schedulable" in r.stdout.splitlines()[-1]


def test_scheduler_override_and_fp(tmp_path):
    r = cli("TASKS", "--json", "--scheduler", "fp", "--period", "1ms", tmp_path=tmp_path)
    out = json.loads(r.stdout)
    assert out["scheduler"] == "fp" and set(out["priorities"]) == {"a", "b", "c"}
    # RM cannot do U = 23/24 here (c misses even on a whole CPU): exit 1.
    assert r.returncode == 1 and out["schedulable"] is False


@pytest.mark.parametrize("text,args,needle", [
    ("tasks: [ {name: a", [], "not valid YAML"),
    ("tasks:\n  - {name: a, runtime: 5ms, period: 4ms}\n", [],
     "task 'a': runtime '5ms' is not allowed; runtime must be <= deadline (4ms)"),
    ("tasks:\n  - {name: a, runtime: fast, period: 4ms}\n", [], "task 'a': runtime: 'fast' is not a time"),
    ("tasks:\n  - {name: a, runtime: 1ms, period: 4ms, priority: 0}\n", [],
     "task 'a': priority 0 is not allowed; use an integer 1..99"),
    (THREE, ["--period", "1500ns"], "--period '1500ns' is not allowed; the analysis works in whole microseconds"),
    (THREE, ["--deadline", "1ms"], "without a period"),
    (THREE, ["--model", "prm", "--period", "2ms", "--deadline", "1ms"], "prm model"),
    (THREE, ["--period-min", "2ms", "--period-max", "1ms"], "period bounds"),
])
def test_bad_input_exits_2_with_a_message(tmp_path, text, args, needle):
    r = cli("TASKS", *args, text=text, tmp_path=tmp_path)
    assert r.returncode == 2
    assert needle in r.stderr and "Traceback" not in r.stderr and r.stdout == ""


def test_missing_file_exits_2(tmp_path):
    r = cli(str(tmp_path / "nope.yaml"), tmp_path=tmp_path)
    assert r.returncode == 2 and "cannot read the task file: No such file" in r.stderr


def test_bad_choice_is_argparse_exit_2(tmp_path):
    r = cli("TASKS", "--model", "gps", tmp_path=tmp_path)
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_add_parser_registers_analyze(tmp_path, capsys):
    f = tmp_path / "t.yaml"
    f.write_text(THREE)
    parser = argparse.ArgumentParser(prog="kairosvm")
    sub = parser.add_subparsers(dest="command")
    analyze_cli.add_parser(sub)
    args = parser.parse_args(["analyze", str(f), "--json", "--period-min", "500us",
                              "--period-max", "2ms"])
    assert args.command == "analyze"
    assert analyze_cli.run(args) == 0
    v = json.loads(capsys.readouterr().out)["vcpus"][0]
    assert 500 <= v["period_us"] <= 2000


def test_main_in_process(tmp_path, capsys):
    f = tmp_path / "t.yaml"
    f.write_text("- not a mapping\n")
    assert analyze_cli.main([str(f)]) == 2
    assert "must be a mapping" in capsys.readouterr().err
