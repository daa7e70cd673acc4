"""QED images: header, two-level tables, reads, block status, allocating writes, check and create.

Layout (public QED specification; QEMU 7.2's limits as observed with qemu-img):
the header is the first cluster; the L1 table and every L2 table are
``table_size`` clusters of u64 LE entries.  An entry is 0 (unallocated: read
from the backing file, or zeros), 1 (a zero cluster) or a cluster-aligned
file offset.  New clusters are appended at the end of the file: data first,
then the L2 table a write needed, so a write's result is deterministic
(``create``/``convert -O qed`` are byte-identical to qemu-img's).

Every offset taken from the image is checked before it is followed: a
cluster offset is valid when it is aligned, past the header and inside the
file (rounded down to whole clusters); a table is valid when its first and
last clusters are (QEMU 7.2 also refuses one-cluster tables, so an image
created with ``table_size=1`` cannot be opened, as there).
"""

from __future__ import annotations

import errno
import struct
from sys import byteorder

from vdkit.block.driver import DATA, OFFSET_VALID, ZERO, BlockStatus, CheckResult, FormatDriver
from vdkit.errors import OpenError, VdkitError
from vdkit.io.file import zero_fill

TYPE_CHECKING = False
if TYPE_CHECKING:
    from array import array
    from collections.abc import Callable, Iterator

    from vdkit.block.driver import CheckReport, OpenContext
    from vdkit.io.file import ImageFile
    from vdkit.opts import CreateOpts

    Backing = Callable[[int, int], bytes] | None

MAGIC = b"QED\0"
HEADER = struct.Struct("<4sIIIQQQQQII")  # 64 bytes
F_BACKING_FILE = 1
F_NEED_CHECK = 2
F_BACKING_FORMAT_NO_PROBE = 4
KNOWN_FEATURES = F_BACKING_FILE | F_NEED_CHECK | F_BACKING_FORMAT_NO_PROBE
MIN_CLUSTER, MAX_CLUSTER = 4096, 64 << 20
MAX_TABLE_SIZE = 16
MAX_BACKING_NAME = 4096  # QEMU's buffer for the name (PATH_MAX-sized): longer ones fail to read
UNALLOC, ZERO_CLUSTER, ALLOC = 0, 1, 2
_L2_CACHE_BYTES = 64 << 20  # L2 tables kept in memory (at least one, whatever its size)
U64 = (1 << 64) - 1


def _pow2_in(value: int, lo: int, hi: int) -> bool:
    return lo <= value <= hi and value & (value - 1) == 0


def max_image_size(cluster_size: int, table_size: int) -> int:
    """What the tables can address (QEMU computes it in 64 bits: it wraps for the largest geometries)."""
    n = table_size * cluster_size // 8
    return (n * n * cluster_size) & U64


def _table(data: bytes) -> array[int]:
    from array import array  # not at module level: array imports collections, and info needs no table

    t = array("Q", data)
    if byteorder != "little":
        t.byteswap()
    return t


def _pack(values: list[int] | array[int]) -> bytes:
    from array import array  # not at module level: array imports collections, and info needs no table

    t = array("Q", values)
    if byteorder != "little":
        t.byteswap()
    return t.tobytes()


class QedHeader:
    """The fields of the header cluster (names as in the specification)."""

    __slots__ = ("cluster_size", "table_size", "header_size", "features", "compat_features",
                 "autoclear_features", "l1_table_offset", "image_size", "backing_name_offset",
                 "backing_name_size")
    cluster_size: int
    table_size: int
    header_size: int
    features: int
    compat_features: int
    autoclear_features: int
    l1_table_offset: int
    image_size: int
    backing_name_offset: int
    backing_name_size: int

    def __init__(self, raw: bytes) -> None:
        (_magic, self.cluster_size, self.table_size, self.header_size, self.features, self.compat_features,
         self.autoclear_features, self.l1_table_offset, self.image_size, self.backing_name_offset,
         self.backing_name_size) = HEADER.unpack(raw)

    def pack(self) -> bytes:
        return HEADER.pack(MAGIC, self.cluster_size, self.table_size, self.header_size, self.features,
                           self.compat_features, self.autoclear_features, self.l1_table_offset,
                           self.image_size, self.backing_name_offset, self.backing_name_size)


