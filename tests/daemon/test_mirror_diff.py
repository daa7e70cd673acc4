"""drive-mirror / drive-backup against qemu-system-x86_64, and under an NBD writer.

The differential tests run the same commands on both daemons over the same
three-image chain (``block-jobs.md``'s base/mid/top): argument errors in
QEMU's order, the job's events in order, query-block-jobs, the graph after
the pivot (``query-block``, ``info block -n``), and the files afterwards
(``qemu-img compare`` across the two runs, ``qemu-img info --backing-chain``).
Jobs are held still with ``speed``/pause, never with sleeps.

The writer tests check the data: qemu-io writes over the daemon's NBD export
while a mirror or backup runs; afterwards the mirror's target (the active
image after the pivot) equals the writer's model byte for byte, and a
backup's target equals the disk as it was when the backup started.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import qemu_img, qemu_io
from tests.daemon.conftest import Daemons, Monitor, normalise
from tests.nbd.conftest import short_sock

MiB = 1024 * 1024
_SIZE = re.compile(r'"actual-size": \d+')


def _chain(d: Path) -> None:
    """base (1 MiB of 0x11 at 0) <- mid (0x22 at 1M) <- top (0x33 at 2M), 4 MiB, relative names."""
    for name, backing, pattern, at in (("base", None, 0x11, 0), ("mid", "base", 0x22, 1), ("top", "mid", 0x33, 2)):
        args = ["create", "-q", "-f", "qcow2"]
        if backing:
            args += ["-b", f"{backing}.qcow2", "-F", "qcow2"]
        assert qemu_img(*args, str(d / f"{name}.qcow2"), "4M").returncode == 0
        r = qemu_io("-c", f"write -P {pattern:#x} {at}M 1M", str(d / f"{name}.qcow2"))
        assert r.returncode == 0, r.stderr


DRIVE = ["-drive", "file=DIR/top.qcow2,if=none,id=disk0"]


def _wait(m: Monitor, event: str, count: int = 1, timeout: float = 60.0, status: str | None = None) -> None:
    """Until ``count`` ``event``s came (with ``status``: JOB_STATUS_CHANGE events of that status)."""
    deadline = time.monotonic() + timeout
    while sum(1 for e in m.events if e["event"] == event
              and (status is None or (e.get("data") or {}).get("status") == status)) < count:
        assert time.monotonic() < deadline, f"no {event} in {m.events}"
        m.cmd_line("query-version")  # reads the events that came meanwhile
        time.sleep(0.02)


def _events(m: Monitor, d: Path) -> list[str]:
    out = [normalise(json.dumps([e["event"], e.get("data")])).replace(str(d), "DIR") for e in m.events]
    m.events.clear()
    return out


class Pair:
    def __init__(self, daemons: Daemons, tmp: Path, *, top_writes: tuple[str, ...] = (),
                 drive: list[str] = DRIVE, prepare: Callable[[Path], None] | None = None) -> None:
        self.dirs = [tmp / "q", tmp / "v"]
        for d in self.dirs:
            d.mkdir()
            _chain(d)
            for w in top_writes:  # more data in the active image before the daemons start
                assert qemu_io("-c", w, str(d / "top.qcow2")).returncode == 0
            if prepare is not None:  # more files before the daemons start
                prepare(d)
        _, qpath, _ = daemons.qemu([a.replace("DIR", str(self.dirs[0])) for a in drive], self.dirs[0])
        _, vpath, _ = daemons.vdkit([a.replace("DIR", str(self.dirs[1])) for a in drive], self.dirs[1])
        self.mons = [daemons.monitor(qpath).negotiate(), daemons.monitor(vpath).negotiate()]

    def same(self, name: str, args: dict[str, Any] | None = None, *, mask: re.Pattern[str] | None = None) -> str:
        outs = []
        for m, d in zip(self.mons, self.dirs, strict=True):
            a = json.loads(json.dumps(args).replace("DIR", str(d))) if args is not None else None
            # host allocation of a copied image may differ by a block (its bytes are compared after quit)
            out = _SIZE.sub('"actual-size": N', normalise(m.cmd_line(name, a)).replace(str(d), "DIR"))
            outs.append(out if mask is None else mask.sub("MASKED", out))
        assert outs[1] == outs[0], f"{name} {args}:\nqemu:  {outs[0]}\nvdkit: {outs[1]}"
        return outs[0]

    def hmp(self, line: str) -> str:
        outs = [re.sub(r"#block\d+", "#blockN", m.hmp(line.replace("DIR", str(d)))).replace(str(d), "DIR")
                for m, d in zip(self.mons, self.dirs, strict=True)]
        assert outs[1] == outs[0], f"{line}:\nqemu:  {outs[0]}\nvdkit: {outs[1]}"
        return outs[0]

    def wait(self, event: str, count: int = 1, status: str | None = None) -> None:
        for m in self.mons:
            _wait(m, event, count, status=status)

    def same_events(self, *, mask: re.Pattern[str] | None = None) -> list[str]:
        q, v = ([e if mask is None else mask.sub("MASKED", e) for e in _events(m, d)]
                for m, d in zip(self.mons, self.dirs, strict=True))
        assert v == q, "\n".join(["qemu:", *q, "vdkit:", *v])
        return q

    def quit(self, daemons: Daemons) -> None:
        for m in self.mons:
            m.send_raw(b'{"execute": "quit"}')
        for p in daemons.procs:
            p.wait(timeout=60)

    def compare(self, name: str, other: str | None = None) -> None:
        """The file ``name`` reads the same in both runs (and as ``other`` of the same run, if given)."""
        q, v = (str(d / name) for d in self.dirs)
        r = qemu_img("compare", "-U", q, v)
        assert r.returncode == 0, r.stdout + r.stderr
        if other is not None:
            r = qemu_img("compare", "-U", v, str(self.dirs[1] / other))
            assert r.returncode == 0, r.stdout + r.stderr
        infos = [re.sub(r"disk size: .*", "", qemu_img("info", "-U", "--backing-chain", str(d / name)).stdout)
                 .replace(str(d), "DIR") for d in self.dirs]
        assert infos[1] == infos[0]


MIRROR_ERRORS: list[dict[str, Any]] = [
    {"device": "disk0", "target": "DIR/mi.qcow2", "sync": "incremental"},
    {"device": "disk0", "target": "DIR/mx.qcow2", "sync": "full", "granularity": 1000},
    {"device": "disk0", "target": "DIR/mx.qcow2", "sync": "full", "granularity": 256},
    {"device": "disk0", "target": "DIR/mx.qcow2", "sync": "full", "buf-size": -1},
    {"device": "nodev", "target": "DIR/mx.qcow2", "sync": "full"},
    {"device": "disk0", "target": "DIR/mx.qcow2", "sync": "full", "job-id": "#bad"},
    {"device": "disk0", "target": "DIR/mx.qcow2", "sync": "full", "replaces": "x"},
    {"device": "disk0", "target": "DIR/nodir/mx.qcow2", "sync": "full", "mode": "existing"},
    {"device": "disk0", "target": "DIR/mx.qcow2"},
    {"device": "disk0", "target": "DIR/mx.qcow2", "sync": "full", "speed": -1},
    {"device": "disk0", "target": "DIR/top.qcow2", "sync": "full", "mode": "existing"},
    {"device": "disk0", "target": "DIR/a.qcow2", "sync": "full", "format": "nosuch"},
    {"device": "disk0", "target": "DIR/b.qcow2", "sync": "full", "node-name": "disk0"},
    {"device": "disk0", "target": "DIR/c.qcow2", "sync": "full", "node-name": "#x"},
    {"device": "disk0", "target": "DIR/d.qcow2", "sync": "full", "granularity": 1 << 27},
    {"device": "disk0", "target": "DIR/f.qcow2", "sync": "full", "replaces": "x", "node-name": "nn"},
    {"device": "disk0", "target": "DIR/g.raw", "sync": "top", "format": "raw"},
]


@pytest.mark.parametrize("sync", ["top", "full", "none"])
def test_mirror_pivot(daemons: Daemons, tmp_path: Path, sync: str) -> None:
    p = Pair(daemons, tmp_path)
    for args in MIRROR_ERRORS:
        p.same("drive-mirror", args)
    p.same_events()
    p.same("drive-mirror", {"device": "disk0", "target": "DIR/mt.qcow2", "sync": sync, "job-id": "mt"})
    p.wait("BLOCK_JOB_READY")
    p.same_events()
    p.same("query-block-jobs")
    p.hmp("info block-jobs")
    p.same("drive-mirror", {"device": "disk0", "target": "DIR/m2.qcow2", "sync": "full"})
    p.same("drive-backup", {"device": "disk0", "target": "DIR/b2.qcow2", "sync": "full"})
    p.same("block-job-complete", {"device": "mt"})
    p.wait("JOB_STATUS_CHANGE", status="null")
    p.same_events()
    p.same("query-block")
    p.hmp("info block -n")
    p.same("query-block-jobs")
    p.quit(daemons)
    p.compare("mt.qcow2", "top.qcow2")
    p.compare("top.qcow2")


@pytest.mark.parametrize("force", [False, True])
def test_mirror_cancel_after_ready(daemons: Daemons, tmp_path: Path, force: bool) -> None:
    """Without force: COMPLETED, no pivot, the target a consistent copy; with force: CANCELLED."""
    p = Pair(daemons, tmp_path)
    p.same("drive-mirror", {"device": "disk0", "target": "DIR/mc.qcow2", "sync": "full", "job-id": "mc",
                            "auto-dismiss": False})
    p.wait("BLOCK_JOB_READY")
    p.same("block-job-pause", {"device": "mc"})
    # QEMU's job may still be busy (flushing) when the pause comes: it is in standby only at its next
    # pause point, and until then a complete would still be accepted
    p.wait("JOB_STATUS_CHANGE", status="standby")
    p.same("query-block")  # the job's anonymous dirty bitmap, in sync
    p.same("block-job-cancel", {"device": "mc"})
    p.same("block-job-complete", {"device": "mc"})
    p.same("block-job-resume", {"device": "mc"})
    p.same("block-job-cancel", {"device": "mc", "force": force})
    p.wait("JOB_STATUS_CHANGE", status="concluded")
    p.same_events()
    p.same("query-jobs")
    p.same("job-dismiss", {"id": "mc"})
    p.same("query-block")
    p.quit(daemons)
    if not force:
        p.compare("mc.qcow2", "top.qcow2")


def test_backup_modes_and_incremental(daemons: Daemons, tmp_path: Path) -> None:
    p = Pair(daemons, tmp_path)
    for args in ({"device": "disk0", "target": "DIR/bi.qcow2", "sync": "incremental"},
                 {"device": "disk0", "target": "DIR/bb.qcow2", "sync": "bitmap"},
                 {"device": "disk0", "target": "DIR/bn.qcow2", "sync": "full", "bitmap": "nob"},
                 {"device": "nodev", "target": "DIR/bx.qcow2", "sync": "full"},
                 {"device": "disk0", "target": "DIR/bx.qcow2", "sync": "full", "bitmap-mode": "always"},
                 {"device": "disk0", "target": "DIR/c.raw", "sync": "full", "format": "raw", "compress": True},
                 {"device": "disk0", "target": "DIR/top.qcow2", "sync": "full", "mode": "existing"},
                 {"device": "disk0", "target": "DIR/y.qcow2", "sync": "top", "bitmap-mode": "never"},
                 {"device": "disk0", "target": "DIR/z.qcow2", "sync": "full", "speed": -1}):
        p.same("drive-backup", args)
    p.same("block-dirty-bitmap-add", {"node": "disk0", "name": "bm0"})
    for args in ({"device": "disk0", "target": "DIR/bx.qcow2", "sync": "full", "bitmap": "bm0"},
                 {"device": "disk0", "target": "DIR/bx.qcow2", "sync": "none", "bitmap": "bm0",
                  "bitmap-mode": "on-success"},
                 {"device": "disk0", "target": "DIR/bx.qcow2", "sync": "incremental", "bitmap": "bm0",
                  "bitmap-mode": "never"}):
        p.same("drive-backup", args)
    p.same_events()
    for n, sync in enumerate(("full", "top"), 1):
        p.same("drive-backup", {"device": "disk0", "target": f"DIR/b{sync}.qcow2", "sync": sync, "job-id": sync})
        p.wait("BLOCK_JOB_COMPLETED", n)
    p.same_events()
    # the incremental round trip of block-jobs.md §7
    p.same("drive-backup", {"device": "disk0", "target": "DIR/inc0.qcow2", "sync": "full", "bitmap": "bm0",
                            "bitmap-mode": "on-success", "job-id": "b0"})
    p.wait("BLOCK_JOB_COMPLETED", 1)
    p.same_events()
    p.same("query-block")
    socks = []
    for m in p.mons:
        sock = short_sock("n.sock")
        assert m.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}}) == {"return": {}}
        assert m.cmd("nbd-server-add", {"device": "disk0", "writable": True}) == {"return": {}}
        socks.append(f"nbd+unix:///disk0?socket={sock}")
    for url in socks:
        assert qemu_io("-f", "raw", "-c", "write -P 0x44 3M 64k", url).returncode == 0
    p.same("query-block")
    for d in p.dirs:
        assert qemu_img("create", "-q", "-f", "qcow2", "-b", "inc0.qcow2", "-F", "qcow2",
                        str(d / "inc1.qcow2")).returncode == 0
    p.same("drive-backup", {"device": "disk0", "target": "DIR/inc1.qcow2", "sync": "incremental", "bitmap": "bm0",
                            "mode": "existing", "job-id": "b1"})
    p.wait("BLOCK_JOB_COMPLETED", 1)
    p.same_events()
    p.same("query-block")
    p.quit(daemons)
    for name in ("bfull.qcow2", "btop.qcow2", "inc0.qcow2", "inc1.qcow2"):
        p.compare(name)
    maps = [_layout(qemu_img("map", "-U", "--output=json", str(d / "inc1.qcow2")).stdout) for d in p.dirs]
    assert maps[1] == maps[0]
    assert [e for e in maps[1] if e[2] == 0] == [(3 * MiB, 64 * 1024, 0, True, False, True)]  # only the new write


def _layout(text: str) -> list[tuple[int, int, int, bool, bool, bool]]:
    """qemu-img map entries without host offsets, runs of the same kind merged."""
    out: list[tuple[int, int, int, bool, bool, bool]] = []
    for e in json.loads(text):
        key = (e["depth"], e["present"], e["zero"], e["data"])
        if out and out[-1][2:] == key and out[-1][0] + out[-1][1] == e["start"]:
            out[-1] = (out[-1][0], out[-1][1] + e["length"], *key)
        else:
            out.append((e["start"], e["length"], *key))
    return out


# -- under an NBD writer (vdkit-daemon; the model is the data the writer wrote) ----------------------------


def _start_vdkit(daemons: Daemons, d: Path) -> tuple[Monitor, str]:
    d.mkdir()
    _chain(d)
    _, path, _ = daemons.vdkit(["-drive", f"file={d}/top.qcow2,if=none,id=disk0"], d)
    m = daemons.monitor(path).negotiate()
    sock = short_sock("n.sock")
    assert m.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}}) == {"return": {}}
    assert m.cmd("nbd-server-add", {"device": "disk0", "writable": True}) == {"return": {}}
    return m, f"nbd+unix:///disk0?socket={sock}"


def _model(d: Path) -> bytearray:
    data = bytearray(4 * MiB)
    for pattern, at in ((0x11, 0), (0x22, 1), (0x33, 2)):
        data[at * MiB : (at + 1) * MiB] = bytes([pattern]) * MiB
    return data


WRITES = [(0x51, 0, 4096), (0x52, 1 * MiB + 512, 70000), (0x53, 3 * MiB, 64 * 1024), (0x54, 2 * MiB - 100, 300),
          (0x55, 4 * MiB - 8192, 8192)]


def _write(url: str, model: bytearray, pattern: int, off: int, n: int) -> None:
    r = qemu_io("-f", "raw", "-c", f"write -P {pattern:#x} {off} {n}", url)
    assert r.returncode == 0 and "error" not in r.stdout.lower(), r.stdout + r.stderr
    model[off : off + n] = bytes([pattern]) * n


def _read_raw(path: Path) -> bytes:
    out = path.with_suffix(".raw")
    r = qemu_img("convert", "-U", "-O", "raw", str(path), str(out))
    assert r.returncode == 0, r.stderr
    return out.read_bytes()


def test_mirror_under_nbd_writer(daemons: Daemons, tmp_path: Path) -> None:
    d = tmp_path / "v"
    m, url = _start_vdkit(daemons, d)
    model = _model(d)
    # slow enough that writes land before, inside and after the ranges already copied
    assert m.cmd("drive-mirror", {"device": "disk0", "target": str(d / "mt.qcow2"), "sync": "full",
                                  "job-id": "mt", "speed": 512 * 1024, "granularity": 65536}) == {"return": {}}
    for w in WRITES[:3]:
        _write(url, model, *w)
    assert m.cmd("block-job-set-speed", {"device": "mt", "speed": 0}) == {"return": {}}
    _wait(m, "BLOCK_JOB_READY")
    for w in WRITES[3:]:
        _write(url, model, *w)  # mirrored while ready
    assert m.cmd("block-job-complete", {"device": "mt"}) == {"return": {}}
    _wait(m, "BLOCK_JOB_COMPLETED")
    _write(url, model, 0x56, 100000, 5000)  # after the pivot: lands in the target only
    m.send_raw(b'{"execute": "quit"}')
    for p in daemons.procs:
        p.wait(timeout=60)
    assert _read_raw(d / "mt.qcow2") == bytes(model)
    r = qemu_img("check", str(d / "mt.qcow2"))
    assert r.returncode == 0, r.stdout


def test_backup_under_nbd_writer_is_point_in_time(daemons: Daemons, tmp_path: Path) -> None:
    d = tmp_path / "v"
    m, url = _start_vdkit(daemons, d)
    model = _model(d)
    start = bytes(model)
    assert m.cmd("drive-backup", {"device": "disk0", "target": str(d / "bk.qcow2"), "sync": "full",
                                  "job-id": "bk", "speed": 256 * 1024}) == {"return": {}}
    for w in WRITES:
        _write(url, model, *w)  # copy-before-write saves the old data first
    assert m.cmd("block-job-set-speed", {"device": "bk", "speed": 0}) == {"return": {}}
    _wait(m, "BLOCK_JOB_COMPLETED")
    assert not any("error" in (e.get("data") or {}) for e in m.events), m.events
    m.send_raw(b'{"execute": "quit"}')
    for p in daemons.procs:
        p.wait(timeout=60)
    assert _read_raw(d / "bk.qcow2") == start
    assert _read_raw(d / "top.qcow2") == bytes(model)
    r = qemu_img("check", str(d / "bk.qcow2"))
    assert r.returncode == 0, r.stdout


def test_hmp_drive_mirror_and_backup(daemons: Daemons, tmp_path: Path) -> None:
    """HMP's spellings: help texts, parse errors, -f/-n/-c and the format argument, as QEMU prints them."""
    p = Pair(daemons, tmp_path)
    for line in ("help drive_mirror", "help drive_backup", "drive_mirror", "drive_mirror disk0",
                 "drive_backup disk0", "drive_mirror -n disk0 DIR/nonexist.qcow2", "drive_backup nodev DIR/x.qcow2",
                 "drive_mirror nodev DIR/x.qcow2"):
        p.hmp(line)
    p.hmp("drive_backup -c disk0 DIR/hbc.qcow2")
    p.wait("BLOCK_JOB_COMPLETED")
    p.hmp("drive_backup -f disk0 DIR/hbf.qcow2 raw")
    p.wait("BLOCK_JOB_COMPLETED", 2)
    p.same_events()
    p.hmp("drive_mirror -f disk0 DIR/hmf.qcow2 raw")
    p.wait("BLOCK_JOB_READY")
    p.hmp("drive_mirror disk0 DIR/hm2.qcow2")
    p.hmp("block_job_complete disk0")
    p.wait("JOB_STATUS_CHANGE", status="null")
    p.same_events()
    p.hmp("info block")
    p.quit(daemons)
    for name in ("hbc.qcow2", "hbf.qcow2", "hmf.qcow2"):
        p.compare(name, "top.qcow2")


