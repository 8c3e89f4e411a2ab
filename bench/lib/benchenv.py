"""What the bench scripts share: stopping with a message, running under the project's venv.

The scripts are extension-less executables (``bench/NAME``), so they cannot import
one another as modules; each puts this directory on ``sys.path`` (as bench/rtquality
and bench/gdbcost do with bench/rtquality.d for rtqlib) and imports this module:

    REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(REPO, "bench", "lib"))
    from benchenv import FIRST, die_for, reexec_in_venv  # noqa: E402

    die = die_for(__file__)      # die(msg): "bench/NAME: msg", exit status 1

Standard library only: it runs before the venv is known to be there.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, NoReturn, Sequence

#: What to run before the libvirt benches: the venv, the hook and libvirtd, the test guest.
FIRST = "scripts/setup-host, then guest/build (or scripts/test, which does both)"


def _prog(script_file: str) -> str:
    return f"bench/{os.path.basename(script_file)}"


def die_for(script_file: str) -> Callable[[str], NoReturn]:
    """The script's ``die(msg)``: exit with status 1 and ``bench/NAME: msg`` on stderr.

    NAME is the script's file name (``script_file`` is its ``__file__``), so a bench
    loaded as a module by another (bench/gdbcost loads bench/rtquality) keeps its own."""
    prog = _prog(script_file)

    def die(msg: str) -> NoReturn:
        sys.exit(f"{prog}: {msg}")
    return die


def reexec_in_venv(script_file: str) -> None:
    """Re-execute the script under ``REPO/.venv/bin/python`` unless it runs there already.

    The benches need the venv's libvirt and the project's packages (and install
    matplotlib there).  From a fresh clone with no venv, stop at once and name the
    command that makes it.  ``script_file`` is the script's ``__file__``; REPO is its
    directory's parent."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(script_file)))
    venv = os.path.join(repo, ".venv")
    if os.path.realpath(sys.prefix) == os.path.realpath(venv):
        return
    venv_py = os.path.join(venv, "bin", "python")
    if not os.access(venv_py, os.X_OK):
        die_for(script_file)(f"no project venv at {venv}: run {FIRST} first")
    os.execv(venv_py, [venv_py, os.path.abspath(script_file), *sys.argv[1:]])


def percentile(xs: Sequence[float], q: float) -> float:
    """The sample at rank ``int(q * n)`` of the sorted ``xs`` (the last for q = 1); NaN if empty."""
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")
