"""x-debug-query-block-graph while stream, commit and backup jobs run, against qemu-system-x86_64.

The mirror's drawing is checked in ``test_mirror_diff``; here the other jobs: each is started with
``speed`` 1 and paused (the graph then holds still), and the whole debug graph is compared with QEMU's:
the ``block-job`` vertex and its edges (``main node``, ``active node``, ``intermediate node``, ``base``,
``source``, ``target``) with their permissions, the filter the job put in (``copy-on-read``,
``commit_top``, ``mirror_top``, ``copy-before-write``) under every parent of its node, the nodes a backup
opened for its target, and the BlockBackends the job holds, numbered as QEMU numbers them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from tests.conftest import qemu_img
from tests.daemon.conftest import Daemons
from tests.daemon.test_mirror_diff import Pair

_PROGRESS = re.compile(r'"len": \d+, "offset": \d+')

_CHAIN = ["-blockdev", "driver=file,filename=DIR/base.qcow2,node-name=f-base",
          "-blockdev", "driver=qcow2,file=f-base,node-name=n-base",
          "-blockdev", "driver=file,filename=DIR/mid.qcow2,node-name=f-mid",
          "-blockdev", "driver=qcow2,file=f-mid,node-name=n-mid,backing=n-base",
          "-blockdev", "driver=file,filename=DIR/top.qcow2,node-name=f-top",
          "-blockdev", "driver=qcow2,file=f-top,node-name=n-top,backing=n-mid"]


def _held(p: Pair, cmd: str, args: dict[str, Any], *, pauses: int = 1) -> None:
    """Start a job held still (speed 1, then paused) and compare the graph; ``pauses``: the paused events
    to wait for (a backup's start sends a paused/running pair of its own)."""
    assert p.same(cmd, {"job-id": "j", "speed": 1, **args}) == '{"return": {}}'
    p.same("block-job-pause", {"device": "j"})
    p.wait("JOB_STATUS_CHANGE", pauses, status="paused")
    p.same("x-debug-query-block-graph")


def _cancel(p: Pair) -> None:
    p.same("block-job-cancel", {"device": "j", "force": True})
    p.wait("JOB_STATUS_CHANGE", status="null")
    p.same_events(mask=_PROGRESS)
    p.same("x-debug-query-block-graph")  # as before the job


def test_stream_commit_and_backup_of_a_drive_drawn(daemons: Daemons, tmp_path: Path) -> None:
    """A -drive's chain: stream (copy-on-read filter, its backend, the layers it drops), intermediate
    commit (commit_top under the overlay, backends on top and base), active commit before and after ready
    (mirror_top, the base as target), drive-backup full and top (copy-before-write, the target's nodes
    with the backing chain its header names) and blockdev-backup onto a graph node."""
    p = Pair(daemons, tmp_path)
    for d in p.dirs:
        assert qemu_img("create", "-q", "-f", "qcow2", str(d / "bt.qcow2"), "4M").returncode == 0
    for bad in ("a b", "disk0"):  # refused before the job exists (no events)
        p.same("drive-backup", {"device": "disk0", "target": "DIR/b-x.qcow2", "sync": "full", "job-id": "x",
                                "filter-node-name": bad})
    p.same("drive-mirror", {"device": "disk0", "target": "DIR/m-x.qcow2", "sync": "full", "job-id": "x",
                            "filter-node-name": "fm"})  # not in drive-mirror's schema
    p.same_events()
    _held(p, "block-stream", {"device": "disk0"})
    _cancel(p)
    _held(p, "drive-backup", {"device": "disk0", "target": "DIR/b-full.qcow2", "sync": "full"}, pauses=2)
    _cancel(p)
    _held(p, "drive-backup", {"device": "disk0", "target": "DIR/b-top.qcow2", "sync": "top"}, pauses=2)
    _cancel(p)
    _held(p, "drive-backup", {"device": "disk0", "target": "DIR/b-none.qcow2", "sync": "none"}, pauses=2)
    _cancel(p)  # (its target's backing is the drive's node, below the filter)
    p.same("blockdev-add", {"driver": "qcow2", "node-name": "n-bt",
                            "file": {"driver": "file", "filename": "DIR/bt.qcow2"}})
    _held(p, "blockdev-backup", {"device": "disk0", "target": "n-bt", "sync": "full"}, pauses=2)
    _cancel(p)
    for bad in ("a b", "n-bt"):  # blockdev-mirror's filter name: checked before the job exists
        p.same("blockdev-mirror", {"device": "disk0", "target": "n-bt", "sync": "full", "job-id": "x",
                                   "filter-node-name": bad})
    _held(p, "blockdev-mirror", {"device": "disk0", "target": "n-bt", "sync": "full", "filter-node-name": "mf"})
    # how far the copies into bt got before their pauses is timing
    bt_grown = re.compile(r'"virtual-size": \d+(?=, "filename": "DIR/bt.qcow2", "format": "file")|"count": \d+')
    p.same("query-named-block-nodes", mask=bt_grown)
    _cancel(p)
    p.same("query-named-block-nodes", mask=bt_grown)  # the name is free again
    _held(p, "block-commit", {"device": "disk0", "top": "DIR/mid.qcow2"})
    _cancel(p)
    _held(p, "block-commit", {"device": "disk0"})
    p.same("block-job-set-speed", {"device": "j", "speed": 0})
    p.same("block-job-resume", {"device": "j"})
    p.wait("BLOCK_JOB_READY")
    p.same("x-debug-query-block-graph")  # ready: drawn alike
    _cancel(p)  # (the base stays read-write afterwards, as QEMU's)
    # a finished backup waiting to be finalized still holds its filter and target (nothing is queried
    # while concluded: qemu-system-x86_64 7.2 was seen to die answering query-named-block-nodes with a
    # concluded, undismissed stream job)
    p.same("drive-backup", {"device": "disk0", "target": "DIR/b-p.qcow2", "sync": "full", "job-id": "j",
                            "auto-finalize": False, "auto-dismiss": False})
    p.wait("JOB_STATUS_CHANGE", status="pending")
    p.same("x-debug-query-block-graph")
    p.same("block-job-finalize", {"id": "j"})
    p.wait("JOB_STATUS_CHANGE", status="concluded")
    p.same("block-job-dismiss", {"id": "j"})
    p.wait("JOB_STATUS_CHANGE", status="null")
    p.same_events(mask=_PROGRESS)
    p.same("x-debug-query-block-graph")


def test_jobs_of_blockdev_nodes_drawn(daemons: Daemons, tmp_path: Path) -> None:
    """A -blockdev chain under a writable NBD export: the export's backend moves onto the job's filter; a
    stream into a backing node puts copy-on-read under the overlay's backing edge; drive-backup's target
    nodes are listed (query-named-block-nodes) and drawn while the job holds them, and gone afterwards
    (sync none: over the source node); blockdev-backup onto a graph node."""
    from tests.daemon.test_mirror_diff import _same_lock_bytes

    p = Pair(daemons, tmp_path, drive=_CHAIN)
    for d in p.dirs:
        assert qemu_img("create", "-q", "-f", "qcow2", str(d / "bt.qcow2"), "4M").returncode == 0
    # no user above the node yet: the filter passes no needs down; its name as given
    _held(p, "drive-backup", {"device": "n-top", "target": "DIR/b0.qcow2", "sync": "full",
                              "filter-node-name": "fl"}, pauses=2)
    _cancel(p)
    p.same("query-named-block-nodes")  # the name is free again
    p.same("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "DIR/n.sock"}}})
    p.same("block-export-add", {"type": "nbd", "id": "e", "node-name": "n-top", "writable": True})
    _held(p, "block-stream", {"device": "n-top", "base-node": "n-base"})
    _cancel(p)
    _held(p, "block-stream", {"device": "n-mid"})
    _cancel(p)
    _held(p, "block-commit", {"device": "n-top", "top-node": "n-mid"})
    _cancel(p)
    _held(p, "block-commit", {"device": "n-top"})
    _cancel(p)
    # how far the copy got before the pause is timing: the target file's length, the job bitmaps' counts
    grown = re.compile(r'"virtual-size": \d+(?=, "filename": "DIR/b.qcow2", "format": "file")|"count": \d+')
    _held(p, "drive-backup", {"device": "n-top", "target": "DIR/b.qcow2", "sync": "full"}, pauses=2)
    p.same("query-named-block-nodes", mask=grown)
    p.same("query-named-block-nodes", {"flat": True}, mask=grown)
    _same_lock_bytes(p)
    _cancel(p)
    p.same("query-named-block-nodes")
    # sync none: the target's backing is the source node itself (not its filter), listed so
    _held(p, "drive-backup", {"device": "n-top", "target": "DIR/bn.qcow2", "sync": "none"}, pauses=2)
    p.same("query-named-block-nodes", mask=grown)
    _same_lock_bytes(p)
    _cancel(p)
    p.same("query-named-block-nodes")
    p.same("blockdev-add", {"driver": "qcow2", "node-name": "n-bt",
                            "file": {"driver": "file", "filename": "DIR/bt.qcow2"}})
    _held(p, "blockdev-backup", {"device": "n-top", "target": "n-bt", "sync": "full"}, pauses=2)
    _same_lock_bytes(p)
    _cancel(p)
    p.quit(daemons)
    p.compare("top.qcow2")
