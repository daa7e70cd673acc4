"""The bochs format (Bochs "growing" redolog images): read-only, as in QEMU 7.2.

Kept tiny: every probe imports this module; the driver is imported on open.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing itself is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from vdkit.block.driver import FormatDriver, OpenContext
    from vdkit.io.file import ImageFile

FORMAT_NAME = "bochs"


def is_bochs_header(head: bytes) -> bool:
    """Magic, type ``Redolog``, subtype ``Growing`` (NUL-terminated strings) and version 1 or 2."""
    return (head[0:23] == b"Bochs Virtual HD Image\0" and head[32:40] == b"Redolog\0"
            and head[48:56] == b"Growing\0" and head[64:68] in (b"\0\0\1\0", b"\0\0\2\0"))


def probe(head: bytes, filename: str) -> int:
    return 100 if is_bochs_header(head) else 0


def open_driver(file: ImageFile, ctx: OpenContext) -> FormatDriver:
    from vdkit.formats.bochs.driver import BochsDriver

    return BochsDriver.open(file, ctx)
