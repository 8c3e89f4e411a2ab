"""RT group bandwidth for fifo/rr vCPUs: libvirt's cgroups, parent first.

Layout (cgroup v1, DESIGN.md §2): ``<cpu>/machine/qemu-ID-NAME.libvirt-qemu/vcpuK``.
``machine`` is shared by all domains and outlives them, so its original value
is saved in the ledger and restored when the last RT-group domain leaves.
All writes happen under the ledger lock.
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

from . import rtbw
from .errors import AdmissionError, HostError
from .host import cgroup
from .ledger import Entry, LedgerState, RtGroups
from .units import format_fraction


def _domain_runtime(vcpus: Dict[int, Tuple[int, int]]) -> int:
    return rtbw.parent_runtime_us([(r, p) for r, p in vcpus.values()])


def machine_need_us(state: LedgerState, machine: str, exclude: Optional[str] = None) -> int:
    """Runtime (us per 1 s) ``machine`` needs for every domain's RT groups.

    Counts our ledger's domains (except ``exclude``) plus any other child of
    ``machine`` that holds RT runtime (set by someone else: respect it).
    """
    children = []
    ours = set()
    for name, e in state.domains.items():
        rt = e.rt
        if rt is None:
            continue
        ours.add(os.path.normpath(rt.domain_dir))
        if name != exclude:
            children.append((_domain_runtime(rt.vcpus), rtbw.PARENT_PERIOD_US))
    for path, (r, p) in cgroup.other_rt_users(machine, exclude="").items():
        if os.path.normpath(path) not in ours:
            children.append((r, p))
    return rtbw.parent_runtime_us(children)


def apply_domain(state: LedgerState, name: str, domain_dir: str,
                 vcpus: Dict[int, Tuple[str, int, int]]) -> None:
    """Give ``name``'s vCPU groups their RT budgets: ``{vid: (dir, runtime_us, period_us)}``."""
    machine = os.path.dirname(domain_dir)
    saved = state.saved
    if "machine_rt" not in saved:
        rt, p = cgroup.read_rt(machine)
        saved["machine_rt"] = {"path": machine, "runtime_us": rt, "period_us": p}
    entry = state.domains[name]
    entry.rt = RtGroups(domain_dir=domain_dir,
                        vcpus={v: (r, p) for v, (_d, r, p) in vcpus.items()},
                        vcpu_dirs={v: d for v, (d, _r, _p) in vcpus.items()})
    need = machine_need_us(state, machine)
    cur_rt, cur_p = cgroup.read_rt(machine)
    if cur_p != rtbw.PARENT_PERIOD_US or cur_rt < need:
        cgroup.set_rt(machine, max(need, cur_rt if cur_p == rtbw.PARENT_PERIOD_US else 0),
                      rtbw.PARENT_PERIOD_US)
    cgroup.set_rt(domain_dir, _domain_runtime(entry.rt.vcpus), rtbw.PARENT_PERIOD_US)
    for _v, (d, r, p) in sorted(vcpus.items()):
        cgroup.set_rt(d, r, p)


def release_domain(state: LedgerState, name: str, entry: Entry) -> None:
    """Undo a domain's RT groups (if libvirt left them) and shrink/restore ``machine``."""
    rt = entry.rt
    if rt is None:
        return
    domain_dir = rt.domain_dir
    machine = os.path.dirname(domain_dir)
    if os.path.isdir(domain_dir):
        cgroup.zero_rt_subtree(domain_dir)
        cgroup.remove_empty_subtree(domain_dir)
    others = [n for n, e in state.domains.items() if n != name and e.rt is not None]
    saved = state.saved.get("machine_rt")
    if not os.path.isdir(machine):
        return
    if not others and saved and saved["path"] == machine:
        cgroup.set_rt(machine, saved["runtime_us"], saved["period_us"])
        del state.saved["machine_rt"]
    else:
        need = machine_need_us(state, machine, exclude=name)
        cgroup.set_rt(machine, need, rtbw.PARENT_PERIOD_US)


def check_headroom(state: LedgerState, machine: str, add: Dict[int, Tuple[int, int]]) -> None:
    """At prepare: would ``machine`` still fit under the root's RT limit with ``add``?"""
    root = os.path.dirname(machine)
    try:
        root_rt, root_p = cgroup.read_rt(root)
    except HostError:
        return
    if root_rt < 0:
        return
    others = cgroup.other_rt_users(root, exclude=machine)
    limit = rtbw.to_ratio(root_p, root_rt) - sum(rtbw.to_ratio(p, r) for r, p in others.values())
    need = rtbw.to_ratio(rtbw.PARENT_PERIOD_US, machine_need_us(state, machine)) + \
        rtbw.to_ratio(rtbw.PARENT_PERIOD_US,
                      rtbw.parent_runtime_us([(r, p) for r, p in add.values()]))
    if need > limit:
        held = ", ".join(f"{p} {r}us/{q}us" for p, (r, q) in others.items()) or "none"
        raise AdmissionError(
            f"RT group bandwidth: {machine} would need {format_fraction(_frac(need))} of each CPU "
            f"but the root cpu cgroup allows {format_fraction(_frac(limit))} "
            f"(/proc/sys/kernel/sched_rt_runtime_us; other groups holding RT runtime: {held})")


def _frac(ratio: int):
    from fractions import Fraction
    return Fraction(ratio, 1 << rtbw.BW_SHIFT)
