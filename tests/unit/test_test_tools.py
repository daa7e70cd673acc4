"""The tests run with nothing but the venv and the system packages the Makefile installs.

``make test`` runs ``.venv/bin/python -m pytest``, which does not put ``.venv/bin`` on ``PATH``: a console
script that pip installed there (``qmp-shell``, ``vdkit-img``...) started by bare name is found only on a
machine where an earlier install left a copy on ``PATH``.  Such tools go through
``tests.conftest.venv_tool``; this test finds any that do not.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from tests.conftest import ROOT


def _venv_scripts() -> set[str]:
    bindir = Path(sys.executable).parent
    return {p.name for p in bindir.iterdir() if not p.name.startswith(("python", "activate", "Activate"))}


def test_no_bare_venv_tool_in_commands() -> None:
    scripts = _venv_scripts()
    assert "qmp-shell" in scripts  # the test extra installs qemu.qmp's scripts next to the interpreter
    bare = re.compile(r"""\[\s*["']([A-Za-z0-9_.+-]+)["']\s*,""")
    found = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            found += [f"{path.relative_to(ROOT)}:{lineno}: {m}" for m in bare.findall(line) if m in scripts]
    assert not found, "venv tools started by bare name (use venv_tool()):\n" + "\n".join(found)
