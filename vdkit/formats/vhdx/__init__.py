"""The VHDX format (Hyper-V): the registry's entry points.

Kept tiny: every probe imports this module; the driver is imported on open.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing itself is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from vdkit.block.driver import FormatDriver, OpenContext
    from vdkit.io.file import ImageFile
    from vdkit.opts import CreateOpts, OptDesc

FORMAT_NAME = "vhdx"


def probe(head: bytes, filename: str) -> int:
    """The file type identifier ``vhdxfile`` at offset 0."""
    return 100 if head[:8] == b"vhdxfile" else 0


def open_driver(file: ImageFile, ctx: OpenContext) -> FormatDriver:
    from vdkit.formats.vhdx.driver import open_vhdx

    return open_vhdx(file, ctx)


def create_options() -> list[OptDesc]:
    from vdkit.formats.vhdx.newimage import OWN_OPTS

    return OWN_OPTS


def create_image(filename: str, opts: CreateOpts) -> None:
    from vdkit.formats.vhdx.newimage import create_from_options

    create_from_options(filename, opts)
