"""Persistent dirty bitmaps in qcow2's bitmaps extension: load, mark in use, store, remove.

The on-disk layout (qcow2 spec, "Bitmaps extension"; reference qcow2-format.md
§4.2): a header extension points at the bitmap directory; each directory
entry names a one-level bitmap table whose entries point at clusters of raw
bits (bit *i* = granule *i*, least significant bit first), 0 for a cluster of
zeros and 1 for a cluster of ones.

Crash safety follows the format's rules, which are also QEMU's:

* A writable open sets every entry's ``in_use`` flag on disk before any
  guest write can land (the directory is rewritten in place with the
  ``bitmaps`` autoclear bit cleared around the write, so a torn directory is
  never trusted).  A bitmap found ``in_use`` at open was not saved by its
  last writer: it is loaded as *inconsistent* (listed, not usable).
* Storing writes new data clusters, new tables and a new directory into
  freshly allocated clusters, flushes, then switches the header in one write;
  only then are the old tables, data and directory freed.  A crash before the
  switch leaves the old directory (``in_use``: inconsistent, never wrong) and
  some leaked clusters, which ``qemu-img check -r leaks`` reclaims.

The allocation order (data clusters of each bitmap, then its table, bitmap by
bitmap in directory order, then the directory) and the write sizes (a table
or directory is written with its own length only, so the file may end
mid-cluster) are those of QEMU 7.2, so files come out byte for byte as it
writes them.
"""

from __future__ import annotations

import errno

from vdkit.block.dirty_bitmap import MAX_NAME_SIZE, DirtyBitmap
from vdkit.errors import VdkitError
from vdkit.formats.qcow2 import layout as L
from vdkit.formats.qcow2.layout import BitmapsExtension

TYPE_CHECKING = False
if TYPE_CHECKING:
    from vdkit.formats.qcow2.driver import BitmapEntry, Qcow2Driver

IN_USE = 1 << 0
AUTO = 1 << 1
TYPE_DIRTY_TRACKING = 1
MIN_GRANULARITY_BITS = 9
MAX_GRANULARITY_BITS = 31
MAX_TABLE_SIZE = 0x8000000 // 8  # QEMU's BME_MAX_TABLE_SIZE (entries)
MAX_PHYS_SIZE = 0x20000000  # BME_MAX_PHYS_SIZE: 512 MiB of bitmap data
TABLE_OFFSET_MASK = 0x00FFFFFFFFFFFE00
TABLE_RESERVED_MASK = 0xFF000000000001FE
TABLE_ALL_ONES = 1


class _Entry:
    """One directory entry while a directory is rebuilt (QEMU's ``Qcow2Bitmap``)."""

    __slots__ = ("name", "table_offset", "table_size", "flags", "granularity_bits", "bitmap")

    def __init__(self, name: str, table_offset: int, table_size: int, flags: int, granularity_bits: int) -> None:
        self.name = name
        self.table_offset = table_offset
        self.table_size = table_size
        self.flags = flags
        self.granularity_bits = granularity_bits
        self.bitmap: DirtyBitmap | None = None


def _entries(drv: Qcow2Driver) -> list[_Entry]:
    return [_Entry(e.name, e.table_offset, e.table_size, e.flags, e.granularity_bits) for e in drv.bitmaps]


def _entry_size(name: str) -> int:
    return L.align_up(L.BITMAP_DIR_ENTRY.size + len(name.encode()), 8)


def _directory_bytes(entries: list[_Entry]) -> bytes:
    out = bytearray()
    for e in entries:
        raw = e.name.encode()
        out += L.BITMAP_DIR_ENTRY.pack(e.table_offset, e.table_size, e.flags, TYPE_DIRTY_TRACKING,
                                       e.granularity_bits, len(raw), 0)
        out += raw
        out += bytes(-len(out) % 8)
    return bytes(out)


