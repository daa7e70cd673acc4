"""Creating a qcow2 image whose bytes equal what ``qemu-img create`` 7.2 writes.

QEMU does not lay a fresh image out from a formula: it writes a minimal
image (header, a one-cluster refcount table and one refcount block), opens
it, and then *grows* it with its ordinary allocator (the active L1 table,
and with ``preallocation=metadata`` every L2 table and data cluster).  Where
the L1 table, extra refcount blocks and relocated refcount tables land, and
which stale bytes stay behind, are all consequences of that allocator's
first-fit search, its "restart" protocol and its refcount-table growth
(``qcow2-algorithms.md`` §1.2-§1.5, §1.8).  ``preallocation=falloc|full``
(without a data file) is a 0-byte image grown by ``resize.truncate``, as
qemu-img grows it: a new refcount table at the end of the file, then the
data run (:func:`_create_falloc`).  So :class:`_ImageBuilder`
replays that allocator in memory, records every write in order, and the
result is written to the file in one go.  Byte equality with qemu-img is
checked by ``tests/diff/test_create.py`` over a matrix of options.

The in-memory replay is also what keeps creation failure-safe: nothing is
written until the whole layout is known, and a failed creation removes the
file, as qemu-img does.
"""

from __future__ import annotations

import errno
import os

from vdkit.errors import VdkitError, os_error_message
from vdkit.formats.qcow2 import layout as L
from vdkit.formats.qcow2.layout import Qcow2Header, serialize_header
from vdkit.formats.qcow2.refcount import RefcountArea
from vdkit.io import tables
from vdkit.io.file import ImageFile, remove_new_file
from vdkit.record import record, replace

TYPE_CHECKING = False
if TYPE_CHECKING:
    from vdkit.io.tables import Backend, Tab

DEFAULT_CLUSTER_SIZE = 65536
MAX_CLUSTER_SIZE = 1 << L.MAX_CLUSTER_BITS
MIN_EXTL2_CLUSTER_SIZE = 16384
_V3 = "(use version=v3 or greater)"


class ImageTooLargeError(VdkitError):
    """The allocator ran out of room (QEMU's -EFBIG); the CLI rewords it."""

    def __init__(self) -> None:
        super().__init__("File too large", errno=errno.EFBIG)


@record
class Qcow2CreateOptions:
    """Validated-to-be creation parameters (``BlockdevCreateOptionsQcow2``)."""

    size: int
    version: int = 3
    cluster_size: int = DEFAULT_CLUSTER_SIZE
    refcount_bits: int = 16
    lazy_refcounts: bool = False
    extended_l2: bool = False
    compression_type: str = "zlib"
    preallocation: str = "off"
    backing_file: str | None = None
    backing_fmt: str | None = None
    data_file: str | None = None
    data_file_raw: bool = False


def validate(o: Qcow2CreateOptions) -> None:
    """Refuse bad combinations with qemu-img's words, in qemu-img's order."""
    if o.extended_l2 and o.version < 3:
        raise VdkitError(f"Extended L2 entries are only supported with compatibility level 1.1 and above {_V3}")
    cs = o.cluster_size
    if cs < 512 or cs > MAX_CLUSTER_SIZE or cs & (cs - 1):
        raise VdkitError(f"Cluster size must be a power of two between 512 and {MAX_CLUSTER_SIZE // 1024}k")
    if o.extended_l2 and o.cluster_size < MIN_EXTL2_CLUSTER_SIZE:
        raise VdkitError(
            f"Extended L2 entries are only supported with cluster sizes of at least {MIN_EXTL2_CLUSTER_SIZE} bytes"
        )
    if o.backing_file is not None and o.preallocation != "off" and not o.extended_l2:
        raise VdkitError("Backing file and preallocation can only be used at the same time if extended_l2 is on")
    if o.backing_fmt is not None and o.backing_file is None:
        raise VdkitError("Backing format cannot be used without backing file")
    if o.version < 3 and o.lazy_refcounts:
        raise VdkitError(f"Lazy refcounts only supported with compatibility level 1.1 and above {_V3}")
    rb = o.refcount_bits
    if rb > 64 or rb <= 0 or rb & (rb - 1):
        raise VdkitError("Refcount width must be a power of two and may not exceed 64 bits")
    if o.version < 3 and rb != 16:
        raise VdkitError(f"Different refcount widths than 16 bits require compatibility level 1.1 or above {_V3}")
    if o.data_file_raw and o.data_file is None:
        raise VdkitError("data-file-raw requires data-file")
    if o.data_file_raw and o.backing_file is not None:
        raise VdkitError("Backing file and data-file-raw cannot be used at the same time")
    if o.data_file is not None and o.version < 3:
        raise VdkitError(f"External data files are only supported with compatibility level 1.1 and above {_V3}")
    if o.compression_type != "zlib" and o.version < 3:
        raise VdkitError(f"Non-zlib compression type is only supported with compatibility level 1.1 and above {_V3}")


