"""Internal snapshots: create, delete, revert, lookup (algorithms doc §2–7).

The *results* follow QEMU 7.2: IDs, entry fields, which clusters are shared
and with what refcounts, COPIED flags equal to "refcount is 1" everywhere
the active tree reaches, the same lookup rules.  The *write order* does not:
QEMU updates refcounts and COPIED flags in place, so a crash in the middle
leaves an image ``qemu-img check`` calls corrupt (a flag disagreeing with a
count).  Here every operation is one :class:`~vdkit.formats.qcow2.refcount.
Transaction`: L1/L2 tables that would change are written as copies into free
clusters, refcount blocks and the refcount table likewise, and one header
write switches to the new state.  A consequence visible in the file layout:
after ``create`` the active tree has its own copies of the L2 tables whose
flags changed instead of sharing them with the snapshot (the snapshot keeps
the originals; deleting it gives them back); data clusters are shared exactly
as in QEMU.
"""

from __future__ import annotations

import struct
import sys

from vdkit.block.snapshot import ICOUNT_UNUSED, MAX_SNAPSHOT_NAME_LEN
from vdkit.block.snapshot import (  # the generic lookup, used here and re-exported for callers
    find_by_id_and_name as find_by_id_and_name,
)
from vdkit.block.snapshot import find_by_name as find_by_name
from vdkit.block.snapshot import find_id_then_name as find_id_then_name
from vdkit.block.snapshot import id_of as id_of
from vdkit.block.snapshot import name_of as name_of
from vdkit.errors import EFBIG, ENOENT, ENOTSUP, CorruptImageError, SnapshotNotFoundError, UnsupportedError, VdkitError
from vdkit.errors import hexalt as _hx  # C's %#x
from vdkit.formats.qcow2 import layout as L
from vdkit.formats.qcow2.cluster import encode_l1, read_l1
from vdkit.formats.qcow2.l2runs import Runs, l2_runs, same_runs
from vdkit.formats.qcow2.overlap import Metadata, first_overlap
from vdkit.formats.qcow2.refcount import Transaction, covered
from vdkit.formats.qcow2.snapshot import SnapshotEntry, serialize_snapshot_table, table_size
from vdkit.io import tables

TYPE_CHECKING = False  # typing and collections are not imported at run time (start-up cost)
if TYPE_CHECKING:
    from collections.abc import Iterable

    from vdkit.formats.qcow2.driver import Qcow2Driver
    from vdkit.formats.qcow2.overlap import MetadataMap
    from vdkit.io.tables import Backend, Tab

    _NewTable = tuple[Tab, Tab]  # a rewritten L2 table's entries and subcluster bitmaps
    _Part = tuple[Tab, Tab | None]  # clusters: runs (starts, lens), or (clusters, None) one by one

_COMMIT = struct.Struct(">QIIQQIIQ")  # header bytes 24..71
_ULONG_MAX = 2**64 - 1


# -- lookup (§7) ------------------------------------------------------------------------------

def _trunc(text: str, max_bytes: int) -> str:
    raw = text.encode("utf-8", "surrogateescape")
    return text if len(raw) <= max_bytes else raw[:max_bytes].decode("utf-8", "surrogateescape")


def _strtoul(s: str) -> int:
    """C ``strtoul(s, NULL, 10)`` on a 64-bit machine."""
    t = s.lstrip(" \t\n\v\f\r")
    neg = False
    if t[:1] in ("+", "-"):
        neg = t[0] == "-"
        t = t[1:]
    digits = ""
    for ch in t:
        if not ch.isascii() or not ch.isdigit():
            break
        digits += ch
    if not digits:
        return 0
    v = int(digits)
    if v > _ULONG_MAX:
        return _ULONG_MAX
    return (-v) & _ULONG_MAX if neg else v


def next_snapshot_id(entries: Iterable[SnapshotEntry]) -> str:
    """1 + the largest leading number among the IDs (so IDs get reused, §6)."""
    top = 0
    for e in entries:
        s = e.id_str
        # (an ID of plain digits, the usual one, without the character walk)
        top = max(top, min(int(s), _ULONG_MAX) if s.isascii() and s.isdigit() else _strtoul(s))
    return str((top + 1) & _ULONG_MAX)


# -- helpers ----------------------------------------------------------------------------------

def _require_snapshots(drv: Qcow2Driver) -> None:
    """Refuse what cannot have snapshots; then put cached metadata on disk.

    A transaction reads the state the disk describes and drops the caches when
    it commits, so writes a data path left in the caches must be durable first.
    """
    if drv.readonly:
        raise UnsupportedError("Image is opened read-only", errno=30)
    if drv.header.has_data_file:
        raise UnsupportedError("Operation not supported", errno=ENOTSUP)
    drv.flush()


def _l2_tables_named(drv: Qcow2Driver, offset: int, size: int) -> int:
    """How many L2 tables an L1 table names (its non-zero entries; a big table counts whole)."""
    if size * 8 > tables.NUMPY_MIN_BYTES:
        return size
    raw = drv.file.pread(offset, size * 8)
    return len(raw) // 8 - int(tables.SMALL.decode_u64(raw).count(0))


