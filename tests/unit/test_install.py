import os
import subprocess

import pytest

from kairos_libvirt import install
from kairos_libvirt.config import HostConfig
from kairos_libvirt.errors import KairosError


def test_install_update_uninstall(tmp_path):
    cfg = HostConfig(run_dir="/run/x", log_dir="/var/log/x")
    assert install.install(cfg, str(tmp_path), reload=False)
    path = tmp_path / "kairosvm"
    text = path.read_text()
    assert "KAIROS_RUN=/run/x" in text and "KAIROS_LOG=/var/log/x" in text
    assert os.access(path, os.X_OK)
    assert not install.install(cfg, str(tmp_path), reload=False)  # up to date
    assert install.installed(str(tmp_path))
    assert install.uninstall(str(tmp_path), reload=False)
    assert not path.exists()
    assert not install.uninstall(str(tmp_path), reload=False)


def test_never_overwrites_or_removes_a_foreign_hook(tmp_path):
    foreign = tmp_path / "kairosvm"
    foreign.write_text("#!/bin/sh\necho admin\n")
    with pytest.raises(KairosError, match="not kairos-libvirt's hook"):
        install.install(HostConfig(), str(tmp_path), reload=False)
    with pytest.raises(KairosError, match="leaving it alone"):
        install.uninstall(str(tmp_path), reload=False)
    assert foreign.read_text() == "#!/bin/sh\necho admin\n"


def test_fast_path_skips_python_for_plain_domains(tmp_path):
    """The rendered hook exits 0 without Python for a domain with no declaration."""
    cfg = HostConfig(run_dir=str(tmp_path / "run"))
    install.install(cfg, str(tmp_path), reload=False)
    hook = str(tmp_path / "kairosvm")
    env = {"PATH": "/usr/bin:/bin", "KAIROS_PYTHON": "/nonexistent"}
    text = (tmp_path / "kairosvm").read_text().replace(
        next(line for line in (tmp_path / "kairosvm").read_text().splitlines()
             if line.startswith("KAIROS_PYTHON=")), "KAIROS_PYTHON=/nonexistent/python")
    (tmp_path / "kairosvm").write_text(text)
    for op, sub in (("prepare", "begin"), ("started", "begin"), ("stopped", "end"),
                    ("release", "end"), ("reconnect", "begin")):
        res = subprocess.run([hook, "plain", op, sub, "-"], input=b"<domain><name>plain</name>"
                             b"<os><kernel>/var/lib/kairos/guest/vmlinuz</kernel></os></domain>",
                             capture_output=True, env=env)
        assert res.returncode == 0, (op, res.stderr)
    # ...but a declared domain does reach Python (which here does not exist).
    res = subprocess.run([hook, "rt", "prepare", "begin", "-"], input=b"<domain><metadata>"
                         b"<x xmlns='http://kairosvm.org/xmlns/libvirt/realtime/1.0'/>"
                         b"</metadata></domain>", capture_output=True, env=env)
    assert res.returncode != 0
