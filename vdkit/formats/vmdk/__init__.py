"""The VMDK format driver (VMware virtual disks): the registry's entry points.

Kept tiny: every probe imports this module; the driver is imported on open.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing itself is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from vdkit.block.driver import FormatDriver, OpenContext
    from vdkit.io.file import ImageFile
    from vdkit.opts import CreateOpts, OptDesc

FORMAT_NAME = "vmdk"
SUPPORTS_COMPRESSION = True  # convert -c (and streamOptimized targets, which always compress)


def probe(head: bytes, filename: str) -> int:
    """Sparse magics, or a text descriptor whose first real line is ``version=1|2|3`` (QEMU's rule).

    Comment lines (``#``) and lines of blanks are skipped; anything else
    first, a bare empty line included, is not a descriptor.
    """
    if head[:4] in (b"KDMV", b"COWD"):
        return 100
    n = len(head)
    p = 0
    while p < n:
        c = head[p]
        if c == 0x23:  # '#': skip the comment line
            q = head.find(b"\n", p)
            if q < 0:
                return 0
            p = q + 1
        elif c == 0x20:  # a line of spaces, optional \r, then \n
            while p < n and head[p] == 0x20:
                p += 1
            if p < n and head[p] == 0x0D:
                p += 1
            if p >= n or head[p] != 0x0A:
                return 0
            p += 1
        else:
            if head[p:p + 8] in (b"version=",) and head[p + 8:p + 9] in (b"1", b"2", b"3"):
                rest = head[p + 9:p + 11]
                if rest[:1] == b"\n" or rest == b"\r\n":
                    return 100
            return 0
    return 0


def open_driver(file: ImageFile, ctx: OpenContext) -> FormatDriver:
    from vdkit.formats.vmdk.driver import open_vmdk

    return open_vmdk(file, ctx)


def create_options() -> list[OptDesc]:
    from vdkit.formats.vmdk.make import OWN_OPTS

    return OWN_OPTS


def create_image(filename: str, opts: CreateOpts) -> None:
    from vdkit.formats.vmdk.make import create_from_options

    create_from_options(filename, opts)
