from fractions import Fraction

import pytest

from kairos_libvirt import config
from kairos_libvirt.errors import KairosError


def test_missing_file_means_defaults(tmp_path):
    cfg = config.load(str(tmp_path / "none.yaml"))
    assert cfg.cpus is None and cfg.capacity_share is None and cfg.run_dir == "/run/kairos"


def test_full_file(tmp_path):
    p = tmp_path / "k.yaml"
    p.write_text("cpus: 0-1\ncapacity_share: 90%\nintrospection:\n  default_backend: gdbstub\n")
    cfg = config.load(str(p))
    assert cfg.cpus == frozenset({0, 1}) and cfg.capacity_share == Fraction(9, 10)
    assert cfg.default_backend == "gdbstub"


@pytest.mark.parametrize("text,fragment", [
    ("cpus: [", "not valid YAML"),
    ("- a\n- b\n", "expected a mapping"),
    ("colour: red\n", "unknown setting 'colour'"),
    ("cpus: x-y\n", "not a CPU number"),
    ("cpus: ^0\n", "names no CPU"),
    ("capacity_share: 1.5\n", "outside (0, 1]"),
    ("introspection:\n  default_backend: ebpf\n", "default_backend 'ebpf'"),
])
def test_bad_config(tmp_path, text, fragment):
    p = tmp_path / "k.yaml"
    p.write_text(text)
    with pytest.raises(KairosError, match=fragment.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[")):
        config.load(str(p))


def test_unreadable(tmp_path):
    with pytest.raises(KairosError, match="cannot read"):
        config.load(str(tmp_path))  # a directory
