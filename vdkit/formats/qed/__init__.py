"""The QED format (QEMU Enhanced Disk): the registry's entry points.

Kept tiny: every probe imports this module; the driver is imported on open.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing itself is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from vdkit.block.driver import FormatDriver, OpenContext
    from vdkit.io.file import ImageFile
    from vdkit.opts import CreateOpts, OptDesc

FORMAT_NAME = "qed"


def probe(head: bytes, filename: str) -> int:
    """QED by its magic alone (``QED\\0``), as QEMU probes it."""
    return 100 if head[:4] == b"QED\0" else 0


def open_driver(file: ImageFile, ctx: OpenContext) -> FormatDriver:
    from vdkit.formats.qed.driver import QedDriver

    return QedDriver(file, ctx)


def create_options() -> list[OptDesc]:
    from vdkit.opts import OptDesc

    return [
        OptDesc("size", "size", None, "Virtual disk size"),
        OptDesc("backing_file", "string", None, "File name of a base image"),
        OptDesc("backing_fmt", "string", None, "Image format of the base image"),
        OptDesc("cluster_size", "size", "65536", "Cluster size (in bytes)"),
        OptDesc("table_size", "size", None, "L1/L2 table size (in clusters)"),
    ]


def create_image(filename: str, opts: CreateOpts) -> None:
    from vdkit.formats.qed.driver import create_qed

    create_qed(filename, opts)