def _backend(drv: Qcow2Driver, *l1s: tuple[int, int]) -> Backend:
    """The table backend of one operation, by the tables it walks: the refcount metadata and the L2
    tables of the trees rooted at the active L1 and the L1 tables ``l1s`` (offset, entries).  A
    process that has numpy loaded already (the daemon, the library in a numpy program) keeps numpy's
    tables, as its data path does.

    The refcounts switch to it, and the active L1 is read with it when nothing has read it yet.
    """
    rc = drv.refcounts
    h = drv.header
    cs = h.cluster_size
    l2 = sum(_l2_tables_named(drv, off, n) for off, n in ((h.l1_table_offset, h.l1_size), *l1s))
    held = (rc.table_clusters + rc.T.count_nonzero(rc.table, 0, len(rc.table)) + l2) * cs
    T = tables.backend_for(held)
    if T is tables.SMALL and tables.FORCE is None and "numpy" in sys.modules:
        T = tables.NUMPY
    rc.use_backend(T)
    _forget_tables()
    if "clusters" not in drv.__dict__:
        drv.l1_backend = T
    else:  # (a writer's map of a small image holds lists: the operation's backend from now on)
        drv.clusters.use_backend(T)
    return T


def _active_l1(drv: Qcow2Driver, T: Backend) -> Tab:
    """A copy of the active L1 table as ``T``'s table (of plain ints: the data path may have stored
    numpy integers in a list L1)."""
    return T.array(drv.clusters.l1)


_l2_read: dict[int, tuple[Tab, Tab]] = {}  # the list tables one operation decoded, by offset
_l2_raw: dict[int, bytes] = {}  # the tables one operation read, as bytes
_l2_runs: dict[int, Runs | None] = {}  # their host runs (l2runs.l2_runs)
_maps: list[MetadataMap] = []  # the overlap test's map of the state the operation started from


def _forget_tables() -> None:
    """Drop what one operation read (the next one starts from the file)."""
    _l2_read.clear()
    _l2_raw.clear()
    _l2_runs.clear()
    _maps.clear()


def _metadata_map(drv: Qcow2Driver) -> MetadataMap:
    """The metadata map of the overlap test (:meth:`Qcow2Driver.metadata_map`), built once per
    operation: nothing it describes changes before the commit's header switch."""
    if not _maps:
        _maps.append(drv.metadata_map())
    return _maps[0]


def _raw(drv: Qcow2Driver, offset: int) -> bytes:
    """The bytes of the table at ``offset``, read once per operation."""
    raw = _l2_raw.get(offset)
    if raw is None:
        if offset % drv.cluster_size:
            raise CorruptImageError(f"L2 table offset {offset:#x} unaligned", errno=5)
        raw = _l2_raw[offset] = bytes(drv.file.pread(offset, drv.cluster_size))
    return raw


def _l2(drv: Qcow2Driver, T: Backend, offset: int) -> tuple[Tab, Tab]:
    """Entries and bitmaps of the L2 table at ``offset`` (not to be changed in place).

    The metadata caches were flushed (:func:`_require_snapshots`), so the file holds what the L2 cache
    would give; the cache is asked where its tables are ``T``'s.  Tables decoded as lists are kept
    for the rest of the operation (the tree walk and the COPIED rebuild read them both).
    """
    if T is tables.NUMPY:
        return drv.clusters.l2.get(offset)
    hit = _l2_read.get(offset)
    if hit is None:
        hit = _l2_read[offset] = drv.geometry.decode_l2(_raw(drv, offset), T)
    return hit


def _runs(drv: Qcow2Driver, T: Backend, offset: int) -> Runs | None:
    """The host runs of the L2 table at ``offset`` (None: walk it entry by entry).  Found for list
    tables only: numpy's walk is vectorised, and a big tree's runs would be many."""
    if offset in _l2_runs:
        return _l2_runs[offset]
    runs = None
    if T is tables.SMALL and not drv.geometry.has_data_file:
        geom = drv.geometry
        runs = l2_runs(_raw(drv, offset), geom.l2_entry_size, geom.cluster_bits)
    _l2_runs[offset] = runs
    return runs


def _share_runs(drv: Qcow2Driver, pairs: dict[int, int]) -> None:
    """Give each table of ``pairs`` (table -> a table whose runs were found) those runs where the two
    are equal but for COPIED flags (:func:`~vdkit.formats.qcow2.l2runs.same_runs`): after a snapshot
    of vdkit's, the active tree's tables are such copies of the snapshot's, walked once then."""
    geom = drv.geometry
    for a, b in pairs.items():
        runs = _l2_runs.get(b)
        if (runs is not None and a not in _l2_runs and not a % drv.cluster_size
                and same_runs(_raw(drv, a), _raw(drv, b), geom.l2_entry_size, runs.used, runs.bare)):
            _l2_runs[a] = runs


