"""VMDK images: a descriptor (embedded or a text file) and its extents (sparse, flat, stream).

Layout from the public VMDK specification and QEMU 7.2's observed behaviour
(``/work/shared/reference/other-formats.md`` §2).  Every size and offset read
from an image is bounded before it is used: grain directories and tables are
read in pieces no larger than the file holds, compressed grains are inflated
with an output limit, and header fields are checked in QEMU's order with its
messages.
"""

from __future__ import annotations

import errno
import struct

from vdkit.block.driver import DATA, OFFSET_VALID, ZERO, BlockStatus, CheckResult, FormatDriver
from vdkit.errors import OpenError, UnsupportedError
from vdkit.formats.vmdk import descriptor as D
from vdkit.io.file import zero_fill

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from vdkit.block.driver import CheckReport, OpenContext
    from vdkit.info.model import ImageInfoSpecific
    from vdkit.io.file import ImageFile

    Backing = Callable[[int, int], bytes] | None

SECTOR = 512
GD_AT_END = 0xFFFFFFFFFFFFFFFF
FLAG_ZEROED_GRAIN = 1 << 2
FLAG_MARKERS = 1 << 17
FLAG_RGD = 1 << 1
BDRV_MAX_LENGTH = 0x7FFFFFFFC0000000  # QEMU's largest block device (INT64_MAX aligned down to 1 GiB)
MAX_GRAIN_SECTORS = 0x200000
MAX_L1_ENTRIES = 1 << 25
HEADER = struct.Struct("<4sIIQQQQIQQQBIH")  # 79 bytes, packed
MARKER = struct.Struct("<QI")
_WINDOW = 1 << 20  # host bytes read at once for compressed grains
EMBEDDED_DESC = 0x200  # where a sparse file's own descriptor is read and rewritten
EMBEDDED_DESC_SIZE = 20 * SECTOR


def _einval(name: str) -> OpenError:
    return OpenError(f"Could not open '{name}': Invalid argument", errno=errno.EINVAL)


class SparseHeader:
    __slots__ = ("version", "flags", "capacity", "grain", "desc_offset", "desc_size", "gtes", "rgd_offset",
                 "gd_offset", "overhead", "compress")

    def __init__(self, raw: bytes) -> None:
        (_magic, self.version, self.flags, self.capacity, self.grain, self.desc_offset, self.desc_size,
         self.gtes, self.rgd_offset, self.gd_offset, self.overhead, _unclean, _nl, self.compress) = HEADER.unpack(
            raw[:HEADER.size])


class Extent:
    """One extent: ``sectors`` guest sectors starting at guest byte ``start``."""

    flat = True
    compressed = False

    def __init__(self, file: ImageFile, name: str, kind: str, start: int, sectors: int) -> None:
        self.file = file
        self.name = name  # the file name QEMU reports (resolved against the descriptor's folder)
        self.kind = kind  # the type in the descriptor ("" for a sparse file's own extent)
        self.start = start
        self.sectors = sectors
        self.end = start + sectors * SECTOR
        self.flat_offset = 0
        self.cluster_size: int | None = None


