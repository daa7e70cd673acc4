"""The vpc format (Microsoft Virtual PC / VHD, fixed and dynamic): the registry's entry points.

Kept tiny: every probe imports this module; the driver is imported on open.
A fixed VHD has its only footer at the end of the file, so it probes as raw
(as in QEMU): only the footer copy at offset 0 of a dynamic image is a magic.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing itself is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from vdkit.block.driver import FormatDriver, OpenContext
    from vdkit.io.file import ImageFile
    from vdkit.opts import CreateOpts, OptDesc

FORMAT_NAME = "vpc"


def probe(head: bytes, filename: str) -> int:
    """``conectix`` at offset 0: the footer copy only dynamic (and differencing) files have."""
    return 100 if head[:8] == b"conectix" else 0


def open_driver(file: ImageFile, ctx: OpenContext) -> FormatDriver:
    from vdkit.block.chain import given_option
    from vdkit.formats.vpc.driver import VpcDriver

    mode = given_option(ctx.filename, "force_size_calc")  # --image-opts/json: (vdkit.block.image_opts)
    if mode is not None and mode not in ("chs", "current_size"):
        from vdkit.errors import OpenError

        raise OpenError(f"Invalid size calculation mode: '{mode}'")
    return VpcDriver(file, mode)


def create_options() -> list[OptDesc]:
    from vdkit.opts import OptDesc

    return [
        OptDesc("size", "size", None, "Virtual disk size"),
        OptDesc("subformat", "string", None,
                "Type of virtual hard disk format. Supported formats are {dynamic (default) | fixed} "),
        OptDesc("force_size", "bool", None,
                "Force disk size calculation to use the actual size specified, rather than using the "
                "nearest CHS-based calculation"),
    ]


def create_image(filename: str, opts: CreateOpts) -> None:
    from vdkit.formats.vpc.create import create_from_options

    create_from_options(filename, opts)
