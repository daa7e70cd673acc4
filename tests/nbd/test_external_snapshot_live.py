"""An external snapshot while an NBD client is connected: the export follows the new active image.

``blockdev-snapshot-sync`` on a drive exported over NBD: a connection opened before the snapshot keeps
working, its writes land in the overlay, reads see the old data through the backing image, and the old
image is no longer written (it is read-only, so ``qemu-io`` may read it while the daemon runs).  Checked
with ``qemu-io`` on the files and ``qemu-img check`` afterwards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.conftest import qemu_img, qemu_io
from tests.nbd.client import NbdClient
from tests.nbd.test_clients import make_image


def _pattern(path: Path, fmt: str, offset: int, length: int, byte: int) -> bool:
    r = qemu_io("-f", fmt, "-r", "-c", f"read -P {byte:#x} {offset} {length}", str(path))
    return r.returncode == 0 and "Pattern verification failed" not in r.stdout


def test_snapshot_under_nbd_client(workdir: Path, serve: Any) -> None:
    img = make_image(workdir, size="4M")
    r = qemu_io("-f", "qcow2", "-c", "write -P 0x11 0 64k", str(img))
    assert r.returncode == 0, r
    s = serve(["-drive", "file=a.qcow2,if=none,id=drive0"], workdir)
    c = NbdClient(s.sock, "drive0")
    assert c.read(0, 4096) == b"\x11" * 4096
    ovl = workdir / "s1.qcow2"
    assert s.qmp.cmd("blockdev-snapshot-sync", {"device": "drive0", "snapshot-file": str(ovl),
                                                "snapshot-node-name": "s1"}) == {"return": {}}
    assert c.write(65536, b"\x22" * 65536) == 0
    assert c.write(0, b"\x33" * 512) == 0
    assert c.read(0, 1024) == b"\x33" * 512 + b"\x11" * 512  # new data over the backing's
    assert c.read(65536, 4096) == b"\x22" * 4096
    # the old image is read-only now: readable by another process, and it kept its data
    assert _pattern(img, "qcow2", 0, 65536, 0x11)
    assert _pattern(img, "qcow2", 65536, 65536, 0)
    inserted = s.qmp.cmd("query-block")["return"][0]["inserted"]
    assert (inserted["node-name"], inserted["file"], inserted["backing_file"]) == ("s1", str(ovl), "a.qcow2")
    c.close()
    assert s.qmp.cmd("quit") == {"return": {}}
    s.proc.wait(timeout=30)
    assert _pattern(ovl, "qcow2", 65536, 65536, 0x22)
    assert _pattern(ovl, "qcow2", 0, 512, 0x33) and _pattern(ovl, "qcow2", 512, 512, 0x11)
    for f in (img, ovl):
        r = qemu_img("check", str(f))
        assert r.returncode == 0, r
    info = qemu_img("info", str(ovl))
    assert "backing file: a.qcow2 (actual path: " in info.stdout and "backing file format: qcow2" in info.stdout
