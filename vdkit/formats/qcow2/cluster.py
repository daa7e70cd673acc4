"""qcow2 guest→host mapping: L1/L2 tables, entry classification, L2 cache.

The pieces a full I/O engine builds on: decoding L1/L2 entries (standard,
extended with a subcluster bitmap, compressed descriptors), a small
write-back L2 cache whose writes can be ordered after the refcount cache,
guest→host lookup, and growth of the active L1 table (algorithms doc §1.8).
Whole-table decoding is vectorised with numpy because snapshot operations
walk every table of a tree.
"""

from __future__ import annotations

from vdkit.errors import EFBIG, CorruptImageError, VdkitError
from vdkit.formats.qcow2 import layout as L
from vdkit.formats.qcow2.cluster_type import ClusterType
from vdkit.formats.qcow2.overlap import Metadata
from vdkit.io import tables
from vdkit.record import cached_property, record

# typing, collections and dataclasses are not imported at run time: snapshot, check, map and create start
# with this module, and those imports cost more than a small image's whole operation.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from vdkit.formats.qcow2.refcount import Refcounts
    from vdkit.io.file import ImageFile
    from vdkit.io.tables import Backend, Tab

if TYPE_CHECKING:
    from typing import TypeVar

    import numpy as np

    _Entries = TypeVar("_Entries", int, np.ndarray)
    COPIED: np.uint64
    COMPRESSED: np.uint64
    OFFSET_MASK: np.uint64
else:

    class _LazyNumpy:
        """numpy, imported where it is first used: :class:`Geometry` serves readers that need none."""

        def __getattr__(self, name: str) -> object:
            import numpy

            globals()["np"] = numpy
            return getattr(numpy, name)

    np = _LazyNumpy()

_NUMPY_CONSTANTS = {"COPIED": L.OFLAG_COPIED, "COMPRESSED": L.OFLAG_COMPRESSED, "OFFSET_MASK": L.L2E_OFFSET_MASK}


def __getattr__(name: str) -> object:
    """``COPIED``, ``COMPRESSED``, ``OFFSET_MASK`` as numpy scalars, made when first imported."""
    if name in _NUMPY_CONSTANTS:
        value = np.uint64(_NUMPY_CONSTANTS[name])
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _U64(value: int) -> np.uint64:
    return np.uint64(value)


