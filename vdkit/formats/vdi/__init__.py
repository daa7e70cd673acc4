"""The vdi format (VirtualBox disk images, static and dynamic): the registry's entry points.

Kept tiny: every probe imports this module; the driver is imported on open.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing itself is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from vdkit.block.driver import FormatDriver, OpenContext
    from vdkit.io.file import ImageFile
    from vdkit.opts import CreateOpts, OptDesc

FORMAT_NAME = "vdi"


def probe(head: bytes, filename: str) -> int:
    """The signature 0xbeda107f (little-endian) at 0x40; the text before it is not checked."""
    return 100 if head[0x40:0x44] == b"\x7f\x10\xda\xbe" else 0


def open_driver(file: ImageFile, ctx: OpenContext) -> FormatDriver:
    from vdkit.formats.vdi.driver import VdiDriver

    return VdiDriver(file)


def create_options() -> list[OptDesc]:
    from vdkit.opts import OptDesc

    return [
        OptDesc("size", "size", None, "Virtual disk size"),
        OptDesc("static", "bool", "off", "VDI static (pre-allocated) image"),
    ]


def create_image(filename: str, opts: CreateOpts) -> None:
    from vdkit.formats.vdi.driver import create_from_options

    create_from_options(filename, opts)
