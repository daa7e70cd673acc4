"""Changing the virtual size of a qcow2 image (``qemu-img resize``).

Growing: the active L1 table is grown to exactly the entries the new size
needs (a new table, then one 12-byte header switch, algorithms doc §1.8),
the new area is preallocated if asked (below), zeroed if a longer backing
file would otherwise show through it, and the 8-byte size field is
rewritten last.

Shrinking, in QEMU 7.2's order so the result matches byte for byte:
1. every cluster wholly beyond the new end is dropped from the active tree
   (entries become unallocated, their clusters lose a reference and are
   punched out of the file when free);
2. L1 entries beyond the new end are zeroed on disk (the table keeps its
   size) and their L2 tables are freed;
3. refcount blocks that now count nothing but themselves are unhooked from
   the refcount table and punched;
4. the size field is rewritten and the file is cut after the last cluster
   still in use.
Internal snapshots keep their own trees, so their data stays referenced.

Preallocated growth (``--preallocation``), as observed on qemu-img 7.2:

* ``metadata`` maps every new guest cluster with the ordinary allocator,
  exactly like ``create -o preallocation=metadata`` (``create.py`` replays
  the same walk in memory): per L2 table, the table first (first fit),
  then the data run, continued contiguously where the clusters right after
  the previous run are free.  A cluster that is only partly new (old size
  not cluster aligned) is kept if it is already ours (COPIED); otherwise it
  gets a new host cluster and its old part is copied there (COW).  The
  bytes after the new end in the last (sub)cluster are written as zeros
  and the file is extended to the end of the last run.  Data clusters are
  not written: they read as whatever the file holds (zeros past EOF).
* ``falloc``/``full`` instead put all data in one run at the end of the
  file: a new, exactly sized refcount table (and the refcount blocks the
  new clusters need) is written at the rounded-up end of the file and
  switched to, the data run follows it, the file is extended over it with
  ``posix_fallocate`` or written zeros, and only then are L2 tables
  allocated (first fit, often into the freed old refcount table) and the
  entries linked.  The cluster holding the old end is always remapped
  into the run, its old part copied.
* Extended L2: preallocated clusters keep their subcluster bitmaps (they
  stay unallocated/zero) except with ``falloc``/``full`` over a longer
  backing file, where they are marked allocated (the run is known zero).
* External data file: guest offset = host offset; the data file is grown
  with the requested mode.

Crash safety: every refcount increment is durable before an L2/L1 entry
points at the cluster, new L2 tables are written before their L1 entry,
freed clusters are decremented only after the tables stopped using them,
and the size field goes last, so a cut at any write leaves at most leaks.
"""

from __future__ import annotations

import errno
import os

from vdkit.errors import UnsupportedError, VdkitError, hexalt
from vdkit.formats.qcow2 import layout as L
from vdkit.formats.qcow2.overlap import Metadata
from vdkit.io import tables

TYPE_CHECKING = False  # typing and collections are not imported at run time (start-up cost)
if TYPE_CHECKING:
    from collections.abc import Callable

    from vdkit.formats.qcow2.driver import Qcow2Driver
    from vdkit.io.file import ImageFile
    from vdkit.io.tables import Tab

    BackingRead = Callable[[int, int], bytes]