def _validate_snapshot_l1(drv: Qcow2Driver, e: SnapshotEntry) -> None:
    cs = drv.header.cluster_size
    if e.l1_size > L.MAX_L1_SIZE // 8:
        raise CorruptImageError("Snapshot L1 table too large", errno=EFBIG)
    if e.l1_table_offset % cs or e.l1_table_offset + e.l1_size * 8 > max(drv.file.size(), cs) + cs:
        raise CorruptImageError("Snapshot L1 table offset invalid", errno=22)


class _Tree:
    """References of one L1 tree: L2 table clusters and data clusters.

    A table referenced from k L1 entries counts k times (as ``qemu-img check``
    counts), but is read and decoded once: ``parts`` pairs each distinct
    table's data references with k, so a crafted L1 repeating one table
    millions of times costs no more than the table itself.  A part is
    ``(starts, lens, k)``: runs of clusters ``starts[j] .. starts[j] + lens[j] - 1``
    (list tables), or ``lens`` None and ``starts`` the clusters one by one.
    """

    def __init__(self, drv: Qcow2Driver, l1: Tab) -> None:
        geom = drv.geometry
        T = self.T = tables.of(l1)
        try:
            offs = geom.l1_tables(l1)
            self.l2_offsets = T.masked_nonzero(offs, L.L1E_OFFSET_MASK)
            self.l2_clusters = T.shifted(self.l2_offsets, geom.cluster_bits)
            self.parts: list[tuple[Tab, Tab | None, int]] = []
            for off, k in zip(*T.unique_counts(self.l2_offsets), strict=True):
                runs = _runs(drv, T, off)
                if runs is not None:
                    self.parts.append((runs.starts, runs.lens, k))
                    continue
                refs = geom.l2_references(_l2(drv, T, off)[0], where=f" in L2 table {off:#x}")
                if T is tables.SMALL:  # as runs too (of one cluster, mostly)
                    starts, lens = _as_runs(refs)
                    self.parts.append((starts, lens, k))
                else:
                    self.parts.append((refs, None, k))
        except CorruptImageError:
            raise _unaligned_event(drv, l1) from None

    def data(self) -> list[tuple[Tab, Tab | None]]:
        """Distinct-table data references (each table once), as ``(starts, lens)`` parts."""
        return [(a, n) for a, n, _ in self.parts]

    def add_to(self, txn: Transaction, addend: int) -> None:
        txn.add_refs(self.l2_clusters, addend)
        for starts, lens, k in self.parts:
            if lens is None:
                txn.add_refs(starts, addend * k)
            else:
                txn.add_runs(starts, lens, addend * k)

    def increments(self) -> list[tuple[Tab, Tab | None, int]]:
        """One more reference to this whole tree, as ``Transaction.check_peak`` takes it: (clusters,
        None, times) and (run starts, run lengths, times)."""
        return [(self.l2_clusters, None, 1), *self.parts]


def _as_runs(refs: list[int]) -> tuple[list[int], list[int]]:
    """Clusters one by one as runs of consecutive ones."""
    from vdkit.io.table_backends import run_cuts

    starts: list[int] = []
    lens: list[int] = []
    a = 0
    for b in (*run_cuts(refs), len(refs)) if refs else ():
        starts.append(refs[a])
        lens.append(b - a)
        a = b
    return starts, lens


def _unaligned_event(drv: Qcow2Driver, l1: Tab) -> VdkitError:
    """The corruption event QEMU signals for the first unaligned offset in L1 order (then L2 order).

    Only reached on the error path, so it may walk the tree entry by entry.
    """
    geom = drv.geometry
    T = tables.of(l1)
    mask = drv.cluster_size - 1
    for i1, entry in enumerate(T.tolist(l1)):
        l2_off = entry & L.L1E_OFFSET_MASK
        if not l2_off:
            continue
        if l2_off & mask:
            return drv.signal_corruption(f"L2 table offset {_hx(l2_off)} unaligned (L1 index: {_hx(i1)})")
        if geom.has_data_file:
            continue
        entries, _ = _l2(drv, T, l2_off)
        for i2, e in enumerate(T.tolist(entries)):
            off = e & L.L2E_OFFSET_MASK
            if not e & L.OFLAG_COMPRESSED and off & mask:
                return drv.signal_corruption(
                    f"Cluster allocation offset {_hx(off)} unaligned (L2 offset: {_hx(l2_off)}, L2 index: {_hx(i2)})")
    return CorruptImageError("Input/output error", errno=5)


