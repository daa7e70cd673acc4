"""External snapshots (``block-jobs.md`` §2): ``blockdev-snapshot-sync``, ``blockdev-snapshot``, their
``transaction`` actions and HMP ``snapshot_blkdev``, against ``qemu-system-x86_64`` 7.2.

Both daemons get the same command sequence on identical trees (``qemu/`` and ``vdki/``, names of equal
length); answers are compared after masking the tree path and automatic node names, the chain shown live
afterwards (``query-block``, ``query-named-block-nodes``, ``info block -v``) included.  After ``quit`` the
overlays each one wrote are compared byte for byte (the tree path replaced), and ``qemu-img info
--backing-chain`` of the active image is compared too.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

from tests.conftest import check_ok, require_tool
from tests.daemon.conftest import Daemons
from tests.helpers.qmp_script import run_script


def _setup(d: Path) -> None:
    check_ok("create", "-q", "-f", "qcow2", "base.qcow2", "4M", cwd=d)
    check_ok("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2", cwd=d)
    check_ok("create", "-q", "-f", "qcow2", "d.qcow2", "16M", cwd=d)
    check_ok("create", "-q", "-f", "raw", "r.raw", "1M", cwd=d)
    check_ok("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "s1.qcow2", cwd=d)
    check_ok("create", "-q", "-f", "qcow2", "ovl.qcow2", "4M", cwd=d)
    check_ok("create", "-q", "-f", "qcow2", "ovl2.qcow2", "4M", cwd=d)
    check_ok("create", "-q", "-f", "qcow2", "-b", "nonexist.qcow2", "-F", "raw", "-u", "odd.qcow2", "4M", cwd=d)
    (d / "sub").mkdir()


def _same_files(trees: dict[str, Path], names: list[str]) -> None:
    for name in names:
        q = (trees["qemu"] / name).read_bytes().replace(str(trees["qemu"]).encode(), b"DIR")
        v = (trees["vdkit"] / name).read_bytes().replace(str(trees["vdkit"]).encode(), b"DIR")
        assert v == q, name


def _chain_info(trees: dict[str, Path], name: str) -> None:
    out = {}
    for who, d in trees.items():
        r = subprocess.run([require_tool("qemu-img"), "info", "--backing-chain", name], cwd=d,
                           capture_output=True, text=True, check=False)
        out[who] = (r.returncode, r.stdout.replace(str(d), "DIR"), r.stderr.replace(str(d), "DIR"))
    assert out["vdkit"] == out["qemu"]


def _qemu_img_info(name: str) -> Callable[[Path], str]:
    def run(d: Path) -> str:
        r = subprocess.run([require_tool("qemu-img"), "info", name], cwd=d, capture_output=True, text=True,
                           check=False)
        return f"{r.returncode} {r.stderr}"

    run.__name__ = f"qemu-img info {name}"
    return run


DRIVES = ["-drive", "file=DIR/top.qcow2,if=none,id=d0",
          "-drive", "file=DIR/d.qcow2,if=none,id=d1,readonly=on,node-name=dn",
          "-drive", "if=none,id=d2"]


def test_snapshot_sync_and_blockdev_snapshot(daemons: Daemons) -> None:
    trees = run_script(daemons, DRIVES, [
        ("blockdev-snapshot-sync", {"device": "d0"}),
        ("blockdev-snapshot-sync", {"device": "d2", "snapshot-file": "DIR/x.qcow2"}),
        ("blockdev-snapshot-sync", {"node-name": "d2", "snapshot-file": "DIR/x.qcow2"}),
        ("blockdev-snapshot-sync", {"snapshot-file": "DIR/x.qcow2"}),
        ("blockdev-snapshot-sync", {"device": "vd0", "snapshot-file": "DIR/x.qcow2"}),
        ("blockdev-snapshot-sync", {"node-name": "dn", "snapshot-file": "DIR/x.qcow2"}),
        ("blockdev-snapshot-sync", {"device": "d1", "snapshot-file": "DIR/ro-s.qcow2"}),
        ("blockdev-snapshot-sync", {"device": "d0", "snapshot-file": "DIR/top.qcow2"}),
        ("blockdev-snapshot-sync", {"device": "d0", "snapshot-file": "DIR/base.qcow2"}),
        ("blockdev-snapshot-sync", {"device": "d0", "snapshot-file": "DIR/s1.qcow2", "snapshot-node-name": "d0"}),
        ("blockdev-snapshot-sync", {"device": "d0", "snapshot-file": "DIR/s1.qcow2", "snapshot-node-name": "#x"}),
        ("blockdev-snapshot-sync", {"device": "d0", "snapshot-file": "DIR/s1.qcow2", "format": "nosuch"}),
        ("blockdev-snapshot-sync", {"device": "d0", "snapshot-file": "DIR/s1.qcow2", "format": "raw"}),
        ("blockdev-snapshot-sync", {"device": "d0", "snapshot-file": "DIR/s1.qcow2", "format": "raw",
                                    "mode": "existing"}),
        ("blockdev-snapshot-sync", {"device": "d0", "snapshot-file": "DIR/nonexist.qcow2", "mode": "existing"}),
        ("blockdev-snapshot-sync", {"device": "d0", "snapshot-file": "DIR/s1.qcow2"}),
        ("query-block", None),
        ("query-named-block-nodes", None),
        ("blockdev-snapshot-sync", {"node-name": "dn", "snapshot-file": "DIR/y.qcow2"}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "ovl",
                          "file": {"driver": "file", "filename": "DIR/ovl.qcow2"}}),
        ("blockdev-snapshot", {"node": "nonode", "overlay": "ovl"}),
        ("blockdev-snapshot", {"node": "d0", "overlay": "nonode"}),
        ("blockdev-snapshot", {"node": "d0", "overlay": "ovl"}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "ovl2", "backing": None,
                          "file": {"driver": "file", "filename": "DIR/ovl2.qcow2"}}),
        ("blockdev-del", {"node-name": "ovl"}),
        ("blockdev-snapshot", {"node": "d0", "overlay": "ovl2"}),
        ("blockdev-snapshot", {"node": "d0", "overlay": "ovl2"}),
        ("blockdev-del", {"node-name": "ovl"}),
        ("blockdev-del", {"node-name": "ovl2"}),
        ("block_resize", {"node-name": "ovl", "size": 8388608}),
        ("blockdev-snapshot", {"node": "d1", "overlay": "d0"}),
        ("blockdev-add", {"driver": "raw", "node-name": "rw", "file": {"driver": "file", "filename": "DIR/r.raw"}}),
        ("blockdev-snapshot", {"node": "d1", "overlay": "rw"}),
        ("query-block", None),
        ("query-named-block-nodes", {"flat": True}),
        "info block -v",
        "info block -n",
        ("blockdev-snapshot-sync", {"node-name": "ovl2", "snapshot-file": "DIR/sub/s3.qcow2",
                                    "snapshot-node-name": "s3"}),
        "info block d0",
    ], setup=_setup, quit=True)
    _same_files(trees, ["s1.qcow2", "ro-s.qcow2", "sub/s3.qcow2"])
    _chain_info(trees, "sub/s3.qcow2")


def test_snapshot_modes_and_names(daemons: Daemons) -> None:
    """Relative drive path (header name relative, resolved wrongly by qemu-img), mode existing with a header
    naming another file (json: filename), three snapshots by node name, HMP snapshot_blkdev."""
    trees = run_script(daemons, ["-drive", "file=top.qcow2,if=none,id=d0"], [
        ("blockdev-snapshot-sync", {"device": "d0", "snapshot-file": "sub/r1.qcow2"}),
        ("blockdev-snapshot-sync", {"device": "d0", "snapshot-file": "odd.qcow2", "mode": "existing"}),
        ("query-block", None),
        "info block -v",
        ("blockdev-snapshot-sync", {"device": "d0", "snapshot-file": "DIR/j.qcow2", "snapshot-node-name": "snap2"}),
        ("blockdev-snapshot-sync", {"node-name": "snap2", "snapshot-file": "DIR/k.qcow2"}),
        ("blockdev-snapshot-sync", {"node-name": "snap2", "snapshot-file": "DIR/k.qcow2",
                                    "snapshot-node-name": "snap3"}),
        "snapshot_blkdev d0",
        "snapshot_blkdev nodev DIR/x.qcow2",
        "snapshot_blkdev -n d0 DIR/nonexist.qcow2",
        "snapshot_blkdev d0 DIR/h.qcow2",
        "snapshot_blkdev -n d0 DIR/ovl.qcow2 qcow2",
        "info block",
        ("query-block", None),
        _qemu_img_info("top.qcow2"),  # the old active image, now read-only: another process may open it
        _qemu_img_info("h.qcow2"),  # active: its write lock refuses qemu-img
    ], setup=_setup, quit=True)
    _same_files(trees, ["sub/r1.qcow2", "odd.qcow2", "j.qcow2", "k.qcow2", "h.qcow2", "ovl.qcow2"])
    _chain_info(trees, "h.qcow2")
    _chain_info(trees, "sub/r1.qcow2")


def test_transaction_actions(daemons: Daemons) -> None:
    """All-or-nothing: a failing action undoes the earlier ones (created files stay); actions chain up."""
    sync = "blockdev-snapshot-sync"
    trees = run_script(daemons, DRIVES, [
        ("transaction", {"actions": [{"type": sync, "data": {"device": "d0", "snapshot-file": "DIR/t2.qcow2"}},
                                     {"type": sync, "data": {"device": "nodev", "snapshot-file": "DIR/t3.qcow2"}}]}),
        ("query-block", None),
        ("transaction", {"actions": [{"type": sync, "data": {"device": "d0", "snapshot-file": "DIR/t4.qcow2"}},
                                     {"type": sync, "data": {"device": "d0", "snapshot-file": "DIR/t5.qcow2"}}]}),
        ("transaction", {"actions": [
            {"type": "blockdev-snapshot-internal-sync", "data": {"device": "d0", "name": "i1"}},
            {"type": sync, "data": {"device": "d0", "snapshot-file": "DIR/t6.qcow2"}}]}),
        ("transaction", {"actions": []}),
        ("transaction", {"actions": [{"type": sync, "data": {"device": "d0"}}]}),
        ("transaction", {"actions": [{"type": sync, "data": {"device": "d0", "snapshot-file": "DIR/x.qcow2",
                                                             "bogus": 1}}]}),
        ("transaction", {"actions": [{"type": "blockdev-snapshot", "data": {"node": "d0"}}]}),
        ("transaction", {"actions": [{"type": sync, "data": {"device": "d0", "snapshot-file": "DIR/x.qcow2",
                                                             "mode": "bad"}}]}),
        ("transaction", {"actions": [{"type": sync, "data": {"device": "d0", "snapshot-file": "DIR/x.qcow2"}}],
                         "properties": {"completion-mode": "grouped"}}),
        ("blockdev-snapshot-sync", {"device": "d0", "snapshot-file": "DIR/x.qcow2", "mode": "bad"}),
        ("transaction", {"actions": [{"type": "nosuch", "data": {}}]}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "ovl", "backing": None,
                          "file": {"driver": "file", "filename": "DIR/ovl.qcow2"}}),
        ("transaction", {"actions": [{"type": "blockdev-snapshot", "data": {"node": "d0", "overlay": "ovl"}},
                                     {"type": "abort", "data": {}}]}),
        ("query-named-block-nodes", None),
        ("transaction", {"actions": [{"type": "blockdev-snapshot", "data": {"node": "d0", "overlay": "ovl"}},
                                     {"type": sync, "data": {"device": "d0", "snapshot-file": "DIR/t7.qcow2"}}]}),
        ("query-block", None),
        "info block -v",
        "info snapshots",
    ], setup=_setup, quit=True, blank_sizes=True)  # internal snapshot i1: allocation differs (test_snapshot_diff)
    _same_files(trees, ["t2.qcow2", "t4.qcow2", "t6.qcow2", "t7.qcow2"])


def test_graph_only_snapshots(daemons: Daemons) -> None:
    """-blockdev nodes without a drive: blockdev-snapshot links them; a parentless node's snapshot-sync
    creates the file but keeps no node (QEMU 7.2, block-jobs.md §2.1.4)."""
    base = "driver=qcow2,node-name=b,file.driver=file,file.filename=DIR/base.qcow2"
    trees = run_script(daemons, ["-blockdev", base], [
        ("blockdev-add", {"driver": "qcow2", "node-name": "ovl", "backing": None,
                          "file": {"driver": "file", "filename": "DIR/ovl.qcow2"}}),
        ("blockdev-snapshot", {"node": "b", "overlay": "ovl"}),
        ("query-named-block-nodes", None),
        "info block -n",
        ("blockdev-del", {"node-name": "b"}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "ovl2", "backing": None,
                          "file": {"driver": "file", "filename": "DIR/ovl2.qcow2"}}),
        ("blockdev-snapshot", {"node": "b", "overlay": "ovl2"}),
        ("blockdev-snapshot", {"node": "ovl", "overlay": "ovl"}),
        ("blockdev-snapshot-sync", {"node-name": "ovl", "snapshot-file": "DIR/n.qcow2", "snapshot-node-name": "n"}),
        ("query-named-block-nodes", {"flat": True}),
        ("blockdev-del", {"node-name": "n"}),
        ("blockdev-del", {"node-name": "ovl"}),
        ("blockdev-del", {"node-name": "b"}),
        ("query-named-block-nodes", None),
    ], setup=_setup, quit=True)
    _same_files(trees, ["n.qcow2", "ovl.qcow2"])


def test_snapshot_of_snapshot_on_drive(daemons: Daemons) -> None:
    """A snapshot=on drive: the temporary overlay stays writable below the new overlay, which inherits its
    cache flags and its temporary flag (unlinked once open; temporary names masked)."""
    import re

    def norm(text: str) -> str:
        return re.sub(r"#block\d+", "#blockN", re.sub(r"vl\.[A-Za-z0-9]{6}", "vl.XXXXXX", text))

    q, v = daemons.pair(["-drive", "file=base.qcow2,if=none,id=d0,snapshot=on"], _setup)
    for mon in (q, v):
        assert mon.cmd("blockdev-snapshot-sync", {"device": "d0", "snapshot-file": "s.qcow2"}) == {"return": {}}
    for name in ("query-block", "query-named-block-nodes"):
        assert norm(v.cmd_line(name)) == norm(q.cmd_line(name)), name
    assert norm(v.hmp("info block -n")) == norm(q.hmp("info block -n"))
    # the new overlay inherits the temporary flag: unlinked once open, as the first one
    assert not (daemons.tmp / "q" / "s.qcow2").exists() and not (daemons.tmp / "v" / "s.qcow2").exists()
    assert norm(v.hmp("info block -v")) == norm(q.hmp("info block -v"))