def test_blockdev_mirror_backup_and_transaction(daemons: Daemons, tmp_path: Path) -> None:
    """Targets from blockdev-add (the mirror's pivots onto the node), and drive-backup inside a transaction."""
    p = Pair(daemons, tmp_path)
    for d in p.dirs:
        for name in ("bt", "bt2"):
            assert qemu_img("create", "-q", "-f", "qcow2", str(d / f"{name}.qcow2"), "4M").returncode == 0
    for name in ("bt", "bt2"):
        p.same("blockdev-add", {"driver": "qcow2", "node-name": f"t{name}",
                                "file": {"driver": "file", "filename": f"DIR/{name}.qcow2"}})
    p.same("blockdev-mirror", {"device": "disk0", "target": "nonode", "sync": "full"})
    p.same("blockdev-mirror", {"device": "disk0", "target": "tbt", "sync": "bitmap"})
    p.same("blockdev-backup", {"device": "disk0", "target": "nonode", "sync": "full"})
    p.same("blockdev-backup", {"device": "disk0", "target": "tbt2", "sync": "full", "job-id": "bb"})
    p.wait("JOB_STATUS_CHANGE", status="null")
    p.same_events()
    p.same("blockdev-mirror", {"device": "disk0", "target": "tbt", "sync": "full", "job-id": "bm"})
    p.wait("BLOCK_JOB_READY")
    p.same_events()
    p.same("block-job-complete", {"device": "bm"})
    p.wait("JOB_STATUS_CHANGE", status="null")
    p.same_events()
    p.same("query-block")
    p.hmp("info block -n")
    p.same("transaction", {"actions": [
        {"type": "block-dirty-bitmap-add", "data": {"node": "disk0", "name": "tb"}},
        {"type": "drive-backup", "data": {"device": "disk0", "target": "DIR/tx.qcow2", "sync": "full",
                                          "job-id": "tx"}}]})
    p.wait("JOB_STATUS_CHANGE", status="null")
    p.same_events()
    p.same("transaction", {"actions": [
        {"type": "block-dirty-bitmap-add", "data": {"node": "disk0", "name": "tc"}},
        {"type": "drive-backup", "data": {"device": "nodev", "target": "DIR/tx2.qcow2", "sync": "full"}}]})
    p.same_events()
    p.same("query-block")
    p.quit(daemons)
    for name in ("bt.qcow2", "bt2.qcow2", "tx.qcow2"):
        p.compare(name, "top.qcow2")


