"""Dirty bitmaps against qemu-system-x86_64: commands, errors, query-block, NBD writes, qcow2 storage.

Both daemons get the same images and the same commands; writes go over a
writable NBD export of each (qemu-io as the client).  Every answer is compared
(node names masked), and after ``quit`` the image files must be byte for byte
the same (persistent bitmaps stored exactly as QEMU stores them), with
``qemu-img check`` clean.  A second start loads the stored bitmaps (in use on
disk while open) and goes on recording.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from tests.conftest import qemu_img, qemu_io
from tests.daemon.conftest import Daemons, normalise
from tests.helpers.patching import set_bitmap_in_use
from tests.helpers.qemu_io import qemu_io_script
from tests.nbd.conftest import short_sock

_SIZE = re.compile(r'"actual-size": \d+, ')


def _setup(d: Path) -> None:
    assert qemu_img("create", "-q", "-f", "qcow2", str(d / "a.qcow2"), "4M").returncode == 0
    assert qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(d / "s.qcow2"), "4M").returncode == 0
    assert qemu_img("create", "-q", "-f", "raw", str(d / "r.raw"), "4M").returncode == 0
    assert qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", str(d / "v2.qcow2"), "4M").returncode == 0


DRIVES = [
    "-drive", "file=a.qcow2,if=none,id=disk0",
    "-drive", "file=s.qcow2,if=none,id=disk1,node-name=small",
    "-drive", "file=r.raw,format=raw,if=none,id=disk2",
    "-drive", "file=v2.qcow2,if=none,id=disk3",
]


class Pair:
    """The two monitors, their NBD exports and the folders (qemu's first)."""

    def __init__(self, daemons: Daemons, tmp: Path, drives: list[str], exports: list[str]) -> None:
        self.tmp = tmp
        self.qm, self.vm = daemons.pair(drives, lambda d: None)
        self.urls: list[dict[str, str]] = []
        self.socks: list[str] = []
        for mon in (self.qm, self.vm):
            sock = short_sock("n.sock")
            self.socks.append(sock)
            assert mon.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}}) == {"return": {}}
            for dev in exports:
                assert mon.cmd("nbd-server-add", {"device": dev, "writable": True}) == {"return": {}}
            self.urls.append({dev: f"nbd+unix:///{dev}?socket={sock}" for dev in exports})

    def same(self, name: str, args: dict[str, Any] | None = None) -> str:
        # the host allocation of a running image may differ by a block (files are compared after quit)
        q = _SIZE.sub("", normalise(self.qm.cmd_line(name, args)).replace(str(self.tmp / "q"), "DIR"))
        v = _SIZE.sub("", normalise(self.vm.cmd_line(name, args)).replace(str(self.tmp / "v"), "DIR"))
        assert v == q, f"{name} {json.dumps(args)}:\nqemu:  {q}\nvdkit: {v}"
        return q

    def write(self, dev: str, *ops: str) -> None:
        for urls in self.urls:
            for op in ops:
                qemu_io_script(None, urls[dev], [op], "raw")

    def quit(self, daemons: Daemons) -> None:
        for mon in (self.qm, self.vm):
            mon.send_raw(b'{"execute": "quit"}')
        for proc in daemons.procs:
            proc.wait(timeout=60)
        daemons.procs.clear()
        for m in daemons.monitors:
            m.close()
        daemons.monitors.clear()


def _check_clean(path: Path) -> None:
    r = qemu_img("check", str(path))
    assert r.returncode == 0 and "No errors were found" in r.stdout, r.stdout + r.stderr


def _files_equal(tmp: Path, *names: str) -> None:
    for name in names:
        q, v = tmp / "q" / name, tmp / "v" / name
        assert v.read_bytes() == q.read_bytes(), name
        if name.endswith(".qcow2"):
            _check_clean(v)
        # (host allocation aside: the bytes are equal, the holes in them may not be)
        infos = [re.sub(r"disk size: .*", "", qemu_img("info", str(p)).stdout.replace(str(p.parent), "D"))
                 for p in (q, v)]
        assert infos[1] == infos[0]