def _cluster_span(drv: Qcow2Driver, granularity: int) -> int:
    """Guest bytes one cluster of bitmap data covers."""
    return granularity * drv.cluster_size * 8


def _read_table(drv: Qcow2Driver, name: str, offset: int, size: int) -> list[int]:
    raw = drv.file.pread(offset, size * 8)
    table = [int.from_bytes(raw[i : i + 8], "big") for i in range(0, size * 8, 8)]
    for entry in table:
        off = entry & TABLE_OFFSET_MASK
        if entry & TABLE_RESERVED_MASK or (off and (entry & TABLE_ALL_ONES or off % drv.cluster_size)):
            raise VdkitError(f"Could not read bitmap '{name}' from image: Invalid argument", errno=errno.EINVAL)
    return table


# -- loading -----------------------------------------------------------------------------------


def load(drv: Qcow2Driver) -> list[DirtyBitmap]:
    """The image's bitmaps as QEMU loads them at open, newest first (the directory's reverse).

    ``in_use`` ones come back inconsistent (no data, not recording); those
    without the ``auto`` flag disabled; on a read-only image all read-only.
    A writable image gets ``in_use`` set on disk for the others.
    """
    entries = drv.bitmaps
    if not entries:
        return []
    size = drv.virtual_size
    writable = not drv.readonly and not drv.file.readonly
    out: list[DirtyBitmap] = []
    needs_update = False
    for e in entries:
        bm = DirtyBitmap(e.name, e.granularity, size, enabled=bool(e.flags & AUTO), persistent=True)
        if e.flags & IN_USE:
            bm.inconsistent = True
            bm.enabled = False
        else:
            _load_data(drv, e, bm)
            needs_update = True
        bm.readonly = not writable
        out.append(bm)
    if needs_update and writable:
        mark_in_use(drv)
    out.reverse()
    return out


