"""``driver=http``/``driver=https`` at the top of a node tree: the resource itself, with no format layer.

QEMU's curl driver is a protocol driver; opened as the top node
(``--image-opts driver=http,url=...``, ``json:{"driver":"https",...}``)
it is the image, and qemu-img reports ``file format: http`` (or ``https``).
vdkit reads it as the raw driver reads its file (``shared/reference/protocols.md``
§3.3).  Never probed.
"""

from __future__ import annotations

from vdkit.block.driver import FormatDriver
from vdkit.formats.raw import RawDriver

TYPE_CHECKING = False  # typing itself is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from vdkit.block.driver import OpenContext
    from vdkit.io.file import ImageFile


def probe(head: bytes, filename: str) -> int:
    """A protocol is never found by probing."""
    return 0


def open_driver(file: ImageFile, ctx: OpenContext) -> HttpDriver:
    if file.fd >= 0:  # a local file: the curl driver takes URLs only
        from vdkit.errors import OpenError

        raise OpenError("curl block driver requires an 'url' option")
    return HttpsDriver(file) if getattr(file, "driver", "http") == "https" else HttpDriver(file)


class HttpDriver(RawDriver):
    """The resource as the disk (exact size, no block status, no dirty flag, no checks)."""

    format_name = "http"
    slow_allocated_zeroes = False  # read-only
    # the top node without a format layer: a copy goes through the driver, not into the file as raw's
    copy_target = FormatDriver.copy_target

    @property
    def virtual_size(self) -> int:
        return self.file.size()


class HttpsDriver(HttpDriver):
    format_name = "https"
