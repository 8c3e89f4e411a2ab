"""``kairosvm status``: declared vs enforced, the enforced side read from the kernel now."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from . import config as _config
from .errors import KairosError
from .host import cgroup, proc, sched
from .hook import agent_pid
from .ledger import Ledger, sched_to_json
from .spec import DomainInfo, VcpuSched
from .units import format_ns


def _declared(s: Optional[VcpuSched]) -> Optional[Dict[str, Any]]:
    if s is None:
        return None
    return {"policy": s.policy, "runtime_ns": s.runtime_ns,
            "deadline_ns": s.effective_deadline_ns if s.policy == "deadline" else None,
            "period_ns": s.period_ns, "priority": s.priority}


def collect(name: str, info: Optional[DomainInfo], cfg: Optional[_config.HostConfig] = None,
            live: Optional[str] = None) -> Dict[str, Any]:
    """Build the stable status document (see the README's JSON contract).

    ``live`` is the agent's published state (XML): it is where the guest
    tasks and the analysed interfaces come from; enforced values never do.
    """
    from .state import from_xml
    published = from_xml(live) if live else None
    pub_vcpus = {v.vcpu: v for v in published.vcpus} if published else {}
    cfg = cfg or _config.load()
    pid = proc.qemu_pid(name)
    apid = agent_pid(cfg, name)
    decl = info.declaration if info else None
    declared = decl.resolve(info.vcpus_max) if decl and info else {}
    tids = proc.vcpu_threads(pid) if pid else {}
    entry = Ledger(cfg).read().domains.get(name)
    vcpus: List[Dict[str, Any]] = []
    for vid in sorted(set(declared) | set(tids)):
        tid = tids.get(vid)
        k = sched.try_get(tid) if tid else None
        row: Dict[str, Any] = {
            "vcpu": vid, "tid": tid,
            "policy": k.policy if k else None,
            "runtime_ns": k.runtime_ns if k else None,
            "deadline_ns": k.deadline_ns if k else None,
            "period_ns": k.period_ns if k else None,
            "priority": k.priority if k else None,
            "declared": _declared(declared.get(vid)),
            "source": pub_vcpus[vid].source if vid in pub_vcpus else "declared",
            "interface": None,
        }
        if vid in pub_vcpus and pub_vcpus[vid].interface:
            b, p, d = pub_vcpus[vid].interface
            row["interface"] = {"budget_ns": b, "period_ns": p, "deadline_ns": d}
        if vid in pub_vcpus and pub_vcpus[vid].note:
            row["note"] = pub_vcpus[vid].note
        if tid and pid and cgroup.rt_group_sched_available():
            d = cgroup.thread_cpu_cgroup(pid, tid)
            if d:
                try:
                    r, p = cgroup.read_rt(d)
                    row["rt_group"] = {"path": d, "runtime_us": r, "period_us": p}
                except KairosError:  # the group vanished under us: report none
                    row["rt_group"] = None
        if tid and pid:
            stats = proc.read_sched_stats(pid, tid)
            row["nr_throttled"] = _int_or_none(stats.get("dl.nr_throttled") or
                                               stats.get("nr_throttled"))
        vcpus.append(row)
    return {
        "domain": name,
        "running": pid is not None,
        "qemu_pid": pid,
        "agent": {"pid": apid if apid and apid > 0 else None, "running": apid is not None},
        "ledger": ({"state": entry.state,
                    "granted": {str(k): sched_to_json(v) for k, v in sorted(entry.granted.items())}}
                   if entry else None),
        "vcpus": vcpus,
        "guest_tasks": [{k: t.get(k) for k in GUEST_TASK_KEYS}
                        for t in (published.tasks if published else [])],
        "introspection": published.introspection if published else None,
    }


GUEST_TASK_KEYS = ("key", "tid", "comm", "vcpu", "policy", "priority", "runtime_ns",
                   "deadline_ns", "period_ns", "observed_period_ns", "jitter_ns", "samples",
                   "period_source", "origin", "bound_ns")


def _int_or_none(v: Optional[str]) -> Optional[int]:
    try:
        return int(v) if v is not None else None
    except ValueError:
        return None


def render_text(doc: Dict[str, Any]) -> str:
    a = doc["agent"]
    lines = [f"domain {doc['domain']}: {'running' if doc['running'] else 'not running'}"
             f" (qemu pid {doc['qemu_pid'] or '-'}), agent "
             f"{'running, pid ' + str(a['pid']) if a['running'] else 'not running'}"]
    lines.append(f"{'vCPU':>4}  {'tid':>7}  {'declared':<34}  enforced (read from the kernel)")
    for r in doc["vcpus"]:
        d = r["declared"]
        dtext = "-" if d is None else _fmt(d["policy"], d["runtime_ns"], d["deadline_ns"],
                                           d["period_ns"], d["priority"])
        if r["policy"] is None:
            etext = "-"
        elif r["policy"] == "deadline":
            etext = _fmt("deadline", r["runtime_ns"], r["deadline_ns"], r["period_ns"], None)
        else:
            etext = f"{r['policy']}" + (f" prio {r['priority']}" if r["priority"] else "")
            g = r.get("rt_group")
            if g and r["policy"] in ("fifo", "rr"):
                etext += f" rt {g['runtime_us']}us/{g['period_us']}us"
        lines.append(f"{r['vcpu']:>4}  {r['tid'] or '-':>7}  {dtext:<34}  {etext}")
    if doc.get("guest_tasks"):
        lines.append("guest real-time tasks (found by introspection):")
        for t in doc["guest_tasks"]:
            who = f"tid {t['tid']} {t['comm']}" if t.get("tid") else t["key"]
            params = (f"{format_ns(t['runtime_ns'] or 0)}/{format_ns(t['deadline_ns'] or 0)}/"
                      f"{format_ns(t['period_ns'] or 0)}" if t["policy"] == "deadline"
                      else f"prio {t['priority']}")
            obs = (f", observed period {format_ns(t['observed_period_ns'])}"
                   if t.get("observed_period_ns") else "")
            seen = (", set before the attach (read from its task_struct)"
                    if t.get("origin") == "memory" else "")
            lines.append(f"  {who}: {t['policy']} {params}{obs} (vCPU {t['vcpu']}){seen}")
            if t.get("bound_ns") is not None:
                lines.append(f"    guaranteed by its vCPU's reservation: response within "
                             f"{format_ns(t['bound_ns'])}")
            elif t.get("observed_period_ns") or t["policy"] == "deadline":
                lines.append("    not guaranteed by its vCPU's reservation (see the vCPU's note)")
    i = doc.get("introspection")
    if i:
        lines.append(f"introspection: {i.get('backend')} {i.get('state')}"
                     + (f", {i.get('hits')} traps" if i.get("hits") is not None else "")
                     + (f" — {i['error']}" if i.get("error") else ""))
    return "\n".join(lines)


def _fmt(policy: str, runtime: Optional[int], deadline: Optional[int], period: Optional[int],
         prio: Optional[int]) -> str:
    if policy == "deadline":
        return (f"deadline {format_ns(runtime or 0)}/{format_ns(deadline or 0)}/"
                f"{format_ns(period or 0)}")
    return f"{policy} prio {prio} rt {format_ns(runtime or 0)}/{format_ns(period or 0)}"