class _Again(Exception):
    """The allocator's "restart": new refcount metadata may sit where the caller looked."""


class _ImageBuilder:
    """An in-memory replay of QEMU's cluster allocator on a fresh image.

    Its tables are those of the backend ``T`` (plain lists unless preallocation maps so many
    clusters that numpy pays for its import).
    """

    def __init__(self, cluster_bits: int, refcount_order: int, T: Backend = tables.SMALL) -> None:
        self.T = T
        self.cluster_bits = cluster_bits
        self.cs = 1 << cluster_bits
        self.refcount_order = refcount_order
        self.refcount_bits = 1 << refcount_order
        self.rb_bits = cluster_bits + 3 - refcount_order
        self.rb_entries = 1 << self.rb_bits
        self.max_refcount = (1 << self.refcount_bits) - 1
        self.free_index = 0
        self.disk: dict[int, bytearray] = {}
        self.file_end = 0
        # The minimal image qemu-img writes before opening it: header cluster,
        # a one-cluster refcount table pointing at a zeroed block in cluster 2.
        self.reftable_offset = self.cs
        self.reftable: list[int] = [0] * (self.cs // 8)
        self.reftable[0] = 2 * self.cs
        self.blocks: dict[int, Tab] = {2 * self.cs: T.zeros(self.rb_entries)}
        self.write(0, bytes(self.cs))
        self.write(self.cs, self._reftable_bytes() + bytes(self.cs))

    # -- the file ----------------------------------------------------------------------------
    def write(self, offset: int, data: bytes) -> None:
        cs = self.cs
        pos = 0
        while pos < len(data):
            ci, within = divmod(offset + pos, cs)
            n = min(cs - within, len(data) - pos)
            buf = self.disk.get(ci)
            if buf is None:
                buf = self.disk[ci] = bytearray(cs)
            buf[within : within + n] = data[pos : pos + n]
            pos += n
        self.file_end = max(self.file_end, offset + len(data))

    def _reftable_bytes(self) -> bytes:
        return tables.SMALL.encode_u64(self.reftable)

    # -- refcounts -----------------------------------------------------------------------------
    def get_refcount(self, ci: int) -> int:
        ti = ci >> self.rb_bits
        if ti >= len(self.reftable) or not self.reftable[ti]:
            return 0
        return int(self.blocks[self.reftable[ti]][ci & (self.rb_entries - 1)])

    def refcounts(self, start: int, n: int) -> Tab:
        """Refcounts of clusters ``[start, start + n)``; missing blocks read as 0."""
        T = self.T
        out = T.zeros(n)
        ci = start
        while ci < start + n:
            ti = ci >> self.rb_bits
            seg_end = min(start + n, (ti + 1) << self.rb_bits)
            if ti < len(self.reftable) and self.reftable[ti]:
                a = ci & (self.rb_entries - 1)
                T.set_slice(out, ci - start, T.get_slice(self.blocks[self.reftable[ti]], a, a + seg_end - ci))
            ci = seg_end
        return out

    def alloc_noref(self, nb: int) -> int:
        """First fit from the free hint; the hint ends just past the clusters found.

        Equivalent to QEMU's cluster-by-cluster search (a used cluster restarts
        the count at the next one), done a window at a time.
        """
        s = self.free_index
        window = max(nb, 4096)
        while True:
            _, first, tail = self.T.zero_scan(self.refcounts(s, window), 0, nb)
            if first >= 0:
                s += first
                break
            s += tail  # the zero run at the window's end may go on
        self.free_index = s + nb
        if (self.free_index << self.cluster_bits) > L.MAX_HOST_OFFSET:
            raise ImageTooLargeError()
        return s << self.cluster_bits

    def alloc(self, size: int) -> int:
        while True:
            offset = self.alloc_noref(-(-size // self.cs))
            try:
                self.update(offset, size, 1)
                return offset
            except _Again:
                continue

    def alloc_at(self, offset: int, nb: int) -> int:
        """Allocate up to ``nb`` clusters exactly at ``offset``; returns how many."""
        while True:
            i, _, _ = self.T.zero_scan(self.refcounts(offset >> self.cluster_bits, nb), 0, nb)
            try:
                self.update(offset, i << self.cluster_bits, 1)
                return i
            except _Again:
                continue

    def free(self, offset: int, size: int) -> None:
        self.update(offset, size, -1)

    def update(self, offset: int, length: int, addend: int) -> None:
        """Add ``addend`` to every cluster of the range; undo and re-raise on restart."""
        if length <= 0:
            return
        first = offset >> self.cluster_bits
        last = (offset + length - 1) >> self.cluster_bits
        ci = first
        T = self.T
        try:
            while ci <= last:
                ti = ci >> self.rb_bits
                block = self.refcount_block_for(ci)
                a = ci & (self.rb_entries - 1)
                n = min(last + 1, (ti + 1) << self.rb_bits) - ci
                if not T.fits(block, a, a + n, addend, self.max_refcount):
                    raise VdkitError("Invalid argument", errno=errno.EINVAL)
                zeros = T.add_slice(block, a, a + n, addend)
                if zeros and ci + zeros[0] - a < self.free_index:
                    self.free_index = ci + zeros[0] - a
                ci += n
        except _Again:
            # The caller searches again, starting with the clusters it just tried.
            self.free_index = min(self.free_index, first)
            self.update(offset, (ci - first) << self.cluster_bits, -addend)
            raise

    def refcount_block_for(self, ci: int) -> Tab:
        """The block describing cluster ``ci``; allocating one raises :class:`_Again`."""
        ti = ci >> self.rb_bits
        if ti < len(self.reftable) and self.reftable[ti]:
            return self.blocks[self.reftable[ti]]
        new_block = self.alloc_noref(1)
        nb_idx = new_block >> self.cluster_bits
        if nb_idx >> self.rb_bits == ti:
            blk = self.T.zeros(self.rb_entries)
            blk[nb_idx & (self.rb_entries - 1)] = 1  # the block describes itself
        else:
            self.update(new_block, self.cs, 1)
            blk = self.T.zeros(self.rb_entries)
        self.blocks[new_block] = blk
        self.write(new_block, bytes(self.cs))
        if ti < len(self.reftable):
            self.reftable[ti] = new_block
            self.write(self.reftable_offset + ti * 8, new_block.to_bytes(8, "big"))
            raise _Again
        blocks_used = -(-max(ci + 1, nb_idx + 1) // self.rb_entries)
        if blocks_used > L.MAX_REFTABLE_SIZE // 8:
            raise ImageTooLargeError()
        self.refcount_area(blocks_used * self.rb_entries * self.cs, ti, new_block)
        raise _Again

    def refcount_area(self, start: int, new_index: int, new_block: int) -> None:
        """Grow the refcount table: new blocks and table at ``start``, describing themselves."""
        try:
            plan = RefcountArea(self.reftable, start, 0, exact=False, cluster_bits=self.cluster_bits,
                                refcount_order=self.refcount_order, new_block=(new_index, new_block))
        except VdkitError:
            raise ImageTooLargeError() from None
        for i in plan.new_blocks:
            self.blocks[plan.table[i]] = self.T.zeros(self.rb_entries)
            self.write(plan.table[i], bytes(self.cs))
        for i, lo, hi in plan.counted:
            self.T.add_slice(self.blocks[plan.table[i]], lo, hi, 1)
        old_offset, old_size = self.reftable_offset, len(self.reftable)
        self.reftable = plan.table
        self.reftable_offset = plan.table_offset
        self.write(plan.table_offset, self._reftable_bytes())
        self.free(old_offset, old_size * 8)

    @property
    def reftable_clusters(self) -> int:
        return len(self.reftable) * 8 // self.cs

    def finish(self) -> None:
        """Write the final refcount blocks (they are cached and flushed last)."""
        for off, blk in self.blocks.items():
            self.write(off, self.T.encode_refcounts(blk, self.refcount_bits))


@record
class _Plan:
    builder: _ImageBuilder
    header: Qcow2Header
    data_file_size: int | None
    data_end: int  # end of the preallocated data area in the image file (0: none)


def plan_image(o: Qcow2CreateOptions) -> _Plan:
    """The complete byte layout of the new image, without touching any file."""
    validate(o)
    cluster_bits = o.cluster_size.bit_length() - 1
    refcount_order = o.refcount_bits.bit_length() - 1
    size = -(-o.size // 512) * 512
    prealloc = o.preallocation
    if o.data_file_raw and prealloc == "off":
        prealloc = "metadata"  # a raw data file needs every cluster mapped 1:1
    cs = 1 << cluster_bits
    l2_entry_size = 16 if o.extended_l2 else 8
    l2_entries = cs // l2_entry_size
    l1_size = -(-size // (cs * l2_entries))
    if l1_size > L.MAX_L1_SIZE // 8:
        raise ImageTooLargeError()
    # tables held: the L1, and with preallocation every L2 entry and refcount of the disk's clusters
    held = l1_size * 8
    if prealloc != "off":
        held += -(-size // cs) * (l2_entry_size + max(1, o.refcount_bits // 8))
    T = tables.backend_for(held)
    b = _ImageBuilder(cluster_bits, refcount_order, T)
    b.alloc(3 * cs)  # header, refcount table, first refcount block
    l1_offset = 0
    l1 = T.zeros(l1_size)
    l2_tables: dict[int, Tab] = {}
    if l1_size:
        l1_offset = b.alloc(l1_size * 8)
        b.write(l1_offset, bytes(l1_size * 8))
    data_end = 0
    data_file_size = size if o.data_file is not None else None
    if prealloc != "off" and size:
        data_end = _preallocate(b, o, size, l1, l2_tables, l2_entries, l2_entry_size)
        if o.data_file is not None:
            data_file_size = max(size, data_end)
            data_end = 0
        # (falloc/full without a data file never get here: see _create_falloc)
    if l1_size:
        b.write(l1_offset, T.encode_u64(l1))
    for off, tbl in l2_tables.items():
        b.write(off, T.encode_u64(tbl))
    b.finish()
    b.write(b.reftable_offset, b._reftable_bytes())
    incompat = 0
    if o.data_file is not None:
        incompat |= L.INCOMPAT_DATA_FILE
    if o.compression_type == "zstd":
        incompat |= L.INCOMPAT_COMPRESSION
    if o.extended_l2:
        incompat |= L.INCOMPAT_EXTL2
    header = Qcow2Header(
        version=o.version,
        backing_file_offset=0,
        backing_file_size=0,
        cluster_bits=cluster_bits,
        size=size,
        crypt_method=0,
        l1_size=l1_size,
        l1_table_offset=l1_offset,
        refcount_table_offset=b.reftable_offset,
        refcount_table_clusters=b.reftable_clusters,
        nb_snapshots=0,
        snapshots_offset=0,
        incompatible_features=incompat if o.version >= 3 else 0,
        compatible_features=L.COMPAT_LAZY_REFCOUNTS if o.lazy_refcounts else 0,
        autoclear_features=L.AUTOCLEAR_DATA_FILE_RAW if o.data_file_raw else 0,
        refcount_order=refcount_order,
        header_length=L.V3_HEADER_SIZE if o.version >= 3 else L.V2_HEADER_SIZE,
        compression_type=L.CompressionType.ZSTD if o.compression_type == "zstd" else L.CompressionType.ZLIB,
        backing_format=o.backing_fmt if o.backing_file is not None else None,
        data_file=o.data_file,
        backing_file=o.backing_file,
    )
    try:
        cluster0 = serialize_header(header)
    except VdkitError as exc:
        raise VdkitError("Could not write qcow2 header: File too large") from exc
    b.write(0, cluster0 + bytes(cs - len(cluster0)))
    return _Plan(b, header, data_file_size, data_end)


def _preallocate(
    b: _ImageBuilder, o: Qcow2CreateOptions, size: int, l1: Tab,
    l2_tables: dict[int, Tab], l2_entries: int, l2_entry_size: int,
) -> int:
    """Map every guest cluster, chunk by chunk as QEMU's metadata preallocation does.

    Returns the end of the last data run (the file is extended to it).
    """
    cs = b.cs
    words = l2_entry_size // 8
    nb_clusters = -(-size // cs)
    g = 0
    last_host = 0
    while g < nb_clusters:
        host: int | None = None  # where the chunk would continue contiguously
        while g < nb_clusters:
            l1i = g // l2_entries
            if not l1[l1i]:
                off = b.alloc(cs)
                b.write(off, bytes(cs))
                l2_tables[off] = b.T.zeros(l2_entries * words)
                l1[l1i] = off | L.OFLAG_COPIED
            table = l2_tables[int(l1[l1i]) & L.L1E_OFFSET_MASK]
            run = min(nb_clusters - g, l2_entries - g % l2_entries)
            if o.data_file is not None:
                start = g * cs
                nb = run
            elif host is None:
                start = b.alloc(run * cs)
                nb = run
            else:
                start = host
                nb = b.alloc_at(host, run)
                if nb == 0:
                    break
            # (offsets stay below bit 63: adding to the flagged first entry sets the flag on all)
            b.T.set_strided(table, (g % l2_entries) * words, words, start | L.OFLAG_COPIED, nb, cs)
            host = start + nb * cs
            g += nb
            if g == nb_clusters:
                last_host = host - cs
    # The last cluster may be partly beyond the disk end: QEMU copies-on-write
    # the rest of its (sub)cluster (zeros), then extends the file to the
    # disk end if that is further.
    tail = size - (nb_clusters - 1) * cs
    sub = cs // 32 if o.extended_l2 else cs
    cow_end = last_host + -(-tail // sub) * sub
    data_end = last_host + tail
    if cow_end > data_end:
        if o.data_file is None:
            b.write(data_end, bytes(cow_end - data_end))
        return cow_end
    return data_end


def create_qcow2(filename: str, o: Qcow2CreateOptions, file: ImageFile | None = None) -> None:
    """Create ``filename``; on failure the file is removed, as qemu-img does.

    ``file`` is the already created (locked, emptied) target, when the caller
    made it first the way qemu-img does before validating the options.  If
    the target cannot even be created or locked (another process uses it),
    it is left alone.
    """
    f = file if file is not None else create_file(filename)
    try:
        if o.preallocation in ("falloc", "full") and o.data_file is None:
            if f.is_device:
                validate(o)
                plan_image(replace(o, preallocation="off"))  # the option errors first, as below
                _device_preflight(f, o)
                raise VdkitError("Could not resize image: Failed to resize underlying file: Preallocation mode "
                                 f"'{o.preallocation}' unsupported for this non-regular file")
            _create_falloc(f, o)
        else:
            plan = plan_image(o)
            if f.is_device:
                _device_preflight(f, o)
            try:
                _write_plan(f, plan, o)
            except VdkitError as exc:
                if f.is_device:  # the device is smaller than the image's metadata
                    raise exc.prefixed("Could not resize image: ") from exc
                raise
    except BaseException:
        f.close()
        remove_new_file(filename)  # never a device written in place
        raise
    f.close()


def _create_falloc(f: ImageFile, o: Qcow2CreateOptions) -> None:
    """``preallocation=falloc|full``: an empty image, then grown as ``resize --preallocation`` grows it.

    That is how qemu-img lays these out (a 0-byte image truncated to the size with the mode), so the
    data run lies after a fresh, exactly sized refcount table at the end of the file (0x40000 with
    the defaults) and the L2 tables go first fit, into the freed old table; ``resize.py`` already
    replays that growth byte for byte.  The options are first checked on the full-size layout so
    the errors (image too large, ...) stay the ones ``metadata`` gives.
    """
    from vdkit.formats.qcow2.driver import Qcow2Driver
    from vdkit.formats.qcow2.resize import _prealloc_falloc, truncate

    validate(o)
    plan_image(replace(o, preallocation="off"))  # the full-size layout's checks only
    _write_plan(f, plan_image(replace(o, size=0, preallocation="off")), replace(o, preallocation="off"))
    drv = Qcow2Driver(f, readonly=False)
    try:
        # Opened without its backing file, as QEMU does while creating: nothing shows through.
        size = -(-o.size // 512) * 512
        if size:
            truncate(drv, size, o.preallocation)
        else:  # qemu-img still moves the refcount table to the end for a 0-byte image (0 new clusters)
            _prealloc_falloc(drv, 0, 0, o.preallocation, None, alloc_subclusters=False)
    finally:
        drv.close()


def _device_preflight(f: ImageFile, o: Qcow2CreateOptions) -> None:
    """A device target (written in place): qemu-img's first writes, with its texts when they fail.

    qemu-img writes the header cluster, then the refcount table and block, then opens the image;
    a device that takes writes but gives nothing back (``/dev/null``) fails that open.  The final
    contents are written afterwards by :func:`_write_plan` (the header last, as for a file).
    """
    cs = o.cluster_size
    for offset, length, what in ((0, cs, "qcow2 header"), (cs, 2 * cs, "refcount table")):
        try:
            f.pwrite(offset, bytes(length))
        except OSError as exc:
            raise VdkitError(f"Could not write {what}: {os_error_message(exc)}", errno=exc.errno) from exc
    f.pwrite(0, L.MAGIC)
    if f.pread(0, 4) != L.MAGIC:
        raise VdkitError("Image is not in qcow2 format", errno=errno.EINVAL)


def create_file(filename: str) -> ImageFile:
    """Create (or empty) ``filename`` under the write lock, as QEMU's file driver does.

    An NBD name is an existing export, written in place (``cli/create.py`` has
    already checked its size and zeroed its first sector, as QEMU's fallback).
    """
    if ":" in filename:  # a protocol's name (an NBD export, an RBD image cli/create.py made empty)
        from vdkit.block.chain import protocol_of
        from vdkit.protocols.registry import creates_images, driver_for_prefix, open_name

        proto = driver_for_prefix(protocol_of(filename))
        if proto is not None and creates_images(proto):
            f, _ = open_name(proto, filename, readonly=False, force_share=False)
            return f  # type: ignore[return-value]  # file-like, as for reads
    try:
        fd = os.open(filename, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise VdkitError(f"Could not create '{filename}': {os_error_message(exc)}", errno=exc.errno) from exc
    os.close(fd)
    f = ImageFile(filename, readonly=False)
    f.truncate(0)
    return f


def _write_plan(f: ImageFile, plan: _Plan, o: Qcow2CreateOptions) -> None:
    b = plan.builder
    # Cluster 0 (the header) goes last, so an interrupted creation leaves
    # a file that is not a qcow2 image at all.
    for ci in sorted(b.disk):
        if ci == 0:
            continue
        data = b.disk[ci]
        off = ci * b.cs
        f.pwrite(off, data[: max(0, min(b.cs, b.file_end - off))])
    length = max(b.file_end, plan.data_end)
    f.truncate(length)
    f.pwrite(0, b.disk[0][: min(b.cs, b.file_end)])
    f.flush()
    if o.data_file is not None:
        with create_file(o.data_file) as df:
            assert plan.data_file_size is not None
            df.truncate(plan.data_file_size)
            if o.preallocation in ("falloc", "full"):
                _fill(df, 0, plan.data_file_size, o.preallocation)
            if plan.data_file_size and o.preallocation != "full":
                # As for any new raw file, QEMU allocates the first block with zeros.
                df.pwrite(0, bytes(min(plan.data_file_size, 4096)))


def _fill(f: ImageFile, start: int, end: int, mode: str) -> None:
    """Really allocate ``[start, end)``: fallocate, or write zeros for ``full``."""
    if end <= start:
        return
    if mode == "falloc":
        try:
            os.posix_fallocate(f.fd, start, end - start)
            return
        except OSError:
            pass
    chunk = bytes(1 << 20)
    pos = start
    while pos < end:
        n = min(len(chunk), end - pos)
        f.pwrite(pos, chunk[:n])
        pos += n