@record(frozen=True)
class Geometry:
    """Cluster arithmetic of one image (no I/O)."""

    cluster_bits: int
    extended_l2: bool = False
    has_data_file: bool = False

    # Cached: the fields never change, and the I/O paths ask for these on every request.
    @cached_property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @cached_property
    def l2_entry_size(self) -> int:
        return 16 if self.extended_l2 else 8

    @cached_property
    def l2_entries(self) -> int:
        return self.cluster_size // self.l2_entry_size

    @cached_property
    def l1_span(self) -> int:
        """Guest bytes one L1 entry describes."""
        return self.cluster_size * self.l2_entries

    def l1_index(self, guest: int) -> int:
        return guest // self.l1_span

    def l2_index(self, guest: int) -> int:
        return (guest >> self.cluster_bits) % self.l2_entries

    # -- compressed descriptors ---------------------------------------------------------------
    @property
    def csize_shift(self) -> int:
        return 62 - (self.cluster_bits - 8)

    def compressed_range(self, entry: _Entries) -> tuple[_Entries, _Entries]:
        """Host byte offset and length of a compressed cluster's stream (the one descriptor decoder).

        ``entry`` is one L2 entry or a numpy ``uint64`` array of them (``check``
        classifies whole tables at once); flag bits above the descriptor are
        ignored.  The stream ends at the end of its last 512-byte sector.
        """
        x = self.csize_shift
        coffset = entry & ((1 << x) - 1)
        nb_sectors = ((entry >> x) & ((1 << (self.cluster_bits - 8)) - 1)) + 1
        return coffset, nb_sectors * 512 - (coffset & 511)

    def classify(self, entry: int, bitmap: int = 0) -> ClusterType:
        """Type of a whole cluster from its L2 entry (subclusters: see :meth:`subcluster_type`)."""
        if entry & L.OFLAG_COMPRESSED:
            return ClusterType.COMPRESSED
        off = entry & L.L2E_OFFSET_MASK
        if self.extended_l2:
            if off or (self.has_data_file and entry & L.OFLAG_COPIED):
                return ClusterType.NORMAL
            if bitmap >> 32 == 0xFFFFFFFF:
                return ClusterType.ZERO_PLAIN
            return ClusterType.UNALLOCATED
        if entry & L.OFLAG_ZERO:
            return ClusterType.ZERO_ALLOC if off else ClusterType.ZERO_PLAIN
        if off or (self.has_data_file and entry & L.OFLAG_COPIED):
            return ClusterType.NORMAL
        return ClusterType.UNALLOCATED

    def subcluster_type(self, entry: int, bitmap: int, sc: int) -> ClusterType:
        """Type of subcluster ``sc`` of an extended-L2 entry."""
        if entry & L.OFLAG_COMPRESSED:
            return ClusterType.COMPRESSED
        alloc = bitmap >> sc & 1
        zero = bitmap >> (32 + sc) & 1
        if alloc and zero:
            raise CorruptImageError("Allocated cluster has corrupted subcluster allocation bitmap")
        if zero:
            return ClusterType.ZERO_ALLOC if entry & L.L2E_OFFSET_MASK else ClusterType.ZERO_PLAIN
        if alloc:
            return ClusterType.NORMAL
        return ClusterType.UNALLOCATED

    # -- whole-table decoding --------------------------------------------------------------------
    def decode_l2(self, raw: bytes, T: Backend | None = None) -> tuple[Tab, Tab]:
        """Entries and bitmaps (zeros without extended L2) of one L2 table, as tables of the backend
        ``T`` (numpy's by default; the snapshot walk of a small image uses lists)."""
        T = T or tables.NUMPY
        words = T.decode_u64(raw)
        if self.extended_l2:
            return T.strided(words, 0, 2), T.strided(words, 1, 2)
        return words, T.zeros(len(words))

    def encode_l2(self, entries: Tab, bitmaps: Tab) -> bytes:
        T = tables.of(entries)
        if self.extended_l2:
            words = T.zeros(len(entries) * 2)
            words[0::2] = entries
            words[1::2] = bitmaps
            return T.encode_u64(words)
        return T.encode_u64(entries)

    def l2_references(self, entries: Tab, *, where: str = "") -> Tab:
        """Host cluster indices an L2 table references (with multiplicity).

        Normal and preallocated-zero clusters count once; a compressed
        cluster counts once for every host cluster its stream touches.  With
        an external data file nothing is refcounted.  Unaligned offsets are
        corruption: we refuse to touch such an image.
        """
        T = tables.of(entries)
        if self.has_data_file:
            return T.indices([])
        entries = T.nonzero_values(entries)  # (mostly a table's entries are 0)
        comp = T.with_flag(entries, L.OFLAG_COMPRESSED, True)
        std = T.with_flag(entries, L.OFLAG_COMPRESSED, False) if len(comp) else entries
        offs = T.masked_nonzero(std, L.L2E_OFFSET_MASK)
        bad = T.first_misaligned(offs, self.cluster_size)
        if bad is not None:
            raise CorruptImageError(
                f"Cluster allocation offset {bad:#x} unaligned{where}", errno=5
            )
        refs = [T.shifted(offs, self.cluster_bits)]
        for e in T.tolist(comp):
            coff, csize = self.compressed_range(e)
            first = coff >> self.cluster_bits
            last = (coff + csize - 1) >> self.cluster_bits
            refs.append(T.arange(first, last + 1))
        return T.concat(refs)

    def l1_tables(self, l1: Tab) -> Tab:
        """L2 table offsets of an L1 (entries with bit 63 etc. masked; 0 = none)."""
        T = tables.of(l1)
        offs = T.masked(l1, L.L1E_OFFSET_MASK)
        bad = T.first_misaligned(offs, self.cluster_size)
        if bad is not None:
            raise CorruptImageError(f"L2 table offset {bad:#x} unaligned", errno=5)
        return offs


def read_l1(file: ImageFile, offset: int, size: int, T: Backend | None = None) -> Tab:
    """An L1 table as a writable table of the backend ``T`` (numpy's ``uint64`` array by default)."""
    T = T or tables.NUMPY
    if size == 0:
        return T.zeros(0)
    return T.decode_u64(file.pread(offset, size * 8))


def encode_l1(l1: Tab) -> bytes:
    return tables.of(l1).encode_u64(l1)


