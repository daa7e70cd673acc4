"""Parallels expanding images: header, BAT, reads, block status, allocating writes, check and create.

Layout (public Parallels disk format description; QEMU 7.2's limits as observed
with qemu-img): a 64-byte header, then the BAT (u32 LE per cluster, 0 =
unallocated).  In the ``WithouFreSpacExt`` format an entry counts clusters, in
the old ``WithoutFreeSpace`` format sectors.  Data clusters are appended at
the end of the data area; a writable open marks the image in use until it is
closed, when the file is cut (or extended) to the end of the data.

The BAT is read in pages on demand, so memory stays bounded whatever the
header claims (QEMU itself reads up to 2 GiB of it).
"""

from __future__ import annotations

import errno
import struct
from sys import byteorder

from vdkit.block.driver import DATA, OFFSET_VALID, BlockStatus, CheckResult, FormatDriver
from vdkit.errors import OpenError, VdkitError
from vdkit.io.file import zero_fill

TYPE_CHECKING = False
if TYPE_CHECKING:
    from array import array
    from collections.abc import Iterator

    from vdkit.block.driver import CheckReport, OpenContext
    from vdkit.io.file import ImageFile
    from vdkit.opts import CreateOpts

MAGIC_OLD = b"WithoutFreeSpace"
MAGIC_EXT = b"WithouFreSpacExt"
HEADER = struct.Struct("<16sIIIIIQIIIQ")  # 64 bytes
INUSE = 0x746F6E59
EXT_MAGIC = 0xAB234CEF23DCEA87
DIRTY_BITMAP_MAGIC = 0x20385FAE252CB34A
MAX_TRACKS = (1 << 31) // 513  # larger sectors-per-cluster values are "Too big cluster" in QEMU 7.2
MAX_BAT = (1 << 31) // 4 - 1  # more entries: "Catalog too large"
INT_MAX = (1 << 31) - 1
BDRV_MAX_LENGTH = (1 << 63) - (1 << 30)
PAGE = 1 << 16  # BAT entries per cached page (256 KiB)
MAX_PAGES = 256


def _u32s(data: bytes) -> array[int]:
    from array import array  # not at module level: array imports collections, and info needs no table

    t = array("I", data)
    if t.itemsize != 4:  # pragma: no cover - every platform vdkit runs on has a 4-byte "I"
        t = array("L", data)
    if byteorder != "little":
        t.byteswap()
    return t


