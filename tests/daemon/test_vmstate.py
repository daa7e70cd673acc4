"""savevm/loadvm carry the daemon's device state (throttling, media, VM clock)."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import check_ok
from tests.daemon.conftest import Daemons
from vdkit.devices.registry import DeviceRegistry
from vdkit.monitor import block_cmds

THROTTLE = {"bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0}


def test_loadvm_restores_device_state(daemons: Daemons, tmp_path: Path) -> None:
    for name in ("d0", "d1", "cd"):
        check_ok("create", "-q", "-f", "qcow2", str(tmp_path / f"{name}.qcow2"), "8M")
    proc, path, _ = daemons.vdkit(["-drive", "file=d0.qcow2,if=none,id=d0", "-drive", "file=d1.qcow2,if=none,id=d1",
                                "-drive", "file=cd.qcow2,if=none,id=cd,readonly=on"], tmp_path)
    m = daemons.monitor(path).negotiate()
    assert m.cmd("block_set_io_throttle", {**THROTTLE, "device": "d1", "bps": 4096, "bps_max": 8192}) == \
        {"return": {}}
    assert m.hmp("savevm withthrottle") == ""
    before = m.cmd("query-block")["return"]
    # change everything the state covers
    m.cmd("block_set_io_throttle", {**THROTTLE, "device": "d1"})
    m.cmd("block_set_io_throttle", {**THROTTLE, "device": "d0", "iops": 9})
    assert m.cmd("eject", {"device": "cd"}) == {"return": {}}
    m.hmp("snapshot_blkdev_internal d0 later")
    assert m.hmp("loadvm withthrottle") == ""
    after = m.cmd("query-block")["return"]
    for b in before + after:
        b["inserted"].pop("node-name", None)
        b["inserted"]["image"].pop("actual-size", None)
    later = [s for s in after[0]["inserted"]["image"]["snapshots"] if s["name"] == "later"]
    assert len(later) == 1  # loadvm keeps other snapshots
    after[0]["inserted"]["image"]["snapshots"].remove(later[0])
    assert after == before
    assert m.cmd("query-status")["return"]["status"] == "prelaunch"  # not running before: stays stopped
    m.cmd("quit")
    assert proc.wait(timeout=20) == 0  # quit answers before the images close (as QEMU): wait for the locks
    for name in ("d0", "d1"):
        check_ok("check", str(tmp_path / f"{name}.qcow2"))


def test_vmstate_is_not_a_migration_stream() -> None:
    machine = DeviceRegistry(start_paused=True)
    raw = block_cmds._encode_vmstate(machine, "paused")
    assert not raw.startswith(b"QEVM")
    assert raw.startswith(block_cmds.VMSTATE_MAGIC)
    other = DeviceRegistry(start_paused=True)
    block_cmds._apply_vmstate(other, raw)
    assert other.vm_clock_ns() == 0


def test_vmstate_survives_restart(daemons: Daemons, tmp_path: Path) -> None:
    check_ok("create", "-q", "-f", "qcow2", str(tmp_path / "d0.qcow2"), "8M")
    drives = ["-drive", "file=d0.qcow2,if=none,id=d0"]
    proc, path, _ = daemons.vdkit(drives, tmp_path)
    m = daemons.monitor(path).negotiate()
    m.cmd("block_set_io_throttle", {**THROTTLE, "device": "d0", "iops": 77})
    assert m.hmp("savevm persisted") == ""
    m.cmd("quit")
    assert proc.wait(timeout=20) == 0
    check_ok("check", str(tmp_path / "d0.qcow2"))
    _, path2, _ = daemons.vdkit(drives, tmp_path)
    m2 = daemons.monitor(path2).negotiate()
    assert m2.cmd("query-block")["return"][0]["inserted"]["iops"] == 0
    assert m2.hmp("loadvm persisted") == ""
    assert m2.cmd("query-block")["return"][0]["inserted"]["iops"] == 77


def test_vmstate_area_matches_qemu(daemons: Daemons, tmp_path: Path) -> None:
    """vdkit finds QEMU's migration stream where QEMU put it, and reverts disks of QEMU's VM snapshots."""
    check_ok("create", "-q", "-f", "qcow2", str(tmp_path / "q.qcow2"), "8M")
    proc, qpath, _ = daemons.qemu(["-drive", "file=q.qcow2,if=none,id=d0"], tmp_path)
    q = daemons.monitor(qpath).negotiate()
    assert q.hmp("savevm fromqemu") == ""
    q.cmd("quit")
    proc.wait(timeout=30)
    from vdkit.block.node import open_image

    node = open_image(str(tmp_path / "q.qcow2"))
    try:
        entry = node.driver.snapshots()[0]
        assert entry.vm_state_size > 0
        raw = node.driver.read_vmstate(entry)  # the slot loadvm reads through
        assert raw.startswith(b"QEVM")
    finally:
        node.close()
    vproc, vpath, _ = daemons.vdkit(["-drive", "file=q.qcow2,if=none,id=d0"], tmp_path)
    v = daemons.monitor(vpath).negotiate()
    assert v.hmp("loadvm fromqemu") == ""
    v.cmd("quit")
    assert vproc.wait(timeout=20) == 0  # the image closes after the answer
    check_ok("check", str(tmp_path / "q.qcow2"))
