"""Fixtures for NBD tests: vdkit-daemon with ``-nbd`` (and QEMU for differential runs)."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.daemon.conftest import Daemons, Monitor, daemons  # noqa: F401  (fixture re-export)
from tests.helpers.net import free_port as free_port  # the NBD suites import it from here


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    qmp: Monitor
    sock: str
    dir: Path

    def uri(self, export: str = "drive0") -> str:
        return f"nbd+unix:///{export}?socket={self.sock}"


def short_sock(name: str) -> str:
    """A unix socket path short enough for sun_path wherever pytest puts tmp_path."""
    return os.path.join(tempfile.mkdtemp(prefix="vdnbd"), name)


@pytest.fixture
def serve(daemons: Daemons) -> Iterator[object]:  # noqa: F811
    """``serve(drive_args, cwd, paused=False, extra=[])`` -> :class:`Served` (killed by ``daemons``)."""
    for tool in ("qemu-img", "qemu-io", "nbdinfo", "nbdcopy"):
        require_tool(tool)

    def start(drive_args: list[str], cwd: Path, *, paused: bool = False, extra: list[str] | None = None,
              nbd: str | None = None) -> Served:
        sock = short_sock("nbd.sock")
        proc, qmp, _ = daemons.vdkit(drive_args, cwd, paused=paused,
                                     extra=["-nbd", nbd or f"unix:{sock}", *(extra or [])])
        return Served(proc, daemons.monitor(qmp).negotiate(), sock, cwd)

    yield start
