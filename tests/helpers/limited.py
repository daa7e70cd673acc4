"""Run a tool under an address-space limit, as the damage sweeps run vdkit-img.

A hostile header must not make vdkit allocate in proportion to the numbers it
claims: under ``RLIMIT_AS`` such an allocation fails (MemoryError, a clean
error or a crash the sweep sees) instead of passing unnoticed on a big machine.
"""

from __future__ import annotations

import resource
import subprocess
from pathlib import Path

from tests.conftest import _ENV

AS_LIMIT = 1 << 30


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))


def run_limited(cmd: list[str], cwd: Path, limit: bool = False) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``cmd``; with ``limit`` under a 1 GiB address space."""
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, timeout=120, env=_ENV,
                       preexec_fn=_limit_memory if limit else None)
    return p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")