def _rebuild_active(drv: Qcow2Driver, txn: Transaction, l1: Tab,
                    reuse: dict[int, int] | None = None) -> tuple[Tab, dict[int, _NewTable]]:
    """The active L1 with COPIED flags for the refcounts the transaction leads to.

    L2 tables whose flags change are copied (the originals are reachable from
    the current header and must not change before the switch), or replaced by
    a table the transaction frees that holds the wanted bytes already
    (``reuse``: active table -> candidate, see :func:`_replace_table`).  Returns
    the new L1 and the new L2 tables by offset.
    """
    geom = drv.geometry
    T = txn.T
    bits = geom.cluster_bits
    offs = geom.l1_tables(l1)
    new_tables: dict[int, _NewTable] = {}
    replaced: dict[int, int] = {}
    distinct = T.tolist(T.unique_sorted(T.masked_nonzero(offs, L.L1E_OFFSET_MASK)))
    # Data refcounts are final before any table is copied: look them all up at once.
    found: list[tuple[int, Tab, Tab, Tab, Tab | None]] = []  # (table, entries, bitmaps, hosts' positions, counts)
    by_bytes: dict[int, tuple[Runs, int]] = {}  # tables whose flags change in their bytes: (runs, ones)
    hosts = []
    for t in distinct:
        runs = _runs(drv, T, t)
        if runs is not None:  # a table of runs: how many of its hosts end at 1, run by run
            ones = sum(txn.count_new(a, a + n, 1) for a, n in zip(runs.starts, runs.lens, strict=True))
            if not ones or ones == sum(runs.lens) == runs.used_entries:
                by_bytes[t] = (runs, ones)
                found.append((t, None, None, None, None))
                continue
            # some end at 1 and some not: entry by entry, with the counts of its runs
            rc = T.concat([txn.new_refcounts_range(a, a + n) for a, n in zip(runs.starts, runs.lens, strict=True)])
            entries, bitmaps = _l2(drv, T, t)
            found.append((t, entries, bitmaps, T.flag_positions(entries, L.L2E_OFFSET_MASK, L.OFLAG_COMPRESSED), rc))
            continue
        entries, bitmaps = _l2(drv, T, t)
        has = T.flag_positions(entries, L.L2E_OFFSET_MASK, L.OFLAG_COMPRESSED)  # standard, with a host
        found.append((t, entries, bitmaps, has, None))
        hosts.append(T.field(entries, has, L.L2E_OFFSET_MASK, bits))
    all_rc = txn.new_refcounts(T.concat(hosts))
    pos = 0
    for t, entries, bitmaps, has, rc in found:
        if entries is None:
            raw = _raw(drv, t)
            new_raw = _copied_by_bytes(raw, geom.l2_entry_size, *by_bytes[t])
            if new_raw != raw:
                _replace_table(drv, txn, offs, t, new_raw, replaced, reuse)
            continue
        if rc is None:
            rc = all_rc[pos : pos + len(has)]
            pos += len(has)
        want = T.copy(entries)
        T.clear_flag(want, L.OFLAG_COPIED, L.OFLAG_COMPRESSED)
        T.set_flag(want, T.take(has, T.positions_equal(rc, 1)), L.OFLAG_COPIED)
        if not T.equal(want, entries):
            new_off = _replace_table(drv, txn, offs, t, geom.encode_l2(want, bitmaps), replaced, reuse)
            new_tables[new_off] = (want, T.copy(bitmaps))
    # L1 entries: new offsets, COPIED iff the table's final refcount is 1
    out = T.zeros(len(l1))
    offs_l = T.tolist(offs)
    nz = [i for i, o in enumerate(offs_l) if o]
    if nz:
        final = [replaced.get(offs_l[i], offs_l[i]) for i in nz]
        rcs = T.tolist(txn.new_refcounts(T.indices([f >> bits for f in final])))
        # (reserved bits are dropped, as QEMU's refcount update rewrites the entries of the active L1:
        # keeping them would leave check one error more than qemu-img's result, seed 270)
        for i, f, r in zip(nz, final, rcs, strict=True):
            out[i] = f | L.OFLAG_COPIED if r == 1 else f
    return out, new_tables


_CLEAR_TOP = bytes(range(128)) * 2  # a byte without its top bit
_SET_TOP = bytes(b | 0x80 for b in range(256))  # a byte with its top bit


def _copied_by_bytes(raw: bytes, entry_size: int, runs: Runs, ones: int) -> bytes:
    """The L2 table ``raw``, whose used entries are all standard ones, with the COPIED flags of its
    hosts' final counts, which agree (``ones`` of them end at 1), rewritten in its bytes: no count 1
    (COPIED cleared everywhere), or every count 1 with a host in each used entry (COPIED set on every
    used entry: ``runs.used``).

    COPIED is the top bit of an entry's first byte: the flags of a used stretch change by one
    ``bytes.translate`` of those bytes instead of one big-integer operation per entry (the unused
    entries are zeros: nothing to clear there, and a mostly empty table costs its used part)."""
    parts: list[memoryview | bytearray] = []
    view = memoryview(raw)
    pos = 0
    flags = _SET_TOP if ones else _CLEAR_TOP
    for a, b in runs.used:
        lo, hi = a * entry_size, b * entry_size
        top = raw[lo:hi:entry_size]
        new_top = top.translate(flags)
        if new_top != top:
            seg = bytearray(view[lo:hi])
            seg[0::entry_size] = new_top
            parts += (view[pos:lo], seg)
            pos = hi
    if not parts:
        return raw
    parts.append(view[pos:])
    return b"".join(parts)  # (the unchanged bytes copied once, from views)


