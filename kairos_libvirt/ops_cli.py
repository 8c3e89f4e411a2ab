"""Operator commands, registered on the ``kairosvm`` parser.

- ``check``: host readiness (OK / WARN / FAIL, each with reason and fix).
- ``top``: a live per-vCPU view of every real-time domain.
- ``metrics``: Prometheus exposition (stdout, ``--textfile``, ``--serve``).
- ``install-units``: the systemd agent unit and the logrotate snippet.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
from typing import List, Optional, Tuple

from .errors import KairosError

UNIT_NAME = "kairosvm-agent@.service"
LOGROTATE_NAME = "kairosvm.logrotate"
#: The agent path the shipped unit names; ``install-units`` replaces it.
SHIPPED_AGENT = "/usr/local/bin/kairosvm-agent"


# --------------------------------------------------------------------------
# check

def cmd_check(args: argparse.Namespace) -> int:
    from . import check
    facts = check.gather(probe=not args.no_probe)
    results = check.evaluate(facts)
    if args.json:
        print(json.dumps(check.to_json(facts, results), indent=2))
    else:
        print(check.render_text(results))
    return check.exit_code(results)


# --------------------------------------------------------------------------
# top

def cmd_top(args: argparse.Namespace) -> int:
    from . import config as _config
    from . import metrics, top
    cfg = _config.load()
    only = args.domain or None

    def sample() -> "metrics.HostSample":
        return metrics.sample(cfg, only)

    if args.once:
        return top.run_once(sample, args.interval, sys.stdout)
    fd = sys.stdin.fileno() if sys.stdin is not None and not sys.stdin.closed else None
    return top.run_live(sample, args.interval, sys.stdout, fd)


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0.1 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"{value:g}s: allowed 0.1 to 3600 seconds")
    return value


# --------------------------------------------------------------------------
# metrics

def cmd_metrics(args: argparse.Namespace) -> int:
    from . import config as _config
    from . import metrics
    cfg = _config.load()

    def produce() -> str:
        return metrics.render(metrics.sample(cfg))

    if args.serve:
        server = metrics.make_server(args.port, produce)
        host, port = server.server_address[:2]
        print(f"kairosvm metrics: serving http://{host}:{port}/metrics (Ctrl-C stops)",
              flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
        return 0
    text = produce()
    if args.textfile:
        metrics.write_textfile(args.textfile, text)
        return 0
    sys.stdout.write(text)
    return 0


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value}: a port is 0..65535 (0: any free port)")
    return value


# --------------------------------------------------------------------------
# install-units

def unit_dirs() -> List[str]:
    """Where the unit files may be: ``systemd/`` of a checkout (or an editable
    install), then ``PREFIX/share/kairos-libvirt/systemd`` (a wheel's data files)."""
    here = os.path.dirname(os.path.abspath(__file__))
    return [os.path.normpath(os.path.join(here, os.pardir, "systemd")),
            os.path.join(sys.prefix, "share", "kairos-libvirt", "systemd")]


def units_dir() -> str:
    for path in unit_dirs():
        if os.path.isfile(os.path.join(path, UNIT_NAME)):
            return path
    raise KairosError(f"{UNIT_NAME} is in none of {', '.join(unit_dirs())}: install-units needs "
                      "the systemd/ directory of the kairos-libvirt source tree (run it from a "
                      "checkout or an editable install)")


def installed_agent() -> str:
    """The ``kairosvm-agent`` of the interpreter running this command."""
    return os.path.join(os.path.dirname(sys.executable), "kairosvm-agent")


def render_unit(text: str, agent: str) -> str:
    """The unit with ExecStart pointing at ``agent``."""
    assert SHIPPED_AGENT in text, "programming error: the shipped unit's ExecStart changed"
    return text.replace(SHIPPED_AGENT, shlex.quote(agent))


def install_units(root: str = "/", agent: Optional[str] = None) -> List[Tuple[str, str]]:
    """Copy the unit and the logrotate snippet under ``root``.

    Returns (path, what happened) per file; a destination whose directory does
    not exist is skipped with the reason (no systemd, no logrotate).
    """
    src = units_dir()
    agent = agent or installed_agent()
    if not os.access(agent, os.X_OK):
        raise KairosError(f"{agent} is not an executable: install kairos-libvirt (pip install) "
                          "so that kairosvm-agent exists, or give --agent PATH")
    with open(os.path.join(src, UNIT_NAME)) as f:
        unit = render_unit(f.read(), agent)
    with open(os.path.join(src, LOGROTATE_NAME)) as f:
        logrotate = f.read()
    plan = [
        (os.path.join(root, "etc/systemd/system"), UNIT_NAME, unit,
         "no systemd here: the hook forks the agent itself (log in /var/log/kairos/NAME.log)"),
        (os.path.join(root, "etc/logrotate.d"), "kairosvm", logrotate,
         "no logrotate here: rotate /var/log/kairos/*.log another way"),
    ]
    done: List[Tuple[str, str]] = []
    for directory, name, text, why_not in plan:
        path = os.path.join(directory, name)
        if not os.path.isdir(directory):
            done.append((path, f"skipped: {directory} does not exist; {why_not}"))
            continue
        try:
            with open(path) as f:
                same = f.read() == text
        except FileNotFoundError:
            same = False
        if same:
            done.append((path, "up to date"))
            continue
        tmp = path + ".kairos-tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        done.append((path, "installed"))
    return done


def cmd_install_units(args: argparse.Namespace) -> int:
    done = install_units(args.root, args.agent)
    for path, what in done:
        print(f"{path}: {what}")
    unit_changed = any(p.endswith(UNIT_NAME) and w == "installed" for p, w in done)
    if unit_changed and args.root == "/":
        if os.path.isdir("/run/systemd/system") and shutil.which("systemctl"):
            subprocess.run(["systemctl", "daemon-reload"], check=False)
            print("systemd reloaded: the hook now starts kairosvm-agent@NAME.service")
        else:
            print("systemd is not running: the hook keeps forking the agent itself")
    return 0


# --------------------------------------------------------------------------

def add_parsers(sub: "argparse._SubParsersAction") -> None:
    """Register the operator subcommands; each sets ``func`` like the core ones."""
    p = sub.add_parser("check", help="is this host ready for real-time domains? "
                                     "(OK/WARN/FAIL with reasons and fixes)")
    p.add_argument("--json", action="store_true", help="results and the facts behind them")
    p.add_argument("--no-probe", action="store_true",
                   help="skip the SCHED_DEADLINE scratch-thread probe")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("top", help="live per-vCPU view of the real-time domains (q quits)")
    p.add_argument("--interval", type=_interval, default=1.0, metavar="S",
                   help="seconds between frames (default 1)")
    p.add_argument("--once", action="store_true",
                   help="print one frame (rates over --interval) and exit")
    p.add_argument("--domain", action="append", metavar="NAME", help="only this domain "
                                                                      "(repeatable)")
    p.set_defaults(func=cmd_top)

    p = sub.add_parser("metrics", help="Prometheus metrics: stdout, a textfile for "
                                       "node_exporter, or HTTP on 127.0.0.1")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--textfile", metavar="PATH",
                     help="write atomically to PATH (node_exporter's textfile collector "
                          "reads *.prom)")
    out.add_argument("--serve", action="store_true",
                     help="serve GET /metrics on 127.0.0.1:--port until interrupted")
    p.add_argument("--port", type=_port, default=9479, metavar="N",
                   help="port for --serve (default 9479)")
    p.set_defaults(func=cmd_metrics)

    p = sub.add_parser("install-units", help="install the systemd agent unit and the "
                                             "logrotate snippet (where those exist)")
    p.add_argument("--root", default="/", metavar="DIR",
                   help="install under DIR instead of / (packaging, tests)")
    p.add_argument("--agent", metavar="PATH",
                   help="kairosvm-agent for ExecStart (default: next to this Python)")
    p.set_defaults(func=cmd_install_units)