ADD_CASES: list[dict[str, Any]] = [
    {"node": "disk0", "name": "b0"},
    {"node": "disk0", "name": "p1", "granularity": 131072, "persistent": True},
    {"node": "disk0", "name": "p2", "granularity": 512, "persistent": True, "disabled": True},
    {"node": "disk0", "name": "p3", "granularity": 4096, "persistent": True},
    {"node": "disk0", "name": "big", "granularity": 1 << 31},
    {"node": "small", "name": "s0", "persistent": True},
    {"node": "disk1", "name": "s1"},
    {"node": "disk2", "name": "r0", "persistent": True},
    {"node": "disk2", "name": "r0"},
    {"node": "disk3", "name": "v2p", "persistent": True},
    {"node": "disk0", "name": "b0"},
    {"node": "disk0", "name": "p1", "persistent": True},
    {"node": "disk0", "name": ""},
    {"node": "nodev", "name": ""},
    {"node": "nodev", "name": "x"},
    {"node": "disk0", "name": "g", "granularity": 1000},
    {"node": "disk0", "name": "g", "granularity": 256},
    {"node": "disk0", "name": "g", "granularity": 0},
    {"node": "disk0", "name": "g", "granularity": 1 << 32},
    {"node": "disk0", "name": "g", "granularity": -1},
    {"node": "disk0", "name": "x" * 1024, "persistent": True},
    {"node": "disk0", "name": "x" * 1024},
    {"node": "disk0", "name": "x" * 1023, "persistent": True},
]

EDIT_CASES: list[tuple[str, dict[str, Any]]] = [
    ("block-dirty-bitmap-disable", {"node": "disk0", "name": "b0"}),
    ("block-dirty-bitmap-enable", {"node": "disk0", "name": "p2"}),
    ("block-dirty-bitmap-enable", {"node": "disk0", "name": "p2"}),
    ("block-dirty-bitmap-merge", {"node": "disk0", "target": "b0", "bitmaps": ["p3", {"node": "disk1", "name": "s1"}]}),
    ("block-dirty-bitmap-merge", {"node": "disk0", "target": "p1", "bitmaps": ["b0", {"node": "small", "name": "s0"}]}),
    ("block-dirty-bitmap-merge", {"node": "disk0", "target": "b0", "bitmaps": ["nob"]}),
    ("block-dirty-bitmap-merge", {"node": "disk0", "target": "nob", "bitmaps": ["b0"]}),
    ("block-dirty-bitmap-merge", {"node": "disk0", "target": "b0", "bitmaps": [{"node": "nodev", "name": "b0"}]}),
    ("block-dirty-bitmap-merge", {"node": "disk0", "target": "b0", "bitmaps": [{"node": "disk1", "name": "nob"}]}),
    ("block-dirty-bitmap-clear", {"node": "disk1", "name": "s1"}),
    ("block-dirty-bitmap-clear", {"node": "disk0", "name": "nob"}),
    ("block-dirty-bitmap-clear", {"node": "nodev", "name": "nob"}),
    ("block-dirty-bitmap-enable", {"node": "nodev", "name": "nob"}),
    ("block-dirty-bitmap-disable", {"node": "disk0", "name": "nob"}),
    ("block-dirty-bitmap-remove", {"node": "disk0", "name": "nob"}),
    ("block-dirty-bitmap-remove", {"node": "nodev", "name": "nob"}),
    ("block-dirty-bitmap-remove", {"node": "disk0", "name": "p3"}),
    ("block-dirty-bitmap-remove", {"node": "disk0", "name": "big"}),
    ("transaction", {"actions": [
        {"type": "block-dirty-bitmap-add", "data": {"node": "disk0", "name": "t0"}},
        {"type": "block-dirty-bitmap-clear", "data": {"node": "disk0", "name": "p1"}},
        {"type": "block-dirty-bitmap-add", "data": {"node": "disk0", "name": "t0"}}]}),
    ("transaction", {"actions": [
        {"type": "block-dirty-bitmap-add", "data": {"node": "disk0", "name": "t1", "persistent": True}},
        {"type": "block-dirty-bitmap-disable", "data": {"node": "disk0", "name": "p1"}}]}),
    # a merge in a transaction that fails later is undone (p2 is stored: the files show it), then one that stays
    ("transaction", {"actions": [
        {"type": "block-dirty-bitmap-merge", "data": {"node": "disk0", "target": "p2", "bitmaps": ["p1", "b0"]}},
        {"type": "block-dirty-bitmap-add", "data": {"node": "disk0", "name": "p1"}}]}),
    ("transaction", {"actions": [
        {"type": "block-dirty-bitmap-merge", "data": {"node": "disk0", "target": "p2",
                                                       "bitmaps": [{"node": "disk1", "name": "s1"}]}},
        {"type": "block-dirty-bitmap-merge", "data": {"node": "disk0", "target": "p2", "bitmaps": ["nob"]}}]}),
    ("transaction", {"actions": [
        {"type": "block-dirty-bitmap-merge", "data": {"node": "disk0", "target": "p2", "bitmaps": ["b0"]}}]}),
]