class L2Cache:
    """Decoded L2 tables keyed by host offset, written back in offset order.

    ``depends_on`` runs before any dirty table is written: set it to the
    refcount flush when entries point at freshly counted clusters, so the
    counts are durable first.  ``before_write``, when set, runs before every
    table write: the I/O engine waits there for data writes still in flight
    (their entries are in the tables already, their data must be on disk
    before a table naming it is).
    """

    def __init__(self, file: ImageFile, geom: Geometry, *, cache_bytes: int = 16 * 1024 * 1024,
                 T: Backend | None = None) -> None:
        self.file = file
        self.geom = geom
        self.T = T or tables.NUMPY  # the backend tables are decoded with (lists on small images)
        self._tables: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # least recently used first
        self._dirty: set[int] = set()
        self._capacity = max(8, cache_bytes // geom.cluster_size)
        if self.T is tables.SMALL:  # a full table of Python ints is ~5x numpy's bytes: hold fewer
            self._capacity = min(self._capacity, max(8, tables.NUMPY_MIN_BYTES // geom.cluster_size))
        self.depends_on: Callable[[], None] | None = None
        self.before_write: Callable[[], None] | None = None

    def get(self, offset: int) -> tuple[np.ndarray, np.ndarray]:
        hit = self._tables.get(offset)
        if hit is not None:
            self._tables[offset] = self._tables.pop(offset)  # now the most recently used
            return hit
        if offset % self.geom.cluster_size:
            raise CorruptImageError(f"L2 table offset {offset:#x} unaligned", errno=5)
        tab = self.geom.decode_l2(self.file.pread(offset, self.geom.cluster_size), self.T)
        self._insert(offset, tab)
        return tab

    def peek(self, offset: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The cached table at ``offset`` (None: not cached), without reading or reordering anything."""
        return self._tables.get(offset)

    def put(self, offset: int, entries: np.ndarray, bitmaps: np.ndarray) -> None:
        """Install a new table the file already holds (written before its L1 entry names it), clean as
        a table just read: the changes made to it next mark it dirty.  Left dirty, a table whose write
        succeeded was written again at close, and where the write of the data for it then failed (a
        blkdebug rule failing every write after the first data write), close reported an L2 cache
        flush failure that QEMU, whose new table is clean once written, does not."""
        self._insert(offset, (entries, bitmaps))

    def mark_dirty(self, offset: int) -> None:
        self._dirty.add(offset)

    def discard(self, offset: int) -> None:
        self._tables.pop(offset, None)
        self._dirty.discard(offset)

    def _insert(self, offset: int, tab: tuple[np.ndarray, np.ndarray]) -> None:
        self._tables.pop(offset, None)
        self._tables[offset] = tab
        while len(self._tables) > self._capacity:
            victim = next(iter(self._tables))
            if victim in self._dirty:
                self._write(victim)
            del self._tables[victim]

    def _write(self, offset: int) -> None:
        if self.before_write is not None:
            self.before_write()
        if self.depends_on is not None:
            dep, self.depends_on = self.depends_on, None
            dep()
        self.file.pwrite(offset, self.geom.encode_l2(*self._tables[offset]))
        self._dirty.discard(offset)

    def flush(self) -> None:
        had = bool(self._dirty)
        for off in sorted(self._dirty):
            self._write(off)
        if had:
            self.file.flush()

    def drop(self) -> None:
        self._tables.clear()
        self._dirty.clear()

    def use_backend(self, T: Backend) -> None:
        """Hold the cached tables (dirty ones too, as they are) as ``T``'s tables from now on."""
        if T is not self.T:
            self._tables = {off: (T.convert(e), T.convert(b)) for off, (e, b) in self._tables.items()}
            self.T = T


class ClusterMap:
    """The active L1 table in memory plus lookup and growth through the L2 cache."""

    def __init__(self, file: ImageFile, geom: Geometry, l1_offset: int, l1_size: int,
                 on_l1_switch: Callable[[int, int], None] | None = None, T: Backend | None = None) -> None:
        self.file = file
        self.geom = geom
        self.l1_offset = l1_offset
        # (a list when the driver's l1_backend asks for it: indexing and len() work alike)
        self.l1: np.ndarray = read_l1(file, l1_offset, l1_size, T)
        self.T = T or tables.NUMPY
        self.l2 = L2Cache(file, geom, T=self.T)
        self.on_l1_switch = on_l1_switch  # (offset, size) after the header moved to a new L1

    @property
    def l1_size(self) -> int:
        return len(self.l1)

    def use_backend(self, T: Backend) -> None:
        """Hold the L1 and the cached L2 tables as ``T``'s tables from now on (writers that have no
        list path yet, such as resize, switch a small image's map to numpy first)."""
        if T is not self.T:
            self.l1 = T.convert(self.l1)
            self.l2.use_backend(T)
            self.T = T

    def grow_l1(self, min_size: int, refcounts: Refcounts, *, exact: bool = False) -> None:
        """Grow the active L1 to at least ``min_size`` entries (§1.8), in place style."""
        if min_size <= len(self.l1):
            return
        if exact:
            new_size = min_size
        else:
            new_size = max(len(self.l1), 1)
            while new_size < min_size:
                new_size = (new_size * 3 + 1) // 2
        if new_size > L.MAX_L1_SIZE // 8:
            raise VdkitError("File too large", errno=EFBIG)
        new = self.T.zeros(new_size)
        new[: len(self.l1)] = self.l1
        new_off = refcounts.alloc_clusters(new_size * 8)
        refcounts.flush()
        if refcounts.overlap_check is not None:  # a zero refcount may lie about metadata
            refcounts.overlap_check(new_off, new_size * 8, Metadata.ACTIVE_L1)
        self.file.pwrite(new_off, encode_l1(new))
        self.file.flush()
        self.file.pwrite(36, new_size.to_bytes(4, "big") + new_off.to_bytes(8, "big"))
        self.file.flush()
        old_off, old_size = self.l1_offset, len(self.l1)
        self.l1, self.l1_offset = new, new_off
        if self.on_l1_switch is not None:
            self.on_l1_switch(new_off, new_size)
        if old_size:
            refcounts.release(old_off, old_size * 8)