def test_live_backup_worked_example(daemons: Daemons, tmp_path: Path) -> None:
    """The worked example of docs/daemon.md, end to end, while a client writes over NBD.

    A full backup that starts a persistent bitmap (one transaction), writes, an
    incremental backup onto an overlay of the full one, then an external
    snapshot whose overlay is committed back; every image checked against the
    writer's model.
    """
    d = tmp_path / "v"
    m, url = _start_vdkit(daemons, d)
    model = _model(d)
    assert m.cmd("transaction", {"actions": [
        {"type": "block-dirty-bitmap-add", "data": {"node": "disk0", "name": "daily", "persistent": True}},
        {"type": "drive-backup", "data": {"device": "disk0", "target": str(d / "full.qcow2"), "sync": "full",
                                          "job-id": "full"}}]}) == {"return": {}}
    _wait(m, "BLOCK_JOB_COMPLETED")
    at_full = bytes(model)
    for w in WRITES[:3]:
        _write(url, model, *w)
    assert qemu_img("create", "-q", "-f", "qcow2", "-b", "full.qcow2", "-F", "qcow2",
                    str(d / "inc1.qcow2")).returncode == 0
    m.events.clear()
    assert m.cmd("drive-backup", {"device": "disk0", "target": str(d / "inc1.qcow2"), "sync": "incremental",
                                  "bitmap": "daily", "mode": "existing", "job-id": "inc1"}) == {"return": {}}
    _wait(m, "BLOCK_JOB_COMPLETED")
    at_inc = bytes(model)
    assert m.cmd("blockdev-snapshot-sync", {"device": "disk0", "snapshot-file": str(d / "ovl.qcow2"),
                                            "format": "qcow2"}) == {"return": {}}
    for w in WRITES[3:]:
        _write(url, model, *w)
    m.events.clear()
    # the overlay back into the image it was taken of (not the chain's bottom, the default base)
    assert m.cmd("block-commit", {"device": "disk0", "job-id": "merge",
                                  "base": str(d / "top.qcow2")}) == {"return": {}}
    _wait(m, "BLOCK_JOB_READY")
    assert m.cmd("block-job-complete", {"device": "merge"}) == {"return": {}}
    _wait(m, "BLOCK_JOB_COMPLETED")
    m.send_raw(b'{"execute": "quit"}')
    for p in daemons.procs:
        p.wait(timeout=60)
    assert _read_raw(d / "full.qcow2") == at_full
    assert _read_raw(d / "inc1.qcow2") == at_inc
    assert _read_raw(d / "top.qcow2") == bytes(model)  # the commit merged the overlay back
    r = qemu_img("check", str(d / "top.qcow2"))
    assert r.returncode == 0, r.stdout
    info = qemu_img("info", str(d / "top.qcow2")).stdout
    assert "name: daily" in info, info


