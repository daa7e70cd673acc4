"""The read-only qcow2 check of a consistent image, by runs of clusters and without numpy.

A check is mostly the proof that nothing is wrong: the counts the metadata implies
equal the stored ones everywhere.  That proof needs no per-cluster numbers.  The references are
collected as runs ``(first cluster, length)`` (each L2 table's host clusters by
:func:`.l2runs.l2_runs`, found in its bytes; the header, L1 table, L2 tables, refcount table and
blocks as ranges); when no two runs overlap, every referenced cluster's expected count is 1 and
every other's 0, so each refcount block must equal, byte for byte, a pattern of zeros with the
entry ``1`` repeated over the runs it covers.  Memory is the runs and one block at a time, where
the vectorised walk (:mod:`.check`) needs numpy, whose import alone weighs more than qemu-img; and
a small image's proof costs a few finds and compares per table where the walk on lists costs Python
per entry, so ``Qcow2Driver.check`` tries this first whatever the image's size.

Anything this path does not prove clean (a mismatch, an overlap, a snapshot, compressed or
extended L2 entries, a data file, bitmaps, encryption, sub-byte refcounts, a fragmented table,
any entry the full walk would report) makes :func:`check_clean` return None before anything is
reported, and the caller runs the full check, which produces QEMU's messages in QEMU's order.
"""

from __future__ import annotations

from itertools import compress

from vdkit.block.driver import CheckResult
from vdkit.formats.qcow2 import layout as L
from vdkit.formats.qcow2.l2runs import l2_runs

TYPE_CHECKING = False
if TYPE_CHECKING:
    from vdkit.formats.qcow2.driver import Qcow2Driver

_LOW_OK = b"\x00\x01"  # an L2 entry's last byte: the zero flag or nothing (bits 1-7 are reserved)
_EVEN = bytes(range(0, 256, 2))  # an entry's 7th byte with bit 8 (reserved) clear
_ZERO_ONLY = (1).to_bytes(8, "big")  # a zero cluster without a host cluster (the only entry without COPIED)
_READ = 1 << 20  # L2 tables read at most this many bytes at a time
_MAX_RUNS = 64  # per table (more, averaging under four entries each: the full walk)
_SPARSE = 512  # tables with at most this many 0x80 or 0x01 bytes: decoded entry by entry (else l2_runs)
_PROBE = 32  # 0x80 bytes found before the table's density is judged from the stretch they took
_ZERO_ENTRY = bytes(8)
_NO_HOST = frozenset((L.OFLAG_ZERO, L.OFLAG_COPIED, L.OFLAG_COPIED | L.OFLAG_ZERO))  # flags of an entry without a host
_HOST = frozenset((L.OFLAG_COPIED, L.OFLAG_COPIED | L.OFLAG_ZERO))  # flags of one with a host (COPIED: refcount 1)


def _flagged(data: bytes, lo: int, hi: int) -> list[int] | None:
    """Entries of ``data[lo:hi]`` whose first byte is 0x80 (COPIED) or last byte 1 (the zero flag),
    found by ``memchr``; None past ``_SPARSE`` hits of those bytes anywhere (a dense table), or when
    the first ``_PROBE`` 0x80 bytes came so close together that the table would have more (a dense
    table is told after a few finds, not after ``_SPARSE`` of them; either answer is only a choice
    of method, both prove the same)."""
    where: list[int] = []
    hits = 0
    find = data.find
    for byte, place in ((0x80, 0), (1, 7)):
        p = find(byte, lo, hi)
        while p >= 0:
            hits += 1
            if hits > _SPARSE or (hits == _PROBE and byte == 0x80 and (p - lo) * _SPARSE < _PROBE * (hi - lo)):
                return None
            if p & 7 == place:
                where.append(p >> 3)
            p = find(byte, p + 1, hi)
    where.sort()  # (an entry with both bytes: twice)
    return [j for k, j in enumerate(where) if not k or where[k - 1] != j]


# Qcow2Driver.check tries this proof before the full walk on every read-only check (tests turn it off
# to compare the full walk's answers with it).
ENABLED = True


_ZEROS = b""


def _zeros(n: int) -> memoryview:
    """``n`` zero bytes to compare with, one buffer kept for every call (not zeroed again each time)."""
    global _ZEROS
    if len(_ZEROS) < n:
        _ZEROS = bytes(n)
    return memoryview(_ZEROS)[:n]


def _nonzero_entries(raw: bytes) -> compress[int]:
    """Indices of the non-zero 8-byte entries of a table, found at C speed: the zero tail (most of a
    refcount table) by a bisection of ``endswith`` on zeros (memcmp; ``rstrip`` tests byte by byte),
    the rest's words tested in native order (zero either way)."""
    zeros = _zeros(len(raw))
    lo, hi = 0, len(raw) // 8  # entries of the zero tail: at least lo, at most hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if raw.endswith(zeros[: 8 * mid]):
            lo = mid
        else:
            hi = mid - 1
    words = len(raw) // 8 - lo
    return compress(range(words), memoryview(raw)[: 8 * words].cast("Q"))


