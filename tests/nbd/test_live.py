"""Live state over NBD: blockstats, throttling, stop/cont quiescing, snapshots under load, query-block."""

from __future__ import annotations

import select
import threading
from pathlib import Path
from typing import Any

from tests.conftest import qemu_img
from tests.nbd.client import NbdClient, Reply
from tests.nbd.test_clients import make_image
from vdkit.devices.throttle import NS, Throttle, ThrottleConfig
from vdkit.nbd import wire as w


def stats(m: Any, device: str = "drive0") -> dict[str, Any]:
    return next(s for s in m.cmd("query-blockstats")["return"] if s["device"] == device)["stats"]


def test_blockstats_count_nbd_io(workdir: Path, serve: Any) -> None:
    make_image(workdir, size="1M")
    s = serve(["-drive", "file=a.qcow2,if=none,id=drive0"], workdir)
    before = stats(s.qmp)
    assert "idle_time_ns" not in before and before["rd_operations"] == 0
    c = NbdClient(s.sock, "drive0")
    for i in range(3):
        c.read(i * 4096, 4096)
    assert c.write(0, b"a" * 8192) == 0
    assert c.write(65536, b"b" * 8192, flags=w.CMDFLAG_FUA) == 0
    assert c.request(w.CMD_WRITE_ZEROES, 131072, 4096).error == 0
    assert c.request(w.CMD_FLUSH).error == 0
    assert c.request(w.CMD_TRIM, 196608, 65536).error == 0
    assert c.request(w.CMD_BLOCK_STATUS, 0, 4096).error == 0  # not accounted (as QEMU's block status)
    st = stats(s.qmp)
    assert (st["rd_bytes"], st["rd_operations"]) == (12288, 3)
    assert (st["wr_bytes"], st["wr_operations"]) == (8192 * 2 + 4096, 3)
    assert (st["flush_operations"], st["unmap_operations"], st["unmap_bytes"]) == (1, 1, 65536)
    assert st["wr_highest_offset"] == 131072 + 4096
    assert st["rd_total_time_ns"] > 0 and st["wr_total_time_ns"] > 0 and st["idle_time_ns"] >= 0
    assert st["failed_rd_operations"] == 0
    c.close()
    # query-block reflects what NBD wrote: the image grew
    img = s.qmp.cmd("query-block")["return"][0]["inserted"]["image"]
    assert img["actual-size"] >= 3 * 65536


def test_throttle_buckets_with_a_fake_clock() -> None:
    """QEMU's semantics: avg/10 burst without *_max; max*length burst then avg; iops_size units."""
    cfg = ThrottleConfig()
    cfg.avg["iops"] = 10
    t = Throttle.from_config(cfg)
    admitted, now = 0, 0
    while now < 10 * NS:
        if t.wait_ns(False, now) == 0:
            t.account(False, 4096)
            admitted += 1
        now += NS // 1000
    assert 100 <= admitted <= 102  # 10/s for 10 s plus the 1-operation bucket
    cfg = ThrottleConfig()
    cfg.avg["bps_wr"], cfg.max["bps_wr"], cfg.length["bps_wr"] = 1000, 10_000, 2
    t = Throttle.from_config(cfg)
    admitted_bytes, now = 0, 0
    while t.wait_ns(True, now) == 0:  # the burst: max/10 at once (burst bucket)
        t.account(True, 100)
        admitted_bytes += 100
    assert admitted_bytes == 1100
    assert t.wait_ns(False, now) == 0  # reads are not limited by bps_wr
    cfg = ThrottleConfig()
    cfg.avg["iops"], cfg.iops_size = 100, 4096
    t = Throttle.from_config(cfg)
    t.account(False, 65536)  # 16 operations' worth
    assert t.wait_ns(False, 0) == (16 - 10) * NS // 100


def test_throttled_requests_complete(workdir: Path, serve: Any) -> None:
    make_image(workdir, size="8M")
    s = serve(["-drive", "file=a.qcow2,if=none,id=drive0,bps_wr=4194304,iops_rd=200"], workdir)
    c = NbdClient(s.sock, "drive0")
    for i in range(64):  # 4 MiB of writes at 4 MiB/s
        assert c.write(i * 65536, bytes([i % 251 + 1]) * 65536) == 0
    r = s.qmp.cmd("block_set_io_throttle", {"device": "drive0", "bps": 0, "bps_rd": 8 << 20, "bps_wr": 0,
                                             "iops": 0, "iops_rd": 0, "iops_wr": 0})
    assert r == {"return": {}}
    data = b"".join(c.read(i * 131072, 131072) for i in range(32))
    assert data == b"".join(bytes([i % 251 + 1]) * 65536 for i in range(64))
    st = stats(s.qmp)
    assert (st["wr_operations"], st["wr_bytes"], st["rd_operations"], st["rd_bytes"]) == (64, 4 << 20, 32, 4 << 20)
    info = s.qmp.cmd("query-block")["return"][0]["inserted"]
    assert (info["bps_rd"], info["bps_wr"]) == (8 << 20, 0)
    c.close()