class SparseExtent(Extent):
    flat = False

    def __init__(self, file: ImageFile, name: str, kind: str, start: int, sectors: int, h: SparseHeader,
                 l1_size: int) -> None:
        super().__init__(file, name, kind, start, sectors)
        self.h = h
        self.grain = h.grain * SECTOR
        self.cluster_size = self.grain
        self.gtes = h.gtes
        self.l1_entry = h.gtes * h.grain * SECTOR  # guest bytes per grain table
        self.l1_size = l1_size
        self.gd_offset = h.gd_offset
        self.rgd_offset = h.rgd_offset if h.flags & FLAG_RGD else 0
        self.compressed = h.compress == 1  # the algorithm field decides, not the flag (as QEMU)
        self.markers = bool(h.flags & FLAG_MARKERS)
        self.zeroed = bool(h.flags & FLAG_ZEROED_GRAIN)
        self._gd: dict[int, list[int]] = {}  # page index -> entries (pages of 1024 entries)
        self._rgd: dict[int, list[int]] = {}
        self._gt: dict[int, list[int]] = {}  # GT sector -> entries
        self.next_alloc = 0  # streamOptimized: where the next compressed grain goes
        self._win: bytes = b""  # read-ahead window of compressed grains (read-only files)
        self._win_off = 0

    # -- tables ---------------------------------------------------------------------------------
    def _dir_entry(self, cache: dict[int, list[int]], base: int, index: int) -> int:
        page = index >> 10
        ent = cache.get(page)
        if ent is None:
            off = _byte_offset(base) + page * 4096
            size = self.file.size()
            n = min(1024, self.l1_size - page * 1024)
            avail = max(0, min(n * 4, size - off)) if off < (1 << 63) else 0
            raw = self.file.pread(off, avail) if avail > 0 else b""
            raw += bytes(n * 4 - len(raw))
            ent = list(struct.unpack(f"<{n}I", raw))
            if len(cache) > 256:
                cache.clear()
            cache[page] = ent
        return ent[index & 1023]

    def gd_entry(self, index: int) -> int:
        return self._dir_entry(self._gd, self.gd_offset, index)

    def gt(self, sector: int) -> list[int]:
        t = self._gt.get(sector)
        if t is None:
            off = sector * SECTOR
            size = self.file.size()
            n = self.gtes
            avail = max(0, min(n * 4, size - off))
            raw = self.file.pread(off, avail) if avail > 0 else b""
            raw += bytes(n * 4 - len(raw))
            t = list(struct.unpack(f"<{n}I", raw))
            if len(self._gt) > 4096:
                self._gt.clear()
            self._gt[sector] = t
        return t

    def lookup(self, rel: int) -> tuple[int, int, int]:
        """(GT sector, GT index, GTE) of extent byte ``rel``; GT sector 0 when there is no table."""
        l1 = rel // self.l1_entry
        if l1 >= self.l1_size:
            raise OSError(errno.EIO, "grain directory index out of range")
        gt_sector = self.gd_entry(l1)
        if gt_sector == 0:
            return 0, 0, 0
        idx = (rel % self.l1_entry) // self.grain
        return gt_sector, idx, self.gt(gt_sector)[idx]

    def set_gte(self, rel: int, value: int) -> None:
        l1 = rel // self.l1_entry
        gt_sector, idx, _ = self.lookup(rel)
        if gt_sector == 0:
            raise OSError(errno.EIO, "no grain table")
        self.gt(gt_sector)[idx] = value
        packed = struct.pack("<I", value)
        self.file.pwrite(gt_sector * SECTOR + idx * 4, packed)
        if self.rgd_offset:
            rgt = self._dir_entry(self._rgd, self.rgd_offset, l1)
            if rgt:
                self.file.pwrite(rgt * SECTOR + idx * 4, packed)

    # -- data -----------------------------------------------------------------------------------
    def _host(self, off: int, length: int) -> bytes | memoryview:
        """File bytes ``[off, off+length)`` (zeros past EOF, as ``pread``).

        Compressed grains lie one after the other, so on a read-only file one
        read of a 1 MiB window serves the next dozens of grains (two reads per
        grain before); a writable file is read directly (its grains move)."""
        win = self._win
        if off >= self._win_off and off + length <= self._win_off + len(win):
            return memoryview(win)[off - self._win_off : off - self._win_off + length]
        if not self.file.readonly:
            return self.file.pread(off, length)
        from vdkit.io.file import MAX_OFFSET

        size = max(length, min(_WINDOW, MAX_OFFSET - off))  # never past the limit pread checks
        self._win, self._win_off = self.file.pread(off, size), off
        return memoryview(self._win)[:length]

    def read_grain_compressed(self, gte: int) -> bytes:
        import zlib

        off = gte * SECTOR
        if self.markers:
            head = self._host(off, MARKER.size)
            _lba, size = MARKER.unpack(head)
            if size > 2 * self.grain + SECTOR:
                raise OSError(errno.EINVAL, "compressed grain too large")
            payload = self._host(off + MARKER.size, size)
        else:
            payload = self._host(off, 2 * self.grain + SECTOR)
        try:
            d = zlib.decompressobj()
            out = d.decompress(payload, self.grain)
        except zlib.error:
            raise OSError(errno.EINVAL, "bad compressed grain") from None
        if len(out) != self.grain:
            raise OSError(errno.EINVAL, "bad compressed grain")
        return out


