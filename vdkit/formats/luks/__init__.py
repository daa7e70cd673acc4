"""The luks format (a raw LUKS1 container, as QEMU 7.2) and the LUKS1 header parser qcow2 shares.

Kept tiny: every probe imports this module.  The header parser lives in
:mod:`vdkit.formats.luks.header`; its names (``parse_luks_header``,
``luks_info``, ``LUKS_MAX_HEADER``...) stay importable from here, loaded on
first use (PEP 562), because encrypted qcow2 images use them.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing itself is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from vdkit.block.driver import FormatDriver, OpenContext
    from vdkit.formats.luks.header import LUKS_MAGIC as LUKS_MAGIC
    from vdkit.formats.luks.header import LUKS_MAX_HEADER as LUKS_MAX_HEADER
    from vdkit.formats.luks.header import LuksHeader as LuksHeader
    from vdkit.formats.luks.header import LuksKeySlot as LuksKeySlot
    from vdkit.formats.luks.header import luks_info as luks_info
    from vdkit.formats.luks.header import parse_luks_header as parse_luks_header
    from vdkit.io.file import ImageFile
    from vdkit.opts import CreateOpts, OptDesc

FORMAT_NAME = "luks"


def probe(head: bytes, filename: str) -> int:
    """The LUKS magic and version 1 (LUKS2 is not a format QEMU 7.2 opens)."""
    return 100 if head[:8] == b"LUKS\xba\xbe\x00\x01" else 0


def open_driver(file: ImageFile, ctx: OpenContext) -> FormatDriver:
    from vdkit.formats.luks.driver import LuksDriver

    return LuksDriver.open(file, ctx)


def create_options() -> list[OptDesc]:
    from vdkit.formats.luks.create import create_options as opts

    return opts()


def create_image(filename: str, opts: CreateOpts) -> None:
    from vdkit.formats.luks.create import create as create_luks

    create_luks(filename, opts)


def __getattr__(name: str) -> object:
    if name.startswith("__"):
        raise AttributeError(name)
    header = __import__("vdkit.formats.luks.header", fromlist=["parse_luks_header"])
    try:
        return getattr(header, name)
    except AttributeError:
        raise AttributeError(f"module 'vdkit.formats.luks' has no attribute '{name}'") from None
