"""``kairosvm``: declare, validate, inspect and operate real-time domains."""
from __future__ import annotations

import argparse
import json
import os
import sys
from fractions import Fraction
from typing import List, Optional

from . import STATE_NS, __version__, spec
from . import config as _config
from .errors import DeclarationError, KairosError, UnitError
from .spec import Declaration, Introspection, VcpuSched
from .units import format_fraction, format_ns, parse_fraction, parse_time_ns


def _err(msg: str) -> None:
    print(f"kairosvm: error: {msg}", file=sys.stderr)


# --------------------------------------------------------------------------
# validate

def cmd_validate(args: argparse.Namespace) -> int:
    try:
        with open(args.file, "rb") as f:
            data = f.read(16 << 20)
    except OSError as exc:
        _err(f"{args.file}: {exc.strerror}")
        return 2
    try:
        root = spec.parse_xml(data, args.file)
        if root.tag == "domain":
            info = spec.parse_domain(data)
            if info.declaration is None:
                _err(f"{args.file}: domain {info.name!r} has no <realtime xmlns='{spec.DECL_NS}'> "
                     "in its <metadata>")
                return 1
            decl, nv = info.declaration, info.vcpus_max
        else:
            decl, nv = spec.declaration_from_xml(data), None
    except DeclarationError as exc:
        _err(f"{args.file}: {exc}")
        return 1
    print(f"{args.file}: valid")
    for what, s in spec.iter_scheds(decl):
        print(f"  {what}: {_describe(s)}")
    if nv is not None:
        print(f"  resolved for {nv} vCPU(s): " + ", ".join(
            f"{v}={s.policy}" for v, s in decl.resolve(nv).items()))
    i = decl.introspection
    print(f"  introspection: {i.backend}"
          + (f", ceiling {format_fraction(i.ceiling)}" if i.ceiling is not None else ""))
    return 0


def _describe(s: VcpuSched) -> str:
    bw = format_fraction(s.bandwidth)
    if s.policy == "deadline":
        return (f"deadline runtime {format_ns(s.runtime_ns)}, deadline "
                f"{format_ns(s.effective_deadline_ns)}, period {format_ns(s.period_ns)} "
                f"(bandwidth {bw})")
    return (f"{s.policy} priority {s.priority}, RT bandwidth {format_ns(s.runtime_ns)} per "
            f"{format_ns(s.period_ns)} ({bw})")


# --------------------------------------------------------------------------
# declare

def build_declaration(old: Optional[Declaration], args: argparse.Namespace,
                      nvcpus: int) -> Declaration:
    """Merge the command line into an existing declaration (pure, for tests)."""
    old = old or Declaration()
    default, vcpus = old.default, dict(old.vcpus)
    touched_sched = args.all or args.vcpu
    if touched_sched:
        if not args.policy:
            raise DeclarationError("--policy is required with --all or --vcpu "
                                   "(deadline, fifo or rr)")
        try:
            values = {
                "policy": args.policy,
                "runtime_ns": parse_time_ns(args.runtime, "--runtime") if args.runtime else None,
                "period_ns": parse_time_ns(args.period, "--period") if args.period else None,
                "deadline_ns": parse_time_ns(args.deadline, "--deadline") if args.deadline else None,
                "priority": args.priority,
            }
        except UnitError as exc:
            raise DeclarationError(str(exc)) from None
        need = spec.REQUIRED[args.policy]
        names = {"runtime": "runtime_ns", "period": "period_ns", "priority": "priority"}
        for attr in sorted(need):
            if values[names[attr]] is None:
                raise DeclarationError(f"--policy {args.policy} needs --{attr}")
        if args.policy != "deadline" and args.deadline:
            raise DeclarationError(f"--deadline does not apply to --policy {args.policy}")
        if args.policy == "deadline" and args.priority is not None:
            raise DeclarationError("--priority does not apply to --policy deadline")
        s = VcpuSched(**values)  # type: ignore[arg-type]
        if s.priority is not None and not spec.PRIO_MIN <= s.priority <= spec.PRIO_MAX:
            raise DeclarationError(f"--priority {s.priority} is out of range; a Linux real-time "
                                   f"priority is {spec.PRIO_MIN}..{spec.PRIO_MAX}")
        spec._check_sched(s, "--vcpu" if args.vcpu else "--all")
        if args.all:
            default, vcpus = s, {}
        else:
            for v in args.vcpu:
                if not 0 <= v < nvcpus:
                    raise DeclarationError(f"--vcpu {v}: the domain has {nvcpus} vCPU(s); "
                                           f"allowed: 0..{nvcpus - 1}")
                vcpus[v] = s
    intro = old.introspection
    if args.introspection is not None or args.ceiling is not None:
        ceiling = intro.ceiling
        if args.ceiling is not None:
            try:
                ceiling = parse_fraction(args.ceiling, "--ceiling")
            except UnitError as exc:
                raise DeclarationError(str(exc)) from None
        intro = Introspection(backend=args.introspection or intro.backend, ceiling=ceiling)
    decl = Declaration(default=default, vcpus=dict(sorted(vcpus.items())), introspection=intro)
    if decl.default is None and not decl.vcpus:
        raise DeclarationError("nothing to declare: give --all or --vcpu N with --policy")
    spec._check_ceiling(decl)
    # Round-trip through the XML parser: RelaxNG + every semantic rule.
    return spec.declaration_from_xml(spec.to_xml(decl))


