"""qcow2 corruption events, compared with QEMU 7.2 on the same damaged images.

A writable image that meets untrusted metadata during I/O is marked corrupt
(header bit, ``qcow2: Marking image as corrupt: ...``) and the node dies:
every later request fails with ENOMEDIUM.  A read-only image only fails the
request with EIO and reports the event once (``qcow2: Image is corrupt:
...``).  The oracle is ``qemu-io``/``qemu-img`` run on an identical copy.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest

import vdkit
from tests.conftest import check_ok, qemu_img, qemu_io, vdkit_img
from tests.helpers.patching import get_u64, set_u16, set_u64
from vdkit.errors import VdkitError
from vdkit.formats.qcow2.driver import CorruptionReport, Qcow2Driver

COPIED = 1 << 63

# damage -> what it does to the image made by _image (cluster 0 data at L2 entry 0)
DAMAGE = ("data_unaligned", "l2_unaligned", "data_on_l1", "data_on_reftable", "data_on_l2", "data_on_refblock",
          "refblock_unaligned", "l1_refcount_zero", "l2_on_reftable", "l2_on_l1")


def _image(path: Path, damage: str) -> None:
    """A 2 MiB image with data in cluster 0 and a compressed cluster 1, then one piece of damage."""
    check_ok("create", "-q", "-f", "qcow2", str(path), "2M")
    assert qemu_io("-c", "write -P 1 0 64k", "-c", "write -c -P 2 64k 64k", str(path)).returncode == 0
    l1 = get_u64(path, 40)
    rt = get_u64(path, 48)
    l2 = get_u64(path, l1) & 0x00FFFFFFFFFFFE00
    if damage == "l1_refcount_zero":  # the allocator may hand out the L1 table's cluster for data
        set_u16(path, get_u64(path, rt) + 2 * (l1 >> 16), 0)
        return
    target = {
        "data_unaligned": (l2, COPIED | 0x50200),
        "l2_unaligned": (l1, COPIED | (l2 + 0x200)),
        "data_on_l1": (l2, COPIED | l1),
        "data_on_reftable": (l2, COPIED | rt),
        "data_on_l2": (l2, COPIED | l2),
        "data_on_refblock": (l2, COPIED | get_u64(path, rt)),
        "refblock_unaligned": (rt, get_u64(path, rt) + 0x200),
        "l2_on_reftable": (l1, COPIED | rt),
        "l2_on_l1": (l1, COPIED | l1),
    }[damage]
    set_u64(path, *target)


def _info(path: Path, *, vdkit_tool: bool = False) -> str:
    """``info`` text without the name and the disk size (copies differ in allocation, not content)."""
    out = (vdkit_img if vdkit_tool else qemu_img)("info", str(path)).stdout
    return "".join(line for line in out.splitlines(True) if not line.startswith(("image:", "disk size:")))


def _corrupt_bit(path: Path) -> bool:
    return bool(get_u64(path, 72) & 2)


def _twins(tmp: Path, damage: str) -> tuple[Path, Path]:
    q, v = tmp / "q.qcow2", tmp / "v.qcow2"
    _image(q, damage)
    shutil.copyfile(q, v)
    return q, v


# -- library: the node's behaviour against qemu-io's ------------------------------------------------

def _vdkit_ops(path: Path, readonly: bool, ops: list[str], reports: list[CorruptionReport]) -> list[str]:
    """Run qemu-io-like ``read|write OFF LEN`` ops on a node; results as qemu-io words ("ok" or strerror)."""
    import os

    out = []
    with vdkit.open(path, readonly=readonly) as node:
        assert isinstance(node.driver, Qcow2Driver)
        node.driver.corruption_hook = reports.append
        for op in ops:
            kind, off, length = op.split()
            try:
                if kind == "read":
                    node.read(int(off), int(length))
                else:
                    node.write(int(off), b"\x05" * int(length))
                out.append("ok")
            except VdkitError as exc:
                assert exc.errno is not None, exc
                out.append(os.strerror(exc.errno))
    return out


def _qemu_ops(path: Path, readonly: bool, ops: list[str]) -> tuple[list[str], str]:
    args = [a for op in ops for a in ("-c", f"{op.split()[0]} {op.split()[1]} {op.split()[2]}")]
    r = qemu_io(*(["-r"] if readonly else []), *args, str(path))
    words = []
    for line in r.stdout.splitlines():
        if " failed: " in line:
            words.append(line.split(" failed: ", 1)[1])
        elif line.startswith(("read ", "wrote ")):
            words.append("ok")
    return words, r.stderr


WRITE_FIRST = ["write 4096 4096", "read 0 4096", "write 1048576 4096", "read 0 4096"]
READ_FIRST = ["read 0 4096", "read 0 4096", "write 4096 4096"]


@pytest.mark.parametrize("damage", DAMAGE)
def test_writable_node_dies_like_qemu(damage: str, tmp_path: Path) -> None:
    """First bad request: EIO, corrupt bit, one "Marking image as corrupt"; then ENOMEDIUM (qemu-io)."""
    q, v = _twins(tmp_path, damage)
    words, stderr = _qemu_ops(q, False, WRITE_FIRST)
    reports: list[CorruptionReport] = []
    assert _vdkit_ops(v, False, WRITE_FIRST, reports) == words
    assert "".join(r.text + "\n" for r in reports) == stderr
    assert len(reports) == 1 and reports[0].fatal
    assert _corrupt_bit(v) and _corrupt_bit(q)
    assert _info(v, vdkit_tool=True) == _info(q)
    assert "corrupt: true" in _info(q)


@pytest.mark.parametrize(("damage", "last"), [("data_unaligned", "ok"), ("l2_unaligned", "Input/output error")])
def test_readonly_node_fails_eio_once_reported(damage: str, last: str, tmp_path: Path) -> None:
    """Read-only: every bad read fails with EIO, the event is reported once and the image is untouched.

    Only requests touching the bad entry fail: a good cluster of the same L2 table still reads.
    """
    q, v = _twins(tmp_path, damage)
    before = v.read_bytes()
    ops = ["read 0 4096", "read 0 4096", "read 1048576 4096"]
    words, stderr = _qemu_ops(q, True, ops)
    reports: list[CorruptionReport] = []
    assert _vdkit_ops(v, True, ops, reports) == words == ["Input/output error", "Input/output error", last]
    assert [r.text + "\n" for r in reports] == [stderr]
    assert not reports[0].fatal and (reports[0].offset, reports[0].size) == (-1, -1)
    assert v.read_bytes() == before


def test_overlap_event_carries_the_host_range(tmp_path: Path) -> None:
    """The overlap check reports the refused host range (QMP's ``offset``/``size``)."""
    v = tmp_path / "v.qcow2"
    _image(v, "data_on_l1")
    l1 = get_u64(v, 40)
    reports: list[CorruptionReport] = []
    assert _vdkit_ops(v, False, ["write 4096 4096"], reports) == ["Input/output error"]
    assert (reports[0].offset, reports[0].size) == (l1 + 4096, 4096)


def test_without_hook_the_report_rides_on_the_error(tmp_path: Path) -> None:
    """No hook: the library prints nothing; the error carries the report for the front end."""
    v = tmp_path / "v.qcow2"
    _image(v, "data_unaligned")
    with vdkit.open(v, readonly=False) as node:
        with pytest.raises(VdkitError) as first:
            node.write(0, b"x" * 512)
        report = getattr(first.value, "report", None)
        assert report is not None and report.fatal
        with pytest.raises(VdkitError) as later:
            node.read(0, 512)
        assert later.value.errno == errno.ENOMEDIUM and getattr(later.value, "report", None) is None


# -- CLI: writers onto a damaged target, readers of a damaged source ----------------------------------

@pytest.mark.parametrize("damage", ["data_unaligned", "l2_unaligned", "data_on_l1", "refblock_unaligned"])
def test_convert_onto_damaged_target(damage: str, tmp_path: Path) -> None:
    """``convert -n`` onto a damaged qcow2: the same stderr, exit code, corrupt bit and ``info`` afterwards."""
    src = tmp_path / "src.raw"
    check_ok("create", "-q", "-f", "raw", str(src), "2M")
    assert qemu_io("-f", "raw", "-c", "write -P 7 0 2M", str(src)).returncode == 0
    q, v = _twins(tmp_path, damage)
    rq = qemu_img("convert", "-n", "-f", "raw", "-O", "qcow2", str(src), str(q))
    rv = vdkit_img("convert", "-n", "-f", "raw", "-O", "qcow2", str(src), str(v))
    assert rv.normalized_stderr() == rq.stderr
    assert rv.returncode == rq.returncode == 1
    assert _corrupt_bit(v) and _corrupt_bit(q)
    assert _info(v) == _info(q)
    # a corrupt image cannot be opened for writing any more, by either tool
    rq = qemu_img("convert", "-n", "-f", "raw", "-O", "qcow2", str(src), str(q))
    rv = vdkit_img("convert", "-n", "-f", "raw", "-O", "qcow2", str(src), str(v))
    assert (rv.normalized_stderr().replace("v.qcow2", "q.qcow2"), rv.returncode) == (rq.stderr, rq.returncode)


def test_convert_from_damaged_source_is_not_fatal(tmp_path: Path) -> None:
    """A damaged source is opened read-only: non-fatal event, EIO, image unchanged."""
    q, v = _twins(tmp_path, "data_unaligned")
    before = v.read_bytes()
    rq = qemu_img("convert", "-O", "raw", str(q), str(tmp_path / "q.raw"))
    rv = vdkit_img("convert", "-O", "raw", str(v), str(tmp_path / "v.raw"))
    assert (rv.normalized_stderr(), rv.returncode) == (rq.stderr, rq.returncode)
    assert "further non-fatal corruption events" in rq.stderr
    assert v.read_bytes() == before and not _corrupt_bit(q)


@pytest.mark.parametrize("damage", ["data_unaligned", "l2_unaligned"])
@pytest.mark.parametrize("args", [["snapshot", "-c", "new"], ["resize", "4M"]])
def test_other_writers_report_like_qemu(damage: str, args: list[str], tmp_path: Path) -> None:
    """Snapshot and resize walk the tables too: QEMU's event line, then the command's own error."""
    q, v = _twins(tmp_path, damage)
    rq = qemu_img(*args, q.name, cwd=tmp_path)
    rv = vdkit_img(*args, v.name, cwd=tmp_path)
    assert (rv.returncode, rv.stdout, rv.normalized_stderr().replace("v.qcow2", "q.qcow2")) == (
        rq.returncode, rq.stdout, rq.stderr)
    assert _corrupt_bit(v) == _corrupt_bit(q)


@pytest.mark.parametrize("damage", ["data_unaligned", "l2_unaligned"])
def test_commit_onto_damaged_base(damage: str, tmp_path: Path) -> None:
    """The copy of ``commit`` is a block job in qemu-img: "Block job failed: <error>" after the event."""
    out = {}
    for who in ("q", "v"):
        d = tmp_path / who
        d.mkdir()
        _image(d / "base.qcow2", damage)
        check_ok("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(d / "top.qcow2"))
        assert qemu_io("-c", "write -P 9 0 64k", str(d / "top.qcow2")).returncode == 0
        r = (qemu_img if who == "q" else vdkit_img)("commit", "top.qcow2", cwd=d)
        out[who] = (r.returncode, r.stdout, r.normalized_stderr() if who == "v" else r.stderr,
                    _corrupt_bit(d / "base.qcow2"))
    assert out["v"] == out["q"]


def test_v2_header_is_never_marked(tmp_path: Path) -> None:
    """compat=0.10 has no feature fields: bytes 72.. are header extensions, which neither tool touches.

    The node still dies (qemu-io: EIO, then ENOMEDIUM), and the backing format survives.
    """
    check_ok("create", "-q", "-f", "qcow2", str(tmp_path / "base.qcow2"), "1M")
    q = tmp_path / "q.qcow2"
    check_ok("create", "-q", "-f", "qcow2", "-o", "compat=0.10", "-b", "base.qcow2", "-F", "qcow2", str(q), "1M")
    assert qemu_io("-c", "write 0 64k", str(q)).returncode == 0
    l1 = get_u64(q, 40)
    set_u64(q, l1, get_u64(q, l1) + 0x200)  # unaligned L2 table offset
    v = tmp_path / "v.qcow2"
    shutil.copyfile(q, v)
    header = q.read_bytes()[:65536]
    rq = qemu_img("snapshot", "-c", "x", q.name, cwd=tmp_path)
    rv = vdkit_img("snapshot", "-c", "x", v.name, cwd=tmp_path)
    assert (rv.returncode, rv.normalized_stderr()) == (rq.returncode, rq.stderr)
    assert "Marking image as corrupt" in rq.stderr
    assert v.read_bytes()[:65536] == header == q.read_bytes()[:65536]
    words, stderr = _qemu_ops(q, False, WRITE_FIRST)
    reports: list[CorruptionReport] = []
    assert _vdkit_ops(v, False, WRITE_FIRST, reports) == words
    assert "".join(r.text + "\n" for r in reports) == stderr
    assert v.read_bytes()[:65536] == header
    assert "backing file format: qcow2" in _info(v, vdkit_tool=True)


def test_overlap_names_structures_in_qemu_order(tmp_path: Path) -> None:
    """A cluster that is both a snapshot's L1 table and a refcount block: QEMU names the inactive L1 first."""
    q = tmp_path / "q.qcow2"
    check_ok("create", "-q", "-f", "qcow2", str(q), "2M")
    assert qemu_io("-c", "write -P 1 0 64k", str(q)).returncode == 0
    check_ok("snapshot", "-c", "s", str(q))
    l1, rt = get_u64(q, 40), get_u64(q, 48)
    refblock, snap_table = get_u64(q, rt), get_u64(q, 64)
    set_u64(q, snap_table, refblock)  # the snapshot's L1 table offset
    l2 = get_u64(q, l1) & 0x00FFFFFFFFFFFE00
    set_u64(q, l1, COPIED | l2)
    set_u64(q, l2, COPIED | refblock)  # guest cluster 0, written in place, is that cluster
    v = tmp_path / "v.qcow2"
    shutil.copyfile(q, v)
    ops = ["write 0 4096", "read 0 4096"]
    words, stderr = _qemu_ops(q, False, ops)
    reports: list[CorruptionReport] = []
    assert _vdkit_ops(v, False, ops, reports) == words
    assert "".join(r.text + "\n" for r in reports) == stderr
    assert "overlaps with inactive L1 table" in stderr


@pytest.mark.parametrize("trusted", [True, False])
def test_bitmap_directory_overlap_only_when_bitmaps_are_trusted(trusted: bool, tmp_path: Path) -> None:
    """A data cluster on the bitmap directory is refused only while the autoclear bitmaps bit is set.

    Without the bit the bitmaps are inconsistent and QEMU does not know the
    directory: the write goes through (and the image stays unmarked), in
    the I/O path as in check's overlap test, which share one test.
    """
    q = tmp_path / "q.qcow2"
    check_ok("create", "-q", "-f", "qcow2", str(q), "2M")
    assert qemu_io("-c", "write -P 1 0 64k", str(q)).returncode == 0
    check_ok("bitmap", "--add", str(q), "b0")
    with vdkit.open(q, readonly=True) as node:
        assert isinstance(node.driver, Qcow2Driver) and node.driver.header.bitmaps is not None
        directory = node.driver.header.bitmaps.directory_offset
    l1 = get_u64(q, 40)
    set_u64(q, get_u64(q, l1) & 0x00FFFFFFFFFFFE00, COPIED | (directory & ~0xFFFF))
    if not trusted:
        set_u64(q, 88, get_u64(q, 88) & ~1)  # autoclear features: bitmaps bit cleared
    v = tmp_path / "v.qcow2"
    shutil.copyfile(q, v)
    ops = ["write 0 4096", "read 0 4096"]
    words, stderr = _qemu_ops(q, False, ops)
    reports: list[CorruptionReport] = []
    assert _vdkit_ops(v, False, ops, reports) == words
    assert [r.text + "\n" for r in reports] == [line + "\n" for line in stderr.splitlines() if "corrupt" in line]
    assert ("overlaps with bitmap directory" in stderr) is trusted
    assert _corrupt_bit(v) is _corrupt_bit(q) is trusted
