"""Refcount blocks, the in-place allocator and table growth, checked against qemu-img."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import check_ok, qemu_img, qemu_io
from tests.data.faults import cut_writes
from vdkit.block.node import open_image
from vdkit.formats.qcow2.driver import Qcow2Driver
from vdkit.formats.qcow2.refcount import (
    RefcountOverflow,
    Transaction,
    decode_block,
    encode_block,
    get_refcount,
    set_refcount,
)

# every test on both table backends (vdkit.io.tables): lists and numpy
pytestmark = pytest.mark.usefixtures("table_backend")

WIDTHS = [1, 2, 4, 8, 16, 32, 64]


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(WIDTHS), st.data())
def test_packing_roundtrip(bits: int, data: st.DataObject) -> None:
    """Scalar get/set and vectorised decode/encode agree, entries < 8 bits LSB first."""
    size = 64
    n = size * 8 // bits
    values = data.draw(st.lists(st.integers(0, 2**bits - 1), min_size=n, max_size=n))
    block = bytearray(size)
    for i, v in enumerate(values):
        set_refcount(block, i, bits, v)
    assert [get_refcount(block, i, bits) for i in range(n)] == values
    arr = decode_block(block, bits)
    assert [int(x) for x in arr] == values
    assert encode_block(arr, bits) == bytes(block)
    if bits < 8:
        # entry 0 lives in the least significant bits of byte 0
        assert block[0] & ((1 << bits) - 1) == values[0]


def _check(path: Path) -> tuple[int, dict[str, int]]:
    r = qemu_img("check", "--output=json", str(path))
    data = json.loads(r.stdout)
    return r.returncode, {k: int(data.get(k, 0)) for k in ("corruptions", "leaks")}


def _open_rw(path: Path) -> Qcow2Driver:
    node = open_image(str(path), "qcow2", readonly=False)
    assert isinstance(node.driver, Qcow2Driver)
    return node.driver


@pytest.mark.parametrize("bits", [2, 4, 8, 16, 32, 64])
def test_reads_counts_qemu_wrote(tmp_path: Path, bits: int) -> None:
    """The verified layout of algorithms §3: shared clusters at 2, snapshot structures at 1."""
    img = tmp_path / "a.qcow2"
    check_ok("create", "-q", "-f", "qcow2", "-o", f"refcount_bits={bits}", str(img), "64M")
    assert qemu_io("-c", "write 0 4k", "-c", "write 1M 4k", str(img)).returncode == 0
    check_ok("snapshot", "-c", "snap1", str(img))
    drv = _open_rw(img)
    try:
        got = [drv.refcounts.get(i) for i in range(10)]
    finally:
        drv.close()
    assert got == [1, 1, 1, 1, 2, 2, 2, 1, 1, 0]


@pytest.mark.parametrize("bits,count", [(1, 5000), (2, 3000), (16, 17000), (64, 1500)])
def test_allocator_grows_table_and_stays_consistent(tmp_path: Path, bits: int, count: int) -> None:
    """Allocate past the refcount table's reach (blocks + table growth), then free it all."""
    img = tmp_path / "g.qcow2"
    check_ok("create", "-q", "-f", "qcow2", "-o", f"cluster_size=512,refcount_bits={bits}", str(img), "1M")
    drv = _open_rw(img)
    rc = drv.refcounts
    start_table = rc.table_offset
    offsets = []
    try:
        for n in (1, 3, count):
            offsets.append((rc.alloc_clusters(n * 512), n))
        byte_offs = [rc.alloc_bytes(100) for _ in range(12)]
        drv.flush()
        # check only compares clusters inside the file: make the file cover what we took
        end = max([o + n * 512 for o, n in offsets] + [o + 100 for o in byte_offs])
        drv.file.truncate(max(drv.file.size(), end))
        grew = rc.table_offset != start_table
    finally:
        drv.close()
    leaked_clusters = sum(n for _, n in offsets) + len({o // 512 for o in byte_offs} | {(o + 99) // 512 for o in
                                                                                       byte_offs})
    rc_code, counts = _check(img)
    assert (rc_code, counts) == (3, {"corruptions": 0, "leaks": leaked_clusters})
    assert grew == (count * 512 > 64 * (512 * 8 // bits) * 512)
    drv = _open_rw(img)
    try:
        for off, n in offsets:
            drv.refcounts.free(off, n * 512)
        for off in byte_offs:
            drv.refcounts.free(off, 100)
        drv.flush()
    finally:
        drv.close()
    assert _check(img) == (0, {"corruptions": 0, "leaks": 0})


def test_first_fit_reuses_lowest_freed(tmp_path: Path) -> None:
    img = tmp_path / "h.qcow2"
    check_ok("create", "-q", "-f", "qcow2", str(img), "1M")
    drv = _open_rw(img)
    try:
        rc = drv.refcounts
        a = rc.alloc_clusters(65536)
        b = rc.alloc_clusters(2 * 65536)
        c = rc.alloc_clusters(65536)
        assert (a, b, c) == (0x40000, 0x50000, 0x70000)
        rc.free(b, 2 * 65536)
        assert rc.alloc_clusters(65536) == b
        assert rc.alloc_clusters(2 * 65536) == 0x80000  # one free cluster at 0x60000 is too short
        assert rc.alloc_clusters(65536) == 0xA0000  # the hint has moved past 0x60000 (QEMU too)
        drv.flush()
        drv.file.truncate(0xB0000)
    finally:
        drv.close()
    assert _check(img) == (3, {"corruptions": 0, "leaks": 6})


def test_transaction_overflow_writes_nothing(tmp_path: Path) -> None:
    img = tmp_path / "o.qcow2"
    check_ok("create", "-q", "-f", "qcow2", "-o", "refcount_bits=2", str(img), "1M")
    before = img.read_bytes()
    drv = _open_rw(img)
    try:
        txn = Transaction(drv.refcounts)
        txn.add_refs(np.array([0, 0, 0], dtype=np.int64), 1)  # header cluster 1 -> 4 > 3
        with pytest.raises(RefcountOverflow):
            txn.commit(lambda off, cl: bytes(48), np.zeros(0, dtype=np.int64))
    finally:
        drv.close()
    assert img.read_bytes() == before


def test_dirty_bit_set_and_cleared(tmp_path: Path) -> None:
    """Lazy-refcount writers set the dirty bit durably and a clean close clears it."""
    img = tmp_path / "lazy.qcow2"
    check_ok("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", str(img), "1M")
    drv = _open_rw(img)
    try:
        drv.mark_dirty()
        assert "cleanly shut down: no" in check_ok("info", "-U", str(img)).stdout
    finally:
        drv.close()
    assert "cleanly shut down" not in check_ok("info", str(img)).stdout
    assert _check(img) == (0, {"corruptions": 0, "leaks": 0})


@pytest.mark.parametrize("lazy", ["on", "off"])
def test_allocating_write_sets_the_dirty_bit_as_qemu_io(lazy: str, tmp_path: Path) -> None:
    """The header a killed writer leaves equals qemu-io's after ``abort``: dirty iff lazy refcounts."""
    q, v = tmp_path / "q.qcow2", tmp_path / "v.qcow2"
    for img in (q, v):
        check_ok("create", "-q", "-f", "qcow2", "-o", f"lazy_refcounts={lazy}", str(img), "4M")
    before = v.read_bytes()[72:80]
    qemu_io("-c", "write -P 7 64k 4k", "-c", "abort", str(q))  # abort(3): no clean close
    with open_image(str(v), "qcow2", readonly=False) as node:
        node.write(64 * 1024 + 512, b"\x07" * 512)  # in an unallocated cluster: allocates
        killed = v.read_bytes()[72:80]
        node.write(64 * 1024, b"\x07" * 512)  # in place: nothing more to mark
    assert killed == q.read_bytes()[72:80]
    assert (killed != before) == (lazy == "on")
    assert v.read_bytes()[72:80] == before  # a clean close clears it again
    assert _check(v) == (0, {"corruptions": 0, "leaks": 0})


def test_in_place_allocation_cut_at_every_write_only_leaks(tmp_path: Path) -> None:
    """The QEMU-style path (blocks on demand, table growth) leaks at worst when cut short."""
    import shutil

    base = tmp_path / "base.qcow2"
    check_ok("create", "-q", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=16", str(base), "1M")

    def run(path: Path, cut: int | None) -> int:
        drv = _open_rw(path)
        writes_done = cut_writes(drv.file, cut)
        try:
            off = drv.refcounts.alloc_clusters(300 * 512)  # needs two more refcount blocks
            drv.refcounts.alloc_clusters(17000 * 512)  # past the table's reach: it grows
            drv.refcounts.flush()
            drv.file.truncate(max(drv.file.size(), off + 17300 * 512))
        except OSError:
            assert cut is not None
        finally:
            try:
                drv.close()
            except OSError:
                drv.file.close()
        return writes_done()

    full = tmp_path / "full.qcow2"
    shutil.copy(base, full)
    writes = run(full, None)
    assert _check(full) == (3, {"corruptions": 0, "leaks": 17300})
    cut = tmp_path / "cut.qcow2"
    for n in range(0, writes, max(1, writes // 25)):
        shutil.copy(base, cut)
        run(cut, n)
        rc, counts = _check(cut)
        assert rc in (0, 3) and counts["corruptions"] == 0, (n, counts)
