"""``driver=blkdebug`` at the top of a node tree (``-f blkdebug``): the image through the rules, no format layer.

QEMU's blkdebug driver is a protocol driver (:mod:`vdkit.protocols.blkdebug`); opened as the top
node it is the image, and qemu-img reports ``file format: blkdebug`` and the image's own bytes, as
the raw driver reads its file.  Never probed.
"""

from __future__ import annotations

from vdkit.block.driver import FormatDriver
from vdkit.formats.raw import RawDriver

TYPE_CHECKING = False  # typing itself is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from vdkit.block.driver import OpenContext
    from vdkit.io.file import ImageFile

FORMAT_NAME = "blkdebug"


def probe(head: bytes, filename: str) -> int:
    """A protocol is never found by probing."""
    return 0


def open_driver(file: ImageFile, ctx: OpenContext) -> BlkdebugDriver:
    return BlkdebugDriver(file)


class BlkdebugDriver(RawDriver):
    """The image through the rules as the disk (its block status is the image file's, as QEMU passes it down)."""

    format_name = "blkdebug"
    # the top node without a format layer: a copy goes through the driver, not into the file as raw's
    copy_target = FormatDriver.copy_target