class _Fallback(Exception):
    """The image is not proven clean by runs: the full check decides (and reports)."""


def check_clean(driver: Qcow2Driver) -> CheckResult | None:
    """The result of ``qemu-img check`` (no repair) if the image is consistent, else None.

    Never reports anything: a None costs only the reads done so far.
    """
    try:
        return _Runs(driver).run()
    except (_Fallback, OSError):  # (a read error: the full walk reports it where QEMU does)
        return None


class _Runs:
    def __init__(self, drv: Qcow2Driver) -> None:
        h = drv.header
        if (h.nb_snapshots or h.snapshots_offset % h.cluster_size or h.snapshots_offset > 2**63 - 1
                or h.extended_l2 or h.has_data_file or h.refcount_order < 3
                or (h.crypto is not None and h.crypto.length)
                or (h.bitmaps is not None and h.version >= 3 and h.autoclear_features & L.AUTOCLEAR_BITMAPS)):
            raise _Fallback
        self.f = drv.file
        self.h = h
        self.cs = h.cluster_size
        self.cb = h.cluster_bits
        self.width = 1 << (h.refcount_order - 3)  # bytes per refcount entry
        self.rb_bits = h.cluster_bits + 3 - h.refcount_order
        self.file_len = self.f.size()
        self.n = -(-self.file_len // self.cs)
        if self.n > 2**31 - 1:
            raise _Fallback
        self.runs: list[tuple[int, int]] = []  # (first cluster, length): each referenced once

    def add(self, offset: int, size: int) -> None:
        """Reference ``[offset, offset + size)`` bytes once (as the full check's ``inc``)."""
        if size <= 0:
            return
        if offset + size - self.file_len >= self.cs:
            raise _Fallback  # "counting reference for region exceeding the end of the file"
        first = offset >> self.cb
        last = (offset + size - 1) >> self.cb
        if last >= self.n:
            raise _Fallback
        self.runs.append((first, last - first + 1))

    def run(self) -> CheckResult:
        h = self.h
        res = CheckResult(total_clusters=-(-h.size // self.cs))
        self.add(0, self.cs)
        tables = self.l1_tables()
        self.walk_l2(tables, res)
        self.add(h.refcount_table_offset, h.refcount_table_clusters * self.cs)
        blocks = self.refcount_blocks()
        for off in blocks.values():
            self.add(off, self.cs)
        merged = self.merged()
        self.compare(blocks, merged)
        res.image_end_offset = (merged[-1][1] if merged else 1) * self.cs  # the last referenced cluster's end
        return res

    def l1_tables(self) -> list[int]:
        """The L2 tables' offsets named by the active L1 table (each entry clean, with COPIED)."""
        h = self.h
        if not h.l1_size:
            return []
        self.add(h.l1_table_offset, h.l1_size * 8)
        raw = self.f.pread(h.l1_table_offset, h.l1_size * 8)
        if len(raw) != h.l1_size * 8:
            raise _Fallback
        out = []
        for i in _nonzero_entries(raw):
            e = int.from_bytes(raw[8 * i : 8 * i + 8], "big")
            off = e & L.L1E_OFFSET_MASK
            if e & L.L1E_RESERVED_MASK or not e & L.OFLAG_COPIED or not off or off % self.cs or off >= self.file_len:
                raise _Fallback
            self.add(off, self.cs)
            out.append(off)
        return out

    def walk_l2(self, tables: list[int], res: CheckResult) -> None:
        """Each L2 table's host runs; the statistics QEMU's check gathers for the active state."""
        cs = self.cs
        per_read = max(1, _READ // cs)
        i = 0
        while i < len(tables):
            j = i + 1  # tables adjacent in the file are read together
            while j < len(tables) and j - i < per_read and tables[j] == tables[j - 1] + cs:
                j += 1
            data = self.f.pread(tables[i], (j - i) * cs)
            if len(data) != (j - i) * cs:
                raise _Fallback
            self.chunk(data, res)
            i = j

    def chunk(self, data: bytes, res: CheckResult) -> None:
        """Tables read together.  A sparse table's entries are found by ``memchr`` (``bytes.find``) of
        the COPIED flag's byte and the zero flag's byte at their places in an entry, and decoded; a
        table with many of those bytes goes to :func:`.l2runs.l2_runs`, which proves all of it (the
        entries outside its used stretches are zero).  With the sparse tables' entries found cleared,
        the tables must be all zeros (no other entry used): one ``memcmp`` for all."""
        cs = self.cs
        rest: bytearray | None = None  # (only when a sparse table needs the zero proof)
        dense: list[int] = []
        for lo in range(0, len(data), cs):
            hi = lo + cs
            where = _flagged(data, lo, hi)
            if where is None:
                self.dense_table(data[lo:hi], res)
                dense.append(lo)
            else:
                if rest is None:
                    rest = bytearray(data)
                self.sparse_table(data, where, rest, res)
        if rest is None:
            return
        zeros = _zeros(len(rest))
        for lo in dense:
            rest[lo : lo + cs] = zeros[:cs]
        if rest != zeros:  # (memcmp, no copy)
            raise _Fallback

    def dense_table(self, raw: bytes, res: CheckResult) -> None:
        runs = l2_runs(raw, 8, self.cb, _MAX_RUNS)
        firsts, lows = raw[0::8], raw[7::8]
        if runs is None or lows.translate(None, _LOW_OK) or raw[6::8].translate(None, _EVEN):
            raise _Fallback
        for a, b in runs.used:  # an entry without COPIED is fine only as a zero cluster with no host
            j = firsts.find(0, a, b)
            while j >= 0:
                if raw[8 * j : 8 * j + 8] != _ZERO_ONLY:
                    raise _Fallback
                j = firsts.find(0, j + 1, b)
        self.table_runs(runs.starts, runs.lens, res)

    def sparse_table(self, data: bytes, where: list[int], rest: bytearray, res: CheckResult) -> None:
        """A table's entries at ``where`` (entry indices in ``data``, in order) decoded and cleared in ``rest``."""
        cs = self.cs
        starts: list[int] = []
        lens: list[int] = []
        for j in where:
            e = int.from_bytes(data[8 * j : 8 * j + 8], "big")
            rest[8 * j : 8 * j + 8] = _ZERO_ENTRY
            off = e & L.L2E_OFFSET_MASK
            flags = e ^ off
            if not off:
                if flags not in _NO_HOST:
                    raise _Fallback
                continue
            if flags not in _HOST or off % cs:
                raise _Fallback
            c = off >> self.cb
            if lens and starts[-1] + lens[-1] == c:
                lens[-1] += 1
            else:
                starts.append(c)
                lens.append(1)
        self.table_runs(starts, lens, res)

    def table_runs(self, starts: list[int], lens: list[int], res: CheckResult) -> None:
        prev_end = None
        for start, length in zip(starts, lens, strict=True):
            if start + length > self.n:
                raise _Fallback  # data past the end of the file
            self.runs.append((start, length))
            res.allocated_clusters += length
            if prev_end is not None and start != prev_end:
                res.fragmented_clusters += 1
            prev_end = start + length

    def refcount_blocks(self) -> dict[int, int]:
        """Refcount table index -> block offset, of the blocks QEMU checks (each entry clean, inside)."""
        h = self.h
        raw = self.f.pread(h.refcount_table_offset, h.refcount_table_clusters * self.cs)
        if len(raw) != h.refcount_table_clusters * self.cs:
            raise _Fallback
        out = {}
        for i in _nonzero_entries(raw):
            e = int.from_bytes(raw[8 * i : 8 * i + 8], "big")
            off = e & L.REFT_OFFSET_MASK
            if e & L.REFT_RESERVED_MASK or off % self.cs or off >> self.cb >= self.n:
                raise _Fallback
            if off:
                out[i] = off
        return out

    def merged(self) -> list[tuple[int, int]]:
        """The runs as sorted ``(first, end)`` intervals, adjacent ones joined; an overlap falls back
        (a cluster referenced twice: a count of 2 to compare, or an error to report)."""
        out: list[tuple[int, int]] = []
        for start, length in sorted(self.runs):
            end = start + length
            if out and start < out[-1][1]:
                raise _Fallback
            if out and start == out[-1][1]:
                out[-1] = (out[-1][0], end)
            else:
                out.append((start, end))
        return out

    def compare(self, blocks: dict[int, int], merged: list[tuple[int, int]]) -> None:
        """Every refcount block covering the file against its expected pattern, one block at a time;
        a referenced cluster whose block is missing falls back too."""
        w = self.width
        one = (1).to_bytes(w, "big")
        per = 1 << self.rb_bits
        k = 0
        for ti in range(-(-self.n // per)):
            base = ti << self.rb_bits
            end = min(self.n, base + per)
            expect = bytearray((end - base) * w)
            any_ref = False
            while k < len(merged) and merged[k][0] < end:
                a, b = merged[k]
                lo, hi = max(a, base), min(b, end)
                expect[(lo - base) * w : (hi - base) * w] = one * (hi - lo)
                any_ref = True
                if b > end:
                    break  # continues into the next block
                k += 1
            off = blocks.get(ti)
            if off is None:
                if any_ref:
                    raise _Fallback
                continue
            data = self.f.pread(off, len(expect))
            if data != expect:
                raise _Fallback
        # (blocks whose range starts past the end of the file are not compared, as in the full check)
