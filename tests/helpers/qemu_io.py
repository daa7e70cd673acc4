"""qemu-io as the tests' image writer: a list of commands run on one image, which must succeed."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import qemu_io


def qemu_io_script(d: Path, name: str, cmds: list[str], fmt: str) -> None:
    """Run ``cmds`` (``-c`` each) with qemu-io on ``d/name`` opened as ``fmt``; fail on any error."""
    args = ["-f", fmt]
    for c in cmds:
        args += ["-c", c]
    r = qemu_io(*args, name, cwd=d)
    assert r.returncode == 0 and "error" not in r.stdout.lower(), r.stdout + r.stderr
