"""Reading Bochs growing redolog images.

Layout (little-endian): a header of ``header size`` bytes (512) with the
magic strings, the version, the catalog length, the bitmap and extent sizes
and the disk size; the catalog (one u32 per extent, ``0xffffffff`` =
unallocated) at ``header size``, and right after it the allocated blocks,
each a bitmap (one bit per sector, LSB first, 1 = present) padded to whole
sectors and the extent's data.  Everything is bounded at open (QEMU's
limits: 1 Mi catalog entries, extents of 512 B to 8 MiB, a power of two).
"""

from __future__ import annotations

import struct

from vdkit.block.driver import DATA, BlockStatus, FormatDriver
from vdkit.errors import CorruptImageError, OpenError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from vdkit.block.driver import OpenContext
    from vdkit.io.file import ImageFile

SECTOR = 512
HEADER_V1 = 0x00010000
MAX_CATALOG = 1 << 20  # entries
MAX_EXTENT = 8 << 20  # bytes
UNALLOCATED = 0xFFFFFFFF


class BochsDriver(FormatDriver):
    format_name = "bochs"

    def __init__(self, file: ImageFile, *, size: int, catalog: tuple[int, ...], data_offset: int,
                 bitmap_sectors: int, extent_size: int) -> None:
        super().__init__(file)
        self._size = size
        self.catalog = catalog
        self.data_offset = data_offset
        self.bitmap_sectors = bitmap_sectors
        self.extent_size = extent_size

    @classmethod
    def open(cls, file: ImageFile, ctx: OpenContext) -> BochsDriver:
        from vdkit.formats.bochs import is_bochs_header

        if not ctx.readonly:
            raise OpenError("Image is read-only")
        head = file.pread(0, 512)
        if not is_bochs_header(head):
            raise CorruptImageError("Image not in Bochs format")
        version, header_size, entries, bitmap, extent = struct.unpack_from("<5I", head, 64)
        disk = struct.unpack_from("<Q", head, 84 if version == HEADER_V1 else 88)[0]
        size = disk // SECTOR * SECTOR
        if entries > MAX_CATALOG:
            raise CorruptImageError("Catalog size is too large")
        catalog = struct.unpack(f"<{entries}I", file.pread(header_size, 4 * entries))
        if extent < SECTOR:
            raise CorruptImageError("Extent size must be at least 512")
        if extent & (extent - 1):
            raise CorruptImageError(f"Extent size {extent} is not a power of two")
        if extent > MAX_EXTENT:
            raise CorruptImageError(f"Extent size {extent} is too large")
        if size > entries * extent:
            raise CorruptImageError("Catalog size is too small for this disk size")
        # the bitmap size is a u32: 0 means 2^32 bytes' worth of sectors (all reads then miss the file)
        bitmap_sectors = 1 + ((bitmap - 1) & 0xFFFFFFFF) // SECTOR
        return cls(file, size=size, catalog=catalog, data_offset=header_size + 4 * entries,
                   bitmap_sectors=bitmap_sectors, extent_size=extent)

    @property
    def virtual_size(self) -> int:
        return self._size

    @property
    def dirty(self) -> bool | None:
        return None  # QEMU's driver has no info callback: no dirty-flag key

    def block_status(self, offset: int, length: int) -> BlockStatus:
        """No block status in QEMU's driver: the whole disk is data (map shows one entry)."""
        return BlockStatus(DATA, length)

    def read(self, offset: int, length: int, backing: Callable[[int, int], bytes] | None = None) -> bytes:
        out = bytearray(length)
        ext = self.extent_size
        spe = ext // SECTOR
        pos, end = offset, offset + length
        while pos < end:
            idx, within = divmod(pos, ext)
            n = min(end - pos, ext - within)
            slot = self.catalog[idx] if idx < len(self.catalog) else UNALLOCATED
            if slot != UNALLOCATED:
                block = self.data_offset + slot * (self.bitmap_sectors + spe) * SECTOR
                first, last = within // SECTOR, (within + n - 1) // SECTOR
                bitmap = self.file.pread(block + first // 8, last // 8 - first // 8 + 1)
                data_at = block + self.bitmap_sectors * SECTOR
                s = first
                while s <= last:  # runs of present sectors read in one go
                    if not bitmap[s // 8 - first // 8] >> (s % 8) & 1:
                        s += 1
                        continue
                    r = s
                    while r + 1 <= last and bitmap[(r + 1) // 8 - first // 8] >> ((r + 1) % 8) & 1:
                        r += 1
                    lo = max(s * SECTOR, within)
                    hi = min((r + 1) * SECTOR, within + n)
                    dst = pos - offset + lo - within
                    out[dst:dst + hi - lo] = self.file.pread(data_at + lo, hi - lo)
                    s = r + 1
            pos += n
        return bytes(out)
