"""Where kairos keeps per-domain runtime files (root-owned, never world-writable)."""
from __future__ import annotations

import os

from .config import HostConfig


def domain_dir(cfg: HostConfig, name: str) -> str:
    return os.path.join(cfg.run_dir, "domains", name)


def agent_pid_file(cfg: HostConfig, name: str) -> str:
    return os.path.join(domain_dir(cfg, name), "agent.pid")


def supervisor_pid_file(cfg: HostConfig, name: str) -> str:
    return os.path.join(domain_dir(cfg, name), "supervisor.pid")


def agent_lock_file(cfg: HostConfig, name: str) -> str:
    return os.path.join(domain_dir(cfg, name), "agent.lock")


def hold_file(cfg: HostConfig, name: str) -> str:
    """Present: the agent keeps no trap armed in the guest (``kairosvm hold``)."""
    return os.path.join(domain_dir(cfg, name), "hold")


def control_socket(cfg: HostConfig, name: str) -> str:
    """The agent's command socket (host/wake.py): ``kairosvm hold`` pokes it."""
    return os.path.join(domain_dir(cfg, name), "agent.sock")


def agent_log(cfg: HostConfig, name: str) -> str:
    return os.path.join(cfg.log_dir, f"{name}.log")


def valid_name(name: str) -> bool:
    """libvirt forbids '/' in names; refuse anything that could escape our directories."""
    return bool(name) and "/" not in name and name not in (".", "..") and "\0" not in name