def truncate(drv: Qcow2Driver, new_size: int, prealloc: str = "off", *,
             backing: BackingRead | None = None, backing_size: int = 0) -> None:
    """Resize the virtual disk to ``new_size`` bytes (grow or shrink).

    ``backing``/``backing_size`` describe the backing chain (reads and its
    length): a backing file longer than the old size would show through
    the new area, so that area is zeroed, as QEMU's block layer does.
    """
    h = drv.header
    if new_size % 512:
        raise VdkitError("The new size must be a multiple of 512")
    if h.version < 3 and drv.snapshots():
        raise UnsupportedError("Can't resize a v2 image which has snapshots")
    if drv.bitmaps:
        from vdkit.formats.qcow2.bitmaps import truncate_check

        truncate_check(drv)
    if h.has_data_file and h.data_file_raw:
        raise UnsupportedError("Resizing images with a raw external data file is not supported by vdkit")
    old_size = h.size
    if new_size == old_size:
        return
    cm = drv.clusters
    rc = drv.refcounts
    if backing_size > old_size:
        # numpy tables for the zeroing over a longer backing (falloc/full preallocation switches in
        # _prealloc_falloc); growth, metadata preallocation and shrinking keep the backend the image
        # was opened with (lists when its tables are small: no numpy import)
        rc.use_backend(tables.NUMPY)
        cm.use_backend(tables.NUMPY)  # (and the cluster map's tables: a small writable image holds lists)
    needed = h.l1_entries_needed(new_size)
    if new_size > old_size:
        if needed > len(cm.l1):
            try:
                cm.grow_l1(needed, rc, exact=True)
            except VdkitError as exc:
                raise _failed("Failed to grow the L1 table", exc) from exc
        zero_write = backing_size > old_size
        if prealloc == "metadata" or (prealloc in ("falloc", "full") and h.has_data_file):
            _prealloc_metadata(drv, old_size, new_size, prealloc, backing)
        elif prealloc in ("falloc", "full"):
            _prealloc_falloc(drv, old_size, new_size, prealloc, backing, alloc_subclusters=zero_write)
            zero_write = False  # the new run is known to read as zeros
        drv.flush()
        if zero_write:
            _zero_new_area(drv, old_size, new_size, backing)
    else:
        if any(not rc.table[i] & L.REFT_OFFSET_MASK for i in rc.T.nonzero(rc.table)):
            # a refcount table entry with reserved bits only: QEMU's refcount table shrink (after the
            # discard has changed the image) dies on an assertion there; vdkit changes nothing
            raise VdkitError("Failed to discard unused refblocks: Invalid argument", errno=errno.EINVAL)
        try:
            _shrink(drv, new_size, old_size, needed)
        except VdkitError as exc:
            raise _failed("Failed to discard cropped clusters", exc) from exc
        try:
            _shrink_reftable(drv)
        except VdkitError as exc:
            raise _failed("Failed to discard unused refblocks", exc) from exc
    if prealloc == "off" and h.has_data_file and drv.data_file is not None:
        drv.data_file.truncate(new_size)  # an external data file follows the disk size exactly
    drv.flush()
    drv.file.pwrite(24, new_size.to_bytes(8, "big"))
    drv.file.flush()
    drv.header = drv.header.evolve(size=new_size)
    if new_size < old_size:
        try:
            _cut_file(drv)
        except VdkitError as exc:
            raise _failed("Failed to find the last cluster", exc) from exc
    drv.__dict__.pop("io", None)


def _failed(what: str, exc: VdkitError) -> VdkitError:
    """qemu-img's ``<what>: <strerror>`` for a step of the resize that failed (a corruption event is EIO)."""
    if not exc.errno:
        return VdkitError(f"{what}: {exc.message}")
    return VdkitError(f"{what}: {os.strerror(exc.errno)}", errno=exc.errno)