def _byte_offset(sector: int) -> int:
    """A 64-bit sector number as the byte offset QEMU computes (wrapping in 64 bits; a negative
    result is past every limit)."""
    off = (sector * SECTOR) & 0xFFFFFFFFFFFFFFFF
    return off if off < 1 << 63 else 1 << 64


def _resolve(image: str, stored: str) -> str:
    from vdkit.block.chain import resolve_backing_name

    return resolve_backing_name(image, stored) or stored


def read_sparse_header(file: ImageFile, name: str) -> tuple[SparseHeader, int]:
    """The sparse header (from the footer when the GD is at the end), checked in QEMU's order."""
    raw = file.pread(0, SECTOR)
    if raw[:4] != b"KDMV":
        raise OpenError("Image not in VMDK format", errno=errno.EINVAL)
    h = SparseHeader(raw)
    fsize = file.size()
    if h.gd_offset == GD_AT_END:
        tail = file.pread(fsize - 3 * SECTOR, 3 * SECTOR) if fsize >= 3 * SECTOR else b""
        ok = len(tail) == 3 * SECTOR
        if ok:
            _v, msize = MARKER.unpack(tail[:12])
            mtype = struct.unpack("<I", tail[12:16])[0]
            _e, esize = MARKER.unpack(tail[1024:1036])
            etype = struct.unpack("<I", tail[1036:1040])[0]
            ok = (msize == 0 and mtype == 3 and tail[512:516] == b"KDMV" and esize == 0 and etype == 0)
        if not ok:
            raise OpenError("Invalid footer", errno=errno.EINVAL)
        h = SparseHeader(tail[512:1024])
    if h.version > 3:
        raise OpenError(f"Unsupported VMDK version {h.version}", errno=errno.ENOTSUP)
    if h.gtes > 512:
        raise OpenError("L2 table size too big", errno=errno.EINVAL)
    l1_entry = (h.gtes * h.grain) & 0xFFFFFFFF  # sectors per grain table, a 32-bit product (observed)
    if l1_entry == 0:
        raise OpenError("L1 entry size is invalid", errno=errno.EINVAL)
    if h.overhead > (fsize + SECTOR - 1) // SECTOR:
        need = (h.overhead * SECTOR) & 0xFFFFFFFFFFFFFFFF
        if need >= 1 << 63:
            need -= 1 << 64
        raise OpenError(f"File truncated, expecting at least {need} bytes", errno=errno.EINVAL)
    if h.grain > MAX_GRAIN_SECTORS:
        raise OpenError("Invalid granularity, image may be corrupt", errno=errno.EINVAL)
    l1_size = ((h.capacity + l1_entry - 1) // l1_entry) & 0xFFFFFFFF
    if l1_size > MAX_L1_ENTRIES:
        raise OpenError("L1 size too big", errno=errno.EFBIG)
    # QEMU reads both directories at open: a read reaching past the largest device size fails
    tables = [(h.gd_offset, "l1 table")]
    if h.flags & FLAG_RGD:
        tables.append((h.rgd_offset, "l1 backup table"))
    for sector, what in tables:
        if _byte_offset(sector) + l1_size * 4 > BDRV_MAX_LENGTH:
            raise OpenError(f"Could not read {what} from extent '{name}': Input/output error", errno=errno.EIO)
    return h, l1_size


def open_vmdk(file: ImageFile, ctx: OpenContext) -> VmdkDriver:
    head = file.pread(0, SECTOR)
    size = file.size()
    desc_at = 0
    if head[:4] == b"KDMV":
        h = SparseHeader(head)
        if h.capacity != 0 or h.desc_offset == 0:
            return _open_monolithic_sparse(file, ctx)
        # no capacity but a descriptor: the file is a descriptor kept in a sparse header (QEMU's rule)
        desc_at = h.desc_offset * SECTOR if h.desc_offset < (1 << 54) else size
    elif head[:4] == b"COWD":
        raise _einval(ctx.filename)
    if size == 0:
        raise OpenError("File is too small, not a valid image", errno=errno.EINVAL)
    n = min(max(0, size - desc_at), D.MAX_DESC_SIZE)
    desc = D.c_string(file.pread(desc_at, n)) if n else b""
    create_type = D.quoted_value(desc, b"createType")
    if create_type is None:
        raise OpenError("invalid VMDK image descriptor", errno=errno.EINVAL)
    if create_type not in D.DESC_FILE_TYPES:
        raise OpenError(f"Unsupported image type '{create_type}'", errno=errno.ENOTSUP)
    lines = D.parse_extents(desc)
    drv = VmdkDriver(file, ctx, desc, create_type, embedded=False)
    drv.extent_lines = lines
    # until the extents are opened (never, for ``inspect``), the size the descriptor states
    drv._size = min(sum(line.sectors for line in lines), BDRV_MAX_LENGTH // SECTOR) * SECTOR
    return drv


def _open_monolithic_sparse(file: ImageFile, ctx: OpenContext) -> VmdkDriver:
    h, l1_size = read_sparse_header(file, ctx.filename)
    # QEMU takes the CIDs and the parent hint from sector 1 of a sparse file, whatever the header says
    desc = D.c_string(file.pread(EMBEDDED_DESC, EMBEDDED_DESC_SIZE))
    create_type = "streamOptimized" if h.compress == 1 else "monolithicSparse"
    drv = VmdkDriver(file, ctx, desc, create_type, embedded=True)
    ext = SparseExtent(file, ctx.filename, "", 0, h.capacity, h, l1_size)
    drv.extents = [ext]
    drv.finish_open()
    return drv


class VmdkDriver(FormatDriver):
    format_name = "vmdk"
    supports_backing = True

    def __init__(self, file: ImageFile, ctx: OpenContext, desc: bytes, create_type: str, *, embedded: bool) -> None:
        super().__init__(file)
        self.ctx_filename = ctx.filename
        self.readonly = ctx.readonly
        self.desc = desc
        self.create_type = create_type
        self.embedded = embedded
        self.extents: list[Extent] = []
        self.extent_lines: list[D.ExtentLine] = []
        self._children: list[ImageFile] = []
        self._starts: list[int] = []
        self._size = 0
        self.cid = 0
        self.parent_cid = 0
        self._cid_updated = False
        self._stream_written = False
        self._hint = D.quoted_value(desc, b"parentFileNameHint")

    # -- opening --------------------------------------------------------------------------------
    def open_children(self, ctx: OpenContext) -> None:
        if self.embedded:
            return
        opened: dict[str, ImageFile] = {}
        start = 0
        for line in self.extent_lines:
            resolved = _resolve(ctx.filename, line.filename)
            f = opened.get(resolved)
            if f is None:
                if resolved == ctx.filename:
                    f = self.file
                else:
                    f = ctx.open_child("extent file", line.filename, resolved)
                    self._children.append(f)
                opened[resolved] = f
            if line.type in ("FLAT", "VMFS"):
                ext = Extent(f, resolved, line.type, start, line.sectors)
                ext.flat_offset = line.offset * SECTOR
            elif line.type == "SESPARSE":
                raise OpenError("Bad const header magic: 0x0000000000000000", errno=errno.EINVAL)
            else:
                head = f.pread(0, 4)
                if head == b"COWD":
                    raise _einval(resolved)
                h, l1_size = read_sparse_header(f, resolved)
                # a sparse extent is as long as its header says, whatever the descriptor line claims
                ext = SparseExtent(f, resolved, line.type, start, h.capacity, h, l1_size)
                if ext.compressed:
                    self.create_type = "streamOptimized"  # as QEMU: a stream extent names the image
            self.extents.append(ext)
            start = ext.end
        self.finish_open()

    def finish_open(self) -> None:
        total = sum(e.sectors for e in self.extents)
        if total * SECTOR > BDRV_MAX_LENGTH:
            raise OpenError("Could not refresh total sector count: File too large", errno=errno.EFBIG)
        self._size = total * SECTOR
        self._starts = [e.start for e in self.extents]
        cid = D.read_cid(self.desc, False)
        parent = D.read_cid(self.desc, True)
        if cid is None or parent is None:
            raise _einval(self.ctx_filename)
        self.cid, self.parent_cid = cid, parent
        for e in self.extents:
            if isinstance(e, SparseExtent) and e.compressed:
                e.next_alloc = -(-e.file.size() // SECTOR) * SECTOR

    # -- geometry and state ---------------------------------------------------------------------
    @property
    def virtual_size(self) -> int:
        return self._size

    @property
    def cluster_size(self) -> int | None:
        if not self.extents or self.extents[0].flat or not self._alike():
            return None
        return self.extents[0].cluster_size

    def _alike(self) -> bool:
        """Whether qemu-img gets driver info: no extent differs from the first in kind, grain or compression."""
        if not self.extents:
            return True
        e0 = self.extents[0]
        return all(e.flat == e0.flat and e.compressed == e0.compressed and e.cluster_size == e0.cluster_size
                   for e in self.extents[1:])

    @property
    def backing_file(self) -> str | None:
        return self._hint

    @property
    def backing_format(self) -> str | None:
        return "vmdk" if self._hint is not None else None

    @property
    def needs_compressed_writes(self) -> bool:
        """streamOptimized takes only whole compressed grains: convert copies to it as with ``-c``."""
        return any(e.compressed for e in self.extents)

    @property
    def dirty(self) -> bool | None:
        """Always false, but absent when the extents differ (qemu-img then gets no driver info at all)."""
        return False if self._alike() else None

    def allocated_size(self) -> int:
        """The descriptor file plus every extent's file, counted once per extent line (as qemu-img)."""
        return self.file.allocated_size() + sum(e.file.allocated_size() for e in self.extents
                                                if e.file is not self.file)

    def references(self) -> list[tuple[str, str]]:
        """The parent hint and every extent the descriptor names (read from the text, nothing opened)."""
        refs = super().references()
        for line in self.extent_lines:
            refs.append(("extent" if line.type in ("FLAT", "VMFS") else "sparse-extent", line.filename))
        return refs

    def inspect_issues(self) -> list[tuple[str, str]]:
        """Grains of the image's own sparse extent that start past the end of the file."""
        if not self.extents:
            return []
        found: list[str] = []
        res = self.check(None, found.append)
        return [("corrupt-metadata", found[0])] if res.error and found else []

    def extra_files(self) -> list[ImageFile]:
        return list(self._children)

    def specific_info(self) -> ImageInfoSpecific | None:
        from vdkit.formats.vmdk.info import specific_info

        return specific_info(self)

    # -- data -----------------------------------------------------------------------------------
    def _extent_at(self, offset: int) -> Extent:
        import bisect

        i = bisect.bisect_right(self._starts, offset) - 1
        return self.extents[i]

    def read(self, offset: int, length: int, backing: Backing = None) -> bytes:
        out = bytearray(length)
        self.readinto(offset, memoryview(out), backing)
        return bytes(out)

    def readinto(self, offset: int, view: memoryview, backing: Backing = None) -> None:
        """Guest bytes into ``view`` (convert's bulk path): flat extents and runs of grains stored
        one after the other with one read each, straight into the buffer; no intermediate bytes."""
        end = offset + len(view)
        pos = offset
        while pos < end:
            at = pos - offset
            if pos >= self._size:
                zero_fill(view[at:])
                break
            ext = self._extent_at(pos)
            n = min(end, ext.end) - pos
            if n <= 0:  # an empty extent: nothing to read there
                zero_fill(view[at:])
                break
            if ext.flat:
                ext.file.readinto(ext.flat_offset + pos - ext.start, view[at : at + n])
            else:
                assert isinstance(ext, SparseExtent)
                self._readinto_sparse(ext, pos, view[at : at + n], backing)
            pos += n

    def _readinto_sparse(self, ext: SparseExtent, pos: int, view: memoryview, backing: Backing) -> None:
        start = pos
        end = pos + len(view)
        while pos < end:
            rel = pos - ext.start
            in_grain = rel % ext.grain
            m = min(end - pos, ext.grain - in_grain)
            at = pos - start
            _gts, _idx, gte = ext.lookup(rel)
            if gte == 0:
                if backing is not None:
                    view[at : at + m] = backing(pos, m)
                else:
                    zero_fill(view[at : at + m])
            elif gte == 1 and ext.zeroed:
                zero_fill(view[at : at + m])
            elif ext.compressed:
                grain = ext.read_grain_compressed(gte)
                view[at : at + m] = grain if m == len(grain) else memoryview(grain)[in_grain : in_grain + m]
            else:
                # grains stored one after the other are read with one request
                gsec = ext.grain // SECTOR
                while pos + m < end and (pos + m - ext.start) % ext.l1_entry:
                    _g, _i, nxt = ext.lookup(pos + m - ext.start)
                    if nxt != gte + (in_grain + m) // SECTOR // gsec * gsec or nxt <= 1:
                        break
                    m += min(end - pos - m, ext.grain)
                ext.file.readinto(gte * SECTOR + in_grain, view[at : at + m])
            pos += m

    def block_status(self, offset: int, length: int) -> BlockStatus:
        ext = self._extent_at(offset)
        length = min(length, ext.end - offset)
        rel = offset - ext.start
        if ext.flat:
            st = ext.file.block_status(ext.flat_offset + rel, length)
            flags = DATA | OFFSET_VALID | (ZERO if st.flags & ZERO else 0)
            return BlockStatus(flags, st.length, ext.flat_offset + rel, ext.name)
        assert isinstance(ext, SparseExtent)
        first = self._grain_status(ext, rel)
        run = ext.grain - rel % ext.grain
        while run < length:
            nxt = self._grain_status(ext, rel + run)
            if nxt[0] != first[0] or (first[0] & OFFSET_VALID and nxt[1] != first[1] + run):
                break
            run += ext.grain
        run = min(run, length)
        if first[0] & OFFSET_VALID:
            return BlockStatus(first[0], run, first[1], ext.name)
        return BlockStatus(first[0], run)

    def _grain_status(self, ext: SparseExtent, rel: int) -> tuple[int, int]:
        _gts, _idx, gte = ext.lookup(rel)
        if gte == 0:
            return 0, 0
        if gte == 1 and ext.zeroed:
            return ZERO, 0
        if ext.compressed:
            return DATA, 0
        return DATA | OFFSET_VALID, gte * SECTOR + rel % ext.grain

    # -- writing --------------------------------------------------------------------------------
    def _first_write(self) -> None:
        if self._cid_updated:
            return
        self._cid_updated = True
        import random

        self.cid = random.getrandbits(32)
        text = D.rewrite_cid(self.desc, self.cid)
        self.desc = text
        padded = text + bytes(-len(text) % SECTOR)
        if self.embedded:
            ext = self.extents[0]
            assert isinstance(ext, SparseExtent)
            if len(text) <= EMBEDDED_DESC_SIZE:
                self.file.pwrite(EMBEDDED_DESC, text + bytes(EMBEDDED_DESC_SIZE - len(text)))
        else:
            self.file.pwrite(0, padded)

    def write(self, offset: int, data: bytes, backing: Backing = None) -> None:
        self._write(offset, memoryview(data), backing, zero=False)

    def write_zeroes(self, offset: int, length: int, backing: Backing = None, *, unmap: bool = False) -> None:
        self._write(offset, memoryview(bytes(length)), backing, zero=True)

    def write_compressed(self, offset: int, data: bytes) -> None:
        self._write(offset, memoryview(data), None, zero=False)

    def _write(self, offset: int, data: memoryview, backing: Backing, *, zero: bool) -> None:
        if offset + len(data) > self._size:
            raise OSError(errno.EIO, "write beyond the end of the disk")
        self._first_write()
        pos = offset
        end = offset + len(data)
        while pos < end:
            ext = self._extent_at(pos)
            n = min(end, ext.end) - pos
            chunk = data[pos - offset:pos - offset + n]
            if ext.flat:
                ext.file.pwrite(ext.flat_offset + pos - ext.start, chunk)
            else:
                assert isinstance(ext, SparseExtent)
                self._write_sparse(ext, pos, chunk, backing, zero)
            pos += n

    def _write_sparse(self, ext: SparseExtent, pos: int, data: memoryview, backing: Backing, zero: bool) -> None:
        done = 0
        while done < len(data):
            rel = pos + done - ext.start
            in_grain = rel % ext.grain
            m = min(len(data) - done, ext.grain - in_grain)
            piece = data[done:done + m]
            gts, _idx, gte = ext.lookup(rel)
            if gts == 0:
                raise OSError(errno.EIO, "no grain table")
            if ext.compressed:
                self._write_stream_grain(ext, rel, in_grain, piece, gte)
            elif zero and ext.zeroed and m == ext.grain:
                ext.set_gte(rel, 1)
            elif gte > 1 or (gte == 1 and not ext.zeroed):
                ext.file.pwrite(gte * SECTOR + in_grain, piece)
            else:
                grain_start = pos + done - in_grain
                if m == ext.grain:
                    buf = bytes(piece)
                else:
                    if gte == 0 and backing is not None:
                        base = bytearray(backing(grain_start, ext.grain))
                    else:
                        base = bytearray(ext.grain)
                    base[in_grain:in_grain + m] = piece
                    buf = bytes(base)
                sector = -(-ext.file.size() // SECTOR)
                ext.file.pwrite(sector * SECTOR, buf)
                ext.set_gte(rel, sector)
            done += m

    def _write_stream_grain(self, ext: SparseExtent, rel: int, in_grain: int, piece: memoryview, gte: int) -> None:
        import zlib

        if gte != 0:
            raise UnsupportedError("Could not write to allocated cluster for streamOptimized", errno=errno.EIO)
        if in_grain or len(piece) != ext.grain:
            raise OSError(errno.EINVAL, "partial grain write to a streamOptimized image")
        comp = zlib.compress(piece)
        pos = max(ext.next_alloc, ext.h.overhead * SECTOR)
        rec = MARKER.pack(rel // SECTOR, len(comp)) + comp
        # QEMU writes the whole grain-sized buffer (marker, data, zeros); the next grain starts
        # at the sector after the data, and the file is cut down to whole sectors when closed
        ext.file.pwrite(pos, rec + bytes(max(0, ext.grain + MARKER.size - len(rec))))
        ext.next_alloc = pos + -(-len(rec) // SECTOR) * SECTOR
        ext.set_gte(rel, pos // SECTOR)
        self._stream_written = True

    def flush(self) -> None:
        self.file.flush()
        for f in self._children:
            f.flush()

    # -- check ----------------------------------------------------------------------------------
    def check(self, repair: str | None, report: CheckReport) -> CheckResult:
        """qemu-img's minimal VMDK check: every allocated grain must start inside its extent file.

        Walked table by table (a grain table at a time) rather than grain by grain, so a huge
        capacity with few tables costs little; the first problem ends the check, as in qemu-img.
        """
        res = CheckResult()
        for ext in self.extents:
            if ext.flat:
                continue
            assert isinstance(ext, SparseExtent)
            length = ext.end - ext.start
            gsec = ext.grain // SECTOR
            size = ext.file.size()
            for l1 in range(-(-length // ext.l1_entry)):
                first = (ext.start + l1 * ext.l1_entry) // SECTOR
                if l1 >= ext.l1_size:
                    report(f"ERROR: could not get cluster_offset for sector {first}")
                    res.error = -errno.EPERM
                    return res
                gt_sector = ext.gd_entry(l1)
                if gt_sector == 0:
                    continue
                left = -(-(length - l1 * ext.l1_entry) // ext.grain)
                for idx, gte in enumerate(ext.gt(gt_sector)[:left]):
                    if (gte > 1 or (gte == 1 and not ext.zeroed)) and gte * SECTOR >= size:
                        report(f"ERROR: cluster offset for sector {first + idx * gsec} points after EOF")
                        res.error = -errno.EINVAL
                        return res
        return res

    def close(self) -> None:
        if self._stream_written:
            self._stream_written = False
            try:
                size = self.file.size()
                if size % SECTOR:
                    self.file.truncate(size - size % SECTOR)
            except OSError:
                pass
        for f in self._children:
            f.close()
        self._children = []
        self.file.close()
