"""VHD (vpc) images: footer, dynamic header, block allocation table; read, block status and write.

Layout (public VHD specification, all big-endian): a 512-byte footer at the
end of the file (and, in dynamic files, a copy at offset 0), a 1024-byte
dynamic header at the footer's data offset, then the BAT: one u32 sector
number per block (``0xffffffff`` = unallocated).  A block is a sector bitmap
followed by the data; QEMU 7.2 fills the bitmap with ones and never reads it.

The open checks and their order are QEMU 7.2's as observed on damaged files
(see the reference, other-formats §3.6): every offset and the BAT size are
checked against the file before anything is read or allocated.
"""

from __future__ import annotations

import errno
import struct

from vdkit.block.driver import DATA, OFFSET_VALID, ZERO, BlockStatus, FormatDriver
from vdkit.errors import OpenError
from vdkit.io import tables
from vdkit.io.file import MAX_OFFSET, zero_fill

TYPE_CHECKING = False  # typing itself is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from vdkit.io.file import ImageFile
    from vdkit.io.tables import Table

FOOTER_SIZE = 512
DYN_HEADER_SIZE = 1024
FIXED = 2
UNALLOCATED = 0xFFFFFFFF
MAX_SECTORS = 0xFF000000  # 2040 GiB: the largest disk QEMU opens or creates
MAX_CHS = (65535, 16, 255)
# Creators whose current size is the disk size (others: the CHS geometry's size).
SIZE_CREATORS = (b"win ", b"d2v ", b"qem2", b"tap\0", b"CTXS")
MAX_BAT_ENTRIES = 0x1FFFFFFF  # more: "Max Table Entries too large"
MAX_READ = 0x7FFFFE00  # one request's limit: a larger BAT cannot be read ("Error reading pagetable")


_FF = b"\xff" * (64 << 10)  # 16384 unallocated BAT entries, to compare runs of the table with


def _unallocated_chunks(bat: Table, first: int, last: int) -> Iterator[tuple[int, int, bool]]:
    """``(start, end, all unallocated)`` chunks of BAT entries ``[first, last)``.

    Why: a sparse disk of a few TiB has a BAT of a million entries, nearly all ``0xffffffff``;
    walking them one by one in Python cost a ``map`` or ``convert`` of such a disk 0.1-0.2 s
    where qemu-img needs 20 ms.  An array table is compared 16384 entries at a time with a run of
    ``0xff`` bytes (a ``memcmp``: the value reads the same in either byte order); a list (a small
    table) is one chunk the caller walks itself.
    """
    if isinstance(bat, list):
        if first < last:
            yield first, last, False
        return
    raw = memoryview(bat).cast("B")
    step = len(_FF) // 4
    for lo in range(first, last, step):
        hi = min(last, lo + step)
        yield lo, hi, _FF.startswith(raw[lo * 4 : hi * 4])


def _max_allocated(bat: Table) -> int | None:
    """The largest allocated BAT entry (None: none is), skipping unallocated chunks whole."""
    best: int | None = None
    for lo, hi, empty in _unallocated_chunks(bat, 0, len(bat)):
        if not empty:
            m = max(filter(UNALLOCATED.__ne__, bat[lo:hi]), default=None)
            if m is not None and (best is None or m > best):
                best = m
    return best


def _next_allocated(bat: Table, idx: int, last: int) -> int:
    """The first allocated entry in ``[idx, last)`` of the BAT, or ``last``."""
    for lo, hi, empty in _unallocated_chunks(bat, idx, last):
        if empty:
            continue
        if not isinstance(bat, list):  # an array: the first byte that is not 0xff lies in the first allocated entry
            chunk = bat[lo:hi].tobytes()
            return lo + (len(chunk) - len(chunk.lstrip(b"\xff"))) // 4
        while lo < hi and bat[lo] == UNALLOCATED:
            lo += 1
        if lo < hi:
            return lo
    return last