def _replace_table(drv: Qcow2Driver, txn: Transaction, offs: Tab, t: int, data: bytes,
                   replaced: dict[int, int], reuse: dict[int, int] | None = None) -> int:
    """Stage ``data`` as the copy of the active L2 table at ``t`` (every L1 entry naming it moves to
    the copy); returns the copy's offset.

    Where ``reuse`` names a table for ``t`` (delete: the deleted snapshot's table at the same L1
    index) that holds ``data`` byte for byte and that nothing references once the transaction is
    done, the L1 entries move to it instead and no table is written (a snapshot taken by
    :func:`create` and deleted again puts the active tree back in its original tables, which kept
    their COPIED flags).  Either way the current state's tables stay as they are until the header
    switch."""
    # QEMU writes this table back in place: where the table names other metadata (a damaged
    # snapshot table reaching into it, say) its overlap check refuses; ours would go to a copy
    geom = drv.geometry
    T = txn.T
    bits = geom.cluster_bits
    meta = _metadata_map(drv)
    if first_overlap(meta, t, geom.cluster_size, Metadata.ACTIVE_L2) is not None:
        drv.check_metadata_write(t, geom.cluster_size, Metadata.ACTIVE_L2)  # (the corruption event)
    k = T.count_equal(offs, t)
    old = None if reuse is None else reuse.get(t)
    if (old is not None and old != t and not old % geom.cluster_size and _raw(drv, old) == data
            and txn.count_new(old >> bits, (old >> bits) + 1, 0)  # (its count ends at 0)
            and first_overlap(meta, old, geom.cluster_size) is None):  # (a damaged table: not metadata)
        txn.add_refs([old >> bits] * k, 1)
        txn.add_refs([t >> bits] * k, -1)
        replaced[t] = old
        return old
    new_off = txn.alloc(geom.cluster_size)
    if k > 1:
        txn.add_refs([new_off >> bits] * (k - 1), 1)
    txn.add_refs([t >> bits] * k, -1)
    txn.write(new_off, data)
    replaced[t] = new_off
    return new_off


def _in_use_clusters(drv: Qcow2Driver, T: Backend, trees: Iterable[_Tree]) -> list[_Part]:
    """Clusters the current state uses: metadata plus the walked trees (tables and data), as parts
    of :func:`~vdkit.formats.qcow2.refcount.covered` (duplicates are harmless to it)."""
    h = drv.header
    bits = h.cluster_bits
    cs = h.cluster_size
    starts: list[int] = [0]
    lens: list[int] = [1]
    parts: list[_Part] = [(starts, lens)]

    def rng(off: int, length: int) -> None:
        if length > 0:
            starts.append(off >> bits)
            lens.append(((off + length - 1) >> bits) + 1 - (off >> bits))

    rc = drv.refcounts
    rng(rc.table_offset, rc.table_clusters * cs)
    parts.append((T.indices([o >> bits for o in rc.block_clusters()]), None))
    rng(drv.clusters.l1_offset, drv.clusters.l1_size * 8)
    if h.nb_snapshots:
        rng(h.snapshots_offset, drv.snapshot_table_size)
    for e in drv.snapshots():
        rng(e.l1_table_offset, e.l1_size * 8)
    for tree in trees:
        parts += [(tree.l2_clusters, None), *tree.data()]
    return parts


def _refuse_unbacked_references(drv: Qcow2Driver, tree: _Tree) -> None:
    """Fail with EAGAIN, as QEMU does, when a tree whose counts change names a cluster no refcount block covers.

    QEMU's snapshot refcount update allocates the missing block and then gives up with -EAGAIN
    (``Resource temporarily unavailable``); a sound image never has such a reference.  Counting it
    anyway in a new block would leave ``check`` one error more than before.
    """
    rc = drv.refcounts
    T = tree.T
    shift = rc.entries_per_block.bit_length() - 1
    rts: set[int] = set()
    for starts, lens in [(tree.l2_clusters, None), *tree.data()]:
        if lens is None:
            if len(starts):
                rts.update(T.unique_shifted(starts, shift))
            continue
        for a, n in zip(starts, lens, strict=True):
            rts.update(range(a >> shift, ((a + n - 1) >> shift) + 1))
    if any(rt >= len(rc.table) or not int(rc.table[rt]) & L.REFT_OFFSET_MASK for rt in rts):
        import errno
        import os

        raise VdkitError(os.strerror(errno.EAGAIN), errno=errno.EAGAIN)


def _refuse_tables_at_zero(*l1s: Tab) -> None:
    """Refuse (EINVAL) an L1 table whose counts change and that has an entry naming an L2 table at offset 0.

    Only reserved bits make such an entry non-zero.  Ordinary I/O reads it as unallocated, but
    QEMU's snapshot refcount update treats any non-zero entry as a table and aborts on offset 0
    (qemu-img dies, the file stays as it was); ``check`` reads the header cluster as that table, so
    dropping the entry, or moving the metadata the header names, would change what it counts.
    """
    for l1 in l1s:
        if tables.of(l1).any_masked_zero(l1, L.L1E_OFFSET_MASK):
            raise CorruptImageError("Invalid argument", errno=22)