def test_backup_bitmap_mode_always_after_cancel(daemons: Daemons, tmp_path: Path) -> None:
    """bitmap-mode always: a cancelled full backup leaves the bitmap with what it did not copy (held by speed)."""
    p = Pair(daemons, tmp_path)
    p.same("block-dirty-bitmap-add", {"node": "disk0", "name": "bm"})
    p.same("drive-backup", {"device": "disk0", "target": "DIR/ba.qcow2", "sync": "full", "bitmap": "bm",
                            "bitmap-mode": "always", "job-id": "ba", "speed": 1})
    p.same("block-job-pause", {"device": "ba"})
    p.wait("JOB_STATUS_CHANGE", 2, status="paused")  # the start's drain pair, then this pause
    p.same("query-block-jobs")
    p.same("block-job-cancel", {"device": "ba", "force": True})
    p.wait("JOB_STATUS_CHANGE", status="null")
    p.same_events()
    p.same("query-block")


@pytest.mark.parametrize("sync", ["top", "full"])
def test_mirror_nodes_while_running(daemons: Daemons, tmp_path: Path, sync: str) -> None:
    """While a mirror runs: its mirror_top filter and the target's nodes (json: named without backing) listed."""
    p = Pair(daemons, tmp_path)
    p.same("drive-mirror", {"device": "disk0", "target": "DIR/mt.qcow2", "sync": sync, "job-id": "mt",
                            "speed": 1})
    p.same("block-job-pause", {"device": "mt"})
    p.wait("JOB_STATUS_CHANGE", status="paused")
    # how far the copy got before the pause is timing: the target file's length, the job bitmap's count
    grown = re.compile(r'"virtual-size": \d+(?=, "filename": "DIR/mt.qcow2", "format": "file")'
                       r'|(?<="granularity": 65536, )"count": \d+')
    p.same("query-named-block-nodes", mask=grown)
    p.same("query-named-block-nodes", {"flat": True}, mask=grown)
    p.hmp("info block -n")
    p.same("x-debug-query-block-graph")  # the job, its filter (the drive's root now), the target's nodes
    p.same("block-job-cancel", {"device": "mt", "force": True})
    p.wait("JOB_STATUS_CHANGE", status="null")
    p.same_events(mask=re.compile(r'"len": \d+, "offset": \d+'))
    p.same("query-named-block-nodes")


@pytest.mark.parametrize("job", ["mirror", "backup"])
def test_sigkill_during_job(daemons: Daemons, tmp_path: Path, job: str) -> None:
    """A daemon killed while a mirror or backup runs (writes landing meanwhile): no file is corrupt, and the
    drive's chain reads every write the NBD client got acknowledged (its close flushes)."""
    import signal

    d = tmp_path / "v"
    m, url = _start_vdkit(daemons, d)
    model = _model(d)
    cmd = "drive-mirror" if job == "mirror" else "drive-backup"
    assert m.cmd(cmd, {"device": "disk0", "target": str(d / "t.qcow2"), "sync": "full", "job-id": "j",
                       "speed": 256 * 1024}) == {"return": {}}
    for w in WRITES[:3]:
        _write(url, model, *w)
    proc = daemons.procs[-1]
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    for name in ("top.qcow2", "t.qcow2"):
        r = qemu_img("check", str(d / name))
        assert r.returncode in (0, 3), r.stdout + r.stderr  # 3: leaked clusters only, never corruption
    assert _read_raw(d / "top.qcow2") == bytes(model)


