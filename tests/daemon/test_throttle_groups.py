"""Throttle groups: one configuration per group, as in QEMU 7.2 (vdkit-daemon against qemu-system-x86_64).

Whoever sets limits for a group (``block_set_io_throttle ...,group=g`` or a
``-drive ...,group=g``) sets them for every member; a throttled drive stays in
its group when no group is named; all-zero limits take a drive out of
throttling.  Compared: the command answers, ``query-block`` and ``info block``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import check_ok
from tests.daemon.conftest import Daemons, Monitor, same_hmp, same_qmp

ZERO = {"bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0}


def _setup(d: Path) -> None:
    for n in "abc":
        check_ok("create", "-q", "-f", "qcow2", str(d / f"{n}.qcow2"), "16M")


def _compare_state(q: Monitor, v: Monitor) -> None:
    same_qmp(q, v, "query-block")
    same_hmp(q, v, "info block")


def test_block_set_io_throttle_groups(daemons: Daemons) -> None:
    q, v = daemons.pair(["-drive", "file=a.qcow2,if=none,id=d0", "-drive", "file=b.qcow2,if=none,id=d1",
                         "-drive", "file=c.qcow2,if=none,id=d2"], _setup)
    for args in [
        {"device": "d0", "bps": 100, "group": "g"},
        {"device": "d1", "iops": 50, "group": "g"},   # the group's limits change for d0 too
        {"device": "d1", "iops": 60},                  # stays in g
        {"device": "d2", "bps": 7},                    # its own group, named after the device
        {"device": "d2", "bps": 8, "group": "g"},
        {"device": "d0"},                              # out of throttling; g keeps its limits
        {"device": "d0", "group": "g"},
        {"device": "d0", "bps": 5, "group": "d2"},     # a group named like a device
        {"device": "d1", "bps": 9, "group": "h"},
        {"device": "d2", "bps_max": 10, "bps": 20, "group": "g"},  # invalid: nothing changes
    ]:
        same_qmp(q, v, "block_set_io_throttle", {**ZERO, **args})
        _compare_state(q, v)
    for name, args in [("eject", {"device": "d1"}), ("blockdev-change-medium", {"device": "d1", "filename": "b.qcow2"}),
                       ("block_set_io_throttle", {**ZERO, "device": "d1", "iops": 3, "group": "d2"})]:
        same_qmp(q, v, name, args)
        _compare_state(q, v)
    same_hmp(q, v, "block_set_io_throttle d2 1 0 0 0 0 0")
    _compare_state(q, v)


@pytest.mark.parametrize("drives", [
    ["file=a.qcow2,if=none,id=d0,iops=100,group=gg", "file=b.qcow2,if=none,id=d1,bps=100,throttling.group=gg"],
    ["file=a.qcow2,if=none,id=d0,iops=100,group=gg", "file=b.qcow2,if=none,id=d1,group=gg"],
    ["file=a.qcow2,if=none,id=d0,group=gg", "file=b.qcow2,if=none,id=d1,bps=3,group=gg"],
    ["file=a.qcow2,if=none,id=d0,iops=100,group=d1", "file=b.qcow2,if=none,id=d1,bps=3"],
    ["file=a.qcow2,if=none,id=d0,iops=100", "file=b.qcow2,if=none,id=d1,bps=3,group=d0"],
    ["if=none,id=d0,iops=100,group=gg", "file=b.qcow2,if=none,id=d1,bps=3,group=gg"],
    ["file=a.qcow2,if=virtio,id=v2,iops=100,iops_max=200,throttling.iops-total-max-length=10,iops_size=4096,group=gg",
     "file=c.qcow2,if=virtio,id=v4,bps=100,group=gg"],
])
def test_drive_option_groups(daemons: Daemons, drives: list[str]) -> None:
    """The last -drive of a group sets the group's limits; a medium inserted later gets them too."""
    q, v = daemons.pair([a for d in drives for a in ("-drive", d)], _setup)
    _compare_state(q, v)
    if drives[0].startswith("if=none,id=d0"):
        same_qmp(q, v, "blockdev-change-medium", {"device": "d0", "filename": "c.qcow2"})
        _compare_state(q, v)


def test_loadvm_restores_groups_consistently(daemons: Daemons, tmp_path: Path) -> None:
    """vdkit's VM state carries throttling (docs/daemon.md): a restored group still has one configuration."""
    _setup(tmp_path)
    _, path, _ = daemons.vdkit(["-drive", "file=a.qcow2,if=none,id=d0", "-drive", "file=b.qcow2,if=none,id=d1",
                                "-drive", "file=c.qcow2,if=none,id=d2"], tmp_path)
    m = daemons.monitor(path).negotiate()
    m.cmd("block_set_io_throttle", {**ZERO, "device": "d0", "bps": 100, "group": "g"})
    m.cmd("block_set_io_throttle", {**ZERO, "device": "d1", "iops": 50, "group": "g"})
    assert m.hmp("savevm s") == ""
    m.cmd("block_set_io_throttle", {**ZERO, "device": "d1", "bps": 9, "group": "h"})
    m.cmd("block_set_io_throttle", {**ZERO, "device": "d2", "bps": 7, "group": "g"})
    assert m.hmp("loadvm s") == ""
    got = [(b["device"], b["inserted"].get("group"), b["inserted"]["bps"], b["inserted"]["iops"])
           for b in m.cmd("query-block")["return"]]
    assert got == [("d0", "g", 0, 50), ("d1", "g", 0, 50), ("d2", None, 0, 0)]