class ParallelsDriver(FormatDriver):
    format_name = "parallels"
    plain_data = True
    supports_backing = True  # QEMU's driver has a backing slot (never filled by its images): holes read as zeros

    def __init__(self, file: ImageFile, ctx: OpenContext) -> None:
        super().__init__(file)
        self.readonly = ctx.readonly
        self._closed = False
        raw = file.pread(0, HEADER.size)
        fields: tuple[bytes, int, int, int, int, int, int, int, int, int, int] = HEADER.unpack(raw)
        (magic, version, self.heads, self.cylinders, self.tracks, self.bat_entries, self.nb_sectors,
         self.inuse, self.data_off, self.flags, self.ext_off) = fields
        if magic not in (MAGIC_OLD, MAGIC_EXT) or version != 2:
            raise OpenError("Image not in Parallels format")
        if self.tracks == 0:
            raise OpenError("Invalid image: Zero sectors per track")
        if self.tracks > MAX_TRACKS:
            raise OpenError("Invalid image: Too big cluster")
        if self.bat_entries > MAX_BAT:
            raise OpenError("Catalog too large")
        self.header_bytes = -(-(HEADER.size + 4 * self.bat_entries) // 512) * 512
        if self.header_bytes > INT_MAX:  # QEMU reads the whole BAT in one request
            raise OpenError(f"Could not open '{ctx.filename}': Input/output error", errno=errno.EIO)
        self.cs = self.tracks * 512
        self.mult = (self.tracks if magic == MAGIC_EXT else 1) * 512  # bytes per BAT unit
        self.pages: dict[int, array[int]] = {}
        self.filename = ctx.filename
        # (message, hint) pairs a front end prints as "warning: ..." after opening
        self.open_warnings: list[tuple[str, str | None]] = []
        if self.ext_off and not self.readonly:
            self.open_warnings.append(("Format Extension ignored in RW mode", None))
        elif self.ext_off:
            self._check_extension(file)
        if self.inuse == INUSE and not self.readonly and not ctx.check_mode:
            raise OpenError("parallels: Image was not closed correctly; cannot be opened read/write",
                            errno=errno.EACCES)
        self.unclean = self.inuse == INUSE  # as opened (a writable open marks the image in use itself)
        self.data_end = self._data_end()
        if not self.readonly:
            self._write_inuse(INUSE)
        if (self.nb_sectors * 512) & ((1 << 64) - 1) > BDRV_MAX_LENGTH:  # QEMU's byte count wraps
            # the block layer's check after the driver's open: a writable image is closed again
            # (in-use flag cleared, file cut to the data end) before the error
            self.close_image()
            raise OpenError("Could not refresh total sector count: File too large", errno=errno.EFBIG)

    def _check_extension(self, file: ImageFile) -> None:
        """The format extension cluster: magic, MD5 of the rest of the cluster, then the feature list.

        Features are walked (flags must be 0, unknown ones refused as in QEMU 7.2) but not loaded:
        dirty bitmaps are skipped.
        """
        import hashlib

        if self.ext_off * 512 + self.cs > (1 << 63) - 1:  # QEMU 7.2 aborts on an assertion here
            raise OpenError("Invalid image: Format Extension offset is out of range", errno=errno.EINVAL)
        found = int.from_bytes(file.pread(self.ext_off * 512, 8), "little")
        if found != EXT_MAGIC:
            raise OpenError(f"Wrong parallels Format Extension magic: {found:#x}, expected: {EXT_MAGIC:#x}")
        cluster = file.pread(self.ext_off * 512, self.cs)
        if hashlib.md5(cluster[24:]).digest() != cluster[8:24]:
            raise OpenError("Wrong checksum in Format Extension header. Format extension is corrupted.")
        pos = 24
        while pos + 16 <= len(cluster):
            magic, flags, size = struct.unpack_from("<QII", cluster, pos)
            if flags:
                raise OpenError("Flags for extension feature are unsupported")
            if magic == 0:
                return
            if magic != DIRTY_BITMAP_MAGIC:
                raise OpenError(f"Unknown feature: {magic:#x}")
            pos += 16 + -(-size // 8) * 8

    # -- geometry -----------------------------------------------------------------------------
    @property
    def virtual_size(self) -> int:
        if self.nb_sectors * 512 > BDRV_MAX_LENGTH:
            # QEMU opens this (its byte count wrapped below the limit) and fails when the size is asked for
            raise VdkitError(f"Can't get image size '{self.filename}': File too large", errno=errno.EFBIG)
        return self.nb_sectors * 512

    @property
    def dirty(self) -> bool | None:
        return None  # qemu-img shows no dirty-flag for parallels

    # -- BAT ----------------------------------------------------------------------------------
    def bat(self, i: int) -> int:
        page, k = divmod(i, PAGE)
        t = self.pages.get(page)
        if t is None:
            if len(self.pages) >= MAX_PAGES:
                self.pages.clear()
            n = min(PAGE, self.bat_entries - page * PAGE)
            t = self.pages[page] = _u32s(self.file.pread(HEADER.size + 4 * page * PAGE, 4 * n))
        return int(t[k])

    def set_bat(self, i: int, value: int) -> None:
        self.bat(i)
        self.pages[i // PAGE][i % PAGE] = value
        self.file.pwrite(HEADER.size + 4 * i, value.to_bytes(4, "little"))

    def _data_end(self) -> int:
        """The end of the last allocated cluster (or of the header): one ``max`` per BAT page, at C
        speed, rather than a Python step per entry (info of a full 1 GiB image walked 1024)."""
        end = max(self.data_off * 512, self.header_bytes)
        for _page, t in self._used_pages():
            end = max(end, max(t) * self.mult + self.cs)
        return end

    def _used_pages(self) -> Iterator[tuple[int, array[int]]]:
        """``(first index, entries)`` of each BAT page with an allocated entry, read from the file."""
        for page in range(0, self.bat_entries, PAGE):
            data = self.file.pread(HEADER.size + 4 * page, 4 * min(PAGE, self.bat_entries - page))
            if data.count(0) != len(data):
                yield page, _u32s(data)

    def _entries(self) -> Iterator[tuple[int, int]]:
        """``(index, entry)`` of the allocated BAT entries, a page at a time."""
        for page, t in self._used_pages():
            for k, e in enumerate(t):
                if e:
                    yield page + k, e

    def _run(self, offset: int, length: int) -> tuple[int, int]:
        """``(host offset or -1, length)`` of the run of like clusters at ``offset``."""
        cs = self.cs
        c, intra = divmod(offset, cs)
        if c >= self.bat_entries:
            return -1, length
        e = self.bat(c)
        run = cs - intra
        nxt = c + 1
        if e:
            host = e * self.mult
            while run < length and nxt < self.bat_entries and self.bat(nxt) * self.mult == host + (nxt - c) * cs:
                run += cs
                nxt += 1
            return host + intra, min(run, length)
        while run < length and nxt < self.bat_entries and self.bat(nxt) == 0:
            run += cs
            nxt += 1
        if nxt >= self.bat_entries:
            run = length
        return -1, min(run, length)

    # -- data ---------------------------------------------------------------------------------
    def read(self, offset: int, length: int, backing: object = None) -> bytes:
        out = bytearray(length)
        self.readinto(offset, memoryview(out))
        return bytes(out)

    def readinto(self, offset: int, view: memoryview, backing: object = None) -> None:
        """Guest bytes into ``view``: one read per run of host-contiguous clusters, no copies."""
        pos, end = offset, offset + len(view)
        while pos < end:
            host, run = self._run(pos, end - pos)
            at = pos - offset
            if host >= 0:
                self.file.readinto(host, view[at : at + run])
            else:
                zero_fill(view[at : at + run])
            pos += run

    def block_status(self, offset: int, length: int) -> BlockStatus:
        host, run = self._run(offset, length)
        if host >= 0:
            return BlockStatus(DATA | OFFSET_VALID, run, host, self.file.filename)
        return BlockStatus(0, run)

    def write(self, offset: int, data: bytes, backing: object = None) -> None:
        cs = self.cs
        view = memoryview(data)
        pos, end = offset, offset + len(data)
        while pos < end:
            c, intra = divmod(pos, cs)
            run = min(end - pos, cs - intra)
            if c >= self.bat_entries:  # the header claims more sectors than the BAT maps (QEMU asserts)
                raise OSError(errno.EINVAL, "write past the BAT")
            e = self.bat(c)
            if e == 0:
                e = -(-self.data_end // self.mult)
                self.data_end = e * self.mult + cs
                self.set_bat(c, e)
            self.file.pwrite(e * self.mult + intra, view[pos - offset : pos - offset + run])
            pos += run

    def inspect_issues(self) -> list[tuple[str, str]]:
        """The in-use flag, BAT entries past the end of the file, a BAT that maps less than the disk."""
        issues: list[tuple[str, str]] = []
        if self.unclean:
            issues.append(("dirty", "the image was not closed correctly (QEMU refuses to write it)"))
        if self.bat_entries * self.cs < self.virtual_size:
            issues.append(("invalid-metadata", "the header's size is larger than the BAT maps"))
        result = self.check(None, lambda _line: None)
        if result.corruptions - (1 if self.unclean else 0):
            issues.append(("corrupt-metadata", "BAT entries point past the end of the file"))
        return issues

    def _write_inuse(self, value: int) -> None:
        self.inuse = value
        self.file.pwrite(44, value.to_bytes(4, "little"))

    def close(self) -> None:
        self.close_image()
        super().close()

    def close_image(self) -> None:
        """What closing does to the image (not the file): clear in-use, cut the file to the data end."""
        if not self.readonly and not self._closed:
            self._closed = True
            try:
                self._write_inuse(0)
                self.file.flush()
            except OSError:
                pass
            try:  # a data end past what the file system allows is left alone, as qemu-img does
                self.file.truncate(self.data_end)
            except (OSError, VdkitError, ValueError):
                pass

    # -- check --------------------------------------------------------------------------------
    def check(self, repair: str | None, report: CheckReport) -> CheckResult:
        """In-use flag, BAT entries past the end of the file, space after the last cluster, statistics."""
        r = CheckResult()
        fix_all = repair == "all"
        size = self.file.size()
        if self.unclean:
            report(("Repairing" if fix_all else "ERROR") + " image was not closed correctly")
            r.corruptions += 1
            if fix_all:
                self.unclean = False  # the flag is cleared on disk when the image is closed
                r.corruptions_fixed += 1
        cs = self.cs
        limit = -(-size // 512) * 512
        high = 0
        prev = -1
        last = -2
        for i, e in list(self._entries()):
            if i != last + 1:
                prev = -1  # an unallocated entry restarts the fragmentation count, as in qemu-img
            last = i
            off = e * self.mult
            if off > limit:
                report(("Repairing" if fix_all else "ERROR") + f" cluster {i} is outside image")
                r.corruptions += 1
                if fix_all:
                    self.set_bat(i, 0)
                    r.corruptions_fixed += 1
                    last = -2
                    continue
            r.allocated_clusters += 1
            if prev >= 0 and off != prev + cs:
                r.fragmented_clusters += 1
            prev = off
            high = max(high, off + cs)
        end = max(high, cs)  # qemu-img's check starts from one cluster, whatever the BAT's size
        r.total_clusters = self.bat_entries
        if size > end:
            count = -(-(size - end) // cs)
            report(("Repairing" if repair else "ERROR") + f" space leaked at the end of the image {size - end}")
            r.leaks += count
            if repair:
                self.file.truncate(end)
                r.leaks_fixed += count
        r.image_end_offset = end
        if repair:
            r.corruptions -= r.corruptions_fixed
            r.leaks -= r.leaks_fixed
            self.file.flush()
        return r


# -- create -----------------------------------------------------------------------------------

def create_parallels(filename: str, opts: CreateOpts) -> None:
    """``qemu-img create -f parallels``: the file is made first (and left empty when an option is refused)."""
    from vdkit.formats.raw import create_file
    from vdkit.io.file import ImageFile

    create_file(filename, opts)  # the protocol's file, emptied (the preallocation option checked)
    cs = int(opts.get("cluster_size") or 0)
    size = int(opts.get("size") or 0)
    if cs > INT_MAX:
        raise VdkitError("Cluster size is too large")
    if size >= (1 << 32) * cs:
        raise VdkitError("Image size is too large for this cluster size")
    tracks = -(-cs // 512)
    sectors = -(-size // 512)
    bat = -(-sectors // tracks)
    data_off = -(-(HEADER.size + 4 * bat) // (tracks * 512)) * tracks
    head = HEADER.pack(MAGIC_EXT, 2, 16, (sectors // (16 * 32)) & 0xFFFFFFFF, tracks, bat, sectors, 0,
                       data_off, 0, 0)
    total = data_off * 512
    with ImageFile(filename, readonly=False) as f:
        f.pwrite(0, head)
        chunk = bytes(min(1 << 20, total))
        pos = HEADER.size
        while pos < total:
            n = min(len(chunk), total - pos)
            f.pwrite(pos, chunk[:n])
            pos += n
        f.truncate(total)
        f.flush()