def test_backup_filter_is_the_root_while_running(daemons: Daemons, tmp_path: Path) -> None:
    """While a backup runs, QEMU's copy-before-write filter is the drive's root (query-block, info block),
    with its two bitmaps; the source keeps the job's copy bitmap."""
    p = Pair(daemons, tmp_path)
    p.same("drive-backup", {"device": "disk0", "target": "DIR/bt.qcow2", "sync": "full", "job-id": "bb",
                            "speed": 1})
    p.same("block-job-pause", {"device": "bb"})
    p.wait("JOB_STATUS_CHANGE", 2, status="paused")
    copied = re.compile(r"(?<=\"granularity\": 65536, )\"count\": \d+")  # how far it got before the pause
    p.same("query-block", mask=copied)
    p.hmp("info block")
    p.same("block-job-cancel", {"device": "bb", "force": True})
    p.wait("JOB_STATUS_CHANGE", status="null")
    p.same("query-block")


def _pair_under_fsize(daemons: Daemons, tmp_path: Path, fsize: int,
                      prepare: Callable[[Path], None] | None = None) -> tuple[list[Path], list[Monitor]]:
    """qemu-system-x86_64 and vdkit-daemon on a drive of their own chain (folders q/ and v/), each under a
    file-size limit of ``fsize`` bytes (RLIMIT_FSIZE, SIGXFSZ ignored: writes past it fail with EFBIG);
    ``prepare`` adds files to a folder before its daemon starts."""
    import sys

    from tests.conftest import require_tool
    from tests.daemon.conftest import QEMU_BASE

    limit = ["sh", "-c", f'trap "" XFSZ; exec prlimit --fsize={fsize} "$@"', "sh"]
    dirs = [tmp_path / "q", tmp_path / "v"]
    mons = []
    for d, base in zip(dirs, ([require_tool("qemu-system-x86_64"), *QEMU_BASE],
                              [sys.executable, "-m", "vdkit.daemon.main", "-S"]), strict=True):
        d.mkdir()
        _chain(d)
        if prepare is not None:
            prepare(d)
        _, path, _ = daemons.start([*limit, *base, "-drive", f"file={d}/top.qcow2,if=none,id=disk0"], d)
        mons.append(daemons.monitor(path).negotiate())
    return dirs, mons


def _error_events(m: Monitor, d: Path, mask: Callable[[str], str] = lambda e: e) -> list[str]:
    """The events of ``m`` (:func:`_events`), masked, with repeated BLOCK_JOB_ERRORs kept once (QEMU's
    parallel requests fail each)."""
    out: list[str] = []
    for e in _events(m, d):
        e = mask(e)
        if not (out and e == out[-1] and "BLOCK_JOB_ERROR" in e):
            out.append(e)
    return out


def test_target_write_errors(daemons: Daemons, tmp_path: Path) -> None:
    """on-target-error report/stop against qemu-system-x86_64: both daemons run under a file-size limit
    (RLIMIT_FSIZE, SIGXFSZ ignored) that the targets outgrow, so their writes fail with EFBIG.  How far a
    job got when it failed (offsets) and how many of QEMU's parallel requests failed are masked."""
    dirs, mons = _pair_under_fsize(daemons, tmp_path, 1835008)
    offsets = re.compile(r'"offset": \d+')

    def events(m: Monitor, d: Path) -> list[str]:
        return _error_events(m, d, lambda e: offsets.sub('"offset": N', e))

    def same(name: str, args: dict[str, Any]) -> None:
        outs = [offsets.sub('"offset": N', m.cmd_line(name, json.loads(json.dumps(args).replace("DIR", str(d)))))
                for m, d in zip(mons, dirs, strict=True)]
        assert outs[1] == outs[0], name

    for job, cmd, extra, last in (("e1", "drive-backup", {}, "null"),
                                  ("e2", "drive-backup", {"on-target-error": "stop"}, "paused"),
                                  ("m1", "drive-mirror", {}, "null")):
        same(cmd, {"device": "disk0", "target": f"DIR/{job}.qcow2", "sync": "full", "job-id": job, **extra})
        for m in mons:
            _wait(m, "JOB_STATUS_CHANGE", status=last, count=2 if last == "paused" else 1)
        if last == "paused":
            same("query-block-jobs", {})
            same("block-job-cancel", {"device": job, "force": True})
            for m in mons:
                _wait(m, "JOB_STATUS_CHANGE", status="null")
        q, v = (events(m, d) for m, d in zip(mons, dirs, strict=True))
        assert v == q, "\n".join(["qemu:", *q, "vdkit:", *v])


@pytest.mark.parametrize("sync", ["full", "top"])
def test_mirror_existing_target(daemons: Daemons, tmp_path: Path, sync: str) -> None:
    """mode existing: the target's own header (here naming mid.qcow2) decides its backing after the pivot."""
    p = Pair(daemons, tmp_path)
    for d in p.dirs:
        assert qemu_img("create", "-q", "-f", "qcow2", "-b", str(d / "mid.qcow2"), "-F", "qcow2",
                        str(d / "ex.qcow2")).returncode == 0
    p.same("drive-mirror", {"device": "disk0", "target": "DIR/ex.qcow2", "sync": sync, "mode": "existing",
                            "job-id": "mx"})
    p.wait("BLOCK_JOB_READY")
    p.same_events()
    p.same("block-job-complete", {"device": "mx"})
    p.wait("JOB_STATUS_CHANGE", status="null")
    p.same_events()
    p.same("query-block")
    p.hmp("info block -n")
    p.quit(daemons)
    p.compare("ex.qcow2", "top.qcow2")


@pytest.mark.parametrize("fmt", ["raw"])
def test_mirror_into_an_existing_filled_target(daemons: Daemons, tmp_path: Path, fmt: str) -> None:
    """sync full into an existing raw target full of 0xff: granules the source reads as zeros become holes,
    granules with data are copied whole, as QEMU's mirror leaves them (compared by ``qemu-img map`` of both
    targets: a chunk holding some data used to be written whole, its zeros as data).  (A qcow2 target: QEMU
    unmaps its zero clusters, vdkit keeps them allocated with the zero flag while the target is to keep its
    backing, since it writes the target opened without it; same content, more allocation.)"""
    def prepare(d: Path) -> None:
        assert qemu_img("create", "-q", "-f", fmt, str(d / f"t.{fmt}"), "4M").returncode == 0
        assert qemu_io("-f", fmt, "-c", "write -P 0xff 0 4M", str(d / f"t.{fmt}")).returncode == 0

    p = Pair(daemons, tmp_path, top_writes=("write -P 0x44 3076k 8k",), prepare=prepare)
    p.same("drive-mirror", {"device": "disk0", "target": f"DIR/t.{fmt}", "sync": "full", "mode": "existing",
                            "format": fmt, "job-id": "mx"})
    p.wait("BLOCK_JOB_READY")
    p.same("block-job-cancel", {"device": "mx"})  # a ready job cancelled: a consistent copy, no pivot
    p.wait("JOB_STATUS_CHANGE", status="null")
    p.same_events()
    p.quit(daemons)
    q, v = (qemu_img("map", "--output=json", "-f", fmt, str(d / f"t.{fmt}")) for d in p.dirs)
    assert v.stdout.replace(str(p.dirs[1]), "DIR") == q.stdout.replace(str(p.dirs[0]), "DIR"), (q.stdout, v.stdout)
    p.compare(f"t.{fmt}", "top.qcow2")


