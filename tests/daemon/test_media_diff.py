"""Removable media: blockdev-change-medium / eject / HMP change against QEMU 7.2.

``read-only-mode=retain`` keeps the read-only state of the previous medium
(across ejects and failed changes; before any change, the ``-drive``
options': ``readonly=on`` or ``media=cdrom``), and the open errors follow
from the mode (a directory opened read-only is "not a regular file",
read-write "Is a directory").  Every drive gets its own image files, because
vdkit locks images of ``if=none`` drives for writing where QEMU does not
(``docs/daemon.md``, Locks).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import check_ok
from tests.daemon.conftest import Daemons, Monitor, same_hmp, same_qmp

DEVICES = ["cd0", "n0", "n1", "n2", "n3", "cd1"]
DRIVES = ["-drive", "if=ide,media=cdrom,id=cd0",
          "-drive", "file=n0-a.qcow2,if=none,id=n0,readonly=on",
          "-drive", "if=none,id=n1",
          "-drive", "if=none,id=n2,media=cdrom",
          "-drive", "if=none,id=n3,readonly=on",
          "-drive", "file=cd1-a.qcow2,if=ide,media=cdrom,id=cd1"]


def _setup(d: Path) -> None:
    (d / "sub").mkdir()
    (d / "lnk").symlink_to("sub")
    for dev in DEVICES:
        for name in ("a", "f"):
            check_ok("create", "-q", "-f", "qcow2", str(d / f"{dev}-{name}.qcow2"), "1M")
        for name in ("r", "s"):
            check_ok("create", "-q", "-f", "raw", str(d / f"{dev}-{name}.raw"), "1M")


@pytest.fixture
def pair(daemons: Daemons) -> tuple[Monitor, Monitor]:
    return daemons.pair(DRIVES, _setup)


def test_change_retains_previous_read_only_state(pair: tuple[Monitor, Monitor]) -> None:
    q, v = pair
    same_qmp(q, v, "query-block")
    for dev in DEVICES:
        # never the file the drive holds: QEMU's lock rules for a re-opened image are not vdkit's
        f, r, s = f"{dev}-f.qcow2", f"{dev}-r.raw", f"{dev}-s.raw"
        for name, args in [
            ("blockdev-change-medium", {"filename": r}),  # the -drive options' state
            ("blockdev-change-medium", {"filename": f, "read-only-mode": "read-write"}),
            ("blockdev-change-medium", {"filename": r}),  # retains read-write
            ("eject", {}),
            ("blockdev-change-medium", {"filename": r}),  # across an eject too
            ("blockdev-change-medium", {"filename": "nonexist", "read-only-mode": "read-only"}),
            ("blockdev-change-medium", {"filename": "sub"}),  # a failed change changes nothing
            ("blockdev-change-medium", {"filename": s}),
            ("blockdev-change-medium", {"filename": r, "read-only-mode": "read-only"}),
            ("blockdev-change-medium", {"filename": "sub"}),
            ("eject", {}),
            ("blockdev-change-medium", {"filename": r}),
        ]:
            same_qmp(q, v, name, {"device": dev, **args})
            same_qmp(q, v, "query-block")
    assert [e["event"] for e in v.events] == [e["event"] for e in q.events]
    assert [e["data"]["tray-open"] for e in v.events] == [e["data"]["tray-open"] for e in q.events]


@pytest.mark.parametrize("target", ["/tmp", "sub", "lnk", "sub/", "/"])
@pytest.mark.parametrize("mode", ["retain", "read-only", "read-write"])
def test_change_to_directory(pair: tuple[Monitor, Monitor], target: str, mode: str) -> None:
    q, v = pair
    for dev in ("cd0", "n1"):
        for fmt in (None, "raw", "qcow2"):
            args: dict[str, object] = {"device": dev, "filename": target, "read-only-mode": mode}
            if fmt:
                args["format"] = fmt
            same_qmp(q, v, "blockdev-change-medium", args)


def test_hmp_change_retain(pair: tuple[Monitor, Monitor]) -> None:
    q, v = pair
    for line in ["change cd0 cd0-f.qcow2 qcow2 read-write", "change cd0 cd0-r.raw", "change cd0 /tmp",
                 "eject cd0", "change cd0 sub raw", "change cd0 cd0-a.qcow2 qcow2 read-only", "change cd0 /tmp",
                 "change n1 n1-r.raw raw", "change n1 sub"]:
        same_hmp(q, v, line)
        same_qmp(q, v, "query-block")


def test_empty_qdev_id(pair: tuple[Monitor, Monitor]) -> None:
    """``id: ""`` names QEMU's peripheral container, not a device: the same refusal everywhere."""
    q, v = pair
    for name, args in [("eject", {"id": ""}), ("eject", {"id": "nosuch"}), ("eject", {"device": ""}),
                       ("blockdev-change-medium", {"id": "", "filename": "cd0-r.raw"}),
                       ("block_set_io_throttle", {"id": "", "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0,
                                                  "iops_rd": 0, "iops_wr": 0})]:
        same_qmp(q, v, name, args)
