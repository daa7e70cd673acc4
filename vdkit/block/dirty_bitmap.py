"""Dirty bitmaps: which parts of a disk were written since some point in time.

A bitmap belongs to one node (a format node, as in QEMU) and has one bit per
``granularity`` bytes of the disk.  Every guest write to that node (data,
zeroes, discard) sets the bits of the granules it touches while the bitmap is
*recording* (enabled); jobs reset bits as they copy (mirror) or read them to
decide what to copy (incremental backup).  Persistent bitmaps are saved in the
image by the format (qcow2's bitmaps extension, :mod:`vdkit.formats.qcow2.bitmaps`)
when the node closes and loaded again when it opens.

The state a monitor shows (``query-block``'s ``dirty-bitmaps``) and the rules
commands check (``busy``, ``readonly``, ``inconsistent``) live here too, with
QEMU's texts, so every front end refuses the same way.

This module sits below the formats (they create bitmaps when they load them):
it needs only the error tree.  The bits are a ``bytearray`` searched with the
standard library's C loops (``startswith`` against zeros or ones is a
``memcmp``; a few bytes at a time become an int for the bit tricks), so the
commands that touch bitmaps (``qemu-img bitmap``, a commit or a daemon with
bitmaps) do not import numpy: its import alone costs more than ``qemu-img
bitmap --add`` takes in all.
"""

from __future__ import annotations

from vdkit.errors import VdkitError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator

    from vdkit.block.node import Node

# QEMU's limits: a bitmap name of at most 1023 bytes, granularity a power of two >= 512 (uint32)
MAX_NAME_SIZE = 1023
MIN_GRANULARITY = 512

# bdrv_dirty_bitmap_check flags
CHECK_BUSY = 1
CHECK_RO = 2
CHECK_INCONSISTENT = 4
CHECK_DEFAULT = CHECK_BUSY | CHECK_RO | CHECK_INCONSISTENT
CHECK_ALLOW_RO = CHECK_BUSY | CHECK_INCONSISTENT

# Compared against, never written (calloc'd: the zeros' pages are the kernel's zero page until read; the
# ones are written once, so fewer: a run's end is searched 64 KiB at a time at most).
_ZEROS = memoryview(bytes(1 << 20))
_ONES = memoryview(b"\xff" * (1 << 16))
_WORD = 64  # bytes a run search reads as one int before it skips uniform bytes by memcmp


def _popcount(a: bytes | bytearray) -> int:
    """Set bits in ``a``: one conversion to an int and its ``bit_count`` (both C loops; 2.5 us for a 1 GiB
    disk's 2 KiB bitmap where a numpy table lookup and sum took 6 us)."""
    return int.from_bytes(a, "little").bit_count()


def _is_zero(buf: bytearray, start: int, end: int) -> bool:
    """``buf[start:end]`` is all zero bytes: ``memcmp`` a megabyte at a time, without copying ``buf``."""
    while start < end:
        n = min(end - start, len(_ZEROS))
        if not buf.startswith(_ZEROS[:n], start):
            return False
        start += n
    return True


def _first_nonzero(buf: bytearray, start: int, end: int, fill: memoryview = _ZEROS) -> int:
    """The first byte of ``buf[start:end]`` that is not ``fill``'s (zeros, or ``_ONES``), or -1.

    The bytes are compared with ``fill`` in chunks that double from 64 bytes
    up to its length, so a byte near ``start`` is found without scanning the
    rest (a job asks at every step); the chunk that has one is halved down to
    64 bytes.
    """
    k = _WORD
    while start < end:
        e = min(end, start + k)
        if buf.startswith(fill[: e - start], start):
            start = e
            k = min(k << 1, len(fill))
            continue
        while e - start > _WORD:  # a different byte in [start, e): keep the half that has the first
            mid = (start + e) >> 1
            if buf.startswith(fill[: mid - start], start):
                start = mid
            else:
                e = mid
        x = int.from_bytes(buf[start:e], "little")
        if fill is not _ZEROS:
            x ^= int.from_bytes(fill[: e - start], "little")
        return start + (((x & -x).bit_length() - 1) >> 3)
    return -1


def default_granularity(cluster_size: int | None) -> int:
    """QEMU's default: the format's cluster size kept within 4 KiB..64 KiB, else 64 KiB."""
    if cluster_size:
        return min(65536, max(4096, cluster_size))
    return 65536


