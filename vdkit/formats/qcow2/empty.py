"""Emptying a qcow2 image (what ``qemu-img commit`` does to the top image afterwards).

When nothing but the basic structures can be referenced (v3, no snapshots,
no bitmaps, no LUKS header, no external data file, and the L1 table fits the
first refcount block's range), the image is rebuilt in place as a fresh one:
header, refcount table in cluster 1, one refcount block in cluster 2, a
zeroed L1 table from cluster 3, and the file cut right after it.  The dirty
bit is set for the duration, so a crash in between leaves an image that the
next writable open repairs instead of trusting half-written refcounts.

Otherwise every cluster of the active tree is discarded (entries become
unallocated), which keeps snapshots and other referenced structures intact.
"""

from __future__ import annotations

from vdkit.formats.qcow2 import layout as L

TYPE_CHECKING = False  # typing and collections are not imported at run time (start-up cost)
if TYPE_CHECKING:
    from vdkit.formats.qcow2.driver import Qcow2Driver


def make_empty(drv: Qcow2Driver) -> None:
    h = drv.header
    cs = h.cluster_size
    l1_clusters = -(-h.l1_size * 8 // cs) if h.l1_size else 0
    entries_per_block = cs * 8 // h.refcount_bits
    simple = (h.version >= 3 and not drv.snapshots() and h.bitmaps is None and h.crypt_method == L.CRYPT_NONE
              and not h.has_data_file and 3 + l1_clusters <= entries_per_block)
    if not simple:
        drv.io.discard(0, h.size, full=True)
        drv.flush()
        return
    from vdkit.formats.qcow2.refcount import encode_block

    drv.flush()
    f = drv.file
    dirty = h.incompatible_features | L.INCOMPAT_DIRTY
    f.pwrite(72, dirty.to_bytes(8, "big"))
    f.flush()
    f.pwrite(cs, bytes((2 + max(l1_clusters, 0)) * cs))  # refcount table, block and L1, all zero
    f.pwrite(40, (3 * cs).to_bytes(8, "big") + cs.to_bytes(8, "big") + (1).to_bytes(4, "big"))
    f.flush()
    f.pwrite(cs, (2 * cs).to_bytes(8, "big"))
    f.flush()
    used = 3 + l1_clusters  # header, refcount table and block, L1 (a list: no numpy import for this)
    f.pwrite(2 * cs, encode_block([1] * used + [0] * (entries_per_block - used), h.refcount_bits))
    f.flush()
    f.pwrite(72, h.incompatible_features.to_bytes(8, "big"))
    f.flush()
    f.truncate((3 + l1_clusters) * cs)
    drv.header = h.evolve(l1_table_offset=3 * cs, refcount_table_offset=cs, refcount_table_clusters=1)
    for attr in ("refcounts", "clusters", "io"):
        drv.__dict__.pop(attr, None)