def _refuse_shared_refcount_metadata(drv: Qcow2Driver, trees: list[_Tree]) -> None:
    """Refuse (EINVAL) when a walked tree references a refcount table or block cluster.

    Only a damaged image does that.  A transaction moves the refcount structures to copies and
    frees the old clusters, so such a cluster would end with a count (and COPIED flags computed
    before the move) that disagree with its references: ``check`` would find one error more than
    before.  QEMU updates those structures in place; vdkit leaves the image as it is instead.
    """
    rc = drv.refcounts
    T = rc.T
    bits = drv.header.cluster_bits
    first = rc.table_offset >> bits
    meta = [*T.tolist(T.shifted(T.masked_nonzero(rc.table, L.REFT_OFFSET_MASK), bits)),
            *range(first, first + rc.table_clusters)]
    for tree in trees:
        if covered(T, meta, [(tree.l2_clusters, None), *tree.data()]):
            raise CorruptImageError("Invalid argument", errno=22)


def _refuse_freed_l1_clusters(drv: Qcow2Driver, txn: Transaction, l1s: list[tuple[int, int]]) -> None:
    """Refuse (EINVAL) when an L1 table that stays names a cluster the transaction frees.

    Only a damaged image has one: a snapshot's L1 table reaching into the snapshot table (or the
    active L1), which the transaction moves to a copy.  The old cluster would drop to a count below
    its references, and its old bytes, still read as L1 entries, keep naming what they named:
    ``check`` would count more errors than before.  QEMU writes over such a cluster in place;
    vdkit leaves the image as it is instead.
    """
    from _bisect import bisect_right  # (bisect's C module: bisect.py costs a quarter of a ms to import)

    bits = drv.header.cluster_bits
    freed = txn.freed_runs()  # (first, end) of the clusters whose count goes down, sorted, disjoint
    ends = [b for _, b in freed]
    for off, n in l1s:
        if n <= 0:
            continue
        first, last = off >> bits, (off + n * 8 - 1) >> bits
        i = bisect_right(ends, first)  # the first freed run ending past the table's first cluster
        if i < len(freed) and freed[i][0] <= last:
            raise CorruptImageError("Invalid argument", errno=22)


def _commit(
    drv: Qcow2Driver,
    txn: Transaction,
    *,
    l1: Tab,
    old_l1: Tab,
    snapshots: list[SnapshotEntry] | None,
    new_tables: dict[int, _NewTable],
    trees: Iterable[_Tree],
    size: int | None = None,
) -> None:
    """Place the new L1 and snapshot table, then switch the header in one write."""
    h = drv.header
    cm = drv.clusters
    T = txn.T
    l1_off = cm.l1_offset
    if not T.equal(l1, old_l1):
        if len(old_l1):
            txn.add_range(cm.l1_offset, len(old_l1) * 8, -1)
        l1_off = txn.alloc(len(l1) * 8) if len(l1) else 0
        if len(l1):
            txn.write(l1_off, encode_l1(l1))
    nb, snap_off, snap_size = h.nb_snapshots, h.snapshots_offset, drv.snapshot_table_size
    if snapshots is not None:
        if h.nb_snapshots:
            txn.add_range(h.snapshots_offset, drv.snapshot_table_size, -1)
        snap_size = table_size(snapshots)
        if snap_size > L.MAX_SNAPSHOT_TABLE_SIZE:
            raise VdkitError("File too large", errno=EFBIG)
        nb = len(snapshots)
        snap_off = 0
        if snapshots:
            snap_off = txn.alloc(snap_size)
            txn.write(snap_off, serialize_snapshot_table(snapshots))
    new_size = h.size if size is None else size

    def header(rt_off: int, rt_cl: int) -> bytes:
        return _COMMIT.pack(new_size, h.crypt_method, len(l1), l1_off, rt_off, rt_cl, nb, snap_off)

    trees = list(trees)
    _refuse_shared_refcount_metadata(drv, trees)
    kept_l1s = [(e.l1_table_offset, e.l1_size) for e in (drv.snapshots() if snapshots is None else snapshots)]
    if l1_off == cm.l1_offset:
        kept_l1s.append((l1_off, len(l1)))
    _refuse_freed_l1_clusters(drv, txn, kept_l1s)
    in_use = _in_use_clusters(drv, T, trees)
    rc = drv.refcounts
    check = rc.overlap_check
    if check is not None:  # (the old refcount blocks' test, on the one map of this state)
        meta = _metadata_map(drv)

        def check_on_map(off: int, n: int, ignore: Metadata) -> None:
            if first_overlap(meta, off, n, ignore) is not None:
                check(off, n, ignore)  # (the corruption event)

        rc.overlap_check = check_on_map
    _forget_tables()
    try:
        txn.commit(header, in_use, drv.metadata_overlap)  # a write into metadata: QEMU's corruption event
    except BaseException:
        # Whatever reached the disk sits in free clusters; forget cached state.
        drv.clusters.l2.drop()
        drv.refcounts.drop_cache()
        raise
    finally:
        rc.overlap_check = check
    # the cluster map keeps its kind of table (numpy's unless this operation read it as a list)
    cm.l1 = l1 if tables.of(cm.l1) is T else tables.of(cm.l1).convert(l1)
    cm.l1_offset = l1_off
    cm.l2.drop()
    if "io" in drv.__dict__:  # the data path caches decoded tables
        drv.io.invalidate()
    if T is tables.NUMPY:  # the L2 cache holds numpy's tables
        for off, (ent, bm) in new_tables.items():
            cm.l2._insert(off, (ent, bm))
    if snapshots is not None:
        drv._snapshots = list(snapshots)
        drv.snapshot_table_size = snap_size
    drv.header = h.evolve(
        size=new_size, l1_size=len(l1), l1_table_offset=l1_off,
        refcount_table_offset=drv.refcounts.table_offset,
        refcount_table_clusters=drv.refcounts.table_clusters,
        nb_snapshots=nb, snapshots_offset=snap_off,
    )


