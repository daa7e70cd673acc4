"""The guest data the writable-format tests (parallels, qed, vdi, vhdx, vmdk, vpc) start from.

One 4 MiB raw disk (``src_raw``) and the qemu-io commands (``PATTERN``) that write its first three
pieces into an image of any format, so every suite's images hold data, an explicit zero range and a
hole at the same places.
"""

from __future__ import annotations

from pathlib import Path

PATTERN = ["write -P 0xaa 0 64k", "write -z 1M 64k", "write -P 0x55 2052k 4k"]


def src_raw(d: Path) -> None:
    """``d/src.raw``: 0xaa over the first 64 KiB, 0x55 over 4 KiB at 2052 KiB, 0x11 over the last 64 KiB."""
    disk = bytearray(4 << 20)
    disk[0:65536] = b"\xaa" * 65536
    disk[2052 * 1024:2056 * 1024] = b"\x55" * 4096
    disk[4032 * 1024:] = b"\x11" * (64 * 1024)
    (d / "src.raw").write_bytes(bytes(disk))