class QedDriver(FormatDriver):
    format_name = "qed"
    plain_data = True
    supports_backing = True

    def __init__(self, file: ImageFile, ctx: OpenContext) -> None:
        super().__init__(file)
        self.readonly = ctx.readonly
        raw = file.pread(0, HEADER.size)
        if raw[:4] != MAGIC:
            raise OpenError("Image not in QED format")
        h = self.header = QedHeader(raw)
        unknown = h.features & ~KNOWN_FEATURES
        if unknown:
            raise OpenError(f"Unsupported QED features: {unknown:x}")
        if not _pow2_in(h.cluster_size, MIN_CLUSTER, MAX_CLUSTER):
            raise OpenError("QED cluster size is invalid")
        if not _pow2_in(h.table_size, 1, MAX_TABLE_SIZE):
            raise OpenError("QED table size is invalid")
        if h.image_size % 512 or h.image_size > max_image_size(h.cluster_size, h.table_size):
            raise OpenError("QED image size is invalid")
        cs = self.cs = h.cluster_size
        self.table_bytes = h.table_size * cs
        self.entries = self.table_bytes // 8
        self.header_bytes = h.header_size * cs
        self.file_end = file.size() // cs * cs  # where the next cluster goes (whole clusters only)
        if not self.table_ok(h.l1_table_offset):
            raise OpenError("QED table offset is invalid")
        self._backing: str | None = None
        if h.features & F_BACKING_FILE:
            if h.backing_name_offset + h.backing_name_size > self.header_bytes:
                raise OpenError("QED backing filename offset is invalid")
            if h.backing_name_size >= MAX_BACKING_NAME:
                raise OpenError("Failed to read backing filename")
            import os

            name = file.pread(h.backing_name_offset, h.backing_name_size).split(b"\0", 1)[0]
            self._backing = os.fsdecode(name) or None
        self._l1: array[int] | None = None
        self._l2: dict[int, array[int]] = {}
        self._l2_max = max(1, _L2_CACHE_BYTES // self.table_bytes)
        self._marked = False  # need-check set by this node's writes (cleared on flush/close)
        if not self.readonly:
            changed = False
            if h.autoclear_features:  # none are known: a writer that does not know them clears them
                h.autoclear_features = 0
                changed = True
            if h.features & F_NEED_CHECK and not ctx.check_mode:
                # an image a crash left unchecked is checked (and repaired) before it is written
                self.check("all", lambda _line: None)
                h.features &= ~F_NEED_CHECK
                changed = True
            if changed:
                self._write_header()

    # -- geometry -----------------------------------------------------------------------------
    @property
    def virtual_size(self) -> int:
        return self.header.image_size

    @property
    def cluster_size(self) -> int:
        return self.cs

    @property
    def dirty(self) -> bool:
        return False  # QEMU 7.2 never reports QED's need-check bit as a dirty flag

    @property
    def backing_file(self) -> str | None:
        return self._backing

    @property
    def backing_format(self) -> str | None:
        if self._backing is not None and self.header.features & F_BACKING_FORMAT_NO_PROBE:
            return "raw"
        return None

    def cluster_ok(self, off: int) -> bool:
        return off % self.cs == 0 and self.header_bytes <= off < self.file_end

    def table_ok(self, off: int) -> bool:
        last = off + self.table_bytes - self.cs
        return last > off and self.cluster_ok(off) and self.cluster_ok(last)

    # -- tables -------------------------------------------------------------------------------
    def l1(self) -> array[int]:
        if self._l1 is None:
            self._l1 = _table(self.file.pread(self.header.l1_table_offset, self.table_bytes))
        return self._l1

    def l2(self, off: int) -> array[int]:
        t = self._l2.get(off)
        if t is None:
            if len(self._l2) >= self._l2_max:
                self._l2.clear()
            t = self._l2[off] = _table(self.file.pread(off, self.table_bytes))
        return t

    def find(self, cluster: int, limit: int) -> tuple[int, int, int]:
        """``(kind, count, host)`` of the run of like clusters starting at guest cluster ``cluster``.

        The run stays inside one L2 table and covers at most ``limit`` clusters; data clusters
        count only while their host offsets follow each other.  A bad table or cluster offset
        is EINVAL, as QEMU fails the request.
        """
        i1, i2 = divmod(cluster, self.entries)
        limit = min(limit, self.entries - i2)
        l2off = self.l1()[i1]
        if l2off == 0:
            return UNALLOC, limit, 0
        if not self.table_ok(l2off):
            raise OSError(errno.EINVAL, "bad L2 table offset")
        t = self.l2(l2off)
        first = t[i2]
        n = 1
        if first > 1:
            if not self.cluster_ok(first):
                raise OSError(errno.EINVAL, "bad cluster offset")
            nxt = first + self.cs
            while n < limit and t[i2 + n] == nxt and self.cluster_ok(nxt):
                n += 1
                nxt += self.cs
            return ALLOC, n, first
        while n < limit and t[i2 + n] == first:
            n += 1
        return (ZERO_CLUSTER if first == 1 else UNALLOC), n, 0

    # -- reading ------------------------------------------------------------------------------
    def read(self, offset: int, length: int, backing: Backing = None) -> bytes:
        out = bytearray(length)
        self.readinto(offset, memoryview(out), backing)
        return bytes(out)

    def readinto(self, offset: int, view: memoryview, backing: Backing = None) -> None:
        """Guest bytes into ``view``: one read per run of host-contiguous clusters, no copies."""
        cs = self.cs
        end = offset + len(view)
        pos = offset
        while pos < end:
            c, intra = divmod(pos, cs)
            kind, n, host = self.find(c, -(-(end - pos + intra) // cs))
            run = min(end - pos, n * cs - intra)
            at = pos - offset
            if kind == ALLOC:
                self.file.readinto(host + intra, view[at : at + run])
            elif kind == UNALLOC and backing is not None:
                view[at : at + run] = backing(pos, run)
            else:
                zero_fill(view[at : at + run])
            pos += run

    def block_status(self, offset: int, length: int) -> BlockStatus:
        c, intra = divmod(offset, self.cs)
        kind, n, host = self.find(c, -(-(length + intra) // self.cs))
        run = min(length, n * self.cs - intra)
        if kind == ALLOC:
            return BlockStatus(DATA | OFFSET_VALID, run, host + intra, self.file.filename)
        return BlockStatus(ZERO if kind == ZERO_CLUSTER else 0, run)

    # -- writing ------------------------------------------------------------------------------
    def _write_header(self) -> None:
        self.file.pwrite(0, self.header.pack())

    def _mark(self) -> None:
        """Set need-check before the first allocating write, so a crash leaves the image flagged."""
        if not self._marked and not self.header.features & F_NEED_CHECK:
            self.header.features |= F_NEED_CHECK
            self._write_header()
            self.file.flush()
            self._marked = True

    def _alloc(self, nbytes: int) -> int:
        off = self.file_end
        self.file_end += nbytes
        return off

    def _set_entries(self, cluster: int, values: list[int]) -> None:
        """Store L2 entries for guest clusters ``cluster...`` (one table), allocating the table if needed."""
        from array import array

        i1, i2 = divmod(cluster, self.entries)
        l1 = self.l1()
        l2off = l1[i1]
        if l2off == 0:
            t = array("Q", bytes(self.table_bytes))
            t[i2 : i2 + len(values)] = array("Q", values)
            l2off = self._alloc(self.table_bytes)
            self.file.pwrite(l2off, _pack(t))
            if len(self._l2) >= self._l2_max:
                self._l2.clear()
            self._l2[l2off] = t
            l1[i1] = l2off
            self.file.pwrite(self.header.l1_table_offset + 8 * i1, _pack([l2off]))
            return
        t = self.l2(l2off)
        t[i2 : i2 + len(values)] = array("Q", values)
        self.file.pwrite(l2off + 8 * i2, _pack(values))

    def write(self, offset: int, data: bytes, backing: Backing = None) -> None:
        head, tail = offset % 512, -(offset + len(data)) % 512
        if head or tail:
            # QEMU's block layer pads a request to whole sectors with what the image reads there,
            # so the copy-on-write around the padded range is what lands in a new cluster
            pre = self.read(offset - head, head, backing) if head else b""
            post = self.read(offset + len(data), tail, backing) if tail else b""
            data = pre + bytes(data) + post
            offset -= head
        cs = self.cs
        view = memoryview(data)
        end = offset + len(data)
        pos = offset
        while pos < end:
            c, intra = divmod(pos, cs)
            kind, n, host = self.find(c, -(-(end - pos + intra) // cs))
            run = min(end - pos, n * cs - intra)
            chunk = view[pos - offset : pos - offset + run]
            if kind == ALLOC:
                self.file.pwrite(host + intra, chunk)
            else:
                self._mark()
                nclusters = -(-(intra + run) // cs)
                start = c * cs
                tail_start = pos + run
                tail_len = start + nclusters * cs - tail_start
                buf = bytearray()
                if intra:
                    buf += self._cow(kind, start, intra, backing)
                buf += chunk
                if tail_len:
                    buf += self._cow(kind, tail_start, tail_len, backing)
                host = self._alloc(nclusters * cs)
                self.file.pwrite(host, buf)
                self._set_entries(c, [host + i * cs for i in range(nclusters)])
            pos += run

    def _cow(self, kind: int, pos: int, length: int, backing: Backing) -> bytes:
        """What a newly allocated cluster holds outside the written range.

        From the backing file even for a zero cluster: QEMU 7.2 does the same (so a partial
        write to a zero cluster over a backing file brings the backing data back around it).
        """
        if backing is not None:
            part = max(0, min(length, self.header.image_size - pos))
            data = backing(pos, part) if part else b""
            return data + bytes(length - part)
        return bytes(length)

    def write_zeroes(self, offset: int, length: int, backing: Backing = None, *, unmap: bool = False) -> None:
        """Whole clusters become zero clusters (data clusters are zeroed in place); edges are written."""
        cs = self.cs
        end = offset + length
        head_end = min(end, -(-offset // cs) * cs)
        if head_end > offset:
            self.write(offset, bytes(head_end - offset), backing)
        tail_start = max(head_end, end // cs * cs)
        pos = head_end
        while pos < tail_start:
            c = pos // cs
            kind, n, host = self.find(c, (tail_start - pos) // cs)
            if kind == ALLOC:
                self.file.pwrite(host, bytes(n * cs))
            elif kind == UNALLOC:
                self._mark()
                self._set_entries(c, [1] * n)
            pos += n * cs
        if end > tail_start:
            self.write(tail_start, bytes(end - tail_start), backing)

    def flush(self) -> None:
        self.file.flush()
        if self._marked:
            self.header.features &= ~F_NEED_CHECK
            self._write_header()
            self.file.flush()
            self._marked = False

    def close(self) -> None:
        if not self.readonly and self._marked:
            try:
                self.flush()
            except OSError:
                pass
        super().close()

    # -- resize and rebase --------------------------------------------------------------------
    def truncate(self, size: int, prealloc: str = "off", *, backing: Backing = None,
                 backing_size: int = 0) -> None:
        """Only the header's size changes: QED grows by addressing more of its tables, never shrinks."""
        old = self.header.image_size
        if size > old and backing is not None and backing_size > old:
            # the grown area would show the longer backing file: QEMU asks for zeroing QED cannot do
            raise VdkitError("Block driver does not support requested flags", errno=errno.ENOTSUP)
        if prealloc != "off":
            raise VdkitError(f"Unsupported preallocation mode '{prealloc}'", errno=errno.ENOTSUP)
        if size % 512 or size > max_image_size(self.cs, self.header.table_size):
            raise VdkitError("Invalid image size specified", errno=errno.EINVAL)
        if size < old:
            raise VdkitError("Shrinking images is currently not supported", errno=errno.ENOTSUP)
        self.header.image_size = size
        self._write_header()
        self.file.flush()

    def change_backing_file(self, name: str | None, fmt: str | None) -> None:
        """Rewrite the name after the header (it must fit in the header clusters) and the raw bit."""
        import os

        h = self.header
        raw = os.fsencode(name) if name else b""
        if name:
            if HEADER.size + len(raw) > self.header_bytes:
                raise VdkitError("No space left in the file header", errno=errno.ENOSPC)
            h.features |= F_BACKING_FILE
            h.backing_name_offset, h.backing_name_size = HEADER.size, len(raw)
            if fmt == "raw":
                h.features |= F_BACKING_FORMAT_NO_PROBE
            else:
                h.features &= ~F_BACKING_FORMAT_NO_PROBE
        else:
            h.features &= ~(F_BACKING_FILE | F_BACKING_FORMAT_NO_PROBE)
            h.backing_name_size = 0
        self.file.pwrite(0, h.pack() + raw)
        self.file.flush()
        self._backing = name or None

    def _nonzero(self, off: int) -> Iterator[tuple[int, int]]:
        """``(index, entry)`` of the non-zero entries of the table at ``off``, read 1 MiB at a time
        (a table can be 1 GiB: neither kept in memory nor walked entry by entry where it is zero)."""
        step = 1 << 20
        for base in range(0, self.table_bytes, step):
            chunk = self.file.pread(off + base, min(step, self.table_bytes - base))
            if chunk.count(0) == len(chunk):
                continue
            t = _table(chunk)
            first = base // 8
            for i in range(len(t)):
                if t[i]:
                    yield first + i, t[i]

    # -- inspect ------------------------------------------------------------------------------
    def inspect_issues(self) -> list[tuple[str, str]]:
        """The need-check bit (QEMU repairs the image on a writable open), then ``check``'s walk."""
        issues: list[tuple[str, str]] = []
        if self.header.features & F_NEED_CHECK:
            issues.append(("dirty", "the image needs a check (QEMU checks and repairs it on a writable open)"))
        try:
            result = self.check(None, lambda _line: None)
        except OSError as exc:
            issues.append(("invalid-metadata", f"the metadata walk failed: {exc.strerror}"))
            return issues
        if result.corruptions:
            issues.append(("corrupt-metadata", f"{result.corruptions} table entries point outside the file "
                                               "or at clusters used twice"))
        return issues

    # -- check --------------------------------------------------------------------------------
    def check(self, repair: str | None, report: CheckReport) -> CheckResult:
        """Every table and cluster reference; clusters no table names are leaks (QED cannot free them).

        Any repair mode clears bad references (to 0: unallocated); leaks stay.  A repair that
        leaves no corruption clears the need-check bit.
        """
        r = CheckResult()
        cs = self.cs
        h = self.header
        r.total_clusters = -(-h.image_size // cs)
        nfile = self.file_end // cs
        used = _Used(nfile)
        used.mark(0, min(nfile, h.header_size))
        l1off = h.l1_table_offset
        used.mark(l1off // cs, h.table_size)
        fix = repair is not None
        for i1, l2off in self._nonzero(l1off):
            if not self.table_ok(l2off):
                r.corruptions += 1
                if fix:
                    if self._l1 is not None:
                        self._l1[i1] = 0
                    self.file.pwrite(l1off + 8 * i1, _pack([0]))
                    r.corruptions_fixed += 1
                continue
            twice = used.mark(l2off // cs, h.table_size)
            if twice:  # each cluster also used by another structure is an error (not repairable)
                r.corruptions += twice
                continue
            prev = -1  # fragmentation is counted within each L2 table
            for i2, e in self._nonzero(l2off):
                if e == 1:
                    continue
                r.allocated_clusters += 1  # counted before the offset is judged, as qemu-img does
                if prev >= 0 and e != prev + cs:
                    r.fragmented_clusters += 1
                prev = e
                if not self.cluster_ok(e):  # cleared by a repair
                    r.corruptions += 1
                    if fix:
                        cached = self._l2.get(l2off)
                        if cached is not None:
                            cached[i2] = 0
                        self.file.pwrite(l2off + 8 * i2, _pack([0]))
                        r.corruptions_fixed += 1
                elif used.mark(e // cs, 1):  # referenced twice: reported, not repaired
                    r.corruptions += 1
        r.leaks = nfile - used.count
        if fix:
            r.corruptions -= r.corruptions_fixed
            if r.corruptions == 0 and h.features & F_NEED_CHECK:
                h.features &= ~F_NEED_CHECK
                self._write_header()
            self.file.flush()
        return r


class _Used:
    """Which file clusters some structure uses: a byte per cluster, or a set for a huge (sparse) file."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.bits: bytearray | None = bytearray(n) if n <= 1 << 26 else None
        self.set: set[int] = set()
        self.count = 0

    def mark(self, start: int, length: int) -> int:
        """Mark ``length`` clusters from ``start`` (clipped to the file); the number already marked."""
        end = min(start + length, self.n)
        if start >= end:
            return 0
        if self.bits is not None:
            before = self.bits.count(1, start, end)
            self.bits[start:end] = b"\1" * (end - start)
        else:
            before = sum(1 for c in range(start, end) if c in self.set)
            self.set.update(range(start, end))
        self.count += end - start - before
        return before


# -- create -----------------------------------------------------------------------------------

def create_qed(filename: str, opts: CreateOpts) -> None:
    """``qemu-img create -f qed``: the file is made first (and left empty when an option is refused)."""
    import os

    from vdkit.formats.raw import create_file
    from vdkit.io.file import ImageFile

    create_file(filename, opts)  # the protocol's file, emptied (the preallocation option checked)
    cs = int(opts.get("cluster_size") or 0)
    ts = int(opts.get("table_size") or 0) if opts.has("table_size") else 4
    size = -(-int(opts.get("size") or 0) // 512) * 512
    if not _pow2_in(cs, MIN_CLUSTER, MAX_CLUSTER):
        raise VdkitError(f"QED cluster size must be within range [{MIN_CLUSTER}, {MAX_CLUSTER}] and power of 2")
    if not _pow2_in(ts, 1, MAX_TABLE_SIZE):
        raise VdkitError(f"QED table size must be within range [1, {MAX_TABLE_SIZE}] and power of 2")
    limit = max_image_size(cs, ts)
    if size > limit:
        raise VdkitError(f"QED image size must be a non-zero multiple of cluster size and less than {limit} bytes")
    backing = opts.get("backing_file")
    fmt = opts.get("backing_fmt")
    features = 0
    name = b""
    if isinstance(backing, str):
        features |= F_BACKING_FILE
        name = os.fsencode(backing)
        if fmt == "raw":
            features |= F_BACKING_FORMAT_NO_PROBE
    head = HEADER.pack(MAGIC, cs, ts, 1, features, 0, 0, cs, size, HEADER.size if name else 0, len(name))
    with ImageFile(filename, readonly=False) as f:
        f.pwrite(0, head + name)
        f.pwrite(cs, bytes(ts * cs))
        f.flush()
