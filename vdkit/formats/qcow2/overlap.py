"""The qcow2 metadata overlap check: which structure a host write would land on.

A damaged image can point guest data, or a table the driver is about to
rewrite, at clusters that hold the image's own metadata; writing there would
destroy what describes the disk.  QEMU tests every such write against its
in-memory metadata before issuing it and, on a hit, raises a corruption event
naming the first structure hit.  The I/O engine (:mod:`.io`, guest and
metadata writes of an open image) and ``check``'s repairs (:mod:`.check`, with
the state a check holds) both ask this one test, each describing what it has
in memory as a :class:`MetadataMap`.

The sections are bit flags as QEMU's, so a writer that updates one
structure in place excludes it (``ignore``).  The order of the tests, and so
the name an event carries when a cluster is two things at once, is QEMU's:
the structures known by offset and size first, then the tables found through
them.  Inactive L2 tables would need reading and are never tested (QEMU's
default "cached" mode).
"""

from __future__ import annotations

import sys
from _bisect import bisect_right  # (bisect's C module: bisect.py costs a quarter of a ms to import)
from itertools import compress

from vdkit.formats.qcow2 import layout as L
from vdkit.record import record

TYPE_CHECKING = False  # typing, collections and dataclasses are not imported at run time (start-up cost)
if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence
    from typing import ClassVar, Protocol

    import numpy as np

    Table = np.ndarray | Sequence[int]  # table entries: numpy uint64 or plain ints

    class SnapshotL1(Protocol):
        """What the test needs of a snapshot: where its L1 table is (a snapshot table entry has it)."""

        @property
        def l1_table_offset(self) -> int: ...

        @property
        def l1_size(self) -> int: ...


class Metadata(int):
    """The metadata sections of a qcow2 image, as QEMU numbers them (bit flags).

    An ``int`` subclass rather than an ``enum.IntFlag``: ``enum`` costs several milliseconds of every
    process that writes or walks qcow2 metadata, and the sections need only their values, ``&`` and ``|``.
    """

    __slots__ = ()

    MAIN_HEADER: ClassVar[Metadata]
    ACTIVE_L1: ClassVar[Metadata]
    ACTIVE_L2: ClassVar[Metadata]
    REFCOUNT_TABLE: ClassVar[Metadata]
    REFCOUNT_BLOCK: ClassVar[Metadata]
    SNAPSHOT_TABLE: ClassVar[Metadata]
    INACTIVE_L1: ClassVar[Metadata]
    INACTIVE_L2: ClassVar[Metadata]
    BITMAP_DIRECTORY: ClassVar[Metadata]

    def __or__(self, other: int) -> Metadata:
        return Metadata(int(self) | int(other))

    __ror__ = __or__

    def __repr__(self) -> str:
        return f"Metadata({int(self):#x})"


Metadata.MAIN_HEADER = Metadata(0x01)
Metadata.ACTIVE_L1 = Metadata(0x02)
Metadata.ACTIVE_L2 = Metadata(0x04)
Metadata.REFCOUNT_TABLE = Metadata(0x08)
Metadata.REFCOUNT_BLOCK = Metadata(0x10)
Metadata.SNAPSHOT_TABLE = Metadata(0x20)
Metadata.INACTIVE_L1 = Metadata(0x40)
Metadata.INACTIVE_L2 = Metadata(0x80)
Metadata.BITMAP_DIRECTORY = Metadata(0x100)

NONE = Metadata(0)

# The name each section has in QEMU's corruption messages ("... (overlaps with <name>)").
NAMES: dict[Metadata, str] = {
    Metadata.MAIN_HEADER: "qcow2_header",
    Metadata.ACTIVE_L1: "active L1 table",
    Metadata.ACTIVE_L2: "active L2 table",
    Metadata.REFCOUNT_TABLE: "refcount table",
    Metadata.REFCOUNT_BLOCK: "refcount block",
    Metadata.SNAPSHOT_TABLE: "snapshot table",
    Metadata.INACTIVE_L1: "inactive L1 table",
    Metadata.INACTIVE_L2: "inactive L2 table",
    Metadata.BITMAP_DIRECTORY: "bitmap directory",
}


def overlap_text(name: str) -> str:
    """QEMU's corruption event for a write refused because it would meet the metadata structure ``name``
    (the one text of the I/O engine, the driver's metadata writers, refcount transactions and check)."""
    return f"Preventing invalid write on metadata (overlaps with {name})"


@record(frozen=True, slots=True)
class MetadataMap:
    """The metadata a writer holds in memory, as the overlap test sees it.

    ``l1`` and ``reftable`` are the raw table entries (numpy ``uint64`` arrays
    or any sequence of ints, or their :class:`SortedOffsets`): their offsets
    name the active L2 tables and the refcount blocks.  ``bitmap_directory`` is ``None`` unless the image's
    bitmaps are trusted (autoclear bit set), as QEMU only knows the directory
    then.
    """

    cluster_size: int
    l1_offset: int
    l1_size: int  # entries
    l1: Table | SortedOffsets
    reftable_offset: int
    reftable_bytes: int
    reftable: Table | SortedOffsets
    snapshots_offset: int
    snapshots_bytes: int
    snapshots: Iterable[SnapshotL1]
    bitmap_directory: tuple[int, int] | None  # (offset, size)


