"""SIGKILL the daemon during an NBD write load: no corruption, every write flushed before the kill survives."""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path
from typing import Any

from tests.conftest import qemu_img
from tests.nbd.client import NbdClient
from tests.nbd.test_clients import make_image
from vdkit.nbd import wire as w

CLUSTER = 65536


def test_sigkill_during_writes(workdir: Path, serve: Any) -> None:
    make_image(workdir, size="8M")
    s = serve(["-drive", "file=a.qcow2,if=none,id=drive0"], workdir)
    c = NbdClient(s.sock, "drive0")
    rng = random.Random(5)
    durable = bytearray(8 << 20)  # the image as of the last acknowledged flush
    pending: list[tuple[int, bytes]] = []  # acknowledged or in-flight writes after it
    kill_at = 150
    for i in range(400):
        data = bytes([i % 255 + 1]) * rng.choice((4096, 8192, 65536))
        off = min(rng.randrange(0, (8 << 20) // 4096) * 4096, (8 << 20) - len(data))
        if i == kill_at:
            # pipeline a few more writes, then kill while they are in flight
            for _ in range(8):
                off = rng.randrange(0, 100) * CLUSTER
                c.send(w.CMD_WRITE, off, CLUSTER, bytes([0xEE]) * CLUSTER)
                pending.append((off, bytes([0xEE]) * CLUSTER))
            os.kill(s.proc.pid, signal.SIGKILL)
            s.proc.wait(timeout=30)
            break
        assert c.write(off, data) == 0
        pending.append((off, data))
        if i % 10 == 9:
            assert c.request(w.CMD_FLUSH).error == 0
            for o, d in pending:
                durable[o:o + len(d)] = d
            pending.clear()
    c.sock.close()
    img = workdir / "a.qcow2"
    chk = qemu_img("check", str(img))
    assert chk.returncode in (0, 3), chk.stdout + chk.stderr  # 3: leaked clusters only, not corruption
    assert "ERROR" not in chk.stdout + chk.stderr
    raw = workdir / "out.raw"
    assert qemu_img("convert", "-O", "raw", str(img), str(raw)).returncode == 0
    image = raw.read_bytes()
    assert len(image) == len(durable)
    # every byte holds the durable data, or that of a write issued after the last flush
    for pos in range(0, len(image), 4096):
        got, want = image[pos:pos + 4096], bytes(durable[pos:pos + 4096])
        if got != want:
            later = {d[0] for o, d in pending if o <= pos < o + len(d)}
            assert len(set(got)) == 1 and got[0] in later, pos
