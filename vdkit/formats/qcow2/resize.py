"""Changing the virtual size of a qcow2 image (``qemu-img resize``).

Growing: the active L1 table is grown to exactly the entries the new size
needs (a new table, then one 12-byte header switch, algorithms doc §1.8),
then the 8-byte size field is rewritten.

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
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from vdkit.errors import UnsupportedError, VdkitError
from vdkit.formats.qcow2 import layout as L

if TYPE_CHECKING:
    from vdkit.formats.qcow2.driver import Qcow2Driver


def truncate(drv: Qcow2Driver, new_size: int) -> None:
    """Resize the virtual disk to ``new_size`` bytes (grow or shrink)."""
    h = drv.header
    if new_size % 512:
        raise VdkitError("The new size must be a multiple of 512")
    if h.version < 3 and drv.snapshots():
        raise UnsupportedError("Can't resize a v2 image which has snapshots")
    if drv.bitmaps:
        raise UnsupportedError("Can't resize an image which has bitmaps")
    if h.has_data_file and h.data_file_raw:
        raise UnsupportedError("Resizing images with a raw external data file is not supported by vdkit")
    old_size = h.size
    if new_size == old_size:
        return
    cm = drv.clusters
    rc = drv.refcounts
    needed = h.l1_entries_needed(new_size)
    if new_size > old_size:
        if needed > len(cm.l1):
            cm.grow_l1(needed, rc, exact=True)
    else:
        _shrink(drv, new_size, old_size, needed)
    drv.flush()
    drv.file.pwrite(24, new_size.to_bytes(8, "big"))
    drv.file.flush()
    drv.header = drv.header.evolve(size=new_size)
    if new_size < old_size:
        _cut_file(drv)
    drv.__dict__.pop("io", None)


def _shrink(drv: Qcow2Driver, new_size: int, old_size: int, needed: int) -> None:
    from vdkit.block.io import punch_hole

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
    while pos < old_size:
        i1 = pos // span
        t_end = min(old_size, (i1 + 1) * span)
        if i1 < len(cm.l1) and int(cm.l1[i1]) & L.L1E_OFFSET_MASK:
            l2_off = io._l2_for_write(i1)
            entries, bitmaps = cm.l2.get(l2_off)
            to_free: list[int] = []
            for c in range(pos >> cb, ((t_end - 1) >> cb) + 1):
                idx = geom.l2_index(c << cb)
                old = int(entries[idx])
                if old or int(bitmaps[idx]):
                    entries[idx] = np.uint64(0)
                    bitmaps[idx] = np.uint64(0)
                    if old & L.OFLAG_COMPRESSED or old & L.L2E_OFFSET_MASK:
                        to_free.append(old)
            io._finish_update(l2_off, False, to_free, discard=True)
        pos = t_end
    # 2. L1 entries past the new end: zero them on disk, then free their trees
    if len(cm.l1) > needed:
        dropped = cm.l1[needed:].copy()
        cm.l1[needed:] = 0
        drv.file.pwrite(cm.l1_offset + needed * 8, bytes(8 * (len(cm.l1) - needed)))
        drv.file.flush()
        for e in dropped.tolist():
            l2_off = int(e) & L.L1E_OFFSET_MASK
            if not l2_off:
                continue
            cm.l2.discard(l2_off)
            io._before_decrement()
            rc.free(l2_off, cs)
            if rc.get(l2_off >> cb) == 0:
                punch_hole(drv.file, l2_off, cs, extend=False)
    drv.flush()
    # 3. refcount blocks that count only themselves
    _shrink_reftable(drv)


def _shrink_reftable(drv: Qcow2Driver) -> None:
    from vdkit.block.io import punch_hole

    rc = drv.refcounts
    cs = drv.cluster_size
    cb = drv.header.cluster_bits
    epb = rc.entries_per_block
    new_table = rc.table.copy()
    for i in np.flatnonzero(rc.table).tolist():
        off = rc.block_offset(i)
        vals = rc.block_values(i)
        if vals is None:
            continue
        own = off >> cb
        nonzero = np.count_nonzero(vals)
        if own // epb == i and vals[own % epb] != 0:
            nonzero -= 1
        if nonzero == 0:
            new_table[i] = 0
    if np.array_equal(new_table, rc.table):
        return
    drv.file.pwrite(rc.table_offset, new_table.astype(">u8").tobytes())
    drv.file.flush()
    for i in np.flatnonzero(rc.table != new_table).tolist():
        off = rc.block_offset(i)
        rc.table[i] = 0
        rc._blocks.pop(i, None)
        rc._dirty.discard(i)
        punch_hole(drv.file, off, cs, extend=False)


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
        nz = np.flatnonzero(vals[:lim])
        if len(nz):
            last = i * epb + int(nz[-1])
            break
    if (last + 1) * cs < size:
        drv.file.truncate((last + 1) * cs)
