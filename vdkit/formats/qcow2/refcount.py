"""qcow2 reference counts: block access for every width, a write-back cache,
the allocator, and copy-on-write metadata transactions.

Two ways of changing refcounts live here, for two kinds of callers:

* :class:`Refcounts` changes counts **in place**, the way QEMU 7.2 does for
  guest writes (algorithms doc §1): first-fit allocation from a free-cluster
  hint, refcount blocks allocated on demand (self-describing when they fall
  into their own range), refcount-table growth with one 12-byte header
  switch, and a write-back cache whose flush order keeps increments on disk
  before the metadata that uses them and decrements after it.  A crash then
  leaks at worst.

* :class:`Transaction` changes many counts **atomically**.  Snapshot
  operations touch thousands of refcounts and COPIED flags; done in place,
  a crash between the refcount write and the flag rewrite leaves a state
  ``qemu-img check`` calls corrupt (a COPIED flag disagreeing with a count).
  A transaction therefore never modifies a cluster the current header can
  reach: every changed refcount block, the refcount table, L1/L2 tables and
  the snapshot table are written as *copies* into clusters that are free now,
  and a single 48-byte header write (bytes 24..71: size, L1, refcount table,
  snapshot table) switches from the old state to the new one.  Before that
  write the image is exactly the old image (the copies sit in free clusters);
  after it, exactly the new one.  Nothing leaks either way.

Refcount entries narrower than a byte are packed least-significant-bits
first (entry 0 in the low bits of byte 0); wider ones are big-endian.
Blocks and the table are held decoded as tables of a :mod:`vdkit.io.tables`
backend (``Refcounts.T``): plain lists on images whose refcount metadata fits
in a few MiB (no numpy import: it costs more than the whole operation there),
numpy arrays above that so walks over whole trees are vectorised.
"""

from __future__ import annotations

from vdkit.errors import EFBIG, EINVAL, CorruptImageError, VdkitError, hexalt
from vdkit.formats.qcow2 import layout as L
from vdkit.formats.qcow2.overlap import Metadata, overlap_text
from vdkit.io import tables

TYPE_CHECKING = False  # typing and collections are not imported at run time (start-up cost)
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

    import numpy as np

    from vdkit.io.file import ImageFile
    from vdkit.io.tables import Backend, Tab


# -- entry packing ------------------------------------------------------------------------------

