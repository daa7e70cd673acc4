"""The qcow2 format driver (versions 2 and 3): the registry's entry points.

Kept tiny: every probe imports this module; the driver is imported on open.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing itself is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from vdkit.block.driver import FormatDriver, OpenContext
    from vdkit.io.file import ImageFile
    from vdkit.opts import CreateOpts, OptDesc

FORMAT_NAME = "qcow2"
SUPPORTS_COMPRESSION = True  # convert -c
# create_image writes through formats.raw.create_file, which reaches NBD exports and RBD images
CREATES_ON_PROTOCOLS = True
# QEMU's open options that tune caches, discard passing and overlap checks: accepted, no effect here
RUNTIME_OPTIONS = frozenset((
    "lazy-refcounts", "pass-discard-request", "pass-discard-snapshot", "pass-discard-other", "overlap-check",
    "cache-size", "l2-cache-size", "l2-cache-entry-size", "refcount-cache-size", "cache-clean-interval"))


def probe(head: bytes, filename: str) -> int:
    """qcow2 by magic and a version of 2 or more (version 1 is the older qcow format)."""
    if len(head) >= 8 and head[:4] == b"QFI\xfb" and int.from_bytes(head[4:8], "big") >= 2:
        return 100
    return 0


def open_driver(file: ImageFile, ctx: OpenContext) -> FormatDriver:
    from vdkit.formats.qcow2.driver import Qcow2Driver

    return Qcow2Driver(file, readonly=ctx.readonly, check_mode=ctx.check_mode)


def create_options() -> list[OptDesc]:
    from vdkit.formats.qcow2.create_opts import OWN_OPTS

    return OWN_OPTS


def create_image(filename: str, opts: CreateOpts) -> None:
    from vdkit.formats.qcow2.create_opts import create_from_options

    create_from_options(filename, opts)
