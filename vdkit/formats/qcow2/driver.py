"""Qcow2Driver: the qcow2 operations table, built from the modules beside it.

Opening validates the header (``header``), then reads the snapshot table
(``snapshot``).  Everything else (L1/L2 tables, refcounts, bitmaps, the LUKS
header) is read lazily, only by the operations that need it, so that
``info`` on an image with many snapshots or a huge L1 stays cheap.
"""

from __future__ import annotations

import errno
import os
import sys

from vdkit.block.driver import CorruptionEvent, CorruptionReport, FormatDriver
from vdkit.errors import CorruptImageError, OpenError, VdkitError
from vdkit.formats.qcow2 import layout as L
from vdkit.formats.qcow2.layout import Qcow2Header, parse_header, serialize_header
from vdkit.io.file import ImageFile
from vdkit.record import cached_property, record

TYPE_CHECKING = False  # typing itself is not imported at run time (start-up cost)
if TYPE_CHECKING:  # numpy-backed modules load only when metadata is written or walked
    from collections.abc import Callable, Iterator

    from vdkit.block.dirty_bitmap import DirtyBitmap
    from vdkit.block.driver import BlockStatus, CheckReport, CheckResult, OpenContext
    from vdkit.block.node import Node
    from vdkit.block.snapshot import SnapshotRecord
    from vdkit.block.target import Target
    from vdkit.formats.qcow2.cluster import ClusterMap, Geometry
    from vdkit.formats.qcow2.io import Qcow2IO
    from vdkit.formats.qcow2.overlap import Metadata, MetadataMap, SortedOffsets
    from vdkit.formats.qcow2.refcount import Refcounts
    from vdkit.formats.qcow2.snapshot import SnapshotEntry
    from vdkit.info.extra_model import AesEncryptionInfo, LuksInfo
    from vdkit.info.model import ImageInfoSpecific
    from vdkit.io.tables import Backend


@record(frozen=True)
class BitmapEntry:
    """One bitmap directory entry (only what info and check need)."""

    name: str
    table_offset: int
    table_size: int
    flags: int
    type: int
    granularity_bits: int
    extra_data_size: int

    IN_USE = 1 << 0
    AUTO = 1 << 1

    @property
    def granularity(self) -> int:
        return 1 << self.granularity_bits


def _io_error(exc: OSError) -> VdkitError:
    """An I/O failure while writing metadata, as a one-line error with its errno."""
    return VdkitError(os.strerror(exc.errno) if exc.errno else str(exc), errno=exc.errno or errno.EIO)