def test_stop_quiesces_until_cont(workdir: Path, serve: Any) -> None:
    make_image(workdir, size="1M")
    s = serve(["-drive", "file=a.qcow2,if=none,id=drive0"], workdir)
    c = NbdClient(s.sock, "drive0")
    assert c.write(0, b"x" * 4096) == 0
    assert s.qmp.cmd("stop") == {"return": {}}
    handle = c.send(w.CMD_WRITE, 4096, 4096, b"y" * 4096)
    ready, _, _ = select.select([c.sock], [], [], 0.5)
    assert not ready  # held while paused
    assert stats(s.qmp)["wr_operations"] == 1
    assert s.qmp.cmd("cont") == {"return": {}}
    assert c.receive() == (handle, Reply())
    assert stats(s.qmp)["wr_operations"] == 2
    assert c.read(4096, 4096) == b"y" * 4096
    c.close()


def test_savevm_under_write_load(workdir: Path, serve: Any) -> None:
    make_image(workdir, size="4M")
    s = serve(["-drive", "file=a.qcow2,if=none,id=drive0"], workdir)
    stop = threading.Event()
    errors: list[BaseException] = []
    written: dict[int, int] = {}

    def load() -> None:
        try:
            c = NbdClient(s.sock, "drive0")
            i = 0
            while not stop.is_set():
                block = i % 64
                assert c.write(block * 65536, bytes([i % 255 + 1]) * 65536) == 0
                written[block] = i % 255 + 1
                i += 1
            c.close()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    t = threading.Thread(target=load)
    t.start()
    try:
        for n in range(3):
            assert s.qmp.hmp(f"savevm snap{n}") == ""
    finally:
        stop.set()
        t.join()
    assert not errors
    s.qmp.cmd("quit")
    s.proc.wait(timeout=30)
    assert qemu_img("check", str(workdir / "a.qcow2")).returncode == 0
    out = qemu_img("snapshot", "-l", str(workdir / "a.qcow2")).stdout
    assert all(f"snap{n}" in out for n in range(3))
    raw = workdir / "out.raw"
    assert qemu_img("convert", "-O", "raw", str(workdir / "a.qcow2"), str(raw)).returncode == 0
    data = raw.read_bytes()
    for block, value in written.items():
        assert data[block * 65536:(block + 1) * 65536] == bytes([value]) * 65536


def test_loadvm_reverts_what_nbd_clients_see(workdir: Path, serve: Any) -> None:
    make_image(workdir, size="1M")
    s = serve(["-drive", "file=a.qcow2,if=none,id=drive0"], workdir)
    c = NbdClient(s.sock, "drive0")
    assert c.write(0, b"A" * 65536) == 0
    assert s.qmp.hmp("savevm one") == ""
    assert c.write(0, b"B" * 4096) == 0 and c.write(131072, b"C" * 4096) == 0
    assert c.read(0, 8192) == b"B" * 4096 + b"A" * 4096
    assert s.qmp.hmp("loadvm one") == ""
    # same connection, same export: the reverted disk
    assert c.read(0, 8192) == b"A" * 8192
    assert c.read(131072, 4096) == bytes(4096)
    assert s.qmp.cmd("query-block-exports")["return"][0]["id"] == "drive0"
    c.close()


def test_cached_renderings_follow_nbd_writes(workdir: Path, serve: Any) -> None:
    """query-block and query-named-block-nodes reuse their renderings only while the files are unchanged.

    NBD writes are no monitor command, so only the file state can tell the
    cached answers are stale: every answer must give the file's allocation now.
    """
    import os

    make_image(workdir, size="4M")
    s = serve(["-drive", "file=a.qcow2,if=none,id=drive0"], workdir)

    def sizes() -> list[int]:
        blk = s.qmp.cmd("query-block")["return"][0]["inserted"]["image"]["actual-size"]
        nodes = [n["image"]["actual-size"] for n in s.qmp.cmd("query-named-block-nodes")["return"]]
        return [blk, *nodes]

    def on_disk() -> int:
        return os.stat(workdir / "a.qcow2").st_blocks * 512

    first = sizes()
    assert sizes() == first == [on_disk()] * 3  # format node and file node: the same file
    c = NbdClient(s.sock, "drive0")
    for i in range(8):
        assert c.write(i * 262144, b"x" * 65536) == 0
    assert c.request(w.CMD_FLUSH).error == 0
    c.close()
    after = sizes()
    assert after == [on_disk()] * 3 and after[0] > first[0]
