"""Install/uninstall our hook in ``/etc/libvirt/hooks/qemu.d`` and reload libvirtd.

Never touches an admin's own ``/etc/libvirt/hooks/qemu`` or other scripts in
``qemu.d``.  libvirtd discovers hook scripts only at start-up or on SIGHUP
(DESIGN.md §2), so a change is followed by a reload.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Optional

from .config import HostConfig
from .errors import KairosError

HOOK_DIR = "/etc/libvirt/hooks/qemu.d"
HOOK_NAME = "kairosvm"
MARKER = "kairosvm-hook-marker"


def template_path() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    for path in (os.path.join(here, "data", "qemu-hook"),
                 os.path.join(here, os.pardir, "hooks", "qemu")):
        if os.path.exists(path):
            return path
    raise AssertionError("programming error: hooks/qemu is not installed with the package")


def render(cfg: HostConfig, python: Optional[str] = None) -> str:
    with open(template_path()) as f:
        text = f.read()
    python = python or sys.executable
    text = text.replace("KAIROS_PYTHON=${KAIROS_PYTHON:-python3}", f"KAIROS_PYTHON={python}")
    text = text.replace("KAIROS_RUN=${KAIROS_RUN:-/run/kairos}", f"KAIROS_RUN={cfg.run_dir}")
    text = text.replace("KAIROS_LOG=${KAIROS_LOG:-/var/log/kairos}", f"KAIROS_LOG={cfg.log_dir}")
    return text


def hook_path(hook_dir: str = HOOK_DIR) -> str:
    return os.path.join(hook_dir, HOOK_NAME)


def installed(hook_dir: str = HOOK_DIR) -> bool:
    try:
        with open(hook_path(hook_dir)) as f:
            return MARKER in f.read()
    except OSError:
        return False


def install(cfg: HostConfig, hook_dir: str = HOOK_DIR, reload: bool = True) -> bool:
    """Install or update the hook; True when something changed (and libvirtd was reloaded)."""
    text = render(cfg)
    path = hook_path(hook_dir)
    try:
        with open(path) as f:
            current = f.read()
    except FileNotFoundError:
        current = None
    if current is not None and MARKER not in current:
        raise KairosError(f"{path} exists and is not kairos-libvirt's hook; move it away or "
                          "rename it, kairosvm will not overwrite it")
    if current == text and os.access(path, os.X_OK):
        return False
    os.makedirs(hook_dir, mode=0o755, exist_ok=True)
    tmp = path + ".kairos-tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)
    if reload:
        reload_libvirtd()
    return True


def uninstall(hook_dir: str = HOOK_DIR, reload: bool = True) -> bool:
    path = hook_path(hook_dir)
    if not os.path.exists(path):
        return False
    if not installed(hook_dir):
        raise KairosError(f"{path} is not kairos-libvirt's hook; leaving it alone")
    os.unlink(path)
    if reload:
        reload_libvirtd()
    return True


def libvirtd_pid() -> Optional[int]:
    for pidfile in ("/run/libvirtd.pid", "/var/run/libvirtd.pid"):
        try:
            with open(pidfile) as f:
                pid = int(f.read().strip())
            os.kill(pid, 0)
            return pid
        except (OSError, ValueError):
            continue
    return None


def reload_libvirtd() -> None:
    """Make libvirtd rescan its hooks (systemd reload or SIGHUP)."""
    if os.path.isdir("/run/systemd/system") and shutil.which("systemctl"):
        subprocess.run(["systemctl", "reload", "libvirtd"], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return
    pid = libvirtd_pid()
    if pid is None:
        return  # not running: it will find the hook when it starts
    os.kill(pid, signal.SIGHUP)
    # The reload is asynchronous; give the daemon a moment before the next start.
    time.sleep(0.5)