class DirtyBitmap:
    """One bitmap: a bit per granule, plus the flags QEMU keeps with it.

    ``name`` is None for the anonymous bitmaps jobs make for themselves (they
    are never listed).  ``size`` is the disk size in bytes when the bitmap was
    made.  ``count()`` is in bytes: granules set times the granularity, as QEMU
    counts (a 1 GiB-granularity bitmap of a written 4 MiB disk counts 1 GiB).

    The number of set granules is kept as the bits change (``_fill`` adds what
    a range gained), so ``count()`` costs nothing: a mirror asks for it after
    every chunk, and a popcount of the whole bitmap per chunk grows with the
    disk (a 1 TiB disk's 2 MiB bitmap: 2.4 ms, three times per 1 MiB chunk).  Replacing ``bits`` (``bm.bits =``,
    an attribute assignment) forgets the count, and the next ``count()`` counts again.
    """

    def __init__(self, name: str | None, granularity: int, size: int, *, enabled: bool = True,
                 persistent: bool = False) -> None:
        if granularity < MIN_GRANULARITY or granularity & (granularity - 1):
            raise VdkitError("Granularity must be power of 2 and at least 512")
        self.name = name
        self.granularity = granularity
        self.shift = granularity.bit_length() - 1
        self.size = size
        self.enabled = enabled
        self.persistent = persistent
        self.busy = False  # held by a job (or an NBD export): no command may change it
        self.readonly = False  # loaded from an image opened read-only
        self.inconsistent = False  # the image says it was in use when its writer stopped
        # a backup job that reads this bitmap freezes it and records new writes here meanwhile
        self.successor: DirtyBitmap | None = None
        # one bit per granule, eight to a byte, least significant first: qcow2's own layout, so storing
        # is a slice; bits past the last granule stay 0.  Bitmaps of the same granularity and size
        # combine bytewise (``merge_from``, ``intersect``).
        self._bits = bytearray((self.granules + 7) >> 3)
        self._set: int | None = 0  # granules set, None: to be counted again

    @property
    def bits(self) -> bytearray:
        return self._bits

    @bits.setter
    def bits(self, value: bytearray) -> None:
        self._bits = value
        self._set = None

    @property
    def granules(self) -> int:
        return (self.size + self.granularity - 1) >> self.shift

    # -- bit ranges --------------------------------------------------------------------------------
    def _fill(self, a: int, b: int, value: bool) -> None:
        """Set (or clear) granules ``[a, b)``, keeping the count of set granules."""
        if a >= b:
            return
        bits = self._bits
        fa, la = a >> 3, (b - 1) >> 3
        head = (0xFF << (a & 7)) & 0xFF
        tail = (1 << (((b - 1) & 7) + 1)) - 1
        known = self._set
        before = 0 if known is None else _popcount(bits[fa : la + 1])
        if fa == la:
            mask = head & tail
            bits[fa] = bits[fa] | mask if value else bits[fa] & (0xFF ^ mask)
        elif value:
            bits[fa] |= head
            bits[la] |= tail
            bits[fa + 1 : la] = b"\xff" * (la - fa - 1)
        else:
            bits[fa] &= 0xFF ^ head
            bits[la] &= 0xFF ^ tail
            bits[fa + 1 : la] = bytes(la - fa - 1)
        if known is not None:
            self._set = known + _popcount(bits[fa : la + 1]) - before

    def _first_set(self, a: int, b: int) -> int:
        """The first set granule in ``[a, b)``, or -1 (an index of every non-zero byte of a 64 GiB disk's
        bitmap cost 6 ms per job step: the bytes are searched from ``a`` on, see :func:`_first_nonzero`)."""
        bits = self._bits
        fb = a >> 3
        if a >= b or fb >= len(bits):
            return -1
        first = bits[fb] & (0xFF << (a & 7)) & 0xFF  # (bits below a in its byte do not count)
        if not first:
            fb = _first_nonzero(bits, fb + 1, min(len(bits), (b + 7) >> 3))
            if fb < 0:
                return -1
            first = bits[fb]
        i = (fb << 3) + (first & -first).bit_length() - 1
        return i if i < b else -1

    def _first_clear(self, a: int, b: int) -> int:
        """The first clear granule in ``[a, b)``, or ``b``: the word from ``a``'s byte, then whole 0xff bytes
        skipped."""
        bits = self._bits
        fb = a >> 3
        lim = min(len(bits), (b + 7) >> 3, fb + _WORD)
        n = ((lim - fb) << 3) - (a & 7)
        clear = ~(int.from_bytes(bits[fb:lim], "little") >> (a & 7)) & ((1 << n) - 1)
        if clear:
            return min(b, a + (clear & -clear).bit_length() - 1)
        fb = _first_nonzero(bits, lim, min(len(bits), (b + 7) >> 3), _ONES)
        if fb < 0:
            return b
        first = ~bits[fb] & 0xFF
        return min(b, (fb << 3) + (first & -first).bit_length() - 1)

    def first_dirty(self, start: int = 0) -> int | None:
        """Where the first dirty granule at or after ``start`` begins (``start`` inside one), or None."""
        i = self._first_set(max(0, start) >> self.shift, self.granules)
        return None if i < 0 else max(start, i << self.shift)

    def run_at(self, start: int, end: int) -> tuple[int, int]:
        """``(start, length)``: the dirty run that ``start`` (inside a dirty granule) begins, clipped to ``end``.

        A job's step asks this for at most a chunk, so the granules are read as
        one int and the run ends at its first clear bit (1.1 us for the 16
        granules of a 1 MiB step, where ``dirty_runs``' numpy windows took 14 us)."""
        end = min(end, self.size)
        a = start >> self.shift
        b = min(self.granules, (end + self.granularity - 1) >> self.shift)
        n = b - a
        word = int.from_bytes(self._bits[a >> 3 : (b + 7) >> 3], "little") >> (a & 7)
        clear = ~word & ((1 << n) - 1)
        hi = b if not clear else a + (clear & -clear).bit_length() - 1
        return start, max(0, min(end, hi << self.shift) - start)

    def is_set(self, i: int) -> bool:
        return bool(self._bits[i >> 3] >> (i & 7) & 1)

    # -- recording -------------------------------------------------------------------------------
    def _span(self, offset: int, length: int) -> tuple[int, int]:
        first = max(0, offset) >> self.shift
        last = min(self.granules, (offset + length + self.granularity - 1) >> self.shift)
        return first, last

    def set_dirty(self, offset: int, length: int) -> None:
        """Mark every granule ``[offset, offset+length)`` touches (whatever ``enabled`` says)."""
        if length <= 0:
            return
        self._fill(*self._span(offset, length), True)

    def reset(self, offset: int, length: int) -> None:
        """Clear the granules that lie entirely inside the range (a partial granule stays dirty)."""
        if length <= 0:
            return
        a = (max(0, offset) + self.granularity - 1) >> self.shift
        end = offset + length
        b = self.granules if end >= self.size else end >> self.shift
        self._fill(a, min(b, self.granules), False)

    def clear(self) -> None:
        self._bits[:] = bytes(len(self._bits))
        self._set = 0

    def count(self) -> int:
        """Dirty bytes as QEMU reports them (whole granules)."""
        n = self._set
        if n is None:
            n = self._set = _popcount(self._bits)
        return n << self.shift

    def any(self) -> bool:
        return self.count() > 0

    def is_dirty(self, offset: int) -> bool:
        i = offset >> self.shift
        return 0 <= i < self.granules and self.is_set(i)

    def dirty_runs(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
        """``(offset, length)`` of every run of dirty granules within ``[start, end)`` (clipped to the disk).

        Clean stretches are skipped by ``memcmp`` (:meth:`_first_set`); from a
        set granule on, a 64-byte word is read as one int and the runs inside it
        are cut out with bit tricks (a few small-int operations per run, about
        what numpy's windows cost per run); a run reaching the word's end goes
        on to its first clear granule, whole 0xff bytes skipped by ``memcmp``.
        One generator, the clipping by comparisons: an NBD client's block status
        of a fragmented bitmap asks for thousands of runs at a time.
        """
        end = self.size if end is None else min(end, self.size)
        if start >= end:
            return
        sh = self.shift
        bits = self._bits
        pos = start >> sh
        b = min(self.granules, (end + self.granularity - 1) >> sh)
        lim = min(len(bits), (b + 7) >> 3)
        while True:
            fb = pos >> 3  # (the first set granule from pos: _first_set, inline for the sparse walks)
            if fb >= lim:
                return
            if not bits[fb] >> (pos & 7):
                fb = _first_nonzero(bits, fb + 1, lim)
                if fb < 0:
                    return
                pos = fb << 3
            base = fb << 3
            top = min(b, (fb + _WORD) << 3, lim << 3) - base  # the word's granules below b
            mask = ((1 << top) - 1) >> (pos & 7) << (pos & 7)  # (and none below pos)
            word = int.from_bytes(bits[fb : fb + _WORD], "little") & mask
            while word:
                low = word & -word  # the lowest run's first bit; adding it carries through the run
                ends = word + low
                hi = (ends ^ word).bit_length() - 1  # (the run's bits and the one the carry stopped at)
                off = (base + low.bit_length() - 1) << sh
                if off < start:  # (the first run, from inside its first granule)
                    off = start
                if hi >= top:  # set to the word's end: it may go on
                    hi = self._first_clear(base + top, b) - base if base + top < b else top
                    stop = (base + hi) << sh
                    yield off, (end if stop > end else stop) - off
                    break
                stop = (base + hi) << sh
                yield off, (end if stop > end else stop) - off
                word &= ends  # the run cleared
            else:
                hi = top
            pos = base + hi
            if pos >= b:
                return

    def merge_from(self, other: DirtyBitmap) -> None:
        """Set every range ``other`` marks (granularities may differ; sizes must match)."""
        if other.size != self.size:
            raise VdkitError("Bitmaps are incompatible and can't be merged")
        if other.granularity == self.granularity:
            self._combine(other, int.__or__, other)
            return
        for off, length in other.dirty_runs():
            self.set_dirty(off, length)

    def intersect(self, other: DirtyBitmap) -> None:
        """Keep only the granules ``other`` (same granularity and size) also has set (a backup of
        ``sync=top`` copies only what the top image allocates)."""
        assert other.granularity == self.granularity and other.size == self.size
        self._combine(other, int.__and__, self)

    def _combine(self, other: DirtyBitmap, op: Callable[[int, int], int], scan: DirtyBitmap) -> None:
        """``op`` of both bitmaps' bits into this one, in place, where ``scan`` (either of them) has a set
        bit: elsewhere ``op`` leaves this bitmap as it is (``|`` of zeros, ``&`` of zeros).  The bytes go
        through ints 4 KiB at a time, the clean stretches between skipped by ``memcmp``, so a sparse
        bitmap merges in microseconds; the count of set granules is kept."""
        bits, theirs, found = self._bits, other._bits, scan._bits
        n = len(bits)
        assert len(theirs) == n
        known = self._set
        i = _first_nonzero(found, 0, n)
        while i >= 0:
            e = min(n, i + 4096)
            mine = int.from_bytes(bits[i:e], "little")
            word = op(mine, int.from_bytes(theirs[i:e], "little"))
            bits[i:e] = word.to_bytes(e - i, "little")
            if known is not None:
                known += word.bit_count() - mine.bit_count()
            i = _first_nonzero(found, e, n)
        self._set = known

    def resize(self, size: int) -> None:
        """The disk was resized: granules past the old end start clean, those past a new end go."""
        old = self._bits
        keep = min(self.granules, (size + self.granularity - 1) >> self.shift)
        self.size = size
        bits = bytearray((self.granules + 7) >> 3)
        nbytes = keep >> 3
        bits[:nbytes] = old[:nbytes]
        if keep & 7:
            bits[nbytes] = old[nbytes] & ((1 << (keep & 7)) - 1)
        self.bits = bits

    def copy(self, name: str | None = None) -> DirtyBitmap:
        bm = DirtyBitmap(name, self.granularity, self.size, enabled=self.enabled)
        bm.bits = self._bits.copy()
        return bm

    # -- serialisation (qcow2 stores bit i of a granule run LSB first in each byte: ours) ----------------
    def serialize(self, first_granule: int, count: int) -> bytes:
        """``count`` granules from ``first_granule`` (a multiple of 8), in qcow2's layout."""
        assert not first_granule & 7
        return bytes(memoryview(self._bits)[first_granule >> 3 : (first_granule + count + 7) >> 3])

    def deserialize(self, first_granule: int, data: bytes, count: int) -> None:
        """Bits of ``count`` granules from ``first_granule`` (a multiple of 8) as qcow2 stores them; bytes
        ``data`` lacks (a short read at the end of the file) stay clear."""
        assert not first_granule & 7
        n = (count + 7) >> 3
        raw = bytearray(data[:n])
        if count & 7 and len(raw) == n:
            raw[-1] &= (1 << (count & 7)) - 1  # nothing past the disk's last granule
        first = first_granule >> 3
        memoryview(self._bits)[first : first + len(raw)] = raw  # (a view: past the end raises, no growth)
        self._set = None

    def dirty_clusters(self, granules_per_cluster: int) -> list[int]:
        """Indices of the ``granules_per_cluster``-granule pieces (a multiple of 8) with a dirty bit."""
        bits = self._bits
        step = granules_per_cluster >> 3
        out: list[int] = []
        i = _first_nonzero(bits, 0, len(bits))
        while i >= 0:
            piece = i // step
            out.append(piece)
            i = _first_nonzero(bits, (piece + 1) * step, len(bits))
        return out

    # -- the rules commands check (bdrv_dirty_bitmap_check) ---------------------------------------
    def check(self, flags: int) -> None:
        if flags & CHECK_BUSY and self.busy:
            raise VdkitError(f"Bitmap '{self.name}' is currently in use by another operation and cannot be used")
        if flags & CHECK_RO and self.readonly:
            raise VdkitError(f"Bitmap '{self.name}' is readonly and cannot be modified")
        if flags & CHECK_INCONSISTENT and self.inconsistent:
            raise VdkitError(f"Bitmap '{self.name}' is inconsistent and cannot be used",
                             hint="Try block-dirty-bitmap-remove to delete this bitmap from disk")

    @property
    def recording(self) -> bool:
        """Writes are being recorded (by the bitmap, or by its successor while a backup job holds it)."""
        return self.enabled or (self.successor is not None and self.successor.enabled)

    def __repr__(self) -> str:
        return f"<DirtyBitmap {self.name!r} granularity={self.granularity} count={self.count()}>"


def mark_write(bitmaps: list[DirtyBitmap], offset: int, length: int) -> None:
    """A guest write to ``[offset, offset+length)``: every recording bitmap of the node marks it."""
    for bm in bitmaps:
        if bm.enabled and not bm.inconsistent and not bm.readonly:
            bm.set_dirty(offset, length)


# -- operations on a node's bitmaps (QMP's block-dirty-bitmap-* and qemu-img bitmap share them) ----------------


def add_bitmap(node: Node, name: str, *, granularity: int | None, persistent: bool, disabled: bool,
               label: str) -> DirtyBitmap:
    """A new bitmap on ``node``, checked in QEMU's order; ``label`` names the node in persistence errors."""
    if granularity is not None:
        if granularity < MIN_GRANULARITY or granularity & (granularity - 1):
            raise VdkitError("Granularity must be power of 2 and at least 512")
    else:
        granularity = default_granularity(node.driver.cluster_size)  # QEMU asks bdrv_get_info
    if persistent:
        node.driver.can_store_bitmap(name, granularity, label)
    if node.find_bitmap(name) is not None:
        raise VdkitError(f"Bitmap already exists: {name}")
    if len(name.encode()) > MAX_NAME_SIZE:
        raise VdkitError(f"Bitmap name too long: {name}")
    bm = DirtyBitmap(name, granularity, node.size, enabled=not disabled, persistent=persistent)
    node.bitmaps.insert(0, bm)
    return bm


def merge_bitmaps(target: DirtyBitmap, sources: Iterable[DirtyBitmap]) -> None:
    """Set in ``target`` every granule one of ``sources`` marks: the one merge behind QMP's
    ``block-dirty-bitmap-merge``, ``qemu-img bitmap --merge`` and ``convert --bitmaps``.

    Each source is checked (a read-only one may be read) and gathered into a bitmap of the
    target's shape as it comes, so a lazy ``sources`` that fails to find its next bitmap fails
    after the earlier ones were checked, as QEMU's loop over its list does; the target is checked
    last.  ``target`` changes only after every check passed and then cannot fail, so a caller
    that keeps its old bits (a transaction) has all it needs to undo.
    """
    union = DirtyBitmap(None, target.granularity, target.size)
    for src in sources:
        src.check(CHECK_ALLOW_RO)
        union.merge_from(src)
    target.check(CHECK_DEFAULT)
    target.merge_from(union)


def remove_bitmap(node: Node, bm: DirtyBitmap) -> None:
    """Drop ``bm`` from ``node`` (and from the image at once when it is persistent)."""
    bm.check(CHECK_BUSY | CHECK_RO)
    if bm.persistent:
        try:
            node.driver.remove_persistent_bitmap(bm.name or "")
        except (OSError, VdkitError) as exc:
            text = exc.message if isinstance(exc, VdkitError) else str(exc)
            raise VdkitError(f"Failed to remove bitmap '{bm.name}' from the image: {text}") from exc
    node.bitmaps.remove(bm)
