"""The raw format: the file is the disk."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vdkit.block.driver import FormatDriver

if TYPE_CHECKING:
    from vdkit.block.io import BlockStatus


class RawDriver(FormatDriver):
    format_name = "raw"

    @property
    def virtual_size(self) -> int:
        # The block layer counts whole 512-byte sectors, so a 1000-byte file
        # is a 1024-byte disk (the tail reads as zeros).
        return (self.file.size() + 511) // 512 * 512

    def read(self, offset: int, length: int, backing: object = None) -> bytes:
        return self.file.pread(offset, length)

    def write(self, offset: int, data: bytes, backing: object = None) -> None:
        self.file.pwrite(offset, data)

    def write_zeroes(self, offset: int, length: int, backing: object = None, *, unmap: bool = False) -> None:
        from vdkit.block.io import punch_hole

        punch_hole(self.file, offset, length)

    def block_status(self, offset: int, length: int) -> BlockStatus:
        """Data or hole at ``offset``, from SEEK_DATA/SEEK_HOLE as QEMU's file driver asks."""
        from vdkit.block.io import raw_file_status

        return raw_file_status(self.file, offset, length)
