"""Crash safety of snapshot create/delete/revert by fault injection.

For an operation that performs W writes, every cut N in 0..W-1 is simulated:
the image file's ``pwrite`` succeeds N times and then fails, and every later
write fails too (the "machine" is gone; nothing is truncated or repaired).
After each cut ``qemu-img check`` must find no corruption and the image must
show exactly the old state or exactly the new state (snapshot list and
guest content of the active layer and of every snapshot).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import check_ok, qemu_io
from tests.data.faults import run_cut
from tests.diff.test_snapshot_write import check_counts, guest, snapshot_list
from vdkit.block.node import Node
from vdkit.errors import VdkitError
from vdkit.formats.qcow2 import snapshot_ops

# every test on both table backends (vdkit.io.tables): lists and numpy
pytestmark = pytest.mark.usefixtures("table_backend")


def _state(path: Path) -> tuple[object, ...]:
    snaps = snapshot_list(path)
    return (
        tuple(sorted((str(s["id"]), str(s["name"])) for s in snaps)),
        guest(path),
        tuple(guest(path, str(s["id"])) for s in snaps),
    )


Op = Callable[[Node], None]


def _run(path: Path, op: Op, cut_after: int | None) -> int:
    """Run ``op`` on ``path``; with ``cut_after``, fail writes from that one on. Returns writes done."""
    return run_cut(path, op, cut_after, errors=(VdkitError,))


def _create(node: Node) -> None:
    node.snapshot_create("new", date_sec=1, date_nsec=2)


def _create_vm(node: Node) -> None:
    node.snapshot_create("vm", date_sec=1, date_nsec=2, vm_state=bytes(range(256)) * 40)


def _delete(node: Node) -> None:
    node.snapshot_delete(name="s1")


def _revert(node: Node) -> None:
    entry = snapshot_ops.find_id_then_name(node.driver.snapshots(), "s1")
    assert entry is not None
    node.snapshot_revert(entry)


def _base(tmp_path: Path, opts: str, size: str) -> Path:
    base = tmp_path / "base.qcow2"
    check_ok("create", "-q", "-f", "qcow2", "-o", opts, str(base), size)
    for cmd in ("write -P 1 0 20k", "write -P 2 600k 8k", "write -c -P 3 896k 16k", "write -P 7 1M 900k"):
        assert qemu_io("-c", cmd, str(base)).returncode == 0
    check_ok("snapshot", "-c", "s1", str(base))
    for cmd in ("write -P 4 2k 2k", "write -P 5 700k 1k"):
        assert qemu_io("-c", cmd, str(base)).returncode == 0
    check_ok("snapshot", "-c", "s2", str(base))
    assert qemu_io("-c", "write -P 6 1k 1k", str(base)).returncode == 0
    return base


@pytest.mark.parametrize("op", [_create, _create_vm, _delete, _revert],
                         ids=["create", "create-vmstate", "delete", "revert"])
@pytest.mark.parametrize("opts,size", [("cluster_size=1k,refcount_bits=16", "2M"),
                                       ("cluster_size=512,refcount_bits=8", "2M"),
                                       ("cluster_size=16k,extended_l2=on", "2M"),
                                       ("cluster_size=512,refcount_bits=64", "2M")])
def test_every_cut_leaves_old_or_new(tmp_path: Path, op: Op, opts: str, size: str) -> None:
    base = _base(tmp_path, opts, size)
    old = _state(base)
    done = tmp_path / "done.qcow2"
    shutil.copy(base, done)
    writes = _run(done, op, None)
    new = _state(done)
    assert new != old
    assert check_counts(done) == (0, {"corruptions": 0, "leaks": 0, "check-errors": 0})
    assert writes >= 3
    img = tmp_path / "cut.qcow2"
    for n in range(writes):
        shutil.copy(base, img)
        _run(img, op, n)
        rc, counts = check_counts(img)
        assert rc in (0, 3) and counts["corruptions"] == 0 and counts["check-errors"] == 0, (n, counts)
        assert _state(img) in (old, new), n