def get_refcount(block: bytes | bytearray, index: int, bits: int) -> int:
    """Entry ``index`` of a packed refcount block of ``bits``-wide entries."""
    if bits >= 8:
        n = bits // 8
        return int.from_bytes(block[index * n : index * n + n], "big")
    bit = index * bits
    return (block[bit // 8] >> (bit % 8)) & ((1 << bits) - 1)


def set_refcount(block: bytearray, index: int, bits: int, value: int) -> None:
    """Store ``value`` as entry ``index`` (the caller checked the range)."""
    if bits >= 8:
        n = bits // 8
        block[index * n : index * n + n] = value.to_bytes(n, "big")
        return
    bit = index * bits
    mask = ((1 << bits) - 1) << (bit % 8)
    block[bit // 8] = (block[bit // 8] & ~mask) | ((value << (bit % 8)) & mask)


def decode_block(block: bytes | bytearray, bits: int) -> np.ndarray:
    """All entries of a packed block as a writable numpy ``uint64`` array (``check`` works on those)."""
    result: np.ndarray = tables.NUMPY.decode_refcounts(block, bits)
    return result


def encode_block(values: Tab, bits: int) -> bytes:
    """Inverse of :func:`decode_block`, for a table of either backend."""
    if isinstance(values, list):
        return tables.SMALL.encode_refcounts(values, bits)
    return tables.NUMPY.encode_refcounts(values, bits)


class RefcountOverflow(VdkitError):
    """An update would take a refcount below 0 or above ``refcount_max``."""


def _io(op: Callable[[], object], offset: int) -> bytes:
    """A refcount block read or write; the file's refusal of an offset no file can have (a damaged
    table: EFBIG, EINVAL, or past 2^63) becomes an error with its errno, not an internal error.
    Other I/O errors pass as they are."""
    try:
        return op()  # type: ignore[return-value]
    except OSError as exc:
        if exc.errno not in (EFBIG, EINVAL) and offset < (1 << 63) - (1 << 21):
            raise
        import os

        code = exc.errno or 5
        raise VdkitError(os.strerror(code), errno=code) from None


_PLUS_ONE = bytes(range(1, 256)) + b"\0"  # a byte plus one (mod 256), for bytes.translate
_MINUS_ONE = b"\xff" + bytes(range(255))  # a byte minus one (mod 256)


def _zero_entry(data: bytes | bytearray, a: int, b: int, width: int) -> int:
    """The index of the first ``width``-byte entry of ``data[a:b]`` that is 0, -1 if none: the
    candidates are the entries whose last byte is 0 (found by memchr in the last bytes)."""
    low = data[a + width - 1 : b : width]
    j = low.find(0)
    while j >= 0 and width > 1 and any(data[a + j * width : a + j * width + width - 1]):
        j = low.find(0, j + 1)
    return j


def _aligned_find(data: bytes, pattern: bytes, width: int) -> int:
    """The first occurrence of ``pattern`` in ``data`` at a multiple of ``width``, -1 if none."""
    i = data.find(pattern)
    while i >= 0 and i % width:
        i = data.find(pattern, i + 1)
    return i


def _zero_scan_low(low: bytes, start: int, n: int) -> tuple[int, int, int]:
    """``Backend.zero_scan`` of a block's counts held as bytes (``Refcounts._low``): memchr and
    in-place compares instead of a Python comparison per entry."""
    size = len(low)
    rest = low[start:]
    lead = len(rest) - len(rest.lstrip(b"\0"))
    if lead >= n:
        return lead, start, -1
    i = start + lead
    zeros = bytes(n)
    while True:
        z = low.find(b"\0", i)
        if z < 0:
            return lead, -1, start + len(rest.rstrip(b"\0"))
        if z + n > size:
            return lead, -1, z + len(low[z:].rstrip(b"\0"))
        if low.startswith(zeros, z):
            return lead, z, -1
        nz = low[z : z + n].lstrip(b"\0")
        i = z + n - len(nz)  # (the first non-zero count after z: inside the n, as they are not all 0)


def _add_in_bytes(raw: bytes, w: int, segs: list[tuple[int, int, int]]) -> tuple[bytes, int] | None:
    """The block ``raw`` of ``w``-byte big-endian counts with ``v`` (-1, 0 or 1) added to entries
    ``first .. end-1`` for each ``(first, end, v)`` of ``segs`` (sorted, disjoint), and the lowest
    entry of a segment with ``v <= 0`` that is 0 afterwards (-1: none); None where a count would
    leave its range.  Where no entry's last byte would carry or borrow (the usual), only the last
    bytes change, by one translation; otherwise a segment is one big-integer addition of
    ``±Σ 2^(8w·j)``, no entry carrying into its neighbour once none is at the limit it would cross."""
    out = bytearray(raw)
    zero = -1
    one = bytes(w - 1) + b"\1"
    for lo, hi, v in segs:
        a, b = lo * w, hi * w
        if v:
            low = raw[a + w - 1 : b : w]  # (the entries' last bytes)
            if (0xFF if v > 0 else 0) not in low:
                out[a + w - 1 : b : w] = low.translate(_PLUS_ONE if v > 0 else _MINUS_ONE)
            else:
                seg = raw[a:b]
                limit = b"\xff" * w if v > 0 else bytes(w)
                if _aligned_find(seg, limit, w) >= 0:
                    return None
                x = int.from_bytes(seg, "big")
                ones = int.from_bytes(one * (hi - lo), "big")
                out[a:b] = (x + ones if v > 0 else x - ones).to_bytes(b - a, "big")
        if zero < 0 and v <= 0:
            at = _zero_entry(out, a, b, w)
            if at >= 0:
                zero = lo + at
    return bytes(out), zero


class _Restart(Exception):
    """A refcount block was allocated; the caller's free range may be gone."""


# -- the refcount structure -------------------------------------------------------------------

def refcount_metadata_blocks(clusters: int, cluster_size: int, refcount_order: int, generous: bool) -> int:
    """Refcount blocks needed to describe ``clusters`` plus the refcount structures themselves.

    Iterates to a fixed point (blocks describe themselves and the table); with
    ``generous`` it then adds half the table as slack once, as QEMU does when
    it grows the table so the next growth is further away.
    """
    per_table_cluster = cluster_size // 8
    per_block = cluster_size * 8 >> refcount_order
    table = blocks = n = 0
    while True:
        last = n
        blocks = -(-(clusters + table + blocks) // per_block)
        table = -(-blocks // per_table_cluster)
        n = clusters + blocks + table
        if n == last and generous:
            clusters += -(-table // 2)
            n = 0
            generous = False
            continue
        if n == last:
            return blocks



class RefcountArea:
    """Where QEMU's refcount-area algorithm puts a new refcount table and the blocks it lacks.

    A pure plan, so the live allocator (:meth:`Refcounts.add_area`) and the
    in-memory replay of ``qemu-img create`` (``create.py``) lay out the same
    bytes from one computation.  ``table`` is the new table's entries,
    ``new_blocks`` the table indices that get a fresh (zeroed) block at the
    offset ``table`` names, ``counted`` the ``(index, first, end)`` entry
    ranges of blocks whose clusters (the area itself) count 1.
    """

    __slots__ = ("table", "table_offset", "table_clusters", "end", "new_blocks", "counted")

    def __init__(self, old_table: Iterable[int], start: int, additional: int, *, exact: bool,
                 cluster_bits: int, refcount_order: int, new_block: tuple[int, int] | None = None) -> None:
        cs = 1 << cluster_bits
        per_block = cs * 8 >> refcount_order
        total = refcount_metadata_blocks((start >> cluster_bits) + additional, cs, refcount_order,
                                         generous=not exact)
        area_index = (start >> cluster_bits) // per_block
        per_cluster = cs // 8
        size = total if exact else total + -(-total // 2)
        size = -(-size // per_cluster) * per_cluster
        if max(total, size) > L.MAX_REFTABLE_SIZE:  # QEMU compares entries with the byte limit here
            raise VdkitError("File too large", errno=EFBIG)
        table = list(old_table)[:size]
        table += [0] * (size - len(table))
        if new_block is not None:
            table[new_block[0]] = new_block[1]
        self.new_blocks = [i for i in range(area_index, total) if not table[i]]
        for k, i in enumerate(self.new_blocks):
            table[i] = start + k * cs
        self.table = table
        self.table_clusters = size * 8 // cs
        self.table_offset = start + len(self.new_blocks) * cs
        self.end = self.table_offset + self.table_clusters * cs
        first, end = start >> cluster_bits, self.end >> cluster_bits
        self.counted = [
            (i, max(first, i * per_block) - i * per_block, min(end, (i + 1) * per_block) - i * per_block)
            for i in range(area_index, total) if i * per_block < end
        ]


class Refcounts:
    """The refcount table and blocks of one open image, with a write-back cache.

    ``on_table_switch(offset, clusters)`` is called after the header switched
    to a grown refcount table so the driver can update its header copy.
    ``before_table_write`` is called before a refcount-table entry is written
    (QEMU flushes the L2 cache there so no L2 write is reordered past it).
    """

    def __init__(
        self,
        file: ImageFile,
        *,
        cluster_bits: int,
        refcount_order: int,
        table_offset: int,
        table_clusters: int,
        on_table_switch: Callable[[int, int], None] | None = None,
        before_table_write: Callable[[], None] | None = None,
        cache_bytes: int = 16 * 1024 * 1024,
        on_corruption: Callable[[str], Exception] | None = None,
    ) -> None:
        self.file = file
        # the driver's signal_corruption (marks a writable image corrupt); the error to raise comes back
        self.on_corruption = on_corruption
        self.cluster_bits = cluster_bits
        self.cluster_size = 1 << cluster_bits
        self.bits = 1 << refcount_order
        self.refcount_max = (1 << self.bits) - 1
        self.entries_per_block = self.cluster_size * 8 // self.bits
        self.table_offset = table_offset
        self.table_clusters = table_clusters
        raw = file.pread(table_offset, table_clusters * self.cluster_size)
        # The backend by the refcount metadata's size: the table and the blocks it names.
        T = tables.backend_for(len(raw))
        self.table: Tab = T.decode_u64(raw)
        T2 = tables.backend_for(len(raw) + T.count_nonzero(self.table, 0, len(self.table)) * self.cluster_size)
        if T2 is not T:
            T, self.table = T2, T2.decode_u64(raw)
        self.T: Backend = T
        # QEMU's metadata overlap check for our own writes (set by the driver; None: no check):
        # (host offset, size, structure to ignore) -> raises the corruption event
        self.overlap_check: Callable[[int, int, Metadata], None] | None = None
        self.on_table_switch = on_table_switch
        self.before_table_write = before_table_write
        self.free_hint = 0
        self.compressed_next = 0  # byte position for packed compressed data (0 = none)
        # bumped by every refcount change: metadata can only move where refcounts changed, so the
        # I/O engine's memo of writes that overlap no metadata stays valid while this stands still
        self.changes = 0
        # rt_index -> decoded values; dirty rt indices; LRU order
        self._blocks: dict[int, Tab] = {}  # least recently used first
        self._dirty: set[int] = set()
        # rt_index -> the last bytes of a cached list block's entries, as read from the disk, where
        # every count is below 256 (the usual): its counts byte by byte, which bytes.count and
        # bytes.find scan at C speed (a list's count/index compare int objects one by one).
        # Dropped whenever the block's values change or leave the cache.
        self._low: dict[int, bytes] = {}
        self._capacity = max(8, cache_bytes // self.cluster_size)
        # Write ordering: callables to run before our dirty blocks may be written
        # (set when a decrement must wait for the L2 tables that dropped the reference).
        self.depends_on: Callable[[], None] | None = None

    def use_backend(self, T: Backend) -> None:
        """Hold the table and the cached blocks as ``T``'s tables from now on (an operation over more
        tables than the refcount metadata alone, a snapshot of a big tree, picks numpy)."""
        if T is self.T:
            return
        self.table = T.convert(self.table)
        self._low.clear()
        for rt in list(self._blocks):
            self._blocks[rt] = T.convert(self._blocks[rt])
        self.T = T

    # -- geometry -------------------------------------------------------------------------------
    def block_offset(self, rt_index: int) -> int:
        """Host offset of refcount block ``rt_index`` (0 = not allocated)."""
        if rt_index >= len(self.table):
            return 0
        # Reserved bits are masked off, as QEMU's refcount code does (only check reports them):
        # refusing here would fail writes qemu-img makes on the same image.
        off = int(self.table[rt_index]) & L.REFT_OFFSET_MASK
        if off % self.cluster_size:
            msg = f"Refblock offset {off:#x} unaligned (reftable index: {hexalt(rt_index)})"
            if self.on_corruption is not None:
                raise self.on_corruption(msg)
            raise CorruptImageError(msg, errno=5)
        return off

    def block_clusters(self) -> list[int]:
        """Host offsets of every allocated refcount block."""
        return [self.block_offset(i) for i in self.T.nonzero(self.table)]

    # -- cache ----------------------------------------------------------------------------------
    def block_values(self, rt_index: int) -> Tab | None:
        """Decoded block ``rt_index`` (cached), or None when it is not allocated."""
        vals = self._blocks.get(rt_index)
        if vals is not None:
            self._blocks[rt_index] = self._blocks.pop(rt_index)  # now the most recently used
            return vals
        off = self.block_offset(rt_index)
        if off == 0:
            return None
        raw = _io(lambda: self.file.pread(off, self.cluster_size), off)
        if len(raw) < self.cluster_size:  # a block (partly) past the end of the file reads as zeros, as in QEMU
            raw = bytes(raw).ljust(self.cluster_size, b"\0")
        low = self._low_bytes(raw)
        vals = self.T.decode_refcounts(raw, self.bits) if low is None else list(low)
        self._insert(rt_index, vals)
        if low is not None:
            self._low[rt_index] = low
        return vals

    def _low_bytes(self, raw: bytes | bytearray | memoryview) -> bytes | None:
        """The counts of a block of list tables as bytes, when all are below 256 (None otherwise)."""
        if self.T is not tables.SMALL or self.bits < 8:
            return None
        raw = bytes(raw)
        w = self.bits // 8
        if w == 1:
            return raw
        zeros = bytes(len(raw) // w)
        if all(raw[k::w] == zeros for k in range(w - 1)):
            return raw[w - 1 :: w]
        return None

    def _insert(self, rt_index: int, vals: Tab) -> None:
        self._blocks.pop(rt_index, None)
        self._low.pop(rt_index, None)
        self._blocks[rt_index] = vals
        while len(self._blocks) > self._capacity:
            victim = next(iter(self._blocks))
            if victim in self._dirty:
                self._write_block(victim)
            del self._blocks[victim]
            self._low.pop(victim, None)

    def _write_block(self, rt_index: int) -> None:
        if self.depends_on is not None:
            dep, self.depends_on = self.depends_on, None
            dep()
        off = self.block_offset(rt_index)
        if self.overlap_check is not None:  # a table entry may name other metadata (damaged images)
            self.overlap_check(off, self.cluster_size, Metadata.REFCOUNT_BLOCK)
        data = self.T.encode_refcounts(self._blocks[rt_index], self.bits)
        _io(lambda: self.file.pwrite(off, data), off)
        self._dirty.discard(rt_index)

    def write_back(self) -> None:
        """Write dirty blocks (in index order) without syncing."""
        for rt_index in sorted(self._dirty):
            self._write_block(rt_index)

    def flush(self) -> None:
        """Write dirty blocks and make them durable."""
        had = bool(self._dirty)
        self.write_back()
        if had:
            self.file.flush()

    def drop_cache(self) -> None:
        """Forget decoded blocks (dirty ones too): used after a crash-abandon."""
        self._blocks.clear()
        self._low.clear()
        self._dirty.clear()

    @property
    def dirty(self) -> bool:
        return bool(self._dirty)

    # -- reading --------------------------------------------------------------------------------
    def get(self, cluster_index: int) -> int:
        vals = self.block_values(cluster_index // self.entries_per_block)
        return 0 if vals is None else int(vals[cluster_index % self.entries_per_block])

    def get_many(self, clusters: Tab) -> Tab:
        """Refcounts of many cluster indices at once (a table of the backend; beyond the table: 0)."""
        return self.T.gather(clusters, self.entries_per_block, self.block_values)

    def count_range(self, lo: int, hi: int, value: int) -> int:
        """How many of clusters ``lo .. hi-1`` (``0 <= lo``) have the count ``value``."""
        epb = self.entries_per_block
        n = 0
        while lo < hi:
            rt, i = divmod(lo, epb)
            end = min(hi, lo - i + epb)
            vals = self.block_values(rt)
            low = self._low.get(rt)
            if vals is None:
                n += end - lo if value == 0 else 0
            elif low is not None:
                n += low.count(value, i, i + end - lo) if 0 <= value < 256 else 0
            else:
                n += self.T.count_equal(self.T.get_slice(vals, i, i + end - lo), value)
            lo = end
        return n

    def any_above(self, lo: int, hi: int, limit: int) -> bool:
        """Whether some cluster of ``lo .. hi-1`` (``0 <= lo``) has a count above ``limit``: a block
        whose counts are all below 256 (its bytes kept) is answered without looking at them."""
        epb = self.entries_per_block
        while lo < hi:
            rt, i = divmod(lo, epb)
            end = min(hi, lo - i + epb)
            vals = self.block_values(rt)
            if vals is not None and not (limit >= 255 and rt in self._low):
                if limit < 0 or int(max(self.T.get_slice(vals, i, i + end - lo))) > limit:
                    return True
            elif vals is None and limit < 0:
                return True
            lo = end
        return False

    def get_range(self, lo: int, hi: int) -> Tab:
        """Refcounts of clusters ``lo .. hi-1`` (``0 <= lo``): slices of the blocks, 0 where none."""
        T = self.T
        epb = self.entries_per_block
        parts = []
        while lo < hi:
            rt, i = divmod(lo, epb)
            end = min(hi, lo - i + epb)
            vals = self.block_values(rt)
            parts.append(T.zeros(end - lo) if vals is None else T.get_slice(vals, i, i + end - lo))
            lo = end
        return parts[0] if len(parts) == 1 else T.concat(parts) if parts else T.zeros(0)

    # -- free-space search (§1.2) ---------------------------------------------------------------
    def find_free(self, n: int, start: int) -> int:
        """First cluster index ≥ ``start`` beginning ``n`` clusters of refcount 0."""
        ci = start
        run_start, run = ci, 0
        epb = self.entries_per_block
        limit = (L.MAX_HOST_OFFSET + 1) >> self.cluster_bits
        # Fast path, the common case of sequential allocation: the clusters right at
        # the hint are free (scanning the rest of the block cost more than the write).
        T = self.T
        idx = ci % epb
        if idx + n <= epb and ci + n <= limit:
            vals = self.block_values(ci // epb)
            low = self._low.get(ci // epb)
            if vals is not None and (low.startswith(bytes(n), idx) if low is not None
                                     else not T.any_nonzero(vals, idx, idx + n)):
                return ci
        while True:
            if ci + (n - run) > limit:
                raise VdkitError("File too large", errno=EFBIG)
            vals = self.block_values(ci // epb)
            base = ci - ci % epb
            seg = epb - ci % epb
            lead = seg
            if vals is not None:
                low = self._low.get(ci // epb)
                lead, first, tail = T.zero_scan(vals, ci % epb, n) if low is None else _zero_scan_low(low, ci % epb, n)
            if lead == seg:  # no block, or nothing counted from ci on: the run goes on
                if run == 0:
                    run_start = ci
                run += seg
                ci += seg
            else:
                # zero runs: the leading one (continuing the carried run), then any inside the block
                if run + lead >= n:
                    if run == 0:
                        run_start = ci
                    return run_start
                if first >= 0:
                    return base + first
                run_start = base + tail
                run = epb - tail
                ci += seg
            if run >= n:
                return run_start

    # -- in-place updates (§1.4) ----------------------------------------------------------------
    def update(self, offset: int, length: int, addend: int) -> None:
        """Change the refcount of every cluster in ``[offset, offset+length)`` by ``addend``.

        Raises ``_Restart`` (after undoing this call) when a refcount block had
        to be allocated, :class:`RefcountOverflow` (EINVAL) when a count would
        leave ``0..refcount_max``.
        """
        self.last_zeroed: list[int] = []  # clusters this decrement freed (callers discard them)
        if length <= 0 or addend == 0:
            return
        self.changes += 1
        first = offset >> self.cluster_bits
        last = (offset + length - 1) >> self.cluster_bits
        epb = self.entries_per_block
        done: list[tuple[int, int, Tab]] = []  # (rt, first index, old values)
        T = self.T
        try:
            if addend < 0 and self.depends_on is None and self._l2_flush is not None:
                self.depends_on = self._l2_flush
            ci = first
            while ci <= last:  # one refcount block at a time, vectorised within it
                rt, idx = divmod(ci, epb)
                end = min(epb, idx + (last - ci + 1))
                vals = self.block_values(rt)
                if vals is None:
                    if addend < 0:  # no block: the count is 0 and cannot go down
                        if (rt + 1) * 8 > L.MAX_REFTABLE_SIZE:
                            # QEMU first tries to grow the table to hold the block: too large
                            raise RefcountOverflow("File too large", errno=EFBIG)
                        raise RefcountOverflow("Invalid argument", errno=EINVAL)
                    self._alloc_block(ci)  # raises _Restart on success
                    raise AssertionError("unreachable")
                if not T.fits(vals, idx, end, addend, self.refcount_max):
                    raise RefcountOverflow("Invalid argument", errno=EINVAL)
                done.append((rt, idx, T.get_slice(vals, idx, end)))
                self._low.pop(rt, None)
                zeros = T.add_slice(vals, idx, end, addend)  # block indices now 0 (decrements only)
                if zeros:
                    self.free_hint = min(self.free_hint, rt * epb + zeros[0])
                self._dirty.add(rt)
                if zeros:
                    freed = [rt * epb + z for z in zeros]
                    self.last_zeroed += freed
                    self._forget_freed_blocks([c << self.cluster_bits for c in freed])
                ci += end - idx
        except BaseException:
            for rt, idx, old in reversed(done):
                vals = self.block_values(rt)
                if vals is not None:
                    self._low.pop(rt, None)
                    T.set_slice(vals, idx, old)
                    self._dirty.add(rt)  # it may have been written back meanwhile
            raise

    def _forget_freed_blocks(self, offsets: list[int]) -> None:
        """Refcount blocks whose own cluster was just freed leave the cache unwritten, as in QEMU.

        Only damaged refcounts free a block that the table still names; QEMU then drops the
        cached block with its pending changes (a later lookup reads what the disk holds, zeros
        once the cluster is discarded), so the frees that follow fail as they fail there.
        """
        for j in self.T.positions_in(self.table, L.REFT_OFFSET_MASK, offsets):
            self._blocks.pop(j, None)
            self._low.pop(j, None)
            self._dirty.discard(j)

    _l2_flush: Callable[[], None] | None = None

    def set_l2_flush(self, fn: Callable[[], None]) -> None:
        """How to flush the L2 cache (decrements wait for it; table writes too)."""
        self._l2_flush = fn
        self.before_table_write = self.before_table_write or fn

    # -- allocation (§1.3) ----------------------------------------------------------------------
    def alloc_clusters(self, size: int) -> int:
        """Allocate ``size`` bytes worth of contiguous clusters; returns the host offset."""
        n = (size + self.cluster_size - 1) >> self.cluster_bits
        if n == 0:
            return self.free_hint << self.cluster_bits
        while True:
            start = self.find_free(n, self.free_hint)
            self.free_hint = start + n
            try:
                self.update(start << self.cluster_bits, n << self.cluster_bits, 1)
            except _Restart:
                self.free_hint = start
                continue
            except BaseException:
                self.free_hint = min(self.free_hint, start)
                raise
            return start << self.cluster_bits

    def alloc_at(self, offset: int, nb_clusters: int) -> int:
        """Take the free clusters starting at ``offset``; returns how many could be taken (≥ 0)."""
        ci = offset >> self.cluster_bits
        while True:
            n = 0  # (re)count: a refcount block allocated on the way may have taken one
            while n < nb_clusters and self.get(ci + n) == 0:
                n += 1
            try:
                self.update(offset, n << self.cluster_bits, 1)
                return n
            except _Restart:
                continue

    def alloc_bytes(self, size: int) -> int:
        """Byte-granular allocation for compressed data (§1.6)."""
        cs = self.cluster_size
        if size <= 0 or size > cs:
            raise VdkitError("Invalid argument", errno=EINVAL)
        while True:
            pos = self.compressed_next
            if pos and self.get(pos >> self.cluster_bits) == self.refcount_max:
                pos = 0
            if not pos or cs - (pos % cs) < size:
                new = self.find_free(1, self.free_hint)
                self.free_hint = new + 1
                new_off = new << self.cluster_bits
                if not pos or new_off != (pos - pos % cs) + cs:
                    pos = new_off
            try:
                self.update(pos, size, 1)
            except _Restart:
                continue
            end = pos + size
            self.compressed_next = 0 if end % cs == 0 else end
            return pos

    def free(self, offset: int, length: int) -> None:
        """Drop one reference from every cluster in the range (§1.7)."""
        while True:
            try:
                self.update(offset, length, -1)
                return
            except _Restart:
                continue

    def release(self, offset: int, length: int) -> bool:
        """:meth:`free` for the writers that go on when it fails, as QEMU's ``qcow2_free_clusters`` does.

        A count that cannot go down (damaged refcounts: it is 0 already, or its
        block lies past any table QEMU could grow) is reported on stderr
        (``qcow2_free_clusters failed: ...``), the range stays as it was and the
        operation goes on: the cluster leaks.  Refusing there would fail writes
        qemu-img completes on the same image.  True when the references were dropped (only
        then may a caller discard clusters that now read as free: a count that was already 0
        may be the header's).
        """
        try:
            self.free(offset, length)
        except RefcountOverflow as exc:
            import os
            import sys

            sys.stderr.write(f"qcow2_free_clusters failed: {os.strerror(exc.errno or EINVAL)}\n")
            sys.stderr.flush()
            return False
        return True

    # -- refcount block allocation and table growth (§1.5) --------------------------------------
    def _alloc_block(self, ci: int) -> None:
        self.changes += 1
        epb = self.entries_per_block
        rt = ci // epb
        if self.before_table_write is not None:
            self.before_table_write()
        b = self.find_free(1, self.free_hint)
        if b == 0 and self.on_corruption is not None:  # cluster 0 counted free: the header (QEMU's test)
            raise self.on_corruption("Preventing invalid allocation of refcount block at offset 0")
        self.free_hint = b + 1
        if b // epb == rt:
            vals = self.T.zeros(epb)
            vals[b % epb] = 1
        else:
            try:
                self.update(b << self.cluster_bits, self.cluster_size, 1)
            except _Restart:
                self.free_hint = min(self.free_hint, b)
                raise
            self.flush()
            vals = self.T.zeros(epb)
        if self.overlap_check is not None:  # a zero refcount may lie about metadata
            self.overlap_check(b << self.cluster_bits, self.cluster_size, Metadata.REFCOUNT_BLOCK)
        self.file.pwrite(b << self.cluster_bits, self.T.encode_refcounts(vals, self.bits))
        self.file.flush()
        if rt < len(self.table):
            if self.overlap_check is not None:
                self.overlap_check(self.table_offset + rt * 8, 8, Metadata.REFCOUNT_TABLE)
            self.file.pwrite(self.table_offset + rt * 8, int(b << self.cluster_bits).to_bytes(8, "big"))
            self.file.flush()
            self.table[rt] = b << self.cluster_bits
            self._insert(rt, vals)
            raise _Restart
        self._grow_table(rt, b, vals)
        raise _Restart

    def _grow_table(self, rt: int, b: int, b_vals: Tab) -> None:
        """The table is full: a new one, with the blocks describing it, goes after everything in use.

        ``b`` is the block just allocated for table index ``rt``; the area starts at
        the first block boundary past both it and the clusters ``rt`` describes.
        """
        epb = self.entries_per_block
        used_blocks = max(rt, b // epb) + 1
        self.add_area((used_blocks * epb) << self.cluster_bits, 0, exact=False,
                      new_block=(rt, b << self.cluster_bits, b_vals))
        self.flush()

    def add_area(self, start: int, additional: int, *, exact: bool,
                 new_block: tuple[int, int, Tab] | None = None) -> int:
        """Put a new refcount table, and the blocks it lacks, at ``start``, and switch to it.

        The table covers the clusters below ``start``, ``additional`` more
        after the area, and the area itself (:class:`RefcountArea`): sized
        exactly, or with QEMU's slack when growing on demand so the next
        growth is further away.  ``new_block`` is ``(table index, offset,
        values)`` of a block allocated for an index the old table cannot hold.
        The blocks and the table are durable before the one 12-byte header
        switch; the old table is freed after it.  Returns the end of the area.
        """
        T = self.T
        plan = RefcountArea(T.tolist(self.table), start, additional, exact=exact, cluster_bits=self.cluster_bits,
                            refcount_order=self.bits.bit_length() - 1,
                            new_block=None if new_block is None else new_block[:2])
        if plan.table_clusters * self.cluster_size > L.MAX_REFTABLE_SIZE:
            # QEMU would write it, then refuse to open the image ("Reference count table too large")
            raise VdkitError("File too large", errno=EFBIG)
        epb = self.entries_per_block
        fresh = {i: T.zeros(epb) for i in plan.new_blocks}
        for i, lo, hi in plan.counted:
            if i in fresh:
                T.add_slice(fresh[i], lo, hi, 1)
            else:
                vals = self.block_values(i)
                assert vals is not None
                self._low.pop(i, None)
                T.add_slice(vals, lo, hi, 1)
                self._dirty.add(i)
        self.flush()
        new_table = T.array(plan.table)
        if self.overlap_check is not None:
            for i in fresh:
                self.overlap_check(plan.table[i], self.cluster_size, Metadata.REFCOUNT_BLOCK)
            self.overlap_check(plan.table_offset, plan.table_clusters * self.cluster_size, Metadata.REFCOUNT_TABLE)
        for i, vals in fresh.items():
            self.file.pwrite(plan.table[i], T.encode_refcounts(vals, self.bits))
        self.file.pwrite(plan.table_offset, T.encode_u64(new_table))
        self.file.flush()
        self.file.pwrite(48, plan.table_offset.to_bytes(8, "big") + plan.table_clusters.to_bytes(4, "big"))
        self.file.flush()
        old_off, old_clusters = self.table_offset, self.table_clusters
        self.table = new_table
        self.table_offset, self.table_clusters = plan.table_offset, plan.table_clusters
        if new_block is not None:
            self._insert(new_block[0], new_block[2])
        for i, vals in fresh.items():
            self._insert(i, vals)
        for i in list(self._blocks):
            if i >= len(new_table):
                self._blocks.pop(i, None)
                self._low.pop(i, None)
                self._dirty.discard(i)
        if self.on_table_switch is not None:
            self.on_table_switch(plan.table_offset, plan.table_clusters)
        self.release(old_off, old_clusters * self.cluster_size)
        return plan.end

    # -- adopting a committed transaction -------------------------------------------------------
    def adopt(self, table: Tab, table_offset: int, table_clusters: int,
              blocks: dict[int, Tab | None], free_hint: int) -> None:
        """Switch the in-memory state to the one a transaction just committed (``blocks``: the new
        values of the blocks it wrote, None for one written from its bytes: read again when needed)."""
        self.changes += 1
        self.table = table
        self.table_offset, self.table_clusters = table_offset, table_clusters
        for rt, vals in blocks.items():
            self._dirty.discard(rt)
            if vals is None:
                self._blocks.pop(rt, None)
                self._low.pop(rt, None)
            else:
                self._insert(rt, vals)
        self.free_hint = min(self.free_hint, free_hint)


# -- copy-on-write transactions ---------------------------------------------------------------

def covered(T: Backend, points: list[int], parts: Sequence[tuple[Tab, Tab | None]]) -> set[int]:
    """The ``points`` (cluster indices) that some part covers: a part is runs ``(starts, lens)``
    (clusters ``starts[j] .. starts[j] + lens[j] - 1``) or ``(clusters, None)`` one by one.

    The points are few (staged writes, refcount metadata), the parts a whole tree: each run is
    looked up among the sorted points, each cluster list tested as a whole (``T.members``)."""
    from _bisect import bisect_left  # (bisect's C module: bisect.py costs a quarter of a ms to import)

    pts = sorted(set(points))
    hit: set[int] = set()
    if not pts:
        return hit
    probe = T.indices(pts)
    for starts, lens in parts:
        if lens is None:
            if len(starts):
                hit.update(T.members(probe, starts))
            continue
        for a, n in zip(T.tolist(starts), T.tolist(lens), strict=True):
            i = bisect_left(pts, a)
            while i < len(pts) and pts[i] < a + n:
                hit.add(pts[i])
                i += 1
    return hit



class Transaction:
    """A set of refcount changes and staged writes that commit atomically.

    Use: allocate with :meth:`alloc` (clusters free in the current state),
    stage content with :meth:`write`, record reference changes with
    :meth:`add_refs`/:meth:`add_range`, query resulting counts with
    :meth:`new_refcounts`, then :meth:`commit` with a callback producing the
    header bytes 24..71 of the new state.
    """

    COMMIT_OFFSET = 24
    COMMIT_SIZE = 48

    def __init__(self, rc: Refcounts) -> None:
        if rc.dirty:
            rc.flush()
        self.rc = rc
        self.T = rc.T
        self.cursor = rc.free_hint
        self._allocated: list[tuple[int, int]] = []  # (first cluster, count)
        self._deltas = rc.T.deltas()
        self._writes: list[tuple[int, bytes]] = []
        self._lowest_freed: int | None = None

    # -- allocation and references --------------------------------------------------------------
    def alloc(self, size: int) -> int:
        """Clusters that are free now and not yet taken by this transaction."""
        n = max(1, (size + self.rc.cluster_size - 1) >> self.rc.cluster_bits)
        start = self.rc.find_free(n, self.cursor)
        self.cursor = start + n
        self._allocated.append((start, n))
        self._deltas.add_range(start, start + n, 1)
        return start << self.rc.cluster_bits

    def add_refs(self, clusters: Tab | Iterable[int], addend: int) -> None:
        """Change the count of every cluster index in ``clusters`` (repeats count repeatedly)."""
        tolist = getattr(clusters, "tolist", None)
        if tolist is not None:  # a numpy array
            if self.T is tables.SMALL:
                clusters = tolist()
        elif not isinstance(clusters, (list, range)):
            clusters = list(clusters)
        self._deltas.add(clusters, addend)

    def add_runs(self, starts: Tab, lens: Tab, addend: int) -> None:
        """Change by ``addend`` the count of clusters ``starts[j] .. starts[j] + lens[j] - 1`` for every ``j``."""
        self._deltas.add_runs(starts, lens, addend)

    def add_range(self, offset: int, length: int, addend: int) -> None:
        """Change by ``addend`` every cluster touching ``[offset, offset+length)``."""
        if length <= 0:
            return
        first = offset >> self.rc.cluster_bits
        last = (offset + length - 1) >> self.rc.cluster_bits
        self._deltas.add_range(first, last + 1, addend)

    def deltas(self) -> tuple[Tab, Tab]:
        """Sorted cluster indices and their net changes (zeros included)."""
        return self._deltas.items()

    def freed_runs(self) -> list[tuple[int, int]]:
        """``(first, end)`` runs of the clusters whose count this transaction lowers, sorted, disjoint."""
        return self._deltas.negative_runs()

    def changes_of(self, clusters: Tab) -> Tab:
        """The net change this transaction makes to each cluster's count (0: none)."""
        return self._deltas.lookup(clusters)

    def new_refcounts(self, clusters: Tab) -> Tab:
        """Refcounts after this transaction (signed; may be out of range before validation)."""
        return self._deltas.plus(self.rc.get_many(clusters), clusters)

    def count_new(self, lo: int, hi: int, value: int) -> int:
        """How many of clusters ``lo .. hi-1`` have the count ``value`` after this transaction: piece by
        piece of equal change, counted in the blocks' values (no new count computed one by one)."""
        if hi - lo == 1:  # (one cluster, as _replace_table asks: its count and change, no segment search)
            return int(self.rc.get(lo) + self._deltas.at(lo) == value)
        return sum(self.rc.count_range(a, b, value - d) for a, b, d in self._deltas.pieces(lo, hi))

    def new_refcounts_range(self, lo: int, hi: int) -> Tab:
        """:meth:`new_refcounts` of the clusters ``lo .. hi-1``."""
        return self._deltas.plus_range(self.rc.get_range(lo, hi), lo)

    def check_peak(self, increments: Iterable[tuple[Tab, Tab | None, int]]) -> None:
        """Fail (EINVAL) if current counts plus ``increments`` alone would overflow.

        QEMU applies the increments of an operation before its decrements, so
        it fails on a transient overflow even when the net result would fit;
        callers use this to fail exactly where QEMU fails.  ``increments``
        holds (clusters, None, times) and (run starts, run lengths, times).
        """
        adds = self.T.deltas()
        for arr, lens, times in increments:
            if lens is None:
                adds.add(arr, times)
            else:
                adds.add_runs(arr, lens, times)
        segs = adds.segments(0, 1 << 63)
        if segs is not None:  # (runs of equal sum: each asks the counts of its range, no key by key)
            for lo, hi, v in segs:
                if v > 0 and self.rc.any_above(lo, hi, self.rc.refcount_max - v):
                    raise RefcountOverflow("Invalid argument", errno=EINVAL)
            return
        keys, sums = adds.items()
        if not len(keys):
            return
        if self.T.any_exceeds(self.rc.get_many(keys), sums, self.rc.refcount_max):
            raise RefcountOverflow("Invalid argument", errno=EINVAL)

    # -- staged writes --------------------------------------------------------------------------
    def write(self, offset: int, data: bytes) -> None:
        self._writes.append((offset, bytes(data)))

    def staged_clusters(self) -> set[int]:
        out: set[int] = set()
        for start, n in self._allocated:
            out.update(range(start, start + n))
        return out

    # -- shadow refcount structures -------------------------------------------------------------
    def _prepare_refcounts(self) -> tuple[Tab, int, int, dict[int, Tab | None]]:
        """Copy every refcount block that changes, and the table, into free clusters."""
        rc = self.rc
        T = self.T
        epb = rc.entries_per_block
        cs = rc.cluster_size
        new_block_off: dict[int, int] = {}
        table_off = -1
        table_cl = 0
        old_table_freed = False
        while True:
            touched = self._deltas.touched_blocks(epb)
            grew = False
            for rt in touched:
                if rt not in new_block_off:
                    old = rc.block_offset(rt)
                    if old and rc.overlap_check is not None:
                        # QEMU rewrites this block in place: where the table names other metadata
                        # its write fails (a corruption event); ours would go to a copy
                        rc.overlap_check(old, cs, Metadata.REFCOUNT_BLOCK)
                    if old:
                        self.add_range(old, cs, -1)
                    new_block_off[rt] = self.alloc(cs)
                    grew = True
            if grew:
                continue
            needed = max(len(rc.table), (max(touched) + 1) if touched else 0)
            have = table_cl * cs // 8
            if table_off >= 0 and have >= needed:
                break
            if not old_table_freed:
                self.add_range(rc.table_offset, rc.table_clusters * cs, -1)
                old_table_freed = True
            if table_off >= 0:
                # too small after all: abandon it (it stays free) and take a bigger one
                self.add_range(table_off, table_cl * cs, -1)
                self._allocated = [(s, n) for s, n in self._allocated if s != table_off >> rc.cluster_bits]
            entries = needed if needed <= len(rc.table) else needed + (needed + 1) // 2
            table_cl = max(rc.table_clusters, (entries * 8 + cs - 1) // cs)
            if table_cl * cs > L.MAX_REFTABLE_SIZE:
                raise VdkitError("File too large", errno=EFBIG)
            table_off = self.alloc(table_cl * cs)
        new_table = T.zeros(table_cl * cs // 8)
        T.set_slice(new_table, 0, rc.table)
        blocks: dict[int, Tab | None] = {}
        encoded: dict[int, bytes] = {}
        for rt, off in new_block_off.items():
            in_bytes = self._block_in_bytes(rt)
            if in_bytes is not None:
                encoded[rt], zero = in_bytes
                blocks[rt] = None
            else:
                old_vals = rc.block_values(rt)
                vals = T.zeros(epb) if old_vals is None else T.copy(old_vals)
                try:
                    zero = self._deltas.apply_block(rt, epb, vals, rc.refcount_max)
                except ValueError:
                    raise RefcountOverflow("Invalid argument", errno=EINVAL) from None
                blocks[rt] = vals
            if zero >= 0:
                lowest = rt * epb + zero
                if self._lowest_freed is None or lowest < self._lowest_freed:
                    self._lowest_freed = lowest
            new_table[rt] = off
        for rt, off in new_block_off.items():
            vals = blocks[rt]
            self.write(off, encoded[rt] if vals is None else T.encode_refcounts(vals, rc.bits))
        self.write(table_off, T.encode_u64(new_table))
        return new_table, table_off, table_cl, blocks

    def _block_in_bytes(self, rt: int) -> tuple[bytes, int] | None:
        """Block ``rt`` with this transaction's changes made in its bytes, and the lowest changed
        index now 0 (-1: none), for entries of whole bytes changed by one up or down (a snapshot's
        usual change); None otherwise (or where a count would leave its range: the caller's
        entry-by-entry update refuses it).  The changes are made by :func:`_add_in_bytes`."""
        rc = self.rc
        bits = rc.bits
        epb = rc.entries_per_block
        segs = self._deltas.segments(rt * epb, (rt + 1) * epb)
        if bits < 8 or segs is None or any(abs(v) > 1 for _, _, v in segs):
            return None
        w = bits // 8
        off = rc.block_offset(rt)
        raw = bytes(rc.cluster_size) if off == 0 else _io(lambda: rc.file.pread(off, rc.cluster_size), off)
        raw = bytes(raw).ljust(rc.cluster_size, b"\0")  # (a block past the end of the file reads as zeros)
        base = rt * epb
        return _add_in_bytes(raw, w, [(lo - base, hi - base, v) for lo, hi, v in segs])

    def check_overlap(self, in_use: Sequence[tuple[Tab, Tab | None]],
                      name_of: Callable[[int, int], str | None] | None = None) -> None:
        """Refuse to write over clusters in use (``in_use``: parts as :func:`covered` takes them; only a
        lying refcount of 0 could make us).

        With ``name_of`` (the I/O engine's metadata overlap test: a cluster-aligned
        host range -> the structure it meets, or None), the first staged write that
        meets metadata is a corruption event as QEMU signals it for that write
        ("... (overlaps with <structure>)", its offset and size).
        """
        hit = sorted(covered(self.T, list(self.staged_clusters()), in_use))
        if hit:
            if name_of is not None and self.rc.on_corruption is not None:
                cs, bits = self.rc.cluster_size, self.rc.cluster_bits
                hit_set = set(hit)
                for off, data in self._writes:  # staging order: QEMU's write order
                    first, last = off >> bits, (off + max(len(data), 1) - 1) >> bits
                    if not hit_set.intersection(range(first, last + 1)):
                        continue
                    name = name_of(first * cs, (last + 1) * cs)
                    if name is not None:
                        raise self.rc.on_corruption(  # type: ignore[call-arg]
                            overlap_text(name), offset=off, size=len(data))
            raise CorruptImageError(
                f"Preventing invalid write on metadata (cluster {hit[0]} is in use but has refcount 0)",
                errno=5,
            )

    def _refuse_growth_over_counts(self) -> None:
        """Refuse (EINVAL) to grow the file over a cluster past its end that keeps a count.

        Only a damaged refcount block counts clusters past the end of the file, and ``check`` does
        not look there; once the copies grow the file over such a cluster, its count is a leak
        ``check`` sees (one error more than before).  QEMU updates in place and grows the file
        less; vdkit leaves the image as it is instead.
        """
        rc = self.rc
        cs = rc.cluster_size
        eof = -(-rc.file.size() // cs)
        end = max((start + n for start, n in self._allocated), default=0)
        if end <= eof:
            return
        ours = self.staged_clusters()
        counted = [c for c in self.T.nonzero(self.new_refcounts(self.T.arange(eof, end))) if eof + c not in ours]
        if counted:
            raise CorruptImageError("Invalid argument", errno=EINVAL)

    def commit(self, header_bytes: Callable[[int, int], bytes], in_use: Sequence[tuple[Tab, Tab | None]],
               name_of: Callable[[int, int], str | None] | None = None) -> None:
        """Write everything, sync, switch the header with one write, sync.

        ``header_bytes(refcount_table_offset, refcount_table_clusters)`` returns
        the 48 bytes at header offset 24 describing the new state.
        """
        rc = self.rc
        new_table, table_off, table_cl, blocks = self._prepare_refcounts()
        self.check_overlap(in_use, name_of)
        self._refuse_growth_over_counts()
        for off, data in sorted(self._writes):
            rc.file.pwrite(off, data)
        rc.file.flush()
        head = header_bytes(table_off, table_cl)
        assert len(head) == self.COMMIT_SIZE
        rc.file.pwrite(self.COMMIT_OFFSET, head)
        rc.file.flush()
        hint = self.cursor if self._lowest_freed is None else min(self._lowest_freed, self.cursor)
        rc.adopt(new_table, table_off, table_cl, blocks, hint)
