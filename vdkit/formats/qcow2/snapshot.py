"""The qcow2 internal snapshot table: entries, parsing and serialisation.

The table is read whole at open (it is bounded by 64 MiB and 65536 entries,
the limits QEMU enforces) and is never updated in place: writers build a new
table elsewhere and switch the header to it (see the snapshot operations in
``snapshot_ops``).  Unknown extra data is carried verbatim so a rewrite never
drops what a newer writer stored.
"""

from __future__ import annotations

import errno

from vdkit.block.snapshot import ICOUNT_UNUSED
from vdkit.errors import OpenError
from vdkit.formats.qcow2 import layout as L
from vdkit.record import field, record

TYPE_CHECKING = False  # collections.abc is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from collections.abc import Callable


@record
class SnapshotEntry:
    """One snapshot table entry as stored on disk."""

    l1_table_offset: int
    l1_size: int
    id_str: str
    name: str
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    disk_size: int
    icount: int = ICOUNT_UNUSED
    extra_data_size: int = L.SNAPSHOT_EXTRA_SIZE
    unknown_extra: bytes = field(default=b"", repr=False)

    def encoded_size(self) -> int:
        """Bytes this entry occupies when written, before alignment padding."""
        extra = max(L.SNAPSHOT_EXTRA_SIZE, self.extra_data_size)
        names = len(self.id_str.encode("utf-8", "surrogateescape")) + len(self.name.encode("utf-8", "surrogateescape"))
        return L.SNAPSHOT_HEADER.size + extra + names


@record
class TableRepairs:
    """What a repairing read dropped (``qemu-img check -r all``, phase 1)."""

    extra_data_dropped: int = 0
    snapshots_dropped: int = 0