# -- operations -------------------------------------------------------------------------------

def vm_state_offset(drv: Qcow2Driver, disk_size: int | None = None) -> int:
    """Guest offset where VM state lives: the first L1 entry past the disk (format doc §8.3)."""
    h = drv.header
    return h.l1_entries_needed(h.size if disk_size is None else disk_size) * drv.geometry.l1_span


def _vm_state_tables(drv: Qcow2Driver, txn: Transaction, snap_l1: Tab, first: int, data: bytes) -> None:
    """Store ``data`` in fresh clusters mapped from ``snap_l1[first:]`` (referenced only by the snapshot)."""
    geom = drv.geometry
    cs = geom.cluster_size
    n = (len(data) + cs - 1) // cs
    base = txn.alloc(n * cs)
    txn.write(base, data + bytes(n * cs - len(data)))
    per = geom.l2_entries
    T = txn.T
    for k in range(0, n, per):
        entries = T.zeros(per)
        count = min(per, n - k)
        T.set_strided(entries, 0, 1, (base + k * cs) | L.OFLAG_COPIED, count, cs)
        bitmaps = T.zeros(per)
        if geom.extended_l2:
            T.set_slice(bitmaps, 0, T.array([0xFFFFFFFF] * count))
        l2_off = txn.alloc(cs)
        txn.write(l2_off, geom.encode_l2(entries, bitmaps))
        snap_l1[first + k // per] = l2_off | L.OFLAG_COPIED


def create(
    drv: Qcow2Driver,
    name: str,
    *,
    date_sec: int,
    date_nsec: int,
    vm_clock_nsec: int = 0,
    vm_state_size: int = 0,
    icount: int | None = None,
    vm_state: bytes | None = None,
) -> SnapshotEntry:
    """Take an internal snapshot of the active layer (§3).

    With ``vm_state``, the bytes are stored at the VM-state offset of the
    snapshot's own tree (``vm_state_size`` becomes their length); the active
    tree keeps nothing in that range, as after QEMU's discard.
    """
    _require_snapshots(drv)
    entries = drv.snapshots()
    if len(entries) >= L.MAX_SNAPSHOTS:
        raise VdkitError("File too large", errno=EFBIG)
    h = drv.header
    T = _backend(drv)
    active = _active_l1(drv, T)
    _refuse_tables_at_zero(active)
    if vm_state is not None:
        vm_state_size = len(vm_state)
        if not vm_state:
            vm_state = None  # an empty state is a disk-only snapshot
    entry = SnapshotEntry(
        l1_table_offset=0, l1_size=len(active), id_str=next_snapshot_id(entries),
        name=_trunc(name, MAX_SNAPSHOT_NAME_LEN), date_sec=date_sec & 0xFFFFFFFF,
        date_nsec=date_nsec & 0xFFFFFFFF, vm_clock_nsec=vm_clock_nsec, vm_state_size=vm_state_size,
        disk_size=h.size, icount=ICOUNT_UNUSED if icount is None else icount & 0xFFFFFFFFFFFFFFFF,
    )
    txn = Transaction(drv.refcounts)
    disk_entries = h.l1_entries_needed()
    trees = []
    if vm_state is not None:
        # The active tree drops whatever it mapped past the disk (state of an earlier revert).
        beyond = T.copy(active)
        T.set_slice(beyond, 0, T.zeros(min(disk_entries, len(active))))
        old_vm = _Tree(drv, beyond)
        old_vm.add_to(txn, -1)
        trees.append(old_vm)
        active_new = T.copy(active)
        T.set_slice(active_new, disk_entries, T.zeros(max(0, len(active) - disk_entries)))
        geom = drv.geometry
        first = vm_state_offset(drv) // geom.l1_span
        needed = first + max(1, -(-len(vm_state) // (geom.cluster_size * geom.l2_entries)))
        if needed > L.MAX_L1_SIZE // 8:
            raise VdkitError("File too large", errno=EFBIG)
        snap_l1 = T.zeros(max(len(active), needed))
        T.set_slice(snap_l1, 0, active_new)
    else:
        active_new = active
        snap_l1 = T.copy(active)
    tree = _Tree(drv, active_new)
    _refuse_unbacked_references(drv, tree)
    tree.add_to(txn, +1)  # the snapshot's L1 references the current tree
    trees.append(tree)
    if vm_state is not None and len(vm_state):
        _vm_state_tables(drv, txn, snap_l1, first, vm_state)
    entry.l1_size = len(snap_l1)
    if len(snap_l1):
        entry.l1_table_offset = txn.alloc(len(snap_l1) * 8)
        txn.write(entry.l1_table_offset, encode_l1(snap_l1))
    l1, new_tables = _rebuild_active(drv, txn, active_new)
    _commit(drv, txn, l1=l1, old_l1=active, snapshots=[*entries, entry], new_tables=new_tables, trees=trees)
    return entry


def read_vmstate(drv: Qcow2Driver, entry: SnapshotEntry) -> bytes:
    """The VM state stored with snapshot ``entry`` (empty for disk-only snapshots)."""
    if not entry.vm_state_size:
        return b""
    _validate_snapshot_l1(drv, entry)
    start = vm_state_offset(drv, entry.disk_size)
    if start + entry.vm_state_size > entry.l1_size * drv.geometry.l1_span:
        raise CorruptImageError("Snapshot VM state extends past its L1 table", errno=22)
    l1 = read_l1(drv.file, entry.l1_table_offset, entry.l1_size)
    return drv.io.read(start, entry.vm_state_size, None, l1=l1)


def delete(drv: Qcow2Driver, *, snapshot_id: str | None = None, name: str | None = None) -> SnapshotEntry:
    """Delete the snapshot matching ``snapshot_id`` and/or ``name`` exactly (§4)."""
    _require_snapshots(drv)
    entries = drv.snapshots()
    victim = find_by_id_and_name(entries, snapshot_id, name)
    if victim is None:
        raise SnapshotNotFoundError("Can't find the snapshot", errno=ENOENT)
    _validate_snapshot_l1(drv, victim)
    remaining = [e for e in entries if e is not victim]
    T = _backend(drv, (victim.l1_table_offset, victim.l1_size))
    active = _active_l1(drv, T)
    txn = Transaction(drv.refcounts)
    snap_l1 = read_l1(drv.file, victim.l1_table_offset, victim.l1_size, T)
    _refuse_tables_at_zero(snap_l1, active)
    tree = _Tree(drv, snap_l1)
    tree.add_to(txn, -1)
    txn.add_range(victim.l1_table_offset, victim.l1_size * 8, -1)
    # (an active table whose wanted bytes the snapshot's table at the same index holds goes back to it)
    reuse: dict[int, int] = {}
    for a, b in zip(T.tolist(active), T.tolist(snap_l1), strict=False):  # (the shorter table's entries)
        if a & L.L1E_OFFSET_MASK and b & L.L1E_OFFSET_MASK:
            reuse.setdefault(a & L.L1E_OFFSET_MASK, b & L.L1E_OFFSET_MASK)
    _share_runs(drv, reuse)
    active_tree = _Tree(drv, active)
    l1, new_tables = _rebuild_active(drv, txn, active, reuse)
    _commit(drv, txn, l1=l1, old_l1=active, snapshots=remaining, new_tables=new_tables,
            trees=[tree, active_tree])
    return victim


def revert(drv: Qcow2Driver, entry: SnapshotEntry) -> None:
    """Make the active layer equal to snapshot ``entry`` (§5); the entry is kept."""
    _require_snapshots(drv)
    if not any(e is entry or (e.id_str == entry.id_str and e.name == entry.name) for e in drv.snapshots()):
        raise SnapshotNotFoundError("Can't find the snapshot", errno=ENOENT)
    _validate_snapshot_l1(drv, entry)
    h = drv.header
    T = _backend(drv, (entry.l1_table_offset, entry.l1_size))
    active = _active_l1(drv, T)
    need = h.l1_entries_needed(entry.disk_size)
    if need > L.MAX_L1_SIZE // 8:
        raise CorruptImageError("Snapshot L1 table too large", errno=EFBIG)
    new_size = max(len(active), entry.l1_size, need)
    snap_l1 = T.zeros(new_size)
    T.set_slice(snap_l1, 0, read_l1(drv.file, entry.l1_table_offset, entry.l1_size, T))
    _refuse_tables_at_zero(snap_l1, active)
    txn = Transaction(drv.refcounts)
    new_tree = _Tree(drv, snap_l1)
    _refuse_unbacked_references(drv, new_tree)
    # QEMU counts the snapshot's tree up before counting the old tree down.
    txn.check_peak(new_tree.increments())
    new_tree.add_to(txn, +1)
    old_tree = _Tree(drv, active)
    _refuse_unbacked_references(drv, old_tree)  # (counted down: QEMU's update fails the same way)
    old_tree.add_to(txn, -1)
    l1, new_tables = _rebuild_active(drv, txn, snap_l1)
    _commit(drv, txn, l1=l1, old_l1=active, snapshots=None, new_tables=new_tables,
            trees=[new_tree, old_tree], size=entry.disk_size)