def _zero_new_area(drv: Qcow2Driver, old_size: int, new_size: int, backing: BackingRead | None) -> None:
    """Make ``[old_size, new_size)`` read as zeros instead of the backing file's data.

    Zero flags (zero subclusters with extended L2) from the first granule
    boundary; explicit zero data for the unaligned head.  v2 images have no
    zero flag, so this fails there, as in QEMU.
    """
    if drv.header.version < 3:
        raise UnsupportedError("Failed to zero out new clusters: Operation not supported", errno=errno.ENOTSUP)
    gran = drv.cluster_size // 32 if drv.header.extended_l2 else drv.cluster_size
    zero_start = -(-old_size // gran) * gran
    drv.header = drv.header.evolve(size=new_size)  # the I/O engine checks requests against it
    io = drv.io
    io.invalidate()
    if new_size > zero_start:
        io.write_zeroes(zero_start, new_size - zero_start, backing)
    if zero_start > old_size:
        io.write(old_size, bytes(min(zero_start, new_size) - old_size), backing)
    drv.flush()


# -- preallocation ---------------------------------------------------------------------------------

def _head_bytes(drv: Qcow2Driver, start: int, backing: BackingRead | None) -> bytes:
    """Guest bytes of the cluster holding ``start``, up to ``start`` (the COW of a partly new cluster)."""
    c0 = start - start % drv.cluster_size
    if c0 == start:
        return b""
    return drv.io.read(c0, start - c0, backing)


def _entry_is_ours(drv: Qcow2Driver, entry: int) -> bool:
    """Can preallocation keep this cluster (normal, or preallocated zero, with COPIED)?"""
    if entry & L.OFLAG_COMPRESSED or not entry & L.OFLAG_COPIED:
        return False
    if drv.header.has_data_file:
        return True
    return bool(entry & L.L2E_OFFSET_MASK)


def _prealloc_metadata(drv: Qcow2Driver, start: int, end: int, mode: str, backing: BackingRead | None) -> None:
    """Map guest ``[start, end)`` the way QEMU's metadata preallocation walks it (see module doc).

    The range is taken in requests of at most ``INT_MAX`` bytes (rounded
    down to clusters); within one request runs continue contiguously, a
    request that does not end on a cluster boundary copies-on-write the rest
    of its last (sub)cluster, and the next one starts inside that cluster.
    """
    cs = drv.cluster_size
    step = (2**31 - 1) // cs * cs
    pos = start
    data_end = 0
    while pos < end:
        host_at_pos, covered = _prealloc_request(drv, pos, min(end, pos + step), backing)
        data_end = host_at_pos + (covered - pos)
        pos = covered
    # The file must reach the end of the last request (reads past EOF would fail).
    has_df = drv.header.has_data_file
    target = drv.data_file if has_df and drv.data_file is not None else drv.file
    size = target.size()
    if data_end > size:
        drv.flush()
        if mode in ("falloc", "full"):
            _fill(target, size, data_end, mode)
        else:
            target.truncate(data_end)


def _prealloc_request(drv: Qcow2Driver, pos: int, req_end: int, backing: BackingRead | None) -> tuple[int, int]:
    """One allocation request over ``[pos, req_end)``; returns the host offset of ``pos`` and where it stopped."""
    io = drv.io
    cm = drv.clusters
    rc = drv.refcounts
    cs = drv.cluster_size
    cb = drv.header.cluster_bits
    ext = drv.header.extended_l2
    sub = cs // 32 if ext else cs
    has_df = drv.header.has_data_file
    n_l2 = drv.geometry.l2_entries
    g = pos >> cb
    nb_end = -(-req_end // cs)
    host: int | None = None  # where the next run would continue contiguously
    host_at_pos = -1
    covered = pos
    while g < nb_end:
        i1 = g // n_l2
        l2_off = io._l2_for_write(i1)
        io._before_new_references()  # pending decrements go out before new counts (no ordering cycle)
        entries, bitmaps = cm.l2.get(l2_off)
        idx = g % n_l2
        old = int(entries[idx])
        if _entry_is_ours(drv, old):
            # Already ours (only a cluster holding the old end can be): keep it, continue after it.
            off = old & L.L2E_OFFSET_MASK if not has_df else g << cb
            if host is not None and off != host:
                break
            if old & L.OFLAG_ZERO and not ext:
                _write_data(drv, off, _head_bytes(drv, max(pos, g << cb), backing))
                entries[idx] = off | L.OFLAG_COPIED
                io._finish_update(l2_off, False, [])
            if host_at_pos < 0:
                host_at_pos = off + (pos - (g << cb))
            host = off + cs
            g += 1
            covered = min(req_end, g << cb)
            continue
        run = min(nb_end - g, n_l2 - idx)
        if has_df:
            if host is not None and host != g << cb:
                break
            first_host, nb = g << cb, run
        elif host is None:
            first_host, nb = rc.alloc_clusters(run * cs), run
        else:
            first_host = host
            nb = rc.alloc_at(host, run)
            if nb == 0:
                break
        if host_at_pos < 0:
            host_at_pos = first_host + (pos - (g << cb))
        if not has_df:
            # Entries must never point past the end of the file (``check`` calls that corruption):
            # reach into the run's last cluster now; the final size is set after the walk.
            reach = first_host + (nb - 1) * cs + 512
            if drv.file.size() < reach:
                drv.file.truncate(reach)
        head = _head_bytes(drv, pos, backing) if g << cb < pos else b""
        to_free = _link(drv, entries, bitmaps, idx, first_host, nb, keep_bitmaps=True)
        # COW: the old part of a partly new first cluster, the rest of the last (sub)cluster
        if head:
            lo = 0 if not ext or (old & L.L2E_OFFSET_MASK) else len(head) // sub * sub
            _write_data(drv, first_host + lo, head[lo:])
        g += nb
        covered = min(req_end, g << cb)
        if covered % cs:
            tail_end = -(-(covered % cs) // sub) * sub
            _write_data(drv, first_host + (nb - 1) * cs + covered % cs, bytes(tail_end - covered % cs))
        io._finish_update(l2_off, not has_df, to_free)
        host = first_host + nb * cs
    return host_at_pos, covered


def _write_data(drv: Qcow2Driver, host: int, data: bytes) -> None:
    if data:
        drv.io.data_file.pwrite(host, data)


def _link(drv: Qcow2Driver, entries: Tab, bitmaps: Tab, idx: int, host: int, nb: int, *,
          keep_bitmaps: bool) -> list[int]:
    """Point entries ``idx..idx+nb`` at ``host...``; returns the old entries that held references."""
    T = tables.of(entries)
    old = T.tolist(T.get_slice(entries, idx, idx + nb))
    T.set_strided(entries, idx, 1, host | L.OFLAG_COPIED, nb, drv.cluster_size)  # (hosts stay below bit 56)
    if not keep_bitmaps:
        T.set_strided(bitmaps, idx, 1, 0xFFFFFFFF, nb, 0)
    held = L.OFLAG_COMPRESSED if drv.header.has_data_file else L.OFLAG_COMPRESSED | L.L2E_OFFSET_MASK
    return [int(e) for e in old if e & held]


def _prealloc_falloc(drv: Qcow2Driver, start: int, end: int, mode: str, backing: BackingRead | None, *,
                     alloc_subclusters: bool) -> None:
    """``falloc``/``full``: one data run after a fresh refcount area at the end of the file."""
    io = drv.io
    cm = drv.clusters
    rc = drv.refcounts
    rc.use_backend(tables.NUMPY)  # (the refcount area's bulk allocation: numpy only)
    cm.use_backend(tables.NUMPY)  # (and the cluster map's tables: a small writable image holds lists)
    cs = drv.cluster_size
    n_l2 = drv.geometry.l2_entries
    first = start // cs
    nb_new = -(-end // cs) - first
    nb_l2 = -(-nb_new // n_l2) + 1  # an overestimate: a head/tail table may be needed
    drv.flush()
    # Free clusters at the end of the file are cut off first; the new area starts after the last used one.
    _cut_file(drv)
    file_end = -(-drv.file.size() // cs) * cs
    try:
        area_end = rc.add_area(file_end, nb_new + nb_l2, exact=True)
    except VdkitError as exc:
        raise exc.prefixed("Failed to resize refcount structures: ") from exc
    got = rc.alloc_at(area_end, nb_new)
    if got != nb_new:
        raise VdkitError("Failed to resize refcount structures: Input/output error", errno=errno.EIO)
    rc.flush()
    run_end = area_end + nb_new * cs
    try:
        _fill(drv.file, drv.file.size(), run_end, mode)
    except VdkitError as exc:
        rc.free(area_end, nb_new * cs)  # nothing points at the run yet
        raise VdkitError(f"Failed to resize underlying file: {exc.message}", errno=exc.errno) from exc
    head = _head_bytes(drv, start, backing)
    host = area_end
    g = first
    last = first + nb_new
    while g < last:
        i1 = g // n_l2
        idx = g % n_l2
        nb = min(last - g, n_l2 - idx)
        l2_off = io._l2_for_write(i1)
        io._before_new_references()
        entries, bitmaps = cm.l2.get(l2_off)
        if g == first and head:
            _write_data(drv, host, head)
        to_free = _link(drv, entries, bitmaps, idx, host, nb, keep_bitmaps=not alloc_subclusters)
        io._finish_update(l2_off, True, to_free)
        host += nb * cs
        g += nb


def _fill(f: ImageFile, start: int, end: int, mode: str) -> None:
    """Extend ``f`` to ``end``, really allocating ``[start, end)``: fallocate, or zeros for ``full``.

    On failure the file is cut back to ``start`` (which also releases blocks
    a partly successful fallocate took) and QEMU's file-driver message is
    raised.
    """
    if end <= start:
        return
    if mode not in ("falloc", "full"):
        f.truncate(end)
        return
    try:
        if mode == "falloc":
            try:
                os.posix_fallocate(f.fd, start, end - start)
            except OSError as exc:
                raise VdkitError(f"Could not preallocate new data: {os.strerror(exc.errno or errno.EIO)}",
                                 errno=exc.errno) from exc
            return
        f.truncate(end)
        chunk = bytes(1 << 20)
        pos = start
        while pos < end:
            n = min(len(chunk), end - pos)
            try:
                f.pwrite(pos, chunk[:n] if n < len(chunk) else chunk)
            except OSError as exc:
                raise VdkitError(f"Could not write zeros for preallocation: {os.strerror(exc.errno or errno.EIO)}",
                                 errno=exc.errno) from exc
            pos += n
    except VdkitError:
        try:
            f.truncate(start)
        except OSError:
            pass
        raise


def _shrink(drv: Qcow2Driver, new_size: int, old_size: int, needed: int) -> None:
    cs = drv.cluster_size
    cb = drv.header.cluster_bits
    io = drv.io
    cm = drv.clusters
    rc = drv.refcounts
    geom = drv.geometry
    start = -(-new_size // cs) * cs
    # 1. drop whole clusters beyond the new end (L2 tables that stay are made writable first)
    span = geom.l1_span
    pos = start
    transient = _TransientTables(drv, -(-old_size // span) - start // span)
    # An unaligned L2 table offset fails QEMU's discard fatally, and a fatal event drops what its
    # caches hold: the tables and counts the discard changed before it never reach the disk (only
    # a transient table's allocation flushes them first).  Fail before changing anything then.
    for i1 in range(start // span, min(len(cm.l1), -(-old_size // span))):
        l2_at = int(cm.l1[i1]) & L.L1E_OFFSET_MASK
        if not l2_at:
            break
        if l2_at % cs:
            raise drv.signal_corruption(f"L2 table offset {hexalt(l2_at)} unaligned (L1 index: {hexalt(i1)})")
    while pos < old_size:
        i1 = pos // span
        t_end = min(old_size, (i1 + 1) * span)
        if i1 < len(cm.l1) and not int(cm.l1[i1]) & L.L1E_OFFSET_MASK:
            transient.take(i1)
        if i1 < len(cm.l1) and int(cm.l1[i1]) & L.L1E_OFFSET_MASK:
            l2_off = io._l2_for_write(i1)
            entries, bitmaps = cm.l2.get(l2_off)
            to_free: list[int] = []
            changed = False
            for c in range(pos >> cb, ((t_end - 1) >> cb) + 1):
                idx = geom.l2_index(c << cb)
                old = int(entries[idx])
                if old or int(bitmaps[idx]):
                    changed = True
                    entries[idx] = 0
                    bitmaps[idx] = 0
                    if old & L.OFLAG_COMPRESSED or old & L.L2E_OFFSET_MASK:
                        to_free.append(old)
            if changed:  # a table the discard leaves as it was is not written back (QEMU's cache)
                io._finish_update(l2_off, False, to_free, discard=True)
        pos = t_end
    # 2. L1 entries past the new end: zero them on disk, then free their trees
    if len(cm.l1) > needed:
        dropped = cm.T.tolist(cm.l1[needed:])  # (a copy)
        cm.l1[needed:] = cm.T.zeros(len(cm.l1) - needed)
        # (QEMU zeroes these entries without testing refcount blocks: a damaged refcount table entry
        # naming the L1 table's cluster does not stop it, seed 235)
        io._check_overlap(cm.l1_offset + needed * 8, 8 * (len(cm.l1) - needed),
                          ignore=Metadata.ACTIVE_L1 | Metadata.REFCOUNT_BLOCK)
        drv.file.pwrite(cm.l1_offset + needed * 8, bytes(8 * (len(cm.l1) - needed)))
        drv.file.flush()
        for e in dropped:
            l2_off = int(e) & L.L1E_OFFSET_MASK
            if not l2_off:
                continue
            cm.l2.discard(l2_off)
            io._before_decrement()
            if rc.release(l2_off, cs) and rc.get(l2_off >> cb) == 0:
                drv.file.punch_hole(l2_off, cs, extend=False)
    drv.flush()
    # 3. refcount blocks that count only themselves: _shrink_reftable


class _TransientTables:
    """Fail where QEMU's discard of the cropped range fails on the L2 tables it creates and drops.

    QEMU's discard gives every L1 entry of the range without an L2 table a new (empty) one, which the
    L1 shrink frees again right after: on a sound image no trace is left, so vdkit creates none.  On
    damaged refcounts those tables land where QEMU refuses to write (a zero count on the header or
    on other metadata).  :meth:`take` finds the cluster QEMU's table would take at that point (first
    fit, after the ones taken before; clusters the discard freed meanwhile are reused, as QEMU's
    allocator does) and applies QEMU's tests to it.  Bounded: beyond 65536 entries nothing is tested.
    """

    def __init__(self, drv: Qcow2Driver, entries: int) -> None:
        self.drv = drv
        self.on = entries <= 65536
        # what QEMU's tables would hold: one run [run_start, run_end) plus clusters freed below it
        self.run_start = self.run_end = -1
        self.low: set[int] = set()
        # free clusters right after the run, found in bulk; valid while no refcount changed
        self.ahead: list[int] = []
        self.seen = -1

    def _next(self) -> int:
        rc = self.drv.refcounts
        if rc.changes == self.seen and self.ahead:
            return self.ahead.pop()
        c = rc.find_free(1, rc.free_hint)
        while True:
            if self.run_start <= c < self.run_end:
                c = rc.find_free(1, self.run_end)
            elif c in self.low:
                c = rc.find_free(1, c + 1)
            else:
                break
        if c >= self.run_end:
            counts = rc.T.tolist(rc.get_many(rc.T.arange(c + 1, c + 4097)))
            self.ahead = [c + 1 + k for k in range(len(counts) - 1, -1, -1) if not counts[k]]
            self.seen = rc.changes
        return c

    def take(self, i1: int) -> None:
        """The table QEMU creates for empty L1 entry ``i1``."""
        if not self.on:
            return
        drv = self.drv
        c = self._next()
        if self.run_start < 0:
            self.run_start, self.run_end = c, c + 1
        elif c >= self.run_end:
            self.run_end = c + 1
        else:
            self.low.add(c)
        if c == 0:
            raise drv.signal_corruption("Preventing invalid allocation of L2 table at offset 0")
        cs = drv.cluster_size
        rc = drv.refcounts
        blk = rc.block_offset(c // rc.entries_per_block)
        if blk and drv.io._overlapping(blk, blk + cs, Metadata.REFCOUNT_BLOCK) is not None:
            # the table's count goes into a block that is also other metadata (a damaged L1 entry
            # naming it as an L2 table): QEMU's refcount flush before the table write is refused
            # there, before anything of this table or the later L1 entries changes
            drv.io._check_overlap(blk, cs, ignore=Metadata.REFCOUNT_BLOCK)
        table_bad = drv.io._overlapping(c * cs, (c + 1) * cs, Metadata.ACTIVE_L2) is not None
        l1_at = drv.clusters.l1_offset + i1 * 8
        l1_bad = not table_bad and drv.io._overlapping(l1_at, l1_at + 8, Metadata.ACTIVE_L1) is not None
        if table_bad or l1_bad:
            # QEMU counts the table's cluster and writes its refcounts (the frees of the discard so
            # far, and this count) before the table write that its overlap check refuses: the image
            # keeps them (the count is a leak); dropping them would leak every cluster freed so far
            rc.update(c * cs, cs, 1)
            rc.flush()
        drv.io._check_overlap(c * cs, cs, ignore=Metadata.ACTIVE_L2)
        if l1_bad:
            # the table is written, then its L1 entry's write is refused (the L1 table shares a
            # cluster with other metadata, e.g. an unaligned refcount block): the table stays, leaked
            drv.file.pwrite(c * cs, bytes(cs))
            drv.file.flush()
            drv.io._check_overlap(l1_at, 8, ignore=Metadata.ACTIVE_L1)


def _shrink_reftable(drv: Qcow2Driver) -> None:
    rc = drv.refcounts
    cs = drv.cluster_size
    cb = drv.header.cluster_bits
    epb = rc.entries_per_block
    T = rc.T
    new_table = T.copy(rc.table)
    # Damaged tables fail as QEMU's two passes fail: first every block is loaded (an unaligned one
    # cannot be) and the table without the unused ones written; then each dropped block must have
    # been counted exactly once by a block in the table.
    for i in T.nonzero(rc.table):
        off = int(rc.table[i]) & L.REFT_OFFSET_MASK
        if not off:
            continue
        if off % cs:
            raise drv.signal_corruption(f"Cannot get entry from refcount block cache: Offset {off:#x} is unaligned")
        vals = rc.block_values(i)
        if vals is None:
            continue
        own = off >> cb
        nonzero = T.count_nonzero(vals, 0, len(vals))
        if own // epb == i and vals[own % epb] != 0:
            nonzero -= 1
        if nonzero == 0:
            new_table[i] = 0
    if T.equal(new_table, rc.table):
        return
    drv.io._check_overlap(rc.table_offset, rc.table_clusters * cs, ignore=Metadata.REFCOUNT_TABLE)
    drv.file.pwrite(rc.table_offset, T.encode_u64(new_table))
    drv.file.flush()
    for i in [i for i in T.nonzero(rc.table) if not new_table[i]]:  # (the blocks dropped above)
        off = rc.block_offset(i)
        _check_unused_refblock(drv, off)
        rc.table[i] = 0
        rc._blocks.pop(i, None)
        rc._dirty.discard(i)
        drv.file.punch_hole(off, cs, extend=False)


def _check_unused_refblock(drv: Qcow2Driver, off: int) -> None:
    """The block at ``off`` is about to be dropped: its own count must be 1 (as QEMU checks, with its texts)."""
    rc = drv.refcounts
    ci = off >> drv.header.cluster_bits
    rt = ci // rc.entries_per_block
    if rt >= len(rc.table) or not int(rc.table[rt]) & L.REFT_OFFSET_MASK:
        raise drv.signal_corruption(f"Refblock at {off:#x} is not covered by the refcount structures")
    count = rc.get(ci)
    if count != 1:
        cover = int(rc.table[rt]) & L.REFT_OFFSET_MASK
        event = drv.signal_corruption(f"Invalid refcount: refblock offset {cover:#x}, reftable index {rt}, "
                                      f"block offset {off:#x}, refcount {count}")
        event.errno = errno.EINVAL  # (QEMU's error here; the event's report rides on it)
        raise event


def _cut_file(drv: Qcow2Driver) -> None:
    """Truncate the file after the last cluster with a non-zero refcount."""
    rc = drv.refcounts
    cs = drv.cluster_size
    size = drv.file.size()
    nb = -(-size // cs)
    last = -1
    epb = rc.entries_per_block
    for i in range(min(len(rc.table), -(-nb // epb)) - 1, -1, -1):
        vals = rc.block_values(i)
        if vals is None:
            continue
        lim = min(epb, nb - i * epb)
        nz = rc.T.nonzero(rc.T.get_slice(vals, 0, lim))
        if nz:
            last = i * epb + nz[-1]
            break
    if last < 0:
        # no cluster counted at all (a refcount table past the end of the file reads as zeros):
        # cutting after the "last" one would truncate the whole image away; QEMU refuses too
        raise drv.signal_corruption("There are no references in the refcount table.")
    if (last + 1) * cs < size:
        drv.file.truncate((last + 1) * cs)