def test_bitmap_commands_writes_and_storage(daemons: Daemons, tmp_path: Path) -> None:
    for d in ("q", "v"):
        (tmp_path / d).mkdir()
        _setup(tmp_path / d)
    p = Pair(daemons, tmp_path, DRIVES, ["disk0", "disk1", "disk2"])
    for args in ADD_CASES:
        p.same("block-dirty-bitmap-add", args)
    p.same("query-block")
    p.write("disk0", "write -P 0x11 0 100k", "write -P 0x12 3M 1k")
    p.write("disk1", "write -z 1M 64k", "write -P 0x16 2M 8k")
    p.write("disk2", "write -P 0x13 4000 9000")
    p.same("query-block")
    for name, args in EDIT_CASES:
        p.same(name, args)
    p.write("disk0", "write -P 0x14 2M 1k", "write -z 1M 4k")
    p.same("query-block")
    p.same("query-named-block-nodes")
    p.quit(daemons)
    _files_equal(tmp_path, "a.qcow2", "s.qcow2", "r.raw", "v2.qcow2")

    # a second life: the stored bitmaps load (in use on disk meanwhile), record, and are stored again
    p = Pair(daemons, tmp_path, DRIVES, ["disk0"])
    p.same("query-block")
    for d in ("q", "v"):
        info = qemu_img("info", "-U", "--output=json", str(tmp_path / d / "a.qcow2")).stdout
        assert '"in-use"' in info, info
    assert (tmp_path / "v" / "a.qcow2").read_bytes() == (tmp_path / "q" / "a.qcow2").read_bytes()
    p.write("disk0", "write -P 0x15 1M 200k")
    p.same("block-dirty-bitmap-add", {"node": "disk0", "name": "p1"})
    p.same("block-dirty-bitmap-add", {"node": "disk0", "name": "late", "persistent": True})
    p.same("block-dirty-bitmap-remove", {"node": "disk0", "name": "p2"})
    p.same("query-block")
    p.quit(daemons)
    _files_equal(tmp_path, "a.qcow2")


