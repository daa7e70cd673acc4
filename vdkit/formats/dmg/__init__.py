"""The dmg format (Apple UDIF disk images): read-only, as in QEMU 7.2.

Kept tiny: every probe imports this module; the driver is imported on open.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing itself is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from vdkit.block.driver import FormatDriver, OpenContext
    from vdkit.io.file import ImageFile

FORMAT_NAME = "dmg"


def probe(head: bytes, filename: str) -> int:
    """By file name only (``.dmg``), with a low score, as QEMU: the trailer is at the end of the file,
    which probing does not read.  An empty file is raw whatever its name (QEMU probes no empty file)."""
    if not filename.endswith(".dmg"):
        return 0
    import os

    try:
        if os.stat(filename).st_size == 0:
            return 0
    except (OSError, ValueError):
        return 0
    return 2


def open_driver(file: ImageFile, ctx: OpenContext) -> FormatDriver:
    from vdkit.formats.dmg.driver import DmgDriver

    return DmgDriver.open(file, ctx)