@pytest.mark.parametrize("sync", ["top", "full"])
def test_backup_nodes_while_running(daemons: Daemons, tmp_path: Path, sync: str) -> None:
    """While a drive-backup runs: its filter, the target (detect-zeroes unmap) and, for sync top, the target's
    own copy of its backing chain are listed, as QEMU lists them.  (QEMU 7.2 hangs listing the nodes of a
    sync none backup: not compared.)"""
    # enough in the active image that a speed-limited job is still copying when it is paused
    p = Pair(daemons, tmp_path, top_writes=("write -P 0x66 0 3M",))
    p.same("drive-backup", {"device": "disk0", "target": "DIR/bt.qcow2", "sync": sync, "job-id": "bb",
                            "speed": 1})
    p.same("block-job-pause", {"device": "bb"})
    p.wait("JOB_STATUS_CHANGE", 2, status="paused")
    grown = re.compile(r'"virtual-size": \d+(?=, "filename": "DIR/bt.qcow2", "format": "file")'
                       r'|(?<="granularity": 65536, )"count": \d+')
    p.hmp("info block -n")
    p.same("query-named-block-nodes", mask=grown)
    p.same("query-named-block-nodes", {"flat": True}, mask=grown)
    p.same("block-job-cancel", {"device": "bb", "force": True})
    p.wait("JOB_STATUS_CHANGE", status="null")
    p.same("query-named-block-nodes")


def test_backup_sync_none_can_be_paused(daemons: Daemons, tmp_path: Path) -> None:
    """A sync none backup waits for its cancel doing nothing by itself: pause, resume and cancel it."""
    d = tmp_path / "v"
    m, url = _start_vdkit(daemons, d)
    model = _model(d)
    start = bytes(model)
    assert m.cmd("drive-backup", {"device": "disk0", "target": str(d / "fl.qcow2"), "sync": "none",
                                  "job-id": "fl"}) == {"return": {}}
    assert m.cmd("block-job-pause", {"device": "fl"}) == {"return": {}}
    assert m.cmd("block-job-resume", {"device": "fl"}) == {"return": {}}
    for w in WRITES[:2]:
        _write(url, model, *w)  # copied before they land: the target keeps the old data
    assert m.cmd("block-job-cancel", {"device": "fl", "force": True}) == {"return": {}}
    _wait(m, "BLOCK_JOB_CANCELLED")
    m.send_raw(b'{"execute": "quit"}')
    for p in daemons.procs:
        p.wait(timeout=60)
    assert _read_raw(d / "fl.qcow2") == start  # the overlay over the disk as it was


def test_backup_of_a_blockdev_node(daemons: Daemons, tmp_path: Path) -> None:
    """drive-backup of a -blockdev node (no backend name: an explicit job-id is needed), with a bitmap and
    sync top (the header's chain below it)."""
    p = Pair(daemons, tmp_path, drive=["-blockdev", "driver=file,filename=DIR/top.qcow2,node-name=f-top",
                                       "-blockdev", "driver=qcow2,file=f-top,node-name=n-top"])
    p.same("drive-backup", {"device": "n-top", "target": "DIR/b0.qcow2", "sync": "full"})
    p.same("block-dirty-bitmap-add", {"node": "n-top", "name": "bm"})
    p.same("drive-backup", {"device": "n-top", "target": "DIR/b1.qcow2", "sync": "full", "job-id": "b1",
                            "bitmap": "bm", "bitmap-mode": "on-success"})
    p.wait("JOB_STATUS_CHANGE", status="null")
    p.same_events()
    p.same("drive-backup", {"device": "n-top", "target": "DIR/b2.qcow2", "sync": "top", "job-id": "b2"})
    p.wait("JOB_STATUS_CHANGE", status="null")
    p.same_events()
    p.same("query-named-block-nodes")
    p.quit(daemons)
    p.compare("b1.qcow2", "top.qcow2")
    p.compare("b2.qcow2", "top.qcow2")


@pytest.mark.parametrize("cmd", ["drive-mirror", "drive-backup"])
def test_stop_on_the_first_write_error(daemons: Daemons, tmp_path: Path, cmd: str) -> None:
    """on-target-error stop when the very first write fails (the target may not grow at all): the job pauses
    (one error, io-status failed), stays paused through a query and is cancelled, as in QEMU.  (The job has
    copied nothing yet: a new job's first step must not go on for ever.)"""
    def target(d: Path) -> None:
        assert qemu_img("create", "-q", "-f", "qcow2", str(d / "t.qcow2"), "4M").returncode == 0

    # a new 4 MiB qcow2 target is 196608 bytes (made beforehand): no cluster can be allocated in it
    dirs, mons = _pair_under_fsize(daemons, tmp_path, 196608, target)
    events = _error_events

    def same(name: str, args: dict[str, Any]) -> None:
        outs = [normalise(m.cmd_line(name, json.loads(json.dumps(args).replace("DIR", str(d)))))
                for m, d in zip(mons, dirs, strict=True)]
        assert outs[1] == outs[0], f"{name}:\nqemu:  {outs[0]}\nvdkit: {outs[1]}"

    # a target the daemon creates cannot even be formatted there (QEMU's text, no internal error)
    same(cmd, {"device": "disk0", "target": "DIR/new.qcow2", "sync": "full", "job-id": "j"})
    same(cmd, {"device": "disk0", "target": "DIR/t.qcow2", "sync": "full", "job-id": "j", "mode": "existing",
               "on-target-error": "stop"})
    for m in mons:
        _wait(m, "BLOCK_JOB_ERROR")
        _wait(m, "JOB_STATUS_CHANGE", status="paused", count=2 if cmd == "drive-backup" else 1)
    same("query-block-jobs", {})
    same("block-job-cancel", {"device": "j", "force": True})
    for m in mons:
        _wait(m, "JOB_STATUS_CHANGE", status="null")
    q, v = (events(m, d) for m, d in zip(mons, dirs, strict=True))
    assert v == q, "\n".join(["qemu:", *q, "vdkit:", *v])


