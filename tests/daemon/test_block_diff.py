"""Block queries and HMP ``info block``: vdkit-daemon against QEMU 7.2 on identical images.

Both processes get the same ``-drive ...,if=none`` options on byte-identical
copies of the images; responses are compared as raw lines (key order
included) after blanking automatic node names, ``qdev``, snapshot times and
VM state sizes (``conftest.normalise``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.conftest import check_ok
from tests.daemon.conftest import Daemons, Monitor, normalise, same_hmp, same_qmp

DRIVES = [
    "-drive", "file=a.qcow2,if=none,id=d0,format=qcow2",
    "-drive", "file=top.qcow2,if=none,id=chain,readonly=on",
    "-drive", "file=r.raw,if=none,id=rawd,format=raw,cache=none",
    "-drive", "file=z.qcow2,if=none,id=zd,detect-zeroes=on,cache=unsafe,node-name=mynode",
    "-drive", "if=none,id=empty2",
    "-drive", "file=thr.qcow2,if=none,id=thr,bps=1000000,iops_rd=50,iops_rd_max=100,group=g1",
]


def _setup(d: Path) -> None:
    check_ok("create", "-q", "-f", "qcow2", str(d / "a.qcow2"), "64M")
    check_ok("snapshot", "-c", "s1", str(d / "a.qcow2"))
    check_ok("snapshot", "-c", "s2", str(d / "a.qcow2"))
    check_ok("create", "-q", "-f", "qcow2", str(d / "base.qcow2"), "16M")
    check_ok("snapshot", "-c", "sb", str(d / "base.qcow2"))
    check_ok("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(d / "top.qcow2"))
    check_ok("create", "-q", "-f", "raw", str(d / "r.raw"), "1M")
    check_ok("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096,lazy_refcounts=on", str(d / "z.qcow2"), "8M")
    check_ok("create", "-q", "-f", "qcow2", str(d / "thr.qcow2"), "1M")
    check_ok("create", "-q", "-f", "qcow2", str(d / "thr2.qcow2"), "2M")


@pytest.fixture
def pair(daemons: Daemons) -> tuple[Monitor, Monitor]:
    return daemons.pair(DRIVES, _setup)


def test_queries(pair: tuple[Monitor, Monitor]) -> None:
    q, v = pair
    out = same_qmp(q, v, "query-block")
    assert '"device": "empty2"' in out and '"group": "g1"' in out
    same_qmp(q, v, "query-named-block-nodes")
    same_qmp(q, v, "query-named-block-nodes", {"flat": True})
    same_qmp(q, v, "query-named-block-nodes", {"flat": False})
    same_qmp(q, v, "query-blockstats")
    same_qmp(q, v, "query-blockstats", {"query-nodes": True})
    same_qmp(q, v, "query-blockstats", {"query-nodes": False})


@pytest.mark.parametrize("line", [
    "info block", "info block -v", "info block -n", "info block -n -v", "info block d0", "info block chain",
    "info block -v chain", "info block empty2", "info block mynode", "info block nonexist", "info block -x",
    "info block d0 extra", "info snapshots", "info status", "info blockstats", "nosuchcmd", "info nosuch",
    "info snapshots extra", "help eject", "help info block", "help savevm", "help stop", "help cont",
    "help change", "help block_set_io_throttle", "help loadvm", "help delvm", "help snapshot_blkdev_internal",
    "help snapshot_delete_blkdev_internal", "help quit", "help help", "  ",
])
def test_hmp_info(pair: tuple[Monitor, Monitor], line: str) -> None:
    q, v = pair
    same_hmp(q, v, line)


THROTTLE = {"bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0}


@pytest.mark.parametrize("extra", [
    {"device": "d0", "bps": 100, "iops_wr": 5, "bps_max": 200, "iops_size": 4096},
    {"device": "d0", "bps": 100, "bps_max": 200, "bps_max_length": 0},
    {"device": "d0", "bps": 100, "bps_rd": 5},
    {"device": "d0", "iops_max": 5},
    {"device": "d0", "bps": 10, "bps_max": 5},
    {"device": "d0", "bps": 10, "bps_max_length": 5},
    {"device": "d0", "iops_size": 4096},
    {"device": "d0", "bps": -1},
    {"device": "d0", "bps": 10 ** 16},
    {"device": "d0", "bps": 10, "bps_max": 10 ** 15, "bps_max_length": 2},
    {"device": "d0", "bps": 100, "group": "grp"},
    {"device": "nonexist"},
    {"id": "nonexist"},
    {},
    {"device": "d0", "id": "x"},
    {"device": "empty2", "bps": 1},
    {"device": "d0", "bps": "1"},
    {"device": "thr"},
    {"device": "thr", "bps": 7, "group": "other"},
])
def test_block_set_io_throttle(pair: tuple[Monitor, Monitor], extra: dict[str, object]) -> None:
    q, v = pair
    same_qmp(q, v, "block_set_io_throttle", {**THROTTLE, **extra})
    same_qmp(q, v, "query-block")
    same_hmp(q, v, "info block")


def test_throttle_missing_member(pair: tuple[Monitor, Monitor]) -> None:
    q, v = pair
    args = dict(THROTTLE, device="d0")
    del args["iops"]
    same_qmp(q, v, "block_set_io_throttle", args)


def test_hmp_throttle_and_media(pair: tuple[Monitor, Monitor]) -> None:
    q, v = pair
    for line in ["block_set_io_throttle d0 1000 0 0 10 0 0", "block_set_io_throttle d0 1 0 0 0 0",
                 "block_set_io_throttle d0 1 0 0 0 0 x", "block_set_io_throttle nonexist 1 0 0 0 0 0",
                 "info block d0", "eject nonexist", "eject", "eject -f zd", "info block zd",
                 "change zd thr2.qcow2 qcow2", "info block", "change zd nonexist.qcow2", "info block zd", "stop",
                 "info status", "cont", "info status", "s", "c"]:
        same_hmp(q, v, line)


def test_eject_and_change_medium(pair: tuple[Monitor, Monitor]) -> None:
    q, v = pair
    for name, args in [
        ("eject", {"device": "d0"}),
        ("query-block", None),
        ("eject", {"device": "d0"}),
        ("blockdev-change-medium", {"device": "d0", "filename": "a.qcow2"}),
        ("query-block", None),
        ("blockdev-change-medium", {"device": "empty2", "filename": "z.qcow2", "format": "qcow2",
                                    "read-only-mode": "read-only"}),
        ("blockdev-change-medium", {"device": "empty2", "filename": "r.raw", "read-only-mode": "bogus"}),
        ("blockdev-change-medium", {"device": "empty2", "filename": "nonexist.qcow2"}),
        ("query-block", None),
        ("query-named-block-nodes", None),
    ]:
        same_qmp(q, v, name, args)


ATTACHED = ["-drive", "if=ide,media=cdrom,id=cd0", "-drive", "file=c.qcow2,if=ide,id=hd",
            "-drive", "file=r.raw,format=raw,if=virtio,id=vd"]


def _setup_attached(d: Path) -> None:
    check_ok("create", "-q", "-f", "qcow2", str(d / "c.qcow2"), "16M")
    check_ok("create", "-q", "-f", "qcow2", str(d / "iso.qcow2"), "4M")
    check_ok("create", "-q", "-f", "raw", str(d / "r.raw"), "1M")


def test_attached_devices_tray_events(daemons: Daemons) -> None:
    """Drives with if=ide/virtio model attached devices: cdrom tray, DEVICE_TRAY_MOVED, not removable disks."""
    q, v = daemons.pair(ATTACHED, _setup_attached)
    for name, args in [
        ("query-block", None),
        ("eject", {"device": "hd"}),
        ("eject", {"device": "vd"}),
        ("eject", {"device": "cd0"}),
        ("eject", {"device": "cd0"}),
        ("blockdev-change-medium", {"device": "cd0", "filename": "r.raw", "format": "raw"}),
        ("blockdev-change-medium", {"device": "cd0", "filename": "iso.qcow2"}),
        ("query-block", None),
        ("blockdev-change-medium", {"device": "cd0", "filename": "iso.qcow2", "format": "qcow2"}),
        ("query-block", None),
    ]:
        same_qmp(q, v, name, args)
    qev = [normalise(json.dumps(e["data"])) for e in q.events]
    vev = [normalise(json.dumps(e["data"])) for e in v.events]
    assert [e["event"] for e in v.events] == [e["event"] for e in q.events]
    assert len(vev) == len(qev) and all(re.sub(r'"id": "[^"]*"', "", a) == re.sub(r'"id": "[^"]*"', "", b)
                                        for a, b in zip(vev, qev, strict=True))
    for line in ["info block", "info block -v cd0", "eject -f cd0", "info block cd0"]:
        same_hmp(q, v, line)