def test_inconsistent_and_read_only_bitmaps(daemons: Daemons, tmp_path: Path) -> None:
    """A bitmap left in use (its writer died) loads inconsistent; a read-only drive's bitmaps are read-only."""
    from tests.data import generate as g

    for d in ("q", "v"):
        (tmp_path / d).mkdir()
        img = tmp_path / d / "a.qcow2"
        assert qemu_img("create", "-q", "-f", "qcow2", str(img), "4M").returncode == 0
        g.bitmap_add(img, "ok")
        g.bitmap_add(img, "torn")
        assert qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / d / "ro.qcow2"), "4M").returncode == 0
        g.bitmap_add(tmp_path / d / "ro.qcow2", "rb", disabled=True)
        set_bitmap_in_use(img, "torn")
    drives = ["-drive", "file=a.qcow2,if=none,id=disk0", "-drive", "file=ro.qcow2,if=none,id=disk1,readonly=on"]
    p = Pair(daemons, tmp_path, drives, ["disk0"])
    p.same("query-block")
    for name in ("block-dirty-bitmap-clear", "block-dirty-bitmap-enable", "block-dirty-bitmap-disable"):
        p.same(name, {"node": "disk0", "name": "torn"})
        p.same(name, {"node": "disk1", "name": "rb"})
    p.same("block-dirty-bitmap-merge", {"node": "disk0", "target": "ok", "bitmaps": ["torn"]})
    p.same("block-dirty-bitmap-merge", {"node": "disk0", "target": "ok", "bitmaps": [{"node": "disk1", "name": "rb"}]})
    p.same("block-dirty-bitmap-remove", {"node": "disk1", "name": "rb"})
    p.same("block-dirty-bitmap-add", {"node": "disk1", "name": "new", "persistent": True})
    p.write("disk0", "write -P 0x21 0 64k")
    p.same("query-block")
    p.same("block-dirty-bitmap-remove", {"node": "disk0", "name": "torn"})
    p.same("query-block")
    p.quit(daemons)
    _files_equal(tmp_path, "a.qcow2", "ro.qcow2")


def test_killed_daemon_leaves_bitmaps_in_use_never_wrong(daemons: Daemons, tmp_path: Path) -> None:
    """SIGKILL while a persistent bitmap records: the image stays clean for qemu-img check, the bitmap is
    marked in use (QEMU then loads it as inconsistent rather than trusting stale bits), and vdkit-img
    info says what qemu-img info says."""
    from tests.conftest import vdkit_img

    d = tmp_path / "v"
    d.mkdir()
    img = d / "a.qcow2"
    assert qemu_img("create", "-q", "-f", "qcow2", str(img), "4M").returncode == 0
    proc, path, _ = daemons.vdkit(["-drive", f"file={img},if=none,id=disk0"], d)
    m = daemons.monitor(path).negotiate()
    assert m.cmd("block-dirty-bitmap-add", {"node": "disk0", "name": "kept", "persistent": True}) == {"return": {}}
    sock = short_sock("n.sock")
    assert m.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}}) == {"return": {}}
    assert m.cmd("nbd-server-add", {"device": "disk0", "writable": True}) == {"return": {}}
    assert qemu_io("-f", "raw", "-c", "write -P 0x61 0 128k", f"nbd+unix:///disk0?socket={sock}").returncode == 0
    m.send_raw(b'{"execute": "quit"}')  # stores "kept"; the next run marks it in use again
    proc.wait(timeout=60)
    daemons.procs.clear()
    proc, path, _ = daemons.vdkit(["-drive", f"file={img},if=none,id=disk0"], d)
    daemons.monitor(path).negotiate()
    proc.kill()
    proc.wait(timeout=60)
    r = qemu_img("check", str(img))
    assert r.returncode == 0 and "No errors were found" in r.stdout, r.stdout + r.stderr
    q, v = qemu_img("info", str(img)), vdkit_img("info", str(img))
    assert "in-use" in q.stdout and (v.returncode, v.stdout) == (q.returncode, q.stdout)


