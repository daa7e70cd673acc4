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


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=300), st.data())
def test_zero_scan_of_a_blocks_bytes_equals_the_backends(counts: list[int], data: st.DataObject) -> None:
    """find_free's scan of a block held as bytes (Refcounts._low, counts below 256) answers as the
    backends' zero_scan on the block's values: the leading free run, the first run of ``n`` free
    clusters, or where the trailing free run starts."""
    from vdkit.formats.qcow2.refcount import _zero_scan_low
    from vdkit.io import tables

    counts = [c if c < 2 else 0 for c in counts]  # (half free: runs of every length)
    start = data.draw(st.integers(0, len(counts) - 1))
    n = data.draw(st.integers(0, 12))
    got = _zero_scan_low(bytes(counts), start, n)
    for want in (tables.SMALL.zero_scan(list(counts), start, n),
                 tables.NUMPY.zero_scan(tables.NUMPY.array(counts), start, n)):
        assert got[:2] == want[:2]
        assert got[1] >= 0 or got[2] == want[2]  # (the final run's start: only asked when no run was found)


def test_counts_from_bytes_follow_changes(tmp_path: Path) -> None:
    """The bytes kept of a block read from the disk (count_range, find_free) are dropped when its
    counts change in place: a freed cluster is found free and counted at 0 at once."""
    img = tmp_path / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "8M")
    qemu_io("-c", "write 0 1M", str(img))
    with open_image(str(img), "qcow2", readonly=False) as node:
        drv = node.driver
        assert isinstance(drv, Qcow2Driver)
        rc = drv.refcounts
        rc.use_backend(tables_small())
        rc.drop_cache()
        used = rc.count_range(0, 64, 1)
        assert used > 16 and rc.count_range(0, 64, 0) == 64 - used
        host = rc.find_free(1, 0)
        rc.update(host << drv.header.cluster_bits, drv.cluster_size, 1)  # take one, then give it back
        assert rc.count_range(host, host + 1, 1) == 1 and rc.find_free(1, 0) != host
        rc.update(host << drv.header.cluster_bits, drv.cluster_size, -1)
        assert rc.count_range(host, host + 1, 0) == 1 and rc.find_free(1, 0) == host
        rc.drop_cache()
        rc.free_hint = 0


def tables_small() -> object:
    from vdkit.io import tables

    return tables.SMALL


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([1, 2, 4, 8]), st.data())
def test_counts_changed_in_bytes_equal_entry_by_entry(w: int, data: st.DataObject) -> None:
    """_add_in_bytes (a transaction's refcount block rewritten in its bytes: the last bytes translated
    where no entry carries or borrows, big-integer additions elsewhere) gives the counts, the
    refusal of a count leaving its range and the lowest new zero that one addition per entry gives."""
    from vdkit.formats.qcow2.refcount import _add_in_bytes

    top = (1 << (8 * w)) - 1
    n = data.draw(st.integers(1, 64))
    near = sorted({c for c in (0, 1, 2, 255, 256, 257, 511, top - 1, top) if c <= top})
    counts = data.draw(st.lists(st.sampled_from(near), min_size=n, max_size=n))
    cuts = sorted(set(data.draw(st.lists(st.integers(0, n), max_size=8))) | {0, n})
    segs = [(a, b, data.draw(st.sampled_from([-1, 0, 1]))) for a, b in zip(cuts, cuts[1:], strict=False) if b > a
            and data.draw(st.booleans())]
    new = list(counts)
    zero = -1
    for a, b, v in segs:
        for i in range(a, b):
            new[i] += v
            if zero < 0 and v <= 0 and new[i] == 0:
                zero = i
    got = _add_in_bytes(b"".join(c.to_bytes(w, "big") for c in counts), w, segs)
    if any(not 0 <= c <= top for c in new):
        assert got is None
        return
    assert got == (b"".join(c.to_bytes(w, "big") for c in new), zero)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 60), st.integers(1, 12), st.integers(-2, 2), st.booleans()), max_size=12),
       st.lists(st.integers(0, 80), min_size=1, max_size=10))
def test_deltas_at_one_key_equals_the_lookup(adds: list[tuple[int, int, int, bool]], keys: list[int]) -> None:
    """Deltas.at (a transaction's change to one cluster, as count_new asks for one: summed from the
    additions without rebuilding the segments, or searched in them) equals the lookup's."""
    from vdkit.io import tables

    for T in (tables.SMALL, tables.NUMPY):
        d = T.deltas()
        for lo, n, addend, query in adds:
            d.add_range(lo, lo + n, addend)
            if query:  # (segments built: the search in them)
                d.lookup(T.indices([lo]))
            for k in keys:
                assert d.at(k) == int(T.tolist(d.lookup(T.indices([k])))[0])