def checksum(data: bytes | bytearray, at: int) -> int:
    """One's complement of the byte sum, with the 4-byte checksum field at ``at`` counted as zero."""
    total = sum(data) - sum(data[at : at + 4])
    return ~total & 0xFFFFFFFF


def footer_size(footer: bytes, mode: str | None = None) -> int:
    """Disk size in sectors a footer describes: current size for some creators or the maximum CHS,
    else the CHS geometry's size (what QEMU 7.2 does for images of other tools); ``mode``
    (``force_size_calc``: ``chs`` or ``current_size``) overrides that choice."""
    cyls: int
    heads: int
    spt: int
    cyls, heads, spt = struct.unpack_from(">HBB", footer, 56)
    if mode == "chs" and (cyls, heads, spt) != MAX_CHS:  # the maximum geometry always means current size
        return cyls * heads * spt
    if mode == "current_size" or footer[28:32] in SIZE_CREATORS or (cyls, heads, spt) == MAX_CHS:
        return int(struct.unpack_from(">Q", footer, 48)[0]) // 512
    return cyls * heads * spt


class VpcDriver(FormatDriver):
    format_name = "vpc"
    plain_data = True

    def __init__(self, file: ImageFile, size_mode: str | None = None) -> None:
        super().__init__(file)
        self.size_mode = size_mode  # the force_size_calc option
        self.footer = b""
        self.fixed = True
        self.block_size = 0
        self.bitmap_size = 0
        self.bat_offset = 0
        self.bat: Table = []
        self.free_offset = 0  # where the next block goes (the trailing footer's place)
        self.total_sectors = 0
        self.disk_type = FIXED
        self.at_start = False  # the footer was found at offset 0 (then there is a dynamic header)
        self.header_offset = 0
        self.parent_name = b""  # UTF-16BE, differencing disks only
        self._open()

    # -- open ---------------------------------------------------------------------------------
    def _read(self, offset: int, length: int, what: str) -> bytes:
        try:
            return self.file.pread(offset, length)
        except OSError:
            raise OpenError(what, errno=errno.EIO) from None

    def _open(self) -> None:
        size = self.file.size()
        rsize = -(-size // 512) * 512  # the block layer sees whole sectors
        footer = self.file.pread(0, FOOTER_SIZE)
        at_start = footer[:8] == b"conectix"
        if not at_start:
            if rsize < FOOTER_SIZE:
                raise OpenError("File too small for a VHD header")
            # a fixed disk: the footer is only at the end of the file
            footer = self.file.pread(rsize - FOOTER_SIZE, FOOTER_SIZE)
            if footer[:8] != b"conectix" or struct.unpack_from(">I", footer, 60)[0] != FIXED:
                raise OpenError("invalid VPC image")
        if struct.unpack_from(">I", footer, 64)[0] != checksum(footer, 64):
            raise OpenError("Incorrect header checksum")
        self.footer = footer
        self.total_sectors = footer_size(footer, self.size_mode)
        if self.total_sectors > MAX_SECTORS:
            raise OpenError(f"Could not open '{self.file.filename}': File too large", errno=errno.EFBIG)
        self.disk_type = struct.unpack_from(">I", footer, 60)[0]
        self.fixed = self.disk_type == FIXED
        self.at_start = at_start
        if at_start:
            # the footer copy at the start means a dynamic header, whatever the disk type says
            self._open_dynamic(struct.unpack_from(">Q", footer, 16)[0], rsize)

    def _open_dynamic(self, header_offset: int, rsize: int) -> None:
        dyn = self._read(header_offset, DYN_HEADER_SIZE, "Error reading dynamic VHD header")
        if dyn[:8] != b"cxsparse":
            raise OpenError("Invalid header magic")
        bat_offset, _version, entries, block_size = struct.unpack_from(">QIII", dyn, 16)
        if block_size < 512 or block_size & (block_size - 1):
            raise OpenError(f"Invalid block size {block_size}")
        if entries * (block_size // 512) < self.total_sectors:
            raise OpenError("Page table too small")
        if entries > MAX_BAT_ENTRIES:
            raise OpenError(f"Max Table Entries too large ({entries - (1 << 32) if entries >= 1 << 31 else entries})")
        bat_len = entries * 4
        if bat_len > MAX_READ:
            raise OpenError("Error reading pagetable", errno=errno.EINVAL)
        bitmap_size = (block_size // 4096 + 511) // 512 * 512
        free = -(-(bat_offset + bat_len) // 512) * 512
        truncated = OpenError(
            "block-vpc: free_data_block_offset points after the end of file. The image has been truncated."
        )
        if bat_offset + bat_len > MAX_OFFSET:
            raise OpenError("Error reading pagetable", errno=errno.EIO)
        if free > rsize:  # checked before the table is read: it is then never larger than the file
            raise truncated
        bat = tables.decode(self._read(bat_offset, bat_len, "Error reading pagetable"), 4, "big")
        used = _max_allocated(bat)
        if used is not None:
            free = max(free, used * 512 + bitmap_size + block_size)
        if free > rsize:
            raise truncated
        self.header_offset = header_offset
        self.parent_name = dyn[64:576].rstrip(b"\0")
        self.block_size = block_size
        self.bitmap_size = bitmap_size
        self.bat_offset = bat_offset
        self.bat = bat
        self.free_offset = free

    # -- geometry and state -------------------------------------------------------------------
    @property
    def virtual_size(self) -> int:
        return self.total_sectors * 512

    @property
    def cluster_size(self) -> int | None:
        return None if self.fixed else self.block_size

    # -- inspection (vdkit-img inspect) --------------------------------------------------------
    def _parent(self) -> str:
        name = self.parent_name
        return (name + b"\0" * (len(name) % 2)).decode("utf-16-be", "replace")

    def references(self) -> list[tuple[str, str]]:
        """A differencing disk names its parent (QEMU 7.2 does not open it)."""
        if self.disk_type == 4 and self.parent_name:
            return [("backing-file", self._parent())]
        return []

    def inspect_issues(self) -> list[tuple[str, str]]:
        """Disk types QEMU reads differently from other tools, footer copies that disagree, blocks that
        overlap each other or the metadata, and data past the end of the file."""
        issues: list[tuple[str, str]] = []
        if self.disk_type == 4:
            issues.append(("differencing", "a differencing VHD: QEMU 7.2 reads it without its parent"))
        elif self.disk_type not in (2, 3):
            issues.append(("invalid-metadata", f"unknown disk type {self.disk_type} (read as dynamic)"))
        size = self.file.size()
        if self.at_start and self.fixed:
            issues.append(("invalid-metadata", "a fixed disk with a footer copy at offset 0 (read as fixed "
                                               "data after a dynamic header check)"))
        if self.fixed and not self.at_start and size - FOOTER_SIZE < self.virtual_size:
            issues.append(("truncated", "the file ends before the disk's data"))
        if not self.at_start:
            return issues
        tail = self.file.pread(max(0, size - FOOTER_SIZE), FOOTER_SIZE)
        if tail != self.footer:
            issues.append(("footer-mismatch", "the footer at the end of the file differs from the copy at offset 0"))
        spans = [(0, FOOTER_SIZE, "footer copy"), (self.header_offset, DYN_HEADER_SIZE, "dynamic header"),
                 (self.bat_offset, len(self.bat) * 4, "block allocation table")]
        span = self.bitmap_size + self.block_size
        spans += [(e * 512, span, f"block {i}") for i, e in enumerate(self.bat) if e != UNALLOCATED]
        spans.sort()
        reported = 0
        reach, reach_name = 0, ""  # the furthest end so far, and whose it is
        for start, length, name in spans:
            if length and start < reach:
                reported += 1
                if reported <= 3:
                    issues.append(("overlapping-metadata", f"{reach_name} overlaps {name}"))
            if start + length > reach:
                reach, reach_name = start + length, name
        if reported > 3:
            issues.append(("overlapping-metadata", f"{reported - 3} more overlaps"))
        ends = [e * 512 + span for e in self.bat if e != UNALLOCATED]
        if ends and max(ends) > size:
            issues.append(("truncated", "a block's data lies past the end of the file"))
        return issues

    # -- data ---------------------------------------------------------------------------------
    def _pieces(self, offset: int, length: int):  # type: ignore[no-untyped-def]
        """``(guest offset, length, host offset or None)`` per block touched (dynamic images)."""
        bs = self.block_size
        end = offset + length
        while offset < end:
            idx, within = divmod(offset, bs)
            n = min(end - offset, bs - within)
            entry = self.bat[idx] if idx < len(self.bat) else UNALLOCATED
            host = None if entry == UNALLOCATED else entry * 512 + self.bitmap_size + within
            yield offset, n, host
            offset += n

    def read(self, offset: int, length: int, backing: Callable[[int, int], bytes] | None = None) -> bytes:
        if self.fixed:
            return self.file.pread(offset, length)
        out = bytearray(length)
        self.readinto(offset, memoryview(out))
        return bytes(out)

    def readinto(self, offset: int, view: memoryview, backing: Callable[[int, int], bytes] | None = None) -> None:
        """Each block's part straight from the file into ``view`` (convert's bulk path: no copies).

        Blocks are never contiguous on the host (a bitmap precedes each), so one read per block."""
        if self.fixed:
            self.file.readinto(offset, view)
            return
        bs, bat, bitmap = self.block_size, self.bat, self.bitmap_size
        nbat = len(bat)
        pos, end = 0, len(view)
        while pos < end:
            idx, within = divmod(offset + pos, bs)
            n = min(end - pos, bs - within)
            entry = bat[idx] if idx < nbat else UNALLOCATED
            if entry == UNALLOCATED:
                zero_fill(view[pos : pos + n])
            else:
                self.file.readinto(entry * 512 + bitmap + within, view[pos : pos + n])
            pos += n

    def block_status(self, offset: int, length: int) -> BlockStatus:
        name = self.file.filename
        if self.fixed:
            # QEMU asks the file too: holes are "zero" data, and the run ends where the file's does
            total = (self.file.size() + 511) // 512 * 512
            if offset >= total:
                return BlockStatus(DATA | ZERO | OFFSET_VALID, length, offset, name)
            st = self.file.block_status(offset, min(length, total - offset))
            return BlockStatus(DATA | OFFSET_VALID | (st.flags & ZERO), st.length, offset, name)
        _, n, host = next(self._pieces(offset, length))
        if host is not None:  # one block: the next block's data is never contiguous (its bitmap)
            return BlockStatus(DATA | OFFSET_VALID, n, host, name)
        # unallocated blocks form one run, as in QEMU
        bs, bat = self.block_size, self.bat
        last = min(len(bat), -(-(offset + length) // bs))
        idx = _next_allocated(bat, (offset + n) // bs, last)
        return BlockStatus(ZERO, min(length, idx * bs - offset) if idx < last else length)

    def write(self, offset: int, data: bytes, backing: Callable[[int, int], bytes] | None = None) -> None:
        if self.fixed:
            self.file.pwrite(offset, data)
            return
        view = memoryview(data)
        for guest, n, host in self._pieces(offset, len(data)):
            if host is None:
                host = self._allocate(guest // self.block_size) + guest % self.block_size
            self.file.pwrite(host, view[guest - offset : guest - offset + n])

    def _allocate(self, idx: int) -> int:
        """Append block ``idx`` where the trailing footer was (bitmap all ones, footer after the block).

        The block's data is not written: it stays a hole until the guest writes it, as in QEMU.
        Returns the host offset of the block's data.
        """
        start = self.free_offset
        self.file.pwrite(start, b"\xff" * self.bitmap_size)
        end = start + self.bitmap_size + self.block_size
        self.file.pwrite(end, self.footer)
        self.file.pwrite(self.bat_offset + 4 * idx, struct.pack(">I", start // 512))
        self.bat[idx] = start // 512
        self.free_offset = end
        return start + self.bitmap_size

    def flush(self) -> None:
        self.file.flush()
