"""The qcow2 I/O engine: guest reads, block status and guest writes.

Mapping is separate from copying.  :meth:`Qcow2IO.runs` turns a guest range
into *runs* — maximal stretches of one kind (data, zero, unallocated,
compressed) with contiguous host offsets — and everything else is built on
that one iterator: ``read`` switches on the run kind, ``block_status`` (what
``qemu-img map`` and ``convert`` ask) reports the run at an offset, and
writes consult it to decide between in-place updates and allocation.

Runs are computed one L2 table at a time (one table describes up to
``l1_span`` guest bytes) and cached per table, so a map walk over a large,
sparse image decodes each table once.  The cluster map's tables are numpy
arrays, or plain lists on small writable images (``vdkit.io.tables``: the
driver picks the backend); writes go through the backend's operations, so
one algorithm serves both, and list tables are classified in Python.  Extended-L2 images are expanded to
subcluster granularity (32 per cluster) first; the rules for which subcluster
bit combinations are valid follow the qcow2 specification (format doc §7.3).

References: ``/work/shared/reference/qcow2-format.md`` §6–7,
``qcow2-algorithms.md`` §1 and §9.
"""

from __future__ import annotations

import bisect
import sys
import zlib

from vdkit.block.driver import DATA as _DATA_FLAG
from vdkit.block.driver import OFFSET_VALID as _OFFSET_VALID
from vdkit.block.driver import ZERO as _ZERO_FLAG
from vdkit.block.driver import BlockStatus, CorruptionEvent
from vdkit.errors import EIO, ENOTSUP, UnsupportedError, VdkitError
from vdkit.errors import hexalt as _hx  # C's %#x
from vdkit.formats.qcow2 import layout as L
from vdkit.formats.qcow2.overlap import (
    NAMES,
    NONE,
    Metadata,
    MetadataMap,
    SortedOffsets,
    first_overlap,
    metadata_end,
)
from vdkit.io.file import FileBytes, ImageFile
from vdkit.record import cached_property, record

TYPE_CHECKING = False  # typing, collections and dataclasses are not imported at run time (start-up cost)
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence
    from typing import ClassVar

    import numpy as np

    from vdkit.formats.qcow2.driver import Qcow2Driver
    from vdkit.io.inflight import InFlight, Job
    from vdkit.io.tables import Backend, Tab

    BackingRead = Callable[[int, int], bytes]
    BackingFill = Callable[[int, memoryview], None]  # fills the view with the backing chain's bytes
else:

    class _LazyNumpy:
        """numpy, imported where it is first used.

        Reading a small read-only image (``convert`` from qcow2, ``map``)
        decodes its few L2 tables in Python: importing numpy would cost more
        than the whole decoding (about 50 ms).  Bigger walks and writes to
        big images use numpy; the first attribute access imports it and replaces this
        placeholder.
        """

        def __getattr__(self, name: str) -> object:
            import numpy

            globals()["np"] = numpy
            return getattr(numpy, name)

    np = _LazyNumpy()


def _U64(value: int) -> np.uint64:
    return np.uint64(value)



def _stderr_line(text: str) -> None:
    """Where a non-fatal corruption event goes without a hook: no error carries it, QEMU prints it."""
    import sys

    sys.stderr.write(text + "\n")
    sys.stderr.flush()


# Entry masks as Python ints: combined with uint64 arrays they act as uint64 (they all fit).
_MASK_OFF = L.L2E_OFFSET_MASK
_COMPRESSED = L.OFLAG_COMPRESSED
_COPIED = L.OFLAG_COPIED
_ZERO = L.OFLAG_ZERO
_PURE_TABLES = 16  # L2 tables a read-only image decodes without numpy before numpy takes over
_NO_END = 1 << 64  # Qcow2IO._clean_from when unknown


class Kind(int):
    """What reading a run touches.

    An ``int`` (the engine keeps kinds in byte arrays) with a name, rather than an ``enum.IntEnum``:
    ``enum`` costs several milliseconds of every process that reads qcow2 data.
    """

    __slots__ = ()

    DATA: ClassVar[Kind]  # stored data at ``host`` in the data file (the image itself without an external one)
    ZERO: ClassVar[Kind]  # reads as zeros; ``host`` set for preallocated zero clusters
    UNALLOCATED: ClassVar[Kind]  # falls through to the backing file; ``host`` set in an allocated cluster (ext. L2)
    COMPRESSED: ClassVar[Kind]  # one compressed cluster; ``host`` is the L2 descriptor
    CORRUPT: ClassVar[Kind]  # an entry QEMU calls corrupt; ``host`` is its L2 table (touching it: corruption)

    @property
    def name(self) -> str:
        return _KIND_NAMES[self]

    def __repr__(self) -> str:
        return f"Kind.{self.name}"


_KIND_NAMES = ("DATA", "ZERO", "UNALLOCATED", "COMPRESSED", "CORRUPT")
_KINDS = tuple(Kind(i) for i in range(len(_KIND_NAMES)))  # by value: Run kinds from byte arrays
Kind.DATA, Kind.ZERO, Kind.UNALLOCATED, Kind.COMPRESSED, Kind.CORRUPT = _KINDS


_KIND_FLAGS = {0: _DATA_FLAG, 1: _ZERO_FLAG, 2: 0, 3: _DATA_FLAG, 4: 0}


@record(frozen=True, slots=True)
class Run:
    kind: Kind
    guest: int
    length: int
    host: int | None = None

    @property
    def end(self) -> int:
        return self.guest + self.length

    def clip(self, start: int, end: int) -> Run:
        """The part of this run inside ``[start, end)`` (host offset moved along)."""
        s, e = max(start, self.guest), min(end, self.end)
        host = self.host
        if host is not None and self.kind not in (Kind.COMPRESSED, Kind.CORRUPT):
            host += s - self.guest
        return Run(self.kind, s, e - s, host)