def test_external_snapshot_stores_the_bitmaps_of_the_old_top(daemons: Daemons, tmp_path: Path) -> None:
    """The old active image becomes read-only: its persistent bitmaps are stored then (QEMU's reopen), so the
    file is final while the daemon runs, and the bitmap is no longer the drive's."""
    for d in ("q", "v"):
        (tmp_path / d).mkdir()
        assert qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / d / "a.qcow2"), "4M").returncode == 0
    p = Pair(daemons, tmp_path, ["-drive", "file=a.qcow2,if=none,id=disk0"], ["disk0"])
    p.same("block-dirty-bitmap-add", {"node": "disk0", "name": "pb", "persistent": True})
    p.write("disk0", "write -P 0x41 0 100k")
    for mon, d in ((p.qm, "q"), (p.vm, "v")):
        r = mon.cmd("blockdev-snapshot-sync", {"device": "disk0", "snapshot-file": str(tmp_path / d / "s.qcow2")})
        assert r == {"return": {}}
    assert (tmp_path / "v" / "a.qcow2").read_bytes() == (tmp_path / "q" / "a.qcow2").read_bytes()
    p.same("query-named-block-nodes")
    p.same("block-dirty-bitmap-clear", {"node": "disk0", "name": "pb"})
    p.quit(daemons)
    _files_equal(tmp_path, "a.qcow2")


def test_bitmaps_follow_block_resize(daemons: Daemons, tmp_path: Path) -> None:
    """block_resize resizes the node's bitmaps: writes past the old end are recorded, and the persistent
    one is stored at the new size."""
    for d in ("q", "v"):
        (tmp_path / d).mkdir()
        assert qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / d / "a.qcow2"), "4M").returncode == 0
    p = Pair(daemons, tmp_path, ["-drive", "file=a.qcow2,if=none,id=disk0"], [])
    p.same("block-dirty-bitmap-add", {"node": "disk0", "name": "pb", "persistent": True})
    p.same("block-dirty-bitmap-add", {"node": "disk0", "name": "tb", "granularity": 4096})
    p.same("block_resize", {"device": "disk0", "size": 8 << 20})
    for mon in (p.qm, p.vm):
        assert mon.cmd("nbd-server-add", {"device": "disk0", "writable": True}) == {"return": {}}
    p.urls = [{"disk0": f"nbd+unix:///disk0?socket={sock}"} for sock in p.socks]
    p.write("disk0", "write -P 0x41 7M 100k", "write -P 0x42 100k 4k")
    p.same("query-block")
    p.quit(daemons)
    _files_equal(tmp_path, "a.qcow2")


def test_blockdev_add_del_loads_and_stores_bitmaps(daemons: Daemons, tmp_path: Path) -> None:
    """A blockdev-add node loads the image's bitmaps (read-only ones for a read-only node), lists them, and
    stores them when blockdev-del closes it: the files as qemu-system-x86_64 leaves them."""
    from tests.data import generate as g

    for d in ("q", "v"):
        (tmp_path / d).mkdir()
        for name in ("rw.qcow2", "ro.qcow2"):
            img = tmp_path / d / name
            assert qemu_img("create", "-q", "-f", "qcow2", str(img), "4M").returncode == 0
            g.bitmap_add(img, "b0")
            g.bitmap_add(img, "b1", granularity="128k", disabled=True)
            assert qemu_io("-c", "write -P 0x31 0 200k", str(img)).returncode == 0
    p = Pair(daemons, tmp_path, [], [])
    for name, ro in (("rw", False), ("ro", True)):
        p.same("blockdev-add", {"driver": "qcow2", "node-name": name, "read-only": ro,
                                "file": {"driver": "file", "filename": f"{name}.qcow2"}})
    p.same("query-named-block-nodes")
    p.same("block-dirty-bitmap-clear", {"node": "ro", "name": "b0"})
    p.same("block-dirty-bitmap-enable", {"node": "rw", "name": "b1"})
    p.same("block-dirty-bitmap-add", {"node": "rw", "name": "b2", "persistent": True})
    for name in ("rw", "ro"):
        p.same("blockdev-del", {"node-name": name})
    assert (tmp_path / "v" / "rw.qcow2").read_bytes() == (tmp_path / "q" / "rw.qcow2").read_bytes()
    p.quit(daemons)
    _files_equal(tmp_path, "rw.qcow2", "ro.qcow2")
