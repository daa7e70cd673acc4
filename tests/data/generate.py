"""Image generators for the differential tests.

Every image is made by the real QEMU tools (``qemu-img``, ``qemu-io``,
``qemu-system-x86_64``) in a directory the caller owns, so the tests compare
vdkit against QEMU on images QEMU itself wrote.  Header surgery for broken
images is done with plain byte patches (``patch``, ``set_u32``...), never
with vdkit's own serialiser, so a vdkit bug cannot hide in both the image and
the reader.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import struct
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

from tests.helpers.patching import get_u32 as get_u32
from tests.helpers.patching import get_u64 as get_u64
from tests.helpers.patching import patch as patch
from tests.helpers.patching import set_u8 as set_u8
from tests.helpers.patching import set_u16 as set_u16
from tests.helpers.patching import set_u32 as set_u32
from tests.helpers.patching import set_u64 as set_u64

# Offsets of the qcow2 header fields (qcow2-format.md §2).
OFF_VERSION = 4
OFF_BACKING_OFFSET = 8
OFF_BACKING_SIZE = 16
OFF_CLUSTER_BITS = 20
OFF_SIZE = 24
OFF_CRYPT = 32
OFF_L1_SIZE = 36
OFF_L1_OFFSET = 40
OFF_REFTABLE_OFFSET = 48
OFF_REFTABLE_CLUSTERS = 56
OFF_NB_SNAPSHOTS = 60
OFF_SNAPSHOTS_OFFSET = 64
OFF_INCOMPAT = 72
OFF_COMPAT = 80
OFF_AUTOCLEAR = 88
OFF_REFCOUNT_ORDER = 96
OFF_HEADER_LENGTH = 100

EXT_FEATURE_TABLE = 0x6803F857


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} is not installed; run 'make test'")
    return path


def run(*cmd: str, cwd: Path | str | None = None, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    p = subprocess.run(list(cmd), cwd=cwd, capture_output=True, timeout=120)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.decode(errors='replace')}")
    return p


def create(d: Path, name: str, size: str | int | None = "1M", fmt: str = "qcow2", *,
           options: Iterable[str] = (), backing: str | None = None, backing_fmt: str | None = None,
           unsafe: bool = False, extra: Iterable[str] = ()) -> Path:
    """``qemu-img create`` in ``d`` (relative names are relative to ``d``)."""
    cmd = [_tool("qemu-img"), "create", "-q", "-f", fmt, *extra]
    opts = ",".join(options)
    if opts:
        cmd += ["-o", opts]
    if backing is not None:
        cmd += ["-b", backing]
        if backing_fmt is not None:
            cmd += ["-F", backing_fmt]
    if unsafe:
        cmd.append("-u")
    cmd.append(name)
    if size is not None:
        cmd.append(str(size))
    run(*cmd, cwd=d)
    return d / name


def qemu_io(path: Path, *commands: str, fmt: str | None = "qcow2", cwd: Path | None = None,
            extra: Iterable[str] = ()) -> None:
    """Run qemu-io commands (``write -P 0xaa 0 64k``, ``write -z ...``, ``discard ...``)."""
    cmd = [_tool("qemu-io")]
    if fmt is not None:
        cmd += ["-f", fmt]
    cmd += list(extra)
    for c in commands:
        cmd += ["-c", c]
    cmd.append(str(path))
    p = run(*cmd, cwd=cwd)
    # qemu-io reports a failed command ("write failed: ...") but may still exit 0.
    out = (p.stdout + p.stderr).decode(errors="replace")
    if " failed: " in out:
        raise RuntimeError(f"qemu-io {commands}: {out}")


def snapshot(path: Path, op: str, name: str, cwd: Path | None = None) -> None:
    """``qemu-img snapshot -c/-d/-a NAME``."""
    run(_tool("qemu-img"), "snapshot", op, name, str(path), cwd=cwd)


def bitmap_add(path: Path, name: str, *, granularity: str | None = None, disabled: bool = False) -> None:
    cmd = [_tool("qemu-img"), "bitmap", "--add"]
    if granularity is not None:
        cmd += ["-g", granularity]
    if disabled:
        cmd.append("--disable")
    run(*cmd, str(path), name)


# -- byte surgery (shared by every test: tests/helpers/patching.py) ----------------------------

def truncate(path: Path, size: int) -> None:
    os.truncate(path, size)


def header_extensions(path: Path) -> list[tuple[int, int, int]]:
    """(type, length, offset of the extension header) for each header extension of a v3 image."""
    with open(path, "rb") as f:
        head = f.read(65536)
    cluster_size = 1 << int.from_bytes(head[20:24], "big")
    off = int.from_bytes(head[100:104], "big")
    out = []
    while off + 8 <= cluster_size:
        t, n = struct.unpack_from(">II", head, off)
        out.append((t, n, off))
        if t == 0:
            break
        off += 8 + ((n + 7) & ~7)
    return out


# -- a real VM, for savevm snapshots and persistent bitmaps -------------------------------------

class Vm:
    """A paused ``qemu-system-x86_64`` with one drive, driven over QMP on stdio.

    Kept minimal on purpose (no qemu.qmp event loop): one JSON command per
    line in, replies read until the one that carries ``return``/``error``.
    """

    def __init__(self, image: Path, *, fmt: str = "qcow2", drive_extra: str = "") -> None:
        self.image = image
        drive = f"file={image},if=none,id=d0,format={fmt}" + (f",{drive_extra}" if drive_extra else "")
        self.proc = subprocess.Popen(
            [_tool("qemu-system-x86_64"), "-machine", "q35,accel=tcg", "-S", "-display", "none",
             "-nodefaults", "-m", "32", "-drive", drive, "-qmp", "stdio"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        self._buf = b""
        self._read_message(60)  # greeting
        self.cmd("qmp_capabilities")

    def _read_message(self, timeout: float) -> dict:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                raise TimeoutError("no reply from qemu-system-x86_64")
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"qemu-system-x86_64 exited: {err}")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return json.loads(line)

    def cmd(self, execute: str, timeout: float = 120, **arguments: object) -> object:
        assert self.proc.stdin is not None
        msg: dict[str, object] = {"execute": execute}
        if arguments:
            msg["arguments"] = arguments
        self.proc.stdin.write(json.dumps(msg).encode() + b"\n")
        self.proc.stdin.flush()
        while True:
            reply = self._read_message(timeout)
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise RuntimeError(f"{execute}: {reply['error']}")

    def hmp(self, line: str) -> str:
        out = self.cmd("human-monitor-command", **{"command-line": line})
        assert isinstance(out, str)
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.cmd("quit", timeout=30)
            except (RuntimeError, TimeoutError, OSError):
                pass
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
