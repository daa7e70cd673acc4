"""The cloop format (compressed loopback images, V2.0): read-only, as in QEMU 7.2.

Kept tiny: every probe imports this module; the driver is imported on open.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing itself is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from vdkit.block.driver import FormatDriver, OpenContext
    from vdkit.io.file import ImageFile

FORMAT_NAME = "cloop"

# The shell-script preamble a cloop file starts with; QEMU compares exactly these 83 bytes.
MAGIC = b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"


def probe(head: bytes, filename: str) -> int:
    """A low score (2), as in QEMU: the preamble is text that another format could contain."""
    return 2 if head.startswith(MAGIC) else 0


def open_driver(file: ImageFile, ctx: OpenContext) -> FormatDriver:
    from vdkit.formats.cloop.driver import CloopDriver

    return CloopDriver.open(file, ctx)