def first_overlap(m: MetadataMap, offset: int, size: int, ignore: Metadata = NONE) -> Metadata | None:
    """The first section (but ``ignore``) a write of ``[offset, offset + size)`` meets, or None.

    The range is widened to whole clusters; the structures are taken as
    they are (a table at an unaligned offset counts from that offset).
    """
    cs = m.cluster_size
    if size <= 0:
        return None
    if not ignore & Metadata.MAIN_HEADER and offset < cs:
        return Metadata.MAIN_HEADER
    lo = offset - offset % cs
    hi = offset + size + (-(offset + size)) % cs

    def hit(off: int, length: int) -> bool:
        return length > 0 and off < hi and lo < off + length

    if not ignore & Metadata.ACTIVE_L1 and hit(m.l1_offset, m.l1_size * 8):
        return Metadata.ACTIVE_L1
    if not ignore & Metadata.REFCOUNT_TABLE and hit(m.reftable_offset, m.reftable_bytes):
        return Metadata.REFCOUNT_TABLE
    if not ignore & Metadata.SNAPSHOT_TABLE and hit(m.snapshots_offset, m.snapshots_bytes):
        return Metadata.SNAPSHOT_TABLE
    if not ignore & Metadata.INACTIVE_L1 and any(hit(sn.l1_table_offset, sn.l1_size * 8) for sn in m.snapshots):
        return Metadata.INACTIVE_L1
    if not ignore & Metadata.ACTIVE_L2 and _names_cluster_in(m.l1, L.L1E_OFFSET_MASK, lo, hi, cs):
        return Metadata.ACTIVE_L2
    if not ignore & Metadata.REFCOUNT_BLOCK and _names_cluster_in(m.reftable, L.REFT_OFFSET_MASK, lo, hi, cs):
        return Metadata.REFCOUNT_BLOCK
    if not ignore & Metadata.BITMAP_DIRECTORY and m.bitmap_directory is not None and hit(*m.bitmap_directory):
        return Metadata.BITMAP_DIRECTORY
    return None


def metadata_end(m: MetadataMap) -> int:
    """Where the last cluster of any section of ``m`` ends: no write at or past it meets metadata.

    Guest data is mostly allocated past every table (an image grows at its end), so a writer can
    answer the test for such a range from this one number while the map holds.
    """
    cs = m.cluster_size
    ends = [cs, m.l1_offset + m.l1_size * 8, m.reftable_offset + m.reftable_bytes,
            m.snapshots_offset + m.snapshots_bytes]
    ends += [sn.l1_table_offset + sn.l1_size * 8 for sn in m.snapshots]
    for table, mask in ((m.l1, L.L1E_OFFSET_MASK), (m.reftable, L.REFT_OFFSET_MASK)):
        if isinstance(table, SortedOffsets):
            if table.offsets:
                ends.append(table.offsets[-1] + cs)
        else:
            ends += [(e & mask) + cs for e in table if e & mask]
    if m.bitmap_directory is not None:
        ends.append(m.bitmap_directory[0] + m.bitmap_directory[1])
    end = max(ends)
    return end + (-end) % cs


class SortedOffsets:
    """The offsets a table's entries name (masked, zeros left out), sorted: one binary search per test.

    A writer tests every allocating write (whose range is new each time, so no
    memo of clean ranges helps) against its L1 and refcount tables; scanning
    the whole tables cost a third of ``convert``'s copy time for a new image
    (its refcount table is a cluster of mostly empty entries).  The writer
    keeps one of these per table while the table's content stays the same
    (:meth:`Qcow2IO._sorted_offsets`).
    """

    __slots__ = ("offsets",)

    def __init__(self, entries: Table, mask: int) -> None:
        numpy = sys.modules.get("numpy")
        if numpy is not None and isinstance(entries, numpy.ndarray):
            offs = entries & numpy.uint64(mask)
            self.offsets: list[int] = sorted(offs[offs != 0].tolist())
        else:  # (compress skips the zero entries at C speed: a refcount table is mostly zeros)
            self.offsets = sorted(off for e in compress(entries, entries) if (off := e & mask))

    def meets(self, lo: int, hi: int, cs: int) -> bool:
        """Whether a cluster named here meets ``[lo, hi)``: the first offset above ``lo - cs`` is below ``hi``."""
        offs = self.offsets
        i = bisect_right(offs, lo - cs)
        return i < len(offs) and offs[i] < hi


def _names_cluster_in(entries: Table | SortedOffsets, mask: int, lo: int, hi: int, cs: int) -> bool:
    """Whether a table entry (masked to its offset; 0 = none) names a cluster meeting ``[lo, hi)``.

    A cluster at ``off`` meets the range iff ``lo - cs < off < hi``.  This
    runs for every write to a range not known clean, so a numpy table is
    tested with one unsigned subtraction and compare (which also excludes 0),
    and a writer's tables come as :class:`SortedOffsets` (``mask`` applied).
    """
    if isinstance(entries, SortedOffsets):
        return entries.meets(lo, hi, cs)
    numpy = sys.modules.get("numpy")  # an ndarray implies numpy is loaded: no import for plain tables
    if numpy is not None and isinstance(entries, numpy.ndarray):
        base = max(lo - cs + 1, 1)
        u64 = numpy.uint64
        return bool(((entries & u64(mask)) - u64(base) < u64(hi - base)).any())
    return any(lo - cs < off < hi for e in entries if (off := e & mask))