def test_mirror_of_a_blockdev_node(daemons: Daemons, tmp_path: Path) -> None:
    """drive-mirror/blockdev-mirror of a parentless -blockdev node: an explicit job-id is needed (no backend
    name); at complete no parent moves onto the target (QEMU drops drive-mirror's target node, the source
    stays as it was), the target file holds the copy."""
    p = Pair(daemons, tmp_path, drive=["-blockdev", "driver=file,filename=DIR/top.qcow2,node-name=f-top",
                                       "-blockdev", "driver=qcow2,file=f-top,node-name=n-top"])
    for d in p.dirs:
        assert qemu_img("create", "-q", "-f", "qcow2", str(d / "bt.qcow2"), "4M").returncode == 0
    p.same("drive-mirror", {"device": "n-top", "target": "DIR/m0.qcow2", "sync": "full"})
    p.same("drive-mirror", {"device": "f-top", "target": "DIR/m0.qcow2", "sync": "full", "job-id": "m0"})
    for sync in ("top", "full", "none"):
        p.same("drive-mirror", {"device": "n-top", "target": f"DIR/m-{sync}.qcow2", "sync": sync, "job-id": "m"})
        p.wait("BLOCK_JOB_READY")
        p.same("query-block-jobs")
        p.same("block-job-complete", {"device": "m"})
        p.wait("JOB_STATUS_CHANGE", status="null")
        p.same_events()
    p.same("query-named-block-nodes")
    p.same("blockdev-add", {"driver": "qcow2", "node-name": "n-bt",
                            "file": {"driver": "file", "filename": "DIR/bt.qcow2"}})
    p.same("blockdev-mirror", {"device": "n-top", "target": "n-bt", "sync": "full", "job-id": "bm"})
    p.wait("BLOCK_JOB_READY")
    p.same("block-job-complete", {"device": "bm"})
    p.wait("JOB_STATUS_CHANGE", status="null")
    p.same_events()
    p.same("query-named-block-nodes")
    p.quit(daemons)
    for name in ("m-top.qcow2", "m-full.qcow2", "m-none.qcow2", "bt.qcow2"):
        p.compare(name, "top.qcow2")


def _same_lock_bytes(p: Pair) -> None:
    from tests.daemon.test_graph_diff import lock_bytes

    held = [lock_bytes(d) for d in p.dirs]
    assert held[1] == held[0], f"qemu:  {held[0]}\nvdkit: {held[1]}"