def parse_snapshot_table(
    buf: bytes, nb_snapshots: int, *, disk_size: int, check_mode: bool = False,
    repair: TableRepairs | None = None, report: Callable[[str], None] | None = None,
) -> tuple[list[SnapshotEntry], int]:
    """Decode ``nb_snapshots`` entries from ``buf`` (the table's bytes).

    Returns the entries and the table size in bytes (ending right after the
    last name).  ``buf`` may be shorter than the table when the file ends
    early; missing bytes read as zero, as they do through QEMU's file layer.

    Without ``repair`` an entry with more than 1024 bytes of extra data, or a
    table whose entries (extra data counted up to 1024 bytes) exceed 64 MiB or
    span more than ``INT_MAX`` bytes, is an error.  With ``repair`` (check
    ``-r all``) the extra data is cut to 1024 bytes and the table is cut before
    the entry that makes it too big; each step is announced through ``report``
    and counted in ``repair``.  The returned size then ends after the last
    entry kept (skipped extra data still counts: it lies inside the table).
    ``check_mode`` changes nothing (kept for callers): the check reads with
    ``repair`` under ``-r all`` and fails like a normal open otherwise.
    """
    entries: list[SnapshotEntry] = []
    off = 0
    table_length = 0
    # Hot loop for images with hundreds of snapshots (it runs on every ``info``): bind locals,
    # unpack in place where the table is complete, copy only where the file ended early.
    fixed_struct, fixed_size = L.SNAPSHOT_HEADER, L.SNAPSHOT_HEADER.size
    extra_struct, known_extra = L.SNAPSHOT_EXTRA, L.SNAPSHOT_EXTRA_SIZE
    max_extra, max_table, unused = L.MAX_SNAPSHOT_EXTRA_DATA, L.MAX_SNAPSHOT_TABLE_SIZE, ICOUNT_UNUSED
    buf_len = len(buf)
    for i in range(nb_snapshots):
        entry_start = off
        off = (off + 7) & ~7
        table_length = (table_length + 7) & ~7
        if off + fixed_size <= buf_len:
            fields = fixed_struct.unpack_from(buf, off)
        else:
            fields = fixed_struct.unpack(_take(buf, off, fixed_size))
        l1_off, l1_size, id_len, name_len, date_sec, date_nsec, vm_clock, vm_state32, extra_size = fields
        off += fixed_size
        if extra_size > max_extra:
            if repair is None:
                raise OpenError(
                    f"Too much extra metadata in snapshot table entry {i}",
                    hint="You can force-remove this extra metadata with qemu-img check -r all",
                    errno=errno.EFBIG,
                )
            if report is not None:
                report(f"Discarding too much extra metadata in snapshot table entry {i} "
                       f"({extra_size} > {max_extra})")
            repair.extra_data_dropped += 1
        kept_extra = min(extra_size, max_extra)
        table_length += fixed_size + kept_extra + id_len + name_len
        if table_length > max_table or off + extra_size + id_len + name_len > 2**31 - 1:
            overhang = nb_snapshots - i
            if repair is None:
                raise OpenError(
                    "Snapshot table is too big",
                    hint=f"You can force-remove all {overhang} overhanging snapshots with qemu-img check -r all",
                    errno=errno.EFBIG,
                )
            if report is not None:
                report(f"Discarding {overhang} overhanging snapshots (snapshot table is too big)")
            repair.snapshots_dropped += overhang
            off = entry_start
            break
        vm_state_size = vm_state32
        entry_disk_size = disk_size
        icount = unused
        unknown = b""
        if kept_extra == known_extra and off + known_extra <= buf_len:
            vm_state_size, entry_disk_size, icount = extra_struct.unpack_from(buf, off)
        elif kept_extra:
            extra = _take(buf, off, kept_extra)
            if kept_extra >= 8:
                vm_state_size = int.from_bytes(extra[0:8], "big")
            if kept_extra >= 16:
                entry_disk_size = int.from_bytes(extra[8:16], "big")
            if kept_extra >= 24:
                icount = int.from_bytes(extra[16:24], "big")
            if kept_extra > known_extra:
                unknown = extra[known_extra:]
        off += extra_size
        # QEMU keeps both as C strings: an embedded NUL (or a table cut short by
        # EOF, which reads as zeros) ends the string.
        end = off + id_len + name_len
        raw = bytes(buf[off:end]) if end <= buf_len else _take(buf, off, id_len + name_len)
        id_str = raw[:id_len].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        name = raw[id_len:].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        off = end
        entries.append(
            SnapshotEntry(l1_off, l1_size, id_str, name, date_sec, date_nsec, vm_clock, vm_state_size,
                          entry_disk_size, icount, kept_extra, unknown)
        )
    return entries, off


def _take(buf: bytes, off: int, n: int) -> bytes:
    chunk = bytes(buf[off : off + n])
    if len(chunk) < n:
        chunk += bytes(n - len(chunk))
    return chunk


def table_size(entries: list[SnapshotEntry]) -> int:
    """Size of the serialised table (QEMU counts no padding after the last entry)."""
    off = 0
    for e in entries:
        off = L.align_up(off, 8) + e.encoded_size()
    return off


def serialize_snapshot_table(entries: list[SnapshotEntry]) -> bytes:
    """The table exactly as QEMU 7.2 writes it (extra data at least 24 bytes)."""
    out = bytearray()
    for e in entries:
        out += bytes(L.align_up(len(out), 8) - len(out))
        extra_size = max(L.SNAPSHOT_EXTRA_SIZE, e.extra_data_size)
        id_b = e.id_str.encode("utf-8", "surrogateescape")
        name_b = e.name.encode("utf-8", "surrogateescape")
        vm32 = e.vm_state_size if e.vm_state_size < 2**32 else 0
        out += L.SNAPSHOT_HEADER.pack(
            e.l1_table_offset, e.l1_size, len(id_b), len(name_b), e.date_sec, e.date_nsec,
            e.vm_clock_nsec, vm32, extra_size,
        )
        out += L.SNAPSHOT_EXTRA.pack(e.vm_state_size, e.disk_size, e.icount)
        unknown = e.unknown_extra[: extra_size - L.SNAPSHOT_EXTRA_SIZE]
        out += unknown + bytes(extra_size - L.SNAPSHOT_EXTRA_SIZE - len(unknown))
        out += id_b + name_b
    return bytes(out)
