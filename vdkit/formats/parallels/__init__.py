"""The Parallels format (Parallels/Virtuozzo expanding disks): the registry's entry points.

Kept tiny: every probe imports this module; the driver is imported on open.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing itself is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from vdkit.block.driver import FormatDriver, OpenContext
    from vdkit.io.file import ImageFile
    from vdkit.opts import CreateOpts, OptDesc

FORMAT_NAME = "parallels"


def probe(head: bytes, filename: str) -> int:
    """Either magic (old ``WithoutFreeSpace`` or ``WithouFreSpacExt``) and version 2."""
    if head[:16] in (b"WithoutFreeSpace", b"WithouFreSpacExt") and head[16:20] == b"\2\0\0\0":
        return 100
    return 0


def open_driver(file: ImageFile, ctx: OpenContext) -> FormatDriver:
    from vdkit.formats.parallels.driver import ParallelsDriver

    return ParallelsDriver(file, ctx)


def create_options() -> list[OptDesc]:
    from vdkit.opts import OptDesc

    return [
        OptDesc("size", "size", None, "Virtual disk size"),
        OptDesc("cluster_size", "size", "1048576", "Parallels image cluster size"),
    ]


def create_image(filename: str, opts: CreateOpts) -> None:
    from vdkit.formats.parallels.driver import create_parallels

    create_parallels(filename, opts)
