"""``snapshot -l`` (and info's snapshot table) on snapshots that carry VM state.

One ``qemu-system-x86_64`` per module makes the image: HMP ``savevm`` while
paused and after running (VM state size, VM clock, no icount), a persistent
dirty bitmap through QMP, and a ``delvm``.  Both tools then read the image in
several time zones.  Also checks vdkit's ``snapshot -l --output=json``
extension against the ``snapshots`` member of ``qemu-img info --output=json``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.data import generate as g
from tests.data.compare import compare_image, run_vdkit, same, same_snapshot_json


@pytest.fixture(scope="module")
def vm_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_tool("qemu-system-x86_64")
    require_tool("qemu-img")
    d = tmp_path_factory.mktemp("vm")
    img = g.create(d, "vm.qcow2", "64M")
    g.snapshot(img, "-c", "offline")
    with g.Vm(img) as vm:
        assert "Error" not in vm.hmp("savevm vmsnap1")
        vm.cmd("cont")
        vm.cmd("block-dirty-bitmap-add", node="d0", name="bm0", persistent=True)
        vm.cmd("block-dirty-bitmap-add", node="d0", name="bm-gran", persistent=True, granularity=1 << 20)
        vm.cmd("stop")
        assert "Error" not in vm.hmp("savevm running1")
        assert "Error" not in vm.hmp("savevm doomed")
        assert "Error" not in vm.hmp("delvm doomed")
        assert "Error" not in vm.hmp("savevm 4")  # a name that looks like an ID
    return img


def test_vm_state_snapshots(vm_image: Path) -> None:
    compare_image(vm_image.name, vm_image.parent)


@pytest.mark.parametrize("tz", ["Asia/Kolkata", "Pacific/Chatham"])
def test_vm_state_snapshots_timezone(tz: str, vm_image: Path) -> None:
    for args in (["snapshot", "-l", vm_image.name], ["info", vm_image.name]):
        same(args, vm_image.parent, env={"TZ": tz})


def test_vm_state_blank_icount(vm_image: Path) -> None:
    """savevm leaves icount unused: the ICOUNT column is blank padding (11 spaces)."""
    out = run_vdkit(["snapshot", "-l", vm_image.name], vm_image.parent).stdout
    rows = [line for line in out.splitlines() if "vmsnap1" in line or "running1" in line]
    assert len(rows) == 2 and all(r.endswith(" " * 11) for r in rows)


def test_vm_image_used_as_backing(vm_image: Path, tmp_path: Path) -> None:
    shutil.copy(vm_image, tmp_path / "base.qcow2")
    g.create(tmp_path, "top.qcow2", None, backing="base.qcow2", backing_fmt="qcow2")
    compare_image("top.qcow2", tmp_path)


def test_snapshot_json_matches_info(vm_image: Path) -> None:
    same_snapshot_json(vm_image.name, vm_image.parent)
    same_snapshot_json(vm_image.name, vm_image.parent, env={"TZ": "Asia/Kolkata"})


def test_snapshot_json_empty(tmp_path: Path) -> None:
    """No snapshots: ``snapshot -l`` prints nothing, the JSON form an empty array."""
    g.create(tmp_path, "e.qcow2", "1M")
    same(["snapshot", "-l", "e.qcow2"], tmp_path)
    r = run_vdkit(["snapshot", "-l", "--output=json", "e.qcow2"], tmp_path)
    assert (r.returncode, r.stdout, r.stderr) == (0, "[\n]\n", "")
    (tmp_path / "r.raw").write_bytes(bytes(512))
    r = run_vdkit(["snapshot", "-l", "--output=json", "r.raw"], tmp_path)
    assert (r.returncode, r.stdout, r.stderr) == (0, "[\n]\n", "")


def test_snapshot_json_force_share_and_order(tmp_path: Path) -> None:
    img = g.create(tmp_path, "o.qcow2", "1M")
    for name in ("b", "a", "10", "2", "ä"):
        g.snapshot(img, "-c", name)
    g.snapshot(img, "-d", "a")
    same_snapshot_json("o.qcow2", tmp_path)
    same_snapshot_json("o.qcow2", tmp_path, extra=("-U",))
    same(["snapshot", "-l", "-U", "o.qcow2"], tmp_path)


def test_snapshot_list_broken_table(tmp_path: Path) -> None:
    """A table whose names run past EOF: both tools agree (missing bytes read as zero)."""
    img = g.create(tmp_path, "t.qcow2", "1M")
    g.snapshot(img, "-c", "x" * 100)
    snap_off = g.get_u64(img, g.OFF_SNAPSHOTS_OFFSET)
    g.truncate(img, snap_off + 40 + 24 + 1 + 50)
    compare_image("t.qcow2", tmp_path)
