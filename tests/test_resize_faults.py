"""Crash safety of a preallocated qcow2 growth, by fault injection.

The growth is run once to count its writes W; then for every cut N in
0..W-1 the image file accepts N writes and fails every later one (the
process is gone: nothing is repaired).  ``qemu-img check`` must then find no
corruption (leaks are allowed), and the image must show either the old disk
or the grown one (old data, zeros after it), with its snapshot untouched.
The write order that makes this hold: refcounts before the entries that use
them, L2 tables before their L1 entry, decrements after the tables dropped
the cluster, the size field last.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import check_ok, qemu_io
from tests.data.faults import run_cut
from tests.diff.test_snapshot_write import check_counts, guest
from vdkit.cli.resize import resize_node
from vdkit.errors import VdkitError

OLD, NEW = 1001 * 1024, 2600 * 1024  # crosses an L2 table boundary: the L1 table grows


def _grow(path: Path, mode: str, cut_after: int | None) -> int:
    """Grow ``path`` to NEW with ``mode``; with ``cut_after``, fail writes from that one on. Returns writes done."""
    return run_cut(path, lambda node: resize_node(node, NEW, mode), cut_after, errors=(VdkitError, OSError))


def _snapshot_kept(path: Path, snap: bytes) -> bool:
    """The snapshot's disk is unchanged (qemu-img reads it at the image's current size: zeros after it)."""
    data = guest(path, "1")
    return data[: len(snap)] == snap and not any(data[len(snap) :])


@pytest.mark.parametrize("mode", ["falloc", "metadata"])
def test_every_cut_leaves_old_or_grown(tmp_path: Path, mode: str) -> None:
    base = tmp_path / "base.qcow2"
    # 4 KiB clusters, an old end inside a written cluster shared with a snapshot (COW of the
    # cluster and of its L2 table), an L1 table and refcount structures that must grow.
    check_ok("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(base), str(OLD))
    for cmd in ("write -P 1 0 40k", "write -P 2 990k 11k"):
        assert qemu_io("-c", cmd, str(base)).returncode == 0
    check_ok("snapshot", "-c", "s1", str(base))
    assert qemu_io("-c", "write -P 3 996k 4k", str(base)).returncode == 0
    old, snap = guest(base), guest(base, "1")
    grown = old + bytes(NEW - OLD)
    done = tmp_path / "done.qcow2"
    shutil.copy(base, done)
    writes = _grow(done, mode, None)
    assert check_counts(done) == (0, {"corruptions": 0, "leaks": 0, "check-errors": 0})
    assert guest(done) == grown and _snapshot_kept(done, snap)
    assert writes >= 5
    img = tmp_path / "cut.qcow2"
    for n in range(writes):
        shutil.copy(base, img)
        _grow(img, mode, n)
        rc, counts = check_counts(img)
        assert rc in (0, 3) and counts["corruptions"] == 0 and counts["check-errors"] == 0, (n, counts)
        assert guest(img) in (old, grown), n
        assert _snapshot_kept(img, snap), n
