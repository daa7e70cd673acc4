"""Reading cloop V2.0 images.

Layout: a 128-byte shell-script preamble, u32 BE block size, u32 BE block
count ``n``, then ``n + 1`` u64 BE file offsets; block ``i`` is the zlib
stream between offsets ``i`` and ``i + 1`` and inflates to exactly one
block.  QEMU's limits apply at open (block size a multiple of 512 up to
64 MiB, an offsets table of at most 512 MiB, compressed blocks of at most
128 MiB), and the table is validated before any block is read.  The table
is read only as far as the file goes: QEMU reads the rest as zeros, which
the validation then meets as an offset going backwards.
"""

from __future__ import annotations

import struct

from vdkit.block.driver import DATA, BlockStatus, FormatDriver
from vdkit.errors import CorruptImageError, OpenError, VdkitError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from vdkit.block.driver import OpenContext
    from vdkit.io.file import ImageFile

MAX_BLOCK_SIZE = 64 << 20
MAX_COMPRESSED = 2 * MAX_BLOCK_SIZE
MAX_OFFSETS_BYTES = 512 << 20
TABLE_AT = 136


class CloopDriver(FormatDriver):
    format_name = "cloop"

    def __init__(self, file: ImageFile, *, block_size: int, n_blocks: int, offsets: list[int]) -> None:
        super().__init__(file)
        self.block_size = block_size
        self.n_blocks = n_blocks
        self.offsets = offsets  # only the entries stored in the file; the rest are zero
        self._cache: tuple[int, bytes] | None = None

    @classmethod
    def open(cls, file: ImageFile, ctx: OpenContext) -> CloopDriver:
        if not ctx.readonly:
            raise OpenError("Image is read-only")
        block_size, n = struct.unpack(">II", file.pread(128, 8))
        if block_size == 0:
            raise CorruptImageError("block_size cannot be zero")
        if block_size % 512:
            raise CorruptImageError(f"block_size {block_size} must be a multiple of 512")
        if block_size > MAX_BLOCK_SIZE:
            raise CorruptImageError(f"block_size {block_size} must be {MAX_BLOCK_SIZE >> 20} MB or less")
        if n > 0x1FFFFFFF:
            raise CorruptImageError(f"n_blocks {n} must be {0x1FFFFFFF} or less")
        table_bytes = ((n + 1) * 8) & 0xFFFFFFFF  # QEMU's u32 size: 2^29 entries wrap to 0
        if table_bytes > MAX_OFFSETS_BYTES:
            raise CorruptImageError("image requires too many offsets, try increasing block size")
        if table_bytes == 0:
            raise CorruptImageError("Could not allocate offsets table")
        stored = max(0, min(table_bytes, file.size() - TABLE_AT)) // 8
        offsets = list(struct.unpack(f">{stored}Q", file.pread(TABLE_AT, stored * 8)))
        prev = offsets[0] if offsets else 0
        for i in range(1, n + 1):
            cur = offsets[i] if i < stored else 0
            if cur < prev:
                raise CorruptImageError(f"offsets not monotonically increasing at index {i}, image file is corrupt")
            if cur - prev > MAX_COMPRESSED:
                raise CorruptImageError(f"invalid compressed block size at index {i}, image file is corrupt")
            if i >= stored and cur == 0:
                break  # zeros from here on: all further checks pass
            prev = cur
        return cls(file, block_size=block_size, n_blocks=n, offsets=offsets)

    @property
    def virtual_size(self) -> int:
        return self.block_size * self.n_blocks

    @property
    def dirty(self) -> bool | None:
        return None  # QEMU's driver has no info callback: no dirty-flag key

    def block_status(self, offset: int, length: int) -> BlockStatus:
        """No block status in QEMU's driver: the whole disk is data (map shows one entry)."""
        return BlockStatus(DATA, length)

    def _offset(self, i: int) -> int:
        return self.offsets[i] if i < len(self.offsets) else 0

    def _block(self, i: int) -> bytes:
        """Block ``i`` inflated; the last one is kept (sequential reads hit it repeatedly)."""
        if self._cache is not None and self._cache[0] == i:
            return self._cache[1]
        import zlib

        start, end = self._offset(i), self._offset(i + 1)
        raw = self.file.pread(start, end - start)
        try:
            d = zlib.decompressobj()
            out = d.decompress(raw, self.block_size)
            ok = d.eof and len(out) == self.block_size
        except zlib.error:
            ok = False
        if not ok:
            import errno

            raise VdkitError("Input/output error", errno=errno.EIO)
        self._cache = (i, out)
        return out

    def read(self, offset: int, length: int, backing: Callable[[int, int], bytes] | None = None) -> bytes:
        bs = self.block_size
        parts = []
        pos, end = offset, offset + length
        while pos < end:
            i, within = divmod(pos, bs)
            n = min(end - pos, bs - within)
            parts.append(self._block(i)[within:within + n])
            pos += n
        return b"".join(parts)