class Qcow2IO:
    """Reads (and, for writable images, writes) of one open qcow2 image."""

    def __init__(self, drv: Qcow2Driver) -> None:
        self.drv = drv
        self.geom = drv.geometry
        self.cluster_bits = self.geom.cluster_bits
        self.cluster_size = self.geom.cluster_size
        self._table_runs: dict[tuple[int, int], tuple[list[Run], list[int]]] = {}  # least recently used first
        self._decompressed: tuple[int, bytes] | None = None  # (descriptor, cluster) of the last one
        # (L2 offset, L2 index) -> corruption message of each bad entry seen (Kind.CORRUPT runs)
        self._bad: dict[tuple[int, int], str] = {}
        # host ranges known to overlap no metadata, valid while _overlap_stamp holds (see _check_overlap)
        self._no_overlap: set[tuple[int, int, Metadata | None]] = set()
        self._overlap_stamp: tuple[object, ...] = ()
        self._clean_from = _NO_END  # while the stamp holds: nothing at or past this offset is metadata
        # the L1 and refcount tables as the overlap test searches them: (table, its content, index)
        self._offset_tables: list[tuple[object, bytes | list[int], SortedOffsets] | None] = [None, None]
        # Read-only images with standard L2 tables map their first tables without numpy (see
        # _LazyNumpy); nothing can be dirty in the metadata caches then, so the file is the truth.
        pure = drv.readonly and not self.geom.extended_l2 and "numpy" not in sys.modules
        self._pure_tables = _PURE_TABLES if pure else 0
        self._pure_l1: tuple[int, ...] | None = None
        # data writes in flight (start_pipeline); the first failed one not yet reported: (error, guest offset);
        # the clusters of failed ones, to give back (host offset, bytes)
        self._pipe: InFlight | None = None
        self._write_failure: tuple[BaseException, int] | None = None
        self._failed_clusters: list[tuple[int, int]] = []

    # -- sources --------------------------------------------------------------------------------
    @property
    def data_file(self) -> ImageFile:
        """Where data clusters live: the external data file, or the image itself."""
        if self.drv.header.has_data_file:
            if self.drv.data_file is None:
                raise VdkitError("Could not read data: the external data file is not open")
            return self.drv.data_file
        return self.drv.file

    @property
    def active_l1(self) -> np.ndarray | tuple[int, ...]:
        """The active L1 table: numpy's (the cluster map's), or entries read directly while decoding without numpy."""
        if self._pure_tables > 0:
            if self._pure_l1 is None:
                import struct

                h = self.drv.header
                raw = self.drv.file.pread(h.l1_table_offset, h.l1_size * 8) if h.l1_size else b""
                self._pure_l1 = struct.unpack(f">{h.l1_size}Q", raw)
            return self._pure_l1
        return self.drv.clusters.l1

    def invalidate(self) -> None:
        """Forget cached runs (after any metadata change)."""
        self._table_runs.clear()

    # -- mapping --------------------------------------------------------------------------------
    def runs(self, offset: int, length: int, l1: np.ndarray | tuple[int, ...] | None = None) -> Iterator[Run]:
        """Runs covering ``[offset, offset+length)`` of the tree rooted at ``l1`` (default: active)."""
        if l1 is None:
            l1 = self.active_l1
        span = self.geom.l1_span
        pos, end = offset, offset + length
        while pos < end:
            i1 = pos // span
            table, starts = self._runs_of_table(l1, i1)
            k = bisect.bisect_right(starts, pos) - 1
            while k < len(table) and pos < end:
                run = table[k]
                if run.guest >= end:
                    break
                r = run if run.guest >= pos and run.guest + run.length <= end else run.clip(pos, end)
                if r.kind == Kind.CORRUPT:
                    # only a request touching the bad entry fails (QEMU checks the entries it maps)
                    assert r.host is not None
                    index = (r.guest - i1 * span) // (span // self.geom.l2_entries)
                    raise self.drv.signal_corruption(self._bad[(r.host, index)])
                yield r
                pos = r.end
                k += 1
            pos = max(pos, min(end, (i1 + 1) * span))

    def run_at(self, offset: int, length: int, l1: np.ndarray | None = None) -> Run:
        """The run starting at ``offset`` (at most ``length`` bytes)."""
        return next(self.runs(offset, length, l1))

    def _runs_of_table(self, l1: np.ndarray | tuple[int, ...], i1: int) -> tuple[list[Run], list[int]]:
        """The runs of one L2 table (cached while the image is read-only) and their start offsets."""
        l1e = int(l1[i1]) if i1 < len(l1) else 0
        key = (i1, l1e)
        # writable images too: every in-place L2 update ends in _finish_update -> invalidate(), and a
        # new/COW'd L2 table changes the L1 entry in the key (NBD 4 KiB reads were 30x slower uncached)
        cacheable = l1 is self.active_l1
        hit = self._table_runs.get(key) if cacheable else None
        if hit is not None:
            self._table_runs[key] = self._table_runs.pop(key)  # now the most recently used
            return hit
        runs = self._compute_table_runs(i1, l1e)
        entry = (runs, [r.guest for r in runs])
        if cacheable:
            self._table_runs[key] = entry
            while len(self._table_runs) > 64:
                del self._table_runs[next(iter(self._table_runs))]
        return entry

    def _compute_table_runs(self, i1: int, l1e: int) -> list[Run]:
        g = self.geom
        span = g.l1_span
        base = i1 * span
        l2_off = l1e & L.L1E_OFFSET_MASK
        if not l2_off:
            return [Run(Kind.UNALLOCATED, base, span)]
        if l2_off % self.cluster_size:
            raise self.drv.signal_corruption(
                f"L2 table offset {_hx(l2_off)} unaligned (L1 index: {_hx(i1)})")
        if self._pure_tables > 0:
            self._pure_tables -= 1
            import struct

            n = self.geom.l2_entries
            return self._list_runs(struct.unpack(f">{n}Q", self.drv.file.pread(l2_off, self.cluster_size)),
                                   l2_off, base)
        entries, bitmaps = self.drv.clusters.l2.get(l2_off)
        return self._entry_runs(entries, bitmaps, l2_off, base)

    def _entry_runs(self, entries: Tab, bitmaps: Tab, l2_off: int, base: int, first: int = 0) -> list[Run]:
        """The runs of L2 entries ``entries`` (from L2 index ``first`` of table ``l2_off``): vectorised
        on numpy's tables, in Python on lists (the table backend of a small writable image)."""
        if isinstance(entries, list):
            if not self.geom.extended_l2:
                return self._list_runs(entries, l2_off, base, first)
            return self._list_runs_extended(entries, bitmaps, l2_off, base, first)
        kinds, hosts, valid, unit = self._classify(entries, bitmaps, l2_off, first)
        return _coalesce(kinds, hosts, valid, unit, base)

    def _list_runs(self, entries: Sequence[int], l2_off: int, base: int, first: int = 0) -> list[Run]:
        """:meth:`_classify` + :func:`_coalesce` for standard L2 entries from index ``first``, in Python
        (same runs, same errors)."""
        g = self.geom
        cs = self.cluster_size
        n = len(entries)
        if n == 0:
            return []
        data_file = g.has_data_file
        out: list[Run] = []
        # the run being built: kind, first unit, host of the next unit (None: not valid), host step
        kind = -1
        start = 0
        nxt: int | None = None
        host0: int | None = None
        host: int | None
        for i, e in enumerate(entries):
            if e & _COMPRESSED:
                k, host, step = Kind.COMPRESSED, e, 0
                if data_file:
                    k, host, step = Kind.CORRUPT, l2_off, 0
                    self._bad[(l2_off, first + i)] = self._compressed_msg(l2_off, first + i)
            else:
                off = e & _MASK_OFF
                has_off = bool(off) or bool(data_file and e & _COPIED)
                if e & _ZERO:
                    k, host, step = Kind.ZERO, (off if has_off else None), cs
                elif has_off:
                    k, host, step = Kind.DATA, off, cs
                else:
                    k, host, step = Kind.UNALLOCATED, None, cs
                if host is not None and off & (cs - 1):
                    k, host, step = Kind.CORRUPT, l2_off, 0
                    self._bad[(l2_off, first + i)] = self._unaligned_msg(off, l2_off, first + i)
            if k == kind and (host is None) == (nxt is None) and (host is None or host == nxt):
                if host is not None:
                    nxt = host + step
                continue
            if kind >= 0:
                out.append(Run(_KINDS[kind], base + start * cs, (i - start) * cs, host0))
            kind, start, host0 = k, i, host
            nxt = None if host is None else host + step
        out.append(Run(_KINDS[kind], base + start * cs, (n - start) * cs, host0))
        return out

    def _list_runs_extended(self, entries: Sequence[int], bitmaps: Sequence[int], l2_off: int, base: int,
                            first: int = 0) -> list[Run]:
        """:meth:`_classify` + :func:`_coalesce` for extended L2 entries from index ``first``, in Python
        (same runs, same errors, reported in the same order).  A cluster's 32 subclusters are taken as
        stretches of one kind (most often one stretch: all data, all zero or all unallocated), never
        one by one; the stretches then merge into runs by :func:`_coalesce`'s rule."""
        if not entries:
            return []
        cs = self.cluster_size
        scs = cs // 32
        data_file = self.geom.has_data_file
        full = 0xFFFFFFFF
        bad_comp: list[int] = []
        invalid: list[int] = []
        unaligned: list[int] = []
        # (kind, host valid, first unit's host, units) per stretch, in order
        stretches: list[tuple[int, bool, int, int]] = []
        add = stretches.append
        for i, (e, b) in enumerate(zip(entries, bitmaps, strict=True)):
            if not e and not b:
                add((Kind.UNALLOCATED, False, 0, 32))
                continue
            off = e & _MASK_OFF
            has_off = bool(off) or bool(data_file and e & _COPIED)
            if e & _COMPRESSED:
                if data_file:
                    bad_comp.append(i)
                    add((Kind.CORRUPT, True, l2_off, 32))
                else:
                    add((Kind.COMPRESSED, True, e, 32))
                continue
            alloc, zero = b & full, b >> 32
            if (has_off and alloc & zero) or (not has_off and alloc):
                invalid.append(i)
                add((Kind.CORRUPT, True, l2_off, 32))
                continue
            if has_off and off & (cs - 1):
                unaligned.append(i)
                add((Kind.CORRUPT, True, l2_off, 32))
                continue
            if zero == full or not zero and alloc in (0, full):
                add((Kind.ZERO if zero else Kind.DATA if alloc else Kind.UNALLOCATED, has_off, off, 32))
                continue
            k0: int = -1
            s0 = 0
            for sc in range(32):  # (a mixed bitmap: its stretches of one kind)
                sk = Kind.ZERO if zero >> sc & 1 else Kind.DATA if alloc >> sc & 1 else Kind.UNALLOCATED
                if sk != k0:
                    if k0 >= 0:
                        add((k0, has_off, off + s0 * scs, sc - s0))
                    k0, s0 = sk, sc
            add((k0, has_off, off + s0 * scs, 32 - s0))
        for i in bad_comp:
            self._bad[(l2_off, first + i)] = self._compressed_msg(l2_off, first + i)
        for i in invalid:
            self._bad[(l2_off, first + i)] = (
                f"Invalid cluster entry found  (L2 offset: {_hx(l2_off)}, L2 index: {_hx(first + i)})")
        for i in unaligned:
            self._bad[(l2_off, first + i)] = self._unaligned_msg(entries[i] & _MASK_OFF, l2_off, first + i)
        out: list[Run] = []
        kind: int = -1
        valid, start, unit, host0, nxt = False, 0, 0, 0, 0
        for k, v, h, count in stretches:
            step = 0 if k in (Kind.COMPRESSED, Kind.CORRUPT) else scs
            if k != kind or v != valid or (v and h != nxt):
                if kind >= 0:
                    out.append(Run(_KINDS[kind], base + start * scs, (unit - start) * scs, host0 if valid else None))
                kind, valid, start, host0 = k, v, unit, h
            nxt = h + count * step
            unit += count
        out.append(Run(_KINDS[kind], base + start * scs, (unit - start) * scs, host0 if valid else None))
        return out

    @staticmethod
    def _compressed_msg(l2_off: int, i: int) -> str:
        return (f"Compressed cluster entry found in image with external data file "
                f"(L2 offset: {_hx(l2_off)}, L2 index: {_hx(i)})")

    @staticmethod
    def _unaligned_msg(off: int, l2_off: int, i: int) -> str:
        return f"Cluster allocation offset {_hx(off)} unaligned (L2 offset: {_hx(l2_off)}, L2 index: {_hx(i)})"

    def _classify(
        self, e: np.ndarray, b: np.ndarray, l2_off: int, first: int = 0
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """Per-unit kind, host offset and host-valid flag (unit = cluster or subcluster).

        ``e`` and ``b`` are the entries and bitmaps from L2 index ``first`` on (a
        whole table, or the part a write changed: :meth:`_patch_table_runs`).
        """
        g = self.geom
        cs = self.cluster_size
        comp = (e & _COMPRESSED) != 0
        off = e & _MASK_OFF
        has_off = off != 0
        bad_comp = np.zeros(len(e), dtype=bool)
        if g.has_data_file:
            has_off = has_off | ((e & _COPIED) != 0)
            bad_comp = comp
            for i in np.flatnonzero(comp).tolist():
                self._bad[(l2_off, first + i)] = self._compressed_msg(l2_off, first + i)
        std = ~comp
        if not g.extended_l2:
            zero = std & ((e & _ZERO) != 0)
            normal = std & ~zero & has_off
            bad = (normal | (zero & has_off)) & ((off & _U64(cs - 1)) != 0)
            for i in np.flatnonzero(bad).tolist():
                self._bad[(l2_off, first + i)] = self._unaligned_msg(int(off[i]), l2_off, first + i)
            bad |= bad_comp
            kinds = np.full(len(e), Kind.UNALLOCATED, dtype=np.uint8)
            kinds[normal] = Kind.DATA
            kinds[zero] = Kind.ZERO
            kinds[comp] = Kind.COMPRESSED
            kinds[bad] = Kind.CORRUPT
            valid = (normal | (zero & has_off) | comp) & ~bad
            hosts = np.where(comp, e, off)
            hosts[bad] = _U64(l2_off)
            return kinds, hosts, valid | bad, cs
        # extended L2: 32 subclusters per cluster
        scs = cs // 32
        normal_c = std & has_off
        alloc_bits = b & _U64(0xFFFFFFFF)
        zero_bits = b >> _U64(32)
        invalid = (normal_c & ((alloc_bits & zero_bits) != 0)) | (std & ~has_off & (alloc_bits != 0))
        for i in np.flatnonzero(invalid).tolist():
            self._bad[(l2_off, first + i)] = (
                f"Invalid cluster entry found  (L2 offset: {_hx(l2_off)}, L2 index: {_hx(first + i)})")
        unaligned = normal_c & ((off & _U64(cs - 1)) != 0) & ~invalid
        for i in np.flatnonzero(unaligned).tolist():
            self._bad[(l2_off, first + i)] = self._unaligned_msg(int(off[i]), l2_off, first + i)
        bad = invalid | unaligned | bad_comp
        shifts = np.arange(32, dtype=np.uint64)
        sc_alloc = ((alloc_bits[:, None] >> shifts) & _U64(1)) != 0
        sc_zero = ((zero_bits[:, None] >> shifts) & _U64(1)) != 0
        n = len(e)
        kinds = np.full((n, 32), Kind.UNALLOCATED, dtype=np.uint8)
        kinds[sc_alloc] = Kind.DATA
        kinds[sc_zero] = Kind.ZERO
        kinds[comp, :] = Kind.COMPRESSED
        kinds[bad, :] = Kind.CORRUPT
        sc_off = off[:, None] + shifts * _U64(scs)
        hosts = np.where(comp[:, None], e[:, None], sc_off)
        hosts[bad, :] = _U64(l2_off)
        valid = np.broadcast_to((normal_c | comp | bad)[:, None], (n, 32))
        return kinds.ravel(), hosts.ravel(), valid.ravel(), scs

    # -- block status ---------------------------------------------------------------------------
    def block_status(self, offset: int, length: int) -> tuple[Kind, int, int | None, bool]:
        """Kind, length, host offset (None when not directly readable) and "reads as zero" at ``offset``.

        The last item is only ever true for data clusters of an image that
        looks metadata-preallocated (see :attr:`metadata_preallocation`):
        QEMU then asks the file whether the cluster's host range is a hole.
        """
        size = self.drv.virtual_size
        r = self.run_at(offset, min(length, size - offset))
        host = r.host
        if r.kind == Kind.COMPRESSED or self.drv.encrypted:
            host = None
        n = r.length
        zero = False
        if r.kind == Kind.DATA and host is not None and self.metadata_preallocation:
            n, zero = self._file_zero(host, n)
        return r.kind, n, host, zero

    def status(self, offset: int, length: int) -> BlockStatus:
        """:meth:`block_status` as the generic layer's :class:`~vdkit.block.io.BlockStatus`."""
        kind, n, host, file_zero = self.block_status(offset, length)
        flags = _KIND_FLAGS[kind] | (_ZERO_FLAG if file_zero else 0)
        if host is None:
            return BlockStatus(flags, n)
        return BlockStatus(flags | _OFFSET_VALID, n, host, self.data_file.filename)

    def status_runs(self, offset: int, end: int) -> Iterator[BlockStatus]:
        """:meth:`status` of every run in ``[offset, end)``, straight from the cached table runs.

        The same answers as asking :meth:`status` at each run's start (``map``'s
        walk did that: ten calls and five objects per run, most of a 1 TiB map's
        time), a data run of a metadata-preallocated image split where the file's
        holes are.
        """
        end = min(end, self.drv.virtual_size)
        if offset >= end:
            return
        if self._pure_tables > 0:
            self._choose_decoder(offset // self.geom.l1_span, (end - 1) // self.geom.l1_span)
        no_host = self.drv.encrypted
        fname: str | None = None
        for r in self.runs(offset, end - offset):
            kind, host = r.kind, r.host
            if host is None or no_host or kind == Kind.COMPRESSED:
                yield BlockStatus(_KIND_FLAGS[kind], r.length)
                continue
            if fname is None:
                fname = self.data_file.filename
            flags = _KIND_FLAGS[kind] | _OFFSET_VALID
            if kind == Kind.DATA and self.metadata_preallocation:
                left = r.length
                while left > 0:
                    n, zero = self._file_zero(host, left)
                    yield BlockStatus(flags | (_ZERO_FLAG if zero else 0), n, host, fname)
                    host += n
                    left -= n
                continue
            yield BlockStatus(flags, r.length, host, fname)

    def _choose_decoder(self, first: int, last: int) -> None:
        """Decode with numpy from the start when a walk will meet more L2 tables than the Python
        decoder takes: importing numpy costs about what a dozen tables decoded in Python do, so a
        large walk (a 1 TiB map: 2048 tables) should not first decode its first tables slowly."""
        l1 = self.active_l1
        mask = L.L1E_OFFSET_MASK
        tables = 0
        for i in range(first, min(last + 1, len(l1))):
            if l1[i] & mask:
                tables += 1
                if tables > self._pure_tables:
                    self._pure_tables = 0
                    return

    def _file_zero(self, host: int, n: int) -> tuple[int, bool]:
        """Is the data file a hole at ``host``?  Returns the (possibly shortened) length and the answer."""
        from vdkit.io import ZERO

        f = self.data_file
        total = (f.size() + 511) // 512 * 512
        if host >= total:
            return n, True
        st = f.block_status(host, min(n, total - host))
        if host + st.length == total and st.flags & ZERO:
            return n, True
        return st.length, bool(st.flags & ZERO)

    @cached_property
    def metadata_preallocation(self) -> bool:
        """QEMU's guess that the image was created with ``preallocation=metadata``.

        True when clearly more clusters are in use (non-zero refcount) than
        the file has blocks allocated: then data clusters may be holes, and
        block status checks the file for each of them.  Reproduced because it
        changes what ``map`` prints.  A refcount that cannot be read makes
        the guess "no", as in QEMU, rather than failing the caller.
        """
        try:
            return self._detect_metadata_preallocation()
        except (OSError, VdkitError):
            return False

    def _detect_metadata_preallocation(self) -> bool:
        f = self.drv.file
        cs = self.cluster_size
        file_length = (f.size() + 511) // 512 * 512
        real_clusters = f.allocated_size() // cs
        threshold = max(real_clusters * 10 // 9, real_clusters + 2)
        end_cluster = (file_length + cs - 1) // cs
        pure = self._pure_preallocation(end_cluster, threshold)
        if pure is not None:
            return pure
        rc = self.drv.refcounts
        epb = rc.entries_per_block
        count = 0
        for rt in range((end_cluster + epb - 1) // epb):
            vals = rc.block_values(rt)
            if vals is None:
                continue
            lim = min(epb, end_cluster - rt * epb)
            count += rc.T.count_nonzero(vals, 0, lim)
            if count >= threshold:
                return True
        return count >= threshold

    def _pure_preallocation(self, end_cluster: int, threshold: int) -> bool | None:
        """:attr:`metadata_preallocation` without numpy for a few 16-bit refcount blocks (None: not here).

        Anything unusual (other widths, many blocks, a bad table entry) goes
        to the refcount cache, which raises the errors QEMU reports.
        """
        import struct

        h = self.drv.header
        cs = self.cluster_size
        epb = cs // 2
        nblocks = (end_cluster + epb - 1) // epb
        if self._pure_tables <= 0 or h.refcount_order != 4 or nblocks > 64:
            return None
        f = self.drv.file
        n = min(nblocks, h.refcount_table_clusters * cs // 8)
        table = struct.unpack(f">{n}Q", f.pread(h.refcount_table_offset, n * 8)) if n else ()
        count = 0
        for rt, entry in enumerate(table):
            off = entry & L.REFT_OFFSET_MASK
            if entry & L.REFT_RESERVED_MASK or off % cs:
                return None
            if not off:
                continue
            lim = min(epb, end_cluster - rt * epb)
            block = f.pread(off, 2 * lim)
            # an entry is zero when both its bytes are: OR the high and low bytes, count zero bytes
            ored = int.from_bytes(block[0::2], "big") | int.from_bytes(block[1::2], "big")
            count += lim - ored.to_bytes(lim, "big").count(0)
            if count >= threshold:
                return True
        return count >= threshold

    # -- reading --------------------------------------------------------------------------------
    def read(self, offset: int, length: int, backing: BackingRead | None = None,
             l1: np.ndarray | None = None) -> bytes:
        """Guest bytes ``[offset, offset+length)``; unallocated parts come from ``backing`` (or zeros)."""
        out = bytearray(length)
        fill: BackingFill | None = None
        if backing is not None:
            def fill(guest: int, view: memoryview) -> None:
                view[:] = backing(guest, len(view))
        self.readinto(offset, memoryview(out), fill, l1)
        return bytes(out)

    def _read_fresh(self, offset: int, length: int, backing: BackingRead | None) -> bytes:
        """:meth:`read` of a range that no data write in flight touches (see :meth:`_readinto`)."""
        out = bytearray(length)
        fill: BackingFill | None = None
        if backing is not None:
            def fill(guest: int, view: memoryview) -> None:
                view[:] = backing(guest, len(view))
        self._readinto(offset, memoryview(out), fill)
        return bytes(out)

    def readinto(self, offset: int, view: memoryview, backing: BackingFill | None = None,
                 l1: np.ndarray | None = None) -> None:
        """Fill ``view`` with the guest bytes at ``offset`` (the buffer is reused by bulk copies).

        Unallocated parts are filled by ``backing(guest, view)``, or zeroed.
        Data runs are read from the host file directly into ``view``.
        """
        if self._pipe is not None and self._pipe.busy:
            self.settle()  # the data of a run may still be on its way to the file
        self._readinto(offset, view, backing, l1)

    def _readinto(self, offset: int, view: memoryview, backing: BackingFill | None = None,
                  l1: np.ndarray | None = None) -> None:
        """:meth:`readinto` with data writes possibly in flight: only for ranges none of them touches (a
        new cluster's head or tail around a write, which fresh L2 entries say is unallocated)."""
        from vdkit.io.file import zero_fill

        if self.drv.encrypted:
            raise UnsupportedError("Reading encrypted qcow2 images is not supported by vdkit")
        for r in self.runs(offset, len(view), l1):
            at = r.guest - offset
            part = view[at : at + r.length]
            if r.kind == Kind.DATA:
                assert r.host is not None
                self.data_file.readinto(r.host, part)
            elif r.kind == Kind.UNALLOCATED and backing is not None:
                backing(r.guest, part)
            elif r.kind == Kind.COMPRESSED:
                assert r.host is not None
                cluster = self.decompress(r.host)
                within = r.guest & (self.cluster_size - 1)
                part[:] = cluster[within : within + r.length]
            else:
                zero_fill(part)

    def decompress(self, descriptor: int) -> bytes:
        """The full guest cluster stored by a compressed L2 entry."""
        if self._decompressed is not None and self._decompressed[0] == descriptor:
            return self._decompressed[1]
        coff, csize = self.geom.compressed_range(descriptor)
        raw = self.drv.file.pread(coff, csize)
        data = decompress_cluster(raw, self.cluster_size, self.drv.header.compression_type)
        self._decompressed = (descriptor, data)
        return data


    # -- writing ------------------------------------------------------------------------------
    #
    # Order of durable effects for every allocating write (algorithms §1.4, §9):
    #   data → refcount increments → L2 entries → (flush) → refcount decrements.
    # The L2 cache's ``depends_on`` hook flushes the refcount cache before any
    # L2 table is written back; freed clusters are only decremented after the
    # L2 tables that dropped them are on disk.  A new L2 table and its count are
    # written and synced (one sync) before the L1 entry that points at it.

    # Data writes in flight (start_pipeline).  A write into clusters whose L2 entries are all empty (what
    # convert writes: a fresh image, in guest order) allocates and sets its entries in memory at once, as
    # today, but hands the data to a few threads instead of waiting for it (the system calls drop the
    # GIL, so two or three writes overlap, as qemu-img's coroutines do).  What the file sees keeps the
    # order above: every L2 table write first waits for all data in flight (L2Cache.before_write), so no
    # table on disk names a cluster whose data has not been written; counts still go before the tables.
    # A failed data write's entries are emptied again before any table goes out, its clusters are given
    # back (as QEMU aborts a failed allocation; later, outside the table write that found the failure) and
    # the failure is kept for the writer (write_failure, flush).
    # Everything else (in-place writes, copy-on-write of old clusters, zeroes, discards, reads) first
    # waits for the writes in flight, so it never overtakes or reads around one.

    def start_pipeline(self, threads: int = 3, max_bytes: int = 8 << 20) -> None:
        """Let allocating writes into empty clusters return before their data is written (see above).

        The caller must keep each write's buffer unchanged until :meth:`after_writes` says it is done,
        and end with :meth:`stop_pipeline` (which waits).  ``max_bytes`` bounds the data in flight.
        """
        from vdkit.io.inflight import InFlight

        # only a local file takes positional writes from several threads (an NBD or RBD file is one
        # connection with its own request order; their writes stay synchronous here)
        f = self.drv.data_file if self.drv.header.has_data_file else self.drv.file
        if self._pipe is None and type(f) is ImageFile:
            self._pipe = InFlight(threads, max_bytes)

    @property
    def pipelined(self) -> bool:
        """Whether allocating writes return before their data is written (:meth:`start_pipeline`)."""
        return self._pipe is not None

    def stop_pipeline(self) -> None:
        """Wait for the writes in flight and go back to synchronous writes (a failure stays pending)."""
        pipe = self._pipe
        if pipe is None:
            return
        self._settle_failed(pipe.close())
        self._release_failed()
        self._pipe = None
        if "clusters" in self.drv.__dict__ and self.drv.clusters.l2.before_write == self.settle:
            self.drv.clusters.l2.before_write = None

    def after_writes(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` once every data write submitted so far is done (at once without any in flight;
        else from a writer thread: ``fn`` must be thread-safe)."""
        if self._pipe is None:
            fn()
        else:
            self._pipe.after(fn)

    def settle(self) -> None:
        """Wait for the data writes in flight; empty the L2 entries of any that failed."""
        if self._pipe is not None:
            self._settle_failed(self._pipe.wait())

    def _settle_failed(self, failed: list[Job]) -> None:
        if not failed:
            return
        cm = self.drv.clusters
        for job in failed:
            token: tuple[int, int, int, int] = job.token  # type: ignore[assignment]  # (_submit_segments')
            l2_off, first, count, guest = token
            tab = cm.l2.peek(l2_off)
            if tab is not None:  # (a table holding entries in flight is never written, so never evicted)
                entries = tab[0]
                for i in range(first, first + count):
                    entries[i] = 0  # they were empty (the write was into fresh entries): unallocated again
            if not self.geom.has_data_file:
                self._failed_clusters.append((job.offset - job.offset % self.cluster_size, count * self.cluster_size))
            if self._write_failure is None:
                assert job.error is not None
                self._write_failure = (job.error, guest)
        self.invalidate()

    def _release_failed(self) -> None:
        """Give back the clusters of failed writes (no table on disk names them; a count that cannot go
        down stays: a leak, as when QEMU's free fails)."""
        while self._failed_clusters:
            host, length = self._failed_clusters.pop()
            try:
                self.drv.refcounts.update(host, length, -1)
            except (VdkitError, OSError):
                pass

    def write_failure(self) -> tuple[BaseException, int] | None:
        """The first data write in flight that failed and was not reported yet: (error, guest offset).
        Taking it reports it."""
        pipe = self._pipe
        if pipe is not None and pipe.failed:
            self.settle()
        self._release_failed()
        failure, self._write_failure = self._write_failure, None
        return failure

    def _settle_if_busy(self) -> None:
        if self._pipe is not None and self._pipe.busy:
            self.settle()

    def _wait_hosts(self, hosts: list[int]) -> bool:
        """Wait for the data writes in flight into the clusters at ``hosts`` (a write in place must land
        after them); False when some write in flight failed (all were waited for and its entries
        emptied: the caller looks at its entries again)."""
        pipe = self._pipe
        if pipe is None or not pipe.busy:
            return True
        cs = self.cluster_size
        pipe.wait_for([(h, h + cs) for h in hosts])
        if pipe.failed:
            self.settle()
            return False
        return True

    def _submit_segments(self, segments: list[tuple[int, bytes | memoryview | FileBytes]],
                         token: tuple[int, int, int, int]) -> None:
        """:meth:`_write_segments` in the writer threads (the overlap checks here, first)."""
        assert self._pipe is not None
        l2 = self.drv.clusters.l2
        if l2.before_write is None:
            l2.before_write = self.settle  # (set here: the cluster map may be made, or made again, later)
        f = self.data_file
        for off, length, parts in _coalesced(segments):
            self._check_overlap(off, length)
            self._pipe.submit(f.write_parts, off, parts, token)

    def _writable(self) -> None:
        if self.drv.readonly:
            raise VdkitError("Block node is read-only")
        if self.drv.encrypted:
            raise UnsupportedError("Writing encrypted qcow2 images is not supported by vdkit")

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.drv.virtual_size:
            raise VdkitError(f"Request beyond the end of the image (offset {offset}, length {length})",
                             errno=EIO)

    def _l2_for_write(self, i1: int) -> int:
        """Host offset of a writable (refcount 1) L2 table for L1 index ``i1``, copying or creating it."""
        cm = self.drv.clusters
        rc = self.drv.refcounts
        if i1 >= len(cm.l1):
            self._before_decrement()
            cm.grow_l1(i1 + 1, rc)
        l1e = int(cm.l1[i1])
        old = l1e & L.L1E_OFFSET_MASK
        if old % self.cluster_size:
            raise self.drv.signal_corruption(f"L2 table offset {_hx(old)} unaligned (L1 index: {_hx(i1)})")
        if old and l1e & L.OFLAG_COPIED:
            # updated in place: the table must not be some other metadata (QEMU refuses its write-back)
            self._check_overlap(old, self.cluster_size, ignore=Metadata.ACTIVE_L2)
            return old
        new = rc.alloc_clusters(self.cluster_size)
        # the new count is written now and made durable by the sync after the table's write below: both
        # must be on disk before the L1 entry names the table, and one sync orders both (it was two)
        rc.write_back()
        if new == 0:  # cluster 0 had a zero refcount: the header (QEMU's own test, before the overlap check)
            raise self.drv.signal_corruption("Preventing invalid allocation of L2 table at offset 0")
        T = cm.T
        if old:
            e, b = cm.l2.get(old)
            e, b = T.copy(e), T.copy(b)
        else:
            n = self.geom.l2_entries
            e, b = T.zeros(n), T.zeros(n)
        f = self.drv.file
        # a zero refcount may lie: the new table must not land on other metadata (QEMU's overlap
        # check on the L2 table write names what it would have destroyed)
        self._check_overlap(new, self.cluster_size, ignore=Metadata.ACTIVE_L2)
        f.pwrite(new, self.geom.encode_l2(e, b))
        f.flush()  # the count and the table, before the L1 entry
        cm.l2.put(new, e, b)
        cm.l1[i1] = new | L.OFLAG_COPIED
        self._clean_from = _NO_END  # (a new table in place: the overlap test's end must be found again)
        self._check_overlap(cm.l1_offset + i1 * 8, 8, ignore=Metadata.ACTIVE_L1)
        f.pwrite(cm.l1_offset + i1 * 8, (new | L.OFLAG_COPIED).to_bytes(8, "big"))
        f.flush()
        if old:
            self._before_decrement()
            rc.release(old, self.cluster_size)
            if rc.get(old >> self.cluster_bits) == 0:
                cm.l2.discard(old)
        return new

    # Write ordering between the two metadata caches.  The refcount cache may
    # have to wait for the L2 cache (pending decrements: a cluster is only
    # freed on disk after no L2 table references it) or the L2 cache for the
    # refcount cache (new references: counts first).  Both at once would be a
    # cycle in which one side gets written too early, so before creating one
    # dependency the other is resolved by flushing (as QEMU's caches do).

    def _before_new_references(self) -> None:
        """Call before L2 entries start pointing at freshly counted clusters.

        On a lazy-refcount image this is where QEMU sets the dirty bit (its
        refcounts may then lag behind the tables until a clean close).  Ours
        never lag, but a reader of the header sees the state QEMU leaves, and
        a crash leaves an image QEMU repairs on open, as after its own crash.
        """
        h = self.drv.header
        if h.lazy_refcounts and not h.dirty:
            self.drv.mark_dirty()
        rc = self.drv.refcounts
        if rc.depends_on is not None:
            self.drv.clusters.l2.flush()
            rc.depends_on = None

    def _before_decrement(self) -> None:
        """Call before dropping references (the L2 tables that dropped them must be durable first)."""
        l2 = self.drv.clusters.l2
        if l2.depends_on is not None:
            l2.flush()

    def _free_entry(self, entry: int, *, discard: bool = False) -> None:
        """Drop the reference an L2 entry held (§1.7); nothing is refcounted in a data file.

        ``discard`` (guest discard / zero-with-unmap requests) also punches
        clusters that became free out of the image file, as QEMU does when
        the image is opened with unmap enabled (qemu-img's default).
        """
        rc = self.drv.refcounts
        if entry & L.OFLAG_COMPRESSED:
            off, length = self.geom.compressed_range(entry)
        elif self.geom.has_data_file:
            return
        else:
            off, length = entry & L.L2E_OFFSET_MASK, self.cluster_size
            if not off:
                return
            if off % self.cluster_size:  # QEMU reports it (non-fatal) and frees nothing: a leak, not worse
                self.drv.signal_corruption(f"Cannot free unaligned cluster {_hx(off)}", fatal=False,
                                           fallback=_stderr_line)
                return
        if rc.release(off, length) and discard:
            cb = self.cluster_bits
            for ci in rc.last_zeroed:  # (not a re-read count: a freed refcount block left the cache)
                self.drv.file.punch_hole(ci << cb, self.cluster_size, extend=False)

    def _finish_update(self, l2_off: int, allocated: bool, to_free: list[int], *, discard: bool = False,
                       changed: tuple[int, int, int] | None = None) -> None:
        """After L2 entries changed: the table is dirty, its new references wait for their counts, and
        what it no longer references is freed once it is written.  ``changed`` is ``(L1 index, first
        L2 index, end)`` of the entries changed (only these runs are recomputed), None: anything."""
        cm = self.drv.clusters
        cm.l2.mark_dirty(l2_off)
        if allocated:
            cm.l2.depends_on = self.drv.refcounts.flush
        if to_free:
            cm.l2.flush()
            self._before_decrement()
            for entry in to_free:
                self._free_entry(entry, discard=discard)
        if changed is None:
            self.invalidate()
        else:
            self._patch_table_runs(l2_off, *changed)

    def _patch_table_runs(self, l2_off: int, i1: int, first: int, end: int) -> None:
        """Update the cached runs of table ``i1`` where entries ``[first, end)`` changed.

        Rebuilding a table's runs after every write (a decode of the whole table
        and a :class:`Run` for each of its stretches) cost a stream or a small
        NBD writer far more than the write; the runs of the changed entries are
        classified alone and spliced in, merged with their neighbours by the
        rule :func:`_coalesce` applies, so the list is what a rebuild gives.
        Other cached runs of this L1 index (an older L2 table) are dropped: an
        offset freed now may name another table later.
        """
        cm = self.drv.clusters
        l1e = int(cm.l1[i1])
        key = (i1, l1e)
        cached = self._table_runs.get(key)
        for k in [k for k in self._table_runs if k[0] == i1 and k != key]:
            del self._table_runs[k]
        if cached is None or end <= first:
            return
        runs, starts = cached
        cs = self.cluster_size
        lo = i1 * self.geom.l1_span + first * cs
        hi = lo + (end - first) * cs
        entries, bitmaps = cm.l2.get(l2_off)
        mid = self._entry_runs(entries[first:end], bitmaps[first:end], l2_off, lo, first)
        k0 = bisect.bisect_right(starts, lo) - 1
        k1 = bisect.bisect_right(starts, hi - 1) - 1
        head = runs[k0].clip(runs[k0].guest, lo) if runs[k0].guest < lo else None
        tail = runs[k1].clip(hi, runs[k1].end) if runs[k1].end > hi else None
        if head is not None:
            mid = _merge_front(head, mid)
        if tail is not None:
            mid = _merge_back(mid, tail)
        new_runs = [*runs[:k0], *mid, *runs[k1 + 1 :]]
        new_starts = [*starts[:k0], *(r.guest for r in mid), *starts[k1 + 1 :]]
        # neighbours outside the changed clusters that now continue the first or last new run
        j = k0 + len(mid) - 1
        if j + 1 < len(new_runs) and _continues(new_runs[j], new_runs[j + 1]):
            new_runs[j : j + 2] = [_joined(new_runs[j], new_runs[j + 1])]
            del new_starts[j + 1]
        if k0 > 0 and _continues(new_runs[k0 - 1], new_runs[k0]):
            new_runs[k0 - 1 : k0 + 1] = [_joined(new_runs[k0 - 1], new_runs[k0])]
            del new_starts[k0]
        self._table_runs[key] = (new_runs, new_starts)

    def _alloc_data(self, guest: int, nb: int) -> int:
        """Host offset of ``nb`` new contiguous clusters for guest offset ``guest``."""
        if self.geom.has_data_file:
            return guest - guest % self.cluster_size
        return self.drv.refcounts.alloc_clusters(nb * self.cluster_size)

    def write(self, offset: int, data: bytes, backing: BackingRead | None = None, *,
              source: tuple[int, int] | None = None) -> None:
        """Guest write: in place where the cluster is exclusively ours, else allocate with copy-on-write.

        ``source``: ``data`` are also the bytes at ``(fd, offset)`` of another local file (a mapped
        piece of ``convert``'s source): whole new clusters are then copied file to file by the
        kernel where the file system shares extents (:class:`FileBytes`), the rest is written from ``data``.
        """
        self._writable()
        self._check_range(offset, len(data))
        if self._write_owned_cluster(offset, data):
            return
        span = self.geom.l1_span
        pos, end = offset, offset + len(data)
        view = memoryview(data)
        if source is not None and type(self.data_file) is not ImageFile:
            source = None  # (only a plain local file takes a copy from another)
        try:
            while pos < end:
                i1 = pos // span
                t_end = min(end, (i1 + 1) * span)
                part = None if source is None else (source[0], source[1] + pos - offset)
                self._write_table(i1, pos, view[pos - offset : t_end - offset], backing, part)
                pos = t_end
        except CorruptionEvent:
            self._keep_completed()
            raise

    def _abort_alloc(self, host: int, run: int) -> None:
        """A data write its overlap check refused, or that failed, gives back the clusters allocated
        for it (QEMU's abort of the allocation): :meth:`_keep_completed` keeps only what completed,
        and a failed write leaks nothing."""
        if not self.geom.has_data_file:
            try:
                self.drv.refcounts.update(host, run * self.cluster_size, -1)
            except VdkitError:
                pass  # (a count that cannot go down stays: a leak, as when QEMU's free fails)

    def _keep_completed(self) -> None:
        """After a fatal corruption event in a write: what earlier writes did stays in the image.

        QEMU writes back the tables and counts of the writes that completed (the failed one's
        clusters are freed, and freeing waits for the L2 tables to be written); dropping them would
        leave their new clusters leaked.  The failed write changed no L2 entry (they are set once
        the data is written) and gave its clusters back (:meth:`_abort_alloc`), so what goes out
        passed the overlap checks when it was made.
        """
        self.invalidate()  # (the failed write may have changed entries of its table before failing)
        drv = self.drv
        if not drv.dead:
            return
        try:
            drv.refcounts.flush()
            drv.clusters.l2.flush()
        except (VdkitError, OSError):
            pass  # the node is dead either way

    def _write_owned_cluster(self, offset: int, data: bytes) -> bool:
        """The common small write (NBD's 4 KiB): inside one data cluster we own, standard L2.

        Nothing but the data changes, so :meth:`_write_inplace` does it
        without the table-level machinery, which costs several times the
        write itself.  False: take the general path.
        """
        g = self.geom
        cs = self.cluster_size
        n = len(data)
        if not n or offset % cs + n > cs or g.extended_l2 or g.has_data_file:
            return False
        cm = self.drv.clusters
        i1 = offset // g.l1_span
        if i1 >= len(cm.l1):
            return False
        l1e = int(cm.l1[i1])
        l2_off = l1e & L.L1E_OFFSET_MASK
        if not l1e & L.OFLAG_COPIED or not l2_off or l2_off % cs:
            return False
        entries, bitmaps = cm.l2.get(l2_off)
        e = int(entries[g.l2_index(offset)])
        if not e & _COPIED or e & (_COMPRESSED | _ZERO) or not e & _MASK_OFF:
            return False
        # (the cluster's data may be in flight: this write must land after it)
        if not self._wait_hosts([e & _MASK_OFF]) and not int(entries[g.l2_index(offset)]):
            return False  # that write failed: its entry is empty again
        self._write_inplace(offset // cs, entries, bitmaps, offset, offset + n, memoryview(data), None)
        return True

    def _write_table(self, i1: int, start: int, data: memoryview, backing: BackingRead | None,
                     source: tuple[int, int] | None = None) -> None:
        """The part of a guest write inside one L2 table.

        Clusters we own exclusively are written in place; every maximal run
        of the others gets one contiguous allocation, one vectored write and
        its L2 entries set at once (the per-cluster Python loop cost more
        than the copy for large writes such as ``convert``'s).
        """
        g = self.geom
        cs, cb = self.cluster_size, self.cluster_bits
        l2_off = self._l2_for_write(i1)
        self._before_new_references()
        T = self.drv.clusters.T
        entries, bitmaps = self.drv.clusters.l2.get(l2_off)
        end = start + len(data)
        first, last = start >> cb, (end - 1) >> cb
        i0 = g.l2_index(first << cb)
        n = last - first + 1
        # all entries empty (a fresh image, as convert writes): one run to allocate, nothing to free
        fresh = not T.any_nonzero(entries, i0, i0 + n)
        runs = [(0, n, False)] if fresh else self._inplace_runs(T, entries, i0, i0 + n)
        pipe = self._pipe
        if not fresh and pipe is not None and pipe.busy:
            # clusters written in place: the writes in flight into them go first (copied clusters are
            # never in flight: those are always new ones of ours)
            hosts = [int(entries[k]) & _MASK_OFF for a, b, own in runs if own for k in range(i0 + a, i0 + b)]
            if not self._wait_hosts(hosts):  # a failed one's entries are empty again
                fresh = not T.any_nonzero(entries, i0, i0 + n)
                runs = [(0, n, False)] if fresh else self._inplace_runs(T, entries, i0, i0 + n)
        pipelining = pipe is not None and not g.extended_l2
        to_free: list[int] = []
        allocated = False
        for a, b, own in runs:
            if own:
                for c in range(first + a, first + b):
                    self._write_inplace(c, entries, bitmaps, start, end, data, backing)
                continue
            for pa, pb, host in self._alloc_pieces(first + a, b - a, int(entries[i0 + a - 1]) if a else 0):
                c, run = first + a + pa, pb - pa
                allocated = allocated or not g.has_data_file
                try:
                    if g.extended_l2:
                        self._write_new_extended(c, run, host, entries, bitmaps, start, end, data, backing,
                                                 to_free)
                        continue
                    segments = self._new_cluster_segments(c, run, host, start, end, data, backing, source)
                    lo = i0 + a + pa
                    # into empty entries only (nothing to free): the entries change now; no table naming
                    # them is written before the data
                    if pipelining and (fresh or not T.any_nonzero(entries, lo, lo + run)):
                        self._submit_segments(segments, (l2_off, lo, run, c << cb))
                    else:
                        self._write_segments(segments)  # the entries change once the data is there (QEMU's order)
                except (CorruptionEvent, OSError):  # no entry names the clusters yet: give them back
                    self._abort_alloc(host, run)
                    raise
                lo = i0 + a + pa
                if not fresh:
                    to_free.extend(T.tolist(T.with_flag(T.get_slice(entries, lo, lo + run),
                                                        _COMPRESSED | _MASK_OFF, True)))
                T.set_strided(entries, lo, 1, host | _COPIED, run, cs)  # (host + k*cs) | COPIED
        self._finish_update(l2_off, allocated, to_free, changed=(i1, i0, i0 + n))

    def _alloc_pieces(self, c: int, run: int, before: int) -> list[tuple[int, int, int]]:
        """Host clusters for ``run`` new clusters from cluster ``c``: ``(first, end, host)`` pieces.

        ``before`` is the L2 entry of the cluster before ``c`` when the same write updates it in
        place (else 0).  QEMU's allocation continues that host range: the new clusters go right
        after it, as many as are free there, and only the rest anywhere (first fit).  Besides the
        layout, this decides where damaged refcounts fail (a block needed far past the file).
        """
        n = 0
        pieces: list[tuple[int, int, int]] = []
        rc = self.drv.refcounts
        changes = rc.changes
        if before and not self.geom.has_data_file:
            nxt = (before & L.L2E_OFFSET_MASK) + self.cluster_size
            n = rc.alloc_at(nxt, run)
            if n:
                pieces.append((0, n, nxt))
        if n < run:
            pieces.append((n, run, self._alloc_data((c + n) << self.cluster_bits, run - n)))
        if not self.geom.has_data_file:
            self._data_allocated(changes, len(pieces))
        return pieces

    def _data_allocated(self, changes: int, updates: int) -> None:
        """Data clusters were counted by ``updates`` refcount updates from ``changes`` on: if nothing else
        changed (no refcount block or table had to be allocated), no metadata moved, so the overlap
        test's memo of clean ranges stays valid (see :meth:`_check_overlap`): the next write to the same
        L2 table does not test the table again."""
        st = self._overlap_stamp
        if st and st[3] == changes and self.drv.refcounts.changes == changes + updates:
            self._overlap_stamp = (*st[:3], changes + updates)

    def _inplace_runs(self, T: Backend, entries: Tab, lo: int, hi: int) -> list[tuple[int, int, bool]]:
        """Maximal runs ``(start, end, in place)`` (from ``lo``) of L2 entries ``[lo, hi)`` by whether
        their clusters a write may overwrite in place.

        COPIED clusters with a host offset: data, and also zero clusters that keep their allocation
        (QEMU reuses those too, zeroing the rest of the cluster and clearing the zero flag; a damaged
        entry's offset past any file then fails the write, as QEMU's does, instead of being freed).
        With a data file every COPIED entry has its host offset (the guest offset, possibly 0).
        """
        some = _MASK_OFF | _COPIED if self.geom.has_data_file else _MASK_OFF
        return T.flag_runs(entries, lo, hi, _COPIED, some, _COMPRESSED)

    def _new_cluster_segments(self, c: int, run: int, host: int, start: int, end: int, data: memoryview,
                              backing: BackingRead | None, source: tuple[int, int] | None = None,
                              ) -> list[tuple[int, bytes | memoryview | FileBytes]]:
        """(host, bytes) to write into ``run`` new clusters from cluster ``c`` (standard L2).

        Clusters the write covers come straight from ``data`` (one slice, or the same bytes in the
        ``source`` file); a partly covered first or last cluster is completed from the current
        view (copy-on-write), computed before any entry changes.
        """
        cs = self.cluster_size
        lo, hi = c * cs, (c + run) * cs
        head = lo < start
        tail = hi > end and (run > 1 or not head)
        segments: list[tuple[int, bytes | memoryview | FileBytes]] = []
        if head:
            segments.append((host, self._overlay(lo, lo + cs, start, end, data, backing)))
        full_lo = lo + cs if head else lo
        full_hi = hi - cs if tail else hi
        if full_hi > full_lo:
            whole = data[full_lo - start : full_hi - start]
            segments.append((host + full_lo - lo, whole if source is None
                             else FileBytes(whole, source[0], source[1] + full_lo - start)))
        if tail:
            segments.append((host + hi - cs - lo, self._overlay(hi - cs, hi, start, end, data, backing)))
        return segments

    def _write_new_extended(self, c: int, run: int, host: int, entries: np.ndarray, bitmaps: np.ndarray,
                            start: int, end: int, data: memoryview, backing: BackingRead | None,
                            to_free: list[int]) -> None:
        """Extended L2: per cluster, because each one's subcluster bitmap decides what is written."""
        g = self.geom
        cs, cb = self.cluster_size, self.cluster_bits
        segments: list[tuple[int, bytes | memoryview]] = []
        updates: list[tuple[int, int, int]] = []
        for j in range(run):
            cc = c + j
            idx = g.l2_index(cc << cb)
            old = int(entries[idx])
            rel, content = self._cow_cluster(cc, old, start, end, data, backing)
            segments.append((host + j * cs + rel, content))
            updates.append((idx, self._new_bitmap(cc, old, int(bitmaps[idx]), start, end), old))
        self._write_segments(segments)  # the entries change once the data is there (QEMU's order)
        for j, (idx, bitmap, old) in enumerate(updates):
            bitmaps[idx] = bitmap
            entries[idx] = (host + j * cs) | L.OFLAG_COPIED
            if old & L.OFLAG_COMPRESSED or old & L.L2E_OFFSET_MASK:
                to_free.append(old)

    def _sc_region(self, c: int, start: int, end: int) -> tuple[int, int]:
        """Guest range of cluster ``c`` the write touches, widened to subclusters (ext. L2) or the cluster."""
        cs = self.cluster_size
        cstart = c * cs
        if not self.geom.extended_l2:
            return cstart, cstart + cs
        scs = cs // 32
        s = max(start, cstart)
        e = min(end, cstart + cs)
        return s - (s - cstart) % scs, min(cstart + cs, e + (-(e - cstart)) % scs)

    def _overlay(self, lo: int, hi: int, start: int, end: int, data: memoryview,
                 backing: BackingRead | None) -> bytes | memoryview:
        """Guest bytes ``[lo, hi)`` after the write: the current view with ``data`` laid over it.

        A range the write covers entirely is returned as a view of the
        caller's buffer (no copy): large writes then go out with one
        ``pwritev`` straight from it.
        """
        s, e = max(lo, start), min(hi, end)
        if s == lo and e == hi:
            return data[s - start : e - start]
        # (callers waited for the writes in flight, or the cluster's entry is empty: not our data)
        cur = bytearray(self._read_fresh(lo, hi - lo, backing))
        cur[s - lo : e - lo] = data[s - start : e - start]
        return bytes(cur)

    def _cow_cluster(self, c: int, old: int, start: int, end: int, data: memoryview,
                     backing: BackingRead | None) -> tuple[int, bytes | memoryview]:
        """What to write into a newly allocated cluster replacing entry ``old``: (offset in cluster, bytes).

        Standard L2: the whole cluster (the write plus copy-on-write of head
        and tail).  Extended L2: only the touched subclusters when the old
        cluster held no data (the others stay unallocated or zero), else
        the whole cluster with the old data around the write.
        """
        cs = self.cluster_size
        cstart = c * cs
        if not self.geom.extended_l2:
            return 0, self._overlay(cstart, cstart + cs, start, end, data, backing)
        lo, hi = self._sc_region(c, start, end)
        if old & L.OFLAG_COMPRESSED:
            buf = bytearray(self.decompress(old))
        elif old & L.L2E_OFFSET_MASK:
            buf = bytearray(self.data_file.pread(old & L.L2E_OFFSET_MASK, cs))
        else:
            return lo - cstart, self._overlay(lo, hi, start, end, data, backing)
        buf[lo - cstart : hi - cstart] = self._overlay(lo, hi, start, end, data, backing)
        return 0, bytes(buf)

    def _write_segments(self, segments: Sequence[tuple[int, bytes | memoryview | FileBytes]]) -> None:
        """Write (host, bytes) pieces, neighbours together in one vectored call."""
        f = self.data_file
        for off, length, parts in _coalesced(segments):
            self._check_overlap(off, length)
            if type(f) is ImageFile:
                f.write_parts(off, parts)
            else:  # (never given FileBytes: see write)
                f.pwritev(off, parts)  # type: ignore[arg-type]

    def _check_overlap(self, host: int, size: int, *, ignore: Metadata | None = None) -> None:
        """Refuse a data write into the image's own metadata (QEMU's default "cached" overlap check).

        Only a damaged image gets here (an L2 entry or a zero refcount
        pointing at metadata); writing would destroy the tables that
        describe the disk, so the write fails and the image is marked
        corrupt instead.  The structures are tested in QEMU's order (the
        first one hit names the event) at cluster granularity, from what is
        in memory only: inactive L2 tables would need reading and are not
        checked, as in QEMU's default mode.  ``ignore`` is the structure a
        metadata write updates in place (None: a data write).
        """
        if (self.geom.has_data_file and ignore is None) or size <= 0:
            return  # data goes to another file: nothing of ours to hit
        cs = self.cluster_size
        lo = host - host % cs
        hi = host + size + (-(host + size)) % cs
        # Small writes hit the same clusters again and again (NBD, 4 KiB): remember the clean ones.
        # Metadata only moves through a refcount change, a new L1 or refcount table array, or a new
        # header (snapshots, bitmaps), so the memo is dropped when any of these changes.
        drv = self.drv
        cm, rc = drv.clusters, drv.refcounts
        st = self._overlap_stamp
        if not st or st[0] is not drv.header or st[1] is not cm.l1 or st[2] is not rc.table or st[3] != rc.changes:
            self._no_overlap.clear()
            self._overlap_stamp = (drv.header, cm.l1, rc.table, rc.changes)
            self._clean_from = _NO_END
        key = (lo, hi, ignore)
        if lo >= self._clean_from or key in self._no_overlap:
            return  # (past every structure: an allocating writer's new data, tested once per map)
        m = self.metadata_map()
        self._clean_from = metadata_end(m)
        hit = first_overlap(m, lo, hi - lo, NONE if ignore is None else ignore)
        if hit is None:
            if len(self._no_overlap) < 65536:
                self._no_overlap.add(key)
            return
        raise drv.overlap_event(NAMES[hit], host, size)

    def metadata_map(self) -> MetadataMap:
        """The metadata in memory, as the overlap test sees it (QEMU's runtime state)."""
        drv = self.drv
        return drv.metadata_map(l1=self._sorted_offsets(0, drv.clusters.l1, L.L1E_OFFSET_MASK),
                                reftable=self._sorted_offsets(1, drv.refcounts.table, L.REFT_OFFSET_MASK))

    def _sorted_offsets(self, slot: int, table: np.ndarray | list[int], mask: int) -> SortedOffsets:
        """The :class:`SortedOffsets` of the active L1 (slot 0) or refcount table (slot 1), rebuilt only
        when the table's content changed.

        The content is compared rather than trusted to change only where the
        writer knows (snapshots, resize and repairs edit these tables too): a
        table's bytes compare at memcmp speed, a list by element identity,
        both far cheaper than scanning the table for every write.
        """
        cached = self._offset_tables[slot]
        tobytes = getattr(table, "tobytes", None)  # numpy and array.array tables; lists compare as lists
        content: bytes | list[int] | None = tobytes() if tobytes is not None else None
        if cached is not None and cached[0] is table and cached[1] == (table if content is None else content):
            return cached[2]
        if content is None:
            content = list(table)
        index = SortedOffsets(table, mask)
        self._offset_tables[slot] = (table, content, index)
        return index

    def _overlapping(self, lo: int, hi: int, ignore: Metadata = NONE) -> str | None:
        """The name of the first metadata structure (but ``ignore``) with a cluster in ``[lo, hi)``, or None."""
        hit = first_overlap(self.metadata_map(), lo, hi - lo, ignore)
        return None if hit is None else NAMES[hit]

    def _new_bitmap(self, c: int, old: int, bitmap: int, start: int, end: int) -> int:
        lo, hi = self._sc_region(c, start, end)
        scs = self.cluster_size // 32
        cstart = c * self.cluster_size
        a, b = (lo - cstart) // scs, (hi - cstart) // scs
        mask = ((1 << (b - a)) - 1) << a
        if old & L.OFLAG_COMPRESSED:
            return 0xFFFFFFFF
        return (bitmap | mask) & ~(mask << 32) & 0xFFFFFFFFFFFFFFFF

    def _write_inplace(self, c: int, entries: np.ndarray, bitmaps: np.ndarray, start: int, end: int,
                       data: memoryview, backing: BackingRead | None) -> None:
        g = self.geom
        cs = self.cluster_size
        idx = g.l2_index(c * cs)
        host = int(entries[idx]) & L.L2E_OFFSET_MASK
        cstart = c * cs
        if host & (cs - 1):
            # a cluster we would overwrite in place must be aligned; anything else is a bad entry
            raise self.drv.signal_corruption(
                f"Data cluster offset {_hx(host)} unaligned (guest offset: {_hx(max(start, cstart))})")
        if not g.extended_l2:
            s, e = max(start, cstart), min(end, cstart + cs)
            if int(entries[idx]) & L.OFLAG_ZERO:  # a zero cluster kept allocated: all of it is written
                self._check_overlap(host, cs)
                buf = bytearray(cs)
                buf[s - cstart : e - cstart] = data[s - start : e - start]
                self.data_file.pwrite(host, buf)
                entries[idx] = int(entries[idx]) & ~L.OFLAG_ZERO  # (the data is there first)
                return
            self._check_overlap(host + s - cstart, e - s)
            self.data_file.pwrite(host + s - cstart, bytes(data[s - start : e - start]))
            return
        lo, hi = self._sc_region(c, start, end)
        self._check_overlap(host + lo - cstart, hi - lo)
        self.data_file.pwrite(host + lo - cstart, self._overlay(lo, hi, start, end, data, backing))
        bitmaps[idx] = self._new_bitmap(c, int(entries[idx]), int(bitmaps[idx]), start, end)

    def write_zeroes(self, offset: int, length: int, backing: BackingRead | None = None, *,
                     unmap: bool = False) -> None:
        """Make a range read as zeros: zero flags (v3) or zero subclusters where aligned, data elsewhere."""
        self._writable()
        self._settle_if_busy()
        self._check_range(offset, length)
        if length == 0:
            return
        g = self.geom
        if self.drv.header.version < 3 or g.has_data_file:
            self._write_zero_data(offset, length, backing)
            return
        gran = self.cluster_size // 32 if g.extended_l2 else self.cluster_size
        end = offset + length
        size = self.drv.virtual_size
        lo = offset - offset % gran
        hi = end + (-end) % gran
        # Unaligned ends: widen to the granule when the extra part already reads
        # as zero (or lies past the end of the disk), else write zero data there.
        head_ok = lo == offset or not any(self.read(lo, offset - lo, backing))
        tail_ok = hi == end or end >= size or not any(self.read(end, hi - end, backing))
        if not head_ok:
            self._write_zero_data(offset, min(end, lo + gran) - offset, backing)
            lo += gran
        if not tail_ok:
            t = max(hi - gran, offset)
            if hi - gran >= lo and t < end:
                self._write_zero_data(t, end - t, backing)
            hi -= gran
        if hi <= lo:
            return
        span = g.l1_span
        pos = lo
        try:
            while pos < hi:
                i1 = pos // span
                t_end = min(hi, (i1 + 1) * span)
                self._zero_table(i1, pos, t_end, unmap, backing)
                pos = t_end
        except CorruptionEvent:
            self._keep_completed()
            raise

    def _write_zero_data(self, offset: int, length: int, backing: BackingRead | None) -> None:
        pos, end = offset, offset + length
        while pos < end:
            n = min(end - pos, 4 << 20)
            self.write(pos, bytes(n), backing)
            pos += n

    def _zero_table(self, i1: int, start: int, end: int, unmap: bool, backing: BackingRead | None) -> None:
        g = self.geom
        cs, cb = self.cluster_size, self.cluster_bits
        l2_off = self._l2_for_write(i1)
        entries, bitmaps = self.drv.clusters.l2.get(l2_off)
        to_free: list[int] = []
        pending_data: list[tuple[int, int]] = []
        for c in range(start >> cb, ((end - 1) >> cb) + 1):
            idx = g.l2_index(c << cb)
            old = int(entries[idx])
            cstart = c << cb
            s, e = max(start, cstart), min(end, cstart + cs)
            full = s == cstart and e == cstart + cs
            comp = bool(old & L.OFLAG_COMPRESSED)
            if not full:  # extended L2, subcluster aligned
                if comp:
                    pending_data.append((s, e - s))
                    continue
                scs = cs // 32
                a, b = (s - cstart) // scs, (e - cstart) // scs
                mask = ((1 << (b - a)) - 1) << a
                bitmaps[idx] = (int(bitmaps[idx]) | (mask << 32)) & ~mask & 0xFFFFFFFFFFFFFFFF
                continue
            allocated = comp or bool(old & L.L2E_OFFSET_MASK)
            drop = comp or (unmap and allocated)
            new = 0 if drop else old
            if g.extended_l2:
                bitmaps[idx] = 0xFFFFFFFF00000000
            else:
                new |= L.OFLAG_ZERO
            entries[idx] = new
            if drop:
                to_free.append(old)
        first = g.l2_index(start)
        self._finish_update(l2_off, False, to_free, discard=True,
                            changed=(i1, first, first + ((end - 1) >> cb) - (start >> cb) + 1))
        for s, n in pending_data:
            self._write_zero_data(s, n, backing)

    def discard(self, offset: int, length: int, *, has_backing: bool = False, full: bool = False) -> None:
        """Guest discard of whole clusters: afterwards they read as zeros (v3) or fall through (v2).

        ``full`` makes the clusters plain unallocated instead (they show the
        backing file again), as emptying an image after ``commit`` needs.
        """
        self._writable()
        self._settle_if_busy()
        self._check_range(offset, length)
        g = self.geom
        cs, cb = self.cluster_size, self.cluster_bits
        end = offset + length
        lo = offset + (-offset) % cs
        hi = end - end % cs
        if end == self.drv.virtual_size and offset % cs == 0:
            hi = end  # the partial last cluster of an unaligned image counts as whole
        if hi <= lo:
            return
        if g.has_data_file and self.drv.header.data_file_raw and not full:
            # The data file must stay a valid raw image of the disk: discard by writing zeros.
            self._write_zero_data(lo, hi - lo, None)
            return
        span = g.l1_span
        pos = lo
        while pos < hi:
            i1 = pos // span
            t_end = min(hi, (i1 + 1) * span)
            cm = self.drv.clusters
            if (i1 >= len(cm.l1) or not int(cm.l1[i1]) & L.L1E_OFFSET_MASK) and (full or not has_backing):
                pos = t_end
                continue
            l2_off = self._l2_for_write(i1)
            entries, bitmaps = cm.l2.get(l2_off)
            to_free: list[int] = []
            for c in range(pos >> cb, ((t_end - 1) >> cb) + 1):
                idx = g.l2_index(c << cb)
                old, old_bm = int(entries[idx]), int(bitmaps[idx])
                allocated = bool(old & L.OFLAG_COMPRESSED or old & L.L2E_OFFSET_MASK
                                 or (g.has_data_file and old & L.OFLAG_COPIED))
                if full:
                    if not old and not old_bm:
                        continue
                    new, new_bm = 0, 0
                elif not (has_backing or allocated):
                    continue
                elif g.extended_l2:
                    new, new_bm = 0, 0xFFFFFFFF00000000
                else:
                    new, new_bm = (L.OFLAG_ZERO if self.drv.header.version >= 3 else 0), 0
                if (new, new_bm) == (old, old_bm):
                    continue
                entries[idx] = new
                bitmaps[idx] = new_bm
                if allocated:
                    to_free.append(old)
            first = g.l2_index(pos)
            self._finish_update(l2_off, False, to_free, discard=True,
                                changed=(i1, first, first + ((t_end - 1) >> cb) - (pos >> cb) + 1))
            pos = t_end

    def write_compressed(self, offset: int, data: bytes) -> None:
        """Write one whole cluster compressed (a short last cluster is zero-padded).

        Like QEMU, the cluster must not be allocated yet; data that does not
        compress below the cluster size is written uncompressed instead.
        """
        self._writable()
        self._settle_if_busy()
        g = self.geom
        cs = self.cluster_size
        if offset % cs or len(data) > cs:
            raise VdkitError("Compressed writes must cover exactly one cluster", errno=EIO)
        self._check_range(offset, len(data))
        if g.has_data_file:
            raise UnsupportedError("Compressed writes are not supported with an external data file", errno=ENOTSUP)
        buf = bytes(data) + bytes(cs - len(data))
        comp = compress_cluster(buf, self.drv.header.compression_type)
        if len(comp) > cs - 1:
            self.write(offset, bytes(data))
            return
        i1 = g.l1_index(offset)
        l2_off = self._l2_for_write(i1)
        self._before_new_references()
        entries, bitmaps = self.drv.clusters.l2.get(l2_off)
        idx = g.l2_index(offset)
        old = int(entries[idx])
        if old & L.OFLAG_COMPRESSED or old & L.L2E_OFFSET_MASK:
            raise VdkitError("Compressed writes need an unallocated cluster", errno=EIO)
        coff = self.drv.refcounts.alloc_bytes(len(comp))
        self._check_overlap(coff, len(comp))
        self.drv.file.pwrite(coff, comp)
        nb_sectors = ((coff + len(comp) - 1) >> 9) - (coff >> 9)
        entries[idx] = L.OFLAG_COMPRESSED | (nb_sectors << g.csize_shift) | coff
        if g.extended_l2:
            bitmaps[idx] = 0
        self._finish_update(l2_off, True, [], changed=(i1, idx, idx + 1))

    def align_file_end(self) -> None:
        """Round the image file up to whole sectors (done after compressed writes, like qemu-img)."""
        f = self.drv.file
        size = f.size()
        if size % 512:
            f.truncate(size + (-size) % 512)

    def flush(self) -> None:
        self.settle()
        self._release_failed()
        failure = self._write_failure
        if failure is not None:
            self._write_failure = None
            raise failure[0]
        self.drv.flush()
        if self.drv.header.has_data_file and self.drv.data_file is not None:
            self.drv.data_file.flush()
        self.drv.file.flush()


def decompress_cluster(raw: bytes, cluster_size: int, ctype: int) -> bytes:
    """Inflate one compressed cluster; it must produce a whole cluster (trailing input is ignored)."""
    if ctype == L.CompressionType.ZLIB:
        d = zlib.decompressobj(-12)
        try:
            out = d.decompress(raw, cluster_size)
        except zlib.error as exc:
            raise VdkitError(f"Could not decompress cluster: {exc}", errno=EIO) from None
    elif ctype == L.CompressionType.ZSTD:
        from vdkit.formats.qcow2 import zstd_codec

        out = zstd_codec.decompress(raw, cluster_size)
    else:
        raise UnsupportedError(f"Unknown compression type {ctype}")
    if len(out) != cluster_size:
        raise VdkitError("Could not decompress cluster: data is truncated", errno=EIO)
    return out


def compress_cluster(data: bytes, ctype: int) -> bytes:
    """Compress one cluster the way QEMU does (raw deflate, window 4 KiB; or one zstd frame)."""
    if ctype == L.CompressionType.ZLIB:
        c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12, 9)
        return c.compress(data) + c.flush()
    if ctype == L.CompressionType.ZSTD:
        from vdkit.formats.qcow2 import zstd_codec

        return zstd_codec.compress(data)
    raise UnsupportedError(f"Unknown compression type {ctype}")


def _continues(a: Run, b: Run) -> bool:
    """Whether run ``b`` (right after ``a``) is one run with it: :func:`_coalesce`'s rule on whole runs."""
    if a.kind != b.kind or (a.host is None) != (b.host is None):
        return False
    if a.host is None or b.host is None:
        return True
    step = 0 if a.kind in (Kind.COMPRESSED, Kind.CORRUPT) else a.length  # hosts that do not advance per unit
    return b.host == a.host + step


def _joined(a: Run, b: Run) -> Run:
    return Run(a.kind, a.guest, a.length + b.length, a.host)


def _merge_front(head: Run, mid: list[Run]) -> list[Run]:
    if mid and _continues(head, mid[0]):
        return [_joined(head, mid[0]), *mid[1:]]
    return [head, *mid]


def _merge_back(mid: list[Run], tail: Run) -> list[Run]:
    if mid and _continues(mid[-1], tail):
        return [*mid[:-1], _joined(mid[-1], tail)]
    return [*mid, tail]


def _coalesce(kinds: np.ndarray, hosts: np.ndarray, valid: np.ndarray, unit: int, base: int) -> list[Run]:
    """Merge units into runs: same kind, same host validity, contiguous hosts.

    Compressed units merge only with units of the same descriptor (the
    subclusters of one compressed cluster), never across clusters.
    """
    n = len(kinds)
    if n == 0:
        return []
    comp = (kinds == Kind.COMPRESSED) | (kinds == Kind.CORRUPT)  # hosts that do not advance per unit
    step = np.where(comp, _U64(0), _U64(unit))
    brk = np.ones(n, dtype=bool)
    if n > 1:
        same = (kinds[1:] == kinds[:-1]) & (valid[1:] == valid[:-1])
        cont = ~valid[1:] | (hosts[1:] == hosts[:-1] + step[1:])
        brk[1:] = ~(same & cont)
    starts = np.flatnonzero(brk)
    ends = np.append(starts[1:], n)
    # one conversion per column (indexing numpy scalars per run cost more than the whole table)
    return [Run(_KINDS[k], base + s * unit, (e - s) * unit, h if v else None)
            for s, e, k, h, v in zip(starts.tolist(), ends.tolist(), kinds[starts].tolist(),
                                     hosts[starts].tolist(), valid[starts].tolist(), strict=True)]


def _coalesced(segments: Sequence[tuple[int, bytes | memoryview | FileBytes]]
               ) -> Iterator[tuple[int, int, list[bytes | bytearray | memoryview | FileBytes]]]:
    """(host, bytes) pieces as ``(host, length, parts)``: neighbours joined for one vectored write."""
    i = 0
    while i < len(segments):
        off, chunk = segments[i]
        parts: list[bytes | bytearray | memoryview | FileBytes] = [chunk]
        nxt = off + len(chunk)
        i += 1
        while i < len(segments) and segments[i][0] == nxt:
            parts.append(segments[i][1])
            nxt += len(segments[i][1])
            i += 1
        yield off, nxt - off, parts
