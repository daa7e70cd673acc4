"""qemu-io as the tests' image writer: a list of commands run on one image, which must all succeed.

qemu-io exits 0 even when a command fails (``write failed: ...``, ``Pattern verification failed``), so
success is the exit code *and* no "error" or "fail" in what it printed.  Every test writes its images
through this one runner (the suites' ``_io``/``qio`` names are partials or argument orders of it).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tests.conftest import qemu_io


def qemu_io_script(d: Path | None, name: str, cmds: Sequence[str], fmt: str | None, *,
                   readonly: bool = False) -> str:
    """Run ``cmds`` (``-c`` each) with qemu-io on ``name`` (in folder ``d``) opened as ``fmt`` (probed
    when None), read-only with ``readonly``; fail on any error; qemu-io's output."""
    args = [*(["-f", fmt] if fmt else []), *(["-r"] if readonly else [])]
    for c in cmds:
        args += ["-c", c]
    r = qemu_io(*args, name, cwd=d)
    said = r.stdout.lower()
    assert r.returncode == 0 and "error" not in said and "fail" not in said, r.stdout + r.stderr
    return r.stdout


def qio(path: str, cmds: Sequence[str], cwd: Path, fmt: str = "qcow2") -> None:
    """:func:`qemu_io_script` in the argument order of the differential suites (``tests/diff``)."""
    qemu_io_script(cwd, path, cmds, fmt)