def _load_data(drv: Qcow2Driver, e: BitmapEntry, bm: DirtyBitmap) -> None:
    span_granules = drv.cluster_size * 8
    table = _read_table(drv, e.name, e.table_offset, e.table_size)
    for i, entry in enumerate(table):
        first = i * span_granules
        count = min(span_granules, bm.granules - first)
        if count <= 0:
            break
        off = entry & TABLE_OFFSET_MASK
        if off:
            data = drv.file.pread(off, (count + 7) // 8)
            bm.deserialize(first, data, count)
        elif entry & TABLE_ALL_ONES:
            bm.set_dirty(first << bm.shift, count << bm.shift)


def _sync_header(drv: Qcow2Driver, **changes: object) -> None:
    drv.header = drv.header.evolve(**changes)
    drv.rewrite_header()


def mark_in_use(drv: Qcow2Driver) -> None:
    """Rewrite the directory in place with every ``in_use`` flag set, the extension untrusted meanwhile."""
    h = drv.header
    ext = h.bitmaps
    assert ext is not None
    entries = _entries(drv)
    for e in entries:
        e.flags |= IN_USE
    raw = _directory_bytes(entries)
    if len(raw) != ext.directory_size:
        raise VdkitError("Can't update bitmap directory: Invalid argument", errno=errno.EINVAL)
    _sync_header(drv, autoclear_features=h.autoclear_features & ~L.AUTOCLEAR_BITMAPS)
    # the same clusters, the same length, the extension untrusted meanwhile: no other structure is touched
    drv.file.pwrite(ext.directory_offset, raw)
    drv.file.flush()
    _sync_header(drv, autoclear_features=h.autoclear_features | L.AUTOCLEAR_BITMAPS)
    drv.__dict__.pop("bitmaps", None)  # the directory changed: read it again when asked


def truncate_check(drv: Qcow2Driver) -> None:
    """QEMU resizes an image with stored bitmaps only when every one is loaded and marked in use (they
    are then stored again, at the new size, when the image closes)."""
    if drv.dirty_bitmaps is None:
        drv.dirty_bitmaps = drv.load_dirty_bitmaps()
    loaded = {b.name for b in drv.dirty_bitmaps}
    for e in drv.bitmaps:
        if e.name not in loaded:
            raise VdkitError(f"Bitmap '{e.name}' not loaded", errno=errno.EINVAL)
        if not e.flags & IN_USE:
            raise VdkitError(f"Bitmap '{e.name}' is not in use", errno=errno.EINVAL)


# -- checks for a new persistent bitmap -----------------------------------------------------------


def check_constraints(drv: Qcow2Driver, name: str, granularity: int) -> str | None:
    """Why ``name``/``granularity`` cannot be stored in this image (QEMU's texts), else None."""
    bits = granularity.bit_length() - 1
    size = drv.virtual_size
    if bits < MIN_GRANULARITY_BITS:
        return f"Granularity exceeds minimum ({1 << MIN_GRANULARITY_BITS} bytes)"
    if bits > MAX_GRANULARITY_BITS:
        return f"Granularity exceeds maximum ({1 << MAX_GRANULARITY_BITS} bytes)"
    if size > MAX_PHYS_SIZE << bits or size > (MAX_TABLE_SIZE * drv.cluster_size) << bits:
        return "Too much space will be occupied by the bitmap. Use larger granularity"
    if len(name.encode()) > MAX_NAME_SIZE:
        return f"Name length exceeds maximum ({MAX_NAME_SIZE} characters)"
    return None


def can_store(drv: Qcow2Driver, name: str, granularity: int, label: str) -> None:
    h = drv.header
    why: str | None
    if h.version < 3:
        why = "Cannot store dirty bitmaps in qcow2 v2 files"
    else:
        why = check_constraints(drv, name, granularity)
        if why is None and h.bitmaps is not None and not h.bitmaps_inconsistent:
            if h.bitmaps.nb_bitmaps >= L.MAX_BITMAPS:
                why = "Maximum number of persistent bitmaps is already reached"
            elif h.bitmaps.directory_size + _entry_size(name) > L.MAX_BITMAP_DIRECTORY_SIZE:
                why = "Not enough space in the bitmap directory"
    if why is not None:
        raise VdkitError(f"Can't make bitmap '{name}' persistent in '{label}': {why}")


# -- storing -----------------------------------------------------------------------------------


def store(drv: Qcow2Driver, bitmaps: list[DirtyBitmap]) -> None:
    """Write the persistent bitmaps into the image (QEMU's ``qcow2_store_persistent_dirty_bitmaps``).

    Bitmaps already in the directory (``in_use``, loaded by us) get new tables
    in place of their old ones; new ones are appended, in the node's list
    order (newest first).  Inconsistent and read-only bitmaps are left as the
    directory has them.
    """
    if not any(b.persistent and not b.readonly for b in bitmaps):
        return
    entries = _entries(drv) if drv.header.bitmaps is not None and not drv.header.bitmaps_inconsistent else []
    by_name = {e.name: e for e in entries}
    drop: list[tuple[int, int]] = []
    need_write = False
    for bm in bitmaps:
        if not bm.persistent or bm.inconsistent or bm.readonly or bm.name is None:
            continue
        need_write = True
        why = check_constraints(drv, bm.name, bm.granularity)
        if why is not None:
            raise VdkitError(f"Bitmap '{bm.name}' doesn't satisfy the constraints: {why}")
        e = by_name.get(bm.name)
        if e is None:
            e = _Entry(bm.name, 0, 0, 0, 0)
            entries.append(e)
            by_name[bm.name] = e
        else:
            if not e.flags & IN_USE:
                raise VdkitError(f"Bitmap '{bm.name}' already exists in the image")
            drop.append((e.table_offset, e.table_size))
            e.table_offset = e.table_size = 0
        e.flags = AUTO if bm.enabled else 0
        e.granularity_bits = bm.shift
        e.bitmap = bm
    if not need_write:
        return
    if drv.readonly or drv.file.readonly:
        raise VdkitError("No write access")
    for e in entries:
        if e.bitmap is not None:
            e.table_offset, e.table_size = _store_bitmap(drv, e.bitmap)
    _switch_directory(drv, entries)
    for offset, size in drop:
        _free_table(drv, offset, size)


def _store_bitmap(drv: Qcow2Driver, bm: DirtyBitmap) -> tuple[int, int]:
    """Data clusters (only those with a dirty bit), then the table; returns (table offset, entries)."""
    cs = drv.cluster_size
    rc = drv.refcounts
    per_cluster = cs * 8  # granules per data cluster
    table_size = -(-bm.granules // per_cluster)
    if table_size > MAX_TABLE_SIZE or table_size * cs > MAX_PHYS_SIZE:
        raise VdkitError(f"Bitmap '{bm.name}' is too big")
    table = [0] * table_size
    for i in bm.dirty_clusters(per_cluster):
        first = i * per_cluster
        count = min(per_cluster, bm.granules - first)
        data = bm.serialize(first, count)
        off = rc.alloc_clusters(cs)
        table[i] = off
        drv.io._check_overlap(off, cs)
        drv.file.pwrite(off, data + bytes(cs - len(data)))
    raw = b"".join(t.to_bytes(8, "big") for t in table)
    tb_off = rc.alloc_clusters(len(raw))
    drv.io._check_overlap(tb_off, len(raw))
    drv.file.pwrite(tb_off, raw)
    return tb_off, table_size


def _switch_directory(drv: Qcow2Driver, entries: list[_Entry]) -> None:
    """New directory in new clusters, everything flushed, then one header write; the old directory freed."""
    h = drv.header
    old = h.bitmaps if not h.bitmaps_inconsistent else None
    if entries:
        raw = _directory_bytes(entries)
        if len(raw) > L.MAX_BITMAP_DIRECTORY_SIZE or len(entries) > L.MAX_BITMAPS:
            raise VdkitError("Failed to update bitmap extension: Invalid argument", errno=errno.EINVAL)
        off = drv.refcounts.alloc_clusters(len(raw))
        drv.io._check_overlap(off, len(raw))
        drv.file.pwrite(off, raw)
        drv.flush()
        drv.file.flush()
        _sync_header(drv, bitmaps=BitmapsExtension(len(entries), len(raw), off), bitmaps_inconsistent=False,
                     autoclear_features=h.autoclear_features | L.AUTOCLEAR_BITMAPS)
    else:
        _sync_header(drv, bitmaps=None, bitmaps_inconsistent=False,
                     autoclear_features=h.autoclear_features & ~L.AUTOCLEAR_BITMAPS)
    drv.__dict__.pop("bitmaps", None)
    if old is not None and old.directory_size:
        drv.refcounts.release(old.directory_offset, old.directory_size)


def _free_table(drv: Qcow2Driver, offset: int, size: int) -> None:
    """Free a bitmap's data clusters (discarded: they read as zeros) and then its table."""
    if not size:
        return
    try:
        table = _read_table(drv, "", offset, size)
    except (VdkitError, OSError):
        return
    cs = drv.cluster_size
    for entry in table:
        off = entry & TABLE_OFFSET_MASK
        if off and drv.refcounts.release(off, cs):
            drv.file.punch_hole(off, cs, extend=False)
    drv.refcounts.release(offset, size * 8)


def remove(drv: Qcow2Driver, name: str) -> None:
    """Drop ``name`` from the directory now (``block-dirty-bitmap-remove`` of a persistent bitmap)."""
    h = drv.header
    if h.bitmaps is None or h.bitmaps_inconsistent:
        return
    entries = _entries(drv)
    e = next((x for x in entries if x.name == name), None)
    if e is None:
        return
    entries.remove(e)
    _switch_directory(drv, entries)
    _free_table(drv, e.table_offset, e.table_size)