def cmd_declare(args: argparse.Namespace) -> int:
    from . import virt
    conn = virt.connect()
    dom = virt.lookup(conn, args.domain)
    xml = virt.inactive_xml(dom)
    if args.remove:
        virt.set_declaration(dom, None)
        print(f"{args.domain}: declaration removed from the persistent configuration")
        return 0
    info = spec.parse_domain(xml, declaration=False)
    el = spec.find_element(spec.parse_xml(xml))
    old = None
    if el is not None:
        try:
            old = spec.parse_element(el)
        except DeclarationError as exc:
            print(f"{args.domain}: replacing an invalid declaration ({exc})", file=sys.stderr)
    decl = build_declaration(old, args, info.vcpus_max)
    spec.check_against_domain(decl, info)
    virt.set_declaration(dom, spec.to_xml(decl))
    running = virt.is_active(dom)
    print(f"{args.domain}: declaration written to the persistent configuration"
          + (" (takes effect at the next start)" if running else ""))
    print(spec.to_xml(decl).rstrip())
    return 0


# --------------------------------------------------------------------------
# status, ledger, hooks

def cmd_status(args: argparse.Namespace) -> int:
    from . import status, virt
    conn = virt.connect()
    dom = virt.lookup(conn, args.domain)
    xml = virt.live_xml(dom) if virt.is_active(dom) else virt.inactive_xml(dom)
    try:
        info = spec.parse_domain(xml)
    except DeclarationError as exc:
        _err(f"{args.domain}: the declaration is invalid: {exc}")
        info = None
    live = virt.get_metadata(dom, STATE_NS, live=True) if virt.is_active(dom) else None
    doc = status.collect(args.domain, info, live=live)
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=False))
    else:
        print(status.render_text(doc))
    return 0


def _declares_introspection(cfg, name: str) -> bool:
    """The domain's ledger entry asks for introspection (its agent may not have published yet)."""
    from .ledger import Ledger
    entry = Ledger(cfg).read().domains.get(name)
    return bool(entry and entry.introspection and entry.introspection.backend != "off")


def cmd_hold(args: argparse.Namespace) -> int:
    """Disarm (hold) or re-arm (unhold) a domain's guest traps, and wait for the agent to confirm.

    Why: a kvm-ud trap is a UD2 written into guest memory; ``virsh save``,
    a snapshot or a migration would carry it where no trap table catches it.
    The reservation in force stays as it is.
    """
    import time as _time
    from . import paths, virt
    from .state import from_xml
    cfg = _config.load()
    if not paths.valid_name(args.domain):
        raise KairosError(f"{args.domain!r} is not a domain name")
    hold = args.command == "hold"
    ddir = paths.domain_dir(cfg, args.domain)
    if not os.path.isdir(ddir):
        raise KairosError(f"{args.domain}: no kairos agent runs for it (is the domain running, "
                          "with a real-time declaration?)")
    flag = paths.hold_file(cfg, args.domain)
    if hold:
        fd = os.open(flag, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        os.close(fd)
    else:
        try:
            os.unlink(flag)
        except FileNotFoundError:
            pass
    from .host import wake
    wake.poke(paths.control_socket(cfg, args.domain))   # else it looks at its next re-check
    dom = virt.lookup(virt.connect(), args.domain)
    want = "held" if hold else "running"
    deadline = _time.monotonic() + args.timeout
    while True:
        xml = virt.get_metadata(dom, STATE_NS, live=True) if virt.is_active(dom) else None
        intro = (from_xml(xml).introspection if xml else None) or {}
        state = intro.get("state")
        if not intro and _declares_introspection(cfg, args.domain):
            intro = {"backend": "pending", "state": "starting"}   # the agent has not published yet
        if not intro or intro.get("backend") in (None, "off"):
            print(f"{args.domain}: introspection is off: no trap to {'hold' if hold else 're-arm'}")
            return 0
        if state == want:
            print(f"{args.domain}: introspection ({intro.get('backend')}) "
                  + ("held: no trap armed in the guest; `kairosvm unhold` re-arms"
                     if hold else "running: traps armed again"))
            return 0
        if hold and state in ("failed", "stopped"):
            # the backend is closed: closing disarms every site
            print(f"{args.domain}: introspection is {state}: no trap armed in the guest")
            return 0
        if _time.monotonic() >= deadline:
            why = (" (still attaching: the guest kernel is not up, or its symbols are "
                   "missing; while held no attach arms a site)" if state == "waiting" else "")
            raise KairosError(
                f"{args.domain}: the agent did not confirm '{want}' within {args.timeout:g} s "
                f"(introspection state: {state}{why}; see {paths.agent_log(cfg, args.domain)})"
                + (": traps may still be armed, do not save, snapshot or migrate" if hold else ""))
        _time.sleep(0.2)


def cmd_ledger(args: argparse.Namespace) -> int:
    from .ledger import Ledger, entry_bandwidth, sched_to_json
    cfg = _config.load()
    ledger = Ledger(cfg)
    with ledger.locked() as state:
        dropped = ledger.reconcile(state)
        cap = ledger.capacity(state)
        doms = dict(state.domains)
        enforcement = ledger.enforcement()
    used = sum((entry_bandwidth(e) for e in doms.values()), Fraction(0))
    doc = {"capacity": str(cap.total), "capacity_source": cap.source,
           "per_cpu": str(cap.per_cpu), "used": str(used), "free": str(cap.total - used),
           "fair_server": cap.fair_server,
           "enforcement_ns": enforcement.granularity_ns, "enforcement": enforcement.source,
           "dropped_stale": dropped,
           "domains": {n: {"state": e.state, "qemu_pid": e.qemu_pid,
                           "bandwidth": str(entry_bandwidth(e)),
                           "granted": {str(k): sched_to_json(v) for k, v in sorted(e.granted.items())}}
                       for n, e in doms.items()}}
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"capacity {format_fraction(cap.total)} CPU ({cap.source})")
    print(f"used {format_fraction(used)}, free {format_fraction(cap.total - used)}")
    print(f"enforcement granularity {format_ns(enforcement.granularity_ns)} ({enforcement.source})"
          + ("; fair servers counted" if cap.fair_server else ""))
    for n, e in sorted(doms.items()):
        print(f"  {n:<24} {e.state:<9} {format_fraction(entry_bandwidth(e)):>9} CPU")
    return 0


