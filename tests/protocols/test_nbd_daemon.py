"""vdkit-daemon drives on NBD exports, against qemu-system-x86_64 on the same exports.

``-drive file=nbd...`` (URI and legacy names, raw and qcow2 over NBD),
``driver=nbd`` (no format layer) and ``file.driver=nbd``; a raw drive over a
read-only export opens (``-drive`` sets auto-read-only) and shows ``"ro":
false`` as in QEMU (``shared/reference/protocols.md`` §4).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import check_ok, qemu_io, require_tool
from tests.daemon.conftest import _ENV, QEMU_BASE, Daemons, daemons, normalise, normalise_hmp  # noqa: F401
from tests.nbd.conftest import short_sock
from tests.protocols.test_nbd_client import QemuNbd, qnbd  # noqa: F401  (fixture)


def test_nbd_drives_in_query_block_and_info_block(daemons: Daemons, qnbd: QemuNbd, tmp_path: Path) -> None:  # noqa: F811
    raw = tmp_path / "w.raw"
    check_ok("create", "-q", "-f", "raw", str(raw), "64M")
    assert qemu_io("-f", "raw", "-c", "write -P 0x33 0 1M", str(raw)).returncode == 0
    q2 = tmp_path / "e.qcow2"
    check_ok("create", "-q", "-f", "qcow2", str(q2), "16M")
    assert qemu_io("-c", "write -P 0x11 0 1M", str(q2)).returncode == 0
    ro = tmp_path / "ro.raw"
    check_ok("create", "-q", "-f", "raw", str(ro), "16M")
    w, e, r = short_sock("w.sock"), short_sock("e.sock"), short_sock("ro.sock")
    qnbd.start(raw, "-k", w, "-x", "w", "-f", "raw", "-e", "8")
    qnbd.start(q2, "-k", e, "-x", "r", "-f", "raw", "-e", "8")  # the qcow2 file's bytes
    qnbd.start(ro, "-k", r, "-x", "ro", "-f", "raw", "-r", "-e", "8")
    drives = [f"file=nbd+unix:///w?socket={w},format=raw,if=none,id=n0",
              f"file=nbd+unix:///r?socket={e},format=qcow2,if=none,id=n1",
              f"driver=nbd,server.type=unix,server.path={w},export=w,if=none,id=n2",
              f"file=nbd+unix:///ro?socket={r},format=raw,if=none,id=n3",
              f"file.driver=nbd,file.path={w},file.export=w,format=raw,if=none,id=n4",
              f"file=nbd:unix:{e}:exportname=r,if=none,id=n5,readonly=on"]
    args = [a for d in drives for a in ("-drive", d)]
    q, v = daemons.pair(args, lambda d: None)
    assert normalise(v.cmd_line("query-block")) == normalise(q.cmd_line("query-block"))
    for line in ("info block", "info block -v"):
        assert normalise_hmp(v.hmp(line)) == normalise_hmp(q.hmp(line)), line
    # a second query (the rendering cache has no file state for an export)
    assert normalise(v.cmd_line("query-block")) == normalise(q.cmd_line("query-block"))


def test_unreachable_export_refused_like_qemu(tmp_path: Path) -> None:
    gone = short_sock("gone.sock")
    out = []
    for cmd in ([require_tool("qemu-system-x86_64"), *QEMU_BASE], [sys.executable, "-m", "vdkit.daemon.main", "-S"]):
        for drive in (f"file=nbd+unix:///x?socket={gone},if=none,id=d0", "driver=nbd,export=x,if=none,id=d0",
                      f"driver=nbd,server.type=unix,server.path={gone},foo=1,if=none,id=d0"):
            p = subprocess.run([*cmd, "-drive", drive], capture_output=True, timeout=60, env=_ENV,
                               stdin=subprocess.DEVNULL, cwd=tmp_path)
            out.append((p.returncode, p.stderr.decode().split(": ", 1)[-1]))
    assert out[:3] == out[3:]