class Qcow2Driver(FormatDriver):
    format_name = "qcow2"
    plain_data = True
    supports_backing = True
    # Corruption events go to ``corruption_hook`` (FormatDriver's slot: the daemon's event emitter).
    # Without a hook the report travels on the raised CorruptionEvent for the front end to print when
    # it maps the error (``vdkit.block.io.io_error``); the library itself never prints.

    def __init__(
        self,
        file: ImageFile,
        *,
        readonly: bool = True,
        check_mode: bool = False,
    ) -> None:
        super().__init__(file)
        self.readonly = readonly
        self.check_mode = check_mode
        # Corruption state (QEMU's per-image rules): after the first event further ones are not
        # reported; after a fatal one the node is dead and every request fails with ENOMEDIUM.
        self.corruption_signalled = False
        self.dead = False
        head = file.pread(0, L.V3_MIN_HEADER_SIZE)
        if head[:4] != L.MAGIC:
            raise OpenError("Image is not in qcow2 format")
        cluster_bits = int.from_bytes(head[20:24], "big")
        # Validate the cluster size before reading "cluster 0" with it.
        cluster0 = head
        if L.MIN_CLUSTER_BITS <= cluster_bits <= L.MAX_CLUSTER_BITS:
            cluster0 = file.pread(0, 1 << cluster_bits)
        self.header: Qcow2Header = parse_header(cluster0, readonly=readonly, check_mode=check_mode)
        # (message, hint) pairs a front end prints as "warning: ..." after opening.
        self.open_warnings: list[tuple[str, str | None]] = []
        if self.header.bitmaps_inconsistent:
            self.open_warnings.append((
                "This qcow2 v2 image contains bitmaps, but they may have been modified by a program "
                "without persistent bitmap support; so now they must all be considered inconsistent"
                if self.header.version < 3 else
                "a program lacking bitmap support modified this file, so all bitmaps are now considered "
                "inconsistent",
                "\0Some clusters may be leaked, run 'qemu-img check -r' on the image file to fix.",
            ))
        self.data_file: ImageFile | None = None
        self._snapshots: list[SnapshotEntry] = []
        self.snapshot_table_size = 0
        if self.header.crypt_method == L.CRYPT_LUKS and not check_mode:
            # QEMU reads the LUKS header while opening (even for info), so a
            # broken one fails the open, with the "Could not open" prefix.
            from vdkit.formats.luks import parse_luks_header

            raw = self.luks_header()
            if raw is not None:
                parse_luks_header(raw)
        if not check_mode:
            self._snapshots, self.snapshot_table_size = self._read_snapshot_table()
            self.bitmaps  # noqa: B018 - validate the bitmap directory now, as QEMU does at open
        if not readonly and not check_mode:
            self._prepare_writable()

    # -- snapshot table ---------------------------------------------------------
    def _read_snapshot_table(self, *, check_mode: bool = False) -> tuple[list[SnapshotEntry], int]:
        h = self.header
        if h.nb_snapshots == 0:
            return [], 0
        # Read no more than the file holds: a table claimed past EOF costs no memory.
        limit = min(L.MAX_SNAPSHOT_TABLE_SIZE, max(0, self.file.size() - h.snapshots_offset))
        # ... and no more than the entries span (a table far from EOF is common after rewrites):
        # grow the buffer until walking the entry headers ends inside it.
        size = min(limit, 65536)
        while True:
            buf = self.file.pread(h.snapshots_offset, size)
            if size >= limit or self._snapshot_table_end(buf, h.nb_snapshots) <= size:
                break
            size = min(limit, size * 4)
        from vdkit.formats.qcow2.snapshot import parse_snapshot_table  # not imported by images without snapshots

        return parse_snapshot_table(buf, h.nb_snapshots, disk_size=h.size, check_mode=check_mode)

    @staticmethod
    def _snapshot_table_end(buf: bytes, nb: int) -> int:
        """Where the table ends according to the entry headers in ``buf`` (past ``len(buf)``: read more)."""
        off = 0
        for _ in range(nb):
            off = L.align_up(off, 8)
            if off + L.SNAPSHOT_HEADER.size > len(buf):
                return len(buf) + 1
            fields = L.SNAPSHOT_HEADER.unpack_from(buf, off)
            off += L.SNAPSHOT_HEADER.size + fields[8] + fields[2] + fields[3]
        return off

    def snapshots(self) -> list[SnapshotEntry]:
        return list(self._snapshots)

    # -- geometry -------------------------------------------------------------
    @property
    def virtual_size(self) -> int:
        # The block layer counts whole sectors: a header size of 1000 is a 512-byte disk.
        return self.header.size // 512 * 512

    @property
    def cluster_size(self) -> int:
        return self.header.cluster_size

    @property
    def encrypted(self) -> bool:
        return self.header.crypt_method != L.CRYPT_NONE

    @property
    def dirty(self) -> bool:
        return self.header.dirty

    @property
    def backing_file(self) -> str | None:
        return self.header.backing_file

    @property
    def backing_format(self) -> str | None:
        return self.header.backing_format if self.header.backing_file is not None else None

    def extra_files(self) -> list[ImageFile]:
        return [self.data_file] if self.data_file is not None else []

    def allocated_size(self) -> int:
        """Host bytes of the image file only: qemu-img 7.2 does not count the data file."""
        return self.file.allocated_size()

    # -- bitmaps and encryption (read for info) -------------------------------
    @cached_property
    def bitmaps(self) -> list[BitmapEntry]:
        """The bitmap directory, validated the way QEMU 7.2 validates it when opening.

        Read (and checked) at open time, because qemu-img refuses an image
        with a broken directory even for ``info``.
        """
        h = self.header
        if h.bitmaps is None or h.version < 3 or h.bitmaps_inconsistent:
            return []
        ext = h.bitmaps
        if ext.directory_size == 0:
            raise OpenError("Requested bitmap directory size is zero")
        # Bounded by the extension check (<= 64 MiB) and by what the file holds.
        avail = max(0, min(ext.directory_size, self.file.size() - ext.directory_offset))
        buf = self.file.pread(ext.directory_offset, avail) + bytes(ext.directory_size - avail)
        out: list[BitmapEntry] = []
        off = 0
        end = ext.directory_size
        while off < end:
            if off + L.BITMAP_DIR_ENTRY.size > end:
                raise OpenError("Broken bitmap directory")
            (tbl_off, tbl_size, flags, btype, gran_bits, name_size,
             extra_size) = L.BITMAP_DIR_ENTRY.unpack_from(buf, off)
            name_off = off + L.BITMAP_DIR_ENTRY.size + extra_size
            if name_off + name_size > end:
                raise OpenError("Broken bitmap directory")
            if extra_size:
                raise OpenError("Bitmap extra data is not supported")
            if len(out) >= ext.nb_bitmaps:
                raise OpenError("More bitmaps found than specified in header extension")
            # A C string to QEMU: an embedded NUL ends the name.
            name = buf[name_off : name_off + name_size].split(b"\0", 1)[0].decode("utf-8", "replace")
            entry = BitmapEntry(name, tbl_off, tbl_size, flags, btype, gran_bits, extra_size)
            if not self._bitmap_sane(entry):
                raise OpenError(f"Bitmap '{name}' doesn't satisfy the constraints")
            out.append(entry)
            off = L.align_up(name_off + name_size, 8)
        if len(out) < ext.nb_bitmaps:
            raise OpenError("Less bitmaps found than specified in header extension")
        for e in out:
            span = e.granularity * self.cluster_size * 8
            if e.table_size != (self.virtual_size + span - 1) // span:
                raise OpenError(f"Could not read bitmap '{e.name}' from image: Invalid argument")
        return out

    def _bitmap_sane(self, e: BitmapEntry) -> bool:
        """Entry constraints observed in QEMU 7.2 (type, granularity, flags, table placement)."""
        return (
            e.type == 1
            and 9 <= e.granularity_bits <= 31
            and not e.flags & ~(BitmapEntry.IN_USE | BitmapEntry.AUTO)
            and e.table_offset != 0
            and e.table_offset % self.cluster_size == 0
            and 0 < e.table_size <= 0x1000000 // 8
            # QEMU's bound on a bitmap's size in memory (BME_MAX_PHYS_SIZE, 512 MiB of bits): it also
            # bounds what loading the bitmap allocates here
            and e.table_size * self.cluster_size <= 0x20000000
        )

    # -- persistent dirty bitmaps (vdkit.formats.qcow2.bitmaps) ----------------------------------
    def load_dirty_bitmaps(self) -> list[DirtyBitmap]:
        if not self.bitmaps or self.check_mode:
            return []
        from vdkit.formats.qcow2 import bitmaps as qbitmaps

        try:
            return qbitmaps.load(self)
        except OSError as exc:
            raise _io_error(exc) from exc

    @property
    def supports_persistent_bitmaps(self) -> bool:  # type: ignore[override]
        return self.header.version >= 3  # (the bitmaps extension is a version 3 feature)

    def can_store_bitmap(self, name: str, granularity: int, label: str) -> None:
        from vdkit.formats.qcow2 import bitmaps as qbitmaps

        qbitmaps.can_store(self, name, granularity, label)

    def remove_persistent_bitmap(self, name: str) -> None:
        self.require_alive()
        if self.readonly or self.file.readonly:
            return
        from vdkit.formats.qcow2 import bitmaps as qbitmaps

        try:
            qbitmaps.remove(self, name)
        except OSError as exc:
            raise _io_error(exc) from exc

    def store_dirty_bitmaps(self) -> None:
        if not self.dirty_bitmaps or self.dead or self.readonly or self.file.readonly:
            return  # (no bitmap: nothing to store, and the bitmap modules, which import numpy, stay unloaded)
        from vdkit.formats.qcow2 import bitmaps as qbitmaps

        try:
            qbitmaps.store(self, self.dirty_bitmaps)
        except OSError as exc:
            raise _io_error(exc) from exc

    def reopen_bitmaps(self, *, readonly: bool) -> None:
        """QEMU's reopen of a qcow2 node: read-only stores the bitmaps first (nothing is written after);
        read-write marks the stored ones in use again before the first write can change the disk."""
        bitmaps = self.dirty_bitmaps
        if not bitmaps or self.dead:
            return
        from vdkit.formats.qcow2 import bitmaps as qbitmaps

        try:
            if readonly:
                self.store_dirty_bitmaps()
            elif self.bitmaps and any(b.persistent and b.readonly for b in bitmaps):
                qbitmaps.mark_in_use(self)
        except OSError as exc:
            raise _io_error(exc) from exc
        for bm in bitmaps:
            if bm.persistent:
                bm.readonly = readonly

    def luks_header(self) -> bytes | None:
        """Raw bytes of the LUKS header area of an encrypted image."""
        h = self.header
        if h.crypt_method != L.CRYPT_LUKS or h.crypto is None:
            return None
        if h.crypto.offset % h.cluster_size:
            raise CorruptImageError("Crypto header offset is not cluster aligned")
        from vdkit.formats.luks import LUKS_MAX_HEADER

        length = min(h.crypto.length, LUKS_MAX_HEADER)
        return self.file.pread(h.crypto.offset, length)

    # -- writing: metadata structures and snapshot operations ------------------
    supports_snapshots = True

    @cached_property
    def geometry(self) -> Geometry:
        from vdkit.formats.qcow2.cluster import Geometry

        h = self.header
        return Geometry(h.cluster_bits, h.extended_l2, h.has_data_file)

    @cached_property
    def refcounts(self) -> Refcounts:
        from vdkit.formats.qcow2.refcount import Refcounts

        h = self.header
        rc = Refcounts(self.file, cluster_bits=h.cluster_bits, refcount_order=h.refcount_order,
                       table_offset=h.refcount_table_offset, table_clusters=h.refcount_table_clusters,
                       on_table_switch=self._refcount_table_switched, on_corruption=self.signal_corruption)
        if not self.readonly:  # our own metadata writes pass QEMU's overlap check, as the data path's
            rc.overlap_check = self.check_metadata_write
        return rc

    def metadata_map(self, l1: SortedOffsets | None = None, reftable: SortedOffsets | None = None) -> MetadataMap:
        """The metadata in memory, as QEMU's overlap test sees it (its runtime state).

        ``l1`` and ``reftable`` are indexes of the active L1 and refcount tables a caller keeps between
        tests (the I/O engine's); without them they are built from the tables now.
        """
        from vdkit.formats.qcow2.overlap import MetadataMap, SortedOffsets

        h = self.header
        cm, rc = self.clusters, self.refcounts
        bitmaps = h.bitmaps if h.autoclear_features & L.AUTOCLEAR_BITMAPS else None  # untrusted: unknown to QEMU
        return MetadataMap(
            cluster_size=h.cluster_size, l1_offset=cm.l1_offset, l1_size=len(cm.l1),
            l1=SortedOffsets(cm.l1, L.L1E_OFFSET_MASK) if l1 is None else l1,
            reftable_offset=rc.table_offset, reftable_bytes=rc.table_clusters * h.cluster_size,
            reftable=SortedOffsets(rc.table, L.REFT_OFFSET_MASK) if reftable is None else reftable,
            snapshots_offset=h.snapshots_offset, snapshots_bytes=self.snapshot_table_size if h.nb_snapshots else 0,
            snapshots=self._snapshots,
            bitmap_directory=None if bitmaps is None else (bitmaps.directory_offset, bitmaps.directory_size))

    def check_metadata_write(self, host: int, size: int, ignore: Metadata) -> None:
        """QEMU's overlap check of a metadata write that updates ``ignore`` in place: a hit on any other
        structure is the corruption event.  Through the I/O engine where a data path exists (it keeps
        a memo of clean ranges for its many writes), else on a map built here: a snapshot operation
        or a refcount block write-back need not load the engine for a test or two.
        """
        if "io" in self.__dict__:
            self.io._check_overlap(host, size, ignore=ignore)
            return
        name = self.metadata_overlap(host, host + size, ignore)
        if name is not None:
            raise self.overlap_event(name, host, size)

    def overlap_event(self, name: str, host: int, size: int) -> CorruptionEvent:
        """The corruption event of a write of ``[host, host+size)`` refused because it meets the metadata
        structure ``name`` (both overlap tests, the engine's and the map built here, raise it)."""
        from vdkit.formats.qcow2.overlap import overlap_text

        return self.signal_corruption(overlap_text(name), offset=host, size=size)

    def metadata_overlap(self, lo: int, hi: int, ignore: Metadata | None = None) -> str | None:
        """The name of the first metadata structure (but ``ignore``) with a cluster in ``[lo, hi)``, or None."""
        from vdkit.formats.qcow2.overlap import NAMES, NONE, first_overlap

        hit = first_overlap(self.metadata_map(), lo, hi - lo, NONE if ignore is None else ignore)
        return None if hit is None else NAMES[hit]

    # The table backend the active L1 is read with (None: numpy).  A snapshot operation on a small image
    # sets it before the cluster map exists, so that its walk and overlap checks run on lists.
    l1_backend: Backend | None = None

    @cached_property
    def clusters(self) -> ClusterMap:
        from vdkit.formats.qcow2.cluster import ClusterMap

        if self.l1_backend is None and not self.readonly:
            self.l1_backend = self._writer_backend()
        cm = ClusterMap(self.file, self.geometry, self.header.l1_table_offset, self.header.l1_size,
                        on_l1_switch=self._l1_switched, T=self.l1_backend)
        self.refcounts.set_l2_flush(cm.l2.flush)
        return cm

    def _writer_backend(self) -> Backend:
        """The table backend of a writable image's cluster map: lists when its tables are small
        (a ``convert -O qcow2`` of a small image then never imports numpy, ~90 ms; extended L2 too, its
        runs classified by ``Qcow2IO._list_runs_extended``), numpy for big ones and where numpy is
        loaded already (the daemon), unless ``VDKIT_TABLES`` forces one."""
        from vdkit.io import tables

        h = self.header
        # the L1 and the L2 tables it names, up to the L2 cache's 16 MiB: a new image's, however big
        # its disk, names none (``convert`` of a 2 TB sparse disk imported numpy only to hold them,
        # ten times qemu-img's whole run); the list L2 cache holds no more than numpy's threshold
        # (see L2Cache._capacity), so an image that fills many tables stays within that memory
        held = h.l1_size * 8
        if held < tables.NUMPY_MIN_BYTES:
            held += min(self._l1_tables(tables.NUMPY_MIN_BYTES // h.cluster_size + 1) * h.cluster_size, 16 << 20)
        T = tables.backend_for(held)
        if T is tables.SMALL and tables.FORCE is None and "numpy" in sys.modules:
            T = tables.NUMPY
        return T

    def _l1_tables(self, limit: int) -> int:
        """How many L2 tables the active L1 names (counting stops at ``limit``)."""
        h = self.header
        raw = self.file.pread(h.l1_table_offset, h.l1_size * 8)
        if raw.count(0) == len(raw):  # (a new image: one pass in C)
            return 0
        count = 0
        for entry in memoryview(raw[: len(raw) // 8 * 8]).cast("Q"):
            if entry:
                count += 1
                if count >= limit:
                    break
        return count

    def _l1_switched(self, offset: int, size: int) -> None:
        self.header = self.header.evolve(l1_table_offset=offset, l1_size=size)

    def _refcount_table_switched(self, offset: int, clusters: int) -> None:
        self.header = self.header.evolve(refcount_table_offset=offset, refcount_table_clusters=clusters)

    def _prepare_writable(self) -> None:
        """What a writable open does first (algorithms §10.8): autoclear bits, dirty repair."""
        h = self.header
        if h.version >= 3 and h.autoclear_features & ~L.AUTOCLEAR_MASK:
            self.header = h.evolve(autoclear_features=h.autoclear_features & L.AUTOCLEAR_MASK)
            self.rewrite_header()
        if self.header.dirty:
            self._repair_dirty()

    def _repair_dirty(self) -> None:
        import sys

        from vdkit.formats.qcow2 import check as qcheck

        def report(line: str) -> None:
            # QEMU prints the repair's messages on stderr; a leading NUL marks an
            # error_report line, which a front end would prefix with its name.
            line = line.removeprefix("\0")
            sys.stderr.write(line if line.endswith("\n") else line + "\n")

        try:
            qcheck.check(self, "all", report)
        except VdkitError as exc:
            raise OpenError(f"Could not repair dirty image: {exc.message}") from exc
        # The repair rewrote metadata behind our back: start from the disk again.
        self.header = parse_header(self.file.pread(0, self.header.cluster_size), readonly=False)
        for attr in ("refcounts", "clusters"):
            self.__dict__.pop(attr, None)
        if self.header.dirty:
            raise OpenError("Could not repair dirty image")

    def rewrite_header(self) -> None:
        """Rewrite cluster 0's header and extensions in one synchronous write."""
        self.file.pwrite(0, serialize_header(self.header))
        self.file.flush()

    def flush(self) -> None:
        """Write back cached metadata (refcounts first, then L2 tables) and sync."""
        if self.dead:
            return  # nothing of a dead node is written back (its caches are not trusted)
        if "refcounts" in self.__dict__:
            self.refcounts.flush()
        if "clusters" in self.__dict__:
            self.clusters.l2.flush()

    def snapshot_create(self, name: str, *, date_sec: int, date_nsec: int, vm_clock_nsec: int = 0,
                        vm_state_size: int = 0, icount: int | None = None,
                        vm_state: bytes | None = None) -> SnapshotEntry:
        self.require_alive()
        from vdkit.formats.qcow2 import snapshot_ops

        try:
            return snapshot_ops.create(self, name, date_sec=date_sec, date_nsec=date_nsec,
                                       vm_clock_nsec=vm_clock_nsec, vm_state_size=vm_state_size, icount=icount,
                                       vm_state=vm_state)
        except OSError as exc:
            raise _io_error(exc) from exc

    @staticmethod
    def _own(entry: SnapshotRecord) -> SnapshotEntry:
        """The generic layer hands back what :meth:`snapshots` listed: this format's table entries."""
        from vdkit.formats.qcow2.snapshot import SnapshotEntry

        if not isinstance(entry, SnapshotEntry):
            raise TypeError(f"not a qcow2 snapshot table entry: {entry!r}")
        return entry

    def readinto_filled(self, offset: int, view: memoryview,
                        fill: Callable[[int, memoryview], None] | None) -> None:
        """The I/O engine fills the view itself, backing data included (no bytes objects)."""
        self.require_alive()
        self.io.readinto(offset, view, fill)

    def read_vmstate(self, entry: SnapshotRecord) -> bytes:
        """VM state saved with ``entry`` (``savevm``); empty for disk-only snapshots."""
        self.require_alive()
        from vdkit.formats.qcow2 import snapshot_ops

        try:
            return snapshot_ops.read_vmstate(self, self._own(entry))
        except OSError as exc:
            raise _io_error(exc) from exc

    def save_vmstate(self, data: bytes) -> None:
        """Write ``data`` at the VM-state offset of the active layer (the next snapshot captures it).

        Goes through the write engine's per-table writer, because the guest
        write refuses offsets past the disk end.
        """
        self.require_alive()
        from vdkit.formats.qcow2.snapshot_ops import vm_state_offset

        io = self.io
        span = io.geom.l1_span
        start = vm_state_offset(self)
        view = memoryview(data)
        pos, end = start, start + len(data)
        while pos < end:
            i1 = pos // span
            t_end = min(end, (i1 + 1) * span)
            io._write_table(i1, pos, view[pos - start : t_end - start], None)
            pos = t_end
        self.flush()

    def forget_snapshot(self, entry: SnapshotRecord) -> None:
        self._snapshots = [e for e in self._snapshots if e is not entry]

    def snapshot_delete(self, *, snapshot_id: str | None = None, name: str | None = None) -> SnapshotEntry:
        self.require_alive()
        from vdkit.formats.qcow2 import snapshot_ops

        try:
            return snapshot_ops.delete(self, snapshot_id=snapshot_id, name=name)
        except OSError as exc:
            raise _io_error(exc) from exc

    def snapshot_revert(self, entry: SnapshotRecord) -> None:
        self.require_alive()
        from vdkit.formats.qcow2 import snapshot_ops

        try:
            snapshot_ops.revert(self, self._own(entry))
        except OSError as exc:
            raise _io_error(exc) from exc

    def snapshot_load_tmp(self, snapshot_id: str | None, name: str | None, *, fallback_name: bool = False) -> None:
        """Switch to the snapshot's L1 table and virtual size (read-only; nothing is written)."""
        from vdkit.block.snapshot import find_by_id_and_name
        from vdkit.errors import SnapshotNotFoundError

        if not self.file.readonly:
            raise VdkitError("Device is not readonly")
        entries = self.snapshots()
        entry = find_by_id_and_name(entries, snapshot_id, name)
        if entry is None and fallback_name:
            entry = find_by_id_and_name(entries, None, snapshot_id)
        if entry is None:
            raise SnapshotNotFoundError("Can't find snapshot", errno=errno.ENOENT)
        if entry.l1_size > L.MAX_L1_SIZE // 8:
            raise CorruptImageError("Snapshot L1 table too large")
        if entry.l1_table_offset % self.cluster_size:
            raise CorruptImageError("Snapshot L1 table offset invalid")
        self.header = self.header.evolve(size=entry.disk_size, l1_size=entry.l1_size,
                                         l1_table_offset=entry.l1_table_offset)
        for attr in ("clusters", "io"):
            self.__dict__.pop(attr, None)

    def mark_dirty(self) -> None:
        """Set the dirty bit (durably) before the first write that postpones refcounts.

        Only images with lazy refcounts do that; with the bit set, a crash
        leaves refcounts a writable open must repair first.
        """
        h = self.header
        if h.version < 3 or h.dirty:
            return
        self.file.flush()
        self._write_incompatible(h.incompatible_features | L.INCOMPAT_DIRTY)

    def mark_clean(self) -> None:
        """Clear the dirty bit once every cached refcount and table is on disk."""
        if not self.header.dirty:
            return
        self.flush()
        self.file.flush()
        self._write_incompatible(self.header.incompatible_features & ~L.INCOMPAT_DIRTY)

    def mark_consistent(self) -> None:
        """After a check that left nothing to repair: clear the dirty and corrupt bits (QEMU's mark
        clean and mark consistent), as the file holds them (a repair may have rewritten the header)."""
        if self.header.version < 3:
            return
        incompat = int.from_bytes(self.file.pread(72, 8), "big")
        cleared = incompat & ~(L.INCOMPAT_DIRTY | L.INCOMPAT_CORRUPT)
        if cleared != incompat:
            self.file.flush()  # (what the repair wrote is durable before the bits go)
            self._write_incompatible(cleared)

    def _write_incompatible(self, value: int) -> None:
        self.file.pwrite(72, value.to_bytes(8, "big"))
        self.file.flush()
        self.header = self.header.evolve(incompatible_features=value)

    # -- corruption events ---------------------------------------------------------------------
    def signal_corruption(self, message: str, *, offset: int = -1, size: int = -1, fatal: bool = True,
                          fallback: Callable[[str], None] | None = None) -> CorruptionEvent:
        """Signal metadata that cannot be trusted; returns the error the caller raises (EIO).

        The one place for every qcow2 corruption event (I/O engine, refcounts,
        check).  On a writable image the event is fatal, as in QEMU: the
        corrupt bit is set on disk (one 8-byte header write, flushed) so no
        later writable open trusts the image, and the node goes dead so no
        further request can make things worse.  On a read-only image only
        the request fails.  Only the first event of an image is reported
        (a fatal one still is after a non-fatal one); the report goes to
        :attr:`corruption_hook`, else to ``fallback`` (check's own output),
        else it rides on the returned exception.
        """
        fatal = fatal and not self.readonly and not self.file.readonly
        exc = CorruptionEvent(message, errno=errno.EIO)
        if self.corruption_signalled and (not fatal or self.header.corrupt):
            return exc
        report = CorruptionReport(message, offset, size, fatal, "qcow2")
        if fatal:
            self.dead = True
            # A version 2 header has no feature fields: bytes 72.. are its extensions
            # (backing format, ...), so there is nothing to mark, only the node to kill.
            if self.header.version >= 3:
                try:
                    self._write_incompatible(self.header.incompatible_features | L.INCOMPAT_CORRUPT)
                except OSError:
                    pass  # the node is dead either way; QEMU ignores a failed marking too
        self.corruption_signalled = True
        hook = self.corruption_hook
        if hook is not None:
            hook(report)
        elif fallback is not None:
            fallback(report.text)
        else:
            exc.report = report
        return exc

    def require_alive(self) -> None:
        """Fail a request on a node killed by a fatal corruption event, as QEMU does (no driver left)."""
        if self.dead:
            raise VdkitError("No medium found", errno=errno.ENOMEDIUM)

    def close(self) -> None:
        if self.dead:
            # Cached metadata of a dead node is not trusted: it is dropped, never written back.
            super().close()
            return
        if not self.readonly and self.file.fd >= 0:
            try:
                try:
                    self.store_dirty_bitmaps()
                except VdkitError as exc:
                    import sys

                    # QEMU goes on closing: the bitmaps stay in use on disk (inconsistent, never wrong)
                    sys.stderr.write(f"Lost persistent bitmaps during inactivation of node '{self.file.filename}': "
                                     f"{exc.message}\n")
                if self._flush_on_close():
                    self.mark_clean()  # a clean close clears the dirty bit we may have set
            finally:
                super().close()
            return
        super().close()

    def _flush_on_close(self) -> bool:
        """Write back the caches as QEMU's close does: a cache that cannot be written (a table at an
        offset no file can have) is reported and the close goes on.  False: something was not written."""
        import sys

        prog = "vdkit-daemon" if "vdkit.daemon.runtime" in sys.modules else "vdkit-img"
        ok = True
        caches: list[tuple[str, Callable[[], None]]] = []
        if "clusters" in self.__dict__:
            caches.append(("L2 table", self.clusters.l2.flush))
        if "refcounts" in self.__dict__:
            caches.append(("refcount block", self.refcounts.flush))
        for what, flush in caches:
            try:
                flush()
            except OSError as exc:
                ok = False
                sys.stderr.write(f"{prog}: Failed to flush the {what} cache: {os.strerror(exc.errno or errno.EIO)}\n")
        return ok

    # -- data path (vdkit.formats.qcow2.io) -------------------------------------
    @cached_property
    def io(self) -> Qcow2IO:
        from vdkit.formats.qcow2.io import Qcow2IO

        return Qcow2IO(self)

    def read(self, offset: int, length: int, backing: Callable[[int, int], bytes] | None = None) -> bytes:
        self.require_alive()
        return self.io.read(offset, length, backing)

    def block_status(self, offset: int, length: int) -> BlockStatus:
        self.require_alive()
        return self.io.status(offset, length)

    def status_runs(self, offset: int, end: int) -> Iterator[BlockStatus]:
        self.require_alive()
        return self.io.status_runs(offset, end)

    def write(self, offset: int, data: bytes, backing: Callable[[int, int], bytes] | None = None) -> None:
        self.require_alive()
        self.io.write(offset, data, backing)

    def write_zeroes(self, offset: int, length: int, backing: Callable[[int, int], bytes] | None = None, *,
                     unmap: bool = False) -> None:
        self.require_alive()
        self.io.write_zeroes(offset, length, backing, unmap=unmap)

    def discard(self, offset: int, length: int, *, has_backing: bool = False) -> None:
        self.require_alive()
        self.io.discard(offset, length, has_backing=has_backing)

    def copy_target(self, node: Node, *, created: bool, target_is_zero: bool, has_backing: bool,
                    compressed: bool) -> Target:
        """``convert``'s target: the qcow2 write engine (:mod:`vdkit.formats.qcow2.target`)."""
        from vdkit.block.target import zero_init
        from vdkit.formats.qcow2.target import Qcow2Target

        zero = zero_init(node, created=created, target_is_zero=target_is_zero, has_backing=has_backing)
        return Qcow2Target(node, has_zero_init=zero, compressed=compressed, created=created)

    def open_children(self, ctx: OpenContext) -> None:
        """The external data file, if the image has one (through the caller's open policy)."""
        if not self.header.has_data_file:
            return
        stored = self.header.data_file
        if stored is None:
            if ctx.no_io:
                return  # qemu-img info still describes such an image
            raise OpenError("'data-file' is required for this image")
        # QEMU 7.2 opens the stored name as is: a relative data file name is
        # relative to the working directory, not to the image (unlike backing files).
        try:
            if not stored:
                raise OpenError("The 'file' block driver requires a file name")
            self.data_file = ctx.open_child("data file", stored, stored)
        except VdkitError:
            if not ctx.no_io:
                raise

    def change_backing_file(self, name: str | None, fmt: str | None) -> None:
        """Rewrite the header with the new backing reference (one write of cluster 0's header part)."""
        from vdkit.formats.qcow2.layout import serialize_header

        if name and fmt is None:
            raise VdkitError("backing format must be specified")
        if name and self.header.has_data_file and self.header.data_file_raw:
            raise VdkitError("Cannot use a backing file with a raw external data file")
        h = self.header.evolve(backing_file=name or None, backing_format=fmt if name else None,
                               backing_file_raw=None)
        raw = serialize_header(h)
        self.file.pwrite(0, raw + bytes(self.cluster_size - len(raw)))
        self.file.flush()
        self.header = h

    def truncate(self, size: int, prealloc: str = "off", *, backing: Callable[[int, int], bytes] | None = None,
                 backing_size: int = 0) -> None:
        from vdkit.formats.qcow2.resize import truncate

        truncate(self, size, prealloc, backing=backing, backing_size=backing_size)
        self.__dict__.pop("io", None)  # the I/O engine caches geometry the resize changed

    def make_empty(self) -> None:
        from vdkit.formats.qcow2.empty import make_empty

        make_empty(self)

    def references(self) -> list[tuple[str, str]]:
        refs = super().references()
        if self.header.has_data_file and self.header.data_file is not None:
            refs.append(("data-file", self.header.data_file))
        return refs

    def inspect_issues(self) -> list[tuple[str, str]]:
        """Header flags QEMU acts on, then the whole metadata walk of ``qemu-img check``."""
        h = self.header
        issues: list[tuple[str, str]] = []
        if h.has_data_file and h.data_file is None:
            issues.append(("data-file", "the image needs an external data file but names none"))
        if h.corrupt:
            issues.append(("corrupt-flag", "the image is marked corrupt"))
        if h.dirty:
            issues.append(("dirty", "the refcounts are not up to date (QEMU repairs them on a writable open)"))
        found: list[str] = []
        result = self.check(None, lambda line: found.append(line.lstrip("\0")))
        if result.error:
            issues.append(("invalid-metadata", f"the metadata walk failed: {os.strerror(-result.error)}"))
        if result.corruptions or result.check_errors:
            first = "; ".join(found[:3])
            issues.append(("corrupt-metadata",
                           f"{result.corruptions} corruptions, {result.check_errors} check errors"
                           + (f" ({first})" if first else "")))
        return issues

    def specific_info(self) -> ImageInfoSpecific:
        """``Format specific information`` (QAPI ``ImageInfoSpecificQcow2``): v3's members only on a v3
        image, as QEMU reports them.  (Here rather than in a module of its own: ``info`` reads it
        every time, and each module costs a share of every start.)"""
        from vdkit.info.model import ImageInfoSpecific, ImageInfoSpecificQcow2

        h = self.header
        encrypt: LuksInfo | AesEncryptionInfo | None = None
        if h.crypt_method == L.CRYPT_LUKS:
            raw = self.luks_header()
            from vdkit.formats.luks import luks_info

            encrypt = luks_info(raw) if raw is not None else None
        elif h.crypt_method == L.CRYPT_AES:
            from vdkit.info.extra_model import AesEncryptionInfo

            encrypt = AesEncryptionInfo()
        spec = ImageInfoSpecificQcow2(
            compat="0.10" if h.version == 2 else "1.1",
            refcount_bits=h.refcount_bits,
            compression_type=L.COMPRESSION_NAMES[h.compression_type],
            encrypt=encrypt,
        )
        if h.version >= 3:
            spec.lazy_refcounts = h.lazy_refcounts
            spec.corrupt = h.corrupt
            spec.extended_l2 = h.extended_l2
            spec.data_file = h.data_file
            if h.has_data_file:
                spec.data_file_raw = h.data_file_raw
            bitmaps = self.bitmaps
            if bitmaps:
                from vdkit.info.extra_model import Qcow2BitmapInfo

                spec.bitmaps = [
                    Qcow2BitmapInfo(
                        name=b.name,
                        granularity=b.granularity,
                        flags=[f for bit, f in ((b.IN_USE, "in-use"), (b.AUTO, "auto")) if b.flags & bit],
                    )
                    for b in bitmaps
                ]
        return ImageInfoSpecific("qcow2", spec)

    def check(self, repair: str | None, report: CheckReport) -> CheckResult:
        """A check first tries the proof by runs (:mod:`.check_runs`: a consistent image, the usual
        case, without loading the full walk's module or numpy; a repair then has nothing to do but
        clear the dirty and corrupt bits); anything it cannot prove clean goes to the full walk
        (:mod:`.check`), which reports and repairs in QEMU's order."""
        if not self.dead:
            from vdkit.formats.qcow2 import check_runs

            if check_runs.ENABLED:
                clean = check_runs.check_clean(self)
                if clean is not None:
                    if repair is not None:
                        self.mark_consistent()
                    return clean
        from vdkit.formats.qcow2.check import check

        return check(self, repair, report)

    def snapshot_unsupported_reason(self) -> str | None:
        if self.header.has_data_file:
            return "Operation not supported"
        return None