def test_mirror_of_an_exported_blockdev_node(daemons: Daemons, tmp_path: Path) -> None:
    """An NBD export of a -blockdev node follows a mirror as QEMU's BlockBackend does: while the job runs it
    names the mirror_top filter and its writes are mirrored; at complete it moves onto the target
    (drive-mirror's target node then lives as long as the export; blockdev-mirror's is the user's node)."""
    p = Pair(daemons, tmp_path, drive=["-blockdev", "driver=file,filename=DIR/top.qcow2,node-name=f-top",
                                       "-blockdev", "driver=qcow2,file=f-top,node-name=n-top"])
    grown = re.compile(r'"virtual-size": \d+(?=, "filename": "DIR/m.qcow2", "format": "file")'
                       r'|(?<="granularity": 65536, )"count": \d+')

    def write(pattern: int, at: int) -> None:
        for d in p.dirs:
            r = qemu_io("-f", "raw", "-c", f"write -P {pattern:#x} {at}k 64k", f"nbd+unix:///n-top?socket={d}/n.sock")
            assert r.returncode == 0, r.stderr

    for d in p.dirs:
        assert qemu_img("create", "-q", "-f", "qcow2", str(d / "bt.qcow2"), "4M").returncode == 0
    p.same("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "DIR/n.sock"}}})
    p.same("block-export-add", {"type": "nbd", "id": "e", "node-name": "n-top", "writable": True})
    p.same("drive-mirror", {"device": "n-top", "target": "DIR/m.qcow2", "sync": "top", "job-id": "m", "speed": 1})
    p.same("block-job-pause", {"device": "m"})
    p.wait("JOB_STATUS_CHANGE", status="paused")
    p.same("query-block-exports")  # the filter's name
    p.same("query-named-block-nodes", mask=grown)  # the target's nodes (json: named, no backing)
    p.same("query-named-block-nodes", {"flat": True}, mask=grown)
    p.same("x-debug-query-block-graph")  # the job, its filter (the export's root now), its target backend
    _same_lock_bytes(p)  # the target's file refuses others' reads while the job writes it
    p.same("block-job-set-speed", {"device": "m", "speed": 0})
    p.same("block-job-resume", {"device": "m"})
    p.wait("BLOCK_JOB_READY")
    write(0x44, 3072)  # mirrored while ready
    p.same("block-job-complete", {"device": "m"})
    p.wait("JOB_STATUS_CHANGE", status="null")
    p.same_events(mask=re.compile(r'"len": \d+, "offset": \d+'))
    p.same("query-block-exports")
    p.same("query-named-block-nodes")
    _same_lock_bytes(p)
    write(0x55, 3200)  # lands in the target now
    p.same("block-export-del", {"id": "e"})
    p.same_events()
    p.same("query-named-block-nodes")  # the target went with the export
    p.same("blockdev-add", {"driver": "qcow2", "node-name": "n-bt",
                            "file": {"driver": "file", "filename": "DIR/bt.qcow2"}})
    p.same("block-export-add", {"type": "nbd", "id": "e2", "node-name": "n-top", "writable": True})
    p.same("blockdev-mirror", {"device": "n-top", "target": "n-bt", "sync": "full", "job-id": "bm"})
    p.wait("BLOCK_JOB_READY")
    p.same("query-block-exports")
    p.same("x-debug-query-block-graph")
    _same_lock_bytes(p)
    p.same("block-job-complete", {"device": "bm"})
    p.wait("JOB_STATUS_CHANGE", status="null")
    p.same_events(mask=re.compile(r'"len": \d+, "offset": \d+'))
    p.same("query-block-exports")
    write(0x66, 128)
    p.same("blockdev-del", {"node-name": "n-bt"})
    p.same("x-debug-query-block-graph")
    p.same("blockdev-del", {"node-name": "n-top"})  # no parent now
    p.quit(daemons)
    for name in ("m.qcow2", "bt.qcow2", "top.qcow2"):
        p.compare(name)


def test_export_names_the_filter_of_a_job(daemons: Daemons, tmp_path: Path) -> None:
    """A job's filter goes above the drive's node under every parent, the export's backend included:
    query-block-exports names it while the job lives, the node again afterwards."""
    p = Pair(daemons, tmp_path)
    p.same("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "DIR/n.sock"}}})
    p.same("nbd-server-add", {"device": "disk0"})
    for cmd, args in [("drive-mirror", {"target": "DIR/fm.qcow2", "sync": "full"}),
                      ("drive-backup", {"target": "DIR/fb.qcow2", "sync": "full"}),
                      ("block-stream", {}), ("block-commit", {})]:
        p.same(cmd, {"device": "disk0", "job-id": "j", "speed": 1, **args})
        p.same("query-block-exports")
        p.same("x-debug-query-block-graph")  # the job's filter under the drive's and the export's backends
        p.same("block-job-cancel", {"device": "j", "force": True})
        p.wait("JOB_STATUS_CHANGE", status="null")
        p.same_events(mask=re.compile(r'"len": \d+, "offset": \d+'))
        p.same("query-block-exports")


def test_drive_lock_bytes_follow_jobs(daemons: Daemons, tmp_path: Path) -> None:
    """The lock bytes on a -drive chain's files while each job type runs and after it ends (/proc/locks
    compared with qemu-system-x86_64's), and what a third process that wants to read meets."""
    from tests.daemon.test_graph_diff import lock_bytes

    p = Pair(daemons, tmp_path)

    def same_locks(reader: str | None = None) -> None:
        held = [lock_bytes(d) for d in p.dirs]
        assert held[1] == held[0], f"qemu:  {held[0]}\nvdkit: {held[1]}"
        if reader is not None:  # another process reading the file (a consistent read)
            outs = [qemu_io("-r", "-c", "read -q 0 512", str(d / reader)) for d in p.dirs]
            texts = [(r.returncode, (r.stdout + r.stderr).replace(str(d), "DIR"))
                     for r, d in zip(outs, p.dirs, strict=True)]
            assert texts[1] == texts[0]

    same_locks()
    p.same("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "DIR/n.sock"}}})
    p.same("nbd-server-add", {"device": "disk0", "writable": True})
    same_locks()
    jobs: list[tuple[str, dict[str, Any], str | None]] = [
        ("drive-mirror", {"target": "DIR/j1.qcow2", "sync": "full"}, "j1.qcow2"),
        ("drive-mirror", {"target": "DIR/j2.qcow2", "sync": "top"}, "j2.qcow2"),
        ("drive-backup", {"target": "DIR/j3.qcow2", "sync": "full"}, "j3.qcow2"),
        ("block-stream", {}, "top.qcow2"),
        ("block-commit", {"top": "DIR/mid.qcow2"}, "mid.qcow2"),
        ("block-commit", {}, "mid.qcow2"),
    ]
    for cmd, args, reader in jobs:
        p.same(cmd, {"device": "disk0", "job-id": "j", "speed": 1, **args})
        p.same("block-job-pause", {"device": "j"})
        p.wait("JOB_STATUS_CHANGE", status="paused")
        same_locks(reader)
        p.same("block-job-cancel", {"device": "j", "force": True})
        p.wait("JOB_STATUS_CHANGE", status="null")
        p.same_events(mask=re.compile(r'"len": \d+, "offset": \d+'))
        same_locks(reader)
    p.same("query-named-block-nodes", {"flat": True})  # a cancelled active commit leaves the base writable
    for cmd, args in [("drive-mirror", {"target": "DIR/j4.qcow2", "sync": "top"}), ("block-commit", {})]:
        p.same(cmd, {"device": "disk0", "job-id": "j", **args})
        p.wait("BLOCK_JOB_READY")
        same_locks()
        p.same("block-job-complete", {"device": "j"})
        p.wait("JOB_STATUS_CHANGE", status="null")
        p.same_events(mask=re.compile(r'"len": \d+, "offset": \d+'))
        same_locks()


def test_mirror_write_blocking(daemons: Daemons, tmp_path: Path) -> None:
    """copy-mode write-blocking: writes made while the job is held go to the target before they complete
    (the job's bitmap does not record them; len and offset grow by their bytes), as QEMU's active mirror."""
    p = Pair(daemons, tmp_path)
    p.same("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "DIR/n.sock"}}})
    p.same("nbd-server-add", {"device": "disk0", "writable": True})

    def write(*cmds: str) -> None:
        for d in p.dirs:
            r = qemu_io("-f", "raw", *[a for c in cmds for a in ("-c", c)], f"nbd+unix:///disk0?socket={d}/n.sock")
            assert r.returncode == 0, r.stderr

    def progress() -> list[tuple[int, int]]:
        return [(j["len"], j["offset"]) for j in (m.cmd("query-block-jobs")["return"][0] for m in p.mons)]

    p.same("drive-mirror", {"device": "disk0", "target": "DIR/wb.qcow2", "sync": "full", "job-id": "j",
                            "speed": 1, "copy-mode": "write-blocking"})
    p.same("block-job-pause", {"device": "j"})
    p.wait("JOB_STATUS_CHANGE", status="paused")
    before = progress()
    # past the data the job copies by itself (the chain allocates 0..3M)
    write("write -P 0x44 3M 64k", "write -P 0x45 3200k 4k", "write -z 3328k 64k")
    after = progress()
    assert [(a[0] - b[0], a[1] - b[1]) for a, b in zip(after, before, strict=True)] == [(135168, 135168)] * 2
    p.same("query-block", mask=re.compile(r'(?<="granularity": 65536, )"count": \d+'))  # recording: false
    p.same("block-job-cancel", {"device": "j", "force": True})
    p.wait("JOB_STATUS_CHANGE", status="null")
    p.same_events(mask=re.compile(r'"len": \d+, "offset": \d+'))
    for d in p.dirs:  # the held job copied none of it: the writes themselves did
        r = qemu_io("-r", "-c", "read -q -P 0x44 3M 64k", "-c", "read -q -P 0x45 3200k 4k",
                    "-c", "read -q -P 0 3328k 64k", str(d / "wb.qcow2"))
        assert (r.returncode, r.stdout + r.stderr) == (0, "")
    # to the end: writes while ready, complete, the drive on a target equal to the disk
    p.same("drive-mirror", {"device": "disk0", "target": "DIR/wb2.qcow2", "sync": "full", "job-id": "j",
                            "copy-mode": "write-blocking"})
    p.wait("BLOCK_JOB_READY")
    write("write -P 0x46 100k 8k", "write -P 0x47 2047k 2k")
    p.same("block-job-complete", {"device": "j"})
    p.wait("JOB_STATUS_CHANGE", status="null")
    p.same_events(mask=re.compile(r'"len": \d+, "offset": \d+'))
    p.same("query-block")
    p.quit(daemons)
    p.compare("wb2.qcow2", "top.qcow2")


def test_mirror_of_an_exported_blockdev_node_none_and_existing(daemons: Daemons, tmp_path: Path) -> None:
    """The export's move at complete gives drive-mirror's target the backing QEMU gives it: the source for
    sync none, the chain its own header names for mode existing."""
    p = Pair(daemons, tmp_path, drive=["-blockdev", "driver=file,filename=DIR/top.qcow2,node-name=f-top",
                                       "-blockdev", "driver=qcow2,file=f-top,node-name=n-top"])
    for d in p.dirs:  # an existing target whose header names the middle image
        assert qemu_img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", str(d / "ex.qcow2"),
                        "4M").returncode == 0
    p.same("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "DIR/n.sock"}}})
    for i, args in enumerate([{"target": "DIR/none.qcow2", "sync": "none"},
                              {"target": "DIR/ex.qcow2", "sync": "top", "mode": "existing", "format": "qcow2"}]):
        if i:  # the first export went with the first target: the source has no parent again
            p.same("block-export-del", {"id": "e0", "mode": "hard"})
        p.same("block-export-add", {"type": "nbd", "id": f"e{i}", "node-name": "n-top", "writable": True})
        p.same("drive-mirror", {"device": "n-top", "job-id": "m", **args})
        p.wait("BLOCK_JOB_READY")
        p.same("block-job-complete", {"device": "m"})
        p.wait("JOB_STATUS_CHANGE", status="null")
        p.same_events(mask=re.compile(r'"len": \d+, "offset": \d+'))
        p.same("query-named-block-nodes")
        p.same("x-debug-query-block-graph")
        _same_lock_bytes(p)
        for d in p.dirs:
            r = qemu_io("-f", "raw", "-c", f"write -P {0x70 + i:#x} {3072 + 128 * i}k 64k",
                        f"nbd+unix:///n-top?socket={d}/n.sock")
            assert r.returncode == 0, (d, r.stdout)
    p.quit(daemons)
    for name in ("none.qcow2", "ex.qcow2", "top.qcow2"):
        p.compare(name)
