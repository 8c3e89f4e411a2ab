"""Host configuration: ``/etc/kairos/kairos.yaml``.

```yaml
cpus: 0-1              # RT CPU pool the ledger may fill (default: all online CPUs)
capacity_share: 0.9    # per-CPU share for reservations (default: the kernel's
                       # sched_rt_runtime_us / sched_rt_period_us)
enforcement_granularity: 4ms   # the longest a SCHED_DEADLINE server can overrun its
                       # runtime (default: found on the host, see host/tick.py: one
                       # tick, or the hrtick slack when HRTICK_DL is on)
introspection:
  default_backend: off
```
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional

from .errors import KairosError, UnitError
from .host.cpus import parse_cpulist
from .units import parse_fraction, parse_time_ns

DEFAULT_PATH = "/etc/kairos/kairos.yaml"
RUN_DIR = "/run/kairos"
LOG_DIR = "/var/log/kairos"


@dataclass(frozen=True)
class HostConfig:
    cpus: Optional[frozenset] = None
    capacity_share: Optional[Fraction] = None
    default_backend: str = "off"
    run_dir: str = RUN_DIR
    log_dir: str = LOG_DIR
    #: Admin's word on the enforcement granularity (ns); None: find it on the host.
    enforcement_ns: Optional[int] = None


def config_path() -> str:
    return os.environ.get("KAIROS_CONFIG", DEFAULT_PATH)


def load(path: Optional[str] = None) -> HostConfig:
    path = path or config_path()
    try:
        with open(path, "rb") as f:
            raw = f.read(1 << 20)
    except FileNotFoundError:
        return HostConfig()
    except OSError as exc:
        raise KairosError(f"{path}: cannot read host configuration: {exc.strerror}") from None
    import yaml  # only when a config file exists: keeps the hook's start-up short
    try:
        data = yaml.safe_load(raw) or {}
    except yaml.YAMLError as exc:
        raise KairosError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise KairosError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    known = {"cpus", "capacity_share", "introspection", "run_dir", "log_dir",
             "enforcement_granularity"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise KairosError(f"{path}: unknown setting {unknown[0]!r}; known: {', '.join(sorted(known))}")
    cpus = None
    if data.get("cpus") is not None:
        cpus = parse_cpulist(str(data["cpus"]))
        if not cpus:
            raise KairosError(f"{path}: cpus {data['cpus']!r} names no CPU")
    share = None
    if data.get("capacity_share") is not None:
        try:
            share = parse_fraction(str(data["capacity_share"]), f"{path}: capacity_share")
        except UnitError as exc:
            raise KairosError(str(exc)) from None
    enforcement = None
    if data.get("enforcement_granularity") is not None:
        try:
            enforcement = parse_time_ns(str(data["enforcement_granularity"]),
                                        f"{path}: enforcement_granularity")
        except UnitError as exc:
            raise KairosError(str(exc)) from None
        if enforcement < 0:
            raise KairosError(f"{path}: enforcement_granularity must not be negative")
    intro = data.get("introspection") or {}
    backend = str(intro.get("default_backend", "off")) if isinstance(intro, dict) else "off"
    if backend not in ("off", "gdbstub", "kvm-ud"):
        raise KairosError(f"{path}: introspection.default_backend {backend!r}; allowed: off, "
                          "gdbstub, kvm-ud")
    return HostConfig(cpus=cpus, capacity_share=share, default_backend=backend,
                      run_dir=str(data.get("run_dir", RUN_DIR)),
                      log_dir=str(data.get("log_dir", LOG_DIR)), enforcement_ns=enforcement)