def cmd_reconcile(args: argparse.Namespace) -> int:
    from .hook import reconcile_host
    res = reconcile_host(_config.load())
    print(f"dropped stale entries: {', '.join(res['dropped']) or 'none'}; "
          f"agents started: {', '.join(res['agents_started']) or 'none'}")
    return 0


def cmd_install_hook(args: argparse.Namespace) -> int:
    from . import install
    changed = install.install(_config.load())
    print(f"{install.hook_path()}: {'installed, libvirtd reloaded' if changed else 'up to date'}")
    return 0


def cmd_uninstall_hook(args: argparse.Namespace) -> int:
    from . import install
    removed = install.uninstall()
    print(f"{install.hook_path()}: {'removed, libvirtd reloaded' if removed else 'not installed'}")
    return 0


# --------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kairosvm", description=__doc__)
    ap.add_argument("--version", action="version", version=f"kairos-libvirt {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("validate", help="validate a domain XML or a <realtime> element")
    p.add_argument("file")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("declare", help="write the real-time declaration into a domain's "
                                       "persistent XML")
    p.add_argument("domain")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--all", action="store_true", help="a default for every vCPU")
    who.add_argument("--vcpu", type=int, action="append", metavar="N",
                     help="this vCPU (repeatable)")
    p.add_argument("--policy", choices=spec.POLICIES)
    p.add_argument("--runtime", metavar="T", help="time with unit (ns, us, ms, s; bare = us)")
    p.add_argument("--deadline", metavar="T")
    p.add_argument("--period", metavar="T")
    p.add_argument("--priority", type=int, metavar="P", help="1..99, higher runs first")
    p.add_argument("--introspection", choices=spec.BACKENDS)
    p.add_argument("--ceiling", metavar="FRACTION", help="most bandwidth per vCPU introspection "
                                                         "may grant (0.5, 50%%, 1/2)")
    p.add_argument("--remove", action="store_true", help="remove the declaration")
    p.set_defaults(func=cmd_declare)

    p = sub.add_parser("status", help="declared vs enforced (read from the kernel) per vCPU")
    p.add_argument("domain")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    for cmd, text in (("hold", "disarm the guest traps before virsh save, snapshot or "
                               "migrate (the reservation stays)"),
                      ("unhold", "arm the guest traps again after kairosvm hold")):
        p = sub.add_parser(cmd, help=text)
        p.add_argument("domain")
        p.add_argument("--timeout", type=float, default=30.0, metavar="S",
                       help="how long to wait for the agent to confirm (default 30)")
        p.set_defaults(func=cmd_hold)

    p = sub.add_parser("ledger", help="host admission state")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ledger)

    p = sub.add_parser("reconcile", help="drop stale ledger entries, restart missing agents")
    p.set_defaults(func=cmd_reconcile)

    p = sub.add_parser("install-hook", help="install the libvirt QEMU hook and reload libvirtd")
    p.set_defaults(func=cmd_install_hook)
    p = sub.add_parser("uninstall-hook", help="remove our hook (only ours)")
    p.set_defaults(func=cmd_uninstall_hook)

    from . import analyze_cli, ops_cli
    analyze_cli.add_parser(sub).set_defaults(func=analyze_cli.run)
    ops_cli.add_parsers(sub)
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "declare" and args.remove and (args.all or args.vcpu or args.policy):
        _err("--remove takes no other declaration option")
        return 2
    try:
        return args.func(args)
    except KairosError as exc:
        _err(str(exc))
        return 1
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
