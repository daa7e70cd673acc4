"""qemu-nbd exports a test starts (``--fork``, a pid file each) and kills afterwards."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from tests.conftest import require_tool


class QemuNbd:
    """qemu-nbd servers of one test, in its folder ``tmp``; ``stop`` ends every one."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.pids: list[int] = []

    def start(self, image: Path, *args: str) -> None:
        """``qemu-nbd -t --fork ARGS image``, returning once it serves (its pid file is written)."""
        pid_file = self.tmp / f"nbd{len(self.pids)}.pid"
        subprocess.run([require_tool("qemu-nbd"), "-t", "--fork", "--pid-file", str(pid_file), *args, str(image)],
                       check=True, timeout=30)
        self.pids.append(int(pid_file.read_text()))

    def stop(self) -> None:
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
