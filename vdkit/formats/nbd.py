"""``driver=nbd`` at the top of a node tree: the export itself, with no format layer.

QEMU's nbd driver is a protocol driver; opened as the top node
(``--image-opts driver=nbd,...``, ``json:{"driver":"nbd",...}``, ``-f nbd``)
it is the image, and qemu-img reports ``file format: nbd``.  vdkit reads it
as the raw driver reads its file, under the name ``nbd``
(``shared/reference/protocols.md`` §1.4, §1.10).  Never probed; a name that
is not an NBD name is refused with QEMU's text.
"""

from __future__ import annotations

from vdkit.block.driver import FormatDriver
from vdkit.formats.raw import RawDriver

TYPE_CHECKING = False  # typing itself is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from vdkit.block.driver import OpenContext
    from vdkit.io.file import ImageFile
    from vdkit.opts import CreateOpts, OptDesc

FORMAT_NAME = "nbd"
NOT_NBD = "File name string for NBD must start with 'nbd:'"
NAME_REQUIRED = NOT_NBD  # block.node refuses other names before opening them


def probe(head: bytes, filename: str) -> int:
    """A protocol is never found by probing."""
    return 0


def open_driver(file: ImageFile, ctx: OpenContext) -> NbdDriver:
    if file.fd >= 0:  # a local file (block/node.py refuses such names before opening them)
        from vdkit.errors import OpenError

        raise OpenError(NOT_NBD)
    return NbdDriver(file)


def create_options() -> list[OptDesc]:
    from vdkit.opts import OptDesc

    return [OptDesc("size", "size", None, "Virtual disk size")]


def create_image(filename: str, opts: CreateOpts) -> None:
    """``create -f nbd`` on a local name: QEMU's fallback cannot open it (NBD names: cli/create.py)."""
    from vdkit.errors import VdkitError

    raise VdkitError(f"Protocol driver 'nbd' does not support image creation, and opening the image failed: {NOT_NBD}")


class NbdDriver(RawDriver):
    """The export as the disk (exact size, block status from the server, no dirty flag, no checks)."""

    format_name = "nbd"
    slow_allocated_zeroes = False  # the server zeroes
    # the top node without a format layer: a copy goes through the driver, not into the file as raw's
    copy_target = FormatDriver.copy_target

    @property
    def virtual_size(self) -> int:
        return self.file.size()

    def flush(self) -> None:
        """The export's flush (``convert --target-image-opts driver=nbd,...`` ends with one, as qemu-img)."""
        self.file.flush()
