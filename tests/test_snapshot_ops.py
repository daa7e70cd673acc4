"""Snapshot operations: lookup rules, ID assignment, and a model-based property test.

The property test interleaves guest writes (qemu-io), vdkit snapshot
create/delete/revert and qemu-img snapshot create/delete on one image, over
random cluster sizes and refcount widths.  After every step the guest
content of the active layer and of every snapshot must equal a simple model,
``qemu-img check`` must be clean, and whether a vdkit operation failed (a
refcount overflow at narrow widths) must agree with what qemu-img does to a
copy of the same image.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.conftest import check_ok, qemu_img, qemu_io, require_tool, vdkit_img
from tests.diff.test_snapshot_write import check_counts, guest, snapshot_list
from vdkit.block.node import open_image
from vdkit.block.snapshot import ICOUNT_UNUSED
from vdkit.errors import SnapshotNotFoundError, VdkitError
from vdkit.formats.qcow2 import layout as L
from vdkit.formats.qcow2.driver import Qcow2Driver
from vdkit.formats.qcow2.snapshot import SnapshotEntry
from vdkit.formats.qcow2.snapshot_ops import (
    find_by_id_and_name,
    find_by_name,
    find_id_then_name,
    next_snapshot_id,
)

# every test on both table backends (vdkit.io.tables): lists and numpy
pytestmark = pytest.mark.usefixtures("table_backend")


def _e(id_str: str, name: str) -> SnapshotEntry:
    return SnapshotEntry(0, 0, id_str, name, 0, 0, 0, 0, 0)


def test_next_id_follows_strtoul() -> None:
    assert next_snapshot_id([]) == "1"
    assert next_snapshot_id([_e("1", "a"), _e("3", "b"), _e("2", "c")]) == "4"
    assert next_snapshot_id([_e("07x", "a"), _e("abc", "b")]) == "8"
    assert next_snapshot_id([_e("  12", "a"), _e("+5", "b")]) == "13"
    assert next_snapshot_id([_e("-1", "a")]) == "0"  # strtoul wraps; 7.2 then writes "0"


def test_lookup_modes() -> None:
    entries = [_e("1", "first"), _e("2", "1"), _e("13", "snap1"), _e("14", "snap1")]
    assert find_by_name(entries, "1") is entries[1]
    assert find_by_name(entries, "snap1") is entries[2]
    assert find_by_name(entries, "2") is None
    assert find_by_id_and_name(entries, "14", "snap1") is entries[3]
    assert find_by_id_and_name(entries, "13", None) is entries[2]
    assert find_by_id_and_name(entries, "13", "first") is None
    assert find_by_id_and_name(entries, None, None) is None
    assert find_id_then_name(entries, "1") is entries[0]  # the ID wins over the name "1"
    assert find_id_then_name(entries, "snap1") is entries[2]
    long = [_e("1", "n" * 300)]
    assert find_by_name(long, "n" * 300) is None  # compared after QEMU's 255-byte truncation
    assert find_by_name(long, "n" * 255) is long[0]


def test_library_errors(tmp_path: Path) -> None:
    img = tmp_path / "a.qcow2"
    check_ok("create", "-q", "-f", "qcow2", str(img), "1M")
    with open_image(str(img), readonly=False) as node:
        with pytest.raises(SnapshotNotFoundError):
            node.snapshot_delete(name="nope")
        e = node.snapshot_create("x" * 300, date_sec=5, date_nsec=6, icount=None)
        assert e.name == "x" * 255 and e.id_str == "1" and e.icount == ICOUNT_UNUSED
    with open_image(str(img), readonly=True) as node, pytest.raises(VdkitError):
        node.snapshot_create("ro", date_sec=0, date_nsec=0)
    raw = tmp_path / "r.raw"
    raw.write_bytes(bytes(4096))
    with open_image(str(raw), "raw", readonly=False) as node, pytest.raises(
        VdkitError, match="Block driver does not support snapshots"
    ):
        node.snapshot_create("x", date_sec=0, date_nsec=0)
    info = check_ok("snapshot", "-l", str(img)).stdout
    assert "x" * 255 in info and "x" * 256 not in info


@pytest.mark.parametrize("opts", ["", "cluster_size=4k,refcount_bits=8", "extended_l2=on", "refcount_bits=2"])
def test_delete_gives_the_active_tree_its_tables_back(tmp_path: Path, opts: str) -> None:
    """``snapshot -c`` copies the active L2 tables (their COPIED flags change: the originals stay with
    the snapshot); deleting that snapshot points the active L1 at the snapshot's tables again where
    they hold the wanted bytes, writing no table: the L1 entries, every L2 table and the guest
    content are what they were, nothing leaks (qemu-img check), and a table shared with another
    snapshot is copied instead."""
    def vdkit_ok(*args: str) -> None:
        r = vdkit_img(*args)
        assert r.returncode == 0, r.stderr

    img = tmp_path / "a.qcow2"
    check_ok("create", "-q", "-f", "qcow2", *(["-o", opts] if opts else []), str(img), "64M")
    writes = ["-c", "write -P 1 0 3M", "-c", "write -P 2 40M 2M", "-c", "write -z 20M 1M"]
    assert qemu_io(*writes, str(img)).returncode == 0

    def tables() -> tuple[list[int], list[bytes]]:
        with open_image(str(img), "qcow2") as node:
            drv = node.driver
            assert isinstance(drv, Qcow2Driver)
            l1 = [int(e) for e in drv.clusters.l1]
            cs = drv.header.cluster_size
            return l1, [drv.file.pread(e & L.L1E_OFFSET_MASK, cs) for e in l1 if e & L.L1E_OFFSET_MASK]

    before, content = tables(), guest(img)
    assert before[1]  # (4k clusters: several tables)
    vdkit_ok("snapshot", "-c", "s1", str(img))
    assert tables()[0] != before[0]  # (the active tree moved to copies)
    size = img.stat().st_size
    vdkit_ok("snapshot", "-d", "s1", str(img))
    assert tables() == before and img.stat().st_size == size
    assert check_counts(img) == (0, {"corruptions": 0, "leaks": 0, "check-errors": 0})
    assert guest(img) == content
    # two snapshots share the original tables: deleting one leaves the other its tables
    vdkit_ok("snapshot", "-c", "s1", str(img))
    vdkit_ok("snapshot", "-c", "s2", str(img))
    vdkit_ok("snapshot", "-d", "s2", str(img))
    vdkit_ok("snapshot", "-d", "s1", str(img))
    assert check_counts(img) == (0, {"corruptions": 0, "leaks": 0, "check-errors": 0})
    assert guest(img) == content


# -- model-based property test ----------------------------------------------------------------

SIZE = 256 * 1024

ops = st.one_of(
    st.tuples(st.just("write"), st.integers(0, SIZE // 512 - 1), st.integers(1, 160), st.integers(1, 255)),
    st.tuples(st.just("create"), st.booleans()),  # True: vdkit, False: qemu-img
    st.tuples(st.just("delete"), st.booleans(), st.integers(0, 7)),
    st.tuples(st.just("revert"), st.integers(0, 7)),
)


class Model:
    def __init__(self) -> None:
        self.active = bytearray(SIZE)
        self.snaps: list[tuple[str, str, bytes]] = []  # id, name, content
        self.counter = 0

    def next_id(self) -> str:
        return next_snapshot_id([_e(i, n) for i, n, _ in self.snaps])


def _vdkit(img: Path, op: str, arg: str) -> bool:
    """Run one library operation; False when it failed with a refcount overflow."""
    with open_image(str(img), "qcow2", readonly=False) as node:
        try:
            if op == "create":
                node.snapshot_create(arg, date_sec=1, date_nsec=0, icount=0)
            elif op == "delete":
                node.snapshot_delete(name=arg)
            else:
                entry = find_id_then_name(node.driver.snapshots(), arg)
                assert entry is not None
                node.snapshot_revert(entry)
        except VdkitError as exc:
            assert exc.errno == 22, exc.message
            return False
    return True


def _qemu_agrees(img: Path, op: str, arg: str) -> bool:
    twin = img.with_name("twin.qcow2")
    shutil.copy(img, twin)
    flag = {"create": "-c", "delete": "-d", "revert": "-a"}[op]
    r = qemu_img("snapshot", flag, arg, str(twin))
    twin.unlink()
    return r.returncode == 0


def _verify(img: Path, model: Model) -> None:
    assert check_counts(img) == (0, {"corruptions": 0, "leaks": 0, "check-errors": 0})
    listed = [(str(s["id"]), str(s["name"])) for s in snapshot_list(img)]
    assert listed == [(i, n) for i, n, _ in model.snaps]
    assert guest(img) == bytes(model.active)
    for sid, _, content in model.snaps:
        assert guest(img, sid) == content


@settings(
    max_examples=int(os.environ.get("VDKIT_PROPERTY_EXAMPLES", "14")),  # raise it for a long hunt
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    cluster_bits=st.sampled_from([9, 12, 16]),
    refcount_bits=st.sampled_from([1, 2, 4, 16]),
    variant=st.sampled_from(["", "", "extended_l2", "v2"]),
    steps=st.lists(ops, min_size=4, max_size=9),
)
# Refcount overflow for certain, not only when hypothesis happens on it: at 1 bit a
# second reference to written data cannot be counted; at 2 bits the fourth cannot.
@example(cluster_bits=12, refcount_bits=1, variant="", steps=[
    ("create", True), ("write", 0, 16, 7), ("create", True), ("create", False), ("write", 8, 8, 9),
    ("revert", 0), ("delete", True, 0), ("create", True)])
@example(cluster_bits=9, refcount_bits=2, variant="", steps=[
    ("write", 0, 64, 3), ("create", True), ("create", False), ("create", True), ("create", False),
    ("revert", 1), ("delete", False, 0), ("create", True), ("write", 0, 8, 5), ("revert", 0)])
def test_random_sequences_match_model(cluster_bits: int, refcount_bits: int, variant: str,
                                      steps: list[tuple]) -> None:
    opts = f"cluster_size={1 << cluster_bits},refcount_bits={refcount_bits}"
    if variant == "extended_l2":
        opts = f"cluster_size=65536,refcount_bits={refcount_bits},extended_l2=on"
    elif variant == "v2":
        opts = f"cluster_size={1 << cluster_bits},compat=0.10"  # v2: 16-bit refcounts only
    with tempfile.TemporaryDirectory() as d:
        img = Path(d) / "img.qcow2"
        check_ok("create", "-q", "-f", "qcow2", "-o", opts, str(img), str(SIZE))
        model = Model()
        for step in steps:
            kind = step[0]
            if kind == "write":
                _, sector, nsect, pattern = step
                off, length = sector * 512, min(nsect * 512, SIZE - sector * 512)
                r = qemu_io("-c", f"write -P {pattern} {off} {length}", str(img))
                if "Invalid argument" in r.stdout + r.stderr:
                    continue  # copy-on-write hit a refcount limit in QEMU itself: not our concern
                assert r.returncode == 0, r.stdout + r.stderr
                model.active[off : off + length] = bytes([pattern]) * length
            elif kind == "create":
                model.counter += 1
                name = f"s{model.counter}"
                if step[1]:
                    expect = _qemu_agrees(img, "create", name)
                    ok = _vdkit(img, "create", name)
                    assert ok == expect
                else:
                    ok = qemu_img("snapshot", "-c", name, str(img)).returncode == 0
                    if not ok:
                        check_ok("check", "-q", "-r", "leaks", str(img))  # QEMU's failure leaks
                if ok:
                    model.snaps.append((model.next_id(), name, bytes(model.active)))
            elif kind == "delete":
                if not model.snaps:
                    continue
                victim = model.snaps[step[2] % len(model.snaps)]
                if step[1]:
                    assert _vdkit(img, "delete", victim[1])
                else:
                    check_ok("snapshot", "-d", victim[1], str(img))
                model.snaps.remove(victim)
            else:
                if not model.snaps:
                    continue
                sid, _, content = model.snaps[step[1] % len(model.snaps)]
                expect = _qemu_agrees(img, "revert", sid)
                ok = _vdkit(img, "revert", sid)
                assert ok == expect
                if ok:
                    model.active[:] = content
            _verify(img, model)


# -- VM state ---------------------------------------------------------------------------------

def _hmp(img: Path, *commands: str) -> str:
    """Run HMP commands in a QEMU with the image attached; returns the monitor transcript."""
    qemu = require_tool("qemu-system-x86_64")
    script = "".join(c + "\n" for c in (*commands, "quit"))
    r = subprocess.run(
        [qemu, "-machine", "none", "-nodefaults", "-display", "none", "-monitor", "stdio",
         "-blockdev", f"driver=qcow2,node-name=d0,file.driver=file,file.filename={img}"],
        input=script.encode(), capture_output=True, timeout=60,
    )
    return (r.stdout + r.stderr).decode("utf-8", "replace")


@pytest.mark.parametrize("opts", ["cluster_size=4k", "extended_l2=on", "compat=0.10"])
def test_vm_state_roundtrip_and_interop(tmp_path: Path, opts: str) -> None:
    img = tmp_path / "vm.qcow2"
    check_ok("create", "-q", "-f", "qcow2", "-o", opts, str(img), "16M")
    assert qemu_io("-c", "write -P 3 0 64k", str(img)).returncode == 0
    transcript = _hmp(img, "savevm qemu")
    assert "Error" not in transcript, transcript
    state = bytes(range(256)) * 1200 + b"tail"  # several clusters, not cluster aligned
    with open_image(str(img), "qcow2", readonly=False) as node:
        theirs = node.driver.snapshots()[0]
        qemu_state = node.read_vmstate(theirs)
        assert len(qemu_state) == theirs.vm_state_size and qemu_state[:4] == b"QEVM"
        mine = node.snapshot_create("mine", date_sec=1, date_nsec=0, vm_state=state)
        assert mine.vm_state_size == len(state)
        copy = node.snapshot_create("qemu-copy", date_sec=2, date_nsec=0, vm_state=qemu_state)
        assert node.read_vmstate(mine) == state
        assert node.read_vmstate(copy) == qemu_state
    assert check_counts(img) == (0, {"corruptions": 0, "leaks": 0, "check-errors": 0})
    # QEMU loads the state vdkit stored
    transcript = _hmp(img, "loadvm qemu-copy")
    assert "Error" not in transcript and "error" not in transcript, transcript
    with open_image(str(img), "qcow2", readonly=False) as node:
        node.snapshot_delete(name="mine")
        assert node.read_vmstate(find_by_name(node.driver.snapshots(), "qemu-copy")) == qemu_state
    assert check_counts(img) == (0, {"corruptions": 0, "leaks": 0, "check-errors": 0})
    assert guest(img) == b"\x03" * 65536 + bytes(16 * 1024 * 1024 - 65536)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cluster_bits=st.sampled_from([9, 12, 16]),
    steps=st.lists(st.one_of(
        st.tuples(st.just("write"), st.integers(0, SIZE // 512 - 1), st.integers(1, 96), st.integers(1, 255)),
        st.tuples(st.just("create"), st.booleans()),
        st.tuples(st.just("delete"), st.integers(0, 7)),
        st.tuples(st.just("revert"), st.integers(0, 7)),
    ), min_size=3, max_size=10),
)
def test_one_session_writes_and_snapshots(cluster_bits: int, steps: list[tuple]) -> None:
    """Guest writes through the data path and snapshot operations in one open (the daemon's case)."""
    with tempfile.TemporaryDirectory() as d:
        img = Path(d) / "img.qcow2"
        check_ok("create", "-q", "-f", "qcow2", "-o", f"cluster_size={1 << cluster_bits}", str(img), str(SIZE))
        model = Model()
        with open_image(str(img), "qcow2", readonly=False) as node:
            drv = node.driver
            for step in steps:
                if step[0] == "write":
                    _, sector, nsect, pattern = step
                    off, length = sector * 512, min(nsect * 512, SIZE - sector * 512)
                    drv.write(off, bytes([pattern]) * length)  # type: ignore[attr-defined]
                    model.active[off : off + length] = bytes([pattern]) * length
                elif step[0] == "create":
                    model.counter += 1
                    name = f"s{model.counter}"
                    node.snapshot_create(name, date_sec=1, date_nsec=0)
                    model.snaps.append((model.next_id(), name, bytes(model.active)))
                elif model.snaps:
                    sid, name, content = model.snaps[step[1] % len(model.snaps)]
                    if step[0] == "delete":
                        node.snapshot_delete(snapshot_id=sid, name=name)
                        model.snaps = [s for s in model.snaps if s[0] != sid]
                    else:
                        entry = find_id_then_name(drv.snapshots(), sid)
                        assert entry is not None
                        node.snapshot_revert(entry)
                        model.active[:] = content
                assert drv.read(0, SIZE) == bytes(model.active)  # type: ignore[attr-defined]
        _verify(img, model)
