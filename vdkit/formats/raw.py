"""The raw format: the file is the disk."""

from __future__ import annotations

from vdkit.block.driver import FormatDriver


class RawDriver(FormatDriver):
    format_name = "raw"

    @property
    def virtual_size(self) -> int:
        # The block layer counts whole 512-byte sectors, so a 1000-byte file
        # is a 1024-byte disk (the tail reads as zeros).
        return (self.file.size() + 511) // 512 * 512

    def read(self, offset: int, length: int) -> bytes:
        return self.file.pread(offset, length)
